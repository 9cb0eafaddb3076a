// posttrain/backends/torch/logits_engine.hpp — the LibTorch backend's one-pass logits engine: the
// kernel, rows and chunked paths (backends/torch/knobs.hpp) of the logits statistics, their analytic
// backward and sft_loss_backward's gradient, on raw at::Tensors (no autograd here: see
// backends/torch/autograd.hpp). A temperature T (logits_stats_request / ce_backward_args) is applied
// inside each path as the scale a = 1/T of the row differences (kernels/logits_cpu.hpp's file comment;
// the chunked path scales its own chunk-sized copy), never as an [N, V] copy of logits / T.
#pragma once

#include <ATen/ATen.h>
#include <ATen/TensorUtils.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "posttrain/backends/torch/knobs.hpp"
#include "posttrain/error.hpp"
#include "posttrain/fused.hpp"

// posttrain's fused CPU kernels are written with Eigen's packet math: LibTorch CPU tensors use them
// when Eigen is on the include path (link posttrain::eigen too), and the chunked LibTorch path otherwise.
// CMake's posttrain::torch carries Eigen and defines POSTTRAIN_REQUIRE_CPU_KERNELS, so a build that lost
// Eigen's include path fails here instead of silently running the slower path.
#if __has_include(<Eigen/Core>)
#include "posttrain/backends/torch/intra_op.hpp"
#include "posttrain/kernels/logits_cpu.hpp"
#define POSTTRAIN_TORCH_CPU_KERNELS 1
#else
#define POSTTRAIN_TORCH_CPU_KERNELS 0
#if defined(POSTTRAIN_REQUIRE_CPU_KERNELS) && POSTTRAIN_REQUIRE_CPU_KERNELS
#error \
    "posttrain: POSTTRAIN_REQUIRE_CPU_KERNELS is set but <Eigen/Core> is not on the include path (link Eigen3::Eigen)"
#endif
#endif

