// posttrain/fused.hpp — the optional fused hooks a backend may provide, in one place.
//
// Every algorithm is written once against the tensor concept (tensor.hpp). A few composite
// primitives dominate the cost of post-training (they read the [N, V] logits), so a backend may
// override them with a fused version by specialising `posttrain::fused_ops<T>` (the primary
// template is empty: no hooks). Each hook is named by a concept below and called from exactly one
// place, a `detail::try_fused_*` function of this header: the priority chain is "the backend's hook
// if it has one and takes this input, else the generic composition", written once.
//
// A hook returns std::optional: an empty optional says "not this input" (a device, a layout, a
// dtype or a recording autograd graph the fused code does not handle), and the caller falls back
// to its generic composition itself. A hook never calls back into numerics/ or losses/ entry points.
//
// Hooks (all optional; every input has already been validated by the public entry):
//   logits_stats(logits [..., V], labels [...] or null, logits_stats_request) -> logits_row_stats<T>
//       one read of each row: logsumexp, log p[label] (0 where label == ignore_index), entropy,
//       and whether the row's first argmax is the label (0/1, detached; 0 where ignored). Only the
//       requested fields are filled. lse, logprob and entropy are differentiable on autograd
//       backends (one node for all three). With request.temperature T != 1 every statistic is of
//       logits / T (the argmax is unchanged), and gradients reach the raw logits with the chain
//       rule's 1/T; a hook applies 1/T inside its pass (no [N, V] copy of logits / T).
//       T == 1 must take exactly the untempered path.
//   ce_backward(logits, labels, row_weights [...], ce_backward_args) -> d loss / d logits
//       sft_loss_backward's gradient in the logits' dtype (no autograd graph); with
//       args.temperature T the cross-entropy is of logits / T and the gradient carries 1/T.
//   sft(logits, labels, sft_fused_request) -> sft_fused_outputs<T>
//       the whole of sft_loss in its plain form (no label smoothing, z-loss or DFT; reduction
//       token_mean or sum): loss = c·Σ_t -log p_t[y_t] over counted tokens (c = 1/max(n, 1), or the
//       request's constant), the per-token losses (0 where ignored), the count, the accuracy and the
//       mean entropy, from one read per row; on autograd backends loss and per-token loss are
//       differentiable through one node whose backward writes d/dlogits in one pass per row.
//       Exists to cut the per-call overhead of the generic composition (~35 tensor ops) on small
//       batches; the generic composition is what it is tested against.
//   kd_per_token(student, teacher, fused_kd_spec) -> scale·D [...]          (numerics/divergences.hpp)
//   kd_backward(student, teacher, row_weight [...], fused_kd_spec) -> row_weight·d(scale·D)/d student
//   `static constexpr bool reads_half = true`: the logits hooks take bfloat16/float16 logits as
//       they are (computing in float32, returning float32) instead of an upcast copy.
// The generic compositions (posttrain::generic::...) stay callable and are what the fused hooks are
// tested against; tests/eigen/test_archetype.cpp shows with a recording backend which path ran.
#pragma once

#include <concepts>
#include <cstdint>
#include <optional>

#include "posttrain/tensor.hpp"

