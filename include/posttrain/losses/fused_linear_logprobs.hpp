// posttrain/losses/fused_linear_logprobs.hpp — differentiable per-token log-probs and entropy from
// hidden states and the LM head, without the [N, V] logits (the RL losses' inputs).
//
//   hidden X [..., H], head W [V, H] (the LM head, as nn.Linear(H, V).weight), labels y [...]
//   logits     z_t = W·x_t / τ      τ = options.temperature (verl and TRL divide the logits by the
//                                   sampling temperature before log_softmax; default 1)
//   logprobs   lp_t = log softmax(z_t)[y_t]        [...]   0 where y_t = ignore_index
//   entropy    H_t = -Σ_v p_tv log p_tv            [...]   every token (as verl: a mask is the loss's job)
// Gradients (the backward of upstream a_t = ∂L/∂lp_t and b_t = ∂L/∂H_t):
//   ∂lp/∂z_v = [v = y] − p_v,   ∂H/∂z_v = −p_v (log p_v + H)
//   G_t = a_t·(onehot(y_t) − p_t) − b_t·p_t·(log p_t + H_t);   ∂L/∂x_t = G_t·W / τ,  ∂L/∂W = Σ_t G_tᵀ x_t / τ
// At ignored tokens lp is the constant 0, so a_t is dropped there; their entropy still has its
// gradient. (verl's FusedLinearForPPO has no ignore_index: every input id is a real token, log-probs
// are computed everywhere and the loss's response mask zeroes the padding; with labels that hold a
// real id at padding this header matches it exactly.)
// Same values as token_logprobs(X·Wᵀ/τ, y) and entropy(X·Wᵀ/τ), and the same gradients as their
// *_backward chained through the matmul, computed chunk by chunk (`chunk_rows`, as verl's
// FusedLinearForPPO, verl/utils/experimental/torch_functional.py): the forward keeps only its
// outputs; the backward recomputes each chunk's logits. Peak extra memory O(chunk_rows · V).
//
// Example (LibTorch, through the backend's umbrella header; losses/ppo.hpp, numerics/masked.hpp):
//   auto [lp, ent] = posttrain::fused_linear_logprobs(hidden, lm_head.weight(), response_ids, {.temperature = 0.7});
//   auto r = posttrain::ppo_policy_loss(lp, old_logprobs, advantages, response_mask);
//   auto loss = r.loss - 0.01 * posttrain::masked_mean(ent, response_mask);  // verl's entropy bonus
//   loss.backward();                      // hidden.grad(), lm_head.weight().grad() without [N, V] logits
// GRPO the same way: grpo_loss(grpo_batch<at::Tensor>{.logprobs = lp, .advantages = adv, .response_mask = mask}).
// Closed form: X = 0 gives uniform logits, so lp = -log V and H = log V (any W, any τ).
//
// This header holds the options, results and checks; the entry points are the backends': Eigen in
// eigen/fused_linear_logprobs.hpp (fused_linear_logprobs(...), fused_linear_logprobs_backward(...)),
// LibTorch in torch/fused_linear_logprobs.hpp (an autograd function); each backend's umbrella includes it.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>
#include <type_traits>

#include "posttrain/detail/validate.hpp"
#include "posttrain/losses/fused_linear_ce.hpp"
#include "posttrain/numerics/logits.hpp"
#include "posttrain/tensor.hpp"

namespace posttrain {

struct fused_linear_logprobs_options {
  /// Labels equal to this get log-prob 0 and no log-prob gradient (PyTorch and Hugging Face: -100).
  std::int64_t ignore_index = default_ignore_index;
  /// τ, finite and > 0: the logits are divided by it (verl rollout.temperature, TRL temperature).
  double temperature = 1.0;
  /// Rows per chunk (> 0); unset: kernels::default_chunk_rows(V, element size) (~64 MiB of logits).
  std::optional<std::int64_t> chunk_rows = std::nullopt;
};

template <tensor T>
struct fused_linear_logprobs_result {
  T logprobs;  ///< [...]: log p_t[y_t], 0 at ignored tokens
  T entropy;   ///< [...]: entropy of every token's distribution
};

template <tensor T>
struct fused_linear_logprobs_gradients {
  T grad_hidden;  ///< [..., H]: ∂L/∂hidden
  T grad_head;    ///< [V, H]:   ∂L/∂head
};

namespace detail {

inline void check_fused_linear_logprobs_options(std::string_view fn, const fused_linear_logprobs_options& o) {
  require_finite(fn, "options.temperature", o.temperature);
  if (o.temperature <= 0.0) fail(fn, "options.temperature must be > 0, got ", o.temperature);
  if (o.chunk_rows && *o.chunk_rows <= 0) fail(fn, "options.chunk_rows must be > 0, got ", *o.chunk_rows);
}

/// The inputs of fused_linear_logprobs: as fused_linear_cross_entropy's (check_fused_linear_inputs).
template <tensor T>
void check_fused_linear_logprobs(std::string_view fn, const T& hidden, const T& head, const index_tensor_t<T>& labels,
                                 const fused_linear_logprobs_options& o) {
  check_fused_linear_logprobs_options(fn, o);
  check_fused_linear_inputs(fn, hidden, head, labels, o.ignore_index);
}

/// An upstream gradient (when present): floating, on hidden's device, of labels' shape (hidden's
/// without its last dimension).
template <tensor T>
void check_fused_linear_logprobs_grad(std::string_view fn, std::string_view name, const T& hidden,
                                      const std::optional<T>& grad) {
  if (grad) require_row_grad(fn, hidden, *grad, name, "hidden");
}

}  // namespace detail

}  // namespace posttrain
