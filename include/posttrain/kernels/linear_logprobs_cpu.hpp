// posttrain/kernels/linear_logprobs_cpu.hpp — differentiable per-token log-probs and entropy from
// hidden states and the LM head on CPU buffers, without the [N, V] logits.
//
// hidden X [N, H] and LM head W [V, H] (row-major float or double), labels y [N], temperature τ:
//   logits   Z = X·Wᵀ / τ                                   [N, V] (verl/TRL divide by the sampling temperature)
//   lp_r     = log softmax(Z_r)[y_r]                        [N]    (0 where y_r = ignore_index)
//   H_r      = -Σ_v p_rv log p_rv                           [N]    (every row, ignored ones too)
// Backward, given upstream gradients a = ∂L/∂lp and b = ∂L/∂H (either may be absent: zero):
//   d lp_r / d Z_rv = [v = y_r] − p_rv,   d H_r / d Z_rv = −p_rv (log p_rv + H_r)
//   G_r = a_r·(onehot(y_r) − p_r) − b_r·p_r·(log p_r + H_r)  (a_r taken as 0 at ignored rows)
//       = p·(α + β·log p) − β'·onehot   with α = −a − b·H, β = −b, β' = −a  (kernels::write_row_backward)
//   ∂L/∂X = G·W / τ  [N, H],   ∂L/∂W = Gᵀ·X / τ  [V, H]
// The same recompute-in-backward scheme as verl's FusedLinearForPPO
// (verl/utils/experimental/torch_functional.py): the forward keeps nothing but its outputs; a
// backward recomputes each chunk's logits. Rows are taken `chunk_rows` at a time through
// kernels::linear_chunks (kernels/linear_ce_cpu.hpp: vocabulary tiles over the kernels' runner, Eigen's
// GEMM, results bitwise independent of the thread count); each row is reduced once
// (kernels::reduce_row) and its gradient written over its logits in place. Extra memory: one
// chunk of logits, O(C·(V + 8H)). Flops: forward 2·N·H·V, backward 6·N·H·V.
#pragma once

#include <Eigen/Core>
#include <cstdint>

#include "posttrain/kernels/linear_ce_cpu.hpp"
#include "posttrain/kernels/logits_cpu.hpp"

namespace posttrain::kernels {

struct linear_logprobs_options {
  std::int64_t ignore_index = -100;
  double temperature = 1.0;     ///< τ > 0: logits are X·Wᵀ / τ
  std::int64_t chunk_rows = 0;  ///< rows per chunk; <= 0 picks default_chunk_rows(V, sizeof(S))
};

/// Inputs and outputs of one call; every pointer may be null. With grad_hidden or grad_head set the
/// call is a backward: grad_hidden [N, H] is overwritten, grad_head [V, H] accumulated into (+=);
/// grad_logprob / grad_entropy [N] are the upstream gradients (null: zero).
template <class S>
struct linear_logprobs_buffers {
  S* logprob = nullptr;             ///< [N] out: log softmax(Z_r)[y_r] (0 at ignored rows)
  S* entropy = nullptr;             ///< [N] out: -Σ p log p of every row
  const S* grad_logprob = nullptr;  ///< [N] in: ∂L/∂lp (ignored rows' entries are not read)
  const S* grad_entropy = nullptr;  ///< [N] in: ∂L/∂H
  S* grad_hidden = nullptr;         ///< [N, H] out: ∂L/∂X, written
  S* grad_head = nullptr;           ///< [V, H] out: ∂L/∂W, accumulated
};

/// Per-token log-probs and entropy of X·Wᵀ/τ (and, when gradient buffers are given, the backward of
/// the upstream gradients) over X [rows, hidden_size], W [vocab, hidden_size], labels [rows] (each in
/// [0, vocab) or == ignore_index; the caller validates). See the file comment for the formulas.
template <class S>
void linear_logprobs(const S* hidden, const S* head, std::int64_t rows, std::int64_t hidden_size, std::int64_t vocab,
                     const std::int64_t* labels, const linear_logprobs_options& opt,
                     const linear_logprobs_buffers<S>& io) {
  if (rows <= 0 || vocab <= 0) return;
  const std::int64_t V = vocab;
  const bool want_grad = io.grad_hidden != nullptr || io.grad_head != nullptr;
  const bool any_upstream = io.grad_logprob != nullptr || io.grad_entropy != nullptr;
  const double inv_t = 1.0 / opt.temperature;
  if (want_grad && !any_upstream) {
    // Both upstream gradients are zero: ∂X = 0, ∂W unchanged, no GEMM needed.
    if (io.grad_hidden) Eigen::Map<Eigen::Array<S, Eigen::Dynamic, 1>>(io.grad_hidden, rows * hidden_size).setZero();
    if (!io.logprob && !io.entropy) return;
  }
  const bool backward = want_grad && any_upstream;
  const auto rows_of_chunk = [&](std::int64_t c0, std::int64_t C, S* logits) {
    parallel_rows(C, V, [&](std::int64_t begin, std::int64_t end) {
      for (std::int64_t r = begin; r < end; ++r) {
        const std::int64_t i = c0 + r;
        S* z = logits + r * V;
        const std::int64_t y = labels[i];
        const bool ignored = y == opt.ignore_index;
        const row_stats<S> st = reduce_row(z, V);
        const double h = st.entropy();
        if (io.entropy) io.entropy[i] = static_cast<S>(h);
        if (io.logprob) {
          // log p(y) = (z_y - m) - log s: z_y - m first keeps precision near the max (as logits_forward).
          io.logprob[i] = ignored       ? S(0)
                          : st.finite() ? static_cast<S>(static_cast<double>(z[y] - st.m) - st.log_s)
                                        : static_cast<S>(static_cast<double>(z[y]) - st.logsumexp());
        }
        if (!backward) continue;
        // G_r / τ = p·(α + β·log p) − b·onehot(y) with α = −(a + b_H·H)/τ, β = −b_H/τ, b = −a/τ.
        const double a = io.grad_logprob && !ignored ? static_cast<double>(io.grad_logprob[i]) : 0.0;
        const double b = io.grad_entropy ? static_cast<double>(io.grad_entropy[i]) : 0.0;
        const backward_coefficients k{-(a + b * h) * inv_t, -b * inv_t, -a * inv_t, 0.0};
        write_row_backward(z, V, st, k, ignored ? std::int64_t{-1} : y, z);
      }
    });
    return backward;
  };
  linear_chunks<S>(hidden, head, rows, hidden_size, V, opt.chunk_rows, static_cast<S>(inv_t),
                   backward ? io.grad_hidden : nullptr, backward ? io.grad_head : nullptr, rows_of_chunk);
}

}  // namespace posttrain::kernels
