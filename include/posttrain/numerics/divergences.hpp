// posttrain/numerics/divergences.hpp — per-token divergences between two distributions over the
// vocabulary, from student and teacher logits (distillation, on-policy KD, GKD).
//
//   student_logits x [..., V], teacher_logits y [..., V] (same vocabulary), temperature τ:
//   q = softmax(x / τ) (student), p = softmax(y / τ) (teacher), per-token divergence D_t:
//     forward_kl             KL(p || q) = Σ_v p_v (log p_v - log q_v)          (Hinton et al. 2015, arXiv:1503.02531)
//     forward_cross_entropy  -Σ_v p_v log q_v = KL(p || q) + H(p)     (torchtune ForwardKLLoss, OpenRLHF KDLoss: they
//                            call it "forward KL"; it differs from the KL by the teacher entropy, a constant in x)
//     reverse_kl             KL(q || p) = Σ_v q_v (log q_v - log p_v)          (torchtune ReverseKLLoss; MiniLLM)
//     symmetric_kl           r·KL(p || q) + (1 - r)·KL(q || p)     (torchtune SymmetricKLLoss, sym_kl_ratio r;
//                            torchtune uses the cross-entropy form for its forward half, so its value is ours + r·H(p))
//     jsd                    β·KL(p || m) + (1 - β)·KL(q || m), m = β p + (1 - β) q, computed in log space
//                            (generalised JSD: GKD, arXiv:2306.13649 eq. 1; TRL generalized_jsd_loss, Liger
//                            LigerJSD). β = 0 is KL(p || q) and β = 1 is KL(q || p), as both frameworks define
//                            the endpoints (the mixture form vanishes there; JSD_β/β -> KL(p||q) as β -> 0).
//   optional × τ² (Hinton's gradient-scale correction; Liger and torchtune do not scale).
//
// Vocabulary padding: columns with logit -inf carry probability 0 and contribute 0 (0·log 0 := 0), so
// padding -inf on both sides gives the divergence over the remaining vocabulary. A column with mass on
// one side and -inf on the other makes the divergences that put that side first (KL(p||q) when the
// student is -inf where the teacher is not) +inf, their true value; torchtune instead drops such
// columns. The JSD stays finite (m covers both). A row with no finite logit on a side (no distribution
// there) gives NaN, value and gradient, as do NaN and +inf logits; no other input gives NaN.
// Example: student [0, 0], teacher [0, ln 3] -> KL(p||q) = ¼ln(½) + ¾ln(3/2) = 0.130812.
//
// Fused path: a backend with the kd hooks of fused.hpp (the Eigen backend through
// kernels/distill_cpu.hpp: one read of each row of both logits) computes the divergence and its
// student gradient for forward_kl, forward_cross_entropy, reverse_kl, symmetric_kl and jsd at
// β = 0 or 1; jsd with 0 < β < 1, and any input a hook declines, take the generic composition
// (posttrain::generic::kd_per_token, the reference the fused path is tested against).
// The distillation loss (hard-label mixing, masks, aggregation) is losses/distill.hpp.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string_view>
#include <utility>

#include "posttrain/detail/validate.hpp"
#include "posttrain/fused.hpp"
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

/// The options of a per-token divergence (distill_options converts to this).
struct divergence_options {
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
};

