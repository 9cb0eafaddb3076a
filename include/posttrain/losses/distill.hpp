// posttrain/losses/distill.hpp — token-level knowledge distillation from teacher and student logits.
//
//   student_logits x [..., V], teacher_logits y [..., V] (same vocabulary), temperature τ:
//   q = softmax(x / τ) (student), p = softmax(y / τ) (teacher), per-token divergence D_t:
//     forward_kl             KL(p || q) = Σ_v p_v (log p_v - log q_v)          (Hinton et al. 2015, arXiv:1503.02531)
//     forward_cross_entropy  -Σ_v p_v log q_v = KL(p || q) + H(p)     (torchtune ForwardKLLoss, OpenRLHF KDLoss: they
//                            call it "forward KL"; it differs from the KL by the teacher entropy, a constant in x)
//     reverse_kl             KL(q || p) = Σ_v q_v (log q_v - log p_v)          (torchtune ReverseKLLoss; MiniLLM)
//     symmetric_kl           r·KL(p || q) + (1 - r)·KL(q || p)     (torchtune SymmetricKLLoss, sym_kl_ratio r;
//     torchtune
//                            uses the cross-entropy form for its forward half, so its value is ours + r·H(p))
//     jsd                    β·KL(p || m) + (1 - β)·KL(q || m), m = β p + (1 - β) q, computed in log space
//                            (generalised JSD: GKD, arXiv:2306.13649 eq. 1; TRL generalized_jsd_loss, Liger
//                            LigerJSD). β = 0 is KL(p || q) and β = 1 is KL(q || p), as both frameworks define
//                            the endpoints (the mixture form vanishes there; JSD_β/β -> KL(p||q) as β -> 0).
//   optional × τ² (Hinton's gradient-scale correction; Liger and torchtune do not scale).
//   per-token loss ℓ_t = α·CE(x_t, label_t) + (1 - α)·D_t (Liger LigerFusedLinearDistillationBase with
//                  weight_hard_loss = α, weight_soft_loss = 1 - α; the hard CE uses the untempered logits)
//   loss = aggregate(ℓ, mask, reduction, normalizer)   mask = labels != ignore_index, or an explicit mask
//
// Vocabulary padding: columns with logit -inf carry probability 0 and contribute 0 (0·log 0 := 0), so
// padding -inf on both sides gives the divergence over the remaining vocabulary. A column with mass on
// one side and -inf on the other makes the divergences that put that side first (KL(p||q) when the
// student is -inf where the teacher is not) +inf, their true value; torchtune instead drops such
// columns. The JSD stays finite (m covers both). No input gives NaN.
// Example: student [0, 0], teacher [0, ln 3] -> KL(p||q) = ¼ln(½) + ¾ln(3/2) = 0.130812.
//
// Fused path: a backend with tensor_traits<T>::fused_kd_per_token / fused_kd_backward (the Eigen
// backend, through kernels/distill_cpu.hpp: one read of each row of both logits) computes the
// divergence and its student gradient for forward_kl, forward_cross_entropy, reverse_kl,
// symmetric_kl and jsd at β = 0 or 1; jsd with 0 < β < 1 stays on the generic composition (its
// log-mixture needs normalised p and q). The hard-label cross-entropy of α-mixing always uses
// token_logprobs (itself fused on such backends) and the generic softmax - onehot gradient.
// posttrain::generic:: holds the unfused versions of every entry point (the fused ones are tested
// against them). LibTorch: backends/torch_distill.hpp (the kernel for contiguous CPU float32/64).
#pragma once

#include <cmath>
#include <concepts>
#include <cstdint>
#include <limits>
#include <optional>
#include <string_view>
#include <utility>

#include "posttrain/detail/kd_fused.hpp"
#include "posttrain/detail/validate.hpp"
#include "posttrain/numerics/aggregate.hpp"
#include "posttrain/numerics/logits.hpp"
#include "posttrain/tensor.hpp"

