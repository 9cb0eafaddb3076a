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
//
// Temperature: token_logprobs, entropy, token_logprobs_and_entropy and their backwards take an
// options struct whose `temperature` T divides the logits before the log-softmax, as the RL
// frameworks score sampled tokens (TRL GRPOTrainer._get_per_token_logps: `logits /= self.temperature`;
// verl dp_actor._forward_micro_batch: `logits.div_(temperature)`). Gradients are w.r.t. the raw
// logits (they carry 1/T). T = 1 (the default) runs exactly the untempered code; the fused hooks
// apply 1/T inside their one pass (no [N, V] copy of logits / T). T must be finite and > 0.
#pragma once

#include <cstdint>
#include <limits>
#include <string_view>
#include <utility>

#include "posttrain/detail/validate.hpp"
#include "posttrain/fused.hpp"
#include "posttrain/tensor.hpp"

namespace posttrain {

/// The label value that marks a position to skip (PyTorch's cross_entropy default).
inline constexpr std::int64_t default_ignore_index = -100;

/// Options of token_logprobs and token_logprobs_and_entropy (and their backwards).
struct logprob_options {
  /// Labels equal to this get log-prob 0 and no gradient (PyTorch and Hugging Face: -100).
  std::int64_t ignore_index = default_ignore_index;
  /// T, finite and > 0: log softmax(logits / T) (TRL `temperature`, verl `rollout.temperature`); 1 = none.
  double temperature = 1.0;
};

/// Options of entropy and entropy_backward.
struct entropy_options {
  /// T, finite and > 0: the entropy of softmax(logits / T) (verl's entropy_from_logits after
  /// `logits.div_(temperature)`); 1 = none.
  double temperature = 1.0;
};

namespace detail {

/// T must be finite and > 0 (a temperature divides the logits).
inline void require_temperature(std::string_view fn, std::string_view name, double temperature) {
  require_finite(fn, name, temperature);
  if (temperature <= 0.0) fail(fn, name, " must be > 0, got ", temperature);
}

/// x / T in the compute dtype, or x itself when T == 1 (no division at all).
template <tensor T>
T tempered(const T& x, double temperature) {
  return temperature == 1.0 ? x : ops::div(x, temperature);
}

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
/// q.temperature T != 1: the statistics of x / T (divided first, as TRL and verl do).
template <tensor T>
logits_row_stats<T> logits_stats(const T& x_raw, const index_tensor_t<T>* labels, const logits_stats_request& q) {
  using tr = tensor_traits<T>;
  const T x = detail::tempered(x_raw, q.temperature);  // [..., V]
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
T token_logprobs_unchecked(const T& logits, const index_tensor_t<T>& labels, std::int64_t ignore_index,
                           double temperature = 1.0) {
  return logits_stats_unchecked(logits, &labels,
                                {.logprob = true, .ignore_index = ignore_index, .temperature = temperature})
      .logprob;
}

/// softmax over the last dimension of compute-dtype logits x, precise at large |x|.
template <tensor T>
T softmax_unchecked(const T& x) {
  const T xs = shift_by_row_max(x);
  return ops::exp(ops::sub(xs, ops::unsqueeze(logsumexp_unchecked(xs), -1)));
}

/// grad[...] · (onehot(label) - softmax) [..., V] in the logits' dtype, 0 at ignored positions.
/// With a temperature T: grad · (onehot(label) - softmax(logits / T)) / T (the chain rule).
template <tensor T>
T token_logprobs_backward_unchecked(const T& logits, const index_tensor_t<T>& labels, const T& grad_in,
                                    std::int64_t ignore_index, double temperature = 1.0) {
  const T x = tempered(ops::upcast(logits), temperature);
  const T grad = temperature == 1.0 ? grad_in : ops::div(ops::upcast(grad_in), temperature);
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
/// Positions whose label equals options.ignore_index get 0 (and no gradient). One read of the logits on a
/// backend with the fused logits_stats hook (TRL's selective_log_softmax; never allocates
/// log_softmax [..., V]). With options.temperature T: log softmax(logits / T)[label] (TRL
/// `logits /= self.temperature`, verl `logits.div_(temperature)`).
/// Example: logits [0, 0, log 2], label 2 -> log(2/4) = -log 2; at T = 2, logits/2 = [0, 0, log √2]
/// -> log(√2 / (2 + √2)).
template <tensor T>
T token_logprobs(const T& logits, const index_tensor_t<T>& labels, const logprob_options& opt) {
  detail::require_temperature("token_logprobs", "options.temperature", opt.temperature);
  detail::require_logits("token_logprobs", "logits", logits);
  detail::require_labels("token_logprobs", logits, labels, opt.ignore_index);
  return detail::token_logprobs_unchecked(logits, labels, opt.ignore_index, opt.temperature);
}

/// token_logprobs at temperature 1 with the given ignore_index.
template <tensor T>
T token_logprobs(const T& logits, const index_tensor_t<T>& labels, std::int64_t ignore_index = default_ignore_index) {
  return token_logprobs(logits, labels, logprob_options{.ignore_index = ignore_index});
}

/// Backward of token_logprobs: grad_logits = grad * (onehot(label) - softmax(logits / T)) / T, zero at
/// ignored positions (T = options.temperature; the 1/T is the chain rule through logits / T).
template <tensor T>
T token_logprobs_backward(const T& logits, const index_tensor_t<T>& labels, const T& grad, const logprob_options& opt) {
  detail::require_temperature("token_logprobs_backward", "options.temperature", opt.temperature);
  detail::require_logits("token_logprobs_backward", "logits", logits);
  detail::require_labels("token_logprobs_backward", logits, labels, opt.ignore_index);
  detail::require_row_grad("token_logprobs_backward", logits, grad);
  return detail::token_logprobs_backward_unchecked(logits, labels, grad, opt.ignore_index, opt.temperature);
}

/// token_logprobs_backward at temperature 1 with the given ignore_index.
template <tensor T>
T token_logprobs_backward(const T& logits, const index_tensor_t<T>& labels, const T& grad,
                          std::int64_t ignore_index = default_ignore_index) {
  return token_logprobs_backward(logits, labels, grad, logprob_options{.ignore_index = ignore_index});
}

/// Entropy of the token distribution, logits [..., V] -> [...]: H = -Σ_v p_v log p_v with
/// p = softmax(logits / T), T = options.temperature (verl: entropy_from_logits after
/// `logits.div_(temperature)`). -inf logits (vocabulary padding) contribute 0.
/// Example: uniform over V gives log V at any T.
template <tensor T>
T entropy(const T& logits, const entropy_options& opt) {
  detail::require_temperature("entropy", "options.temperature", opt.temperature);
  detail::require_logits("entropy", "logits", logits);
  return detail::logits_stats_unchecked(logits, static_cast<const index_tensor_t<T>*>(nullptr),
                                        {.entropy = true, .temperature = opt.temperature})
      .entropy;
}

/// entropy at temperature 1.
template <tensor T>
T entropy(const T& logits) {
  return entropy(logits, entropy_options{});
}

/// Backward of entropy: dH/dx_v = -p_v (log p_v + H) / T with p = softmax(x / T); -inf logits get 0.
template <tensor T>
T entropy_backward(const T& logits, const T& grad, const entropy_options& opt) {
  detail::require_temperature("entropy_backward", "options.temperature", opt.temperature);
  detail::require_logits("entropy_backward", "logits", logits);
  detail::require_row_grad("entropy_backward", logits, grad);
  const double inf = std::numeric_limits<double>::infinity();
  const T x = detail::tempered(ops::upcast(logits), opt.temperature);  // z = x / T
  const T xs = detail::shift_by_row_max(x);
  const T lse = ops::unsqueeze(detail::logsumexp_unchecked(xs), -1);
  const T live = ops::ne(xs, -inf);  // as entropy_last: -inf logits and overflowed differences have p = 0
  const T logp = ops::where(live, ops::sub(xs, lse), 0.0);
  const T p = ops::where(live, ops::exp(ops::sub(xs, lse)), 0.0);  // 0 on a row of only -inf, not NaN
  const T h = ops::unsqueeze(detail::entropy_unchecked(x), -1);
  T d = ops::neg(ops::mul(p, ops::add(logp, h)));                // dH/dz
  if (opt.temperature != 1.0) d = ops::div(d, opt.temperature);  // dz/dx = 1/T
  return ops::to_dtype(ops::mul(d, ops::unsqueeze(ops::upcast(grad), -1)), ops::dtype_of(logits));
}

/// entropy_backward at temperature 1.
template <tensor T>
T entropy_backward(const T& logits, const T& grad) {
  return entropy_backward(logits, grad, entropy_options{});
}

/// Per-token log-probabilities and entropies together, [...] each.
template <tensor T>
struct logprobs_and_entropy {
  T logprobs;  ///< log softmax(logits / T)[label], 0 where label == ignore_index (differentiable)
  T entropy;   ///< -Σ_v p_v log p_v at every position, ignored ones included (differentiable)
};

/// token_logprobs and entropy from one read of the logits [..., V] on a backend with the fused
/// logits_stats hook (verl's logprobs_from_logits + entropy_from_logits; TRL's
/// selective_log_softmax + entropy_from_logits): the inputs of a PPO/GRPO step with an entropy
/// bonus, both of softmax(logits / T) with T = options.temperature (TRL and verl divide by the
/// sampling temperature first). The entropy is computed at every position, as verl does (masking
/// is the loss's job). Half logits give float32 results. Example: logits [0, 0], label 0 -> {-log 2, log 2}.
template <tensor T>
logprobs_and_entropy<T> token_logprobs_and_entropy(const T& logits, const index_tensor_t<T>& labels,
                                                   const logprob_options& opt) {
  detail::require_temperature("token_logprobs_and_entropy", "options.temperature", opt.temperature);
  detail::require_logits("token_logprobs_and_entropy", "logits", logits);
  detail::require_labels("token_logprobs_and_entropy", logits, labels, opt.ignore_index);
  auto st = detail::logits_stats_unchecked(
      logits, &labels,
      {.logprob = true, .entropy = true, .ignore_index = opt.ignore_index, .temperature = opt.temperature});
  return {std::move(st.logprob), std::move(st.entropy)};
}

/// token_logprobs_and_entropy at temperature 1 with the given ignore_index.
template <tensor T>
logprobs_and_entropy<T> token_logprobs_and_entropy(const T& logits, const index_tensor_t<T>& labels,
                                                   std::int64_t ignore_index = default_ignore_index) {
  return token_logprobs_and_entropy(logits, labels, logprob_options{.ignore_index = ignore_index});
}

}  // namespace posttrain
