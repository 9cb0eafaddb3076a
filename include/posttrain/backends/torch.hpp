// posttrain/backends/torch.hpp — the LibTorch backend: `torch::Tensor` on any device and dtype.
//
// Every operation is a LibTorch op, so autograd flows through every posttrain loss: call
// `result.loss.backward()` as with any torch expression. bfloat16/float16 inputs are computed in
// float32, as TRL and verl upcast logits before a loss: by the algorithms (ops::upcast), except
// that the logits primitives below read half logits themselves, row by row or chunk by chunk,
// without a whole float32 copy (see torch_backend).
#pragma once

#include <ATen/ATen.h>
#include <ATen/TensorUtils.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/types.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "posttrain/detail/kd_fused.hpp"
#include "posttrain/error.hpp"
#include "posttrain/tensor.hpp"

// posttrain's fused CPU kernels are written with Eigen's packet math: LibTorch CPU tensors use them
// when Eigen is on the include path (link posttrain::eigen too), and the chunked LibTorch path otherwise.
#if __has_include(<Eigen/Core>)
#include "posttrain/kernels/logits_cpu.hpp"
#define POSTTRAIN_TORCH_CPU_KERNELS 1
#else
#define POSTTRAIN_TORCH_CPU_KERNELS 0
#endif

namespace posttrain {

/// Knobs of the torch backend's logits paths (process-wide, like kernels::set_num_threads).
///
/// The fused primitives (logsumexp, token log-probs, entropy, their backward, sft_loss_backward)
/// take one of three paths, chosen per call from the logits tensor:
///   kernel   contiguous CPU float32/float64: posttrain::kernels read the tensor in place.
///   rows     other CPU tensors (bfloat16/float16, strided views): each thread upcasts one row at a
///            time into its own float32 (float64 for double) row buffer and runs the same kernels,
///            so the extra memory is threads x V elements. Needs Eigen on the include path.
///   chunked  CUDA (any device), and CPU without Eigen: LibTorch ops on chunks of rows; each chunk
///            is upcast to float32 (float64 stays float64), reduced, and written into the [N]
///            result (or the [N, V] gradient, in the logits' dtype). Peak extra memory is a few
///            chunk-sized float32 temporaries, never an N x V float32 copy.
/// The chunk knobs below size the chunked path only (the rows path holds one row per thread).
/// Half inputs give float32 results (the gradient is in the logits' dtype), as the generic path's
/// upcast does; a backward recorded with create_graph = true uses whole-tensor LibTorch ops (one
/// float32 copy for half logits). NOT VERIFIED ON A GPU: the chunked path is device-agnostic LibTorch code, tested on
/// CPU (forced with force_logits_path) and by CUDA tests that skip when no device is present.
namespace torch_backend {

namespace detail {
inline std::atomic<std::int64_t>& chunk_bytes_setting() {
  static std::atomic<std::int64_t> b{0};
  return b;
}
inline std::atomic<std::int64_t>& chunk_rows_setting() {
  static std::atomic<std::int64_t> r{0};
  return r;
}
}  // namespace detail

/// Float32 bytes of one chunk of the chunked path when never set: 128 MiB.
inline constexpr std::int64_t default_chunk_bytes = std::int64_t{128} << 20;

/// Bytes of one float32 chunk of the chunked path; bytes <= 0 restores default_chunk_bytes.
inline void set_chunk_bytes(std::int64_t bytes) {
  detail::chunk_bytes_setting().store(bytes < 0 ? 0 : bytes, std::memory_order_relaxed);
}
inline std::int64_t chunk_bytes() {
  const std::int64_t b = detail::chunk_bytes_setting().load(std::memory_order_relaxed);
  return b > 0 ? b : default_chunk_bytes;
}
/// Fixes the rows of a chunk (rows > 0), overriding chunk_bytes; rows <= 0 goes back to bytes.
inline void set_chunk_rows(std::int64_t rows) {
  detail::chunk_rows_setting().store(rows < 0 ? 0 : rows, std::memory_order_relaxed);
}
/// Rows of one chunk for a vocabulary of `vocab`: the fixed count, or chunk_bytes / (4·V), >= 1.
inline std::int64_t chunk_rows(std::int64_t vocab) {
  const std::int64_t r = detail::chunk_rows_setting().load(std::memory_order_relaxed);
  if (r > 0) return r;
  return std::max<std::int64_t>(1, chunk_bytes() / (4 * std::max<std::int64_t>(vocab, 1)));
}

enum class logits_path { automatic, kernel, rows, chunked };
namespace detail {
inline std::atomic<logits_path>& forced_path() {
  static std::atomic<logits_path> p{logits_path::automatic};
  return p;
}
}  // namespace detail
/// Test hook: on CPU, take `rows` or `chunked` even where another path would run (automatic
/// restores the choice above). CUDA tensors always take the chunked path.
inline void force_logits_path(logits_path p) { detail::forced_path().store(p, std::memory_order_relaxed); }
inline logits_path forced_logits_path() { return detail::forced_path().load(std::memory_order_relaxed); }

}  // namespace torch_backend

namespace detail::torch_kernels {

using torch_backend::logits_path;

enum class output { logsumexp, logprob, entropy };

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
/// log s = log Σ e^{xs}.
struct chunk_stats {
  at::Tensor row_max, m, xs, e, log_s;
  chunk_stats(const at::Tensor& chunk, at::ScalarType c, bool keep_exp) {
    row_max = at::amax(chunk, {1}, true).to(c);  // [c, 1]; max is exact in any dtype
    m = at::where(at::isfinite(row_max), row_max, at::zeros_like(row_max));
    xs = chunk - m;  // [c, V]
    at::Tensor ex = xs.exp();
    log_s = ex.sum(1, true).log();  // [c, 1]
    if (keep_exp) e = std::move(ex);
  }
};

/// out[offset + r] for every row of x, chunk by chunk.
inline void chunked_forward(const at::Tensor& x, const at::Tensor& labels, output what, const at::Tensor& out) {
  const at::ScalarType c = out.scalar_type();
  const at::Tensor flat_out = out.view({-1});
  const at::Tensor y = what == output::logprob ? labels.reshape({-1}).to(at::kLong) : at::Tensor();
  const std::int64_t step = torch_backend::chunk_rows(x.size(-1));
  for (const row_block& b : blocks_of(x)) {
    const std::int64_t n = b.x.size(0);
    for (std::int64_t s = 0; s < n; s += step) {
      const std::int64_t len = std::min(step, n - s);
      const at::Tensor chunk = b.x.narrow(0, s, len);
      const chunk_stats st(chunk, c, what == output::entropy);
      at::Tensor r;
      switch (what) {
        case output::logsumexp: r = st.log_s + st.m; break;
        case output::logprob: r = st.xs.gather(1, y.narrow(0, b.offset + s, len).unsqueeze(1)) - st.log_s; break;
        case output::entropy: {
          // H = log s - Σ e^{xs}·xs / s; xs clamped at -1000 so -inf logits add 0·(-1000) = 0.
          const at::Tensor t = (st.e * st.xs.clamp_min(-1000.0)).sum(1, true);
          const at::Tensor h = st.log_s - t / st.log_s.exp();
          // No finite row max: a row of -inf (or with +inf) is empty or a point mass: 0; NaN stays.
          const at::Tensor& mx = st.row_max;
          r = at::where(at::isfinite(mx), h, at::where(at::isnan(mx), mx, at::zeros_like(mx)));
          break;
        }
      }
      flat_out.narrow(0, b.offset + s, len).copy_(r.view({-1}));
    }
  }
}

/// Per-row coefficients of the chunked backward: grad = p·(α + β·log p) − b·onehot(y) − c.
struct chunk_coefficients {
  at::Tensor alpha, beta, b, c;  // [len, 1] each, or undefined (0)
};

/// grad[offset + r, :] for every row, chunk by chunk, written in out's dtype (the logits').
template <class Coefficients>
void chunked_backward(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& out, Coefficients&& coeff) {
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
      chunk_stats st(chunk, c, false);
      at::Tensor logp = st.xs.sub_(st.log_s);  // in place: xs is this chunk's own copy
      const at::Tensor p = logp.exp();
      const at::Tensor yc = y.defined() ? y.narrow(0, first, len).unsqueeze(1) : at::Tensor();
      const chunk_coefficients k = coeff(first, len, st, logp, p, yc);
      at::Tensor g = k.alpha.defined() ? p * k.alpha : at::zeros_like(p);
      if (k.beta.defined()) g += p * logp.clamp_min(-1000.0) * k.beta;  // p·log p := 0 at -inf logits
      if (k.c.defined()) g -= k.c;
      if (k.b.defined() && yc.defined()) g.scatter_add_(1, yc, -k.b.expand({len, 1}));
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

/// Forward, row by row: out[offset + r] of `what` (labels: contiguous int64 [N], or null).
template <class Src>
void rows_forward(const at::Tensor& x, const std::int64_t* labels, output what, compute_t<Src>* out) {
  using S = compute_t<Src>;
  for (const row_block& b : blocks_of(x)) {
    const Src* base = b.x.data_ptr<Src>();
    const std::int64_t v = b.x.size(1), rs = b.x.stride(0), cs = b.x.stride(1);
    kernels::parallel_rows(b.x.size(0), v, [&](std::int64_t begin, std::int64_t end) {
      std::vector<S> buf;
      for (std::int64_t r = begin; r < end; ++r) {
        const S* row = load_row<Src, S>(base + r * rs, cs, v, buf);
        const std::int64_t g = b.offset + r;
        S* o = out + g;
        // One row through the float kernel (runs inline: one row never starts a thread).
        kernels::logits_forward<S>(row, 1, v, labels ? labels + g : nullptr, std::numeric_limits<std::int64_t>::min(),
                                   what == output::logsumexp ? o : nullptr, what == output::logprob ? o : nullptr,
                                   what == output::entropy ? o : nullptr);
      }
    });
  }
}

/// Backward, row by row, into out [N, V] (contiguous, the logits' dtype): for each row,
/// skip(g) -> zero row; else coeff(g, row, stats) gives the coefficients and label(g) the one-hot
/// column (negative: none).
template <class Src, class Skip, class Label, class Coeff>
void rows_backward(const at::Tensor& x, Src* out, Skip&& skip, Label&& label, Coeff&& coeff) {
  using S = compute_t<Src>;
  for (const row_block& b : blocks_of(x)) {
    const Src* base = b.x.data_ptr<Src>();
    const std::int64_t v = b.x.size(1), rs = b.x.stride(0), cs = b.x.stride(1);
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
        const S* row = load_row<Src, S>(base + r * rs, cs, v, buf);
        if constexpr (std::is_same_v<Src, S>) {
          // The statistics pass keeps its exponentials in the output row; a β = 0 gradient
          // (cross-entropy, log-prob, logsumexp) rescales them: one exp per logit.
          const kernels::row_stats<S> st = kernels::reduce_row_keep(row, v, o, block_max.data(), true);
          const kernels::backward_coefficients k = coeff(g, row, st);
          if (k.beta == 0.0)
            kernels::write_row_backward_kept(o, v, st, block_max.data(), k, label(g), o);
          else
            kernels::write_row_backward(row, v, st, k, label(g), o);
        } else {
          const kernels::row_stats<S> st = kernels::reduce_row(row, v);
          const kernels::backward_coefficients k = coeff(g, row, st);
          // row is buf: the gradient overwrites it in place, then narrows to the logits' dtype.
          S* w = buf.data();
          kernels::write_row_backward(row, v, st, k, label(g), w);
          for (std::int64_t i = 0; i < v; ++i) o[i] = static_cast<Src>(w[i]);
        }
      }
    });
  }
}
#endif

