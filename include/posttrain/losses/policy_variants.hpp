// posttrain/losses/policy_variants.hpp — the RL policy-loss variants beside PPO/GRPO: sequence-level
// and geometric ratios, soft gates, stop-gradient importance weights, plain policy gradient, covariance-
// selected tokens. The off-policy factors TRL/verl put around them (rollout importance sampling, OPSM) are in
// off_policy.hpp, the token selections (top-entropy mask, Clip-Cov / KL-Cov covariance) in token_selection.hpp.
//
// Inputs (verl/TRL names), [B, T]: logprobs (differentiable), old_logprobs (constants; empty = on-policy,
// old = sg(logprobs)), advantages ([B] or [B, T]), response_mask; optional rollout_logprobs (the sampler's,
// e.g. vLLM: TRL sampling_per_token_logps, verl rollout_log_probs) and entropies (per-token, for
// top_entropy_quantile). lr_t = logprobs_t - old_logprobs_t, ρ_t = exp(lr_t), |o_i| = Σ_t m_{i,t}.
//
// Per-token losses L_t (the variant), each with its derivative D_t = ∂L_t/∂logprobs_t:
//   ppo     max(-A ρ, -A clip(ρ, 1-ε_l, 1+ε_h)) (ppo.hpp; optional delta / dual-clip; ε_l, ε_h, c, δ and the
//           log-ratio clamp are `clip`, clip.hpp, shared with ppo_options and grpo_options)
//   gspo    ppo with ρ replaced by s_i = exp(Σ_t m lr_t / |o_i|) in its token-level gradient form
//           s_{i,t} = sg(s_i)·π_t/sg(π_t) (Zheng et al. 2025 arXiv:2507.18071 eq. 13-14, GSPO-token;
//           verl gspo; TRL importance_sampling_level="sequence"): value s_i, ∂s_{i,t}/∂logπ_t = s_i.
//           With A constant per sequence it has the gradient of TRL's sequence form (shown in the tests).
//           gspo_gradient = sequence (OpenRLHF PolicyLoss policy_loss_type="gspo", models/loss.py at 3c3be62):
//           the same value, the gradient through s_i itself, ∂s_i/∂logπ_t = s_i·m_t/|o_i| (|o_i| clamped to
//           ≥ 1), so ∂loss/∂logπ_t = (m_t/|o_i|)·Σ_t' w_t'·∂L_t'/∂log s_i. With per-token advantages A_t this
//           differs from the token form; with A constant along the row the two agree.
//   luspo   gspo per token, aggregated as Σ_i |o_i|·L_i / B (TRL loss_type="luspo": (L·|o|).mean())
//   gmpo    -Ā_i · exp(Σ_t m·sgnA·min(sgnA·lr, sgnA·clip(lr, -ε_l, ε_h)) / |o_i|), Ā_i the row's mean
//           advantage (Zhao et al. 2025 arXiv:2507.20673 eq. 7; verl policy_loss "geo_mean", lr clamped to ±20);
//           the same value on every token of the row, so the gradient is spread over the row.
//   cispo   -sg(clip(ρ))·A·logπ (MiniMax-M1 arXiv:2506.13585 eq. 4): TRL clamps ρ ≤ cispo_cap (its
//           epsilon_high used as an absolute cap), verl clamps to [1-ε_l, 1+ε_h]; D = -clip(ρ)·A.
//   sapo    -A · σ(τ(ρ-1))·4/τ, τ = τ+ for A > 0 else τ- (Gao et al. 2025 arXiv:2511.20347 eq. 5;
//           TRL get_sapo_token_loss): D = -A·4σ(1-σ)·ρ, which is -A at ρ = 1 (the unclipped gradient).
//   vespo   -sg(φ_i)·A·logπ, φ = exp(λ + k·log w - λ·w), w = exp(clamp(Σ_t m·clamp(lr, ±20), log 1e-8, 20)),
//           (k, λ) = (k+, λ+) for A ≥ 0 else (k-, λ-) (TRL get_gamma_weights; φ(1) = 1).
//   reinforce / gpg   -A·logπ (no ratio; GPG = verl compute_policy_loss_gpg, its advantages in
//           advantages/group.hpp gpg_advantages).
//   clip_cov  ppo's max(L1, L2)·(1 - sel_t) (Cui et al. 2025 arXiv:2505.22617 §4, Clip-Cov; verl
//           compute_policy_loss_clip_cov): candidates are valid, lb < cov < ub and not already clipped by PPO
//           (L2 > L1); sel = max(⌊clip_cov_ratio·N_valid⌋, 1) of them (token_selection.hpp: a seeded draw,
//           cov_seed, or the largest covariances, cov_rule = top). verl zeroes the selected tokens' loss (value
//           and gradient), they stay in the normaliser. clip_c and delta do not apply (verl).
//   kl_cov  -A·ρ + sel_t·kl_cov_coef·|lr_t| (same paper, KL-Cov; verl compute_policy_loss_kl_cov: no clipping):
//           sel = the max(⌊kl_cov_ratio·N_valid⌋, 1) valid tokens of largest cov; D = -A·ρ + sel·coef·sign(lr).
//           The selection is a constant of the step (it only picks tokens), so D ignores it, like autograd.
//           Both select over the batch they are given; batch.cov_selection (a 0/1 [B, T] made outside, e.g. by
//           global_cov_selection over every micro-batch of every data-parallel rank) replaces that selection.
// Off-policy controls: constant factors c_t that multiply L_t before aggregation (TRL's order: the
// aggregation's normaliser still counts every response token): the rollout IS weight and the OPSM row mask
// (off_policy.hpp), the top-entropy token mask (token_selection.hpp).
// Aggregation (`reduction`, verl loss_agg_mode): any mode of aggregate.hpp with an optional global normaliser;
// presets follow TRL.
// TRL's presets of these variants (cispo, sapo, luspo, vespo, sequence-level GSPO) also run inside grpo_loss
// (grpo.hpp), which adds β·KL per token and TRL's normalisers; here, add β·kl_penalty(...) yourself.
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
#include <string_view>

