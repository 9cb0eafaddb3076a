// posttrain/losses/sequence_logps.hpp — per-sequence log-probabilities of completions, the input
// of every preference loss.
//
//   logits [B, T, V], labels [B, T] (labels == ignore_index off the completion)
//   sum   ℓ_b = Σ_t log p(y_t)                          (TRL DPO: chosen_logps / rejected_logps)
//   mean  ℓ̄_b = Σ_t log p(y_t) / |y_b|                  (SimPO, ORPO, TRL IPO; 0 for an empty row)
// Returns the per-sequence values [B] and the completion lengths |y_b| [B].
// Gradient: ∂ℓ_b/∂logits[b, t] = onehot(y_t) - softmax(logits[b, t]) (÷ |y_b| for mean).
// temperature T (default 1 = none): log p = log softmax(logits / T) and the gradient carries 1/T,
// as TRL and verl score completions sampled at temperature T (`logits /= temperature`).
// ld_sequence_logps stays at T = 1.
// wpo_weights: WPO's per-sequence weight from the policy's own logits (TRL use_weighting), see below.
#pragma once

#include <cstdint>
#include <string_view>

#include "posttrain/detail/validate.hpp"
#include "posttrain/numerics/logits.hpp"
#include "posttrain/tensor.hpp"

namespace posttrain {

enum class sequence_reduction { sum, mean };

struct sequence_logps_options {
  std::int64_t ignore_index = default_ignore_index;
  sequence_reduction reduction = sequence_reduction::sum;
  /// T, finite and > 0: log softmax(logits / T) (TRL/verl sampling temperature); 1 = none.
  double temperature = 1.0;
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
  require_temperature(fn, "options.temperature", o.temperature);
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
  // One read of the logits, half ones as they are on a backend whose hook reads them (validated above).
  const T lp = detail::token_logprobs_unchecked(logits, labels, opt.ignore_index, opt.temperature);  // [B, T]
  const T lengths = tensor_traits<T>::index_not_equal(labels, opt.ignore_index, lp);                 // [B, T] 0/1
  const T n = ops::sum(lengths, 1);                                                                  // [B]
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
  return ops::to_dtype(
      detail::token_logprobs_backward_unchecked(x, labels, per_token, opt.ignore_index, opt.temperature),
      ops::dtype_of(logits));
}

/// LD-DPO's length-desensitised log-probability (Liu et al. 2024, arXiv:2409.06411 eq. 9; TRL ld_alpha):
///   ℓ_b = Σ_{completion positions p <= s_b} log p(y) + α Σ_{p > s_b} log p(y)
/// with p counting completion tokens from 1 and s_b the shared length, min(|y_c|, |y_r|) of the
/// pair (apply the same s_b to the policy and the reference, to chosen and rejected). α = 1 gives the sum.
template <tensor T>
sequence_logps_result<T> ld_sequence_logps(const T& logits, const index_tensor_t<T>& labels, const T& shared_lengths,
                                           double ld_alpha, std::int64_t ignore_index = default_ignore_index);

namespace detail {
/// The per-token LD-DPO weight [B, T]: 1 on the shared prefix of the completion, α after it, 0 off it.
template <tensor T>
T ld_weights(std::string_view fn, const T& x, const index_tensor_t<T>& labels, const T& shared_lengths, double ld_alpha,
             std::int64_t ignore_index) {
  require_finite(fn, "ld_alpha", ld_alpha);
  if (ld_alpha < 0 || ld_alpha > 1) fail(fn, "ld_alpha must be in [0, 1], got ", ld_alpha);
  require_floating(fn, "shared_lengths", shared_lengths);
  require_same_device(fn, "logits", x, "shared_lengths", shared_lengths);
  if (ops::shape(shared_lengths) != shape_t{ops::size(x, 0)})
    fail(fn, "shared_lengths has shape ", shape_string(ops::shape(shared_lengths)), " but logits has batch size ",
         ops::size(x, 0));
  const T mask = tensor_traits<T>::index_not_equal(labels, ignore_index, x);  // [B, T]
  const T position = ops::cumsum(mask, 1);                                    // completion position, from 1
  const T shared = ops::le(position, ops::unsqueeze(ops::upcast(shared_lengths), 1));
  return ops::mul(mask, ops::add(shared, ops::mul(ops::sub(1.0, shared), ld_alpha)));
}
}  // namespace detail

template <tensor T>
sequence_logps_result<T> ld_sequence_logps(const T& logits, const index_tensor_t<T>& labels, const T& shared_lengths,
                                           double ld_alpha, std::int64_t ignore_index) {
  const sequence_logps_options o{.ignore_index = ignore_index};
  detail::check_sequence_logps("ld_sequence_logps", logits, labels, o);
  const T x = ops::upcast(logits);
  const T w = detail::ld_weights("ld_sequence_logps", x, labels, shared_lengths, ld_alpha, ignore_index);
  const T lp = detail::token_logprobs_unchecked(logits, labels, ignore_index);
  const T n = ops::sum(tensor_traits<T>::index_not_equal(labels, ignore_index, x), 1);
  return {ops::sum(ops::mul(lp, w), 1), ops::detach(n)};
}

/// Backward of ld_sequence_logps: grad [B] -> ∂/∂logits [B, T, V].
template <tensor T>
T ld_sequence_logps_backward(const T& logits, const index_tensor_t<T>& labels, const T& shared_lengths, double ld_alpha,
                             const T& grad, std::int64_t ignore_index = default_ignore_index) {
  const sequence_logps_options o{.ignore_index = ignore_index};
  detail::check_sequence_logps("ld_sequence_logps_backward", logits, labels, o);
  detail::require_values("ld_sequence_logps_backward", "grad", grad);
  const T x = ops::upcast(logits);
  if (ops::shape(grad) != shape_t{ops::size(x, 0)})
    detail::fail("ld_sequence_logps_backward", "grad has shape ", detail::shape_string(ops::shape(grad)),
                 " but logits has batch size ", ops::size(x, 0));
  const T w = detail::ld_weights("ld_sequence_logps_backward", x, labels, shared_lengths, ld_alpha, ignore_index);
  const T per_token = ops::mul(w, ops::unsqueeze(ops::upcast(grad), 1));
  return ops::to_dtype(detail::token_logprobs_backward_unchecked(x, labels, per_token, ignore_index),
                       ops::dtype_of(logits));
}

/// WPO weights (Zhou et al. 2024, arXiv:2406.11827 eq. 2, the length-normalised form TRL computes): per
/// sequence, the geometric mean over completion tokens of the policy's probability of the token relative to its
/// self-collision probability Σ_v p_v², detached:
///   w_b = exp( Σ_t m_bt (log p(y_t) - log Σ_v p_v(t)²) / max(Σ_t m_bt, 1) ),  log Σ_v p_v² = lse(2x) - 2 lse(x)
/// TRL DPOTrainer._compute_loss (use_weighting, f2cd577): the logits are TRL's shift_logits, m its
/// shift_completion_mask (here labels != ignore_index), no clamp; the DPO loss of pair b is then multiplied by
/// w_chosen · w_rejected: pass them as preference_batch::chosen_weights / rejected_weights (dpo.hpp). An empty row
/// gets weight 1 (exp(0 / 1)). logits [B, T, V], labels [B, T] -> [B] in the compute dtype (float32 for half),
/// detached (TRL: torch.no_grad()). Each logsumexp is of the logits shifted by their row max (2x included).
/// Example: one token, logits [0, 0] (p = ½, ½; Σ p² = ½) -> w = exp(log ½ - log ½) = 1.
template <tensor T>
T wpo_weights(const T& logits, const index_tensor_t<T>& labels, std::int64_t ignore_index = default_ignore_index) {
  const sequence_logps_options o{.ignore_index = ignore_index};
  detail::check_sequence_logps("wpo_weights", logits, labels, o);
  const T x = ops::detach(ops::upcast(logits));
  const T lp = detail::token_logprobs_unchecked(x, labels, ignore_index);  // [B, T], 0 where ignored
  const T xs = detail::shift_by_row_max(x);                                // [B, T, V]
  // log Σ_v p_v² = lse(2 xs) - 2 lse(xs)  (TRL: lse2 - 2·lse1)
  const T log_denom = ops::sub(detail::logsumexp_unchecked(ops::mul(xs, 2.0)),
                               ops::mul(detail::logsumexp_unchecked(xs), 2.0));  // [B, T]
  const T m = tensor_traits<T>::index_not_equal(labels, ignore_index, lp);       // [B, T] 0/1
  const T aligned = ops::where(m, ops::sub(lp, log_denom), 0.0);
  return ops::detach(ops::exp(ops::div(ops::sum(aligned, 1), ops::maximum(ops::sum(m, 1), 1.0))));
}

}  // namespace posttrain
