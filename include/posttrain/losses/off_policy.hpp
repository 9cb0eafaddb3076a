// posttrain/losses/off_policy.hpp — off-policy control: the constant factors TRL/verl multiply a policy
// loss by when the sampler (e.g. vLLM) is not exactly the policy that is trained. policy_variant_loss and
// grpo_loss apply them (policy_variant_options / grpo_options `rollout_is`, `opsm_delta`).
//
// Inputs, [B, T]: old_logprobs (the trained policy at sampling time), rollout_logprobs (the sampler's:
// TRL sampling_per_token_logps, verl rollout_log_probs), response_mask (0/1).
//   rollout IS   r = exp(lr_old_vs_rollout) per token, exp(Σ) per sequence (TRL, verl "sequence") or
//                exp(mean) (verl "geometric"); truncate: clamp(r, lower, cap); mask: r where lower ≤ r ≤ cap,
//                else 0 (TRL vllm_importance_sampling_mode with clip_min/clip_max, cap 3.0; verl rollout_is,
//                threshold 2.0). The log-ratio is clamped to ±20 first (verl's safety bound). cap = +inf
//                seq_mask_token (OpenRLHF vllm_is_correction_type="seq-mask-tis", models/loss.py PolicyLoss at
//                3c3be62 and 0489850): keep or drop the whole row by its `level` ratio (OpenRLHF: geometric,
//                exp of the masked mean log-ratio) inside [lower, cap], then weight each kept token by its own
//                token ratio exp(lr_t). OpenRLHF's comment speaks of a TIS clamp on that token ratio; its code
//                applies none, and neither do we. OpenRLHF clamps no log-ratio; the ±20 bound only matters past it.
//                leaves r unchanged. VESPO takes r inside φ instead of as a factor (TRL get_gamma_weights:
//                log w += Σ_t m·clamp(log r_t, log 1e-8, 20), token level only, the loss not multiplied by r).
//   OPSM         keep a row unless A < 0 and Σ_t m(logπ_sampler - sg(logπ)) / |o| > δ (TRL off_policy_mask,
//                off_policy_mask_threshold δ; DeepSeek-V3.2); the sampler is rollout_logprobs, else old_logprobs.
// Both are constants of the step (no gradient flows through them). The top-entropy token mask, the third of
// TRL's factors, is token selection (token_selection.hpp).
// Example: old = [0, 0], rollout = [0, -ln 4] on one row, sequence level, mask mode, cap 3: r = 4 > 3 -> factor 0.
#pragma once

#include <cmath>
#include <optional>
#include <string_view>

#include "posttrain/detail/validate.hpp"
#include "posttrain/tensor.hpp"