#include "posttrain/detail/validate.hpp"
#include "posttrain/losses/clip.hpp"
#include "posttrain/losses/off_policy.hpp"
#include "posttrain/losses/ppo.hpp"
#include "posttrain/losses/token_selection.hpp"
#include "posttrain/numerics/aggregate.hpp"
#include "posttrain/numerics/masked.hpp"
#include "posttrain/numerics/stable.hpp"
#include "posttrain/tensor.hpp"

namespace posttrain {

enum class policy_variant { ppo, gspo, luspo, gmpo, cispo, sapo, vespo, reinforce, gpg, clip_cov, kl_cov };
/// GSPO's gradient: the token form sg(s_i)·π_t/sg(π_t) (GSPO-token, arXiv:2507.18071 eq. 13-14; verl gspo, TRL
/// importance_sampling_level="sequence") or through the sequence-mean ratio s_i itself (OpenRLHF gspo).
enum class gspo_gradient { token, sequence };
/// CISPO's bound on the stop-gradient weight: TRL `clamp(ρ, max=epsilon_high)`, or verl's [1-ε_l, 1+ε_h].
enum class cispo_bound { trl_absolute, verl_two_sided };

struct policy_variant_options {
  policy_variant variant = policy_variant::ppo;
  /// clip.hpp: clip_low, clip_high (ε_l, ε_h; ε_h empty = ε_l): the clip range of ppo/gspo/luspo/clip_cov,
  /// GMPO's log-space range, verl CISPO's band; clip_c (dual-clip) and delta (TRL δ): ppo/gspo/luspo only;
  /// log_ratio_clamp: the log-ratio (token, or GSPO's sequence mean) clamped to ±c before exp (verl gspo: 10).
  clip_options clip = {};
  /// TRL importance_sampling_level="sequence" for ppo/cispo/sapo (gspo/luspo are always sequence-level;
  /// clip_cov/kl_cov always token-level, as verl).
  bool sequence_ratio = false;
  cispo_bound cispo = cispo_bound::trl_absolute;
  double cispo_cap = 5.0;  ///< TRL's absolute cap (its docs' recommended epsilon_high for cispo)
  double sapo_temperature_pos = 1.0, sapo_temperature_neg = 1.05;                               ///< TRL defaults
  double vespo_k_pos = 2.0, vespo_lambda_pos = 3.0, vespo_k_neg = 3.0, vespo_lambda_neg = 2.0;  ///< TRL defaults
  /// Clip-Cov (verl policy_loss.clip_cov_ratio 2e-4, clip_cov_lb 1.0, clip_cov_ub 5.0).
  double clip_cov_ratio = 2e-4, clip_cov_lb = 1.0, clip_cov_ub = 5.0;
  /// KL-Cov (verl policy_loss.kl_cov_ratio 2e-4, ppo_kl_coef 1.0).
  double kl_cov_ratio = 2e-4, kl_cov_coef = 1.0;
  /// Selection rule; empty: verl's (clip_cov random, kl_cov top). cov_seed seeds the random draw.
  std::optional<cov_rule> cov_selection = std::nullopt;
  std::uint64_t cov_seed = 0;
  std::optional<rollout_is_options> rollout_is = std::nullopt;  ///< needs rollout_logprobs
  std::optional<double> opsm_delta = std::nullopt;              ///< TRL off_policy_mask_threshold
  std::optional<double> top_entropy_quantile = std::nullopt;    ///< TRL top_entropy_quantile (needs entropies)
  /// How per-token losses become the scalar (verl loss_agg_mode) and its global normaliser (aggregate.hpp).
  aggregation reduction = aggregation::token_mean;
  std::optional<double> normalizer = std::nullopt;
  /// How the gradient reaches logπ through a sequence ratio (gspo, luspo, ppo with sequence_ratio): token form
  /// (default: GSPO-token, verl, TRL) or through s_i = exp(masked mean log-ratio) (OpenRLHF gspo, whose per-token
  /// advantages then mix along the row).
  gspo_gradient gspo_grad = gspo_gradient::token;
  /// ε added to each row's token count by seq_mean_token_mean (aggregate.hpp; OpenRLHF aggregate_loss 1e-8).
  double token_count_eps = 0.0;
  /// The top-entropy mask with a threshold computed elsewhere: keep valid tokens with H ≥ it (needs entropies).
  /// Data-parallel: global_top_entropy_threshold (distributed/global.hpp) over every micro-batch of every rank
  /// gives the whole batch's torch.quantile, so every micro-batch keeps the tokens TRL's get_high_entropy_mask
  /// keeps on the whole batch. Exclusive with top_entropy_quantile (which takes the quantile of this batch).
  std::optional<double> top_entropy_threshold = std::nullopt;

