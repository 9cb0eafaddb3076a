// posttrain/kernels/linear_ce_cpu.hpp — fused linear cross-entropy on CPU buffers.
//
// hidden X [N, H] and LM head W [V, H] (row-major float or double), labels y [N]:
//   logits  Z = X·Wᵀ                                                           [N, V]
//   ℓ_r     = (1-ε)(lse_r - Z_{r,y}) + ε(lse_r - mean_v Z_rv) + z·lse_r²          (0 where y = ignore_index)
//   G       = ∂L/∂Z = s·((1 + 2z·lse)·softmax(Z) - (1-ε)·onehot(y) - ε/V)   [N, V] (rows of ignored tokens 0)
//   ∂L/∂X   = G·W  [N, H],   ∂L/∂W = Gᵀ·X  [V, H]
// with s = d L / d ℓ_r the caller's uniform weight (1/num_tokens for a token mean). With a temperature
// τ the logits are Z = X·Wᵀ/τ (the 1/τ is the GEMM's alpha: no extra pass) and ∂L/∂X, ∂L/∂W carry 1/τ
// (folded into s), as kernels/linear_logprobs_cpu.hpp. The N x V
// logits are never held: rows are taken `chunk_rows` at a time (Liger's fused linear
// cross-entropy, linkedin/Liger-Kernel ops/fused_linear_cross_entropy.py): the chunk's logits go
// into one C x V buffer, one pass per row (kernels::reduce_row, online max/sum) gives the loss,
// log p(y) and the entropy, the row's gradient G is written over its logits in place
// (kernels::write_row_backward), then ∂X_c = G_c·W and ∂W += G_cᵀ·X_c. Every gradient is finished
// in this one call (6·N·H·V flops, three GEMMs); a backward only scales them by its grad_output.
// Extra memory: the C x V chunk plus the partial sums below, O(C·(V + 8H)).
//
// GEMMs: Eigen's (Eigen::Map over the caller's buffers, no copies). Eigen only threads its GEMM
// under OpenMP, which posttrain's targets do not enable, so the threading is ours: the vocabulary
// is cut into a fixed number of tiles (`vocab_tiles`, independent of the thread count) and the
// tiles are shared among kernels::num_threads() ranges on the runner (kernels/parallel.hpp). Per tile t (columns V_t):
//   Z_c[:, V_t] = X_c·W[V_t]ᵀ;   P_t = G_c[:, V_t]·W[V_t];   ∂W[V_t] += G_c[:, V_t]ᵀ·X_c
// and ∂X_c = Σ_t P_t summed in tile order. Each tile's products have the same shapes whatever the
// thread count, so results are bitwise independent of it (Eigen's GEMM blocking, and hence its
// summation order, depends only on the operand shapes). Under -fopenmp (or LibTorch's OpenMP
// intra-op pool) our ranges run inside an OpenMP team, where Eigen's GEMM stays single-threaded.
// The chunk/tile/GEMM driver (linear_chunks below) is shared with kernels/linear_logprobs_cpu.hpp.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#include "posttrain/kernels/logits_cpu.hpp"