namespace detail {

inline void check_divergence_options(std::string_view fn, const divergence_options& o) {
  require_finite(fn, "options.beta", o.beta);
  require_finite(fn, "options.symmetric_ratio", o.symmetric_ratio);
  require_finite(fn, "options.temperature", o.temperature);
  if (o.beta < 0.0 || o.beta > 1.0) fail(fn, "options.beta must be in [0, 1], got ", o.beta);
  if (o.symmetric_ratio < 0.0 || o.symmetric_ratio > 1.0)
    fail(fn, "options.symmetric_ratio must be in [0, 1], got ", o.symmetric_ratio);
  if (o.temperature <= 0.0) fail(fn, "options.temperature must be > 0, got ", o.temperature);
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
  const T zs = shift_by_row_max(z);                                          // keeps float32 precise at large |z|
  const T logp = ops::sub(zs, ops::unsqueeze(logsumexp_unchecked(zs), -1));  // [..., V], -inf at padding
  const T support = ops::gt(z, -inf);
  return {ops::where(support, logp, 0.0), ops::exp(logp), support};
}

/// +inf where some column has mass under `a` but not under `b` (KL(a || b) = +inf there), else 0: [...].
template <tensor T>
T kd_infinite_rows(const kd_side<T>& a, const kd_side<T>& b) {
  const T uncovered = ops::sum(ops::mul(a.support, ops::sub(1.0, b.support)), -1);  // [...]
  return ops::where(ops::gt(uncovered, 0.0), std::numeric_limits<double>::infinity(), ops::full_like(uncovered, 0.0));
}

/// p · x with 0 · x := 0 wherever the probability p is 0: at padding, and where it underflowed (a float32 row
/// spanning ±3e38, whose shifted logit overflows to -inf, has log p = -inf at a column of probability 0). x is
/// replaced by 0 there before the product, so neither the value nor autograd meets 0·inf.
template <tensor T>
T prob_times(const T& p, const T& x) {
  return ops::mul(p, ops::where(ops::gt(p, 0.0), x, 0.0));
}

/// Σ_v a_v (log a_v - log b_v) over the columns where a has mass (the finite part): [...].
template <tensor T>
T kd_kl_finite(const kd_side<T>& a, const kd_side<T>& b) {
  return ops::sum(prob_times(a.p, ops::sub(a.logp, b.logp)), -1);
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
kd_value_grad<T> kd_divergence_parts(const T& s, const T& t, const divergence_options& o, bool want_grad) {
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
    return prob_times(q.p, ops::sub(d, ops::sum(prob_times(q.p, d), -1, true)));
  };
  switch (o.divergence) {
    case kd_divergence::forward_kl:
      r.value = forward();
      if (want_grad) r.grad = ops::sub(q.p, p.p);
      break;
    case kd_divergence::forward_cross_entropy:
      // -Σ p log q (torchtune ForwardKLLoss)
      r.value = ops::add(ops::neg(ops::sum(prob_times(p.p, q.logp), -1)), kd_infinite_rows(p, q));
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
      const T logm = kd_log_mixture(p, q, o.beta);           // [..., V]
      const T dq = prob_times(q.p, ops::sub(q.logp, logm));  // q (log q - log m), 0 where q = 0
      const T dp = prob_times(p.p, ops::sub(p.logp, logm));  // p (log p - log m), 0 where p = 0
      const T kl_qm = ops::sum(dq, -1, true);                // [..., 1]
      r.value = ops::add(ops::mul(ops::sum(dp, -1), o.beta), ops::mul(ops::sum(dq, -1), 1.0 - o.beta));
      if (want_grad) r.grad = ops::mul(ops::sub(dq, prob_times(q.p, kl_qm)), 1.0 - o.beta);
      break;
    }
  }
  // A row with no finite logit on a side has no distribution on that side: NaN (value and gradient) for
  // every divergence, as the fused kernel gives (kernels/distill_cpu.hpp). Without this KL(q||p) read +inf
  // from the teacher's empty support while KL(p||q) was NaN (fuzz_distill, seed 11).
  const auto vocab = static_cast<double>(ops::shape(s).back());
  if (vocab > 0) {
    const T outside = ops::maximum(ops::sum(ops::sub(1.0, q.support), -1), ops::sum(ops::sub(1.0, p.support), -1));
    const T nan_rows = ops::where(ops::eq(outside, vocab), std::numeric_limits<double>::quiet_NaN(),
                                  ops::full_like(r.value, 0.0));  // [...]: NaN or 0
    r.value = ops::add(r.value, nan_rows);
    if (want_grad) r.grad = ops::add(r.grad, ops::unsqueeze(nan_rows, -1));
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

inline double kd_scale(const divergence_options& o) {
  return o.scale_by_temperature_squared ? o.temperature * o.temperature : 1.0;
}

/// g in dtype d without a copy of an [..., V] gradient when it already has that dtype.
template <tensor T>
T same_dtype_or_cast(T g, dtype d) {
  if (ops::dtype_of(g) == d) return g;
  return ops::to_dtype(g, d);
}

/// The fused kernel's description of the options, or none where only the generic path applies.
inline std::optional<fused_kd_spec> fused_kd_spec_for(const divergence_options& o) {
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

/// scale·D_t [...] in the compute dtype by the generic composition.
template <tensor T>
T kd_values_generic(const T& student, const T& teacher, const divergence_options& o) {
  const auto [s, t] = kd_tempered(student, teacher, o.temperature);
  const T d = kd_divergence_parts(s, t, o, false).value;
  return o.scale_by_temperature_squared ? ops::mul(d, kd_scale(o)) : d;
}

/// grad[...]·d(scale·D)/d student [..., V] in the compute dtype by the generic composition; rows
/// whose grad is 0 get an exact 0 (as the fused kernel gives them), even where D is infinite.
template <tensor T>
T kd_grad_generic(const T& student, const T& teacher, const T& grad, const divergence_options& o) {
  const auto [s, t] = kd_tempered(student, teacher, o.temperature);
  const T d = kd_divergence_parts(s, t, o, true).grad;
  const T gu = ops::unsqueeze(ops::upcast(grad), -1);  // [..., 1]
  const T g = ops::mul(ops::mul(d, kd_scale(o) / o.temperature), gu);
  return ops::where(ops::ne(gu, 0.0), g, 0.0);
}

/// Compute-dtype student and teacher (the teacher in the student's compute dtype) for a fused hook.
template <tensor T>
std::pair<T, T> kd_fused_inputs(const T& student, const T& teacher) {
  T s = ops::upcast(student);
  T t = ops::to_dtype(ops::upcast(teacher), ops::dtype_of(s));
  return {std::move(s), std::move(t)};
}

/// scale·D_t [...]: the backend's fused hook when it covers these options and takes the input,
/// else the generic composition. Inputs validated by the caller.
template <tensor T>
T kd_values_unchecked(const T& student, const T& teacher, const divergence_options& o) {
  if constexpr (has_fused_kd<T>) {
    if (const auto spec = fused_kd_spec_for(o)) {
      const auto [s, t] = kd_fused_inputs(student, teacher);
      if (auto v = try_fused_kd_per_token(s, t, *spec)) return std::move(*v);
    }
  }
  return kd_values_generic(student, teacher, o);
}

/// grad[...]·d(scale·D)/d student [..., V] in the compute dtype: fused hook or generic composition.
template <tensor T>
T kd_grad_unchecked(const T& student, const T& teacher, const T& grad, const divergence_options& o) {
  if constexpr (has_fused_kd<T>) {
    if (const auto spec = fused_kd_spec_for(o)) {
      const auto [s, t] = kd_fused_inputs(student, teacher);
      if (auto g = try_fused_kd_backward(s, t, ops::to_dtype(ops::upcast(grad), ops::dtype_of(s)), *spec))
        return std::move(*g);
    }
  }
  return kd_grad_generic(student, teacher, grad, o);
}

template <tensor T>
void check_kd_per_token(std::string_view fn, const T& student, const T& teacher, const divergence_options& o) {
  check_divergence_options(fn, o);
  check_distill_logits(fn, student, teacher);
}

}  // namespace detail

/// The per-token divergence D_t (× τ² when asked) between softmax(student/τ) and softmax(teacher/τ):
/// [..., V] x2 -> [...] in the compute dtype. Differentiable.
/// Example: student [0, 0], teacher [0, ln 3], reverse_kl -> ½ln(½/¼) + ½ln(½/¾) = 0.143841.
template <tensor T>
T kd_per_token(const T& student_logits, const T& teacher_logits, const divergence_options& opt = {}) {
  detail::check_kd_per_token("kd_per_token", student_logits, teacher_logits, opt);
  return detail::kd_values_unchecked(student_logits, teacher_logits, opt);
}

/// Gradient of kd_per_token w.r.t. student_logits (the teacher is constant): grad[...] · dD/dx
/// [..., V] in the student logits' dtype; dD/dx = (1/τ) dD/ds (× τ²). See kd_divergence_parts.
template <tensor T>
T kd_per_token_backward(const T& student_logits, const T& teacher_logits, const T& grad,
                        const divergence_options& opt = {}) {
  constexpr std::string_view fn = "kd_per_token_backward";
  detail::check_kd_per_token(fn, student_logits, teacher_logits, opt);
  detail::require_row_grad(fn, student_logits, grad, "grad", "student_logits");
  return detail::same_dtype_or_cast(detail::kd_grad_unchecked(student_logits, teacher_logits, grad, opt),
                                    ops::dtype_of(student_logits));
}

/// The unfused compositions (the reference the fused hooks are tested against).
namespace generic {
template <tensor T>
T kd_per_token(const T& student_logits, const T& teacher_logits, const divergence_options& opt = {}) {
  detail::check_kd_per_token("kd_per_token", student_logits, teacher_logits, opt);
  return detail::kd_values_generic(student_logits, teacher_logits, opt);
}
template <tensor T>
T kd_per_token_backward(const T& student_logits, const T& teacher_logits, const T& grad,
                        const divergence_options& opt = {}) {
  constexpr std::string_view fn = "kd_per_token_backward";
  detail::check_kd_per_token(fn, student_logits, teacher_logits, opt);
  detail::require_row_grad(fn, student_logits, grad, "grad", "student_logits");
  return detail::same_dtype_or_cast(detail::kd_grad_generic(student_logits, teacher_logits, grad, opt),
                                    ops::dtype_of(student_logits));
}
}  // namespace generic

}  // namespace posttrain