  /// OpenRLHF PolicyLoss(policy_loss_type="gspo") at 3c3be62: ratio exp(Σ m·lr / max(|o|, 1)) without a clamp,
  /// gradient through it, clip [1-ε_l, 1+ε_h] (OpenRLHF eps_clip 0.2), sample-level aggregation with token
  /// count + 1e-8. OpenRLHF forms lr against rollout_log_probs when its vLLM IS correction is on: pass those as
  /// old_logprobs then.
  static policy_variant_options openrlhf_gspo(double clip_low = 0.2, std::optional<double> clip_high = std::nullopt) {
    policy_variant_options o{.variant = policy_variant::gspo,
                             .clip = {.clip_low = clip_low, .clip_high = clip_high},
                             .reduction = aggregation::seq_mean_token_mean};
    o.gspo_grad = gspo_gradient::sequence;
    o.token_count_eps = 1e-8;
    return o;
  }

  // TRL GRPOTrainer presets (loss_type and its normaliser; pass the global token count as normalizer for
  // the dapo-style ones to match TRL's num_items_in_batch).
  static policy_variant_options trl_gspo() {
    return {.variant = policy_variant::gspo,
            .clip = clip_options::trl(3e-4, 4e-4),
            .reduction = aggregation::seq_mean_token_mean};  // GSPO paper §5.1 ε = 3e-4/4e-4, TRL docs
  }
  static policy_variant_options trl_luspo() {
    return {.variant = policy_variant::luspo, .clip = clip_options::trl(3e-4, 4e-4)};
  }
  static policy_variant_options trl_cispo() { return {.variant = policy_variant::cispo}; }
  static policy_variant_options trl_sapo() {
    return {.variant = policy_variant::sapo, .reduction = aggregation::seq_mean_token_mean};  // TRL: grpo normaliser
  }
  static policy_variant_options trl_vespo() { return {.variant = policy_variant::vespo}; }
  static policy_variant_options verl_gmpo() {
    return {.variant = policy_variant::gmpo,
            .clip = {.clip_low = 0.4, .clip_high = 0.4},
            .reduction = aggregation::seq_mean_token_mean};  // verl geo_mean: mean over sequences, ε = 0.4
  }
};

template <tensor T>
struct policy_batch {
  T logprobs;                                        ///< [B, T]
  T advantages;                                      ///< [B] or [B, T]
  T response_mask;                                   ///< [B, T]
  std::optional<T> old_logprobs = std::nullopt;      ///< [B, T]; empty: on-policy
  std::optional<T> rollout_logprobs = std::nullopt;  ///< [B, T] the sampler's log-probs
  std::optional<T> entropies = std::nullopt;         ///< [B, T] per-token entropy
  /// [B, T] 0/1 (non-zero selects): Clip-Cov / KL-Cov's selected tokens made outside the loss, used instead of
  /// the loss's own selection over this batch. Data-parallel: global_cov_selection (distributed/global.hpp)
  /// selects over every micro-batch of every rank the tokens one process selects on the whole batch.
  std::optional<T> cov_selection = std::nullopt;
};

template <tensor T>
struct policy_variant_result {
  T loss;               ///< 0-d
  T per_token_loss;     ///< [B, T] c_t·L_t (0 where masked)
  T ratio;              ///< [B, T] the ratio the variant uses (ρ, s_i or GMPO's ρ̄_i broadcast)
  T clip_ratio_low;     ///< TRL clip_ratio/low_mean on `ratio` (ppo/gspo/luspo)
  T clip_ratio_high;    ///< TRL clip_ratio/high_mean
  T clip_ratio_region;  ///< TRL clip_ratio/region_mean
  T clip_ratio_low_min, clip_ratio_high_max;  ///< TRL clip_ratio/low_min, high_max (row extremes, clip.hpp)
  T cispo_clip_ratio;                         ///< TRL cispo_clip_ratio: (ρ > cap) & (A > 0); verl band: ρ outside it
  T phi;                                      ///< [B, T] VESPO φ_i broadcast (1 for other variants)
  T phi_mean;                                 ///< masked mean of φ
  T is_weight;                                ///< [B, T] rollout IS factor (1 without rollout_is)
  T is_ratio_mean, is_ratio_min, is_ratio_max;  ///< raw rollout ratio statistics over valid tokens
  T token_keep;                                 ///< [B, T] OPSM × top-entropy selection (0/1)
  T cov_selected;                               ///< [B, T] Clip-Cov / KL-Cov selected tokens (0/1)
  T cov_selected_frac;  ///< masked mean of cov_selected (verl clip_cov logs it as actor/pg_clipfrac)
  /// verl actor/ppo_kl (core_algos.compute_policy_loss_vanilla: ppo_kl = masked_mean(-negative_approx_kl),
  /// negative_approx_kl = log_prob - old_log_prob): masked mean of old_logprobs - logprobs (0 on-policy).
  T approx_kl;
  /// TRL `entropy` (GRPOTrainer._compute_loss: masked_batch_mean(entropies)) / verl actor/entropy: masked mean
  /// of batch.entropies over the response mask; 0 when the batch carries none.
  T entropy;
};

namespace detail {

/// Every option but `clip` and `normalizer` (grpo_loss checks those itself, once).
inline void check_variant_specific_options(std::string_view fn, const policy_variant_options& o) {
  if (!(o.cispo_cap > 0)) fail(fn, "options.cispo_cap must be > 0, got ", o.cispo_cap);
  if (!(o.sapo_temperature_pos > 0) || std::isinf(o.sapo_temperature_pos))
    fail(fn, "options.sapo_temperature_pos must be finite and > 0, got ", o.sapo_temperature_pos);
  if (!(o.sapo_temperature_neg > 0) || std::isinf(o.sapo_temperature_neg))
    fail(fn, "options.sapo_temperature_neg must be finite and > 0, got ", o.sapo_temperature_neg);
  require_finite(fn, "options.vespo_k_pos", o.vespo_k_pos);
  require_finite(fn, "options.vespo_k_neg", o.vespo_k_neg);
  if (!(o.vespo_lambda_pos > 0) || std::isinf(o.vespo_lambda_pos))
    fail(fn, "options.vespo_lambda_pos must be finite and > 0, got ", o.vespo_lambda_pos);
  if (!(o.vespo_lambda_neg > 0) || std::isinf(o.vespo_lambda_neg))
    fail(fn, "options.vespo_lambda_neg must be finite and > 0, got ", o.vespo_lambda_neg);
  if (!(o.clip_cov_ratio > 0 && o.clip_cov_ratio <= 1))
    fail(fn, "options.clip_cov_ratio must be in (0, 1], got ", o.clip_cov_ratio);
  if (std::isnan(o.clip_cov_lb) || std::isnan(o.clip_cov_ub) || !(o.clip_cov_lb < o.clip_cov_ub))
    fail(fn, "options.clip_cov_lb must be < options.clip_cov_ub, got ", o.clip_cov_lb, " and ", o.clip_cov_ub);
  if (!(o.kl_cov_ratio > 0 && o.kl_cov_ratio <= 1))
    fail(fn, "options.kl_cov_ratio must be in (0, 1], got ", o.kl_cov_ratio);
  if (!(o.kl_cov_coef >= 0) || std::isinf(o.kl_cov_coef))
    fail(fn, "options.kl_cov_coef must be finite and >= 0, got ", o.kl_cov_coef);
  if (o.rollout_is) {
    check_rollout_is_options(fn, *o.rollout_is);
    if (o.variant == policy_variant::vespo && o.rollout_is->level != is_level::token)
      fail(fn, "options.rollout_is.level must be token for vespo (TRL puts the per-token ratio inside phi)");
  }
  if (o.opsm_delta) require_finite(fn, "options.opsm_delta", *o.opsm_delta);
  if (o.top_entropy_quantile && !(*o.top_entropy_quantile >= 0 && *o.top_entropy_quantile <= 1))
    fail(fn, "options.top_entropy_quantile must be in [0, 1], got ", *o.top_entropy_quantile);
  if (o.top_entropy_threshold && std::isnan(*o.top_entropy_threshold))
    fail(fn, "options.top_entropy_threshold must not be NaN");
  if (o.top_entropy_threshold && o.top_entropy_quantile)
    fail(fn, "options.top_entropy_quantile (", *o.top_entropy_quantile, ") and options.top_entropy_threshold (",
         *o.top_entropy_threshold, ") are both set; set one");
  if (o.gspo_grad != gspo_gradient::token && o.gspo_grad != gspo_gradient::sequence)
    fail(fn, "options.gspo_grad must be gspo_gradient::token or gspo_gradient::sequence, got ",
         static_cast<int>(o.gspo_grad));
  if (o.gspo_grad == gspo_gradient::sequence && o.variant != policy_variant::gspo &&
      o.variant != policy_variant::luspo && !(o.variant == policy_variant::ppo && o.sequence_ratio))
    fail(fn,
         "options.gspo_grad = sequence needs a sequence ratio through PPO's surrogate (variant gspo, luspo, or ppo "
         "with sequence_ratio)");
  check_token_count_eps(fn, "options.token_count_eps", o.token_count_eps);
}

/// The one check of policy_variant_options, run once per public call.
inline void check_variant_options(std::string_view fn, const policy_variant_options& o) {
  check_clip_options(fn, o.clip);
  check_normalizer(fn, o.normalizer);
  check_variant_specific_options(fn, o);
}

template <tensor T>
struct variant_terms {
  T mask, loss, d_logp, ratio, A, factor, phi, is_weight, is_raw, keep, lp, cov_sel;
  bool spread = false;  ///< GMPO: d_logp is ∂g_i/∂logπ_t, the per-row loss g_i spread over the row
  /// OpenRLHF gspo: d_logp is ∂L_t/∂log s_i, which reaches logπ_t' as m_t'/|o_i| (the row's mean)
  bool through_row_mean = false;
  aggregation reduction;
  std::optional<double> normalizer;
};

/// Clip-Cov / KL-Cov's selection rule: the option, or verl's (clip_cov random, kl_cov top).
inline cov_rule cov_selection_rule(const policy_variant_options& o) {
  return o.cov_selection ? *o.cov_selection : o.variant == policy_variant::clip_cov ? cov_rule::random : cov_rule::top;
}

/// Clip-Cov's surrogate: ppo_surrogate on the token log-ratio without dual-clip and δ (verl clip_cov).
template <tensor T>
surrogate_terms<T> clip_cov_surrogate(const T& lr, const T& A, clip_options cc) {
  cc.clip_c.reset(), cc.delta.reset();
  return ppo_surrogate(lr, ops::full_like(lr, 0.0), A, cc);
}

/// verl clip_cov's candidates: valid, not clipped by PPO (L2 ≤ L1), with lb < cov < ub. [B, T] 0/1.
template <tensor T>
T clip_cov_candidates(const surrogate_terms<T>& s, const T& cov, const T& m, const policy_variant_options& o) {
  return ops::mul(ops::mul(m, ops::le(s.l2, s.l1)), ops::mul(ops::gt(cov, o.clip_cov_lb), ops::lt(cov, o.clip_cov_ub)));
}

/// The variant's per-token terms; checks the batch, not the options (the public entry checks them once).
template <tensor T>
variant_terms<T> variant_compute(std::string_view fn, const policy_batch<T>& b, const policy_variant_options& o) {
  require_values(fn, "logprobs", b.logprobs);
  require_rank(fn, "logprobs", b.logprobs, 2, 2);
  const T m = ops::ne(ops::upcast(checked_mask(fn, "logprobs", b.logprobs, "response_mask", b.response_mask)), 0.0);
  const T lp = ops::upcast(b.logprobs);
  T A = token_advantages(fn, b.advantages, lp);
  if (b.old_logprobs) require_like(fn, "logprobs", b.logprobs, "old_logprobs", *b.old_logprobs);
  if (b.rollout_logprobs) require_like(fn, "logprobs", b.logprobs, "rollout_logprobs", *b.rollout_logprobs);
  if (b.entropies) require_like(fn, "logprobs", b.logprobs, "entropies", *b.entropies);
  if (o.rollout_is && !b.rollout_logprobs) fail(fn, "rollout_logprobs is required when options.rollout_is is set");
  if (o.top_entropy_quantile && !b.entropies)
    fail(fn, "entropies is required when options.top_entropy_quantile is set");
  if (o.top_entropy_threshold && !b.entropies)
    fail(fn, "entropies is required when options.top_entropy_threshold is set");
  const bool cov_variant = o.variant == policy_variant::clip_cov || o.variant == policy_variant::kl_cov;
  if (b.cov_selection && !cov_variant)
    fail(fn, "cov_selection applies to variant clip_cov or kl_cov, got variant ", static_cast<int>(o.variant));
  if (b.cov_selection) require_like(fn, "logprobs", b.logprobs, "cov_selection", *b.cov_selection);
  if (o.opsm_delta && !b.rollout_logprobs && !b.old_logprobs)
    fail(fn, "options.opsm_delta needs rollout_logprobs or old_logprobs (the sampler's log-probs)");

  const T old = b.old_logprobs ? ops::upcast(*b.old_logprobs) : ops::detach(lp);
  const T zero = ops::full_like(lp, 0.0), one = ops::full_like(lp, 1.0);
  const T lr_tok = ops::where(m, ops::sub(lp, old), 0.0);  // masked: padding never reaches a ratio
  const bool cov = o.variant == policy_variant::clip_cov || o.variant == policy_variant::kl_cov;  // token-level (verl)
  const bool seq =
      o.variant == policy_variant::gspo || o.variant == policy_variant::luspo || (o.sequence_ratio && !cov);
  // GSPO eq. 7: log s_i = (1/|o_i|) Σ_t log ρ_t; token form: same value on every token, ∂/∂logπ_t = 1
  // written sg(log s_i) + logπ_t - sg(logπ_t) (verl gspo) so autograd through it gives the token form
  // OpenRLHF gspo: log s_i itself, so autograd spreads ∂/∂log s_i over the row (m_t/|o_i| each)
  const bool through_row_mean = seq && o.gspo_grad == gspo_gradient::sequence;
  const T lr = through_row_mean ? row_mean_b(lr_tok, m)
               : seq            ? ops::add(ops::detach(row_mean_b(lr_tok, m)), ops::sub(lp, ops::detach(lp)))
                                : lr_tok;
  const auto& clamp = o.clip.log_ratio_clamp;
  const double c = clamp ? *clamp : 0.0;
  const T lr_c = clamp ? ops::clamp(lr, -c, c) : lr;
  const T lr_pass = clamp ? ops::mul(ops::ge(lr, -c), ops::le(lr, c)) : one;
  T ratio = ops::exp(lr_c);
  const double eps_l = o.clip.clip_low, eps_h = o.clip.high();
  // Rollout IS (constants): TRL vllm_importance_sampling_ratio / verl rollout_is_weights
  auto is = o.rollout_is ? rollout_is_weights(old, ops::upcast(*b.rollout_logprobs), m, *o.rollout_is)
                         : rollout_is_terms<T>{one, one, zero};
  T loss = zero, d = zero, phi = one, cov_sel = zero;
  bool spread = false;
  aggregation reduction = o.reduction;
  std::optional<double> normalizer = o.normalizer;

  switch (o.variant) {
    case policy_variant::ppo:
    case policy_variant::gspo:
    case policy_variant::luspo: {
      // ppo.hpp's surrogate on the (token or sequence) log-ratio, with old = 0
      const auto s = ppo_surrogate(lr, zero, A, o.clip);
      loss = s.loss, d = s.d_logratio, ratio = s.ratio;
      if (o.variant == policy_variant::luspo && !normalizer) {
        // TRL luspo: (per_token_loss · |o_i|).mean() over the B rows = Σ m·L / B
        reduction = aggregation::seq_mean_token_sum;
        normalizer = double(ops::size(lp, 0));
      }
      break;
    }
    case policy_variant::gmpo: {
      // verl geo_mean: lr clamped to ±20; sgnA·min(sgnA·lr, sgnA·clip(lr, -ε_l, ε_h))
      const T lr20 = ops::clamp(lr_tok, -20.0, 20.0);
      const T in20 = ops::mul(ops::ge(lr_tok, -20.0), ops::le(lr_tok, 20.0));
      const T sg = ops::sign(A);
      const T x = ops::mul(sg, lr20), y = ops::mul(sg, ops::clamp(lr20, -eps_l, eps_h));
      const T inside = ops::mul(ops::ge(lr20, -eps_l), ops::le(lr20, eps_h));
      const T term = ops::mul(sg, ops::minimum(x, y));
      // ∂term/∂lr = sgnA²·(share_x + share_y·inside), torch.minimum splitting ties
      const T share_x = max_share(y, x), share_y = max_share(x, y);
      const T dterm = ops::mul(ops::mul(ops::square(sg), ops::add(share_x, ops::mul(share_y, inside))), in20);
      const T n = ops::maximum(ops::sum(m, 1, true), 1.0);  // [B, 1]
      const T rho_bar = ops::mul(ops::exp(ops::div(ops::sum(ops::where(m, term, 0.0), 1, true), n)), one);
      const T A_bar = row_mean_b(A, m);
      loss = ops::neg(ops::mul(A_bar, rho_bar));              // -Ā_i ρ̄_i
      d = ops::div(ops::mul(loss, dterm), ops::mul(n, one));  // ∂g_i/∂logπ_t
      ratio = rho_bar;
      spread = true;
      break;
    }
    case policy_variant::cispo: {
      const T w = o.cispo == cispo_bound::trl_absolute ? ops::minimum(ratio, o.cispo_cap)
                                                       : ops::clamp(ratio, 1.0 - eps_l, 1.0 + eps_h);
      // MiniMax-M1 eq. 4: -sg(clip ρ)·A·logπ
      d = ops::neg(ops::mul(ops::detach(w), A));  // sg: autograd sees only logπ
      loss = ops::mul(d, lp);
      break;
    }
    case policy_variant::sapo: {
      const T tau = ops::where(ops::gt(A, 0.0), ops::full_like(lp, o.sapo_temperature_pos),
                               ops::full_like(lp, o.sapo_temperature_neg));
      // The gate is saturated long before exp overflows: σ(τ(e^80 - 1)) rounds to 1 in float64 for any
      // τ > 1e-33, so ρ is capped at e^80 and f'(ρ)·ρ is 0·finite there, not 0·inf (issue 13 defect 1).
      const T rho = ops::exp(ops::minimum(lr_c, 80.0));
      const T sgate = posttrain::sigmoid(ops::mul(tau, ops::sub(rho, 1.0)));
      // SAPO eq. 5: f(ρ) = σ(τ(ρ-1))·4/τ, f'(ρ) = 4σ(1-σ)
      loss = ops::neg(ops::mul(A, ops::div(ops::mul(sgate, 4.0), tau)));
      d = ops::mul(ops::neg(ops::mul(A, ops::mul(ops::mul(sgate, ops::sub(1.0, sgate)), 4.0))), ops::mul(rho, lr_pass));
      break;
    }
    case policy_variant::vespo: {
      // TRL get_gamma_weights: w = exp(clamp(Σ m·clamp(lr, ±20), log 1e-8, 20)); log φ = λ + k log w - λ w
      T s = ops::sum(ops::where(m, ops::clamp(lr_tok, -20.0, 20.0), 0.0), 1, true);
      // TRL: with a rollout ratio r_t, log w += Σ_t clamp(log r_t, log 1e-8, 20) (π_old/π_sampler per token)
      if (o.rollout_is)
        s = ops::add(s, ops::sum(ops::where(m, ops::clamp(is.log_r, std::log(1e-8), 20.0), 0.0), 1, true));
      const T log_w = ops::mul(ops::clamp(s, std::log(1e-8), 20.0), one);
      const T nonneg = ops::ge(A, 0.0);
      const T k = ops::where(nonneg, ops::full_like(lp, o.vespo_k_pos), ops::full_like(lp, o.vespo_k_neg));
      const T lam = ops::where(nonneg, ops::full_like(lp, o.vespo_lambda_pos), ops::full_like(lp, o.vespo_lambda_neg));
      phi = ops::exp(ops::sub(ops::add(lam, ops::mul(k, log_w)), ops::mul(lam, ops::exp(log_w))));
      phi = ops::detach(phi);  // TRL computes φ under no_grad
      d = ops::neg(ops::mul(phi, A));
      loss = ops::mul(d, lp);
      ratio = ops::exp(log_w);
      break;
    }
    case policy_variant::reinforce:
    case policy_variant::gpg: {
      // REINFORCE (Williams 1992) / verl gpg: -A·logπ
      d = ops::neg(A);
      loss = ops::mul(d, lp);
      break;
    }
    case policy_variant::clip_cov:
    case policy_variant::kl_cov: {
      // Cui et al. 2025 §4 / verl: cov_t = (A_t - masked_mean A)·(logπ_t - masked_mean logπ) over valid tokens
      const bool clip = o.variant == policy_variant::clip_cov;
      // a selection passed in (global_cov_selection) replaces this batch's own
      const auto own_selection = [&](const T& cand, const T& cov) {
        // verl: max(int(ratio · N_valid), 1) tokens (none when there is no valid token)
        const auto k = cov_select_count(clip ? o.clip_cov_ratio : o.kl_cov_ratio, ops::item(ops::sum_all(m)));
        return cov_select(cov, cand, k, cov_selection_rule(o), o.cov_seed);
      };
      const auto given = [&] { return ops::mul(ops::ne(ops::upcast(*b.cov_selection), 0.0), m); };
      if (clip) {
        const auto s = clip_cov_surrogate(lr, A, o.clip);
        if (b.cov_selection) {
          cov_sel = given();
        } else {
          const T cov = token_covariance(A, lp, m);
          cov_sel = own_selection(clip_cov_candidates(s, cov, m, o), cov);
        }
        // verl: pg_losses = max(L1, L2) · corr, corr = 0 on the selected tokens
        const T corr = ops::sub(1.0, cov_sel);
        loss = ops::mul(s.loss, corr), d = ops::mul(s.d_logratio, corr), ratio = s.ratio;
      } else {
        cov_sel = b.cov_selection ? given() : own_selection(m, token_covariance(A, lp, m));
        // verl kl_cov: -A·ρ, plus ppo_kl_coef·|logπ - logπ_old| on the selected tokens. Where A = 0 the term
        // is 0 whatever ρ is: ρ is capped there so that 0·ρ is never 0·inf (issue 13 defect 1).
        const T rho = ops::exp(ops::where(ops::ne(A, 0.0), lr_c, ops::minimum(lr_c, 80.0)));
        const T pg = ops::neg(ops::mul(A, rho));
        loss = ops::add(pg, ops::mul(cov_sel, ops::mul(ops::abs(lr), o.kl_cov_coef)));
        d = ops::add(ops::mul(pg, lr_pass), ops::mul(cov_sel, ops::mul(ops::sign(lr), o.kl_cov_coef)));
      }
      break;
    }
  }

  // Off-policy factors (constants): OPSM, top-entropy selection

  T keep = one;
  if (o.opsm_delta)  // TRL get_off_policy_mask (off_policy.hpp)
    keep = opsm_keep(A, b.rollout_logprobs ? ops::upcast(*b.rollout_logprobs) : old, lp, m, *o.opsm_delta);
  // TRL get_high_entropy_mask (token_selection.hpp)
  if (o.top_entropy_quantile)
    keep = ops::mul(keep, top_entropy_keep(ops::upcast(*b.entropies), m, *o.top_entropy_quantile));
  if (o.top_entropy_threshold)  // the same rule with a threshold from outside (global_top_entropy_threshold)
    keep = ops::mul(keep, top_entropy_keep_at(ops::upcast(*b.entropies), m, *o.top_entropy_threshold));
  keep = ops::mul(keep, m);
  // TRL: VESPO's rollout ratio lives in φ, the loss is not multiplied by it
  const T factor = ops::detach(o.variant == policy_variant::vespo ? keep : ops::mul(is.weight, keep));
  return {m,      loss, d,  ratio,   A,      factor,           phi,       is.weight,
          is.raw, keep, lp, cov_sel, spread, through_row_mean, reduction, normalizer};
}

}  // namespace detail

/// A policy-loss variant (see the header comment). batch.logprobs etc.: [B, T].
template <tensor T>
policy_variant_result<T> policy_variant_loss(const policy_batch<T>& batch, const policy_variant_options& opt = {}) {
  constexpr std::string_view fn = "policy_variant_loss";
  detail::check_variant_options(fn, opt);
  const auto t = detail::variant_compute(fn, batch, opt);
  const T per_token = ops::where(t.mask, ops::mul(t.loss, t.factor), 0.0);
  const T loss = aggregate(per_token, t.mask, t.reduction, t.normalizer, opt.token_count_eps);
  const double eps_l = opt.clip.clip_low, eps_h = opt.clip.high();
  const T& m = t.mask;
  const auto cm = detail::clip_ratio_metrics(t.ratio, t.A, m, opt.clip);  // TRL clip_ratio/* (clip.hpp)
  T cispo_clip = ops::full_like(t.lp, 0.0);
  if (opt.variant == policy_variant::cispo) {
    cispo_clip = opt.cispo == cispo_bound::trl_absolute
                     ? ops::mul(ops::gt(t.ratio, opt.cispo_cap), ops::gt(t.A, 0.0))
                     : ops::maximum(ops::lt(t.ratio, 1.0 - eps_l), ops::gt(t.ratio, 1.0 + eps_h));
  }
  return {loss, per_token, t.ratio, cm.low, cm.high, cm.region, cm.low_min, cm.high_max, masked_mean(cispo_clip, m),
          t.phi, masked_mean(t.phi, m), t.is_weight, masked_mean(t.is_raw, m),
          detail::masked_extreme(t.is_raw, m, false), detail::masked_extreme(t.is_raw, m, true), t.keep, t.cov_sel,
          masked_mean(t.cov_sel, m),
          // verl ppo_kl = masked_mean(-(log_prob - old_log_prob), response_mask)
          ops::detach(masked_mean(
              ops::sub(batch.old_logprobs ? ops::upcast(*batch.old_logprobs) : ops::detach(t.lp), t.lp), m)),
          // TRL mean_entropy = masked_batch_mean(entropies)
          batch.entropies ? ops::detach(masked_mean(ops::upcast(*batch.entropies), m)) : ops::scalar_like(t.lp, 0.0)};
}

/// ∂(grad_loss · policy_variant_loss(batch).loss)/∂logprobs, [B, T].
template <tensor T>
T policy_variant_loss_backward(const policy_batch<T>& batch, const policy_variant_options& opt = {},
                               double grad_loss = 1.0) {
  constexpr std::string_view fn = "policy_variant_loss_backward";
  detail::check_variant_options(fn, opt);
  const auto t = detail::variant_compute(fn, batch, opt);
  const T w = ops::mul(aggregation_weights(t.mask, t.reduction, t.normalizer, opt.token_count_eps),
                       t.factor);  // ∂loss/∂L_t
  if (t.through_row_mean) {
    // OpenRLHF gspo: ∂loss/∂logπ_t = (m_t/|o_i|)·Σ_t' w_t'·∂L_t'/∂log s_i, |o_i| clamped to ≥ 1
    const T G = ops::sum(ops::where(t.mask, ops::mul(t.d_logp, w), 0.0), 1, true);  // [B, 1]
    const T n = ops::maximum(ops::sum(t.mask, 1, true), 1.0);                       // [B, 1]
    return ops::mul(ops::where(t.mask, ops::mul(ops::div(G, n), ops::full_like(t.lp, 1.0)), 0.0), grad_loss);
  }
  if (!t.spread) return ops::mul(ops::where(t.mask, ops::mul(t.d_logp, w), 0.0), grad_loss);
  // GMPO: L_t = g_i on every token of row i, so ∂loss/∂logπ_t = (Σ_{t'} w_{t'}) · ∂g_i/∂logπ_t
  const T W = ops::mul(ops::sum(ops::where(t.mask, w, 0.0), 1, true), ops::full_like(t.lp, 1.0));
  return ops::mul(ops::where(t.mask, ops::mul(t.d_logp, W), 0.0), grad_loss);
}

}  // namespace posttrain