/// One fused forward over the rows of x [..., V] (no autograd): the [...] result, float32 for
/// half logits.
inline at::Tensor forward(const at::Tensor& x, const at::Tensor& labels, output what) {
  at::Tensor out =
      at::empty(x.sizes().slice(0, static_cast<std::size_t>(x.dim() - 1)), x.options().dtype(compute_type(x)));
  if (out.numel() == 0 || x.size(-1) == 0)
    return out.fill_(what == output::logsumexp ? -std::numeric_limits<double>::infinity() : 0.0);
  const logits_path path = choose(x);
  if (path == logits_path::chunked) {
    chunked_forward(x, labels, what, out);
    return out;
  }
#if POSTTRAIN_TORCH_CPU_KERNELS
  const std::int64_t v = x.size(-1);
  const std::int64_t rows = out.numel();
  const std::int64_t* lab = labels.defined() && labels.numel() > 0 ? labels.data_ptr<std::int64_t>() : nullptr;
  if (path == logits_path::kernel) {
    const auto run = [&](auto* xp, auto* op) {
      using S = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
      kernels::logits_forward<S>(xp, rows, v, lab, std::numeric_limits<std::int64_t>::min(),
                                 what == output::logsumexp ? op : nullptr, what == output::logprob ? op : nullptr,
                                 what == output::entropy ? op : nullptr);
    };
    if (x.scalar_type() == at::kFloat)
      run(x.data_ptr<float>(), out.data_ptr<float>());
    else
      run(x.data_ptr<double>(), out.data_ptr<double>());
    return out;
  }
  dispatch_logits(x.scalar_type(), [&](auto tag) {
    using Src = decltype(tag);
    rows_forward<Src>(x, lab, what, out.data_ptr<compute_t<Src>>());
  });
#endif
  return out;
}

