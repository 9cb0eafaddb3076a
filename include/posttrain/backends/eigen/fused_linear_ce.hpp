// posttrain/backends/eigen/fused_linear_ce.hpp — fused linear cross-entropy on the Eigen backend:
// losses/fused_linear_ce.hpp's formula through kernels/linear_ce_cpu.hpp (Liger's chunked scheme).
#pragma once

#include <cstdint>
#include <string_view>

#include "posttrain/backends/eigen/tensor.hpp"
#include "posttrain/backends/linear_kernel_options.hpp"
#include "posttrain/kernels/linear_ce_cpu.hpp"
#include "posttrain/losses/fused_linear_ce.hpp"

namespace posttrain {

namespace detail {

template <class S>
fused_linear_ce_gradients<eigen_tensor<S>> fused_linear_ce_eigen(std::string_view fn, const eigen_tensor<S>& hidden,
                                                                 const eigen_tensor<S>& head, const eigen_index& labels,
                                                                 const fused_linear_ce_options& o, bool grads,
                                                                 double grad_loss) {
  check_fused_linear_ce(fn, hidden, head, labels, o);
  require_finite(fn, "grad_loss", grad_loss);
  const std::int64_t n = labels.numel(), h = head.shape()[1], v = head.shape()[0];
  std::int64_t valid = 0;
  for (std::int64_t i = 0; i < n; ++i) valid += labels.data()[i] != o.ignore_index ? 1 : 0;
  const double w = fused_linear_ce_weight(o, valid);

  fused_linear_ce_gradients<eigen_tensor<S>> g;
  auto& r = g.result;
  r.per_token_loss = eigen_tensor<S>(labels.shape());
  r.logprobs = eigen_tensor<S>(labels.shape());
  r.entropy = eigen_tensor<S>(labels.shape());
  kernels::linear_ce_buffers<S> out{r.per_token_loss.data(), r.logprobs.data(), r.entropy.data()};
  if (grads) {
    g.grad_hidden = eigen_tensor<S>(hidden.shape());
    g.grad_head = eigen_tensor<S>(head.shape());  // zeros: the kernel accumulates into it
    out.grad_hidden = g.grad_hidden.data();
    out.grad_head = g.grad_head.data();
  }
  const kernels::linear_ce_totals t = kernels::linear_cross_entropy<S>(
      hidden.data(), head.data(), n, h, v, labels.data(), kernel_options(o), w * grad_loss, out);
  r.loss = eigen_tensor<S>(shape_t{}, static_cast<S>(t.loss_sum * w));
  r.num_tokens = eigen_tensor<S>(shape_t{}, static_cast<S>(t.num_valid));
  return g;
}

}  // namespace detail

/// Fused linear cross-entropy forward on the Eigen backend (one GEMM's work, 2·N·H·V flops).
template <class S>
fused_linear_ce_result<eigen_tensor<S>> fused_linear_cross_entropy(const eigen_tensor<S>& hidden,
                                                                   const eigen_tensor<S>& head,
                                                                   const eigen_index& labels,
                                                                   const fused_linear_ce_options& opt = {}) {
  return detail::fused_linear_ce_eigen("fused_linear_cross_entropy", hidden, head, labels, opt, false, 1.0).result;
}

/// Forward plus grad_loss · ∂loss/∂hidden and ∂loss/∂head in the same pass (6·N·H·V flops).
template <class S>
fused_linear_ce_gradients<eigen_tensor<S>> fused_linear_cross_entropy_and_grad(const eigen_tensor<S>& hidden,
                                                                               const eigen_tensor<S>& head,
                                                                               const eigen_index& labels,
                                                                               const fused_linear_ce_options& opt = {},
                                                                               double grad_loss = 1.0) {
  return detail::fused_linear_ce_eigen("fused_linear_cross_entropy_and_grad", hidden, head, labels, opt, true,
                                       grad_loss);
}

}  // namespace posttrain
