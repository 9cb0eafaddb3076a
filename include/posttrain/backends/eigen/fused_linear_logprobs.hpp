// posttrain/backends/eigen/fused_linear_logprobs.hpp — differentiable per-token log-probs and entropy
// from hidden states and the LM head on the Eigen backend (losses/fused_linear_logprobs.hpp's
// formulas through kernels/linear_logprobs_cpu.hpp).
#pragma once

#include <optional>
#include <string_view>
#include <type_traits>

#include "posttrain/backends/eigen/tensor.hpp"
#include "posttrain/backends/linear_kernel_options.hpp"
#include "posttrain/kernels/linear_logprobs_cpu.hpp"
#include "posttrain/losses/fused_linear_logprobs.hpp"

namespace posttrain {

/// Per-token log-probs and entropy of hidden·headᵀ/τ on the Eigen backend (2·N·H·V flops).
template <class S>
fused_linear_logprobs_result<eigen_tensor<S>> fused_linear_logprobs(const eigen_tensor<S>& hidden,
                                                                    const eigen_tensor<S>& head,
                                                                    const eigen_index& labels,
                                                                    const fused_linear_logprobs_options& opt = {}) {
  detail::check_fused_linear_logprobs("fused_linear_logprobs", hidden, head, labels, opt);
  fused_linear_logprobs_result<eigen_tensor<S>> r{eigen_tensor<S>(labels.shape()), eigen_tensor<S>(labels.shape())};
  kernels::linear_logprobs_buffers<S> io;
  io.logprob = r.logprobs.data();
  io.entropy = r.entropy.data();
  kernels::linear_logprobs<S>(hidden.data(), head.data(), labels.numel(), head.shape()[1], head.shape()[0],
                              labels.data(), detail::kernel_options(opt), io);
  return r;
}

/// ∂L/∂hidden and ∂L/∂head from the upstream gradients grad_logprobs = ∂L/∂logprobs and
/// grad_entropy = ∂L/∂entropy ([...] each; absent means zero), recomputing the logits chunk by
/// chunk (6·N·H·V flops; both absent: zeros, no work). S is deduced from hidden alone, so a plain
/// eigen_tensor<S> or std::nullopt converts to either gradient.
template <class S>
fused_linear_logprobs_gradients<eigen_tensor<S>> fused_linear_logprobs_backward(
    const eigen_tensor<S>& hidden, const eigen_tensor<S>& head, const eigen_index& labels,
    const fused_linear_logprobs_options& opt, const std::type_identity_t<std::optional<eigen_tensor<S>>>& grad_logprobs,
    const std::type_identity_t<std::optional<eigen_tensor<S>>>& grad_entropy) {
  constexpr std::string_view fn = "fused_linear_logprobs_backward";
  detail::check_fused_linear_logprobs(fn, hidden, head, labels, opt);
  detail::check_fused_linear_logprobs_grad(fn, "grad_logprobs", hidden, grad_logprobs);
  detail::check_fused_linear_logprobs_grad(fn, "grad_entropy", hidden, grad_entropy);
  fused_linear_logprobs_gradients<eigen_tensor<S>> g{eigen_tensor<S>(hidden.shape()),
                                                     eigen_tensor<S>(head.shape())};  // zeros: ∂W accumulates
  kernels::linear_logprobs_buffers<S> io;
  io.grad_logprob = grad_logprobs ? grad_logprobs->data() : nullptr;
  io.grad_entropy = grad_entropy ? grad_entropy->data() : nullptr;
  io.grad_hidden = g.grad_hidden.data();
  io.grad_head = g.grad_head.data();
  kernels::linear_logprobs<S>(hidden.data(), head.data(), labels.numel(), head.shape()[1], head.shape()[0],
                              labels.data(), detail::kernel_options(opt), io);
  return g;
}

}  // namespace posttrain