/// grad_x[r, v] = p·(α_r + β_r·log p) − b_r·[v = y_r] with the coefficients of `what` and the
/// incoming gradient g [...] (the analytic backward), in x's dtype: one read for the statistics,
/// one read + write, per row (kernel/rows paths) or per chunk (chunked path).
inline at::Tensor backward(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& grad, output what) {
  at::Tensor out = at::empty(x.sizes(), x.options());  // contiguous
  if (out.numel() == 0) return out;
  const at::ScalarType c = compute_type(x);
  const at::Tensor g = grad.to(x.device(), c).contiguous().view({-1});
  if (choose(x) == logits_path::chunked) {
    chunked_backward(x, what == output::logprob ? labels : at::Tensor(), out,
                     [&](std::int64_t first, std::int64_t len, const chunk_stats&, const at::Tensor& logp,
                         const at::Tensor& p, const at::Tensor&) {
                       const at::Tensor gr = g.narrow(0, first, len).unsqueeze(1);
                       switch (what) {
                         case output::logsumexp: return chunk_coefficients{gr, {}, {}, {}};
                         case output::logprob: return chunk_coefficients{-gr, {}, -gr, {}};  // onehot - p
                         case output::entropy: {
                           const at::Tensor h = -(p * logp.clamp_min(-1000.0)).sum(1, true);
                           return chunk_coefficients{-gr * h, -gr, {}, {}};
                         }
                       }
                       return chunk_coefficients{};
                     });
    return out;
  }
#if POSTTRAIN_TORCH_CPU_KERNELS
  const std::int64_t* lab =
      what == output::logprob && labels.defined() && labels.numel() > 0 ? labels.data_ptr<std::int64_t>() : nullptr;
  dispatch_logits(x.scalar_type(), [&](auto tag) {
    using Src = decltype(tag);
    using S = compute_t<Src>;
    const S* gp = g.data_ptr<S>();
    rows_backward<Src>(
        x, out.data_ptr<Src>(), [](std::int64_t) { return false; },
        [&](std::int64_t r) { return lab ? lab[r] : std::int64_t{-1}; },
        [&](std::int64_t r, const S*, const kernels::row_stats<S>& st) {
          const double gr = static_cast<double>(gp[r]);
          switch (what) {
            case output::logsumexp: return kernels::backward_coefficients{gr, 0.0, 0.0, 0.0};
            case output::logprob: return kernels::backward_coefficients{-gr, 0.0, -gr, 0.0};  // onehot - p
            case output::entropy: return kernels::backward_coefficients{-gr * st.entropy(), -gr, 0.0, 0.0};
          }
          return kernels::backward_coefficients{};
        });
  });
#endif
  return out;
}

