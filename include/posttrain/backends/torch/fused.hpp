// posttrain/backends/torch/fused.hpp — the LibTorch backend's fused hooks (fused.hpp).
//
//   logits_stats  one pass per row (kernel/rows paths on CPU) or per chunk of rows (chunked path:
//                 CUDA), inside one autograd node for logsumexp, log p[label] and entropy whose
//                 backward is the analytic one; half logits are read as they are (reads_half).
//   ce_backward   sft_loss_backward's gradient in the logits' dtype (no autograd graph).
//   sft           sft_loss's plain form in one autograd node (backends/torch/sft_node.hpp) for
//                 contiguous CPU float32/float64 logits; other inputs are declined.
//   kd_per_token, kd_backward   contiguous CPU float32/float64 through the distillation kernel
//                 (backends/torch/distill.hpp); other inputs are declined (empty optional).
// The paths and their knobs: backends/torch/knobs.hpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "posttrain/backends/torch/autograd.hpp"
#include "posttrain/backends/torch/distill.hpp"
#include "posttrain/backends/torch/logits_engine.hpp"
#include "posttrain/backends/torch/sft_node.hpp"
#include "posttrain/backends/torch/tensor.hpp"
#include "posttrain/fused.hpp"

namespace posttrain {

template <>
struct fused_ops<at::Tensor> {
  using T = at::Tensor;

  /// The logits hooks take bfloat16/float16 logits themselves (no whole float32 copy).
  static constexpr bool reads_half = true;

  /// logsumexp, log p[label] (TRL's selective log-softmax: (x_y - m) - log Σ e^{x - m}, no [N, V]
  /// log_softmax), entropy (-inf logits contribute 0) and the argmax hit, from one read per row.
  static std::optional<logits_row_stats<T>> logits_stats(const T& x, const T* labels, const logits_stats_request& q) {
    // The CPU kernels index rows with the labels on the host; the chunked path keeps them on x's device.
    const bool cpu = detail::torch_kernels::choose(x) != torch_backend::logits_path::chunked;
    logits_stats_request asked = q;
    if (!labels) asked.logprob = asked.argmax_hit = false;
    const bool with_labels = labels && (asked.logprob || asked.argmax_hit);
    // (autograd nodes take defined tensors only: an empty one stands for "no labels")
    const T lab = !with_labels ? at::empty({0}, x.options().dtype(at::kLong))
                  : cpu        ? labels->to(at::kCPU, at::kLong).contiguous()
                               : labels->to(at::kLong);
    return detail::torch_kernels::logits_stats(x, lab, asked);
  }

  /// sft_loss_backward's gradient in the logits' dtype (no autograd graph), per row or per chunk.
  static std::optional<T> ce_backward(const T& x, const T& labels, const T& row_weights, const ce_backward_args& a) {
    return detail::torch_kernels::ce_backward(x.detach(), labels, row_weights.detach(), a);
  }

  /// sft_loss's plain form (fused.hpp) in one node, for logits the CPU kernel path takes.
  static std::optional<sft_fused_outputs<T>> sft(const T& x, const T& labels, const sft_fused_request& q) {
    return detail::torch_sft::sft(x, labels, q);
  }

  /// scale·D per row through the distillation kernel (inside an autograd node when the student
  /// requires grad), for inputs the kernel takes.
  static std::optional<T> kd_per_token(const T& student, const T& teacher, const fused_kd_spec& spec) {
#if POSTTRAIN_TORCH_CPU_KERNELS
    namespace k = detail::torch_kd;
    if (k::kernel_takes(student, teacher)) {
      if (student.requires_grad() && at::GradMode::is_enabled()) return k::kd_function::apply(student, teacher, spec);
      return k::kernel_values(student, teacher, spec);
    }
#else
    (void)student, (void)teacher, (void)spec;
#endif
    return std::nullopt;
  }

  /// row_weight[...]·d(scale·D)/d student [..., V] through the kernel, for inputs it takes.
  static std::optional<T> kd_backward(const T& student, const T& teacher, const T& row_weight,
                                      const fused_kd_spec& spec) {
#if POSTTRAIN_TORCH_CPU_KERNELS
    namespace k = detail::torch_kd;
    if (k::kernel_takes(student, teacher)) return k::kernel_grad(student, teacher, row_weight, spec);
#else
    (void)student, (void)teacher, (void)row_weight, (void)spec;
#endif
    return std::nullopt;
  }
};

static_assert(has_fused_logits_stats<at::Tensor> && has_fused_ce_backward<at::Tensor> && has_fused_sft<at::Tensor> &&
              has_fused_kd<at::Tensor> && fused_reads_half<at::Tensor>);

}  // namespace posttrain
