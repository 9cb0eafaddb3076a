// posttrain/losses/fused_linear_ce.hpp — fused linear cross-entropy: LM head + SFT loss without
// the [N, V] logits.
//
//   hidden X [..., H], head W [V, H] (the LM head, as nn.Linear(H, V).weight), labels y [...]
//   logits  z_t = W·x_t / τ                                              (never materialised whole;
//                                                                         τ = temperature, default 1)
//   ℓ_t  = (1-ε)(lse_t - z_t[y_t]) + ε(lse_t - mean_v z_t[v]) + z·lse_t²  (PyTorch cross_entropy with
//          label_smoothing; PaLM z-loss, arXiv:2204.02311 §5); 0 where y_t = ignore_index
//   loss = Σ_t ℓ_t / n   token_mean: n = normalizer or the count of non-ignored labels (0 if none)
//          Σ_t ℓ_t / n   sum:        n = normalizer or 1
// Same value as sft_loss(X·Wᵀ, y, {ignore_index, label_smoothing, z_loss, reduction, normalizer, temperature})
// (no DFT, no sequence reductions). Rows are processed `chunk_rows` at a time, gradients with
// respect to X and W computed in the same pass (Liger's scheme: kernels/linear_ce_cpu.hpp), so
// peak extra memory is O(chunk_rows · V) beside the gradients themselves.
// Per-token outputs, all [...] and forward-only (no gradient flows from them; only `loss` is
// differentiable): per_token_loss ℓ_t, logprobs log softmax(z_t)[y_t] (0 at ignored tokens), and
// entropy -Σ_v p_tv log p_tv (every token). The RL losses' log-probs and entropy can be read here
// but their gradients need the unfused path (token_logprobs / entropy on the logits).
// Example: X = [[0, 0]], W any [4, 2], label 0 -> logits [0, 0, 0, 0] -> loss log 4 = 1.386294.
//
// This header holds the options, results and input checks (generic). The computation needs a matmul,
// which the tensor concept does not have, so each backend provides the entry points:
// Eigen (its backend's eigen/fused_linear_ce.hpp, through the umbrella header): fused_linear_cross_entropy(...)
// (forward) and fused_linear_cross_entropy_and_grad(...) (+ ∂loss/∂X, ∂loss/∂W times grad_loss).
// LibTorch (torch/fused_linear_ce.hpp, likewise): an autograd function, so loss.backward() works.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

#include "posttrain/detail/validate.hpp"
#include "posttrain/numerics/aggregate.hpp"
#include "posttrain/numerics/logits.hpp"
#include "posttrain/tensor.hpp"