namespace posttrain {

enum class kd_divergence {
  forward_kl,             ///< KL(teacher || student), the true divergence
  forward_cross_entropy,  ///< -Σ p_T log p_S: torchtune's and OpenRLHF's "forward KL"
  reverse_kl,             ///< KL(student || teacher)
  symmetric_kl,           ///< r·KL(T||S) + (1-r)·KL(S||T) (torchtune SymmetricKLLoss, ratio r)
  jsd,                    ///< generalised Jensen-Shannon with beta (TRL GKD, Liger JSD)
};

constexpr const char* kd_divergence_name(kd_divergence d) {
  switch (d) {
    case kd_divergence::forward_kl: return "forward_kl";
    case kd_divergence::forward_cross_entropy: return "forward_cross_entropy";
    case kd_divergence::reverse_kl: return "reverse_kl";
    case kd_divergence::symmetric_kl: return "symmetric_kl";
    case kd_divergence::jsd: return "jsd";
  }
  return "?";
}

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
  require_finite(fn, "options.beta", o.beta);
  require_finite(fn, "options.symmetric_ratio", o.symmetric_ratio);
  require_finite(fn, "options.temperature", o.temperature);
  require_finite(fn, "options.alpha", o.alpha);
  if (o.beta < 0.0 || o.beta > 1.0) fail(fn, "options.beta must be in [0, 1], got ", o.beta);
  if (o.symmetric_ratio < 0.0 || o.symmetric_ratio > 1.0)
    fail(fn, "options.symmetric_ratio must be in [0, 1], got ", o.symmetric_ratio);
  if (o.temperature <= 0.0) fail(fn, "options.temperature must be > 0, got ", o.temperature);
  if (o.alpha < 0.0 || o.alpha > 1.0) fail(fn, "options.alpha must be in [0, 1], got ", o.alpha);
  check_normalizer(fn, o.normalizer);
}

/// student_logits [..., V] and teacher_logits [..., V]: floating, same device, same shape (the
/// vocabulary named on its own when only it differs). The teacher may have another float dtype.
template <tensor T>
void check_distill_logits(std::string_view fn, const T& student, const T& teacher) {
  require_logits(fn, "student_logits", student);
  require_logits(fn, "teacher_logits", teacher);
  require_same_device(fn, "student_logits", student, "teacher_logits", teacher);
  const shape_t s = ops::shape(student), t = ops::shape(teacher);
  if (s.size() == t.size() && s.back() != t.back() &&
      shape_t(s.begin(), s.end() - 1) == shape_t(t.begin(), t.end() - 1))
    fail(fn, "teacher_logits has vocabulary size ", t.back(), " but student_logits has ", s.back(), " (shapes ",
         shape_string(t), " and ", shape_string(s), "); they must share one vocabulary");
  require_same_shape(fn, "student_logits", student, "teacher_logits", teacher);
}

/// log-probabilities and probabilities of one side, logs sanitised to 0 where the probability is 0
/// (so no -inf reaches a product or its gradient), and the 0/1 support.
template <tensor T>
struct kd_side {
  T logp, p, support;
};
template <tensor T>
kd_side<T> kd_softmax(const T& z) {
  const double inf = std::numeric_limits<double>::infinity();
  const T zs = shift_by_row_max(z);                                // keeps float32 precise at large |z|
  const T logp = ops::sub(zs, ops::unsqueeze(logsumexp(zs), -1));  // [..., V], -inf at padding
  const T support = ops::gt(z, -inf);
  return {ops::where(support, logp, 0.0), ops::exp(logp), support};
}

/// +inf where some column has mass under `a` but not under `b` (KL(a || b) = +inf there), else 0: [...].
template <tensor T>
T kd_infinite_rows(const kd_side<T>& a, const kd_side<T>& b) {
  const T uncovered = ops::sum(ops::mul(a.support, ops::sub(1.0, b.support)), -1);  // [...]
  return ops::where(ops::gt(uncovered, 0.0), std::numeric_limits<double>::infinity(), ops::full_like(uncovered, 0.0));
}

/// Σ_v a_v (log a_v - log b_v) over the columns where a has mass (the finite part): [...].
template <tensor T>
T kd_kl_finite(const kd_side<T>& a, const kd_side<T>& b) {
  return ops::sum(ops::mul(a.p, ops::sub(a.logp, b.logp)), -1);
}

