// posttrain/losses/sft.hpp — supervised fine-tuning: next-token cross-entropy on demonstrations.
//
//   logits [..., V], labels [...] (already shifted: labels[t] is the token logits[t] predicts)
//   per-token loss  ℓ_t = (1 - ε)(-log p_t[y_t]) + ε(-(1/V) Σ_v log p_t[v])   (PyTorch cross_entropy
//                   label_smoothing semantics)
//                 (× sg(p_t[y_t]) with dft: DFT, arXiv:2508.05629 eq. 8, TRL loss_type="dft")
//                 + z · logsumexp_t²                                          (PaLM z-loss, arXiv:2204.02311 §5)
//   loss = aggregate(ℓ, labels != ignore_index, reduction, normalizer)
//
// reduction token_mean with no normalizer is PyTorch's reduction="mean"; sum is "sum". TRL's SFT
// divides by `num_items_in_batch` (the token count of the whole gradient-accumulation window):
// pass it as `normalizer`. The sequence modes need logits [B, T, V].
// temperature T (default 1 = none) takes every term above of logits / T, gradients w.r.t. the raw
// logits (× 1/T). Neither TRL's SFTTrainer nor verl's SFT trainer has one: supervised training fits
// the model's own distribution. It is here so that the cross-entropy of a sampled or distilled
// target at the sampling/distillation temperature (the log-probs RL frameworks take after
// `logits /= temperature`, the hard-label term of a KD loss at τ) has the same fused path, and so
// that fused_linear_cross_entropy(..., {.temperature}) keeps equal to sft_loss(X·Wᵀ, ...) with it.
// Example: logits [[0, 0, 0, 0]], label 0 -> loss log 4 = 1.386294; with ε = 0.1 still log 4.
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
#include <string_view>
#include <utility>

#include "posttrain/detail/validate.hpp"
#include "posttrain/fused.hpp"
#include "posttrain/numerics/aggregate.hpp"
#include "posttrain/numerics/logits.hpp"
#include "posttrain/tensor.hpp"

