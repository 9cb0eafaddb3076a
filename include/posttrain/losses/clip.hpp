// posttrain/losses/clip.hpp — the clip range of the PPO-family surrogates, shared by ppo_options::clip,
// policy_variant_options::clip and grpo_options::clip: its options, their one check, and the clip
// fractions every trainer logs.
//
//   ρ = exp(clamp(log ρ, -log_ratio_clamp, log_ratio_clamp))     (no clamp when log_ratio_clamp is empty)
//   clipped term  -A · clip(ρ, 1 - clip_low, 1 + clip_high)      (PPO eq. 7; clip_high empty = clip_low)
//   unclipped     -A · min(ρ, delta)                             (TRL delta, two-sided; off when empty)
//   dual-clip     min(·, -clip_c · A) for A < 0                  (Ye et al. 2019 eq. 5; off when empty)
//
// The same numbers under the frameworks' names:
//   posttrain              TRL (GRPOConfig)      verl (actor.*)                     OpenRLHF (PolicyLoss)
//   clip.clip_low          epsilon (0.2)         clip_ratio_low (clip_ratio 0.2)    clip_eps_low
//   clip.clip_high         epsilon_high (None)   clip_ratio_high                    clip_eps_high
//   clip.clip_c            -                     clip_ratio_c (3.0)                 dual_clip
//   clip.delta             delta (None)          -                                  -
//   clip.log_ratio_clamp   -                     ±20, fixed (compute_policy_loss)   -
// clip_options::trl(epsilon, epsilon_high, delta) and clip_options::verl() spell the two presets.
//
// Clip fractions (TRL GRPOTrainer's clip_ratio/*; ppo_policy_loss, policy_variant_loss and grpo_loss log them):
//   low    (ρ < 1 - clip_low) & (A < 0)        clip_ratio/low_mean,  its row minimum clip_ratio/low_min
//   high   (ρ > 1 + clip_high) & (A > 0)       clip_ratio/high_mean, its row maximum clip_ratio/high_max
//   region low | high                          clip_ratio/region_mean
// Example: ρ = [0.5, 1.5], A = [-1, 1], mask [1, 1], clip_low 0.2: low = [1, 0], high = [0, 1], region mean 1.
#pragma once

#include <cmath>
#include <limits>
#include <optional>
#include <string_view>

#include "posttrain/detail/validate.hpp"
#include "posttrain/numerics/masked.hpp"
#include "posttrain/tensor.hpp"

namespace posttrain {

/// The PPO clip range and its companions. Every field is checked once per public call (check_clip_options).
struct clip_options {
  /// ε_low: the ratio may fall to 1 - ε_low. TRL epsilon 0.2, verl clip_ratio(_low) 0.2, torchtune 0.1.
  double clip_low = 0.2;
  /// ε_high: the ratio may rise to 1 + ε_high; empty means ε_low (TRL epsilon_high=None). DAPO clip-higher: 0.28.
  /// TRL's cispo loss_type reads it as an absolute cap on ρ instead (grpo.hpp).
  std::optional<double> clip_high = std::nullopt;
  /// Dual-clip constant c > 1 for negative advantages (verl clip_ratio_c 3.0); off when empty (OpenRLHF, TRL).
  std::optional<double> clip_c = std::nullopt;
  /// TRL's two-sided bound δ > 1 on the unclipped ratio (TRL delta, INTELLECT-2); off when empty (TRL None).
  std::optional<double> delta = std::nullopt;
  /// Clamp log ρ to [-c, c] before exp; off when empty (TRL, torchtune). verl/OpenRLHF: 20; verl gspo: 10.
  std::optional<double> log_ratio_clamp = std::nullopt;

  /// ε_high as used: clip_high, or clip_low when it is empty.
  constexpr double high() const { return clip_high ? *clip_high : clip_low; }

