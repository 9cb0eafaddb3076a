// posttrain/losses/grpo.hpp — the GRPO objective in one call (TRL GRPOTrainer._compute_loss, verl with
// use_kl_loss): the clipped surrogate of ppo.hpp plus β · KL(π || π_ref) per token, aggregated by a
// named loss-type preset.
//
//   per-token  L_t = max(-A ρ_t, -A clip(ρ_t, 1-ε, 1+ε_high)) + β · kl_t
//              kl_t: k3 by default (TRL, verl low_var_kl); with bias_corrected_kl, kl_t · ρ_t
//              (TRL use_bias_correction_kl; ρ not detached, as TRL)
//   presets (TRL loss_type; each is an aggregation mode with a normaliser, aggregate.hpp):
//     grpo     mean over sequences of the per-sequence token mean   (Shao et al. 2024 eq. 3; seq-mean-token-mean)
//     bnpo     Σ m·L / Σ m over the local batch                     (token-mean, local count)
//     dr_grpo  Σ m·L / (B · max_completion_length)                   (Liu et al. 2025 "Dr. GRPO" §3.1;
//              max_completion_length defaults to the padded T)
//     dapo     Σ m·L / N_tokens of the whole generation batch        (Yu et al. 2025 "DAPO" eq. 8; TRL's default;
//              pass the global count as `normalizer`, otherwise the local count is used, = bnpo)
// Extension point: a variant is a preset (how tokens are weighed) plus a ratio (how ρ is formed). The
// token-level ratio ρ_t = exp(logπ_t - logπ_old,t) is the only one here; the sequence-level (GSPO) and
// off-policy corrections (issue: sequence-level/off-policy variants) add a ratio kind to grpo_options and
// a case to detail::grpo_ratio, leaving the surrogate, the KL term and the presets unchanged.
// Without old_logprobs the step is on-policy: old = sg(logprobs), ρ = 1 with gradient -A.
// The gradient goes to logprobs; for logits chain token_logprobs_backward(logits, labels, grad).
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

#include "posttrain/detail/validate.hpp"
#include "posttrain/kl/estimators.hpp"
#include "posttrain/losses/ppo.hpp"
#include "posttrain/numerics/aggregate.hpp"
#include "posttrain/numerics/masked.hpp"
#include "posttrain/tensor.hpp"