/// log m = log(β p + (1 - β) q), elementwise in log space, β in (0, 1): [..., V]; 0 where p = q = 0
/// (never read: both weights there are 0). The shift is detached (it cancels in value and gradient).
template <tensor T>
T kd_log_mixture(const kd_side<T>& p, const kd_side<T>& q, double beta) {
  const double inf = std::numeric_limits<double>::infinity();
  const T a = ops::where(p.support, ops::add(p.logp, std::log(beta)), -inf);     // log β p
  const T b = ops::where(q.support, ops::add(q.logp, std::log1p(-beta)), -inf);  // log (1-β) q
  const T hi = ops::detach(ops::maximum(a, b));                                  // [..., V]
  const T hi_safe = ops::where(ops::eq(hi, -inf), 0.0, hi);
  const T ea = ops::exp(ops::where(p.support, ops::sub(a, hi_safe), -inf));  // exp(-inf) = 0, no 0·inf
  const T eb = ops::exp(ops::where(q.support, ops::sub(b, hi_safe), -inf));
  const T s = ops::add(ea, eb);  // in [1, 2], or 0
  return ops::add(hi_safe, ops::log(ops::where(ops::gt(s, 0.0), s, 1.0)));
}

/// The per-token divergence D_t on tempered logits s (student) and t (teacher), and, with
/// `want_grad`, its analytic gradient dD/ds [..., V]. Derivations (q = softmax(s)):
///   d KL(p||q)/ds = q - p;   d(-Σ p log q)/ds = q - p (Σ p = 1)
///   d KL(q||p)/ds_v = q_v (log q_v - log p_v - KL(q||p))           (softmax Jacobian)
///   d JSD_β/dq_v = (1-β)(log q_v - log m_v) (the β p/m and (1-β) q/m terms sum to 1 and cancel the
///   +1 of d(q log q)), so dJSD_β/ds_v = (1-β) q_v (log q_v - log m_v - Σ_u q_u (log q_u - log m_u)).
template <tensor T>
struct kd_value_grad {
  T value, grad;
};
template <tensor T>
kd_value_grad<T> kd_divergence_parts(const T& s, const T& t, const distill_options& o, bool want_grad) {
  const kd_side<T> q = kd_softmax(s), p = kd_softmax(t);
  kd_value_grad<T> r;
  const auto forward = [&] {  // KL(p || q)
    return ops::add(kd_kl_finite(p, q), kd_infinite_rows(p, q));
  };
  const auto reverse = [&] {  // KL(q || p)
    return ops::add(kd_kl_finite(q, p), kd_infinite_rows(q, p));
  };
  const auto reverse_grad = [&] {  // q (d - KL(q||p)), finite part
    const T d = ops::sub(q.logp, p.logp);
    return ops::mul(q.p, ops::sub(d, ops::sum(ops::mul(q.p, d), -1, true)));
  };
  switch (o.divergence) {
    case kd_divergence::forward_kl:
      r.value = forward();
      if (want_grad) r.grad = ops::sub(q.p, p.p);
      break;
    case kd_divergence::forward_cross_entropy:
      // -Σ p log q (torchtune ForwardKLLoss)
      r.value = ops::add(ops::neg(ops::sum(ops::mul(p.p, q.logp), -1)), kd_infinite_rows(p, q));
      if (want_grad) r.grad = ops::sub(q.p, p.p);
      break;
    case kd_divergence::reverse_kl:
      r.value = reverse();
      if (want_grad) r.grad = reverse_grad();
      break;
    case kd_divergence::symmetric_kl: {
      // torchtune SymmetricKLLoss: r·forward + (1 - r)·reverse
      const double w = o.symmetric_ratio;
      // A term of weight 0 is left out: 0·(+inf) would be NaN where that KL is infinite.
      r.value = w == 1.0   ? forward()
                : w == 0.0 ? reverse()
                           : ops::add(ops::mul(forward(), w), ops::mul(reverse(), 1.0 - w));
      if (want_grad) r.grad = ops::add(ops::mul(ops::sub(q.p, p.p), w), ops::mul(reverse_grad(), 1.0 - w));
      break;
    }
    case kd_divergence::jsd: {
      if (o.beta == 0.0) {  // TRL/Liger: β = 0 is KL(teacher || student)
        r.value = forward();
        if (want_grad) r.grad = ops::sub(q.p, p.p);
        break;
      }
      if (o.beta == 1.0) {  // β = 1 is KL(student || teacher)
        r.value = reverse();
        if (want_grad) r.grad = reverse_grad();
        break;
      }
      // GKD eq. 1: β·KL(p || m) + (1 - β)·KL(q || m), m = β p + (1 - β) q
      const T logm = kd_log_mixture(p, q, o.beta);         // [..., V]
      const T dq = ops::mul(q.p, ops::sub(q.logp, logm));  // q (log q - log m), 0 where q = 0
      const T dp = ops::mul(p.p, ops::sub(p.logp, logm));  // p (log p - log m), 0 where p = 0
      const T kl_qm = ops::sum(dq, -1, true);              // [..., 1]
      r.value = ops::add(ops::mul(ops::sum(dp, -1), o.beta), ops::mul(ops::sum(dq, -1), 1.0 - o.beta));
      if (want_grad) r.grad = ops::mul(ops::sub(dq, ops::mul(q.p, kl_qm)), 1.0 - o.beta);
      break;
    }
  }
  return r;
}