namespace posttrain {

struct fused_linear_ce_options {
  /// Labels equal to this are skipped (PyTorch and Hugging Face: -100).
  std::int64_t ignore_index = default_ignore_index;
  /// ε in [0, 1): mixes the target with the uniform distribution, as torch cross_entropy.
  double label_smoothing = 0.0;
  /// PaLM's auxiliary z-loss coefficient; 0 disables it.
  double z_loss = 0.0;
  /// token_mean (PyTorch "mean") or sum; the sequence modes are not supported here.
  aggregation reduction = aggregation::token_mean;
  /// Optional global divisor (TRL's num_items_in_batch for token_mean).
  std::optional<double> normalizer = std::nullopt;
  /// Rows per chunk (> 0); unset: kernels::default_chunk_rows(V, element size) (~64 MiB of logits).
  std::optional<std::int64_t> chunk_rows = std::nullopt;
  /// τ, finite and > 0: the logits are X·Wᵀ / τ (as fused_linear_logprobs and sft_loss's temperature;
  /// the gradients carry 1/τ); 1 = none.
  double temperature = 1.0;
};

template <tensor T>
struct fused_linear_ce_result {
  T loss;            ///< 0-d: the reduced loss (differentiable on autograd backends)
  T num_tokens;      ///< 0-d: count of labels != ignore_index
  T per_token_loss;  ///< [...]: ℓ_t, 0 at ignored tokens (forward-only)
  T logprobs;        ///< [...]: log p_t[y_t], 0 at ignored tokens (forward-only)
  T entropy;         ///< [...]: entropy of every token's distribution (forward-only)
};

template <tensor T>
struct fused_linear_ce_gradients {
  fused_linear_ce_result<T> result;
  T grad_hidden;  ///< [..., H]: grad_loss · ∂loss/∂hidden
  T grad_head;    ///< [V, H]:   grad_loss · ∂loss/∂head
};

namespace detail {

inline void check_fused_linear_ce_options(std::string_view fn, const fused_linear_ce_options& o) {
  require_finite(fn, "options.label_smoothing", o.label_smoothing);
  require_finite(fn, "options.z_loss", o.z_loss);
  if (o.label_smoothing < 0.0 || o.label_smoothing >= 1.0)
    fail(fn, "options.label_smoothing must be in [0, 1), got ", o.label_smoothing);
  if (o.z_loss < 0.0) fail(fn, "options.z_loss must be >= 0, got ", o.z_loss);
  if (o.reduction != aggregation::token_mean && o.reduction != aggregation::sum)
    fail(fn, "options.reduction must be token-mean or sum, got ", aggregation_name(o.reduction));
  check_normalizer(fn, o.normalizer);
  if (o.chunk_rows && *o.chunk_rows <= 0) fail(fn, "options.chunk_rows must be > 0, got ", *o.chunk_rows);
  require_temperature(fn, "options.temperature", o.temperature);
}

/// hidden [..., H] and head [V, H]: floating, non-empty, same dtype and device; labels [...] integer,
/// each in [0, V) or ignore_index. (Shared with losses/fused_linear_logprobs.hpp.)
template <tensor T>
void check_fused_linear_inputs(std::string_view fn, const T& hidden, const T& head, const index_tensor_t<T>& labels,
                               std::int64_t ignore_index) {
  using tr = tensor_traits<T>;
  require_values(fn, "hidden", hidden);
  require_values(fn, "head", head);
  require_rank(fn, "hidden", hidden, 2, 8);
  require_rank(fn, "head", head, 2, 2);
  require_same_dtype(fn, "hidden", hidden, "head", head);
  require_same_device(fn, "hidden", hidden, "head", head);
  const shape_t hs = ops::shape(hidden), ws = ops::shape(head);
  if (ws[1] != hs.back())
    fail(fn, "head has shape ", shape_string(ws), " but hidden has shape ", shape_string(hs),
         "; expected head of shape [V, ", hs.back(), "]");
  require_index<T>(fn, "labels", labels);
  if (tr::index_device(labels) != ops::device(hidden))
    fail(fn, "labels is on device ", tr::index_device(labels), " but hidden is on ", ops::device(hidden));
  shape_t expected = hs;
  expected.pop_back();
  if (tr::index_shape(labels) != expected)
    fail(fn, "labels has shape ", shape_string(tr::index_shape(labels)), " but hidden has shape ", shape_string(hs),
         "; expected labels of shape ", shape_string(expected));
  if (!read_label_values(tr::index_device(labels))) return;  // label_checks.hpp: no host transfer
  const std::int64_t bad = tr::index_count_outside(labels, 0, ws[0], ignore_index);
  if (bad > 0)
    fail(fn, "labels has ", bad, " value(s) outside [0, ", ws[0], ") (the head's rows) that are not ignore_index (",
         ignore_index, ")");
}

template <tensor T>
void check_fused_linear_ce(std::string_view fn, const T& hidden, const T& head, const index_tensor_t<T>& labels,
                           const fused_linear_ce_options& o) {
  check_fused_linear_ce_options(fn, o);
  check_fused_linear_inputs(fn, hidden, head, labels, o.ignore_index);
}

/// d loss / d ℓ_t for every counted token: 1/n (see the file comment for n).
inline double fused_linear_ce_weight(const fused_linear_ce_options& o, std::int64_t num_valid) {
  if (o.normalizer) return 1.0 / *o.normalizer;
  if (o.reduction == aggregation::sum) return 1.0;
  return num_valid > 0 ? 1.0 / static_cast<double>(num_valid) : 0.0;
}

}  // namespace detail

}  // namespace posttrain
