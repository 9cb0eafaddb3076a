// posttrain/kernels/distill_cpu.hpp — fused CPU kernel for token-level distillation.
//
// One read of each row of student logits x [rows, V] and teacher logits y [rows, V] (raw row-major
// float/double buffers, as kernels/logits_cpu.hpp). With temperature τ, s = x/τ, t = y/τ,
// q = softmax(s) (student), p = softmax(t) (teacher), both sides keep an online max/sum
// (Milakov & Gimelshein, arXiv:1805.02867) relative to their running maxima m_s, m_t:
//   b = s - m_s, a = t - m_t, Z_s = Σ e^b, Z_t = Σ e^a, T_t = Σ e^a a,
//   D_ab = Σ e^a (a - b), D_ba = Σ e^b (b - a)
// from which (log q = b - log Z_s, log p = a - log Z_t; losses/distill.hpp has the definitions)
//   KL(p || q) = D_ab / Z_t + log Z_s - log Z_t
//   -Σ p log q = KL(p || q) + H(p),  H(p) = log Z_t - T_t / Z_t
//   KL(q || p) = D_ba / Z_s + log Z_t - log Z_s
//   symmetric  r·KL(p || q) + (1 - r)·KL(q || p)
// When a block raises a running max by δ (tempered units), the sums of that side are rescaled by
// e^{-δ} and the cross sums shifted (a' = a - δ: T_t' = e^{-δ}(T_t - δ Z_t), D_ab' = e^{-δ}(D_ab - δ Z_t),
// D_ba' = D_ba + δ Z_s; symmetrically for the student). Each block of `block_size` elements is summed
// with Eigen's per-lane packet accumulators and the block totals are added in double (as logits_cpu.hpp),
// and differences are taken against the raw row max before dividing by τ, so float32 rows of V = 256000
// with logits of ±1e4 stay within float32_tol of the double result.
//
// Backward w.r.t. the student logits, per row with weight g (d loss / d D_row):
//   d KL(p||q)/ds = d(-Σ p log q)/ds = q - p;   d KL(q||p)/ds_v = q_v (log q_v - log p_v - KL(q||p))
//   out[v] = g·scale/τ·[ q_v (w_f + w_r (log q_v - log p_v - K)) - w_f p_v ]
// evaluated as q_v w_f + w_r (q_v (log q_v - log p_v) - q_v K) - w_f p_v, so no intermediate exceeds the
// terms of the result (log q_v - log p_v - K overflows for float32 logits near ±3e38 even where q_v = 0).
// (w_f, w_r) = (1, 0) forward, (0, 1) reverse, (r, 1 - r) symmetric; written into a caller buffer
// or in place over the student logits (each element is read before it is written). A second read of
// the row (still in cache for moderate V) recomputes q and p.
//
// -inf logits (vocabulary padding) follow losses/distill.hpp's generic path exactly: a column with
// -inf on both sides contributes 0; a column with mass on one side only makes the divergences that
// put that side first +inf (student-only mass: KL(q||p) = +inf; teacher-only: KL(p||q) and -Σ p log q
// = +inf); the gradient uses the finite parts with the log-probability of a -inf column read as 0
// (the generic path's sanitised logs). Blocks that contain a -inf on either side take a scalar
// double path with explicit support tests; the vector path never sees -inf. A row whose student or
// teacher has no finite logit, or with +inf or NaN, gives NaN (as the generic composition does);
// rows with gradient weight 0 get an exact 0 gradient (the generic path's mask).
//
// Threads: kernels::parallel_rows (a row never splits, so results do not depend on the thread count).
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>

#include "posttrain/fused.hpp"
#include "posttrain/kernels/logits_cpu.hpp"

namespace posttrain::kernels {

/// Online statistics of one (student, teacher) row pair; see the file comment for each sum.
template <class S>
struct kd_row_stats {
  S ms = -std::numeric_limits<S>::infinity();  ///< raw student row max
  S mt = -std::numeric_limits<S>::infinity();  ///< raw teacher row max
  double zs = 0, zt = 0;                       ///< Σ e^b, Σ e^a
  double tt = 0;                               ///< Σ e^a a
  double dab = 0, dba = 0;                     ///< Σ e^a (a - b), Σ e^b (b - a) over columns with both supports
  double zs_both = 0;                          ///< Σ e^b over columns where the teacher has support
  double ts_only = 0;                          ///< Σ e^b b over columns where only the student has support
  std::int64_t s_only = 0, t_only = 0;         ///< columns with support on one side only
  bool bad = false;                            ///< NaN, +inf, or a side without a finite logit
  double log_zs = 0, log_zt = 0;               ///< set by finish()