/// Tempered compute-dtype student and teacher logits (the teacher converted to the student's dtype).
template <tensor T>
std::pair<T, T> kd_tempered(const T& student, const T& teacher, double temperature) {
  T s = ops::upcast(student);
  T t = ops::to_dtype(ops::upcast(teacher), ops::dtype_of(s));
  if (temperature != 1.0) {
    s = ops::div(s, temperature);
    t = ops::div(t, temperature);
  }
  return {s, t};
}

inline double kd_scale(const distill_options& o) {
  return o.scale_by_temperature_squared ? o.temperature * o.temperature : 1.0;
}

/// g in dtype d without a copy of an [..., V] gradient when it already has that dtype.
template <tensor T>
T same_dtype_or_cast(T g, dtype d) {
  if (ops::dtype_of(g) == d) return g;
  return ops::to_dtype(g, d);
}

/// The fused kernel's description of the options, or none where only the generic path applies.
inline std::optional<fused_kd_spec> fused_kd_spec_for(const distill_options& o) {
  fused_kd_spec spec{fused_kd_kind::forward_kl, o.symmetric_ratio, o.temperature, kd_scale(o)};
  switch (o.divergence) {
    case kd_divergence::forward_kl: return spec;
    case kd_divergence::forward_cross_entropy: spec.kind = fused_kd_kind::forward_cross_entropy; return spec;
    case kd_divergence::reverse_kl: spec.kind = fused_kd_kind::reverse_kl; return spec;
    case kd_divergence::symmetric_kl: spec.kind = fused_kd_kind::symmetric_kl; return spec;
    case kd_divergence::jsd:
      if (o.beta == 0.0) return spec;  // KL(teacher || student)
      if (o.beta == 1.0) {             // KL(student || teacher)
        spec.kind = fused_kd_kind::reverse_kl;
        return spec;
      }
      return std::nullopt;
  }
  return std::nullopt;
}

template <class T>
concept has_fused_kd = requires(const T& x, const fused_kd_spec& spec) {
  { tensor_traits<T>::fused_kd_per_token(x, x, spec) } -> std::same_as<T>;
  { tensor_traits<T>::fused_kd_backward(x, x, x, spec) } -> std::same_as<T>;
};

