// posttrain/losses/distill.hpp — token-level knowledge distillation from teacher and student logits.
//
//   student_logits x [..., V], teacher_logits y [..., V] (same vocabulary), temperature τ, and the
//   per-token divergence D_t of numerics/divergences.hpp (forward_kl, forward_cross_entropy,
//   reverse_kl, symmetric_kl, jsd; optional × τ²).
//   per-token loss ℓ_t = α·CE(x_t, label_t) + (1 - α)·D_t (Liger LigerFusedLinearDistillationBase with
//                  weight_hard_loss = α, weight_soft_loss = 1 - α; the hard CE uses the untempered logits)
//   loss = aggregate(ℓ, mask, reduction, normalizer)   mask = labels != ignore_index, or an explicit mask
// Example: one token, student [0, 0], teacher [0, ln 3], label 0, α = ½, forward_kl
// -> ½·ln 2 + ½·0.130812 = 0.411980 (CE of a uniform 2-way guess is ln 2).
//
// The divergence takes the backend's fused hook where there is one (one read of both logits, see
// numerics/divergences.hpp); the hard-label cross-entropy of α-mixing uses token_logprobs (one read)
// and the generic softmax - onehot gradient. posttrain::generic:: holds the unfused compositions of
// every entry point (the fused ones are tested against them).
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>
#include <utility>

#include "posttrain/detail/validate.hpp"
#include "posttrain/numerics/aggregate.hpp"
#include "posttrain/numerics/divergences.hpp"
#include "posttrain/numerics/logits.hpp"
#include "posttrain/tensor.hpp"

namespace posttrain {

struct distill_options {
  /// The divergence. forward_kl is Hinton's KD (the same student gradient as torchtune's default
  /// ForwardKLLoss); TRL's GKDTrainer and Liger default to jsd with beta 0.5.
  kd_divergence divergence = kd_divergence::forward_kl;
  /// jsd's β in [0, 1]: the teacher's weight in the mixture m (TRL GKD and Liger default 0.5).
  double beta = 0.5;
  /// symmetric_kl's r in [0, 1]: the forward KL's weight (torchtune sym_kl_ratio, default 0.5).
  double symmetric_ratio = 0.5;
  /// τ > 0 divides both logits before the softmax (Liger default 1; TRL GKD uses 0.9).
  double temperature = 1.0;
  /// Multiply the divergence by τ² (Hinton 2015, keeps gradient size independent of τ). Off, as Liger.
  bool scale_by_temperature_squared = false;
  /// α in [0, 1]: weight of the hard-label cross-entropy; the divergence gets 1 - α. Needs labels.
  double alpha = 0.0;
  /// Labels equal to this are masked out (and get no cross-entropy).
  std::int64_t ignore_index = default_ignore_index;
  /// How per-token losses become one number (token_mean: torchtune's and Liger's mean over valid tokens).
  aggregation reduction = aggregation::token_mean;
  /// Optional global count (tokens, sequences or a constant: see `aggregation`).
  std::optional<double> normalizer = std::nullopt;

