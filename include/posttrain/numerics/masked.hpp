// posttrain/numerics/masked.hpp — reductions over the positions a mask keeps.
//
// A mask is boolean: every non-zero value keeps its position and counts once, whatever the value
// (PyTorch's `x[mask.bool()]`; TRL's completion masks are boolean). So masked_mean([1, 2, 3],
// [2, 1, 0]) = 1.5. verl, OpenRLHF and torchtune write Σ x·m / Σ m, which agrees for 0/1 masks but
// reads other values as weights; posttrain never does (multiply the values by weights first). The
// same rule holds in masked_sum/mean/var/whiten, aggregate and every loss that takes a mask.
//
// Masked-out positions are read through `where`, so NaN or Inf there never leaks into a result
// or a gradient (verl's masked_mean test: a NaN at a masked position still gives the clean mean).
// An empty selection is defined: its sum, mean and variance are 0, never NaN.
//
// Peer conventions (issue 17). The count a mean divides by is max(n, 1) by default (TRL, torchtune: the
// exact mean); masked_options::count_eps > 0 divides by n + count_eps instead, as verl
// (verl/utils/torch_functional.py masked_mean: `s / (mask.sum(axis) + 1e-8)`; masked_options::verl()).
// whiten_options chooses the variance guard (added, as TRL/verl, or a floor, as OpenRLHF), centring without
// scaling, and what the output holds outside the mask; its presets verl() and openrlhf() reproduce those
// frameworks' whitening exactly.
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

#include "posttrain/detail/validate.hpp"
#include "posttrain/tensor.hpp"

namespace posttrain {

namespace detail {
/// x where mask != 0, 0 elsewhere.
template <tensor T>
T masked_values(const T& x, const T& mask) {
  return ops::where(mask, x, 0.0);
}
template <tensor T>
T reduce_sum(const T& x, std::optional<std::int64_t> dim) {
  return dim ? ops::sum(x, *dim) : ops::sum_all(x);
}
/// The checked mask as 0/1 in x's dtype (non-zero keeps).
template <tensor T>
T boolean_mask(std::string_view fn, const T& x, const T& mask) {
  return ops::ne(checked_mask(fn, "x", x, "mask", mask), 0.0);
}
/// A count epsilon is added to a denominator: finite and >= 0 (0 selects the exact max(n, 1)).
inline void check_count_eps(std::string_view fn, std::string_view name, double eps) {
  require_finite(fn, name, eps);
  if (eps < 0) fail(fn, name, " must be >= 0, got ", eps);
}
/// A whitening eps divides (x - mean) / sqrt(var + eps) with var = 0 for one kept value: > 0.
inline void check_whiten_eps(std::string_view fn, std::string_view name, double eps) {
  require_finite(fn, name, eps);
  if (eps <= 0) fail(fn, name, " must be > 0, got ", eps);
}
}  // namespace detail

/// Σ x over the kept positions, everything (0-d) or along `dim`. x and mask: same shape.
template <tensor T>
T masked_sum(const T& x, const T& mask, std::optional<std::int64_t> dim = std::nullopt) {
  detail::require_values("masked_sum", "x", x);
  const T m = detail::boolean_mask("masked_sum", x, mask);
  return detail::reduce_sum(detail::masked_values(x, m), dim);
}

/// How a masked mean counts its kept positions (issue 17: verl's guard).
struct masked_options {
  /// 0 (default): Σ x / max(n, 1), the exact mean (TRL, torchtune; verl's value for n >= 1 up to its guard).
  /// > 0: Σ x / (n + count_eps), as verl/utils/torch_functional.py masked_mean (1e-8). Must be >= 0.
  double count_eps = 0.0;