/// scale·D_t [...] in the compute dtype: the backend's fused kernel when it has one (and allow_fused),
/// else the generic composition.
template <tensor T>
T kd_values(const T& student, const T& teacher, const distill_options& o, bool allow_fused) {
  if constexpr (has_fused_kd<T>) {
    if (const auto spec = fused_kd_spec_for(o); allow_fused && spec) {
      const T s = ops::upcast(student);
      return tensor_traits<T>::fused_kd_per_token(s, ops::to_dtype(ops::upcast(teacher), ops::dtype_of(s)), *spec);
    }
  }
  const auto [s, t] = kd_tempered(student, teacher, o.temperature);
  const T d = kd_divergence_parts(s, t, o, false).value;
  return o.scale_by_temperature_squared ? ops::mul(d, kd_scale(o)) : d;
}

/// The fused gradient row_weight[...]·d(scale·D)/d student [..., V] (compute dtype), or none when
/// the backend has no fused kernel for these options.
template <tensor T>
std::optional<T> kd_fused_grad(const T& student, const T& teacher, const T& row_weight, const distill_options& o,
                               bool allow_fused) {
  if constexpr (has_fused_kd<T>) {
    if (const auto spec = fused_kd_spec_for(o); allow_fused && spec) {
      const T s = ops::upcast(student);
      return tensor_traits<T>::fused_kd_backward(s, ops::to_dtype(ops::upcast(teacher), ops::dtype_of(s)),
                                                 ops::to_dtype(row_weight, ops::dtype_of(s)), *spec);
    }
  }
  return std::nullopt;
}

}  // namespace detail

/// The per-token divergence D_t (× τ² when asked) between softmax(student/τ) and softmax(teacher/τ):
/// [..., V] x2 -> [...] in the compute dtype. Only the divergence options are read. Differentiable.
/// Example: student [0, 0], teacher [0, ln 3], reverse_kl -> ½ln(½/¼) + ½ln(½/¾) = 0.143841.
template <tensor T>
T kd_per_token(const T& student_logits, const T& teacher_logits, const distill_options& opt = {});

namespace detail {
template <tensor T>
T kd_per_token_impl(const T& student_logits, const T& teacher_logits, const distill_options& opt, bool allow_fused) {
  constexpr std::string_view fn = "kd_per_token";
  check_distill_options(fn, opt);
  check_distill_logits(fn, student_logits, teacher_logits);
  return kd_values(student_logits, teacher_logits, opt, allow_fused);
}

template <tensor T>
T kd_per_token_backward_impl(const T& student_logits, const T& teacher_logits, const T& grad,
                             const distill_options& opt, bool allow_fused) {
  constexpr std::string_view fn = "kd_per_token_backward";
  check_distill_options(fn, opt);
  check_distill_logits(fn, student_logits, teacher_logits);
  require_row_grad(fn, student_logits, grad, "grad", "student_logits");
  if (auto g = kd_fused_grad(student_logits, teacher_logits, ops::upcast(grad), opt, allow_fused))
    return same_dtype_or_cast(std::move(*g), ops::dtype_of(student_logits));
  const auto [s, t] = kd_tempered(student_logits, teacher_logits, opt.temperature);
  const T d = kd_divergence_parts(s, t, opt, true).grad;
  const T g = ops::mul(ops::mul(d, kd_scale(opt) / opt.temperature), ops::unsqueeze(ops::upcast(grad), -1));
  return ops::to_dtype(g, ops::dtype_of(student_logits));
}
}  // namespace detail

template <tensor T>
T kd_per_token(const T& student_logits, const T& teacher_logits, const distill_options& opt) {
  return detail::kd_per_token_impl(student_logits, teacher_logits, opt, true);
}

/// Gradient of kd_per_token w.r.t. student_logits (the teacher is constant): grad[...] · dD/dx
/// [..., V] in the student logits' dtype; dD/dx = (1/τ) dD/ds (× τ²). See kd_divergence_parts.
template <tensor T>
T kd_per_token_backward(const T& student_logits, const T& teacher_logits, const T& grad,
                        const distill_options& opt = {}) {
  return detail::kd_per_token_backward_impl(student_logits, teacher_logits, grad, opt, true);
}