  void finish() {
    if (!bad && !(std::isfinite(ms) && std::isfinite(mt))) bad = true;
    if (!bad) {
      log_zs = std::log(zs);
      log_zt = std::log(zt);
    }
  }
  /// KL(p || q) (valid when t_only == 0).
  double forward_kl() const { return dab / zt + log_zs - log_zt; }
  /// H(p) = log Z_t - T_t / Z_t.
  double teacher_entropy() const { return log_zt - tt / zt; }
  /// Σ_v q_v (log q_v - log p_v) with log p := 0 where the teacher is -inf (the finite part of
  /// KL(q || p), which the reverse gradient uses): with Z_b = zs_both and Z_o = Z_s - Z_b,
  ///   D_ba/Z_s + (log Z_t - log Z_s)·Z_b/Z_s + (T_o - log Z_s·Z_o)/Z_s.
  double reverse_kl_finite() const {
    return dba / zs + (log_zt - log_zs) * zs_both / zs + (ts_only - log_zs * (zs - zs_both)) / zs;
  }
};

namespace detail {

/// The (w_f, w_r) weights of the backward form for a divergence.
inline std::pair<double, double> kd_grad_weights(const fused_kd_spec& o) {
  switch (o.kind) {
    case fused_kd_kind::forward_kl:
    case fused_kd_kind::forward_cross_entropy: return {1.0, 0.0};
    case fused_kd_kind::reverse_kl: return {0.0, 1.0};
    case fused_kd_kind::symmetric_kl: return {o.symmetric_ratio, 1.0 - o.symmetric_ratio};
  }
  return {1.0, 0.0};
}

/// Whether the shifted, tempered logits (x - m)/τ of both blocks are finite in S, from the blocks' minima, so
/// the vector path can take differences in S: false only for a float32 block spanning more than float32's
/// range (logits near ±3e38), which the scalar path then computes in double (issue 13 defect 2).
template <class S>
bool kd_shift_fits(S min_x, S mx, S min_y, S my, double inv_tau) {
  constexpr double top = static_cast<double>(std::numeric_limits<S>::max());
  return (static_cast<double>(mx) - static_cast<double>(min_x)) * inv_tau < top &&
         (static_cast<double>(my) - static_cast<double>(min_y)) * inv_tau < top;
}

/// out = e^{arg} with the true value below the normal range: Eigen 3.4's packet exp clamps its argument there
/// (5.6e-309 in double, 2.9e-39 in float instead of 0 or the denormal), which the products e^b (b - a) of the
/// reverse KL, with |b - a| up to 1e308, turn into errors of O(1). `arg_min` is a lower bound of arg (from
/// the block minima) so the common case costs no extra pass; entries below log(smallest normal) take std::exp
/// (as the Eigen backend's exact_exp).
template <class S, class Arg>
void exact_exp_into(const Arg& arg, S arg_min, Eigen::Map<array_t<S>>& out) {
  out = arg.exp();
  const S low = std::log(std::numeric_limits<S>::min());
  if (!(arg_min < low)) return;
  for (Eigen::Index i = 0; i < out.size(); ++i) {
    const S v = arg[i];
    if (v < low) out[i] = std::exp(v);
  }
}

/// Which cross sums a call needs (the plain forward-KL backward needs only Z_s and Z_t).
struct kd_needs {
  bool dab = false, tt = false, dba = false;
};

inline kd_needs kd_needs_for(const fused_kd_spec& o, bool value, bool grad) {
  const auto [wf, wr] = kd_grad_weights(o);
  kd_needs n;
  if (value) {
    n.dab = wf > 0.0;
    n.tt = o.kind == fused_kd_kind::forward_cross_entropy;
    n.dba = wr > 0.0;
  }
  if (grad && wr > 0.0) n.dba = true;
  return n;
}

}  // namespace detail

/// One read of a student row x and a teacher row y: the statistics of kd_row_stats (finish() called).
template <class S>
kd_row_stats<S> kd_reduce_row(const S* x, const S* y, std::int64_t vocab, double inv_tau, detail::kd_needs need) {
  static_assert(std::is_same_v<S, float> || std::is_same_v<S, double>);
  using A = detail::array_t<S>;
  constexpr S neg_inf = -std::numeric_limits<S>::infinity();
  alignas(64) S buf_b[block_size];
  alignas(64) S buf_a[block_size];
  alignas(64) S buf_es[block_size];
  alignas(64) S buf_et[block_size];
  kd_row_stats<S> st;
  const S it = static_cast<S>(inv_tau);
  for (std::int64_t c0 = 0; c0 < vocab; c0 += block_size) {
    const Eigen::Index n = static_cast<Eigen::Index>(std::min(block_size, vocab - c0));
    const Eigen::Map<const A> X(x + c0, n), Y(y + c0, n);
    const S bms = X.template maxCoeff<Eigen::PropagateNaN>(), bmt = Y.template maxCoeff<Eigen::PropagateNaN>();
    if (std::isnan(bms) || std::isnan(bmt) || (std::isinf(bms) && bms > 0) || (std::isinf(bmt) && bmt > 0)) {
      st.bad = true;
      break;
    }
    // Raise the running maxima (rescaling the sums of that side; nothing to rescale before the
    // first finite logit of a side).
    if (bmt > st.mt) {
      if (std::isfinite(st.mt)) {
        const double d = (static_cast<double>(bmt) - static_cast<double>(st.mt)) * inv_tau, c = std::exp(-d);
        st.tt = c * (st.tt - d * st.zt);
        st.dab = c * (st.dab - d * st.zt);  // Σ e^a over both-support columns = Z_t whenever D_ab is used
        st.zt *= c;
        st.dba += d * st.zs_both;
      }
      st.mt = bmt;
    }
    if (bms > st.ms) {
      if (std::isfinite(st.ms)) {
        const double d = (static_cast<double>(bms) - static_cast<double>(st.ms)) * inv_tau, c = std::exp(-d);
        st.ts_only = c * (st.ts_only - d * (st.zs - st.zs_both));
        st.dba = c * (st.dba - d * st.zs_both);
        st.zs *= c;
        st.zs_both *= c;
        st.dab += d * st.zt;
      }
      st.ms = bms;
    }
    const S min_x = X.minCoeff(), min_y = Y.minCoeff();  // one read each: padding and the overflow test
    const bool has_pad = min_x == neg_inf || min_y == neg_inf;
    if (!has_pad && detail::kd_shift_fits(min_x, st.ms, min_y, st.mt, inv_tau)) {
      // Vector path: every logit of both blocks is finite.
      Eigen::Map<A> b(buf_b, n), a(buf_a, n), es(buf_es, n), et(buf_et, n);
      if (inv_tau == 1.0) {
        b = X - st.ms;
        a = Y - st.mt;
      } else {
        b = (X - st.ms) * it;
        a = (Y - st.mt) * it;
      }
      detail::exact_exp_into(b, static_cast<S>((min_x - st.ms) * it), es);
      detail::exact_exp_into(a, static_cast<S>((min_y - st.mt) * it), et);
      const double bzs = static_cast<double>(es.sum());
      st.zs += bzs;
      st.zs_both += bzs;
      st.zt += static_cast<double>(et.sum());
      if (need.tt) st.tt += static_cast<double>((et * a).sum());
      if (need.dab) st.dab += static_cast<double>((et * (a - b)).sum());
      if (need.dba) st.dba += static_cast<double>((es * (b - a)).sum());
    } else {
      // Scalar double path with explicit supports (vocabulary padding is rare: usually one block), also
      // taken by a float32 block whose shifted logits would overflow (a row spanning ±3e38).
      for (Eigen::Index i = 0; i < n; ++i) {
        const bool sf = X[i] > neg_inf, tf = Y[i] > neg_inf;
        const double b = sf ? (static_cast<double>(X[i]) - static_cast<double>(st.ms)) * inv_tau : 0.0;
        const double a = tf ? (static_cast<double>(Y[i]) - static_cast<double>(st.mt)) * inv_tau : 0.0;
        const double es = sf ? std::exp(b) : 0.0, et = tf ? std::exp(a) : 0.0;
        st.zs += es;
        st.zt += et;
        st.tt += et * a;
        if (sf && tf) {
          st.zs_both += es;
          st.dab += et * (a - b);
          st.dba += es * (b - a);
        } else if (sf) {
          ++st.s_only;
          st.ts_only += es * b;
        } else if (tf) {
          ++st.t_only;
        }
      }
    }
  }
  st.finish();
  return st;
}

/// scale·D for one row from its statistics (NaN for a bad row, +inf where one-sided mass makes it so).
template <class S>
double kd_row_value(const kd_row_stats<S>& st, const fused_kd_spec& o) {
  if (st.bad) return std::numeric_limits<double>::quiet_NaN();
  constexpr double inf = std::numeric_limits<double>::infinity();
  const auto forward = [&] { return st.t_only > 0 ? inf : st.forward_kl(); };
  const auto reverse = [&] { return st.s_only > 0 ? inf : st.reverse_kl_finite(); };
  double d = 0.0;
  switch (o.kind) {
    case fused_kd_kind::forward_kl: d = forward(); break;
    case fused_kd_kind::forward_cross_entropy: d = st.t_only > 0 ? inf : st.forward_kl() + st.teacher_entropy(); break;
    case fused_kd_kind::reverse_kl: d = reverse(); break;
    case fused_kd_kind::symmetric_kl: {
      // A term of weight 0 is left out (0·inf would be NaN).
      const double r = o.symmetric_ratio;
      if (r > 0.0) d += r * forward();
      if (r < 1.0) d += (1.0 - r) * reverse();
      break;
    }
  }
  return o.scale * d;
}

namespace detail {

/// dD/ds_v·τ at one column in double, the scalar form of kd_write_row_grad: q (w_f + w_r (log q - log p - K))
/// - w_f p with q (log q - log p) - q K distributed (log q - log p - K can overflow where q is 0 or tiny) and the
/// log-probability of a -inf column read as 0. Its probabilities keep double's range, so a float32 column whose
/// q or p lies below float32's normal range (2e-39) stays nonzero here.
template <class S>
double kd_unit_grad(S x, S y, const kd_row_stats<S>& st, const fused_kd_spec& o, double k) {
  constexpr S neg_inf = -std::numeric_limits<S>::infinity();
  const auto [wf, wr] = kd_grad_weights(o);
  const double inv_tau = 1.0 / o.temperature;
  const bool sf = x > neg_inf, tf = y > neg_inf;
  const double lq = sf ? (static_cast<double>(x) - static_cast<double>(st.ms)) * inv_tau - st.log_zs : 0.0;
  const double lp = tf ? (static_cast<double>(y) - static_cast<double>(st.mt)) * inv_tau - st.log_zt : 0.0;
  const double q = sf ? std::exp(lq) : 0.0, p = tf ? std::exp(lp) : 0.0;
  return q * wf + wr * (q * (lq - lp) - q * k) - wf * p;
}

}  // namespace detail

/// Writes coef·[q (w_f + w_r (log q - log p - K)) - w_f p] for one row into out (may be x itself).
template <class S>
void kd_write_row_grad(const S* x, const S* y, std::int64_t vocab, const kd_row_stats<S>& st, const fused_kd_spec& o,
                       double coef, S* out) {
  using A = detail::array_t<S>;
  constexpr S neg_inf = -std::numeric_limits<S>::infinity();
  if (coef == 0.0) {
    Eigen::Map<A>(out, static_cast<Eigen::Index>(vocab)).setZero();
    return;
  }
  if (st.bad) {
    Eigen::Map<A>(out, static_cast<Eigen::Index>(vocab)).setConstant(std::numeric_limits<S>::quiet_NaN());
    return;
  }
  const auto [wf, wr] = detail::kd_grad_weights(o);
  const double inv_tau = 1.0 / o.temperature;
  const double k = wr > 0.0 ? st.reverse_kl_finite() : 0.0;
  alignas(64) S buf_b[block_size];
  alignas(64) S buf_a[block_size];
  alignas(64) S buf_q[block_size];
  const S it = static_cast<S>(inv_tau), lzs = static_cast<S>(st.log_zs), lzt = static_cast<S>(st.log_zt);
  const S cq = static_cast<S>(coef * wf), cp = static_cast<S>(coef * wf), cr = static_cast<S>(coef * wr);
  // log q - log p - K = b - a + (log Z_t - log Z_s - K)
  const S shift = static_cast<S>(st.log_zt - st.log_zs - k);
  for (std::int64_t c0 = 0; c0 < vocab; c0 += block_size) {
    const Eigen::Index n = static_cast<Eigen::Index>(std::min(block_size, vocab - c0));
    const Eigen::Map<const A> X(x + c0, n), Y(y + c0, n);
    Eigen::Map<A> O(out + c0, n);
    const S min_x = X.minCoeff(), min_y = Y.minCoeff();
    if (min_x > neg_inf && min_y > neg_inf && detail::kd_shift_fits(min_x, st.ms, min_y, st.mt, inv_tau)) {
      Eigen::Map<A> b(buf_b, n), a(buf_a, n);
      if (inv_tau == 1.0) {
        b = X - st.ms;
        a = Y - st.mt;
      } else {
        b = (X - st.ms) * it;
        a = (Y - st.mt) * it;
      }
      if (wr == 0.0) {
        O = cq * (b - lzs).exp() - cp * (a - lzt).exp();
      } else {
        // q·(b - a) + q·shift, distributed: (b - a) + shift can overflow where the true q (log q - log p - K) is
        // finite or 0 (float32 K ≈ 3e38 at a column with b - a ≈ -3e38 gave -inf, and q = 0 there made it NaN);
        // each product here is at most |b - a| or |shift| in size. q is the exact exp (q = 5.6e-309 from Eigen's
        // clamp at b = -1e308 gave q·(b - a) = -0.56 where the true product is 0).
        Eigen::Map<A> q(buf_q, n);
        detail::exact_exp_into(b - lzs, static_cast<S>((min_x - st.ms) * it - lzs), q);
        O = cq * q + cr * (q * (b - a) + q * shift) - cp * (a - lzt).exp();
      }
    } else {
      for (Eigen::Index i = 0; i < n; ++i) O[i] = static_cast<S>(coef * detail::kd_unit_grad(X[i], Y[i], st, o, k));
    }
  }
}

/// Fused distillation over rows: value[r] = scale·D(row r) (value may be null), and, when grad is
/// not null, grad[r, :] = row_weight[r]·scale/τ·dD/ds (row_weight null means 1 for every row). grad
/// may equal student (the gradient then overwrites the student logits in place); it must not alias
/// teacher. A row of weight 0 gets an exact 0 gradient; a row whose weight·scale/τ overflows the dtype gets
/// the unit-weight gradient scaled afterwards (0 where q = p, not inf - inf).
template <class S>
void distill_forward_backward(const S* student, const S* teacher, std::int64_t rows, std::int64_t vocab,
                              const fused_kd_spec& o, S* value, const S* row_weight, S* grad) {
  const double inv_tau = 1.0 / o.temperature;
  const detail::kd_needs need = detail::kd_needs_for(o, value != nullptr, grad != nullptr);
  parallel_rows(rows, vocab, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t r = begin; r < end; ++r) {
      const S* x = student + r * vocab;
      const S* y = teacher + r * vocab;
      const double w = row_weight ? static_cast<double>(row_weight[r]) : 1.0;
      if (!value && w == 0.0) {  // masked row, gradient only: no statistics needed
        Eigen::Map<detail::array_t<S>>(grad + r * vocab, static_cast<Eigen::Index>(vocab)).setZero();
        continue;
      }
      const kd_row_stats<S> st = kd_reduce_row(x, y, vocab, inv_tau, need);
      if (value) value[r] = static_cast<S>(kd_row_value(st, o));
      if (!grad) continue;
      const double coef = w * o.scale * inv_tau;
      if (std::abs(coef) <= static_cast<double>(std::numeric_limits<S>::max())) {
        kd_write_row_grad(x, y, vocab, st, o, coef, grad + r * vocab);
      } else {
        // g·scale/τ past S's range (g = 1e308, τ = 2 with τ²: 2e308; g = +inf) while the gradient may be finite
        // or 0 (q = p: inf·q - inf·p was NaN): the unit-weight gradient in double, then × scale/τ and × g. It is
        // not rounded to S first: a float32 column with q - p ≈ 1e-39 (below the normal range, where the vector
        // exp gives 0) times g = +inf is ±inf, as the generic path's g·(q - p), not 0·inf = NaN.
        S* out = grad + r * vocab;
        const double k = o.scale * inv_tau;
        const double kr = detail::kd_grad_weights(o).second > 0.0 ? st.reverse_kl_finite() : 0.0;
        for (std::int64_t i = 0; i < vocab; ++i) {
          if (st.bad) {
            out[i] = std::numeric_limits<S>::quiet_NaN();
          } else {
            out[i] = static_cast<S>(detail::kd_unit_grad(x[i], y[i], st, o, kr) * k * w);
          }
        }
      }
    }
  });
}

}  // namespace posttrain::kernels