  /// TRL GRPOConfig's names: epsilon -> clip_low, epsilon_high -> clip_high, delta -> delta.
  static constexpr clip_options trl(double epsilon = 0.2, std::optional<double> epsilon_high = std::nullopt,
                                    std::optional<double> delta = std::nullopt) {
    return {.clip_low = epsilon, .clip_high = epsilon_high, .delta = delta};
  }
  /// verl compute_policy_loss("vanilla") defaults: clip_ratio 0.2, clip_ratio_c 3, log ρ clamped to ±20.
  static constexpr clip_options verl() { return {.clip_low = 0.2, .clip_c = 3.0, .log_ratio_clamp = 20.0}; }
};

/// The clip fractions of clip_ratio_metrics (0-d each).
template <tensor T>
struct clip_metrics {
  T low;       ///< TRL clip_ratio/low_mean: mean of (ρ < 1 - ε_low) & (A < 0)
  T high;      ///< TRL clip_ratio/high_mean: mean of (ρ > 1 + ε_high) & (A > 0)
  T region;    ///< TRL clip_ratio/region_mean: mean of either
  T low_min;   ///< TRL clip_ratio/low_min: min over rows of the row's low fraction
  T high_max;  ///< TRL clip_ratio/high_max: max over rows of the row's high fraction
};

namespace detail {

/// The one check of clip_options; messages name the field as `options.clip.<field>` and its TRL/verl spelling.
inline void check_clip_options(std::string_view fn, const clip_options& c) {
  require_finite(fn, "options.clip.clip_low", c.clip_low);
  if (c.clip_low <= 0) fail(fn, "options.clip.clip_low (TRL epsilon) must be > 0, got ", c.clip_low);
  if (c.clip_high) {
    require_finite(fn, "options.clip.clip_high", *c.clip_high);
    if (*c.clip_high <= 0) fail(fn, "options.clip.clip_high (TRL epsilon_high) must be > 0, got ", *c.clip_high);
  }
  if (c.clip_c) {
    require_finite(fn, "options.clip.clip_c", *c.clip_c);
    if (*c.clip_c <= 1) fail(fn, "options.clip.clip_c must be > 1 (dual-clip), got ", *c.clip_c);
  }
  if (c.delta) {
    require_finite(fn, "options.clip.delta", *c.delta);
    if (*c.delta <= 1) fail(fn, "options.clip.delta must be > 1, got ", *c.delta);
  }
  if (c.log_ratio_clamp && (std::isnan(*c.log_ratio_clamp) || *c.log_ratio_clamp <= 0))
    fail(fn, "options.clip.log_ratio_clamp must be > 0 when set, got ", *c.log_ratio_clamp);
}

/// max (or min) of x over the positions m keeps; 0 when m keeps none.
template <tensor T>
T masked_extreme(const T& x, const T& m, bool take_max) {
  const double inf = std::numeric_limits<double>::infinity();
  const T filled = ops::where(m, x, take_max ? -inf : inf);
  const T v = take_max ? ops::max_all(filled) : ops::neg(ops::max_all(ops::neg(filled)));
  return ops::where(ops::gt(ops::sum_all(m), 0.0), v, 0.0);
}

/// TRL nanmin / nanmax over rows of masked_seq_mean(x) = Σ_t m·x / Σ_t m: the rows with a token (their
/// 0/0 is NaN and skipped), or, with per_row, every row of an x that is one value per row (TRL's [B, 1]
/// sequence-level tensors). x, m: [B, T]; an [N] input is one row.
template <tensor T>
T row_mean_extreme(const T& x, const T& m, bool per_row, bool take_max) {
  if (ops::rank(x) == 1) return masked_mean(x, m);  // one row; 0 when it has no token
  const T count = ops::sum(m, 1, true);             // [B, 1]
  if (per_row)
    return masked_extreme(ops::div(ops::sum(x, 1, true), double(ops::size(x, 1))), ops::full_like(count, 1.0),
                          take_max);
  return masked_extreme(ops::div(ops::sum(ops::where(m, x, 0.0), 1, true), ops::maximum(count, 1.0)),
                        ops::gt(count, 0.0), take_max);
}

/// TRL global_masked_mean: over valid tokens, or over the B rows when x is one value per row (sequence level).
template <tensor T>
T token_or_row_mean(const T& x, const T& m, bool per_row) {
  return per_row ? ops::div(ops::sum_all(x), double(ops::numel(x))) : masked_mean(x, m);
}

/// The clip fractions of `ratio` [B, T] (or [N]) under advantages A and mask m (0/1, compute dtype), as TRL logs
/// them: means over valid tokens, or, with per_row (TRL's sequence-level ratio, one value per row), over rows.
template <tensor T>
clip_metrics<T> clip_ratio_metrics(const T& ratio, const T& A, const T& m, const clip_options& c,
                                   bool per_row = false) {
  // TRL: is_low_clipped = (coef_1 < 1 - ε_low) & (A < 0), is_high_clipped = (coef_1 > 1 + ε_high) & (A > 0)
  const T low = ops::mul(ops::lt(ratio, 1.0 - c.clip_low), ops::lt(A, 0.0));
  const T high = ops::mul(ops::gt(ratio, 1.0 + c.high()), ops::gt(A, 0.0));
  return {token_or_row_mean(low, m, per_row), token_or_row_mean(high, m, per_row),
          token_or_row_mean(ops::maximum(low, high), m, per_row),
          // TRL: nanmin(masked_seq_mean(is_low_clipped)), nanmax(masked_seq_mean(is_high_clipped))
          row_mean_extreme(low, m, per_row, false), row_mean_extreme(high, m, per_row, true)};
}

}  // namespace detail

}  // namespace posttrain
