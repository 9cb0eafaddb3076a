// posttrain/losses/value.hpp — the PPO critic loss with clipping, the entropy bonus, and the combined
// PPO objective (policy + vf_coef · value - entropy_coef · entropy).
//
// Value loss (PPO2 baselines / TRL PPOTrainer / verl compute_value_loss / torchtune), per token:
//   V_clip = clip(V, V_old - ε_v, V_old + ε_v)
//   L_v    = ½ · max((V - R)², (V_clip - R)²)
// aggregated like the policy loss. `clip` empty disables clipping (L_v = ½ (V - R)²).
// ∂L_v/∂V = (V - R) on the unclipped branch, (V_clip - R)·[V inside the clip range] on the clipped one
// (ties split evenly, as torch.max does).
// vf_clipfrac (verl critic/vf_clipfrac, TRL val/clipfrac_avg): masked mean of (V_clip - R)² > (V - R)².
// verl's guards (value_options::verl()): vf_clipfrac and vpred_mean through verl_F.masked_mean (n + 1e-8,
// core_algos.compute_value_loss and workers/critic/dp_critic.py at b178a3c), agg_loss seq-mean-token-mean over
// n_b + 1e-8; `metrics` and `token_count_eps` choose them, the defaults are the exact means (TRL).
// Example: V = 1.5, V_old = 1, R = 0, ε_v = 0.2: V_clip = 1.2, L_v = ½ max(2.25, 1.44) = 1.125.
#pragma once

#include <optional>
#include <string_view>

#include "posttrain/detail/validate.hpp"
#include "posttrain/losses/ppo.hpp"
#include "posttrain/numerics/aggregate.hpp"
#include "posttrain/numerics/logits.hpp"
#include "posttrain/numerics/masked.hpp"
#include "posttrain/tensor.hpp"

namespace posttrain {

struct value_options {
  /// ε_v around old_values (TRL cliprange_value 0.2, verl cliprange_value 0.5, torchtune 0.2); empty: no clip.
  std::optional<double> clip = 0.2;
  /// How per-token losses become the scalar (verl loss_agg_mode; the same field name as every other loss).
  aggregation reduction = aggregation::token_mean;
  std::optional<double> normalizer = std::nullopt;
  /// seq_mean_token_mean's per-sequence count guard (aggregate.hpp): 0 (default, TRL) or 1e-8 (verl agg_loss).
  double token_count_eps = 0.0;
  /// How clipfrac and vpred_mean count tokens: the exact mean (default, TRL) or masked_options::verl()
  /// (verl compute_value_loss vf_clipfrac and dp_critic vpred_mean: verl_F.masked_mean, n + 1e-8).
  masked_options metrics = {};

