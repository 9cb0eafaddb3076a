// posttrain/losses/grpo.hpp — the GRPO objective in one call (TRL GRPOTrainer._compute_loss, verl with
// use_kl_loss): the clipped surrogate of ppo.hpp plus β · KL(π || π_ref) per token, aggregated by a
// named loss-type preset.
//
//   per-token  L_t = max(-A ρ_t, -A clip(ρ_t, 1-ε, 1+ε_high)) + β · kl_t
//              ε = clip.clip_low (TRL epsilon), ε_high = clip.clip_high (TRL epsilon_high); clip.delta is TRL
//              delta, clip.clip_c / clip.log_ratio_clamp as ppo.hpp (clip.hpp maps every field; TRL's spelling:
//              grpo_options{.clip = clip_options::trl(0.2, 0.28)})
//              kl_t: k3 by default (TRL, verl low_var_kl); with bias_corrected_kl, kl_t · ρ_t
//              (TRL use_bias_correction_kl; ρ not detached, as TRL)
//   presets (TRL loss_type; each is an aggregation mode with a normaliser, aggregate.hpp):
//     grpo     mean over sequences of the per-sequence token mean   (Shao et al. 2024 eq. 3; seq-mean-token-mean)
//              over the rows with a token; count_empty_rows: over all B rows, as TRL's .mean() (also sapo)
//     bnpo     Σ m·L / Σ m over the local batch                     (token-mean, local count)
//     dr_grpo  Σ m·L / (B · max_completion_length)                   (Liu et al. 2025 "Dr. GRPO" §3.1;
//              max_completion_length defaults to the padded T)
//     dapo     Σ m·L / N_tokens of the whole generation batch        (Yu et al. 2025 "DAPO" eq. 8; TRL's default;
//              pass the global count as `normalizer`, otherwise the local count is used, = bnpo)
//   the policy-variant presets (TRL loss_type; the surrogate replaced by policy_variants.hpp's term):
//     cispo    -sg(min(ρ, ε_high))·A·logπ, ε_high = clip.high() the absolute cap (TRL: epsilon_high, which
//              defaults to epsilon; its docs recommend 5.0), normaliser as dapo
//     sapo     -A·σ(τ(ρ-1))·4/τ, normaliser as grpo
//     luspo    the GSPO sequence ratio (always: the LUSPO paper's setup, TRL warns otherwise), Σ m·L / B
//              (TRL (L·|o_i|).mean() with L one value per row); β·kl_t joins each token under the same
//              weights. TRL with beta != 0 broadcasts the [B, 1] loss to [B, T] and takes the unmasked mean
//              over B·T, counting padding's KL and rescaling the policy term by |o_i|/T; not reproduced.
//     vespo    -sg(φ_i)·A·logπ (TRL get_gamma_weights), normaliser as dapo; a rollout ratio enters φ
//   importance_sampling_level = sequence (TRL): ρ becomes GSPO's s_i = exp(mean_t lr) in its token form, so
//   grpo + sequence is GSPO (TRL's recommended pairing); cispo/sapo take s_i too; vespo ignores it.
//   Off-policy controls as policy_variants.hpp, in TRL's order: the policy term is multiplied by the OPSM mask,
//   the top-entropy mask and the rollout IS weight (not for vespo), then β·kl_t is added (never multiplied).
// Each preset equals policy_variant_loss with the matching options plus β·aggregate(kl) under the same
// aggregation (tested). The batch's mask is `response_mask` (verl's name; TRL calls it completion_mask). Without
// old_logprobs the step is on-policy: old = sg(logprobs), ρ = 1 with gradient -A. The gradient goes to logprobs; for
// logits chain token_logprobs_backward(logits, labels, grad).
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

#include "posttrain/detail/validate.hpp"
#include "posttrain/kl/estimators.hpp"
#include "posttrain/losses/clip.hpp"
#include "posttrain/losses/off_policy.hpp"
#include "posttrain/losses/policy_variants.hpp"
#include "posttrain/losses/ppo.hpp"
#include "posttrain/numerics/aggregate.hpp"
#include "posttrain/numerics/masked.hpp"
#include "posttrain/tensor.hpp"

