// posttrain/advantages/gae.hpp — generalised advantage estimation and discounted returns over masked [B, T].
//
// GAE (Schulman et al. 2016, "High-dimensional continuous control using GAE", eqs. 11-16):
//   δ_t = r_t + γ V_{t+1} - V_t,   A_t = δ_t + γλ A_{t+1},   returns R_t = A_t + V_t,
// with V_T = 0 and A_T = 0 past the end. λ = 1 gives A_t = Σ_k γ^k r_{t+k} - V_t (Monte-Carlo return
// minus value); λ = 0 gives the one-step TD error.
// Masked tokens (option `skip_masked`):
//   true (default, verl compute_gae_advantage_return): a masked token (e.g. a tool observation inside
//     a multi-turn response) is skipped: V_{next} and A_{next} are carried across it unchanged, so the
//     next kept token bootstraps from the value of the next *kept* token.
//   false (TRL PPOTrainer, torchtune): the plain recursion over every position; the caller zeroes
//     rewards and values past the end (TRL keeps the value at the first pad, where it puts the score).
// Outputs are 0 at masked positions by default (option `outside`, issue 17): gae_outside::carried
// reproduces verl compute_gae_advantage_return (verl/trainer/ppo/core_algos.py, b178a3c), whose outputs
// are not masked: a masked position holds the carried A_{next} (0 past the end), its return A + V (= V on
// trailing padding), and the whitened advantage there is whatever whitening.outside says (verl writes the
// whitened value: gae_options::verl()). Advantages are whitened over the mask (TRL and verl both do,
// unbiased variance, ε 1e-8) unless `whiten` is false; returns are never whitened.
// Advantages and returns are constants in training (no gradient flows through them).
// Example (torchtune test_rewards): V = R = [[0,0,0,1]], γ = 0.9, λ = 0.95, plain recursion ->
// returns [γ³λ², γ²λ, γ, 1] = [0.6579225, 0.7695, 0.9, 1.0].
#pragma once

#include <string_view>
#include <vector>

#include "posttrain/detail/validate.hpp"
#include "posttrain/numerics/masked.hpp"
#include "posttrain/tensor.hpp"

namespace posttrain {

/// What gae writes outside the response mask.
enum class gae_outside {
  /// 0 in the returns and the raw advantages (default; posttrain's behaviour: nothing is written outside the
  /// mask, as TRL PPOTrainer zeroes its advantages there).
  zero,
  /// verl compute_gae_advantage_return: the recursion's carried values (advantages_reversed holds lastgaelam,
  /// returns = advantages + values at every position).
  carried,
};

struct gae_options {
  /// γ (TRL PPOConfig gamma 1.0, verl 1.0, torchtune 1.0).
  double gamma = 1.0;
  /// λ (TRL PPOConfig lam 0.95, torchtune 0.95; verl's default is 1.0).
  double lambda = 0.95;
  /// Carry V_next and A_next across masked tokens (verl); false: plain recursion (TRL, torchtune).
  bool skip_masked = true;
  /// Whiten the advantages over the mask (TRL, verl); returns are computed before whitening.
  bool whiten = true;
  whiten_options whitening = {};
  /// Outputs outside the mask: 0 (default) or verl's carried values (see gae_outside).
  gae_outside outside = gae_outside::zero;

