// posttrain/numerics/logits.hpp — primitives over the vocabulary dimension of logits [..., V].
//
// logsumexp, token log-probabilities (selective log-softmax), softmax and entropy, each with
//   * a generic definition in posttrain::generic, written in the tensor vocabulary only, and
//   * a public entry that validates its inputs once and then asks for the one-pass statistics
//     (detail::logits_stats_unchecked): the backend's fused logits_stats hook (fused.hpp) when it
//     has one and takes the input, else posttrain::generic::logits_stats. The generic one stays as
//     the thing the fused one is tested against.
// token_logprobs_and_entropy gives both per-token values from one read of the logits (what a
// PPO/GRPO step with an entropy bonus needs); sft_loss takes its metrics from the same read.
// Analytic backward functions come in pairs with the forwards (llm.c style).
// Half-precision logits are computed in float32; values are returned in float32, gradients with
// respect to logits in the logits' dtype (as every backward in posttrain).
#pragma once

#include <cstdint>
#include <limits>
#include <utility>

#include "posttrain/detail/validate.hpp"
#include "posttrain/fused.hpp"
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
  // 0 * log 0 := 0; sanitise first so no -inf reaches a product (or its gradient). p is selected too:
  // a row of only -inf has logp = -inf - (-inf) = NaN, and entropy 0 (as the fused kernels give).
  // Selected on the shifted logits: x - max overflows to -inf for a finite x far below the max
  // (-1e308 beside 1e308; ±3e38 in float32), which has p = 0 too. NaN stays live and propagates.
  const T live = ops::ne(xs, -inf);
  const T p = ops::where(live, ops::exp(logp), 0.0);
  const T logp_safe = ops::where(live, logp, 0.0);
  return ops::neg(ops::sum(ops::mul(p, logp_safe), -1));
}

/// The one-pass statistics (fused.hpp's logits_stats hook) as a composition of the definitions
/// above: x [..., V] in the compute dtype, labels [...] (raw, with ignore_index) or null.
/// argmax_hit compares the first argmax (ops::argmax_last) with the label; 0 where ignored.
template <tensor T>
logits_row_stats<T> logits_stats(const T& x, const index_tensor_t<T>* labels, const logits_stats_request& q) {
  using tr = tensor_traits<T>;
  logits_row_stats<T> r;
  if (q.logsumexp) r.logsumexp = logsumexp_last(x);
  if (q.entropy) r.entropy = entropy_last(x);
  if (labels && (q.logprob || q.argmax_hit)) {
    const auto safe = tr::index_replace(*labels, q.ignore_index, 0);
    const T valid = tr::index_not_equal(*labels, q.ignore_index, x);  // [...] 0/1
    if (q.logprob) r.logprob = ops::where(valid, generic::token_logprobs(x, safe), 0.0);
    if (q.argmax_hit) r.argmax_hit = ops::mul(tr::index_equal(ops::argmax_last(ops::detach(x)), safe, x), valid);
  }
  return r;
}

}  // namespace generic

namespace detail {

/// The one-pass statistics of validated logits (and labels): the backend's fused hook when it
/// takes the input, else the generic composition on the upcast logits. Internal callers use this
/// and the *_unchecked forms below; the public entries validate once and call them.
template <tensor T>
logits_row_stats<T> logits_stats_unchecked(const T& logits, const index_tensor_t<T>* labels,
                                           const logits_stats_request& q) {
  if (auto fused = try_fused_logits_stats(logits, labels, q)) return std::move(*fused);
  return generic::logits_stats(ops::upcast(logits), labels, q);
}

template <tensor T>
T logsumexp_unchecked(const T& logits) {
  return logits_stats_unchecked(logits, static_cast<const index_tensor_t<T>*>(nullptr), {.logsumexp = true}).logsumexp;
}

template <tensor T>
T entropy_unchecked(const T& logits) {
  return logits_stats_unchecked(logits, static_cast<const index_tensor_t<T>*>(nullptr), {.entropy = true}).entropy;
}

template <tensor T>
T token_logprobs_unchecked(const T& logits, const index_tensor_t<T>& labels, std::int64_t ignore_index) {
  return logits_stats_unchecked(logits, &labels, {.logprob = true, .ignore_index = ignore_index}).logprob;
}

/// softmax over the last dimension of compute-dtype logits x, precise at large |x|.
template <tensor T>
T softmax_unchecked(const T& x) {
  const T xs = shift_by_row_max(x);
  return ops::exp(ops::sub(xs, ops::unsqueeze(logsumexp_unchecked(xs), -1)));
}

/// grad[...] · (onehot(label) - softmax) [..., V] in the logits' dtype, 0 at ignored positions.
template <tensor T>
T token_logprobs_backward_unchecked(const T& logits, const index_tensor_t<T>& labels, const T& grad,
                                    std::int64_t ignore_index) {
  const T x = ops::upcast(logits);
  const auto safe = tensor_traits<T>::index_replace(labels, ignore_index, 0);
  const T valid = tensor_traits<T>::index_not_equal(labels, ignore_index, x);
  const T d = ops::sub(ops::one_hot(safe, ops::size(x, -1), x), softmax_unchecked(x));  // [..., V]
  // selected, not multiplied: an ignored row's NaN logits give 0, not NaN·0
  const T g = ops::where(ops::unsqueeze(valid, -1), ops::mul(d, ops::unsqueeze(ops::upcast(grad), -1)), 0.0);
  return ops::to_dtype(g, ops::dtype_of(logits));
}

}  // namespace detail