namespace posttrain {

enum class grpo_loss_type { grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo };
/// TRL importance_sampling_level: the ratio per token, or GSPO's per-sequence ratio.
enum class grpo_is_level { token, sequence };

constexpr const char* grpo_loss_type_name(grpo_loss_type t) {
  switch (t) {
    case grpo_loss_type::grpo: return "grpo";
    case grpo_loss_type::bnpo: return "bnpo";
    case grpo_loss_type::dr_grpo: return "dr_grpo";
    case grpo_loss_type::dapo: return "dapo";
    case grpo_loss_type::cispo: return "cispo";
    case grpo_loss_type::sapo: return "sapo";
    case grpo_loss_type::luspo: return "luspo";
    case grpo_loss_type::vespo: return "vespo";
  }
  return "?";
}

/// The aggregation each preset uses (the normaliser is resolved in grpo_loss).
constexpr aggregation grpo_aggregation(grpo_loss_type t) {
  switch (t) {
    case grpo_loss_type::grpo:
    case grpo_loss_type::sapo: return aggregation::seq_mean_token_mean;
    case grpo_loss_type::bnpo:
    case grpo_loss_type::dapo:
    case grpo_loss_type::cispo:
    case grpo_loss_type::vespo: return aggregation::token_mean;
    case grpo_loss_type::dr_grpo: return aggregation::seq_mean_token_sum_norm;
    case grpo_loss_type::luspo: return aggregation::seq_mean_token_sum;  // normaliser B (grpo_loss)
  }
  return aggregation::token_mean;
}

struct grpo_options {
  /// TRL GRPOConfig loss_type default "dapo".
  grpo_loss_type loss_type = grpo_loss_type::dapo;
  /// β on the KL term: TRL 0.0 (no reference model), verl kl_loss_coef 0.001, DeepSeekMath 0.04.
  double beta = 0.0;
  /// The clip range (clip.hpp): clip.clip_low = TRL epsilon (0.2), clip.clip_high = TRL epsilon_high (None:
  /// = epsilon; DAPO 0.28; cispo: the absolute cap), clip.delta = TRL delta; clip.clip_c (verl dual-clip) and
  /// clip.log_ratio_clamp as ppo_options. clip_options::trl(epsilon, epsilon_high, delta) spells TRL's names.
  clip_options clip = {};
  /// The KL estimator (k3 default; any of kl/estimators.hpp, including the straight-through forms).
  kl_options kl = {};
  /// TRL use_bias_correction_kl: kl_t · ρ_t.
  bool bias_corrected_kl = false;
  /// dr_grpo's L in B · L (TRL max_completion_length); empty: the padded length T.
  std::optional<std::int64_t> max_completion_length = std::nullopt;
  /// A global normaliser overriding the preset's local one (dapo/cispo/vespo: global token count
  /// (TRL num_items_in_batch / num_processes); grpo/sapo: global sequence count; dr_grpo: the whole divisor;
  /// luspo: the global number of rows).
  std::optional<double> normalizer = std::nullopt;
  /// TRL importance_sampling_level (default "token").
  grpo_is_level importance_sampling_level = grpo_is_level::token;
  /// TRL sapo_temperature_pos/neg, vespo_k_pos/lambda_pos/k_neg/lambda_neg (their defaults).
  double sapo_temperature_pos = 1.0, sapo_temperature_neg = 1.05;
  double vespo_k_pos = 2.0, vespo_lambda_pos = 3.0, vespo_k_neg = 3.0, vespo_lambda_neg = 2.0;
  /// TRL vllm_importance_sampling_correction/_mode/_clip_min/_clip_max (needs batch.rollout_logprobs).
  std::optional<rollout_is_options> rollout_is = std::nullopt;
  /// TRL off_policy_mask_threshold (OPSM); top_entropy_quantile (needs batch.entropies).
  std::optional<double> opsm_delta = std::nullopt;
  std::optional<double> top_entropy_quantile = std::nullopt;
  /// grpo/sapo's mean over sequences: over the rows with a token (false, default: verl seq-mean-token-mean, the
  /// aggregate.hpp convention) or over every row of the batch, empty ones included (true: TRL f2cd577
  /// GRPOTrainer._compute_loss `(... / mask.sum(-1).clamp(min=1.0)).mean()`, which differs once a row has no
  /// completion token, e.g. with mask_truncated_completions). An explicit `normalizer` takes precedence.
  bool count_empty_rows = false;
  /// The top-entropy mask with a threshold computed elsewhere (policy_variant_options::top_entropy_threshold):
  /// data-parallel, global_top_entropy_threshold (distributed/global.hpp) of every rank's micro-batches makes each
  /// micro-batch keep what TRL keeps on the whole batch. Exclusive with top_entropy_quantile.
  std::optional<double> top_entropy_threshold = std::nullopt;
};

template <tensor T>
struct grpo_batch {
  T logprobs;                                        ///< [B, T] current policy (differentiable)
  T advantages;                                      ///< [B] or [B, T]
  T response_mask;                                   ///< [B, T] 0/1 (TRL completion_mask)
  std::optional<T> old_logprobs = std::nullopt;      ///< [B, T]; empty: on-policy
  std::optional<T> ref_logprobs = std::nullopt;      ///< [B, T]; required when beta != 0
  std::optional<T> rollout_logprobs = std::nullopt;  ///< [B, T] the sampler's (TRL sampling_per_token_logps)
  std::optional<T> entropies = std::nullopt;         ///< [B, T] per-token entropy (top_entropy_quantile)
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
  /// TRL clip_ratio/low_min and clip_ratio/high_max: min / max over rows of the row's low / high clip fraction
  /// (token level: rows with a token; sequence level: every row; 0 when no row qualifies).
  T clip_ratio_low_min, clip_ratio_high_max;
  T cispo_clip_ratio;    ///< TRL cispo_clip_ratio: mean of (ρ > ε_high) & (A > 0) (0 for other loss types)
  T vespo_phi_seq_mean;  ///< TRL vespo/phi_seq_mean: mean of φ_i over the B rows (1 for other loss types)
  /// TRL sampling/importance_sampling_ratio/{min,mean,max}: of the truncated / masked rollout ratio, over the
  /// valid tokens (token level, or mode seq_mask_token) or over the B rows (sequence / geometric level); 1 without
  /// rollout_is.
  T is_ratio_min, is_ratio_mean, is_ratio_max;
  /// verl actor/ppo_kl (core_algos.compute_policy_loss_vanilla: ppo_kl = masked_mean(-negative_approx_kl),
  /// negative_approx_kl = log_prob - old_log_prob): masked mean of old_logprobs - logprobs (0 on-policy).
  T approx_kl;
  /// TRL `entropy` (GRPOTrainer._compute_loss: masked_batch_mean(entropies)) / verl actor/entropy: masked mean
  /// of batch.entropies over the response mask; 0 when the batch carries none.
  T entropy;
};

namespace detail {

/// The policy_variants.hpp options each preset runs (aggregation is grpo_loss's).
inline policy_variant_options grpo_variant_options(const grpo_options& o) {
  policy_variant_options v;
  switch (o.loss_type) {
    case grpo_loss_type::cispo: v.variant = policy_variant::cispo; break;
    case grpo_loss_type::sapo: v.variant = policy_variant::sapo; break;
    case grpo_loss_type::luspo: v.variant = policy_variant::luspo; break;
    case grpo_loss_type::vespo: v.variant = policy_variant::vespo; break;
    default: v.variant = policy_variant::ppo; break;
  }
  v.clip = o.clip;
  v.sequence_ratio = o.importance_sampling_level == grpo_is_level::sequence;
  // TRL cispo: clamp(coef_1, max=epsilon_high), epsilon_high defaulting to epsilon
  v.cispo = cispo_bound::trl_absolute;
  v.cispo_cap = o.clip.high();
  v.sapo_temperature_pos = o.sapo_temperature_pos, v.sapo_temperature_neg = o.sapo_temperature_neg;
  v.vespo_k_pos = o.vespo_k_pos, v.vespo_lambda_pos = o.vespo_lambda_pos;
  v.vespo_k_neg = o.vespo_k_neg, v.vespo_lambda_neg = o.vespo_lambda_neg;
  v.rollout_is = o.rollout_is, v.opsm_delta = o.opsm_delta, v.top_entropy_quantile = o.top_entropy_quantile;
  v.top_entropy_threshold = o.top_entropy_threshold;
  return v;
}

template <tensor T>
struct grpo_terms {
  T mask, loss, d_logp, kl, A, coef1, phi, is_weight;
  bool seq_level = false;  ///< the ratio is one per sequence (TRL then logs per-sequence metrics)
  std::optional<double> normalizer;
};

template <tensor T>
grpo_terms<T> grpo_compute(std::string_view fn, const grpo_batch<T>& b, const grpo_options& o) {
  // every option checked once: beta, clip (clip.hpp), KL, normaliser, then the variant's own
  require_finite(fn, "options.beta", o.beta);
  check_clip_options(fn, o.clip);
  check_kl_options(fn, o.kl);
  check_normalizer(fn, o.normalizer);
  if (o.max_completion_length && *o.max_completion_length <= 0)
    detail::fail(fn, "options.max_completion_length must be > 0, got ", *o.max_completion_length);
  if (o.count_empty_rows && o.loss_type != grpo_loss_type::grpo && o.loss_type != grpo_loss_type::sapo)
    detail::fail(fn, "options.count_empty_rows applies to loss_type grpo or sapo (their mean over sequences), got ",
                 grpo_loss_type_name(o.loss_type));
  const bool seq_level = o.importance_sampling_level == grpo_is_level::sequence || o.loss_type == grpo_loss_type::luspo;
  if (o.bias_corrected_kl && seq_level)
    detail::fail(fn,
                 "options.bias_corrected_kl needs importance_sampling_level token (the sequence ratio's KL correction "
                 "spreads its gradient over the row; not implemented)");
  const policy_variant_options vo = grpo_variant_options(o);
  check_variant_specific_options(fn, vo);
  // The policy term: policy_variants.hpp's variant (which checks the batch), times its constant factor
  // (rollout IS, OPSM, top-entropy)
  const policy_batch<T> pb{b.logprobs, b.advantages, b.response_mask, b.old_logprobs, b.rollout_logprobs, b.entropies};
  const auto v = variant_compute(fn, pb, vo);
  const T &m = v.mask, &lp = v.lp, &A = v.A;  // 0/1 mask, upcast logprobs, [B, T] advantages
  if (o.beta != 0 && !b.ref_logprobs)
    detail::fail(fn, "ref_logprobs is required when options.beta != 0 (got ", o.beta, ")");
  if (b.ref_logprobs) require_like(fn, "logprobs", b.logprobs, "ref_logprobs", *b.ref_logprobs);
  T loss = ops::mul(v.loss, v.factor), d = ops::mul(v.d_logp, v.factor), kl = ops::full_like(lp, 0.0);
  // TRL coef_1 = exp(log_importance_weights): per token, or the row's mean log-ratio (sequence level)
  const T old = b.old_logprobs ? ops::upcast(*b.old_logprobs) : ops::detach(lp);
  const T lr_tok = ops::where(m, ops::sub(ops::detach(lp), old), 0.0);
  const T lr = seq_level ? row_mean_b(lr_tok, m) : lr_tok;
  const auto& clamp = o.clip.log_ratio_clamp;
  const double c = clamp ? *clamp : 0.0;
  const T coef1 = ops::exp(clamp ? ops::clamp(lr, -c, c) : lr);
  if (o.beta != 0) {
    const T ref = ops::upcast(*b.ref_logprobs);
    kl = kl_penalty(lp, ref, o.kl);
    T dkl = kl_penalty_backward(lp, ref, ops::full_like(lp, 1.0), o.kl);
    if (o.bias_corrected_kl) {
      // TRL use_bias_correction_kl: per_token_kl * coef_1; d(kl·ρ) = dkl·ρ + kl·dρ (ρ not detached, as TRL)
      const T lr_raw = ops::sub(lp, old);
      const T dratio = clamp ? ops::mul(coef1, ops::mul(ops::ge(lr_raw, -c), ops::le(lr_raw, c))) : coef1;
      const T ratio = ops::exp(clamp ? ops::clamp(lr_raw, -c, c) : lr_raw);  // carries autograd
      dkl = ops::add(ops::mul(dkl, coef1), ops::mul(kl, dratio));
      kl = ops::mul(kl, ratio);
    }
    // L_t = c_t·policy_t + β·kl_t   (TRL: per_token_loss = per_token_loss + beta * per_token_kl, after the masks)
    loss = ops::add(loss, ops::mul(kl, o.beta));
    d = ops::add(d, ops::mul(dkl, o.beta));
  }
  std::optional<double> normalizer = o.normalizer;
  if (o.loss_type == grpo_loss_type::dr_grpo && !normalizer) {
    // TRL dr_grpo: loss.sum() / (B · max_completion_length)
    const double len = o.max_completion_length ? double(*o.max_completion_length) : double(ops::size(lp, 1));
    normalizer = double(ops::size(lp, 0)) * len;
  }
  // TRL luspo: (per_token_loss · |o_i|).mean() over the B rows = Σ m·L / B
  if (o.loss_type == grpo_loss_type::luspo && !normalizer) normalizer = double(ops::size(lp, 0));
  // TRL grpo/sapo: .mean() over every row, empty ones included
  if (o.count_empty_rows && !normalizer) normalizer = double(ops::size(lp, 0));
  return {m, loss, d, kl, A, coef1, v.phi, v.is_weight, seq_level && ops::rank(b.advantages) == 1, normalizer};
}

}  // namespace detail

/// The GRPO objective. See the header comment for the per-token loss and the presets.
template <tensor T>
grpo_result<T> grpo_loss(const grpo_batch<T>& batch, const grpo_options& opt = {}) {
  const auto t = detail::grpo_compute("grpo_loss", batch, opt);
  const T& m = t.mask;
  const T per_token = ops::where(m, t.loss, 0.0);
  const T loss = aggregate(per_token, m, grpo_aggregation(opt.loss_type), t.normalizer);
  const bool rows = t.seq_level;
  // TRL clip_ratio/* of coef_1 (clip.hpp): over valid tokens, or over rows with a per-sequence ratio
  const auto cm = detail::clip_ratio_metrics(t.coef1, t.A, m, opt.clip, rows);
  T cispo_clip = ops::scalar_like(per_token, 0.0), phi_mean = ops::scalar_like(per_token, 1.0);
  // TRL: is_cispo_clipped = (coef_1 > epsilon_high) & (advantages > 0)
  if (opt.loss_type == grpo_loss_type::cispo)
    cispo_clip = detail::token_or_row_mean(ops::mul(ops::gt(t.coef1, opt.clip.high()), ops::gt(t.A, 0.0)), m, rows);
  // TRL vespo/phi_seq_mean: φ is [B, 1] with per-sequence advantages
  if (opt.loss_type == grpo_loss_type::vespo)
    phi_mean = detail::token_or_row_mean(t.phi, m, ops::rank(batch.advantages) == 1);
  // TRL sampling/importance_sampling_ratio/*: token modes over valid tokens, sequence modes over rows
  T is_min = ops::scalar_like(per_token, 1.0), is_mean = is_min, is_max = is_min;
  if (opt.rollout_is) {
    // seq_mask_token weights vary along a row: token statistics
    if (opt.rollout_is->level == is_level::token || opt.rollout_is->mode == is_mode::seq_mask_token) {
      is_min = detail::masked_extreme(t.is_weight, m, false), is_max = detail::masked_extreme(t.is_weight, m, true);
      is_mean = masked_mean(t.is_weight, m);
    } else {
      const T row = ops::max(t.is_weight, 1, true), all = ops::full_like(row, 1.0);  // one value per row
      is_min = detail::masked_extreme(row, all, false), is_max = detail::masked_extreme(row, all, true);
      is_mean = ops::div(ops::sum_all(row), double(ops::size(row, 0)));
    }
  }
  const T lp = ops::upcast(batch.logprobs);
  const T old = batch.old_logprobs ? ops::upcast(*batch.old_logprobs) : ops::detach(lp);
  // verl ppo_kl = masked_mean(-(log_prob - old_log_prob), response_mask)
  const T ppo_kl = masked_mean(ops::sub(old, lp), m);
  // TRL mean_entropy = masked_batch_mean(entropies) (token level: Σ H·m / Σ m)
  const T mean_entropy = batch.entropies ? masked_mean(ops::upcast(*batch.entropies), m) : ops::scalar_like(lp, 0.0);
  return {loss,
          per_token,
          masked_mean(t.kl, m),
          cm.low,
          cm.high,
          cm.region,
          masked_mean(t.coef1, m),
          cm.low_min,
          cm.high_max,
          cispo_clip,
          phi_mean,
          is_min,
          is_mean,
          is_max,
          ops::detach(ppo_kl),
          ops::detach(mean_entropy)};
}

/// ∂(grad_loss · grpo_loss(batch).loss)/∂logprobs, [B, T].
template <tensor T>
T grpo_loss_backward(const grpo_batch<T>& batch, const grpo_options& opt = {}, double grad_loss = 1.0) {
  const auto t = detail::grpo_compute("grpo_loss_backward", batch, opt);
  const T w = aggregation_weights(t.mask, grpo_aggregation(opt.loss_type), t.normalizer);
  return ops::mul(ops::where(t.mask, ops::mul(t.d_logp, w), 0.0), grad_loss);
}

}  // namespace posttrain
