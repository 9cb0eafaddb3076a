// posttrain/kl/exact.hpp — the exact KL(π || π_ref) over the vocabulary from two logits tensors.
//
//   KL_t = Σ_v p_v (log p_v - log q_v),  p = softmax(logits_t), q = softmax(ref_logits_t)
// Vocabulary entries with p_v = 0 (logit -inf, e.g. padding columns) contribute 0; an entry with
// p_v > 0 and q_v = 0 makes the divergence +inf, which is its true value.
#pragma once

#include <limits>

#include "posttrain/detail/validate.hpp"
#include "posttrain/numerics/logits.hpp"
#include "posttrain/tensor.hpp"

namespace posttrain {

namespace detail {
template <tensor T>
void check_exact_kl(std::string_view fn, const T& logits, const T& ref_logits) {
  require_logits(fn, "logits", logits);
  require_like(fn, "logits", logits, "ref_logits", ref_logits);
}
/// log p, p and the per-term d = log p - log q with 0 where p = 0.
template <tensor T>
struct exact_kl_terms {
  T p, d;
};
template <tensor T>
exact_kl_terms<T> exact_kl_parts(const T& x, const T& y) {
  const double inf = std::numeric_limits<double>::infinity();
  const T xs = shift_by_row_max(x), ys = shift_by_row_max(y);  // keeps float32 precise at large |logits|
  const T logp = ops::sub(xs, ops::unsqueeze(logsumexp(xs), -1));
  const T logq = ops::sub(ys, ops::unsqueeze(logsumexp(ys), -1));
  const T present = ops::gt(x, -inf);  // p_v > 0
  return {ops::exp(logp), ops::where(present, ops::sub(ops::where(present, logp, 0.0), logq), 0.0)};
}
}  // namespace detail

/// Exact per-token KL(softmax(logits) || softmax(ref_logits)): [..., V] x2 -> [...].
/// Example: logits [0, 0], ref [0, log 3] -> 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.143841.
template <tensor T>
T kl_exact(const T& logits, const T& ref_logits) {
  detail::check_exact_kl("kl_exact", logits, ref_logits);
  const auto [p, d] = detail::exact_kl_parts(ops::upcast(logits), ops::upcast(ref_logits));
  return ops::sum(ops::mul(p, d), -1);
}

/// Gradient with respect to logits (ref constant): grad[...] · p_v (d_v - KL).
template <tensor T>
T kl_exact_backward(const T& logits, const T& ref_logits, const T& grad) {
  detail::check_exact_kl("kl_exact_backward", logits, ref_logits);
  detail::require_row_grad("kl_exact_backward", logits, grad);
  const auto [p, d] = detail::exact_kl_parts(ops::upcast(logits), ops::upcast(ref_logits));
  const T kl = ops::sum(ops::mul(p, d), -1, true);
  const T g = ops::mul(ops::mul(p, ops::sub(d, kl)), ops::unsqueeze(ops::upcast(grad), -1));
  return ops::to_dtype(g, ops::dtype_of(logits));
}

}  // namespace posttrain