  /// verl compute_value_loss / dp_critic: cliprange_value 0.5 and its guards (metrics and seq-mean-token-mean
  /// over n + 1e-8).
  static value_options verl(double cliprange_value = 0.5) {
    value_options o{.clip = cliprange_value};
    o.token_count_eps = 1e-8;
    o.metrics = masked_options::verl();
    return o;
  }
};

template <tensor T>
struct value_result {
  T loss;            ///< 0-d (verl critic/vf_loss, TRL loss/value_avg); already includes the ½
  T per_token_loss;  ///< [B, T]
  T clipfrac;        ///< verl critic/vf_clipfrac, TRL val/clipfrac_avg
  T vpred_mean;      ///< verl critic/vpred_mean: masked mean of values
};

namespace detail {
inline void check_value_options(std::string_view fn, const value_options& o) {
  if (o.clip) {
    require_finite(fn, "options.clip", *o.clip);
    if (*o.clip <= 0) fail(fn, "options.clip must be > 0 when set, got ", *o.clip);
  }
  check_normalizer(fn, o.normalizer);
  check_token_count_eps(fn, "options.token_count_eps", o.token_count_eps);
  check_count_eps(fn, "options.metrics.count_eps", o.metrics.count_eps);
}

template <tensor T>
T checked_value_inputs(std::string_view fn, const T& values, const T& old_values, const T& returns, const T& mask) {
  require_values(fn, "values", values);
  require_rank(fn, "values", values, 1, 2);
  require_like(fn, "values", values, "old_values", old_values);
  require_like(fn, "values", values, "returns", returns);
  return checked_mask(fn, "values", values, "response_mask", mask);
}

template <tensor T>
struct value_terms {
  T loss, d_values, unclipped_sq, clipped_sq;
};

template <tensor T>
value_terms<T> value_surrogate(const T& V, const T& V_old, const T& R, const value_options& o) {
  const T e1 = ops::sub(V, R);
  const T sq1 = ops::square(e1);
  if (!o.clip) return {ops::mul(sq1, 0.5), e1, sq1, sq1};
  // V_clip = clamp(V, V_old - ε, V_old + ε), as verl clip_by_value and TRL PPOTrainer write it: exactly V inside the
  // range (OpenRLHF's V_old + clamp(V - V_old, ±ε) can be an ulp off V there, which flips vf_clipfrac's strict > on a
  // tie: the loss then agrees to rounding, the metric not)
  const T inside = ops::mul(ops::ge(ops::sub(V, V_old), -*o.clip), ops::le(ops::sub(V, V_old), *o.clip));
  const T vc = ops::where(inside, V, ops::add(V_old, ops::clamp(ops::sub(V, V_old), -*o.clip, *o.clip)));
  const T e2 = ops::sub(vc, R);
  const T sq2 = ops::square(e2);
  // ½ max((V - R)², (V_clip - R)²)   (PPO2 / verl compute_value_loss)
  const T loss = ops::mul(ops::maximum(sq1, sq2), 0.5);
  const T d = ops::add(ops::mul(max_share(sq1, sq2), e1), ops::mul(max_share(sq2, sq1), ops::mul(e2, inside)));
  return {loss, d, sq1, sq2};
}
}  // namespace detail

/// Clipped value loss. values, old_values, returns, response_mask: [B, T] or [N].
template <tensor T>
value_result<T> value_loss(const T& values, const T& old_values, const T& returns, const T& response_mask,
                           const value_options& opt = {}) {
  constexpr std::string_view fn = "value_loss";
  detail::check_value_options(fn, opt);
  const T m0 = detail::checked_value_inputs(fn, values, old_values, returns, response_mask);
  const T V = ops::upcast(values);
  const T m = ops::ne(ops::upcast(m0), 0.0);
  const auto s = detail::value_surrogate(V, ops::upcast(old_values), ops::upcast(returns), opt);
  const T per_token = ops::where(m, s.loss, 0.0);
  return {aggregate(per_token, m, opt.reduction, opt.normalizer, opt.token_count_eps), per_token,
          masked_mean(ops::gt(s.clipped_sq, s.unclipped_sq), m, std::nullopt, opt.metrics),
          masked_mean(V, m, std::nullopt, opt.metrics)};
}

/// ∂(grad_loss · value_loss(...).loss)/∂values.
template <tensor T>
T value_loss_backward(const T& values, const T& old_values, const T& returns, const T& response_mask,
                      const value_options& opt = {}, double grad_loss = 1.0) {
  constexpr std::string_view fn = "value_loss_backward";
  detail::check_value_options(fn, opt);
  const T m0 = detail::checked_value_inputs(fn, values, old_values, returns, response_mask);
  const T m = ops::ne(ops::upcast(m0), 0.0);
  const auto s = detail::value_surrogate(ops::upcast(values), ops::upcast(old_values), ops::upcast(returns), opt);
  const T w = aggregation_weights(m, opt.reduction, opt.normalizer, opt.token_count_eps);
  return ops::mul(ops::where(m, ops::mul(s.d_values, w), 0.0), grad_loss);
}

/// The entropy of the policy at each response token, aggregated: logits [B, T, V], mask [B, T] -> 0-d.
/// A trainer subtracts entropy_coef times it (verl entropy_coeff 0, TRL GRPO logs it only).
template <tensor T>
T entropy_bonus(const T& logits, const T& response_mask, aggregation reduction = aggregation::token_mean,
                std::optional<double> normalizer = std::nullopt) {
  const T h = entropy(logits);
  return aggregate(
      h, ops::ne(detail::checked_mask("entropy_bonus", "entropy(logits)", h, "response_mask", response_mask), 0.0),
      reduction, normalizer);
}

/// ∂(grad_loss · entropy_bonus)/∂logits, [B, T, V].
template <tensor T>
T entropy_bonus_backward(const T& logits, const T& response_mask, aggregation reduction = aggregation::token_mean,
                         std::optional<double> normalizer = std::nullopt, double grad_loss = 1.0) {
  const T h = entropy(logits);
  const T m = ops::ne(
      detail::checked_mask("entropy_bonus_backward", "entropy(logits)", h, "response_mask", response_mask), 0.0);
  const T g = entropy_backward(logits, ops::mul(aggregation_weights(m, reduction, normalizer), grad_loss));
  // selected, not multiplied: a masked token's NaN logits give a zero gradient row
  return ops::where(ops::unsqueeze(ops::to_dtype(m, ops::dtype_of(g)), -1), g, 0.0);
}

/// Coefficients of the combined PPO objective (TRL PPOTrainer: vf_coef 0.1; verl critic is separate).
struct ppo_objective_options {
  ppo_options policy = {};
  value_options value = {};
  double vf_coef = 0.1;
  double entropy_coef = 0.0;
};

template <tensor T>
struct ppo_objective_result {
  T loss;  ///< policy + vf_coef · value - entropy_coef · entropy
  ppo_policy_result<T> policy;
  value_result<T> value;
  T entropy;  ///< aggregated entropy (0 when no logits were given)
};

/// loss = L_policy + vf_coef · L_value - entropy_coef · H (TRL PPOTrainer `loss = pg_loss + vf_coef * vf_loss`,
/// torchtune PPOLoss, plus the usual entropy bonus). `logits` (optional) [B, T, V] give the entropy term.
template <tensor T>
ppo_objective_result<T> ppo_objective(const T& logprobs, const T& old_logprobs, const T& advantages, const T& values,
                                      const T& old_values, const T& returns, const T& response_mask,
                                      const ppo_objective_options& opt = {}, const T* logits = nullptr) {
  detail::require_finite("ppo_objective", "options.vf_coef", opt.vf_coef);
  detail::require_finite("ppo_objective", "options.entropy_coef", opt.entropy_coef);
  auto pol = ppo_policy_loss(logprobs, old_logprobs, advantages, response_mask, opt.policy);
  auto val = value_loss(values, old_values, returns, response_mask, opt.value);
  T ent = ops::scalar_like(pol.loss, 0.0);
  if (logits) ent = entropy_bonus(*logits, response_mask, opt.policy.reduction, opt.policy.normalizer);
  T loss = ops::add(pol.loss, ops::mul(val.loss, opt.vf_coef));
  if (logits) loss = ops::sub(loss, ops::mul(ent, opt.entropy_coef));
  return {loss, std::move(pol), std::move(val), ent};
}

}  // namespace posttrain
