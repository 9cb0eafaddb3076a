// posttrain/numerics/logits.hpp — primitives over the vocabulary dimension of logits [..., V].
//
// logsumexp, token log-probabilities (selective log-softmax), softmax and entropy, each with
//   * a generic definition in posttrain::generic, written in the tensor vocabulary only, and
//   * a public dispatcher that uses a backend's fused override when it has one
//     (tensor_traits<T>::fused_logsumexp_last / fused_token_logprobs / fused_entropy_last),
//     and the generic definition otherwise. The generic one stays as the thing the fused one
//     is tested against.
// Analytic backward functions come in pairs with the forwards (llm.c style).
// Half-precision logits are computed in float32; values are returned in float32, gradients with
// respect to logits in the logits' dtype (as every backward in posttrain).
#pragma once

#include <cstdint>
#include <limits>

#include "posttrain/detail/validate.hpp"
#include "posttrain/tensor.hpp"

namespace posttrain {

/// The label value that marks a position to skip (PyTorch's cross_entropy default).
inline constexpr std::int64_t default_ignore_index = -100;

namespace detail {

/// x - sg(max_v x_v) over the last dimension (rows of only -inf shift by 0). Entries near the max
/// are then exact (Sterbenz), so a log-softmax taken from the shifted logits keeps full relative
/// precision: x - logsumexp(x) loses ulp(logsumexp), ~5e-4 in float32 at |x| = 1e4.
template <tensor T>
T shift_by_row_max(const T& x) {
  const double inf = std::numeric_limits<double>::infinity();
  const T m = ops::detach(ops::max(x, -1, true));  // [..., 1]
  return ops::sub(x, ops::where(ops::eq(m, -inf), 0.0, m));
}

/// The logits a fused override receives: half inputs are upcast to a float32 copy first, unless
/// the backend's overrides read half tensors themselves (tensor_traits<T>::fused_reads_half).
template <tensor T>
T fused_input(const T& logits) {
  if constexpr (requires { requires tensor_traits<T>::fused_reads_half; })
    return logits;
  else
    return ops::upcast(logits);
}

}  // namespace detail

namespace generic {

/// log Σ_v exp(x_v) over the last dimension: [..., V] -> [...].
/// Max-shifted by a detached row max; rows of only -inf give -inf (no NaN).
template <tensor T>
T logsumexp_last(const T& x) {
  const double inf = std::numeric_limits<double>::infinity();
  const T m = ops::detach(ops::max(x, -1, true));           // [..., 1]
  const T m_safe = ops::where(ops::eq(m, -inf), 0.0, m);    // a row of -inf shifts by 0
  const T s = ops::sum(ops::exp(ops::sub(x, m_safe)), -1);  // [...]
  return ops::add(ops::log(s), ops::reshape(m_safe, ops::shape(s)));
}

/// log softmax(x)[label] = xs[label] - logsumexp(xs) with xs = x - sg(row max): [..., V], [...] -> [...].
/// Shifting first keeps float32 precise at large |x| (x[label] - logsumexp(x) loses ulp(logsumexp)).
template <tensor T>
T token_logprobs(const T& x, const index_tensor_t<T>& labels) {
  const T xs = detail::shift_by_row_max(x);  // [..., V]
  return ops::sub(ops::gather_last(xs, labels), logsumexp_last(xs));
}

/// Entropy of softmax(x) over the last dimension, -Σ p log p; -inf logits contribute 0.
template <tensor T>
T entropy_last(const T& x) {
  const double inf = std::numeric_limits<double>::infinity();
  const T xs = detail::shift_by_row_max(x);                             // [..., V]
  const T logp = ops::sub(xs, ops::unsqueeze(logsumexp_last(xs), -1));  // [..., V]
  const T p = ops::exp(logp);
  // 0 * log 0 := 0; sanitise first so no -inf reaches a product (or its gradient).
  const T logp_safe = ops::where(ops::gt(x, -inf), logp, 0.0);
  return ops::neg(ops::sum(ops::mul(p, logp_safe), -1));
}

}  // namespace generic

/// Softmax over the last dimension: [..., V] -> [..., V].
template <tensor T>
T softmax_last(const T& logits);

/// logsumexp over the last dimension: logits [..., V] -> [...].
/// Gradient: softmax(logits). Example: logsumexp([0, log 3]) = log 4.
template <tensor T>
T logsumexp(const T& logits) {
  detail::require_logits("logsumexp", "logits", logits);
  if constexpr (requires { tensor_traits<T>::fused_logsumexp_last(logits); })
    return tensor_traits<T>::fused_logsumexp_last(detail::fused_input(logits));
  else
    return generic::logsumexp_last(ops::upcast(logits));
}

/// Backward of logsumexp: grad_logits[..., v] = grad[...] * softmax(logits)[..., v].
template <tensor T>
T logsumexp_backward(const T& logits, const T& grad) {
  detail::require_logits("logsumexp_backward", "logits", logits);
  detail::require_row_grad("logsumexp_backward", logits, grad);
  return ops::to_dtype(ops::mul(softmax_last(logits), ops::unsqueeze(ops::upcast(grad), -1)), ops::dtype_of(logits));
}

template <tensor T>
T softmax_last(const T& logits) {
  detail::require_logits("softmax_last", "logits", logits);
  const T xs = detail::shift_by_row_max(ops::upcast(logits));
  return ops::exp(ops::sub(xs, ops::unsqueeze(logsumexp(xs), -1)));
}

/// Selective log-softmax: log p(labels) from logits [..., V] and labels [...] -> [...].
/// Positions whose label equals ignore_index get 0 (and no gradient). Uses the backend's fused
/// kernel when it has one (TRL's selective_log_softmax; never allocates log_softmax [..., V]).
/// Example: logits [0, 0, log 2], label 2 -> log(2/4) = -log 2.
template <tensor T>
T token_logprobs(const T& logits, const index_tensor_t<T>& labels, std::int64_t ignore_index = default_ignore_index) {
  detail::require_logits("token_logprobs", "logits", logits);
  detail::require_labels("token_logprobs", logits, labels, ignore_index);
  const auto safe = tensor_traits<T>::index_replace(labels, ignore_index, 0);
  T lp;
  if constexpr (requires { tensor_traits<T>::fused_token_logprobs(logits, safe); })
    lp = tensor_traits<T>::fused_token_logprobs(detail::fused_input(logits), safe);
  else
    lp = generic::token_logprobs(ops::upcast(logits), safe);
  const T valid = tensor_traits<T>::index_not_equal(labels, ignore_index, lp);
  return ops::where(valid, lp, 0.0);
}

/// Backward of token_logprobs: grad_logits = grad * (onehot(label) - softmax), zero at ignored
/// positions.
template <tensor T>
T token_logprobs_backward(const T& logits, const index_tensor_t<T>& labels, const T& grad,
                          std::int64_t ignore_index = default_ignore_index) {
  detail::require_logits("token_logprobs_backward", "logits", logits);
  detail::require_labels("token_logprobs_backward", logits, labels, ignore_index);
  detail::require_row_grad("token_logprobs_backward", logits, grad);
  const T x = ops::upcast(logits);
  const auto safe = tensor_traits<T>::index_replace(labels, ignore_index, 0);
  const T valid = tensor_traits<T>::index_not_equal(labels, ignore_index, x);
  const T g = ops::mul(ops::upcast(grad), valid);                                  // [...]
  const T d = ops::sub(ops::one_hot(safe, ops::size(x, -1), x), softmax_last(x));  // [..., V]
  return ops::to_dtype(ops::mul(d, ops::unsqueeze(g, -1)), ops::dtype_of(logits));
}

/// Entropy of the token distribution, logits [..., V] -> [...]: H = -Σ_v p_v log p_v.
/// -inf logits (vocabulary padding) contribute 0. Example: uniform over V gives log V.
template <tensor T>
T entropy(const T& logits) {
  detail::require_logits("entropy", "logits", logits);
  if constexpr (requires { tensor_traits<T>::fused_entropy_last(logits); })
    return tensor_traits<T>::fused_entropy_last(detail::fused_input(logits));
  else
    return generic::entropy_last(ops::upcast(logits));
}

/// Backward of entropy: dH/dx_v = -p_v (log p_v + H); -inf logits get 0.
template <tensor T>
T entropy_backward(const T& logits, const T& grad) {
  detail::require_logits("entropy_backward", "logits", logits);
  detail::require_row_grad("entropy_backward", logits, grad);
  const double inf = std::numeric_limits<double>::infinity();
  const T x = ops::upcast(logits);
  const T xs = detail::shift_by_row_max(x);
  const T lse = ops::unsqueeze(logsumexp(xs), -1);
  const T logp = ops::where(ops::gt(x, -inf), ops::sub(xs, lse), 0.0);
  const T p = ops::exp(ops::sub(xs, lse));
  const T h = ops::unsqueeze(entropy(x), -1);
  const T d = ops::neg(ops::mul(p, ops::add(logp, h)));
  return ops::to_dtype(ops::mul(d, ops::unsqueeze(ops::upcast(grad), -1)), ops::dtype_of(logits));
}

}  // namespace posttrain