/// sft_loss_backward's gradient (tensor.hpp's fused_ce_backward): per row with label y and weight w,
///   w·[(f + 2z·lse)·p − f·(1−ε)·onehot(y) − f·ε/V], f = sg(p_y) with DFT else 1; 0 where y is ignored.
inline at::Tensor ce_backward(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& weights,
                              const ce_backward_args& a) {
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (out.numel() == 0) return out;
  const at::ScalarType c = compute_type(x);
  const std::int64_t v = x.size(-1);
  const at::Tensor w = weights.to(x.device(), c).contiguous().view({-1});
  const at::Tensor y = labels.to(x.device(), at::kLong).contiguous().view({-1});
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
          if (a.z_loss > 0.0) alpha = alpha + 2.0 * a.z_loss * (st.log_s + st.m);
          chunk_coefficients k{
              at::where(valid, wr * alpha, at::zeros_like(wr)), {}, wr * f * (1.0 - a.label_smoothing), {}};
          if (a.label_smoothing > 0.0) k.c = wr * f * (a.label_smoothing / static_cast<double>(v));
          return k;
        });
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
        [&](std::int64_t r, const S* row, const kernels::row_stats<S>& st) {
          return kernels::cross_entropy_coefficients(st, row[lab[r]], v, static_cast<double>(wp[r]), a.label_smoothing,
                                                     a.z_loss, a.dft);
        });
  });
