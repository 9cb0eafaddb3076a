// posttrain/losses/sequence_logps.hpp — per-sequence log-probabilities of completions, the input
// of every preference loss.
//
//   logits [B, T, V], labels [B, T] (labels == ignore_index off the completion)
//   sum   ℓ_b = Σ_t log p(y_t)                          (TRL DPO: chosen_logps / rejected_logps)
//   mean  ℓ̄_b = Σ_t log p(y_t) / |y_b|                  (SimPO, ORPO, TRL IPO; 0 for an empty row)
// Returns the per-sequence values [B] and the completion lengths |y_b| [B].
// Gradient: ∂ℓ_b/∂logits[b, t] = onehot(y_t) - softmax(logits[b, t]) (÷ |y_b| for mean).
#pragma once

#include <cstdint>

#include "posttrain/detail/validate.hpp"
#include "posttrain/numerics/logits.hpp"
#include "posttrain/tensor.hpp"

namespace posttrain {

enum class sequence_reduction { sum, mean };

struct sequence_logps_options {
  std::int64_t ignore_index = default_ignore_index;
  sequence_reduction reduction = sequence_reduction::sum;
};

template <tensor T>
struct sequence_logps_result {
  T logps;    ///< [B]
  T lengths;  ///< [B] count of labels != ignore_index (detached)
};

namespace detail {
template <tensor T>
void check_sequence_logps(std::string_view fn, const T& logits, const index_tensor_t<T>& labels,
                          const sequence_logps_options& o) {
  require_logits(fn, "logits", logits);
  require_rank(fn, "logits", logits, 3, 3);
  require_labels(fn, logits, labels, o.ignore_index);
}
}  // namespace detail

/// Per-sequence log-probability of the labelled completion tokens, summed or averaged.
/// Example: logits [1, 2, 2] all zeros, labels [[0, -100]] -> ℓ = -log 2, length 1.
template <tensor T>
sequence_logps_result<T> sequence_logps(const T& logits, const index_tensor_t<T>& labels,
                                        const sequence_logps_options& opt = {}) {
  detail::check_sequence_logps("sequence_logps", logits, labels, opt);
  const T x = ops::upcast(logits);
  const T lp = token_logprobs(x, labels, opt.ignore_index);                          // [B, T], 0 if ignored
  const T lengths = tensor_traits<T>::index_not_equal(labels, opt.ignore_index, x);  // [B, T] 0/1
  const T n = ops::sum(lengths, 1);                                                  // [B]
  T s = ops::sum(lp, 1);
  if (opt.reduction == sequence_reduction::mean) s = ops::div(s, ops::maximum(n, 1.0));
  return {s, ops::detach(n)};
}

/// Backward: grad [B] (∂loss/∂ℓ_b) -> ∂loss/∂logits [B, T, V] in logits' dtype.
template <tensor T>
T sequence_logps_backward(const T& logits, const index_tensor_t<T>& labels, const T& grad,
                          const sequence_logps_options& opt = {}) {
  detail::check_sequence_logps("sequence_logps_backward", logits, labels, opt);
  detail::require_values("sequence_logps_backward", "grad", grad);
  const T x = ops::upcast(logits);
  T g = ops::upcast(grad);  // [B]
  if (ops::shape(g) != shape_t{ops::size(x, 0)})
    detail::fail("sequence_logps_backward", "grad has shape ", detail::shape_string(ops::shape(g)),
                 " but logits has batch size ", ops::size(x, 0));
  if (opt.reduction == sequence_reduction::mean) {
    const T n = ops::sum(tensor_traits<T>::index_not_equal(labels, opt.ignore_index, x), 1);
    g = ops::div(g, ops::maximum(n, 1.0));
  }
  const T per_token = ops::mul(ops::unsqueeze(g, 1), ops::full(x, shape_t{ops::size(x, 0), ops::size(x, 1)}, 1.0));
  return ops::to_dtype(token_logprobs_backward(x, labels, per_token, opt.ignore_index), ops::dtype_of(logits));
}

}  // namespace posttrain