namespace posttrain {

/// Where the rollout IS ratio is formed: per token, per sequence (product), geometric mean (verl).
enum class is_level { token, sequence, geometric };
/// truncate: min(r, cap) (TIS); mask: r inside [lower, cap], 0 outside (MIS / rejection); seq_mask_token: the
/// row kept when its `level` ratio lies in [lower, cap], each kept token weighted by its token ratio (OpenRLHF
/// seq-mask-tis).
enum class is_mode { truncate, mask, seq_mask_token };

struct rollout_is_options {
  is_level level = is_level::sequence;  ///< TRL default "sequence_mask"
  is_mode mode = is_mode::mask;
  double cap = 3.0;  ///< TRL vllm_importance_sampling_cap 3.0; verl threshold 2.0; may be +inf
  /// Lower bound: mask mode drops r < lower (verl: 1/threshold), truncate mode raises r to it (TRL
  /// vllm_importance_sampling_clip_min); empty: none.
  std::optional<double> lower = std::nullopt;
  /// verl rollout_is defaults: token level, truncate, threshold 2.0.
  static rollout_is_options verl() { return {.level = is_level::token, .mode = is_mode::truncate, .cap = 2.0}; }
  /// OpenRLHF --algo.advantage.is_correction_type seq-mask-tis, is_correction_threshold [low, high] (default
  /// [0.5, 5.0]): rows filtered by the geometric-mean ratio, kept tokens weighted by their token ratio.
  static rollout_is_options openrlhf_seq_mask_tis(double low = 0.5, double high = 5.0) {
    return {.level = is_level::geometric, .mode = is_mode::seq_mask_token, .cap = high, .lower = low};
  }
};

namespace detail {

inline void check_rollout_is_options(std::string_view fn, const rollout_is_options& r) {
  if (r.level != is_level::token && r.level != is_level::sequence && r.level != is_level::geometric)
    fail(fn, "options.rollout_is.level must be token, sequence or geometric, got ", static_cast<int>(r.level));
  if (r.mode != is_mode::truncate && r.mode != is_mode::mask && r.mode != is_mode::seq_mask_token)
    fail(fn, "options.rollout_is.mode must be truncate, mask or seq_mask_token, got ", static_cast<int>(r.mode));
  if (!(r.cap > 0)) fail(fn, "options.rollout_is.cap must be > 0, got ", r.cap);
  if (r.lower && !(*r.lower >= 0 && *r.lower < r.cap))
    fail(fn, "options.rollout_is.lower must be in [0, cap), got ", *r.lower);
}

/// Row mean over the mask, broadcast back to [B, T] (0 on empty rows).
template <tensor T>
T row_mean_b(const T& x, const T& m) {
  const T s = ops::sum(ops::where(m, x, 0.0), 1, true);
  const T n = ops::maximum(ops::sum(m, 1, true), 1.0);
  return ops::mul(ops::div(s, n), ops::full_like(x, 1.0));
}

/// The rollout IS factor, [B, T] each: weight (the factor), raw (r before truncation / masking; seq_mask_token:
/// the token ratio) and log_r (log of the weight as VESPO reads it: clamped like the weight, log 1e-8 where
/// masked).
template <tensor T>
struct rollout_is_terms {
  T weight, raw, log_r;
};

/// TRL vllm_importance_sampling_ratio / verl rollout_is_weights. old, rollout, m: [B, T] (m 0/1).
template <tensor T>
rollout_is_terms<T> rollout_is_weights(const T& old, const T& rollout, const T& m, const rollout_is_options& r) {
  const T one = ops::full_like(old, 1.0);
  const T lr_roll = ops::where(m, ops::sub(ops::detach(old), rollout), 0.0);
  T lri = lr_roll;
  if (r.level == is_level::sequence) lri = ops::mul(ops::sum(lr_roll, 1, true), one);
  if (r.level == is_level::geometric) lri = row_mean_b(lr_roll, m);
  const T lri_c = ops::clamp(lri, -20.0, 20.0);  // verl SAFETY_BOUND
  const T raw = ops::exp(lri_c);
  const double lo = r.lower ? *r.lower : 0.0;
  if (r.mode == is_mode::truncate) {
    // TRL *_truncate: clamp(r, clip_min, clip_max); log r likewise clamped
    T w = std::isinf(r.cap) ? raw : ops::minimum(raw, r.cap);
    if (r.lower) w = ops::maximum(w, lo);
    return {w, raw, ops::clamp(lri_c, r.lower ? std::log(lo) : -21.0, std::isinf(r.cap) ? 21.0 : std::log(r.cap))};
  }
  // TRL *_mask: r outside [clip_min, clip_max] set to 0 (log 0 -> VESPO's floor log 1e-8)
  T ok = std::isinf(r.cap) ? one : ops::le(raw, r.cap);
  if (r.lower) ok = ops::mul(ok, ops::ge(raw, lo));
  if (r.mode == is_mode::seq_mask_token) {
    // OpenRLHF seq-mask-tis: seq_mask (the row's ratio in [low, high]) · exp(old - rollout) per token
    const T tok_c = ops::clamp(lr_roll, -20.0, 20.0);
    const T tok = ops::exp(tok_c);
    return {ops::mul(tok, ok), tok, ops::where(ok, tok_c, std::log(1e-8))};
  }
  return {ops::mul(raw, ok), raw, ops::where(ok, lri_c, std::log(1e-8))};
}

/// TRL get_off_policy_mask (OPSM): keep = (A ≥ 0) | (row mean of sampler - sg(logπ) ≤ δ), [B, T] 0/1.
template <tensor T>
T opsm_keep(const T& A, const T& sampler, const T& lp, const T& m, double delta) {
  const T kl = row_mean_b(ops::sub(sampler, ops::detach(lp)), m);
  return ops::maximum(ops::ge(A, 0.0), ops::le(kl, delta));
}

}  // namespace detail

}  // namespace posttrain