namespace posttrain::kernels {

/// Options of the fused linear cross-entropy (PyTorch cross_entropy semantics plus PaLM's z-loss).
struct linear_ce_options {
  std::int64_t ignore_index = -100;
  double label_smoothing = 0.0;  ///< ε in [0, 1): (1-ε)·nll + ε·(lse - mean_v z_v)
  double z_loss = 0.0;           ///< z·lse² (PaLM, arXiv:2204.02311 §5)
  std::int64_t chunk_rows = 0;   ///< rows per chunk; <= 0 picks default_chunk_rows(V, sizeof(S))
  double temperature = 1.0;      ///< τ > 0: logits are X·Wᵀ / τ; 1 = none
};

/// Outputs of one call; any pointer may be null (that output is not computed). grad_hidden [N, H]
/// is overwritten; grad_head [V, H] is accumulated into (+=), so a caller can sum over micro-batches.
/// When both gradient pointers are null the call is forward-only (one GEMM: 2·N·H·V flops).
template <class S>
struct linear_ce_buffers {
  S* loss = nullptr;         ///< [N] ℓ_r (0 at ignored rows)
  S* logprob = nullptr;      ///< [N] log softmax(Z_r)[y_r] (0 at ignored rows); no gradient flows from it
  S* entropy = nullptr;      ///< [N] -Σ p log p of every row (ignored rows too); no gradient flows from it
  S* grad_hidden = nullptr;  ///< [N, H] ∂L/∂X, written
  S* grad_head = nullptr;    ///< [V, H] ∂L/∂W, accumulated
};

struct linear_ce_totals {
  double loss_sum = 0.0;       ///< Σ_r ℓ_r over non-ignored rows (in double, row order)
  std::int64_t num_valid = 0;  ///< rows whose label is not ignore_index
};

/// Bytes of the chunk's logits buffer the default chunk size aims at: 64 MiB (110 rows at
/// V = 151936 in float32). Larger chunks mean fewer passes over ∂W (read and written once per
/// chunk) but a larger buffer; on the 2-core test machine 64 and 128 MiB chunks ran S3-shaped
/// problems at about the same speed and 256 MiB ones slower (benchmarks/README.md).
inline constexpr std::int64_t default_chunk_bytes = std::int64_t{64} << 20;

/// Rows per chunk so that chunk x vocab elements of `element_size` bytes fill default_chunk_bytes
/// (at least 1 row).
inline std::int64_t default_chunk_rows(std::int64_t vocab, std::size_t element_size) {
  const std::int64_t row_bytes = std::max<std::int64_t>(1, vocab) * static_cast<std::int64_t>(element_size);
  return std::max<std::int64_t>(1, default_chunk_bytes / row_bytes);
}

/// The vocabulary is cut into this many tiles (fewer when V is small), shared among the threads.
inline constexpr std::int64_t vocab_tiles = 8;
/// Narrowest tile: below this a tile's GEMM is too thin to be worth its own share.
inline constexpr std::int64_t min_tile_columns = 256;

namespace detail {

/// Alignment of the kernels' workspaces: a cache line, and the widest packet (AVX-512). Eigen's
/// element-wise loops run scalar iterations until the destination is packet-aligned, and the scalar
/// exp of those elements differs from the packet exp in the last bit; a workspace at malloc's
/// 16-byte alignment therefore gave results that depended on earlier heap allocations under
/// AVX/AVX-512. At a fixed alignment, which elements take the scalar path depends only on the shapes.
inline constexpr std::size_t workspace_alignment = 64;

struct aligned_array_delete {
  void operator()(void* p) const { ::operator delete[](p, std::align_val_t{workspace_alignment}); }
};
template <class S>
using aligned_array = std::unique_ptr<S[], aligned_array_delete>;

/// n uninitialised elements at a workspace_alignment boundary (null for n = 0).
template <class S>
aligned_array<S> make_aligned_array(std::int64_t n) {
  static_assert(std::is_trivially_default_constructible_v<S>);
  if (n <= 0) return aligned_array<S>();
  return aligned_array<S>(static_cast<S*>(
      ::operator new[](static_cast<std::size_t>(n) * sizeof(S), std::align_val_t{workspace_alignment})));
}

/// Calls f(t) for t in [0, tiles), tile t on range t mod T (T = min(num_threads(), tiles)), each range
/// on the runner (kernels/parallel.hpp). Which thread computes a tile does not change its value.
template <class F>
void parallel_tiles(std::int64_t tiles, F&& f) {
  const std::int64_t workers = std::min<std::int64_t>(static_cast<std::int64_t>(num_threads()), tiles);
  run_parallel(workers, [&f, tiles, workers](std::int64_t w) {
    for (std::int64_t t = w; t < tiles; t += workers) f(t);
  });
}

}  // namespace detail

/// The chunk/tile driver shared by the fused linear kernels (this file's linear_cross_entropy and
/// kernels/linear_logprobs_cpu.hpp): for each chunk of `chunk` rows starting at c0 (C rows),
///   1. Z_c = logit_scale·X_c·Wᵀ into a [C, V] buffer, tile by tile of the vocabulary;
///   2. rows(c0, C, Z_c) does the per-row work and returns whether gradients flow from this
///      chunk; if so it has overwritten Z_c with G_c = ∂L/∂Z_c (of the unscaled X·Wᵀ);
///   3. then ∂X_c = G_c·W is written into grad_hidden (when not null) and ∂W += G_cᵀ·X_c into
///      grad_head (when not null).
/// When rows returns false, grad_hidden's chunk is left untouched (the caller fills it).
template <class S, class Rows>
void linear_chunks(const S* hidden, const S* head, std::int64_t rows, std::int64_t hidden_size, std::int64_t vocab,
                   std::int64_t chunk_rows, S logit_scale, S* grad_hidden, S* grad_head, Rows&& process) {
  static_assert(std::is_same_v<S, float> || std::is_same_v<S, double>);
  using row_matrix = Eigen::Matrix<S, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using const_map = Eigen::Map<const row_matrix, 0, Eigen::OuterStride<>>;
  using map = Eigen::Map<row_matrix, 0, Eigen::OuterStride<>>;
  using array = Eigen::Array<S, Eigen::Dynamic, 1>;

  if (rows <= 0 || vocab <= 0) return;
  const std::int64_t H = hidden_size, V = vocab;
  const std::int64_t chunk = std::min(rows, chunk_rows > 0 ? chunk_rows : default_chunk_rows(V, sizeof(S)));

  // Fixed vocabulary tiles (see the file comment): width ⌈V / vocab_tiles⌉, at least min_tile_columns.
  const std::int64_t tile_width = std::max(min_tile_columns, (V + vocab_tiles - 1) / vocab_tiles);
  const std::int64_t tiles = (V + tile_width - 1) / tile_width;

  // The chunk's logits, then its gradient in place: [chunk, V]. Partial ∂X_c per tile: [tiles, chunk, H].
  // Both 64-byte aligned, so that results do not depend on where the heap puts them (see above).
  const detail::aligned_array<S> logits = detail::make_aligned_array<S>(chunk * V);
  const detail::aligned_array<S> partial =
      detail::make_aligned_array<S>(grad_hidden && tiles > 1 ? tiles * chunk * H : 0);

  for (std::int64_t c0 = 0; c0 < rows; c0 += chunk) {
    const std::int64_t C = std::min(chunk, rows - c0);
    const const_map Xc(hidden + c0 * H, C, H, Eigen::OuterStride<>(H));  // [C, H]

    // 1. Z_c = scale·X_c·Wᵀ, tile by tile of the vocabulary (the scale is GEMM's alpha).   [C, V]
    detail::parallel_tiles(tiles, [&](std::int64_t t) {
      const std::int64_t v0 = t * tile_width, vn = std::min(tile_width, V - v0);
      const const_map Wt(head + v0 * H, vn, H, Eigen::OuterStride<>(H));  // [vn, H]
      map Zt(logits.get() + v0, C, vn, Eigen::OuterStride<>(V));          // [C, vn] inside [C, V]
      if (logit_scale == S(1))
        Zt.noalias() = Xc * Wt.transpose();
      else
        Zt.noalias() = logit_scale * (Xc * Wt.transpose());
    });

    // 2. The caller's per-row pass (statistics, outputs, G_c over Z_c).
    if (!process(c0, C, logits.get())) continue;
    if (!grad_hidden && !grad_head) continue;

    // 3. Per tile: P_t = G_c[:, V_t]·W[V_t] ([C, H]) and ∂W[V_t] += G_c[:, V_t]ᵀ·X_c ([vn, H]).
    S* dX = grad_hidden ? grad_hidden + c0 * H : nullptr;
    detail::parallel_tiles(tiles, [&](std::int64_t t) {
      const std::int64_t v0 = t * tile_width, vn = std::min(tile_width, V - v0);
      const const_map Gt(logits.get() + v0, C, vn, Eigen::OuterStride<>(V));  // [C, vn]
      const const_map Wt(head + v0 * H, vn, H, Eigen::OuterStride<>(H));      // [vn, H]
      if (dX) {
        map Pt(tiles > 1 ? partial.get() + t * C * H : dX, C, H, Eigen::OuterStride<>(H));
        Pt.noalias() = Gt * Wt;
      }
      if (grad_head) {
        map dWt(grad_head + v0 * H, vn, H, Eigen::OuterStride<>(H));
        dWt.noalias() += Gt.transpose() * Xc;
      }
    });
    // ∂X_c = Σ_t P_t, in tile order (independent of the thread count).
    if (dX && tiles > 1) {
      Eigen::Map<array> acc(dX, static_cast<Eigen::Index>(C * H));
      acc = Eigen::Map<const array>(partial.get(), static_cast<Eigen::Index>(C * H));
      for (std::int64_t t = 1; t < tiles; ++t)
        acc += Eigen::Map<const array>(partial.get() + t * C * H, static_cast<Eigen::Index>(C * H));
    }
  }
}

/// Fused linear cross-entropy forward (+ gradients when requested) over X [rows, hidden_size],
/// W [vocab, hidden_size], labels [rows] (each in [0, vocab) or == ignore_index; the caller
/// validates). grad_scale is d L / d ℓ_r for every non-ignored row. Returns Σ ℓ_r and the count
/// of non-ignored rows. See the file comment for the formulas and the threading.
template <class S>
linear_ce_totals linear_cross_entropy(const S* hidden, const S* head, std::int64_t rows, std::int64_t hidden_size,
                                      std::int64_t vocab, const std::int64_t* labels, const linear_ce_options& opt,
                                      double grad_scale, const linear_ce_buffers<S>& out) {
  static_assert(std::is_same_v<S, float> || std::is_same_v<S, double>);
  using array = Eigen::Array<S, Eigen::Dynamic, 1>;

  linear_ce_totals totals;
  if (rows <= 0 || vocab <= 0) return totals;
  const std::int64_t V = vocab;
  const bool want_grad = out.grad_hidden != nullptr || out.grad_head != nullptr;
  const std::int64_t chunk = std::min(rows, opt.chunk_rows > 0 ? opt.chunk_rows : default_chunk_rows(V, sizeof(S)));
  const double eps = opt.label_smoothing, z = opt.z_loss;
  const double inv_t = 1.0 / opt.temperature;
  // d L / d Z_r times dZ/d(X·Wᵀ) = 1/τ: the whole row gradient of the unscaled product (exact at τ = 1).
  const double row_scale = opt.temperature == 1.0 ? grad_scale : grad_scale * inv_t;
  std::vector<double> row_loss(static_cast<std::size_t>(chunk));

  // One pass per row of the chunk's logits: statistics, outputs, and the row's gradient over its logits.
  const auto rows_of_chunk = [&](std::int64_t c0, std::int64_t C, S* logits) {
    parallel_rows(C, V, [&](std::int64_t begin, std::int64_t end) {
      for (std::int64_t r = begin; r < end; ++r) {
        const std::int64_t i = c0 + r;
        S* x = logits + r * V;
        const std::int64_t y = labels[i];
        const bool ignored = y == opt.ignore_index;
        const row_stats<S> st = reduce_row(x, V);
        if (out.entropy) out.entropy[i] = static_cast<S>(st.entropy());
        if (ignored) {
          row_loss[static_cast<std::size_t>(r)] = 0.0;
          if (out.loss) out.loss[i] = S(0);
          if (out.logprob) out.logprob[i] = S(0);
          if (want_grad) Eigen::Map<array>(x, static_cast<Eigen::Index>(V)).setZero();
          continue;
        }
        const double lse = st.logsumexp();
        // log p(y) = (z_y - m) - log s: z_y - m first keeps precision near the max (as logits_forward).
        const double logp = st.finite() ? static_cast<double>(x[y] - st.m) - st.log_s : static_cast<double>(x[y]) - lse;
        double l = -(1.0 - eps) * logp + z * lse * lse;
        if (eps > 0.0) {
          // PyTorch label smoothing: ε·(lse - mean_v z_v); the row sum blockwise in double (as reduce_row).
          double sx = 0.0;
          for (std::int64_t b = 0; b < V; b += block_size)
            sx += static_cast<double>(
                Eigen::Map<const array>(x + b, static_cast<Eigen::Index>(std::min(block_size, V - b))).sum());
          l += eps * (lse - sx / static_cast<double>(V));
        }
        row_loss[static_cast<std::size_t>(r)] = l;
        if (out.loss) out.loss[i] = static_cast<S>(l);
        if (out.logprob) out.logprob[i] = static_cast<S>(logp);
        if (want_grad) {
          // G_r = s·((1 + 2z·lse)·p - (1-ε)·onehot(y) - ε/V), written over the row's logits.
          const backward_coefficients k{row_scale * (1.0 + 2.0 * z * lse), 0.0, row_scale * (1.0 - eps),
                                        row_scale * eps / static_cast<double>(V)};
          write_row_backward(x, V, st, k, y, x);
        }
      }
    });
    for (std::int64_t r = 0; r < C; ++r) {
      totals.loss_sum += row_loss[static_cast<std::size_t>(r)];
      totals.num_valid += labels[c0 + r] != opt.ignore_index ? 1 : 0;
    }
    return want_grad;
  };
  linear_chunks<S>(hidden, head, rows, hidden_size, V, chunk, static_cast<S>(inv_t), out.grad_hidden, out.grad_head,
                   rows_of_chunk);
  return totals;
}

}  // namespace posttrain::kernels