#endif
  return out;
}

/// The same backward in LibTorch ops, differentiable again: used when the graph of the backward
/// is being recorded (create_graph = true), where the kernel's raw output would cut it. (Whole
/// tensors: a half input is upcast to one float32 copy here.)
inline at::Tensor backward_differentiable(const at::Tensor& x_in, const at::Tensor& labels, const at::Tensor& grad,
                                          output what) {
  const at::Tensor x = is_half(x_in.scalar_type()) ? x_in.to(at::kFloat) : x_in;
  const at::Tensor g = grad.to(x.scalar_type()).unsqueeze(-1);
  const at::Tensor logp = at::log_softmax(x, -1);
  const at::Tensor p = logp.exp();
  at::Tensor d;
  switch (what) {
    case output::logsumexp: d = p * g; break;
    case output::logprob: d = (at::one_hot(labels, x.size(-1)).to(x.scalar_type()) - p) * g; break;
    case output::entropy: {
      const at::Tensor logp_safe =
          at::where(x.gt(-std::numeric_limits<double>::infinity()), logp, at::zeros_like(logp));
      const at::Tensor h = -(p * logp_safe).sum(-1, true);
      d = -(p * (logp_safe + h)) * g;
      break;
    }
  }
  return d.to(x_in.scalar_type());
}

/// An autograd node around the fused forward whose backward is the analytic one.
template <output What>
struct fused_function : torch::autograd::Function<fused_function<What>> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& labels) {
    ctx->save_for_backward({x, labels});
    return torch_kernels::forward(x, labels, What);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor grad = at::GradMode::is_enabled() ? backward_differentiable(saved[0], saved[1], grads[0], What)
                                                       : torch_kernels::backward(saved[0], saved[1], grads[0], What);
    return {grad, at::Tensor()};
  }
};

template <output What>
at::Tensor apply(const at::Tensor& x, const at::Tensor& labels) {
  // autograd::Function needs defined tensors: "no labels" travels as an empty index tensor.
  if (x.requires_grad() && at::GradMode::is_enabled())
    return fused_function<What>::apply(x, labels.defined() ? labels : at::empty({0}, x.options().dtype(at::kLong)));
  return torch_kernels::forward(x, labels, What);
}

}  // namespace detail::torch_kernels

template <>
struct tensor_traits<at::Tensor> {
  using T = at::Tensor;
  using index_tensor = at::Tensor;