namespace posttrain {

namespace torch_backend {
/// True when CPU tensors use posttrain's fused kernels (Eigen was on the include path); a consumer
/// can static_assert it. False: CPU tensors take the chunked LibTorch path.
inline constexpr bool has_cpu_kernels = POSTTRAIN_TORCH_CPU_KERNELS == 1;
}  // namespace torch_backend

namespace detail::torch_kernels {

using torch_backend::logits_path;

/// The per-row outputs of one forward, each [...] in the compute dtype (undefined when not asked).
struct row_outputs {
  at::Tensor logsumexp, logprob, entropy, argmax_hit;
};

inline bool is_half(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }
/// float64 stays float64; everything else is computed in float32.
inline at::ScalarType compute_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

/// The path for logits x (see torch_backend above).
inline logits_path choose(const at::Tensor& x) {
#if POSTTRAIN_TORCH_CPU_KERNELS
  const auto t = x.scalar_type();
  const bool full = t == at::kFloat || t == at::kDouble;
  if (x.device().is_cpu() && x.layout() == at::kStrided && (full || is_half(t))) {
    const logits_path forced = torch_backend::forced_logits_path();
    if (forced == logits_path::rows || forced == logits_path::chunked) return forced;
    return full && x.is_contiguous() ? logits_path::kernel : logits_path::rows;
  }
#endif
  (void)x;
  return logits_path::chunked;
}

/// A [n, V] view of some rows of the logits (any strides) and the index of its first row in the
/// flattened [N] result.
struct row_block {
  at::Tensor x;
  std::int64_t offset;
};

/// Splits x [..., V] into 2-d views without copying: the leading dimensions merge into one where
/// the strides allow it, otherwise the first dimension is walked one index at a time.
inline void collect_blocks(const at::Tensor& x, std::int64_t& offset, std::vector<row_block>& out) {
  if (x.dim() == 1) {
    out.push_back({x.unsqueeze(0), offset++});
    return;
  }
  const std::int64_t v = x.size(-1);
  const std::int64_t rows = v == 0 ? 0 : x.numel() / v;
  if (rows == 0) return;
  if (x.dim() == 2 || at::detail::computeStride(x.sizes(), x.strides(), at::IntArrayRef({rows, v})).has_value()) {
    out.push_back({x.view({rows, v}), offset});
    offset += rows;
    return;
  }
  for (std::int64_t i = 0; i < x.size(0); ++i) collect_blocks(x.select(0, i), offset, out);
}
inline std::vector<row_block> blocks_of(const at::Tensor& x) {
  std::vector<row_block> out;
  std::int64_t offset = 0;
  collect_blocks(x, offset, out);
  return out;
}

// ---- the chunked path: LibTorch ops on chunks of rows (any device) -----------------------------

/// Per chunk [c, V]: the row max m (finite rows; 0 otherwise, so a row of -inf keeps lse = -inf
/// and +inf gives +inf), the shifted logits xs = x - m in the compute dtype (half chunks are
/// promoted by the subtraction itself: one chunk-sized float32 tensor), e = e^{xs} when kept, and
/// log s = log Σ e^{xs}. With a temperature (inv_t = a = 1/T != 1) xs = a·(x - m) (in place on the
/// chunk's own copy): the statistics of x / T, whose logsumexp is a·m + log s.
struct chunk_stats {
  at::Tensor row_max, m, xs, e, log_s;
  double inv_t = 1.0;
  chunk_stats(const at::Tensor& chunk, at::ScalarType c, bool keep_exp, double inv_temperature = 1.0)
      : inv_t(inv_temperature) {
    row_max = at::amax(chunk, {1}, true).to(c);  // [c, 1]; max is exact in any dtype
    m = at::where(at::isfinite(row_max), row_max, at::zeros_like(row_max));
    xs = chunk - m;  // [c, V]
    if (inv_t != 1.0) xs.mul_(inv_t);
    at::Tensor ex = xs.exp();
    log_s = ex.sum(1, true).log();  // [c, 1]
    if (keep_exp) e = std::move(ex);
  }
  /// logsumexp of the (tempered) rows, [c, 1].
  at::Tensor lse() const { return inv_t == 1.0 ? log_s + m : log_s + m * inv_t; }
};

/// Every requested output for every row of x, chunk by chunk (labels: int64 [N] or undefined).
inline void chunked_forward(const at::Tensor& x, const at::Tensor& labels, const logits_stats_request& q,
                            const row_outputs& out) {
  const at::Tensor y = labels.defined() && labels.numel() > 0 ? labels.reshape({-1}) : at::Tensor();
  const at::Tensor valid_all = y.defined() ? y.ne(q.ignore_index) : at::Tensor();
  const at::Tensor y_safe = y.defined() ? at::where(valid_all, y, at::zeros_like(y)) : at::Tensor();
  const std::int64_t step = torch_backend::chunk_rows(x.size(-1));
  const auto put = [](const at::Tensor& dst, std::int64_t first, std::int64_t len, const at::Tensor& r) {
    if (dst.defined()) dst.view({-1}).narrow(0, first, len).copy_(r.view({-1}));
  };
  for (const row_block& b : blocks_of(x)) {
    const std::int64_t n = b.x.size(0);
    for (std::int64_t s = 0; s < n; s += step) {
      const std::int64_t len = std::min(step, n - s), first = b.offset + s;
      const at::Tensor chunk = b.x.narrow(0, s, len);
      const at::ScalarType c = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
      const chunk_stats st(chunk, c, q.entropy, 1.0 / q.temperature);
      if (q.logsumexp) put(out.logsumexp, first, len, st.lse());
      if (q.entropy) {
        // H = log s - Σ e^{xs}·xs / s; xs clamped at -1000 so -inf logits add 0·(-1000) = 0.
        const at::Tensor t = (st.e * st.xs.clamp_min(-1000.0)).sum(1, true);
        const at::Tensor h = st.log_s - t / st.log_s.exp();
        // No finite row max: a row of -inf (or with +inf) is empty or a point mass: 0; NaN stays.
        const at::Tensor& mx = st.row_max;
        put(out.entropy, first, len, at::where(at::isfinite(mx), h, at::where(at::isnan(mx), mx, at::zeros_like(mx))));
      }
      if (y.defined() && (q.logprob || q.argmax_hit)) {
        const at::Tensor yc = y_safe.narrow(0, first, len).unsqueeze(1);
        const at::Tensor vc = valid_all.narrow(0, first, len).unsqueeze(1);
        if (q.logprob) {
          const at::Tensor lp = st.xs.gather(1, yc) - st.log_s;
          put(out.logprob, first, len, at::where(vc, lp, at::zeros_like(lp)));
        }
        if (q.argmax_hit) put(out.argmax_hit, first, len, (chunk.argmax(1, true).eq(yc) & vc).to(c));
      }
    }
  }
}

/// Per-row coefficients of the chunked backward: grad = p·(α + β·log p) − b·onehot(y) − c.
/// (and + d·(onehot(y) − p), the label column computed as p_y·(α + β log p_y) + d·(1 − p_y) − b − c:
/// kernels::backward_coefficients explains why d is kept apart.)
struct chunk_coefficients {
  at::Tensor alpha, beta, b, c, d;  // [len, 1] each, or undefined (0)
};

/// grad[offset + r, :] for every row, chunk by chunk, written in out's dtype (the logits'). With
/// inv_t = 1/T the coefficients are those of the gradient w.r.t. x / T, and the chain rule's 1/T is
/// applied to each chunk's gradient here.
/// keep_rows ([N] bool, optional): rows where it is false get an exact 0 (selected, so a row of NaN logits whose
/// upstream gradients are all 0 gives 0, not 0·NaN).
template <class Coefficients>
void chunked_backward(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& out, Coefficients&& coeff,
                      double inv_t = 1.0, const at::Tensor& keep_rows = {}) {
  const at::ScalarType c = compute_type(x);
  const std::int64_t v = x.size(-1);
  const at::Tensor flat_out = out.view({-1, v});
  const at::Tensor y = labels.defined() && labels.numel() > 0 ? labels.reshape({-1}).to(at::kLong) : at::Tensor();
  const std::int64_t step = torch_backend::chunk_rows(v);
  for (const row_block& b : blocks_of(x)) {
    const std::int64_t n = b.x.size(0);
    for (std::int64_t s = 0; s < n; s += step) {
      const std::int64_t len = std::min(step, n - s);
      const std::int64_t first = b.offset + s;
      const at::Tensor chunk = b.x.narrow(0, s, len);
      chunk_stats st(chunk, c, false, inv_t);
      at::Tensor logp = st.xs.sub_(st.log_s);  // in place: xs is this chunk's own copy
      const at::Tensor p = logp.exp();
      const at::Tensor yc = y.defined() ? y.narrow(0, first, len).unsqueeze(1) : at::Tensor();
      const chunk_coefficients k = coeff(first, len, st, logp, p, yc);
      at::Tensor g = k.alpha.defined() ? p * k.alpha : at::zeros_like(p);
      if (k.beta.defined()) g += p * logp.clamp_min(-1000.0) * k.beta;  // p·log p := 0 at -inf logits
      if (k.c.defined()) g -= k.c;
      if (k.d.defined() && yc.defined()) {
        const at::Tensor py = p.gather(1, yc), lpy = logp.gather(1, yc).clamp_min(-1000.0);  // [len, 1]
        at::Tensor at_label = k.alpha.defined() ? py * k.alpha : at::zeros_like(py);
        if (k.beta.defined()) at_label += py * lpy * k.beta;
        at_label += k.d * (1.0 - py);
        if (k.b.defined()) at_label -= k.b;
        if (k.c.defined()) at_label -= k.c;
        g -= p * k.d;
        g.scatter_(1, yc, at_label);
      } else if (k.b.defined() && yc.defined()) {
        g.scatter_add_(1, yc, -k.b.expand({len, 1}));
      }
      if (inv_t != 1.0) g.mul_(inv_t);
      if (keep_rows.defined())
        g = at::where(keep_rows.narrow(0, first, len).unsqueeze(1), g, at::zeros({}, g.options()));
      flat_out.narrow(0, first, len).copy_(g);
    }
  }
}

#if POSTTRAIN_TORCH_CPU_KERNELS
// ---- the kernel and rows paths: posttrain::kernels on CPU rows ---------------------------------

template <class Src>
using compute_t = std::conditional_t<std::is_same_v<Src, double>, double, float>;

/// Row `p` (element stride `stride`) in the compute type: the row itself when it already is one
/// (contiguous float32/float64), else a copy into `buf` (bfloat16 widened by a 16-bit shift).
template <class Src, class S>
const S* load_row(const Src* p, std::int64_t stride, std::int64_t v, std::vector<S>& buf) {
  if constexpr (std::is_same_v<Src, S>)
    if (stride == 1) return p;
  buf.resize(static_cast<std::size_t>(v));
  S* o = buf.data();
  if constexpr (std::is_same_v<Src, at::BFloat16>) {
    if (stride == 1) {
      for (std::int64_t i = 0; i < v; ++i) o[i] = std::bit_cast<float>(static_cast<std::uint32_t>(p[i].x) << 16);
      return o;
    }
  }
  for (std::int64_t i = 0; i < v; ++i) o[i] = static_cast<S>(p[i * stride]);
  return o;
}

template <class Src>
inline constexpr bool is_16bit_v = std::is_same_v<Src, at::BFloat16> || std::is_same_v<Src, at::Half>;
/// Whether rows of Src with column stride cs are read by the kernels natively (bfloat16 and float16,
/// unit column stride, unless the benchmark/test hook torch_backend::set_widen_half_rows asks for the buffer).
template <class Src>
bool native_16bit(std::int64_t cs) {
  return is_16bit_v<Src> && cs == 1 && !torch_backend::widen_half_rows();
}
/// at::BFloat16 and Eigen::bfloat16 are both the 16 high bits of a float32; at::Half and Eigen::half
/// both IEEE binary16.
inline const Eigen::bfloat16* as_eigen(const at::BFloat16* p) {
  static_assert(sizeof(at::BFloat16) == 2 && sizeof(Eigen::bfloat16) == 2);
  return reinterpret_cast<const Eigen::bfloat16*>(p);
}
inline Eigen::bfloat16* as_eigen(at::BFloat16* p) { return reinterpret_cast<Eigen::bfloat16*>(p); }
inline const Eigen::half* as_eigen(const at::Half* p) {
  static_assert(sizeof(at::Half) == 2 && sizeof(Eigen::half) == 2);
  return reinterpret_cast<const Eigen::half*>(p);
}
inline Eigen::half* as_eigen(at::Half* p) { return reinterpret_cast<Eigen::half*>(p); }

/// Calls f(Src{}) with Src the C++ type of the logits' dtype (float, double, BFloat16, Half).
template <class F>
void dispatch_logits(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    case at::kHalf: f(at::Half{}); break;
    default: posttrain::detail::fail("torch backend", "no CPU kernel for dtype ", c10::toString(t));
  }
}

/// Forward, row by row: every requested output (null pointers are skipped; labels: contiguous
/// int64 [N], or null).
template <class Src>
void rows_forward(const at::Tensor& x, const std::int64_t* labels, std::int64_t ignore_index,
                  const std::array<compute_t<Src>*, 4>& out, double inv_t) {
  using S = compute_t<Src>;
  for (const row_block& b : blocks_of(x)) {
    const Src* base = b.x.data_ptr<Src>();
    const std::int64_t v = b.x.size(1), rs = b.x.stride(0), cs = b.x.stride(1);
    const bool native = native_16bit<Src>(cs);
    kernels::parallel_rows(b.x.size(0), v, [&](std::int64_t begin, std::int64_t end) {
      std::vector<S> buf;
      for (std::int64_t r = begin; r < end; ++r) {
        const std::int64_t g = b.offset + r;
        const auto at_row = [g](S* p) { return p ? p + g : nullptr; };
        // One row through the kernel (runs inline: one row never starts a thread).
        const auto one_row = [&](const auto* row) {
          kernels::logits_forward(row, 1, v, labels ? labels + g : nullptr, ignore_index, at_row(out[0]),
                                  at_row(out[1]), at_row(out[2]), nullptr, nullptr, at_row(out[3]), inv_t);
        };
        if constexpr (is_16bit_v<Src>)
          if (native) {
            one_row(as_eigen(base + r * rs));
            continue;
          }
        one_row(load_row<Src, S>(base + r * rs, cs, v, buf));
      }
    });
  }
}

/// Backward, row by row, into out [N, V] (contiguous, the logits' dtype): for each row,
/// skip(g) -> zero row; else coeff(g, x_label, stats) gives the coefficients (x_label: the row's logit
/// at label(g) in the compute type, 0 when label(g) is negative) and label(g) the one-hot column
/// (negative: none). bfloat16/float16 rows with unit column stride are read natively (statistics and
/// the 16-bit gradient computed in registers: kernels::write_row_backward_16). inv_t = 1/T: the statistics
/// of x / T, the chain rule applied by the writers. with_entropy: coeff reads st.entropy() (the statistics pass then
/// also sums t; s is the same either way).
template <class Src, class Skip, class Label, class Coeff>
void rows_backward(const at::Tensor& x, Src* out, Skip&& skip, Label&& label, Coeff&& coeff, double inv_t,
                   bool with_entropy = true) {
  using S = compute_t<Src>;
  for (const row_block& b : blocks_of(x)) {
    const Src* base = b.x.data_ptr<Src>();
    const std::int64_t v = b.x.size(1), rs = b.x.stride(0), cs = b.x.stride(1);
    const bool native = native_16bit<Src>(cs);
    kernels::parallel_rows(b.x.size(0), v, [&](std::int64_t begin, std::int64_t end) {
      std::vector<S> buf;
      std::vector<S> block_max(static_cast<std::size_t>(kernels::blocks_per_row(v)));
      for (std::int64_t r = begin; r < end; ++r) {
        const std::int64_t g = b.offset + r;
        Src* o = out + g * v;
        if (skip(g)) {
          std::fill(o, o + v, Src(0));
          continue;
        }
        const std::int64_t y = label(g);
        if constexpr (is_16bit_v<Src>) {
          if (native) {
            const auto* row = as_eigen(base + r * rs);
            const kernels::row_stats<float> st = kernels::reduce_row(row, v, inv_t);
            const float x_label = y >= 0 && y < v ? kernels::detail::widen(row[y]) : 0.0f;
            kernels::write_row_backward_16(row, v, st, coeff(g, x_label, st), y, as_eigen(o));
            continue;
          }
        }
        const S* row = load_row<Src, S>(base + r * rs, cs, v, buf);
        const S x_label = y >= 0 && y < v ? row[y] : S(0);
        if constexpr (std::is_same_v<Src, S>) {
          // The statistics pass keeps its exponentials in the output row; a β = 0 gradient
          // (cross-entropy, log-prob, logsumexp) rescales them: one exp per logit.
          const kernels::row_stats<S> st = kernels::reduce_row_keep(row, v, o, block_max.data(), with_entropy, inv_t);
          const kernels::backward_coefficients k = coeff(g, x_label, st);
          if (k.beta == 0.0)
            kernels::write_row_backward_kept(o, v, st, block_max.data(), k, y, o);
          else
            kernels::write_row_backward(row, v, st, k, y, o);
        } else {
          const kernels::row_stats<S> st = kernels::reduce_row(row, v, inv_t);
          const kernels::backward_coefficients k = coeff(g, x_label, st);
          // row is buf: the gradient overwrites it in place, then narrows to the logits' dtype.
          S* w = buf.data();
          kernels::write_row_backward(row, v, st, k, y, w);
          for (std::int64_t i = 0; i < v; ++i) o[i] = static_cast<Src>(w[i]);
        }
      }
    });
  }
}
#endif

/// One fused forward over the rows of x [..., V] (no autograd): the requested [...] outputs in the
/// compute dtype (float32 for half logits). labels: int64 on x's device (CPU paths: contiguous).
inline row_outputs forward(const at::Tensor& x, const at::Tensor& labels, const logits_stats_request& q) {
  const bool with_labels = labels.defined() && labels.numel() > 0;
  const auto rows_like = [&] {
    return at::empty(x.sizes().slice(0, static_cast<std::size_t>(x.dim() - 1)), x.options().dtype(compute_type(x)));
  };
  row_outputs out;
  if (q.logsumexp) out.logsumexp = rows_like();
  if (q.entropy) out.entropy = rows_like();
  // (The caller passes labels whenever it asks for log-probs or hits; they are empty only with no rows.)
  if (q.logprob) out.logprob = rows_like();
  if (q.argmax_hit) out.argmax_hit = rows_like();
  const std::int64_t rows = x.size(-1) == 0 ? 0 : x.numel() / x.size(-1);
  if (rows == 0 || x.size(-1) == 0) {
    if (out.logsumexp.defined()) out.logsumexp.fill_(-std::numeric_limits<double>::infinity());
    for (at::Tensor* t : {&out.entropy, &out.logprob, &out.argmax_hit})
      if (t->defined()) t->zero_();
    return out;
  }
  const logits_path path = choose(x);
  if (path == logits_path::chunked) {
    chunked_forward(x, with_labels ? labels : at::Tensor(), q, out);
    return out;
  }
  [[maybe_unused]] const double inv_t = 1.0 / q.temperature;  // read by the CPU kernel paths only
#if POSTTRAIN_TORCH_CPU_KERNELS
  const std::int64_t v = x.size(-1);
  const std::int64_t* lab = with_labels ? labels.data_ptr<std::int64_t>() : nullptr;
  const auto ptr = [](const at::Tensor& t, auto tag) -> decltype(tag) {
    using P = decltype(tag);
    return t.defined() ? t.data_ptr<std::remove_pointer_t<P>>() : nullptr;
  };
  if (path == logits_path::kernel) {
    const auto run = [&](auto* xp) {
      using S = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
      S* none = nullptr;
      kernels::logits_forward<S>(xp, rows, v, lab, q.ignore_index, ptr(out.logsumexp, none), ptr(out.logprob, none),
                                 ptr(out.entropy, none), nullptr, nullptr, ptr(out.argmax_hit, none), inv_t);
    };
    if (x.scalar_type() == at::kFloat)
      run(x.data_ptr<float>());
    else
      run(x.data_ptr<double>());
    return out;
  }
  dispatch_logits(x.scalar_type(), [&](auto tag) {
    using Src = decltype(tag);
    using S = compute_t<Src>;
    S* none = nullptr;
    rows_forward<Src>(
        x, lab, q.ignore_index,
        {ptr(out.logsumexp, none), ptr(out.logprob, none), ptr(out.entropy, none), ptr(out.argmax_hit, none)}, inv_t);
  });
#endif
  return out;
}

/// Upstream gradients of the differentiable outputs, each [...] or undefined (zero).
struct row_grads {
  at::Tensor logsumexp, logprob, entropy;
};

/// grad_x[r, v] = p·(α_r + β_r·log p) + d_r·([v = y_r] − p) with, from the upstream gradients
/// g_lse, g_lp (0 where the label is ignored) and g_H:
///   α = g_lse − g_H·H,  β = −g_H,  d = g_lp
/// (d lse/dx = p, d log p_y/dx = onehot(y) − p, dH/dx = −p(log p + H)); in x's dtype: one read for
/// the statistics, one read + write, per row (kernel/rows paths) or per chunk (chunked path).
/// With a temperature T, p = softmax(x / T) and the whole gradient is divided by T (chain rule).
/// A row whose upstream gradients are all 0 (a masked or ignored token) gets an exact 0, whatever its logits.
inline at::Tensor backward(const at::Tensor& x, const at::Tensor& labels, const row_grads& g_in,
                           std::int64_t ignore_index, double temperature = 1.0) {
  const double inv_t = 1.0 / temperature;
  at::Tensor out = at::empty(x.sizes(), x.options());  // contiguous
  if (out.numel() == 0) return out;
  const at::ScalarType c = compute_type(x);
  const std::int64_t rows = out.numel() / x.size(-1);
  const auto flat = [&](const at::Tensor& g) {
    return g.defined() ? g.to(x.device(), c).contiguous().view({-1}) : at::zeros({rows}, x.options().dtype(c));
  };
  const bool with_labels = labels.defined() && labels.numel() > 0 && g_in.logprob.defined();
  const at::Tensor y = with_labels ? labels.reshape({-1}) : at::Tensor();
  const bool need_entropy = g_in.entropy.defined();
  if (choose(x) == logits_path::chunked) {
    const at::Tensor g_lse = flat(g_in.logsumexp), g_ent = flat(g_in.entropy);
    // An ignored label's log-prob is the constant 0: its upstream gradient is dropped.
    const at::Tensor g_lp = with_labels
                                ? at::where(y.ne(ignore_index), flat(g_in.logprob), at::zeros({}, g_lse.options()))
                                : at::zeros({rows}, g_lse.options());
    const at::Tensor y_safe = with_labels ? at::where(y.ne(ignore_index), y, at::zeros_like(y)) : at::Tensor();
    chunked_backward(
        x, y_safe, out,
        [&](std::int64_t first, std::int64_t len, const chunk_stats&, const at::Tensor& logp, const at::Tensor& p,
            const at::Tensor&) {
          const at::Tensor gl = g_lse.narrow(0, first, len).unsqueeze(1);
          const at::Tensor gp = g_lp.narrow(0, first, len).unsqueeze(1);
          chunk_coefficients k{gl, {}, {}, {}, with_labels ? gp : at::Tensor()};
          if (need_entropy) {
            const at::Tensor ge = g_ent.narrow(0, first, len).unsqueeze(1);
            const at::Tensor h = -(p * logp.clamp_min(-1000.0)).sum(1, true);
            k.alpha = k.alpha - ge * h;
            k.beta = -ge;
          }
          return k;
        },
        inv_t, g_lse.ne(0).logical_or_(g_lp.ne(0)).logical_or_(g_ent.ne(0)));
    return out;
  }
#if POSTTRAIN_TORCH_CPU_KERNELS
  // An undefined upstream gradient is 0 (no zero-filled [N] tensor for it), and an ignored label's
  // log-prob is the constant 0: its upstream gradient is dropped (coefficient 0).
  const auto flat_or_none = [&](const at::Tensor& g) {
    return g.defined() ? g.to(x.device(), c).contiguous().view({-1}) : at::Tensor();
  };
  const at::Tensor g_lse = flat_or_none(g_in.logsumexp), g_ent = flat_or_none(g_in.entropy);
  const at::Tensor g_lp = with_labels ? flat_or_none(g_in.logprob) : at::Tensor();
  const at::Tensor yc = with_labels ? y.to(at::kCPU).contiguous() : at::Tensor();
  const std::int64_t* lab = with_labels ? yc.data_ptr<std::int64_t>() : nullptr;
  dispatch_logits(x.scalar_type(), [&](auto tag) {
    using Src = decltype(tag);
    using S = compute_t<Src>;
    const auto data = [](const at::Tensor& t) -> const S* { return t.defined() ? t.data_ptr<S>() : nullptr; };
    const S* gl = data(g_lse);
    const S* gp = data(g_lp);
    const S* ge = data(g_ent);
    // A row whose upstream gradients are all 0 gets an exact 0 (not 0·NaN where its logits hold NaN: an ignored
    // row of sft_loss with label smoothing gave a NaN gradient beside a finite loss).
    const auto zero_upstream = [&](std::int64_t r) {
      return (!gl || gl[r] == S(0)) && (!gp || lab[r] == ignore_index || gp[r] == S(0)) && (!ge || ge[r] == S(0));
    };
    rows_backward<Src>(
        x, out.data_ptr<Src>(), zero_upstream,
        [&](std::int64_t r) { return lab && lab[r] != ignore_index ? lab[r] : std::int64_t{-1}; },
        [&](std::int64_t r, S, const kernels::row_stats<S>& st) {
          const double a = gl ? static_cast<double>(gl[r]) : 0.0;
          const double b = gp && lab[r] != ignore_index ? static_cast<double>(gp[r]) : 0.0;
          const double e = need_entropy ? static_cast<double>(ge[r]) : 0.0;
          return kernels::backward_coefficients{a - (need_entropy ? e * st.entropy() : 0.0), -e, 0.0, 0.0, b};
        },
        inv_t, need_entropy);
  });
#endif
  return out;
}

/// sft_loss_backward's gradient (fused.hpp's ce_backward hook): per row with label y and weight w,
///   w·[(f + 2z·lse)·p − f·(1−ε)·onehot(y) − f·ε/V], f = sg(p_y) with DFT else 1; 0 where y is ignored.
inline at::Tensor ce_backward(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& weights,
                              const ce_backward_args& a) {
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (out.numel() == 0) return out;
  const at::ScalarType c = compute_type(x);
  const std::int64_t v = x.size(-1);
  const at::Tensor w = weights.to(x.device(), c).contiguous().view({-1});
  const at::Tensor y = labels.to(x.device(), at::kLong).contiguous().view({-1});
  const double inv_t = 1.0 / a.temperature;
  if (choose(x) == logits_path::chunked) {
    const at::Tensor valid_all = y.ne(a.ignore_index);
    const at::Tensor y_safe = at::where(valid_all, y, at::zeros_like(y));
    chunked_backward(
        x, y_safe, out,
        [&](std::int64_t first, std::int64_t len, const chunk_stats& st, const at::Tensor& logp, const at::Tensor&,
            const at::Tensor& yc) {
          const at::Tensor valid = valid_all.narrow(0, first, len).unsqueeze(1);
          // Ignored rows: every coefficient 0 (the where keeps NaN rows out too).
          const at::Tensor wr =
              at::where(valid, w.narrow(0, first, len).unsqueeze(1), at::zeros({len, 1}, w.options()));
          const at::Tensor f = a.dft ? logp.gather(1, yc).exp() : at::ones_like(wr);
          at::Tensor alpha = f;
          if (a.z_loss > 0.0) alpha = alpha + 2.0 * a.z_loss * st.lse();
          chunk_coefficients k{
              at::where(valid, wr * alpha, at::zeros_like(wr)), {}, wr * f * (1.0 - a.label_smoothing), {}, {}};
          if (a.label_smoothing > 0.0) k.c = wr * f * (a.label_smoothing / static_cast<double>(v));
          return k;
        },
        inv_t);
    // Rows of ignored labels are exactly 0 even where their logits hold NaN.
    out.view({-1, v}).masked_fill_(valid_all.logical_not().unsqueeze(1), 0.0);
    return out;
  }
#if POSTTRAIN_TORCH_CPU_KERNELS
  const at::Tensor yc = y.to(at::kCPU).contiguous();
  const std::int64_t* lab = yc.data_ptr<std::int64_t>();
  dispatch_logits(x.scalar_type(), [&](auto tag) {
    using Src = decltype(tag);
    using S = compute_t<Src>;
    const S* wp = w.data_ptr<S>();
    rows_backward<Src>(
        x, out.data_ptr<Src>(), [&](std::int64_t r) { return lab[r] == a.ignore_index; },
        [&](std::int64_t r) { return lab[r]; },
        [&](std::int64_t r, S x_label, const kernels::row_stats<S>& st) {
          return kernels::cross_entropy_coefficients(st, x_label, v, static_cast<double>(wp[r]), a.label_smoothing,
                                                     a.z_loss, a.dft);
        },
        inv_t, false);  // the cross-entropy coefficients read m, log s and lse, never t
  });
#endif
  return out;
}

}  // namespace detail::torch_kernels
}  // namespace posttrain