  /// verl b178a3c: masked_mean divides by mask.sum() + 1e-8.
  static constexpr masked_options verl() { return {.count_eps = 1e-8}; }
};

namespace detail {
/// The divisor of a masked mean over `count` kept positions: max(n, 1), or n + count_eps (verl).
template <tensor T>
T mean_divisor(const T& count, const masked_options& o) {
  return o.count_eps > 0 ? ops::add(count, o.count_eps) : ops::maximum(count, 1.0);
}
}  // namespace detail

/// Σ x / n over the n kept positions; 0 where the mask keeps nothing (verl/TRL masked_mean for 0/1
/// masks, without NaN). Example (torchtune test): masked_mean([1..5], [1,1,1,0,0]) = 2.
/// options.count_eps > 0 divides by n + count_eps (verl masked_mean; masked_options::verl()).
template <tensor T>
T masked_mean(const T& x, const T& mask, std::optional<std::int64_t> dim = std::nullopt,
              const masked_options& options = {}) {
  detail::check_count_eps("masked_mean", "options.count_eps", options.count_eps);
  detail::require_values("masked_mean", "x", x);
  const T m = detail::boolean_mask("masked_mean", x, mask);
  const T total = detail::reduce_sum(detail::masked_values(x, m), dim);
  const T count = detail::reduce_sum(m, dim);
  return ops::div(total, detail::mean_divisor(count, options));
}

/// Masked variance about the masked mean. unbiased (default, as TRL/verl/torchtune): divides by
/// n - 1; a selection of one element has variance 0 (TRL and verl b178a3c raise), and an empty
/// one 0. Example (TRL test): x = [1,2,3,4], mask [0,1,1,0] -> 0.5.
/// options.count_eps > 0 reproduces verl/utils/torch_functional.py masked_var: the mean and the mean of the
/// squared deviations both divide by n + count_eps, and the unbiased form multiplies by n / (n - 1) (verl raises
/// for n <= 1; here n / max(n - 1, 1)).
template <tensor T>
T masked_var(const T& x, const T& mask, bool unbiased = true, std::optional<std::int64_t> dim = std::nullopt,
             const masked_options& options = {}) {
  detail::check_count_eps("masked_var", "options.count_eps", options.count_eps);
  detail::require_values("masked_var", "x", x);
  const T m = detail::boolean_mask("masked_var", x, mask);
  const T count = detail::reduce_sum(m, dim);
  T mean = ops::div(detail::reduce_sum(detail::masked_values(x, m), dim), detail::mean_divisor(count, options));
  if (dim) mean = ops::unsqueeze(mean, *dim);
  const T centered = detail::masked_values(ops::sub(x, mean), m);
  const T ss = detail::reduce_sum(ops::square(centered), dim);
  if (options.count_eps > 0) {
    // verl masked_var: masked_mean((x - μ)², m) · n / (n - 1), both means over n + 1e-8
    const T var = ops::div(ss, ops::add(count, options.count_eps));
    if (!unbiased) return var;
    return ops::mul(var, ops::div(count, ops::maximum(ops::sub(count, 1.0), 1.0)));
  }
  const T denom = unbiased ? ops::maximum(ops::sub(count, 1.0), 1.0) : ops::maximum(count, 1.0);
  return ops::div(ss, denom);
}

/// What masked_whiten writes where the mask is 0.
enum class whiten_outside {
  /// 0 (default; TRL PPOTrainer zeroes padded advantages after whitening).
  zero,
  /// The formula applied there too, (x - μ)·rstd: verl masked_whiten and OpenRLHF's advantage normalisation
  /// (experience_maker.py compute_advantages_and_returns) both rewrite every position, padding included.
  whitened,
  /// The input left unchanged.
  keep,
};

/// How the variance is guarded before the reciprocal square root.
enum class variance_guard {
  /// rsqrt(var + eps) (default; TRL, verl, torchtune masked_whiten).
  add,
  /// rsqrt(max(var, eps)) (OpenRLHF compute_advantages_and_returns: var.clamp(min=1e-8).rsqrt()).
  floor,
};

struct whiten_options {
  /// false (default): zero-mean output, as TRL `masked_whiten(shift_mean=True)` and verl.
  /// true: the mean is added back, as TRL `shift_mean=False` and torchtune `whiten(shift_mean=True)`.
  bool keep_mean = false;
  /// The variance guard's ε (TRL, verl, torchtune, OpenRLHF: 1e-8); must be > 0.
  double eps = 1e-8;
  /// Unbiased (n - 1) variance as TRL/verl/torchtune; false gives OpenRLHF's biased variance.
  bool unbiased = true;
  /// var + ε (default; TRL, verl) or max(var, ε) (OpenRLHF).
  variance_guard guard = variance_guard::add;
  /// true (default): divide by the standard deviation. false: centre only, rstd = 1 (OpenRLHF
  /// `advantage.no_std_norm`).
  bool scale = true;
  /// The count guard of the mean and variance (masked_options::count_eps): 0 (default) or verl's 1e-8.
  double count_eps = 0.0;
  /// The output outside the mask: 0 (default), the whitened value (verl, OpenRLHF) or the input.
  whiten_outside outside = whiten_outside::zero;