  static dtype from_scalar_type(c10::ScalarType t) {
    switch (t) {
      case at::kHalf: return dtype::float16;
      case at::kBFloat16: return dtype::bfloat16;
      case at::kFloat: return dtype::float32;
      case at::kDouble: return dtype::float64;
      case at::kInt: return dtype::int32;
      case at::kLong: return dtype::int64;
      case at::kBool: return dtype::boolean;
      default: return dtype::other;
    }
  }
  static c10::ScalarType to_scalar_type(dtype d) {
    switch (d) {
      case dtype::float16: return at::kHalf;
      case dtype::bfloat16: return at::kBFloat16;
      case dtype::float32: return at::kFloat;
      case dtype::float64: return at::kDouble;
      case dtype::int32: return at::kInt;
      case dtype::int64: return at::kLong;
      case dtype::boolean: return at::kBool;
      case dtype::other: break;
    }
    detail::fail("torch backend", "no torch scalar type for dtype ", dtype_name(d));
  }

  static shape_t shape(const T& x) { return x.sizes().vec(); }
  static dtype dtype_of(const T& x) { return from_scalar_type(x.scalar_type()); }
  static std::string device(const T& x) { return x.device().str(); }
  static shape_t index_shape(const T& i) { return i.sizes().vec(); }
  static dtype index_dtype(const T& i) { return from_scalar_type(i.scalar_type()); }
  static std::string index_device(const T& i) { return i.device().str(); }

  static T full(const T& like, const shape_t& s, double value) {
    return at::full(s, value, like.options().requires_grad(false));
  }
  static T one_hot(const T& i, std::int64_t n, const T& like) {
    return at::one_hot(i.to(at::kLong), n).to(like.options().requires_grad(false));
  }

  static T unary(unary_op op, const T& x) {
    switch (op) {
      case unary_op::neg: return -x;
      case unary_op::exp: return x.exp();
      case unary_op::log: return x.log();
      case unary_op::log1p: return x.log1p();
      case unary_op::expm1: return x.expm1();
      case unary_op::abs: return x.abs();
      case unary_op::sqrt: return x.sqrt();
      case unary_op::sign: return x.sign();
    }
    return x;
  }
  static T binary(binary_op op, const T& a, const T& b) {
    switch (op) {
      case binary_op::add: return a + b;
      case binary_op::sub: return a - b;
      case binary_op::mul: return a * b;
      case binary_op::div: return a / b;
      case binary_op::maximum: return at::maximum(a, b);
      case binary_op::minimum: return at::minimum(a, b);
    }
    return a;
  }
  static T compare(compare_op op, const T& a, const T& b) {
    T r;
    switch (op) {
      case compare_op::lt: r = a.lt(b); break;
      case compare_op::le: r = a.le(b); break;
      case compare_op::gt: r = a.gt(b); break;
      case compare_op::ge: r = a.ge(b); break;
      case compare_op::eq: r = a.eq(b); break;
      case compare_op::ne: r = a.ne(b); break;
    }
    return r.to(a.scalar_type());
  }
  static T where(const T& cond, const T& a, const T& b) { return at::where(cond.ne(0), a, b); }
  static T clamp(const T& x, double lo, double hi) {
    const auto bound = [](double v) -> c10::optional<at::Scalar> {
      if (std::isinf(v)) return c10::nullopt;
      return at::Scalar(v);
    };
    return at::clamp(x, bound(lo), bound(hi));
  }
  static T reduce(reduce_op op, const T& x, std::int64_t dim, bool keepdim) {
    switch (op) {
      case reduce_op::sum: return x.sum(dim, keepdim);
      case reduce_op::max: return at::amax(x, {dim}, keepdim);
      case reduce_op::min: return at::amin(x, {dim}, keepdim);
    }
    return x;
  }
  static T argmax_last(const T& x) { return x.argmax(-1); }
  static T gather_last(const T& x, const T& i) { return x.gather(-1, i.to(at::kLong).unsqueeze(-1)).squeeze(-1); }
  static T reshape(const T& x, const shape_t& s) { return x.reshape(s); }
  static T detach(const T& x) { return x.detach(); }
  static T to_dtype(const T& x, dtype d) { return x.to(to_scalar_type(d)); }
  static std::vector<double> to_host(const T& x) {
    const T c = x.detach().to(at::kCPU, at::kDouble).contiguous();
    return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
  }