namespace posttrain {

struct sft_options {
  /// Labels equal to this are skipped (PyTorch and Hugging Face: -100).
  std::int64_t ignore_index = default_ignore_index;
  /// ε in [0, 1): mixes the target with the uniform distribution, as torch cross_entropy.
  double label_smoothing = 0.0;
  /// PaLM's auxiliary z-loss coefficient (PaLM used 1e-4); 0 disables it.
  double z_loss = 0.0;
  /// How per-token losses become one number; token_mean is PyTorch's "mean".
  aggregation reduction = aggregation::token_mean;
  /// Optional global count (tokens, sequences or a constant: see `aggregation`).
  std::optional<double> normalizer = std::nullopt;
  /// Dynamic fine-tuning: weight each token's loss by its detached probability (TRL "dft").
  bool dft = false;
  /// T, finite and > 0: the loss of logits / T (see the file comment); 1 = none (SFT's usual case).
  double temperature = 1.0;
  /// Opt-in, autograd backends (LibTorch): `loss.backward()` writes d loss / d logits into the
  /// logits' own storage and hands that storage to autograd as their gradient, so no [..., V]
  /// gradient is allocated per step (Liger-Kernel's fused cross-entropy reuses the logits' memory
  /// the same way; it writes during the forward, this mode during the backward, so the logits keep
  /// their values through the forward). After the backward the logits' values are gone: they hold
  /// the gradient (with label smoothing or a z-loss, the part of it from the fused node).
  /// Safe when nothing reads the logits after this loss's backward: the usual `logits = model(x)`
  /// (the LM head's matmul saves its inputs, not the logits) followed by `sft_loss(...).loss.backward()`.
  /// Misuse is detected by autograd: the logits are saved for the backward and their version counter is
  /// bumped when overwritten, so a second backward through the same graph (retain_graph) or another node
  /// that saved the logits (e.g. `logits = h.tanh()`) and runs later raises autograd's "modified by an
  /// inplace operation" error; create_graph = true raises posttrain::error. Not detectable: reading
  /// the logits' values yourself after the backward (they are the gradient then). With leaf logits that
  /// require grad, `logits.grad()` and `logits` share storage afterwards. Taken on the CPU kernel path
  /// (contiguous float32/float64 CPU logits); other logits (CUDA, half, strided) run the default path
  /// and are left alone. Ignored by backends without autograd (Eigen: use sft_loss_backward).
  bool in_place_gradient = false;
};

template <tensor T>
struct sft_result {
  T loss;            ///< 0-d: the aggregated loss (differentiable on autograd backends)
  T per_token_loss;  ///< [...]: ℓ_t, 0 at ignored positions (differentiable)
  T num_tokens;      ///< 0-d: count of labels != ignore_index (detached)
  T token_accuracy;  ///< 0-d: fraction of counted tokens whose argmax is the label (detached)
  T entropy;         ///< 0-d: mean entropy of the predicted distribution over counted tokens (detached)
};

namespace detail {
inline void check_sft(std::string_view fn, const sft_options& o) {
  require_finite(fn, "options.label_smoothing", o.label_smoothing);
  require_finite(fn, "options.z_loss", o.z_loss);
  if (o.label_smoothing < 0.0 || o.label_smoothing >= 1.0)
    fail(fn, "options.label_smoothing must be in [0, 1), got ", o.label_smoothing);
  if (o.z_loss < 0.0) fail(fn, "options.z_loss must be >= 0, got ", o.z_loss);
  check_normalizer(fn, o.normalizer);
  require_temperature(fn, "options.temperature", o.temperature);
}

/// aggregate(loss, valid, mode, normalizer) for a loss already 0 at ignored rows and a 0/1 mask
/// `valid` whose count's max(n, 1) the caller has: the same operations on the same values for
/// token_mean and sum (aggregation_weights' mb = valid, count = max(n, 1) or the normaliser), without
/// recomputing the mask, its count and the selection (8 tensor ops fewer per call); the sequence
/// modes go through aggregate itself.
template <tensor T>
T aggregate_masked(const T& loss, const T& valid, const T& n_at_least_1, aggregation mode,
                   std::optional<double> normalizer) {
  if (mode == aggregation::token_mean) {
    const T w = normalizer ? ops::div(valid, ops::scalar_like(valid, *normalizer)) : ops::div(valid, n_at_least_1);
    return ops::sum_all(ops::mul(loss, w));
  }
  if (mode == aggregation::sum) return ops::sum_all(ops::mul(loss, normalizer ? ops::div(valid, *normalizer) : valid));
  return aggregate(loss, valid, mode, normalizer);
}

template <tensor T>
void check_sft_inputs(std::string_view fn, const T& logits, const index_tensor_t<T>& labels, const sft_options& o) {
  check_sft(fn, o);
  require_logits(fn, "logits", logits);
  require_labels(fn, logits, labels, o.ignore_index);
  const bool per_sequence = o.reduction != aggregation::token_mean && o.reduction != aggregation::sum;
  if (per_sequence && ops::rank(logits) != 3)
    fail(fn, "reduction ", aggregation_name(o.reduction), " needs logits [B, T, V], got shape ",
         shape_string(ops::shape(logits)));
}
}  // namespace detail

/// SFT cross-entropy forward. See the file comment for the formula and options.
template <tensor T>
sft_result<T> sft_loss(const T& logits, const index_tensor_t<T>& labels, const sft_options& opt = {}) {
  detail::check_sft_inputs("sft_loss", logits, labels, opt);
  using tr = tensor_traits<T>;
  // The plain form (most SFT steps) in one fused node where the backend has one: the composition
  // below costs ~35 tensor ops per call, which dominates small batches.
  const bool plain = opt.label_smoothing == 0.0 && opt.z_loss == 0.0 && !opt.dft &&
                     (opt.reduction == aggregation::token_mean || opt.reduction == aggregation::sum);
  if (plain) {
    const bool by_count = opt.reduction == aggregation::token_mean && !opt.normalizer;
    const sft_fused_request q{.ignore_index = opt.ignore_index,
                              .temperature = opt.temperature,
                              .divide_by_count = by_count,
                              .weight = opt.normalizer ? 1.0 / *opt.normalizer : 1.0,
                              .gradient_in_place = opt.in_place_gradient};
    if (auto f = detail::try_fused_sft(logits, labels, q))
      return {std::move(f->loss), std::move(f->per_token_loss), std::move(f->num_tokens), std::move(f->token_accuracy),
              std::move(f->entropy)};
  }
  // With one differentiable use of the logits (no smoothing, no z-loss) they go to the fused
  // primitive as they are: a backend that reads half logits itself never holds a float32 copy.
  // With several uses, half logits are upcast once first, so autograd sums their gradients in
  // float32 and rounds to the half dtype once (a sum of half gradients would round per use).
  // Results are in the compute dtype (float32 for half) either way.
  const bool several_uses = opt.label_smoothing > 0.0 || opt.z_loss > 0.0;
  const T x = several_uses ? ops::upcast(logits) : logits;  // [..., V]
  const double vocab = static_cast<double>(ops::size(x, -1));
  // One read of the logits for log p[y], the logsumexp (smoothing, z-loss) and both metrics.
  const logits_row_stats<T> st = detail::logits_stats_unchecked(x, &labels,
                                                                {.logsumexp = several_uses,
                                                                 .logprob = true,
                                                                 .entropy = true,
                                                                 .argmax_hit = true,
                                                                 .ignore_index = opt.ignore_index,
                                                                 .temperature = opt.temperature,
                                                                 .gradient_in_place = opt.in_place_gradient});
  const T& lp = st.logprob;                                           // [...] log p[y], 0 if ignored
  const T valid = tr::index_not_equal(labels, opt.ignore_index, lp);  // [...] 0/1
  T tok = ops::neg(lp);                                               // NLL
  const T& lse = st.logsumexp;
  if (opt.label_smoothing > 0.0) {
    // PyTorch cross_entropy: (1-ε)·nll + ε·(-(1/V) Σ_v log p_v) = (1-ε)·nll + ε·(lse - mean_v x_v),
    // x = logits / T (lse is already of logits / T)
    const T smooth = ops::sub(lse, ops::div(ops::sum(x, -1), vocab * opt.temperature));
    tok = ops::add(ops::mul(tok, 1.0 - opt.label_smoothing), ops::mul(smooth, opt.label_smoothing));
  }
  // DFT (arXiv:2508.05629 eq. 8): ℓ_t · sg(p_t)
  if (opt.dft) tok = ops::mul(tok, ops::detach(ops::exp(lp)));
  // PaLM z-loss: z · lse²
  if (opt.z_loss > 0.0) tok = ops::add(tok, ops::mul(ops::square(lse), opt.z_loss));
  const T zero = ops::scalar_like(lp, 0.0);
  tok = ops::where(valid, tok, zero);

  sft_result<T> r;
  r.per_token_loss = tok;
  const T n = ops::detach(ops::sum_all(valid));
  const T n_at_least_1 = ops::maximum(n, 1.0);
  r.loss = detail::aggregate_masked(tok, valid, n_at_least_1, opt.reduction, opt.normalizer);
  r.num_tokens = n;
  // Metrics: the hit is 0 at ignored rows already; the entropy is selected (not multiplied) so an
  // ignored row's NaN logits cannot reach it.
  r.token_accuracy = ops::div(ops::sum_all(ops::detach(st.argmax_hit)), n_at_least_1);
  r.entropy = ops::div(ops::sum_all(ops::where(valid, ops::detach(st.entropy), zero)), n_at_least_1);
  return r;
}

namespace generic {
/// The unfused composition of sft_loss_backward (materialises softmax and the one-hot target).
template <tensor T>
T sft_loss_backward(const T& logits, const index_tensor_t<T>& labels, const sft_options& opt = {},
                    double grad_loss = 1.0) {
  using tr = tensor_traits<T>;
  const T x = detail::tempered(ops::upcast(logits), opt.temperature);  // z = logits / T
  const double vocab = static_cast<double>(ops::size(x, -1));
  const T valid = tr::index_not_equal(labels, opt.ignore_index, x);
  const auto safe = tr::index_replace(labels, opt.ignore_index, 0);
  const T lse = ops::unsqueeze(detail::logsumexp_unchecked(x), -1);  // [..., 1]
  const T p = detail::softmax_unchecked(x);                          // [..., V], precise at large |x|
  const T onehot = ops::one_hot(safe, ops::size(x, -1), x);          // [..., V]
  T d = ops::sub(p, ops::mul(onehot, 1.0 - opt.label_smoothing));
  if (opt.label_smoothing > 0.0) d = ops::sub(d, opt.label_smoothing / vocab);
  if (opt.dft)
    d = ops::mul(d, ops::unsqueeze(ops::exp(detail::token_logprobs_unchecked(x, labels, opt.ignore_index)), -1));
  if (opt.z_loss > 0.0) d = ops::add(d, ops::mul(ops::mul(p, lse), 2.0 * opt.z_loss));
  if (opt.temperature != 1.0) d = ops::div(d, opt.temperature);                                // dz/dlogits = 1/T
  const T w = ops::mul(aggregation_weights(valid, opt.reduction, opt.normalizer), grad_loss);  // [...]
  const T g = ops::where(ops::unsqueeze(valid, -1), ops::mul(d, ops::unsqueeze(w, -1)), 0.0);
  return ops::to_dtype(g, ops::dtype_of(logits));
}
}  // namespace generic

/// SFT cross-entropy backward: d loss / d logits [..., V] (in logits' dtype), times grad_loss.
///   dℓ_t/dx = softmax - (1-ε)·onehot(y) - ε/V           (cross-entropy with smoothing)
///             × sg(p[y]) with dft                        (the weight is a constant)
///             + 2z·lse·softmax                           (z-loss)
///             all of logits / T and times 1/T with a temperature
/// and d loss/dℓ_t are the aggregation weights. A backend with the fused ce_backward hook
/// (fused.hpp) computes it in one statistics pass and one gradient pass per row, with no [..., V]
/// temporaries; generic::sft_loss_backward (above) is the reference it is tested against. The fused result
/// is a plain tensor (no autograd graph).
template <tensor T>
T sft_loss_backward(const T& logits, const index_tensor_t<T>& labels, const sft_options& opt = {},
                    double grad_loss = 1.0) {
  detail::check_sft_inputs("sft_loss_backward", logits, labels, opt);
  detail::require_finite("sft_loss_backward", "grad_loss", grad_loss);
  using tr = tensor_traits<T>;
  if constexpr (has_fused_ce_backward<T>) {
    const T like = ops::upcast(ops::scalar_like(logits, 0.0));  // 0-d, compute dtype
    const T valid = tr::index_not_equal(labels, opt.ignore_index, like);
    const T w = ops::mul(aggregation_weights(valid, opt.reduction, opt.normalizer), grad_loss);  // [...]
    if (auto g = detail::try_fused_ce_backward(
            logits, labels, w,
            ce_backward_args{opt.ignore_index, opt.label_smoothing, opt.z_loss, opt.dft, opt.temperature}))
      return std::move(*g);
  }
  return generic::sft_loss_backward(logits, labels, opt, grad_loss);
}

}  // namespace posttrain