  /// verl b178a3c masked_whiten: mean and unbiased variance over mask.sum() + 1e-8 (then · n/(n-1)),
  /// (x - μ)·rsqrt(var + 1e-8) written at every position.
  static constexpr whiten_options verl() { return {.count_eps = 1e-8, .outside = whiten_outside::whitened}; }
  /// OpenRLHF 3c3be62 compute_advantages_and_returns: μ = Σ m·x / Σ m, biased var, rstd = rsqrt(max(var, 1e-8))
  /// (or 1 with no_std_norm: pass scale = false), (x - μ)·rstd written at every position.
  static constexpr whiten_options openrlhf(bool std_norm = true) {
    return {.unbiased = false, .guard = variance_guard::floor, .scale = std_norm, .outside = whiten_outside::whitened};
  }
};

namespace detail {
inline void check_whiten_options(std::string_view fn, std::string_view prefix, const whiten_options& o) {
  const std::string eps = std::string(prefix) + "eps", count_eps = std::string(prefix) + "count_eps";
  check_whiten_eps(fn, eps, o.eps);
  check_count_eps(fn, count_eps, o.count_eps);
  if (o.guard != variance_guard::add && o.guard != variance_guard::floor)
    fail(fn, prefix, "guard must be variance_guard::add or variance_guard::floor, got ", static_cast<int>(o.guard));
  if (o.outside != whiten_outside::zero && o.outside != whiten_outside::whitened && o.outside != whiten_outside::keep)
    fail(fn, prefix, "outside must be whiten_outside::zero, whitened or keep, got ", static_cast<int>(o.outside));
}
}  // namespace detail

/// (x - mean) / sqrt(var + eps) over the masked positions, all reduced together (a batch-wide
/// whitening); masked-out positions are 0 in the output unless options.outside says otherwise.
/// Example (TRL test): x = [1,2,3,4], mask [0,1,1,0] -> [0, -0.707107, 0.707107, 0].
/// Presets: whiten_options::verl(), whiten_options::openrlhf() (see whiten_options for each field's source).
template <tensor T>
T masked_whiten(const T& x, const T& mask, whiten_options opt = {}) {
  detail::check_whiten_options("masked_whiten", "options.", opt);
  detail::require_values("masked_whiten", "x", x);
  const T m = detail::boolean_mask("masked_whiten", x, mask);
  const masked_options count{.count_eps = opt.count_eps};
  const T mean = masked_mean(x, m, std::nullopt, count);
  T w = ops::sub(x, mean);
  if (opt.scale) {
    const T var = masked_var(x, m, opt.unbiased, std::nullopt, count);
    // TRL/verl masked_whiten: (x - μ)·rsqrt(var + 1e-8); OpenRLHF: (x - μ)·rsqrt(max(var, 1e-8))
    const T guarded = opt.guard == variance_guard::add ? ops::add(var, opt.eps) : ops::maximum(var, opt.eps);
    w = ops::div(w, ops::sqrt(guarded));
  }
  if (opt.keep_mean) w = ops::add(w, mean);
  // outside the mask, read through `where` (a NaN there never reaches a kept position)
  switch (opt.outside) {
    case whiten_outside::zero: return detail::masked_values(w, m);
    case whiten_outside::whitened: return w;
    case whiten_outside::keep: return ops::where(m, w, x);
  }
  return w;
}

}  // namespace posttrain