  static T index_not_equal(const T& i, std::int64_t value, const T& like) { return i.ne(value).to(like.scalar_type()); }
  static T index_equal(const T& a, const T& b, const T& like) { return a.eq(b).to(like.scalar_type()); }
  static T index_replace(const T& i, std::int64_t from, std::int64_t to) {
    return at::where(i.eq(from), at::full({}, to, i.options()), i);
  }
  static std::int64_t index_count_outside(const T& i, std::int64_t lo, std::int64_t hi, std::int64_t except) {
    return (i.ne(except) & (i.lt(lo) | i.ge(hi))).sum().item<std::int64_t>();
  }

  static std::vector<std::int64_t> index_to_host(const T& i) {
    const T c = i.to(at::kCPU, at::kLong).contiguous();
    return std::vector<std::int64_t>(c.data_ptr<std::int64_t>(), c.data_ptr<std::int64_t>() + c.numel());
  }
  static T argsort_last(const T& x) { return std::get<1>(x.sort(/*stable=*/true, /*dim=*/-1, /*descending=*/false)); }
  static T slice(const T& x, std::int64_t dim, std::int64_t start, std::int64_t length) {
    return x.narrow(dim, start, length);
  }
  static T concat(const std::vector<T>& parts, std::int64_t dim) { return at::cat(parts, dim); }
  static T cumsum(const T& x, std::int64_t dim) { return x.cumsum(dim); }

  // ---- fused overrides ----
  // One pass per row (kernel/rows paths on CPU) or per chunk of rows (chunked path: CUDA), inside
  // an autograd node with the analytic backward when the logits require grad; half logits are
  // read as they are (no float32 copy of the whole tensor). See torch_backend above.

  /// The overrides take bfloat16/float16 logits themselves (numerics/logits.hpp skips its upcast).
  static constexpr bool fused_reads_half = true;

  /// logsumexp over the last dimension; rows of -inf give -inf.
  static T fused_logsumexp_last(const T& x) {
    return detail::torch_kernels::apply<detail::torch_kernels::output::logsumexp>(x, T());
  }
  /// TRL's selective log-softmax: log p(label) = (x_y - m) - log Σ e^{x - m}, no [N, V] log_softmax.
  static T fused_token_logprobs(const T& x, const T& labels) {
    using detail::torch_kernels::choose;
    if (choose(x) != torch_backend::logits_path::chunked) {
      // The CPU kernels index the row with the label: check the range first.
      const T lab = labels.to(at::kCPU, at::kLong).contiguous();
      if (index_count_outside(lab, 0, x.size(-1), std::numeric_limits<std::int64_t>::min()) != 0)
        detail::fail("fused_token_logprobs", "a label is outside [0, ", x.size(-1), ")");
      return detail::torch_kernels::apply<detail::torch_kernels::output::logprob>(x, lab);
    }
    return detail::torch_kernels::apply<detail::torch_kernels::output::logprob>(x, labels.to(at::kLong));
  }
  /// Entropy -Σ p log p over the last dimension; -inf logits contribute 0.
  static T fused_entropy_last(const T& x) {
    return detail::torch_kernels::apply<detail::torch_kernels::output::entropy>(x, T());
  }
  /// sft_loss_backward's gradient in the logits' dtype (no autograd graph), per row or per chunk.
  static T fused_ce_backward(const T& x, const T& labels, const T& row_weights, const ce_backward_args& a) {
    return detail::torch_kernels::ce_backward(x.detach(), labels, row_weights.detach(), a);
  }
  /// Distillation per row (losses/distill.hpp) and its student gradient: contiguous CPU float32/64
  /// through kernels/distill_cpu.hpp (inside an autograd node), else the generic composition.
  /// Defined in backends/torch_distill.hpp (included below).
  static T fused_kd_per_token(const T& student, const T& teacher, const fused_kd_spec& spec);
  static T fused_kd_backward(const T& student, const T& teacher, const T& row_weight, const fused_kd_spec& spec);
};

static_assert(tensor<at::Tensor>);

}  // namespace posttrain

#include "posttrain/backends/torch_distill.hpp"
