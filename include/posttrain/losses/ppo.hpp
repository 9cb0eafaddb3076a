// posttrain/losses/ppo.hpp — the PPO clipped policy surrogate and its variants (verl / TRL / OpenRLHF).
//
// Inputs (verl/TRL names), all [B, T] (or [N]): logprobs (current policy, differentiable),
// old_logprobs (the policy that sampled; constants), advantages (constants), response_mask (0/1).
//
//   log ρ = logprobs - old_logprobs, optionally clamped to [-c, c] before exp (verl/OpenRLHF: 20;
//   TRL/torchtune: none, the default here)
//   L1 = -A · min(ρ, δ)                            unclipped term; δ is TRL's two-sided bound
//                                                  (INTELLECT-2; TRL `delta`, off by default)
//   L2 = -A · clip(ρ, 1 - ε_low, 1 + ε_high)       clipped term (PPO eq. 7; ε_high ≠ ε_low is DAPO's
//                                                  clip-higher; TRL epsilon_high=None means ε_high = ε_low)
//   L  = max(L1, L2)                               the pessimistic bound
//   dual-clip (Ye et al. 2019, "Mastering complex control in MOBA games", eq. 5): for A < 0,
//   L = min(L, -c·A). verl applies it always with c = 3; OpenRLHF and TRL only when asked; here it is
//   off unless `clip.clip_c` is set (ppo_options::verl() turns it on with c = 3).
// ε_low, ε_high, c, δ and the log-ratio clamp are the fields of ppo_options::clip (clip.hpp, which maps them to
// TRL's epsilon / epsilon_high / delta and verl's clip_ratio_low / clip_ratio_high / clip_ratio_c).
// The per-token loss is aggregated with one of the foundation's modes (aggregate.hpp; `reduction`, verl
// loss_agg_mode), so a global normaliser makes micro-batch sums equal the whole-batch loss.
//
// Gradient with respect to logprobs (what autograd gives through the forward): dL/dlog ρ = ρ · dL/dρ
// where dL/dρ is -A on whichever branch max/min selected while that branch's clamp is inactive,
// and 0 on a clamped branch (ties split evenly, as torch.maximum/minimum do). Zero past a log-ratio clamp.
// Past exp's range (log ρ > 88 in float32, > 709 in float64) a clipped token still has gradient exactly 0 and
// A = 0 a loss of 0: ρ is capped where the surrogate is flat (overflow_safe_log_ratio), so no 0·inf appears.
// Example (torchtune test_ppo_loss, ε = 0.2): old = [0.5, 0.8, 1.2], new = old + 1, A = 1 -> every ratio
// e > 1.2, loss = -1.2, clipfrac 1.
#pragma once

#include <algorithm>
#include <cmath>
#include <optional>
#include <string_view>

#include "posttrain/detail/validate.hpp"
#include "posttrain/losses/clip.hpp"
#include "posttrain/numerics/aggregate.hpp"
#include "posttrain/numerics/masked.hpp"
#include "posttrain/tensor.hpp"

namespace posttrain {

struct ppo_options {
  /// ε_low, ε_high, dual-clip c, TRL δ and the log-ratio clamp (clip.hpp; defaults: ε = 0.2, the rest off).
  clip_options clip = {};
  /// How per-token losses become the scalar (verl loss_agg_mode, default token-mean; TRL presets in grpo.hpp).
  aggregation reduction = aggregation::token_mean;
  /// The global normaliser of `reduction` (see aggregate.hpp): pass it to make micro-batch sums exact.
  std::optional<double> normalizer = std::nullopt;
  /// seq_mean_token_mean's per-sequence count guard (aggregate.hpp): 0 (default, TRL) or 1e-8 (verl agg_loss,
  /// OpenRLHF aggregate_loss). Ignored by the other modes; must be >= 0.
  double token_count_eps = 0.0;
  /// How verl's metrics (pg_clipfrac, pg_clipfrac_lower, approx_kl = ppo_kl) count tokens: the exact mean
  /// (default) or masked_options::verl(), verl compute_policy_loss_vanilla's verl_F.masked_mean (+ 1e-8).
  masked_options metrics = {};
  /// approx_kl from the log-ratio as clip.log_ratio_clamp leaves it (verl compute_policy_loss_vanilla: ppo_kl of the
  /// clamped negative_approx_kl) or, false (default), before the clamp (OpenRLHF PolicyLoss: ppo_kl of
  /// raw_policy_log_ratio). The same without a clamp.
  bool clamped_kl_metric = false;