namespace detail {

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

/// Forward shared by the labelled and the masked entry: valid [...] 0/1, ce [...] or none.
template <tensor T>
distill_result<T> distill_forward(const T& student, const T& teacher, const T& valid, const std::optional<T>& ce,
                                  const distill_options& o, bool allow_fused) {
  T kd = ops::where(valid, kd_values(student, teacher, o, allow_fused), 0.0);  // [...]
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
template <tensor T>
T distill_backward(const T& student, const T& teacher, const T& valid, const std::optional<T>& ce_grad,
                   const distill_options& o, double grad_loss, bool allow_fused) {
  if constexpr (has_fused_kd<T>) {
    if (allow_fused && fused_kd_spec_for(o)) {
      const T w = ops::mul(aggregation_weights(valid, o.reduction, o.normalizer), grad_loss);  // [...]
      // The kernel gives rows of weight 0 (masked) an exact 0, as the where() below does.
      T g = *kd_fused_grad(student, teacher, ops::where(valid, ops::mul(w, 1.0 - o.alpha), 0.0), o, true);
      if (ce_grad && o.alpha > 0.0)
        g = ops::add(g, ops::where(ops::unsqueeze(valid, -1),
                                   ops::mul(*ce_grad, ops::unsqueeze(ops::mul(w, o.alpha), -1)), 0.0));
      return same_dtype_or_cast(std::move(g), ops::dtype_of(student));
    }
  }
  const auto [s, t] = kd_tempered(student, teacher, o.temperature);
  T d = ops::mul(kd_divergence_parts(s, t, o, true).grad, (1.0 - o.alpha) * kd_scale(o) / o.temperature);
  if (ce_grad && o.alpha > 0.0) d = ops::add(d, ops::mul(*ce_grad, o.alpha));
  const T w = ops::mul(aggregation_weights(valid, o.reduction, o.normalizer), grad_loss);  // [...]
  const T g = ops::where(ops::unsqueeze(valid, -1), ops::mul(d, ops::unsqueeze(w, -1)), 0.0);
  return ops::to_dtype(g, ops::dtype_of(student));
}

}  // namespace detail

namespace detail {

template <tensor T>
distill_result<T> distill_loss_impl(const T& student_logits, const T& teacher_logits, const index_tensor_t<T>& labels,
                                    const distill_options& opt, bool allow_fused) {
  constexpr std::string_view fn = "distill_loss";
  check_distill_options(fn, opt);
  check_distill_logits(fn, student_logits, teacher_logits);
  require_labels(fn, student_logits, labels, opt.ignore_index, "student_logits", "labels");
  check_distill_reduction(fn, student_logits, opt);
  const T x = ops::upcast(student_logits);
  const T valid = tensor_traits<T>::index_not_equal(labels, opt.ignore_index, x);
  const T ce = ops::neg(token_logprobs(x, labels, opt.ignore_index));  // -log p(label), 0 where ignored
  return distill_forward(student_logits, teacher_logits, valid, std::optional<T>(ce), opt, allow_fused);
}

template <tensor T>
T distill_loss_backward_impl(const T& student_logits, const T& teacher_logits, const index_tensor_t<T>& labels,
                             const distill_options& opt, double grad_loss, bool allow_fused) {
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
    ce_grad = ops::sub(softmax_last(x), ops::one_hot(safe, ops::size(x, -1), x));  // d(-log p_y)/dx
  }
  return distill_backward(student_logits, teacher_logits, valid, ce_grad, opt, grad_loss, allow_fused);
}

template <tensor T>
distill_result<T> distill_loss_masked_impl(const T& student_logits, const T& teacher_logits, const T& mask,
                                           const distill_options& opt, bool allow_fused) {
  constexpr std::string_view fn = "distill_loss_masked";
  check_distill_options(fn, opt);
  if (opt.alpha != 0.0) fail(fn, "options.alpha must be 0 without labels (got ", opt.alpha, ")");
  check_distill_logits(fn, student_logits, teacher_logits);
  check_distill_reduction(fn, student_logits, opt);
  const T valid = checked_token_mask(fn, student_logits, mask, ops::upcast(student_logits));
  return distill_forward(student_logits, teacher_logits, valid, std::optional<T>(), opt, allow_fused);
}

template <tensor T>
T distill_loss_masked_backward_impl(const T& student_logits, const T& teacher_logits, const T& mask,
                                    const distill_options& opt, double grad_loss, bool allow_fused) {
  constexpr std::string_view fn = "distill_loss_masked_backward";
  check_distill_options(fn, opt);
  if (opt.alpha != 0.0) fail(fn, "options.alpha must be 0 without labels (got ", opt.alpha, ")");
  check_distill_logits(fn, student_logits, teacher_logits);
  check_distill_reduction(fn, student_logits, opt);
  require_finite(fn, "grad_loss", grad_loss);
  const T valid = checked_token_mask(fn, student_logits, mask, ops::upcast(student_logits));
  return distill_backward(student_logits, teacher_logits, valid, std::optional<T>(), opt, grad_loss, allow_fused);
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
  return detail::distill_loss_impl(student_logits, teacher_logits, labels, opt, true);
}

/// d distill_loss / d student_logits [..., V] (student logits' dtype), times grad_loss:
///   (1 - α)(× τ²)/τ · dD/ds + α (softmax(x) - onehot(label)), times the aggregation weight.
template <tensor T>
T distill_loss_backward(const T& student_logits, const T& teacher_logits, const index_tensor_t<T>& labels,
                        const distill_options& opt = {}, double grad_loss = 1.0) {
  return detail::distill_loss_backward_impl(student_logits, teacher_logits, labels, opt, grad_loss, true);
}

/// Distillation loss under an explicit token mask [...] (on-policy distillation, where there are no
/// labels): ℓ_t = D_t. options.alpha must be 0 (there is no hard label to mix).
template <tensor T>
distill_result<T> distill_loss_masked(const T& student_logits, const T& teacher_logits, const T& mask,
                                      const distill_options& opt = {}) {
  return detail::distill_loss_masked_impl(student_logits, teacher_logits, mask, opt, true);
}

/// d distill_loss_masked / d student_logits [..., V], times grad_loss.
template <tensor T>
T distill_loss_masked_backward(const T& student_logits, const T& teacher_logits, const T& mask,
                               const distill_options& opt = {}, double grad_loss = 1.0) {
  return detail::distill_loss_masked_backward_impl(student_logits, teacher_logits, mask, opt, grad_loss, true);
}

/// The unfused compositions of every entry point above (the reference the fused path is tested
/// against; any backend gets these when it has no fused_kd_* override).
namespace generic {
template <tensor T>
T kd_per_token(const T& student_logits, const T& teacher_logits, const distill_options& opt = {}) {
  return detail::kd_per_token_impl(student_logits, teacher_logits, opt, false);
}
template <tensor T>
T kd_per_token_backward(const T& student_logits, const T& teacher_logits, const T& grad,
                        const distill_options& opt = {}) {
  return detail::kd_per_token_backward_impl(student_logits, teacher_logits, grad, opt, false);
}
template <tensor T>
distill_result<T> distill_loss(const T& student_logits, const T& teacher_logits, const index_tensor_t<T>& labels,
                               const distill_options& opt = {}) {
  return detail::distill_loss_impl(student_logits, teacher_logits, labels, opt, false);
}
template <tensor T>
T distill_loss_backward(const T& student_logits, const T& teacher_logits, const index_tensor_t<T>& labels,
                        const distill_options& opt = {}, double grad_loss = 1.0) {
  return detail::distill_loss_backward_impl(student_logits, teacher_logits, labels, opt, grad_loss, false);
}
template <tensor T>
distill_result<T> distill_loss_masked(const T& student_logits, const T& teacher_logits, const T& mask,
                                      const distill_options& opt = {}) {
  return detail::distill_loss_masked_impl(student_logits, teacher_logits, mask, opt, false);
}
template <tensor T>
T distill_loss_masked_backward(const T& student_logits, const T& teacher_logits, const T& mask,
                               const distill_options& opt = {}, double grad_loss = 1.0) {
  return detail::distill_loss_masked_backward_impl(student_logits, teacher_logits, mask, opt, grad_loss, false);
}
}  // namespace generic

}  // namespace posttrain