  /// The divergence part (what kd_per_token reads).
  divergence_options divergence_part() const {
    return {divergence, beta, symmetric_ratio, temperature, scale_by_temperature_squared};
  }
  operator divergence_options() const { return divergence_part(); }
};

template <tensor T>
struct distill_result {
  T loss;            ///< 0-d: aggregate of ℓ (differentiable w.r.t. the student on autograd backends)
  T per_token_loss;  ///< [...]: ℓ_t, 0 at masked positions
  T kd_loss;         ///< 0-d: aggregate of the divergence term alone (before the 1 - α weight)
  T ce_loss;         ///< 0-d: aggregate of the hard-label cross-entropy (0 without labels)
  T num_tokens;      ///< 0-d: count of unmasked positions (detached)
};

namespace detail {

inline void check_distill_options(std::string_view fn, const distill_options& o) {
  check_divergence_options(fn, o.divergence_part());
  require_finite(fn, "options.alpha", o.alpha);
  if (o.alpha < 0.0 || o.alpha > 1.0) fail(fn, "options.alpha must be in [0, 1], got ", o.alpha);
  check_normalizer(fn, o.normalizer);
}

template <tensor T>
void check_distill_reduction(std::string_view fn, const T& student, const distill_options& o) {
  const bool per_sequence = o.reduction != aggregation::token_mean && o.reduction != aggregation::sum;
  if (per_sequence && ops::rank(student) != 3)
    fail(fn, "reduction ", aggregation_name(o.reduction), " needs student_logits [B, T, V], got shape ",
         shape_string(ops::shape(student)));
}

/// A 0/1 token mask [...] for logits [..., V] in the compute dtype `like`.
template <tensor T>
T checked_token_mask(std::string_view fn, const T& student, const T& mask, const T& like) {
  const dtype d = ops::dtype_of(mask);
  if (!is_floating(d) && d != dtype::boolean && !is_integer(d))
    fail(fn, "mask must be a 0/1 mask of a floating, integer or bool dtype, got ", dtype_name(d));
  require_same_device(fn, "student_logits", student, "mask", mask);
  shape_t expected = ops::shape(student);
  expected.pop_back();
  if (ops::shape(mask) != expected)
    fail(fn, "mask has shape ", shape_string(ops::shape(mask)), " but student_logits has shape ",
         shape_string(ops::shape(student)), "; expected mask of shape ", shape_string(expected));
  return ops::ne(d == ops::dtype_of(like) ? mask : ops::to_dtype(mask, ops::dtype_of(like)), 0.0);
}

/// The divergence computations a distillation entry composes: the dispatching ones (fused hook
/// where the backend has one) or the generic ones (posttrain::generic::distill_*).
struct kd_dispatching {
  template <tensor T>
  static T values(const T& s, const T& t, const divergence_options& o) {
    return kd_values_unchecked(s, t, o);
  }
  template <tensor T>
  static T grad(const T& s, const T& t, const T& w, const divergence_options& o) {
    return kd_grad_unchecked(s, t, w, o);
  }
};
struct kd_generic {
  template <tensor T>
  static T values(const T& s, const T& t, const divergence_options& o) {
    return kd_values_generic(s, t, o);
  }
  template <tensor T>
  static T grad(const T& s, const T& t, const T& w, const divergence_options& o) {
    return kd_grad_generic(s, t, w, o);
  }
};

/// Forward shared by the labelled and the masked entry: valid [...] 0/1, ce [...] or none.
template <class Kd, tensor T>
distill_result<T> distill_forward(const T& student, const T& teacher, const T& valid, const std::optional<T>& ce,
                                  const distill_options& o) {
  T kd = ops::where(valid, Kd::values(student, teacher, o.divergence_part()), 0.0);  // [...]
  T tok = o.alpha == 0.0 ? kd : ops::mul(kd, 1.0 - o.alpha);
  if (ce && o.alpha > 0.0) tok = ops::add(tok, ops::mul(*ce, o.alpha));
  tok = ops::where(valid, tok, 0.0);
  distill_result<T> r;
  r.per_token_loss = tok;
  r.loss = aggregate(tok, valid, o.reduction, o.normalizer);
  r.kd_loss = aggregate(kd, valid, o.reduction, o.normalizer);
  r.ce_loss = ce ? aggregate(ops::where(valid, *ce, 0.0), valid, o.reduction, o.normalizer) : ops::scalar_like(kd, 0.0);
  r.num_tokens = ops::detach(ops::sum_all(valid));
  return r;
}

/// d loss / d student_logits for the shared forward; `ce_grad` is d CE/dx [..., V] or none.
///   (1 - α)·w·d(scale·D)/dx + α·w·dCE/dx, w the aggregation weight (0 at masked rows).
template <class Kd, tensor T>
T distill_backward(const T& student, const T& teacher, const T& valid, const std::optional<T>& ce_grad,
                   const distill_options& o, double grad_loss) {
  const T w = ops::mul(aggregation_weights(valid, o.reduction, o.normalizer), grad_loss);  // [...]
  // Masked rows get weight 0 and so an exact 0 from the divergence's gradient.
  T g = Kd::grad(student, teacher, ops::where(valid, ops::mul(w, 1.0 - o.alpha), 0.0), o.divergence_part());
  if (ce_grad && o.alpha > 0.0)
    g = ops::add(
        g, ops::where(ops::unsqueeze(valid, -1), ops::mul(*ce_grad, ops::unsqueeze(ops::mul(w, o.alpha), -1)), 0.0));
  return same_dtype_or_cast(std::move(g), ops::dtype_of(student));
}

template <class Kd, tensor T>
distill_result<T> distill_loss_impl(const T& student_logits, const T& teacher_logits, const index_tensor_t<T>& labels,
                                    const distill_options& opt) {
  constexpr std::string_view fn = "distill_loss";
  check_distill_options(fn, opt);
  check_distill_logits(fn, student_logits, teacher_logits);
  require_labels(fn, student_logits, labels, opt.ignore_index, "student_logits", "labels");
  check_distill_reduction(fn, student_logits, opt);
  const T x = ops::upcast(student_logits);
  const T valid = tensor_traits<T>::index_not_equal(labels, opt.ignore_index, x);
  const T ce = ops::neg(token_logprobs_unchecked(x, labels, opt.ignore_index));  // -log p(label), 0 where ignored
  return distill_forward<Kd>(student_logits, teacher_logits, valid, std::optional<T>(ce), opt);
}

template <class Kd, tensor T>
T distill_loss_backward_impl(const T& student_logits, const T& teacher_logits, const index_tensor_t<T>& labels,
                             const distill_options& opt, double grad_loss) {
  constexpr std::string_view fn = "distill_loss_backward";
  check_distill_options(fn, opt);
  check_distill_logits(fn, student_logits, teacher_logits);
  require_labels(fn, student_logits, labels, opt.ignore_index, "student_logits", "labels");
  check_distill_reduction(fn, student_logits, opt);
  require_finite(fn, "grad_loss", grad_loss);
  const T x = ops::upcast(student_logits);
  const T valid = tensor_traits<T>::index_not_equal(labels, opt.ignore_index, x);
  std::optional<T> ce_grad;
  if (opt.alpha > 0.0) {
    const auto safe = tensor_traits<T>::index_replace(labels, opt.ignore_index, 0);
    ce_grad = ops::sub(softmax_unchecked(x), ops::one_hot(safe, ops::size(x, -1), x));  // d(-log p_y)/dx
  }
  return distill_backward<Kd>(student_logits, teacher_logits, valid, ce_grad, opt, grad_loss);
}

template <class Kd, tensor T>
distill_result<T> distill_loss_masked_impl(const T& student_logits, const T& teacher_logits, const T& mask,
                                           const distill_options& opt) {
  constexpr std::string_view fn = "distill_loss_masked";
  check_distill_options(fn, opt);
  if (opt.alpha != 0.0) fail(fn, "options.alpha must be 0 without labels (got ", opt.alpha, ")");
  check_distill_logits(fn, student_logits, teacher_logits);
  check_distill_reduction(fn, student_logits, opt);
  const T valid = checked_token_mask(fn, student_logits, mask, ops::upcast(student_logits));
  return distill_forward<Kd>(student_logits, teacher_logits, valid, std::optional<T>(), opt);
}

template <class Kd, tensor T>
T distill_loss_masked_backward_impl(const T& student_logits, const T& teacher_logits, const T& mask,
                                    const distill_options& opt, double grad_loss) {
  constexpr std::string_view fn = "distill_loss_masked_backward";
  check_distill_options(fn, opt);
  if (opt.alpha != 0.0) fail(fn, "options.alpha must be 0 without labels (got ", opt.alpha, ")");
  check_distill_logits(fn, student_logits, teacher_logits);
  check_distill_reduction(fn, student_logits, opt);
  require_finite(fn, "grad_loss", grad_loss);
  const T valid = checked_token_mask(fn, student_logits, mask, ops::upcast(student_logits));
  return distill_backward<Kd>(student_logits, teacher_logits, valid, std::optional<T>(), opt, grad_loss);
}

}  // namespace detail

/// Distillation loss with hard labels [...] (labels != ignore_index is the token mask):
/// ℓ_t = α·CE(student_logits_t, label_t) + (1 - α)·D_t, aggregated by `reduction`.
/// student_logits, teacher_logits: [..., V] ([B, T, V] for the sequence modes).
/// Example: one token, student [0, 0], teacher [0, ln 3], label 0, α = ½, forward_kl
/// -> ½·ln 2 + ½·0.130812 = 0.411980 (CE of a uniform 2-way guess is ln 2).
template <tensor T>
distill_result<T> distill_loss(const T& student_logits, const T& teacher_logits, const index_tensor_t<T>& labels,
                               const distill_options& opt = {}) {
  return detail::distill_loss_impl<detail::kd_dispatching>(student_logits, teacher_logits, labels, opt);
}

/// d distill_loss / d student_logits [..., V] (student logits' dtype), times grad_loss:
///   (1 - α)(× τ²)/τ · dD/ds + α (softmax(x) - onehot(label)), times the aggregation weight.
template <tensor T>
T distill_loss_backward(const T& student_logits, const T& teacher_logits, const index_tensor_t<T>& labels,
                        const distill_options& opt = {}, double grad_loss = 1.0) {
  return detail::distill_loss_backward_impl<detail::kd_dispatching>(student_logits, teacher_logits, labels, opt,
                                                                    grad_loss);
}

/// Distillation loss under an explicit token mask [...] (on-policy distillation, where there are no
/// labels): ℓ_t = D_t. options.alpha must be 0 (there is no hard label to mix).
template <tensor T>
distill_result<T> distill_loss_masked(const T& student_logits, const T& teacher_logits, const T& mask,
                                      const distill_options& opt = {}) {
  return detail::distill_loss_masked_impl<detail::kd_dispatching>(student_logits, teacher_logits, mask, opt);
}

/// d distill_loss_masked / d student_logits [..., V], times grad_loss.
template <tensor T>
T distill_loss_masked_backward(const T& student_logits, const T& teacher_logits, const T& mask,
                               const distill_options& opt = {}, double grad_loss = 1.0) {
  return detail::distill_loss_masked_backward_impl<detail::kd_dispatching>(student_logits, teacher_logits, mask, opt,
                                                                           grad_loss);
}

/// The unfused compositions of every entry point above (the reference the fused path is tested
/// against; any backend gets these when it has no kd hooks).
namespace generic {
template <tensor T>
distill_result<T> distill_loss(const T& student_logits, const T& teacher_logits, const index_tensor_t<T>& labels,
                               const distill_options& opt = {}) {
  return detail::distill_loss_impl<detail::kd_generic>(student_logits, teacher_logits, labels, opt);
}
template <tensor T>
T distill_loss_backward(const T& student_logits, const T& teacher_logits, const index_tensor_t<T>& labels,
                        const distill_options& opt = {}, double grad_loss = 1.0) {
  return detail::distill_loss_backward_impl<detail::kd_generic>(student_logits, teacher_logits, labels, opt, grad_loss);
}
template <tensor T>
distill_result<T> distill_loss_masked(const T& student_logits, const T& teacher_logits, const T& mask,
                                      const distill_options& opt = {}) {
  return detail::distill_loss_masked_impl<detail::kd_generic>(student_logits, teacher_logits, mask, opt);
}
template <tensor T>
T distill_loss_masked_backward(const T& student_logits, const T& teacher_logits, const T& mask,
                               const distill_options& opt = {}, double grad_loss = 1.0) {
  return detail::distill_loss_masked_backward_impl<detail::kd_generic>(student_logits, teacher_logits, mask, opt,
                                                                       grad_loss);
}
}  // namespace generic

}  // namespace posttrain