  /// verl's compute_policy_loss("vanilla") defaults: ε = 0.2, dual-clip c = 3, log ρ clamped to ±20, and its
  /// guards: agg_loss seq-mean-token-mean over n + 1e-8 and metrics through verl_F.masked_mean (+ 1e-8).
  static ppo_options verl() {
    return {.clip = clip_options::verl(),
            .token_count_eps = 1e-8,
            .metrics = masked_options::verl(),
            .clamped_kl_metric = true};
  }
};

template <tensor T>
struct ppo_policy_result {
  T loss;            ///< 0-d aggregated loss (verl actor/pg_loss, TRL loss/policy_avg)
  T per_token_loss;  ///< [B, T] L (0 where masked)
  T ratio;           ///< [B, T] ρ (after the log-ratio clamp)
  /// TRL clip_ratio/low_mean: masked mean of (ρ < 1 - ε_low) & (A < 0).
  T clip_ratio_low;
  /// TRL clip_ratio/high_mean: masked mean of (ρ > 1 + ε_high) & (A > 0).
  T clip_ratio_high;
  /// TRL clip_ratio/region_mean: either of the two.
  T clip_ratio_region;
  /// verl pg_clipfrac: masked mean of (L2 > L1), the tokens whose clipped term won the max.
  T pg_clipfrac;
  /// verl pg_clipfrac_lower: masked mean of (max(L1, L2) > -c·A) & (A < 0); 0 without dual-clip.
  T pg_clipfrac_lower;
  /// verl ppo_kl (k1): masked mean of old_logprobs - logprobs.
  T approx_kl;
  /// TRL PPO policy/approxkl_avg: ½ · masked mean of (logprobs - old_logprobs)²
  /// (TRL averages unmasked, diluting by padding; here only response tokens count).
  T approx_kl_sq;
  T ratio_mean;  ///< masked mean of ρ (TRL val/ratio, torchtune ratios)
  T ratio_min;   ///< min of ρ over kept tokens (0 if none)
  T ratio_max;   ///< max of ρ over kept tokens (0 if none)
  /// TRL clip_ratio/low_min and clip_ratio/high_max: min / max over the rows that have a token of the row's
  /// low / high clip fraction ([N] inputs are one row; 0 when no row has a token).
  T clip_ratio_low_min, clip_ratio_high_max;
  /// TRL `entropy` / verl actor/entropy: masked mean of the per-token entropies passed in (0 when none are).
  T entropy;
};

namespace detail {

/// The one check of ppo_options (clip range and normaliser), run once per public call.
inline void check_ppo_options(std::string_view fn, const ppo_options& o) {
  check_clip_options(fn, o.clip);
  check_normalizer(fn, o.normalizer);
  check_token_count_eps(fn, "options.token_count_eps", o.token_count_eps);
  check_count_eps(fn, "options.metrics.count_eps", o.metrics.count_eps);
}

template <tensor T>
T checked_policy_inputs(std::string_view fn, const T& logprobs, const T& old_logprobs, const T& advantages,
                        const T& response_mask) {
  require_values(fn, "logprobs", logprobs);
  require_rank(fn, "logprobs", logprobs, 1, 2);
  require_like(fn, "logprobs", logprobs, "old_logprobs", old_logprobs);
  require_like(fn, "logprobs", logprobs, "advantages", advantages);
  return checked_mask(fn, "logprobs", logprobs, "response_mask", response_mask);
}

/// The surrogate per token and its derivative with respect to log ρ (before the log-ratio clamp).
template <tensor T>
struct surrogate_terms {
  T loss, d_logratio, ratio, l1, l2, clipped_max;
};

/// 1 where a > b, ½ where equal, 0 where a < b: how torch.maximum splits a gradient between a and b.
template <tensor T>
T max_share(const T& a, const T& b) {
  return ops::add(ops::gt(a, b), ops::mul(ops::eq(a, b), 0.5));
}

/// The log-ratio above which ρ = exp(log ρ) is replaced by exp(cap) where the loss cannot depend on ρ: 80, finite
/// in float32 (exp(80) ≈ 5.5e34 < 3.4e38), and above log of every bound the surrogate compares ρ with.
inline double surrogate_log_ratio_cap(const clip_options& o) {
  double cap = std::max(80.0, std::log1p(o.high()) + 1.0);
  if (o.delta) cap = std::max(cap, std::log(*o.delta) + 1.0);
  if (o.clip_c) cap = std::max(cap, std::log(*o.clip_c) + 1.0);
  return cap;
}

/// log ρ with a stand-in exp(cap) for ρ wherever ρ is past every clip bound and the surrogate is flat in ρ:
/// A >= 0 (clipped at 1 + ε_high, or 0 when A = 0), or A < 0 under δ or dual-clip. The value of the loss is
/// unchanged (each branch compares ρ with bounds below exp(cap)), and both the analytic backward and autograd
/// then multiply a zero by a finite number instead of by +inf (0·inf = NaN). Where A < 0 without δ or dual-clip
/// the loss is -A·ρ itself, +inf past the range, and log ρ is kept.
template <tensor T>
T overflow_safe_log_ratio(const T& log_ratio, const T& A, const clip_options& o) {
  const double cap = surrogate_log_ratio_cap(o);
  if (o.log_ratio_clamp && *o.log_ratio_clamp <= cap) return log_ratio;
  const T capped = ops::minimum(log_ratio, cap);
  if (o.delta || o.clip_c) return capped;
  return ops::where(ops::lt(A, 0.0), log_ratio, capped);
}

template <tensor T>
surrogate_terms<T> ppo_surrogate(const T& logprobs, const T& old_logprobs, const T& advantages, const clip_options& o) {
  const double eps_low = o.clip_low, eps_high = o.high();
  const T log_ratio_raw = ops::sub(logprobs, old_logprobs);
  const double c = o.log_ratio_clamp ? *o.log_ratio_clamp : 0.0;
  const T log_ratio = o.log_ratio_clamp ? ops::clamp(log_ratio_raw, -c, c) : log_ratio_raw;
  const T ratio = ops::exp(log_ratio);  // reported as is (it may overflow to +inf)
  const T& A = advantages;
  // ρ as the loss sees it: past exp's range, only an A < 0 token without δ or dual-clip can still depend on ρ;
  // every other token is clipped there, so its ρ is capped (issue 13 defect 1).
  const T rho = ops::exp(overflow_safe_log_ratio(log_ratio, A, o));
  // L1 = -A·min(ρ, δ)   (TRL GRPO: coef_1 = clamp(coef_1, max=delta))
  const T rho1 = o.delta ? ops::minimum(rho, *o.delta) : rho;
  const T d_rho1 = o.delta ? ops::le(rho, *o.delta) : ops::full_like(rho, 1.0);
  const T l1 = ops::neg(ops::mul(A, rho1));
  // L2 = -A·clip(ρ, 1-ε_low, 1+ε_high)   (PPO eq. 7)
  const T l2 = ops::neg(ops::mul(A, ops::clamp(rho, 1.0 - eps_low, 1.0 + eps_high)));
  const T d_rho2 = ops::mul(ops::ge(rho, 1.0 - eps_low), ops::le(rho, 1.0 + eps_high));
  // max(L1, L2) and its derivative with respect to ρ
  const T s1 = max_share(l1, l2), s2 = max_share(l2, l1);
  const T clipped_max = ops::maximum(l1, l2);
  T d_rho = ops::neg(ops::mul(A, ops::add(ops::mul(s1, d_rho1), ops::mul(s2, d_rho2))));
  T loss = clipped_max;
  if (o.clip_c) {
    // dual-clip: for A < 0, min(max(L1, L2), -c·A)   (Ye et al. 2019 eq. 5; verl compute_policy_loss)
    const T l3 = ops::mul(A, -*o.clip_c);
    const T neg_adv = ops::lt(A, 0.0);
    const T keep = max_share(l3, clipped_max);  // min picks clipped_max where l3 > clipped_max
    loss = ops::where(neg_adv, ops::minimum(clipped_max, l3), clipped_max);
    d_rho = ops::where(neg_adv, ops::mul(d_rho, keep), d_rho);
  }
  T d_logratio = ops::mul(d_rho, rho);
  if (o.log_ratio_clamp)
    d_logratio = ops::mul(d_logratio, ops::mul(ops::ge(log_ratio_raw, -c), ops::le(log_ratio_raw, c)));
  return {loss, d_logratio, ratio, l1, l2, clipped_max};
}

}  // namespace detail

/// PPO clipped policy loss. logprobs, old_logprobs, advantages, response_mask: [B, T] or [N]; optional
/// entropies (per-token, same shape) only feed the `entropy` metric.
template <tensor T>
ppo_policy_result<T> ppo_policy_loss(const T& logprobs, const T& old_logprobs, const T& advantages,
                                     const T& response_mask, const ppo_options& opt = {},
                                     const std::optional<T>& entropies = std::nullopt) {
  constexpr std::string_view fn = "ppo_policy_loss";
  detail::check_ppo_options(fn, opt);
  const T m0 = detail::checked_policy_inputs(fn, logprobs, old_logprobs, advantages, response_mask);
  if (entropies) {
    detail::require_values(fn, "entropies", *entropies);
    detail::require_like(fn, "logprobs", logprobs, "entropies", *entropies);
  }
  const T lp = ops::upcast(logprobs), old = ops::upcast(old_logprobs), A = ops::upcast(advantages);
  const T m = ops::ne(ops::upcast(m0), 0.0);
  const auto s = detail::ppo_surrogate(lp, old, A, opt.clip);
  const T per_token = ops::where(m, s.loss, 0.0);
  const T loss = aggregate(per_token, m, opt.reduction, opt.normalizer, opt.token_count_eps);
  // TRL clip_ratio/{low,high,region}_mean, low_min, high_max (clip.hpp)
  const auto cm = detail::clip_ratio_metrics(s.ratio, A, m, opt.clip);
  // verl compute_policy_loss_vanilla: pg_clipfrac = masked_mean(pg_losses2 > pg_losses1) (opt.metrics: its + 1e-8)
  const T clipfrac = masked_mean(ops::gt(s.l2, s.l1), m, std::nullopt, opt.metrics);
  T clipfrac_lower = ops::scalar_like(lp, 0.0);
  if (opt.clip.clip_c)  // verl: masked_mean((clip_pg_losses1 > pg_losses3) * (A < 0))
    clipfrac_lower = masked_mean(ops::mul(ops::gt(s.clipped_max, ops::mul(A, -*opt.clip.clip_c)), ops::lt(A, 0.0)), m,
                                 std::nullopt, opt.metrics);
  const T dlogp = ops::sub(lp, old);
  // verl ppo_kl reads the clamped log-ratio; OpenRLHF (and the default) the raw one
  const T kl_logratio = opt.clamped_kl_metric && opt.clip.log_ratio_clamp
                            ? ops::clamp(dlogp, -*opt.clip.log_ratio_clamp, *opt.clip.log_ratio_clamp)
                            : dlogp;
  return {loss, per_token, s.ratio, cm.low, cm.high, cm.region, clipfrac, clipfrac_lower,
          // verl ppo_kl = masked_mean(-negative_approx_kl) (k1)
          masked_mean(ops::neg(kl_logratio), m, std::nullopt, opt.metrics),
          // TRL PPO approxkl = 0.5 * (logprobs_diff ** 2).mean()
          ops::mul(masked_mean(ops::square(dlogp), m), 0.5), masked_mean(s.ratio, m),
          detail::masked_extreme(s.ratio, m, false), detail::masked_extreme(s.ratio, m, true), cm.low_min, cm.high_max,
          entropies ? masked_mean(ops::upcast(*entropies), m) : ops::scalar_like(lp, 0.0)};
}

/// ∂(grad_loss · ppo_policy_loss(...).loss)/∂logprobs, [B, T] in logprobs' compute dtype.
template <tensor T>
T ppo_policy_loss_backward(const T& logprobs, const T& old_logprobs, const T& advantages, const T& response_mask,
                           const ppo_options& opt = {}, double grad_loss = 1.0) {
  constexpr std::string_view fn = "ppo_policy_loss_backward";
  detail::check_ppo_options(fn, opt);
  const T m0 = detail::checked_policy_inputs(fn, logprobs, old_logprobs, advantages, response_mask);
  const T lp = ops::upcast(logprobs);
  const T m = ops::ne(ops::upcast(m0), 0.0);
  const auto s = detail::ppo_surrogate(lp, ops::upcast(old_logprobs), ops::upcast(advantages), opt.clip);
  const T w = aggregation_weights(m, opt.reduction, opt.normalizer, opt.token_count_eps);
  return ops::mul(ops::where(m, ops::mul(s.d_logratio, w), 0.0), grad_loss);
}

namespace detail {
/// Advantages [B] (one per sequence, broadcast over tokens) or [B, T] (per token), checked against
/// logprobs [B, T] and returned as [B, T] in the compute dtype.
template <tensor T>
T token_advantages(std::string_view fn, const T& advantages, const T& lp) {
  require_values(fn, "advantages", advantages);
  require_same_device(fn, "logprobs", lp, "advantages", advantages);
  const T A = ops::upcast(advantages);
  if (ops::rank(A) == 1 && ops::size(A, 0) == ops::size(lp, 0))
    return ops::mul(ops::unsqueeze(A, 1), ops::full_like(lp, 1.0));
  if (ops::shape(A) != ops::shape(lp))
    fail(fn, "advantages has shape ", shape_string(ops::shape(advantages)), " but logprobs has shape ",
         shape_string(ops::shape(lp)), "; expected [", ops::size(lp, 0), "] or the shape of logprobs");
  return A;
}
}  // namespace detail

}  // namespace posttrain