namespace posttrain {

enum class grpo_loss_type { grpo, bnpo, dr_grpo, dapo };

constexpr const char* grpo_loss_type_name(grpo_loss_type t) {
  switch (t) {
    case grpo_loss_type::grpo: return "grpo";
    case grpo_loss_type::bnpo: return "bnpo";
    case grpo_loss_type::dr_grpo: return "dr_grpo";
    case grpo_loss_type::dapo: return "dapo";
  }
  return "?";
}

/// The aggregation each preset uses (the normaliser is resolved in grpo_loss).
constexpr aggregation grpo_aggregation(grpo_loss_type t) {
  switch (t) {
    case grpo_loss_type::grpo: return aggregation::seq_mean_token_mean;
    case grpo_loss_type::bnpo: return aggregation::token_mean;
    case grpo_loss_type::dr_grpo: return aggregation::seq_mean_token_sum_norm;
    case grpo_loss_type::dapo: return aggregation::token_mean;
  }
  return aggregation::token_mean;
}

struct grpo_options {
  /// TRL GRPOConfig loss_type default "dapo".
  grpo_loss_type loss_type = grpo_loss_type::dapo;
  /// β on the KL term: TRL 0.0 (no reference model), verl kl_loss_coef 0.001, DeepSeekMath 0.04.
  double beta = 0.0;
  /// ε (TRL epsilon 0.2); ε_high empty = ε (TRL epsilon_high None; DAPO 0.28).
  double epsilon = 0.2;
  std::optional<double> epsilon_high = std::nullopt;
  /// TRL delta (two-sided clip), dual-clip c (verl) and the log-ratio clamp: as ppo_options.
  std::optional<double> delta = std::nullopt;
  std::optional<double> clip_c = std::nullopt;
  std::optional<double> log_ratio_clamp = std::nullopt;
  /// The KL estimator (k3 default; any of kl/estimators.hpp, including the straight-through forms).
  kl_options kl = {};
  /// TRL use_bias_correction_kl: kl_t · ρ_t.
  bool bias_corrected_kl = false;
  /// dr_grpo's L in B · L (TRL max_completion_length); empty: the padded length T.
  std::optional<std::int64_t> max_completion_length = std::nullopt;
  /// A global normaliser overriding the preset's local one (dapo: global token count; grpo: global
  /// sequence count; dr_grpo: the whole divisor).
  std::optional<double> normalizer = std::nullopt;
};

template <tensor T>
struct grpo_batch {
  T logprobs;                                    ///< [B, T] current policy (differentiable)
  T advantages;                                  ///< [B] or [B, T]
  T completion_mask;                             ///< [B, T]
  std::optional<T> old_logprobs = std::nullopt;  ///< [B, T]; empty: on-policy
  std::optional<T> ref_logprobs = std::nullopt;  ///< [B, T]; required when beta != 0
};

template <tensor T>
struct grpo_result {
  T loss;               ///< 0-d
  T per_token_loss;     ///< [B, T]
  T kl;                 ///< 0-d TRL `kl`: masked mean of the per-token KL (0 when beta == 0)
  T clip_ratio_low;     ///< TRL clip_ratio/low_mean
  T clip_ratio_high;    ///< TRL clip_ratio/high_mean
  T clip_ratio_region;  ///< TRL clip_ratio/region_mean
  T ratio_mean;         ///< masked mean of ρ
};

namespace detail {

inline ppo_options grpo_policy_options(const grpo_options& o) {
  return {.clip_low = o.epsilon,
          .clip_high = o.epsilon_high,
          .clip_c = o.clip_c,
          .delta = o.delta,
          .log_ratio_clamp = o.log_ratio_clamp};
}

template <tensor T>
struct grpo_terms {
  T mask, loss, d_logp, kl, A;
  surrogate_terms<T> pg;
  std::optional<double> normalizer;
};

template <tensor T>
grpo_terms<T> grpo_compute(std::string_view fn, const grpo_batch<T>& b, const grpo_options& o) {
  require_finite(fn, "options.beta", o.beta);
  require_finite(fn, "options.epsilon", o.epsilon);
  if (o.epsilon <= 0) detail::fail(fn, "options.epsilon must be > 0, got ", o.epsilon);
  if (o.epsilon_high && !(*o.epsilon_high > 0))
    detail::fail(fn, "options.epsilon_high must be > 0, got ", *o.epsilon_high);
  const ppo_options po = grpo_policy_options(o);
  check_ppo_options(fn, po);
  check_kl_options(fn, o.kl);
  check_normalizer(fn, o.normalizer);
  require_values(fn, "logprobs", b.logprobs);
  require_rank(fn, "logprobs", b.logprobs, 2, 2);
  const T m = ops::ne(ops::upcast(checked_mask(fn, "logprobs", b.logprobs, "completion_mask", b.completion_mask)), 0.0);
  const T lp = ops::upcast(b.logprobs);
  T A = token_advantages(fn, b.advantages, lp);
  if (b.old_logprobs) require_like(fn, "logprobs", b.logprobs, "old_logprobs", *b.old_logprobs);
  if (o.beta != 0 && !b.ref_logprobs)
    detail::fail(fn, "ref_logprobs is required when options.beta != 0 (got ", o.beta, ")");
  if (b.ref_logprobs) require_like(fn, "logprobs", b.logprobs, "ref_logprobs", *b.ref_logprobs);
  if (o.max_completion_length && *o.max_completion_length <= 0)
    detail::fail(fn, "options.max_completion_length must be > 0, got ", *o.max_completion_length);
  const T old = b.old_logprobs ? ops::upcast(*b.old_logprobs) : ops::detach(lp);
  auto pg = ppo_surrogate(lp, old, A, po);
  T loss = pg.loss, d = pg.d_logratio, kl = ops::full_like(lp, 0.0);
  if (o.beta != 0) {
    const T ref = ops::upcast(*b.ref_logprobs);
    kl = kl_penalty(lp, ref, o.kl);
    T dkl = kl_penalty_backward(lp, ref, ops::full_like(lp, 1.0), o.kl);
    if (o.bias_corrected_kl) {
      // TRL use_bias_correction_kl: per_token_kl * coef_1; d(kl·ρ) = dkl·ρ + kl·dρ
      const T dratio = o.log_ratio_clamp ? ops::mul(pg.ratio, ops::mul(ops::ge(ops::sub(lp, old), -*o.log_ratio_clamp),
                                                                       ops::le(ops::sub(lp, old), *o.log_ratio_clamp)))
                                         : pg.ratio;
      dkl = ops::add(ops::mul(dkl, pg.ratio), ops::mul(kl, dratio));
      kl = ops::mul(kl, pg.ratio);
    }
    // L_t = surrogate + β·kl_t   (TRL: per_token_loss = per_token_loss + beta * per_token_kl)
    loss = ops::add(loss, ops::mul(kl, o.beta));
    d = ops::add(d, ops::mul(dkl, o.beta));
  }
  std::optional<double> normalizer = o.normalizer;
  if (o.loss_type == grpo_loss_type::dr_grpo && !normalizer) {
    // TRL dr_grpo: loss.sum() / (B · max_completion_length)
    const double len = o.max_completion_length ? double(*o.max_completion_length) : double(ops::size(lp, 1));
    normalizer = double(ops::size(lp, 0)) * len;
  }
  return {m, loss, d, kl, A, pg, normalizer};
}

}  // namespace detail

/// The GRPO objective. See the header comment for the per-token loss and the presets.
template <tensor T>
grpo_result<T> grpo_loss(const grpo_batch<T>& batch, const grpo_options& opt = {}) {
  const auto t = detail::grpo_compute("grpo_loss", batch, opt);
  const T per_token = ops::where(t.mask, t.loss, 0.0);
  const T loss = aggregate(per_token, t.mask, grpo_aggregation(opt.loss_type), t.normalizer);
  const double eps_high = opt.epsilon_high ? *opt.epsilon_high : opt.epsilon;
  const T low = ops::mul(ops::lt(t.pg.ratio, 1.0 - opt.epsilon), ops::lt(t.A, 0.0));
  const T high = ops::mul(ops::gt(t.pg.ratio, 1.0 + eps_high), ops::gt(t.A, 0.0));
  return {loss,
          per_token,
          masked_mean(t.kl, t.mask),
          masked_mean(low, t.mask),
          masked_mean(high, t.mask),
          masked_mean(ops::maximum(low, high), t.mask),
          masked_mean(t.pg.ratio, t.mask)};
}

/// ∂(grad_loss · grpo_loss(batch).loss)/∂logprobs, [B, T].
template <tensor T>
T grpo_loss_backward(const grpo_batch<T>& batch, const grpo_options& opt = {}, double grad_loss = 1.0) {
  const auto t = detail::grpo_compute("grpo_loss_backward", batch, opt);
  const T w = aggregation_weights(t.mask, grpo_aggregation(opt.loss_type), t.normalizer);
  return ops::mul(ops::where(t.mask, ops::mul(t.d_logp, w), 0.0), grad_loss);
}

}  // namespace posttrain
