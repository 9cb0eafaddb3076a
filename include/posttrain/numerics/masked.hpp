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
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
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

/// Σ x / n over the n kept positions; 0 where the mask keeps nothing (verl/TRL masked_mean for 0/1
/// masks, without NaN). Example (torchtune test): masked_mean([1..5], [1,1,1,0,0]) = 2.
template <tensor T>
T masked_mean(const T& x, const T& mask, std::optional<std::int64_t> dim = std::nullopt) {
  detail::require_values("masked_mean", "x", x);
  const T m = detail::boolean_mask("masked_mean", x, mask);
  const T total = detail::reduce_sum(detail::masked_values(x, m), dim);
  const T count = detail::reduce_sum(m, dim);
  return ops::div(total, ops::maximum(count, 1.0));
}

/// Masked variance about the masked mean. unbiased (default, as TRL/verl/torchtune): divides by
/// n - 1; a selection of one element has variance 0 (TRL raises, verl divides by n), and an empty
/// one 0. Example (TRL test): x = [1,2,3,4], mask [0,1,1,0] -> 0.5.
template <tensor T>
T masked_var(const T& x, const T& mask, bool unbiased = true, std::optional<std::int64_t> dim = std::nullopt) {
  detail::require_values("masked_var", "x", x);
  const T m = detail::boolean_mask("masked_var", x, mask);
  const T count = detail::reduce_sum(m, dim);
  T mean = ops::div(detail::reduce_sum(detail::masked_values(x, m), dim), ops::maximum(count, 1.0));
  if (dim) mean = ops::unsqueeze(mean, *dim);
  const T centered = detail::masked_values(ops::sub(x, mean), m);
  const T ss = detail::reduce_sum(ops::square(centered), dim);
  const T denom = unbiased ? ops::maximum(ops::sub(count, 1.0), 1.0) : ops::maximum(count, 1.0);
  return ops::div(ss, denom);
}

struct whiten_options {
  /// false (default): zero-mean output, as TRL `masked_whiten(shift_mean=True)` and verl.
  /// true: the mean is added back, as TRL `shift_mean=False` and torchtune `whiten(shift_mean=True)`.
  bool keep_mean = false;
  /// Added to the variance under the square root (TRL, verl, torchtune: 1e-8); must be > 0.
  double eps = 1e-8;
  /// Unbiased (n - 1) variance as TRL/verl/torchtune; false gives OpenRLHF's biased variance.
  bool unbiased = true;
};

/// (x - mean) / sqrt(var + eps) over the masked positions, all reduced together (a batch-wide
/// whitening); masked-out positions are 0 in the output.
/// Example (TRL test): x = [1,2,3,4], mask [0,1,1,0] -> [0, -0.707107, 0.707107, 0].
template <tensor T>
T masked_whiten(const T& x, const T& mask, whiten_options opt = {}) {
  detail::require_values("masked_whiten", "x", x);
  detail::check_whiten_eps("masked_whiten", "eps", opt.eps);
  const T m = detail::boolean_mask("masked_whiten", x, mask);
  const T mean = masked_mean(x, m);
  const T var = masked_var(x, m, opt.unbiased);
  // TRL masked_whiten: (x - mu) * rsqrt(var + 1e-8), optionally + mu.
  T w = ops::div(ops::sub(x, mean), ops::sqrt(ops::add(var, opt.eps)));
  if (opt.keep_mean) w = ops::add(w, mean);
  return detail::masked_values(w, m);
}

}  // namespace posttrain
