// posttrain/backends/torch/distill.hpp — the kernel side of LibTorch's fused distillation hooks
// (fused_ops<at::Tensor>::kd_per_token / kd_backward in backends/torch/fused.hpp).
//
// Contiguous CPU float32/float64 student and teacher logits go through kernels/distill_cpu.hpp (one
// read of each row). When the student requires grad the forward runs inside a
// torch::autograd::Function whose backward is the kernel's analytic student gradient scaled by the
// incoming per-token gradient; the teacher gets none (the teacher is constant). Everything else is
// declined (the hooks return an empty optional and numerics/divergences.hpp takes its generic
// composition): CUDA, strided views, a teacher that requires grad (the generic ops give it a
// gradient, the kernel would not) and CPU without Eigen. A backward recorded with
// create_graph = true uses the generic analytic gradient in LibTorch ops (differentiable again).
// Half logits reach the hooks already upcast to float32, so they take the kernel on that copy.
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdint>

#include "posttrain/backends/torch/logits_engine.hpp"
#include "posttrain/backends/torch/tensor.hpp"
#include "posttrain/fused.hpp"
#include "posttrain/numerics/divergences.hpp"

#if POSTTRAIN_TORCH_CPU_KERNELS
#include "posttrain/kernels/distill_cpu.hpp"
#endif

namespace posttrain::detail::torch_kd {

/// The generic composition's options for a fused spec (scale is τ² exactly when τ² scaling is on).
inline divergence_options options_for(const fused_kd_spec& spec) {
  divergence_options o;
  switch (spec.kind) {
    case fused_kd_kind::forward_kl: o.divergence = kd_divergence::forward_kl; break;
    case fused_kd_kind::forward_cross_entropy: o.divergence = kd_divergence::forward_cross_entropy; break;
    case fused_kd_kind::reverse_kl: o.divergence = kd_divergence::reverse_kl; break;
    case fused_kd_kind::symmetric_kl: o.divergence = kd_divergence::symmetric_kl; break;
  }
  o.symmetric_ratio = spec.symmetric_ratio;
  o.temperature = spec.temperature;
  o.scale_by_temperature_squared = spec.scale != 1.0;
  return o;
}

/// Whether the kernel may read these tensors (see the file comment).
inline bool kernel_takes(const at::Tensor& s, const at::Tensor& t) {
#if POSTTRAIN_TORCH_CPU_KERNELS
  const auto dt = s.scalar_type();
  if (dt != at::kFloat && dt != at::kDouble) return false;
  if (t.scalar_type() != dt || !s.device().is_cpu() || !t.device().is_cpu()) return false;
  if (s.layout() != at::kStrided || t.layout() != at::kStrided || !s.is_contiguous() || !t.is_contiguous())
    return false;
  if (s.dim() == 0 || s.sizes() != t.sizes()) return false;
  return !(t.requires_grad() && at::GradMode::is_enabled());
#else
  (void)s;
  (void)t;
  return false;
#endif
}

/// The generic analytic gradient w[...]·d(scale·D)/ds [..., V] in LibTorch ops (differentiable,
/// numerics/divergences.hpp's composition); rows of weight 0 get an exact 0, as the kernel gives them.
inline at::Tensor generic_grad(const at::Tensor& s, const at::Tensor& t, const at::Tensor& w,
                               const fused_kd_spec& spec) {
  return kd_grad_generic(s, t, w, options_for(spec));
}

#if POSTTRAIN_TORCH_CPU_KERNELS
/// value[...] = scale·D per row (no autograd graph).
inline at::Tensor kernel_values(const at::Tensor& s, const at::Tensor& t, const fused_kd_spec& spec) {
  const at::Tensor sd = s.detach(), td = t.detach();
  at::Tensor out = at::empty(sd.sizes().slice(0, sd.dim() - 1), sd.options());
  const std::int64_t vocab = sd.size(-1);
  AT_DISPATCH_FLOATING_TYPES(sd.scalar_type(), "posttrain_fused_kd_per_token", [&] {
    kernels::distill_forward_backward<scalar_t>(sd.data_ptr<scalar_t>(), td.data_ptr<scalar_t>(), out.numel(), vocab,
                                                spec, out.data_ptr<scalar_t>(), nullptr, nullptr);
  });
  return out;
}

/// w[...]·d(scale·D)/ds [..., V] (no autograd graph); w is cast to the logits' dtype.
inline at::Tensor kernel_grad(const at::Tensor& s, const at::Tensor& t, const at::Tensor& w,
                              const fused_kd_spec& spec) {
  const at::Tensor sd = s.detach(), td = t.detach();
  const at::Tensor wd = w.detach().to(at::kCPU, sd.scalar_type()).contiguous();
  at::Tensor out = at::empty_like(sd, at::MemoryFormat::Contiguous);
  const std::int64_t vocab = sd.size(-1);
  AT_DISPATCH_FLOATING_TYPES(sd.scalar_type(), "posttrain_fused_kd_backward", [&] {
    kernels::distill_forward_backward<scalar_t>(sd.data_ptr<scalar_t>(), td.data_ptr<scalar_t>(), wd.numel(), vocab,
                                                spec, nullptr, wd.data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
  });
  return out;
}

/// The autograd node around the kernel's forward; its backward is the kernel's student gradient.
struct kd_function : torch::autograd::Function<kd_function> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& s, const at::Tensor& t,
                            const fused_kd_spec& spec) {
    ctx->save_for_backward({s, t});
    ctx->saved_data["kind"] = static_cast<std::int64_t>(spec.kind);
    ctx->saved_data["ratio"] = spec.symmetric_ratio;
    ctx->saved_data["temperature"] = spec.temperature;
    ctx->saved_data["scale"] = spec.scale;
    return kernel_values(s, t, spec);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const fused_kd_spec spec{static_cast<fused_kd_kind>(ctx->saved_data["kind"].toInt()),
                             ctx->saved_data["ratio"].toDouble(), ctx->saved_data["temperature"].toDouble(),
                             ctx->saved_data["scale"].toDouble()};
    // create_graph = true records the backward: use LibTorch ops there (the kernel's output would cut the graph).
    const at::Tensor g = at::GradMode::is_enabled() ? generic_grad(saved[0], saved[1], grads[0], spec)
                                                    : kernel_grad(saved[0], saved[1], grads[0], spec);
    return {g, at::Tensor(), at::Tensor()};
  }
};
#endif

}  // namespace posttrain::detail::torch_kd