namespace posttrain {

/// Customisation point: specialise for a backend's tensor type to provide fused hooks.
template <class T>
struct fused_ops {};

/// Which outputs of the one-pass logits hook a caller needs (the rest may be skipped).
struct logits_stats_request {
  bool logsumexp = false;
  bool logprob = false;  ///< needs labels
  bool entropy = false;
  bool argmax_hit = false;  ///< needs labels
  std::int64_t ignore_index = -100;
  /// T (finite, > 0, validated by the public entry): the statistics are of logits / T, as TRL's
  /// `logits /= self.temperature` (GRPOTrainer._get_per_token_logps) and verl's
  /// `logits.div_(temperature)`; 1 = none.
  double temperature = 1.0;
  /// Permission for an autograd backend to write the gradient w.r.t. the logits into the logits' own
  /// storage during the backward (the logits are consumed; no [..., V] gradient is allocated). A
  /// hook may ignore it (then the logits are left alone). See sft_options::in_place_gradient.
  bool gradient_in_place = false;
};

/// Per-row results of the one-pass logits hook, each [...]; unrequested fields are left empty.
template <class T>
struct logits_row_stats {
  T logsumexp;   ///< log Σ_v e^{x_v}
  T logprob;     ///< log softmax(x)[label], 0 where label == ignore_index
  T entropy;     ///< -Σ_v p_v log p_v (-inf logits contribute 0)
  T argmax_hit;  ///< 1 where the first argmax of the row is the label, else 0 (detached)
};

/// The options of sft_loss_backward that the ce_backward hook needs.
struct ce_backward_args {
  std::int64_t ignore_index;  ///< rows with this label get a zero gradient
  double label_smoothing;     ///< ε
  double z_loss;              ///< z (PaLM's z·lse²)
  bool dft;                   ///< weight each row by its detached p[label]
  double temperature = 1.0;   ///< T: the cross-entropy of logits / T (gradient × 1/T); 1 = none
};

/// The plain sft_loss the sft hook computes (losses/sft.hpp checks the options before asking).
struct sft_fused_request {
  std::int64_t ignore_index = -100;
  double temperature = 1.0;  ///< T: the cross-entropy of logits / T
  /// true: loss = Σ ℓ_t / max(n, 1) (token_mean, no normalizer); false: loss = weight·Σ ℓ_t.
  bool divide_by_count = true;
  double weight = 1.0;             ///< the constant of the second form (1/normalizer, or 1 for sum)
  bool gradient_in_place = false;  ///< sft_options::in_place_gradient
};

/// The sft hook's outputs (losses/sft.hpp's sft_result, field for field).
template <class T>
struct sft_fused_outputs {
  T loss, per_token_loss, num_tokens, token_accuracy, entropy;
};

/// The per-token divergences the fused distillation hooks cover (JSD with 0 < β < 1 stays on the
/// generic path: its log-mixture log(β p + (1-β) q) needs p and q normalised, a second read).
enum class fused_kd_kind {
  forward_kl,             ///< KL(p_teacher || q_student)
  forward_cross_entropy,  ///< -Σ p log q
  reverse_kl,             ///< KL(q || p)
  symmetric_kl,           ///< r·KL(p || q) + (1 - r)·KL(q || p)
};

/// Divergence, symmetric ratio r, temperature τ (both logits divided by τ) and a factor on the
/// result (τ² or 1). The backward is d(scale·D)/d student_logits = scale/τ · dD/ds.
struct fused_kd_spec {
  fused_kd_kind kind = fused_kd_kind::forward_kl;
  double symmetric_ratio = 0.5;
  double temperature = 1.0;
  double scale = 1.0;
};

// ---- the named hooks ---------------------------------------------------------------------------

template <class T>
concept has_fused_logits_stats = tensor<T> &&
    requires(const T& x, const index_tensor_t<T>* labels, const logits_stats_request& q) {
  { fused_ops<T>::logits_stats(x, labels, q) } -> std::same_as<std::optional<logits_row_stats<T>>>;
};

template <class T>
concept has_fused_ce_backward = tensor<T> &&
    requires(const T& x, const index_tensor_t<T>& labels, const ce_backward_args& a) {
  { fused_ops<T>::ce_backward(x, labels, x, a) } -> std::same_as<std::optional<T>>;
};

template <class T>
concept has_fused_sft = tensor<T> && requires(const T& x, const index_tensor_t<T>& labels, const sft_fused_request& q) {
  { fused_ops<T>::sft(x, labels, q) } -> std::same_as<std::optional<sft_fused_outputs<T>>>;
};

template <class T>
concept has_fused_kd = tensor<T> && requires(const T& x, const fused_kd_spec& spec) {
  { fused_ops<T>::kd_per_token(x, x, spec) } -> std::same_as<std::optional<T>>;
  { fused_ops<T>::kd_backward(x, x, x, spec) } -> std::same_as<std::optional<T>>;
};

/// The backend's logits hooks read bfloat16/float16 logits themselves.
template <class T>
concept fused_reads_half = requires {
  requires fused_ops<T>::reads_half;
};

namespace detail {

/// The logits a fused hook receives: half inputs are upcast to a float32 copy first, unless the
/// backend's hooks read half tensors themselves.
template <tensor T>
T fused_input(const T& logits) {
  if constexpr (fused_reads_half<T>)
    return logits;
  else
    return ops::upcast(logits);
}

// The single place each hook is detected and called. Empty: use the generic composition.

template <tensor T>
std::optional<logits_row_stats<T>> try_fused_logits_stats(const T& logits, const index_tensor_t<T>* labels,
                                                          const logits_stats_request& q) {
  if constexpr (has_fused_logits_stats<T>)
    return fused_ops<T>::logits_stats(fused_input(logits), labels, q);
  else
    return std::nullopt;
}

template <tensor T>
std::optional<T> try_fused_ce_backward(const T& logits, const index_tensor_t<T>& labels, const T& row_weights,
                                       const ce_backward_args& a) {
  if constexpr (has_fused_ce_backward<T>)
    return fused_ops<T>::ce_backward(logits, labels, row_weights, a);
  else
    return std::nullopt;
}

template <tensor T>
std::optional<sft_fused_outputs<T>> try_fused_sft(const T& logits, const index_tensor_t<T>& labels,
                                                  const sft_fused_request& q) {
  if constexpr (has_fused_sft<T>)
    return fused_ops<T>::sft(logits, labels, q);
  else
    return std::nullopt;
}

template <tensor T>
std::optional<T> try_fused_kd_per_token(const T& student, const T& teacher, const fused_kd_spec& spec) {
  if constexpr (has_fused_kd<T>)
    return fused_ops<T>::kd_per_token(student, teacher, spec);
  else
    return std::nullopt;
}

template <tensor T>
std::optional<T> try_fused_kd_backward(const T& student, const T& teacher, const T& row_weight,
                                       const fused_kd_spec& spec) {
  if constexpr (has_fused_kd<T>)
    return fused_ops<T>::kd_backward(student, teacher, row_weight, spec);
  else
    return std::nullopt;
}

}  // namespace detail
}  // namespace posttrain