  /// verl b178a3c compute_gae_advantage_return (γ = λ = 1, its defaults): masked tokens skipped, outputs
  /// unmasked, advantages whitened by verl_F.masked_whiten (whiten_options::verl()).
  static constexpr gae_options verl(double gamma = 1.0, double lambda = 1.0) {
    return {.gamma = gamma,
            .lambda = lambda,
            .skip_masked = true,
            .whiten = true,
            .whitening = whiten_options::verl(),
            .outside = gae_outside::carried};
  }
};

template <tensor T>
struct gae_result {
  T advantages;  ///< [B, T], whitened unless options.whiten is false; 0 where masked (see options.outside)
  T returns;     ///< [B, T] A + V before whitening (the critic's target); 0 where masked (see options.outside)
};

namespace detail {
inline void check_discount(std::string_view fn, std::string_view name, double v) {
  require_finite(fn, name, v);
  if (v < 0 || v > 1) detail::fail(fn, name, " must be in [0, 1], got ", v);
}

template <tensor T>
T reversed_concat(std::vector<T> columns_last_first) {
  std::vector<T> cols(columns_last_first.rbegin(), columns_last_first.rend());
  return ops::concat(cols, 1);
}
}  // namespace detail

/// GAE. token_level_rewards, values, response_mask: [B, T] (same shape; mask 0/1).
template <tensor T>
gae_result<T> gae(const T& token_level_rewards, const T& values, const T& response_mask, const gae_options& opt = {}) {
  constexpr std::string_view fn = "gae";
  detail::check_discount(fn, "options.gamma", opt.gamma);
  detail::check_discount(fn, "options.lambda", opt.lambda);
  if (opt.whiten) detail::check_whiten_options(fn, "options.whitening.", opt.whitening);
  if (opt.outside != gae_outside::zero && opt.outside != gae_outside::carried)
    detail::fail(fn, "options.outside must be gae_outside::zero or gae_outside::carried, got ",
                 static_cast<int>(opt.outside));
  detail::require_values(fn, "token_level_rewards", token_level_rewards);
  detail::require_rank(fn, "token_level_rewards", token_level_rewards, 2, 2);
  detail::require_like(fn, "token_level_rewards", token_level_rewards, "values", values);
  const T r = ops::upcast(token_level_rewards), v = ops::upcast(values);
  const T m = ops::ne(
      ops::upcast(detail::checked_mask(fn, "token_level_rewards", token_level_rewards, "response_mask", response_mask)),
      0.0);
  const std::int64_t B = ops::size(r, 0), len = ops::size(r, 1);
  T next_value = ops::full(r, {B, 1}, 0.0), last_adv = ops::full(r, {B, 1}, 0.0);
  std::vector<T> adv;
  adv.reserve(static_cast<std::size_t>(len));
  for (std::int64_t t = len - 1; t >= 0; --t) {
    const T rt = ops::slice(r, 1, t, 1), vt = ops::slice(v, 1, t, 1), mt = ops::slice(m, 1, t, 1);
    // δ_t = r_t + γ V_{t+1} - V_t;  A_t = δ_t + γλ A_{t+1}   (GAE eqs. 11-16)
    const T delta = ops::sub(ops::add(rt, ops::mul(next_value, opt.gamma)), vt);
    const T a = ops::add(delta, ops::mul(last_adv, opt.gamma * opt.lambda));
    if (opt.skip_masked) {
      // verl: nextvalues = V_t·m_t + (1-m_t)·nextvalues; lastgaelam = A_t·m_t + (1-m_t)·lastgaelam
      next_value = ops::where(mt, vt, next_value);
      last_adv = ops::where(mt, a, last_adv);
    } else {
      next_value = vt;
      last_adv = a;
    }
    // verl appends the carried lastgaelam; at a kept position it equals A_t
    adv.push_back(opt.outside == gae_outside::carried ? last_adv : a);
  }
  if (opt.outside == gae_outside::carried) {
    // verl: returns = advantages + values; advantages = masked_whiten(advantages, response_mask), all unmasked
    const T raw = detail::reversed_concat(std::move(adv));
    return {opt.whiten ? masked_whiten(raw, m, opt.whitening) : raw, ops::add(raw, v)};
  }
  const T raw = ops::where(m, detail::reversed_concat(std::move(adv)), 0.0);
  const T returns = ops::where(m, ops::add(raw, v), 0.0);
  const T advantages = opt.whiten ? masked_whiten(raw, m, opt.whitening) : raw;
  return {advantages, returns};
}

/// Discounted returns G_t = r_t + γ G_{t+1}, reset after each sequence's last kept token: a masked token
/// zeroes the running return that flows to earlier tokens (verl compute_reinforce_plus_plus_outcome_advantage,
/// OpenRLHF get_cumulative_returns). token_level_rewards, response_mask: [B, T] -> [B, T] (0 where masked).
template <tensor T>
T discounted_returns(const T& token_level_rewards, const T& response_mask, double gamma = 1.0) {
  constexpr std::string_view fn = "discounted_returns";
  detail::check_discount(fn, "gamma", gamma);
  detail::require_values(fn, "token_level_rewards", token_level_rewards);
  detail::require_rank(fn, "token_level_rewards", token_level_rewards, 2, 2);
  const T r = ops::upcast(token_level_rewards);
  const T m = ops::ne(
      ops::upcast(detail::checked_mask(fn, "token_level_rewards", token_level_rewards, "response_mask", response_mask)),
      0.0);
  const std::int64_t B = ops::size(r, 0), len = ops::size(r, 1);
  T running = ops::full(r, {B, 1}, 0.0);
  std::vector<T> out;
  out.reserve(static_cast<std::size_t>(len));
  for (std::int64_t t = len - 1; t >= 0; --t) {
    // G_t = r_t + γ G_{t+1}; then G ← G · m_t (verl: running_return * response_mask[:, t])
    running = ops::add(ops::slice(r, 1, t, 1), ops::mul(running, gamma));
    out.push_back(running);
    running = ops::where(ops::slice(m, 1, t, 1), running, 0.0);  // selected: a masked NaN reward resets too
  }
  return ops::where(m, detail::reversed_concat(std::move(out)), 0.0);
}

}  // namespace posttrain