/// logsumexp over the last dimension: logits [..., V] -> [...].
/// Gradient: softmax(logits). Example: logsumexp([0, log 3]) = log 4.
template <tensor T>
T logsumexp(const T& logits) {
  detail::require_logits("logsumexp", "logits", logits);
  return detail::logsumexp_unchecked(logits);
}

/// Softmax over the last dimension: [..., V] -> [..., V] (compute dtype).
template <tensor T>
T softmax_last(const T& logits) {
  detail::require_logits("softmax_last", "logits", logits);
  return detail::softmax_unchecked(ops::upcast(logits));
}

/// Backward of logsumexp: grad_logits[..., v] = grad[...] * softmax(logits)[..., v].
template <tensor T>
T logsumexp_backward(const T& logits, const T& grad) {
  detail::require_logits("logsumexp_backward", "logits", logits);
  detail::require_row_grad("logsumexp_backward", logits, grad);
  const T p = detail::softmax_unchecked(ops::upcast(logits));
  return ops::to_dtype(ops::mul(p, ops::unsqueeze(ops::upcast(grad), -1)), ops::dtype_of(logits));
}

/// Selective log-softmax: log p(labels) from logits [..., V] and labels [...] -> [...].
/// Positions whose label equals ignore_index get 0 (and no gradient). One read of the logits on a
/// backend with the fused logits_stats hook (TRL's selective_log_softmax; never allocates
/// log_softmax [..., V]). Example: logits [0, 0, log 2], label 2 -> log(2/4) = -log 2.
template <tensor T>
T token_logprobs(const T& logits, const index_tensor_t<T>& labels, std::int64_t ignore_index = default_ignore_index) {
  detail::require_logits("token_logprobs", "logits", logits);
  detail::require_labels("token_logprobs", logits, labels, ignore_index);
  return detail::token_logprobs_unchecked(logits, labels, ignore_index);
}

/// Backward of token_logprobs: grad_logits = grad * (onehot(label) - softmax), zero at ignored
/// positions.
template <tensor T>
T token_logprobs_backward(const T& logits, const index_tensor_t<T>& labels, const T& grad,
                          std::int64_t ignore_index = default_ignore_index) {
  detail::require_logits("token_logprobs_backward", "logits", logits);
  detail::require_labels("token_logprobs_backward", logits, labels, ignore_index);
  detail::require_row_grad("token_logprobs_backward", logits, grad);
  return detail::token_logprobs_backward_unchecked(logits, labels, grad, ignore_index);
}

/// Entropy of the token distribution, logits [..., V] -> [...]: H = -Σ_v p_v log p_v.
/// -inf logits (vocabulary padding) contribute 0. Example: uniform over V gives log V.
template <tensor T>
T entropy(const T& logits) {
  detail::require_logits("entropy", "logits", logits);
  return detail::entropy_unchecked(logits);
}

/// Backward of entropy: dH/dx_v = -p_v (log p_v + H); -inf logits get 0.
template <tensor T>
T entropy_backward(const T& logits, const T& grad) {
  detail::require_logits("entropy_backward", "logits", logits);
  detail::require_row_grad("entropy_backward", logits, grad);
  const double inf = std::numeric_limits<double>::infinity();
  const T x = ops::upcast(logits);
  const T xs = detail::shift_by_row_max(x);
  const T lse = ops::unsqueeze(detail::logsumexp_unchecked(xs), -1);
  const T live = ops::ne(xs, -inf);  // as entropy_last: -inf logits and overflowed differences have p = 0
  const T logp = ops::where(live, ops::sub(xs, lse), 0.0);
  const T p = ops::where(live, ops::exp(ops::sub(xs, lse)), 0.0);  // 0 on a row of only -inf, not NaN
  const T h = ops::unsqueeze(detail::entropy_unchecked(x), -1);
  const T d = ops::neg(ops::mul(p, ops::add(logp, h)));
  return ops::to_dtype(ops::mul(d, ops::unsqueeze(ops::upcast(grad), -1)), ops::dtype_of(logits));
}

/// Per-token log-probabilities and entropies together, [...] each.
template <tensor T>
struct logprobs_and_entropy {
  T logprobs;  ///< log softmax(logits)[label], 0 where label == ignore_index (differentiable)
  T entropy;   ///< -Σ_v p_v log p_v at every position, ignored ones included (differentiable)
};

/// token_logprobs and entropy from one read of the logits [..., V] on a backend with the fused
/// logits_stats hook (verl's logprobs_from_logits + entropy_from_logits; TRL's
/// selective_log_softmax + entropy_from_logits): the inputs of a PPO/GRPO step with an entropy
/// bonus. The entropy is computed at every position, as verl does (masking is the loss's job).
/// Half logits give float32 results. Example: logits [0, 0], label 0 -> {-log 2, log 2}.
template <tensor T>
logprobs_and_entropy<T> token_logprobs_and_entropy(const T& logits, const index_tensor_t<T>& labels,
                                                   std::int64_t ignore_index = default_ignore_index) {
  detail::require_logits("token_logprobs_and_entropy", "logits", logits);
  detail::require_labels("token_logprobs_and_entropy", logits, labels, ignore_index);
  auto st =
      detail::logits_stats_unchecked(logits, &labels, {.logprob = true, .entropy = true, .ignore_index = ignore_index});
  return {std::move(st.logprob), std::move(st.entropy)};
}

}  // namespace posttrain
