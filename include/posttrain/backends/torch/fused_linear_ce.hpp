// posttrain/backends/torch/fused_linear_ce.hpp — fused linear cross-entropy on LibTorch tensors.
//
//   auto r = posttrain::fused_linear_cross_entropy(hidden, lm_head.weight(), labels);  // hidden [..., H], head [V, H]
//   r.loss.backward();                  // hidden.grad() and head.grad() as from matmul + cross_entropy
// Formula, options and outputs: losses/fused_linear_ce.hpp. The loss is a torch::autograd::Function
// whose forward computes the loss and both gradients chunk by chunk (Liger's scheme) and saves only
// the gradients; backward scales them by grad_output. Peak extra memory beside the gradients is one
// chunk of logits (~64 MiB by default, options.chunk_rows), never [N, V].
// The gradients are handed to autograd without a copy: unless the graph is retained, backward
// gives up its reference, so AccumulateGrad adopts the tensor as .grad when .grad is unset (and
// adds it in place otherwise), and a grad_output other than 1 scales it in place. On CPU the
// gradients live on transparent huge pages (backends/torch/memory.hpp): a fresh [V, H] gradient
// every step then costs ~0.1 s instead of seconds of page faults. Per-token outputs
// (per_token_loss, logprobs, entropy, num_tokens) are forward-only (marked non-differentiable).
// Double backward (create_graph) is not supported: the saved gradients are constants.
//
// Paths:
//   CPU tensors (any float dtype, any strides)  kernels/linear_ce_cpu.hpp with Eigen's GEMM; strided
//       inputs are made contiguous and bfloat16/float16 ones converted to float32 copies first
//       (this LibTorch's own float32 matmul is netlib reference BLAS, ~50x slower than Eigen's).
//   anything else (CUDA)  the same chunked algorithm in LibTorch ops (at::matmul per chunk,
//       at::logsumexp, the gradient formed in the chunk and accumulated with addmm), in float32
//       for bfloat16/float16 inputs (float64 for float64).
// Gradients come back in the inputs' dtype; the loss and per-token outputs in the compute dtype
// (float32 for half inputs, as sft_loss upcasts logits).
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/types.h>

#include <cstdint>
#include <vector>

#include "posttrain/backends/linear_kernel_options.hpp"
#include "posttrain/backends/torch/intra_op.hpp"
#include "posttrain/backends/torch/logits_engine.hpp"
#include "posttrain/backends/torch/memory.hpp"
#include "posttrain/backends/torch/tensor.hpp"
#include "posttrain/kernels/linear_ce_cpu.hpp"
#include "posttrain/losses/fused_linear_ce.hpp"

namespace posttrain {
namespace detail::torch_linear_ce {

/// Everything one call computes: [0] loss (0-d), [1] per-token loss, [2] log-probs, [3] entropy
/// (all [...]), [4] num_tokens (0-d), and with grads [5] ∂loss/∂hidden, [6] ∂loss/∂head.
using parts = std::vector<at::Tensor>;

inline at::ScalarType compute_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

/// The CPU path: posttrain::kernels over contiguous float32/float64 buffers.
inline parts on_cpu(const at::Tensor& hidden, const at::Tensor& head, const at::Tensor& labels,
                    const fused_linear_ce_options& o, bool grad_hidden, bool grad_head, double grad_loss) {
  const at::ScalarType cdt = compute_dtype(hidden);
  const std::int64_t h = head.size(1), v = head.size(0);
  const at::Tensor x = hidden.to(cdt).contiguous(), w = head.to(cdt).contiguous();  // no copy if already so
  const at::Tensor y = labels.to(at::kLong).contiguous();
  const std::int64_t n = y.numel();
  const std::int64_t valid = y.ne(o.ignore_index).sum().item<std::int64_t>();
  const double weight = fused_linear_ce_weight(o, valid);
  const auto opts = x.options();
  parts r(7);
  r[1] = at::empty(labels.sizes(), opts);
  r[2] = at::empty(labels.sizes(), opts);
  r[3] = at::empty(labels.sizes(), opts);
  if (grad_hidden) r[5] = large_cpu_empty(hidden.sizes(), opts);
  if (grad_head) r[6] = large_cpu_zeros({v, h}, opts);  // the kernel accumulates into it
  const auto run = [&](auto tag) {
    using S = decltype(tag);
    kernels::linear_ce_buffers<S> out{r[1].data_ptr<S>(), r[2].data_ptr<S>(), r[3].data_ptr<S>(),
                                      grad_hidden ? r[5].data_ptr<S>() : nullptr,
                                      grad_head ? r[6].data_ptr<S>() : nullptr};
    const kernels::linear_ce_totals t =
        kernels::linear_cross_entropy<S>(x.data_ptr<S>(), w.data_ptr<S>(), n, h, v, y.data_ptr<std::int64_t>(),
                                         kernel_options(o), weight * grad_loss, out);
    r[0] = at::scalar_tensor(t.loss_sum * weight, opts);
    r[4] = at::scalar_tensor(static_cast<double>(t.num_valid), opts);
  };
  if (cdt == at::kFloat)
    run(float{});
  else
    run(double{});
  if (r[5].defined()) r[5] = r[5].to(hidden.scalar_type());
  if (r[6].defined()) r[6] = r[6].to(head.scalar_type());
  return r;
}

/// The same chunked algorithm in LibTorch ops (any device): per chunk of rows,
///   Z = X_c·Wᵀ / τ, lse = logsumexp(Z), p = e^{Z - lse}, H = lse - Σ p·Z,
///   ℓ = (1-ε)(lse - Z_y) + ε(lse - mean Z) + z·lse²,
///   G = s/τ·((1 + 2z·lse)·p - (1-ε)·onehot(y) - ε/V) (0 at ignored rows), ∂X_c = G·W, ∂W += Gᵀ·X_c.
inline parts chunked_ops(const at::Tensor& hidden, const at::Tensor& head, const at::Tensor& labels,
                         const fused_linear_ce_options& o, bool grad_hidden, bool grad_head, double grad_loss) {
  at::NoGradGuard no_grad;
  const at::ScalarType cdt = compute_dtype(hidden);
  const std::int64_t h = head.size(1), v = head.size(0);
  const at::Tensor x = hidden.reshape({-1, h});
  const at::Tensor w = head.to(cdt);
  const at::Tensor y = labels.reshape({-1}).to(at::kLong);
  const std::int64_t n = y.numel();
  const std::int64_t valid = y.ne(o.ignore_index).sum().item<std::int64_t>();
  // d loss / d Z times dZ / d(X·Wᵀ) = 1/τ
  const double s = fused_linear_ce_weight(o, valid) * grad_loss / o.temperature;
  const double eps = o.label_smoothing, z = o.z_loss;
  const auto opts = w.options();
  const std::int64_t chunk = std::min(n, o.chunk_rows.value_or(kernels::default_chunk_rows(v, at::elementSize(cdt))));
  at::Tensor per_token = at::empty({n}, opts), logprob = at::empty({n}, opts), ent = at::empty({n}, opts);
  at::Tensor gx, gw;
  if (grad_hidden) gx = at::empty({n, h}, opts);
  if (grad_head) gw = at::zeros({v, h}, opts);
  for (std::int64_t c0 = 0; c0 < n; c0 += chunk) {
    const std::int64_t c1 = std::min(n, c0 + chunk);
    const at::Tensor xc = x.slice(0, c0, c1).to(cdt);  // [C, H]
    const at::Tensor yc = y.slice(0, c0, c1);          // [C]
    const at::Tensor keep = yc.ne(o.ignore_index);     // [C]
    const at::Tensor safe = at::where(keep, yc, at::zeros_like(yc)).unsqueeze(1);
    at::Tensor logits = at::matmul(xc, w.t());  // [C, V]
    if (o.temperature != 1.0) logits.div_(o.temperature);
    const at::Tensor lse = at::logsumexp(logits, {1});  // [C]
    const at::Tensor p = (logits - lse.unsqueeze(1)).exp_();
    ent.slice(0, c0, c1).copy_(lse - (p * logits).sum(1));
    const at::Tensor lp = logits.gather(1, safe).squeeze(1) - lse;  // log p(y)
    at::Tensor l = -(1.0 - eps) * lp + z * lse * lse;
    if (eps > 0.0) l = l + eps * (lse - logits.mean(1));
    per_token.slice(0, c0, c1).copy_(at::where(keep, l, at::zeros_like(l)));
    logprob.slice(0, c0, c1).copy_(at::where(keep, lp, at::zeros_like(lp)));
    if (!grad_hidden && !grad_head) continue;
    at::Tensor g = p.mul_((s * (1.0 + 2.0 * z * lse)).unsqueeze(1));  // [C, V], p is not needed again
    if (eps > 0.0) g.sub_(s * eps / static_cast<double>(v));
    g.scatter_add_(1, safe, at::full({c1 - c0, 1}, -s * (1.0 - eps), opts));
    g.mul_(keep.unsqueeze(1).to(cdt));
    if (grad_hidden) gx.slice(0, c0, c1).copy_(at::matmul(g, w));  // [C, H]
    if (grad_head) gw.addmm_(g.t(), xc);                           // [V, H]
  }
  parts r(7);
  r[1] = per_token.reshape(labels.sizes());
  r[2] = logprob.reshape(labels.sizes());
  r[3] = ent.reshape(labels.sizes());
  r[0] = per_token.sum() * fused_linear_ce_weight(o, valid);
  r[4] = at::scalar_tensor(static_cast<double>(valid), opts);
  if (grad_hidden) r[5] = gx.reshape(hidden.sizes()).to(hidden.scalar_type());
  if (grad_head) r[6] = gw.to(head.scalar_type());
  return r;
}

inline parts compute(const at::Tensor& hidden, const at::Tensor& head, const at::Tensor& labels,
                     const fused_linear_ce_options& o, bool grad_hidden, bool grad_head, double grad_loss = 1.0) {
  at::NoGradGuard no_grad;
  if (hidden.device().is_cpu() && head.device().is_cpu())
    return on_cpu(hidden, head, labels, o, grad_hidden, grad_head, grad_loss);
  return chunked_ops(hidden, head, labels, o, grad_hidden, grad_head, grad_loss);
}

/// The autograd node: gradients computed in forward and kept in saved_data (not
/// save_for_backward, whose references live until backward returns); backward scales them.
struct function : torch::autograd::Function<function> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& hidden,
                                                const at::Tensor& head, const at::Tensor& labels,
                                                const fused_linear_ce_options& o) {
    const bool gh = ctx->needs_input_grad(0), gw = ctx->needs_input_grad(1);
    parts r = compute(hidden, head, labels, o, gh, gw);
    if (r[5].defined()) ctx->saved_data["grad_hidden"] = r[5];
    if (r[6].defined()) ctx->saved_data["grad_head"] = r[6];
    ctx->mark_non_differentiable({r[1], r[2], r[3], r[4]});
    return {r[0], r[1], r[2], r[3], r[4]};
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    // With retain_graph the gradients must survive for the next backward: they are shared (and
    // copied by AccumulateGrad) or scaled out of place. Otherwise this is the last use: the
    // reference is dropped so the caller holds the only one.
    const bool keep = torch::autograd::get_current_graph_task_keep_graph();
    const at::Tensor& g = grads[0];  // d out / d loss, 0-d
    // Liger skips the multiply when grad_output is exactly 1 (the usual loss.backward()).
    const bool one = g.defined() && g.item<double>() == 1.0;
    const auto take = [&](const char* name) -> at::Tensor {
      const auto it = ctx->saved_data.find(name);
      if (it == ctx->saved_data.end()) return {};
      at::Tensor t = it->second.toTensor();
      if (!keep) ctx->saved_data.erase(it);
      if (!g.defined()) return at::zeros_like(t);
      if (one) return t;
      return keep ? t * g.to(t.scalar_type()) : t.mul_(g.to(t.scalar_type()));
    };
    at::Tensor grad_hidden = take("grad_hidden"), grad_head = take("grad_head");
    return {std::move(grad_hidden), std::move(grad_head), at::Tensor(), at::Tensor()};
  }
};

}  // namespace detail::torch_linear_ce

/// Fused linear cross-entropy on LibTorch tensors; `loss` is differentiable with respect to hidden
/// and head (autograd), the per-token outputs are not. See losses/fused_linear_ce.hpp.
inline fused_linear_ce_result<at::Tensor> fused_linear_cross_entropy(const at::Tensor& hidden, const at::Tensor& head,
                                                                     const at::Tensor& labels,
                                                                     const fused_linear_ce_options& opt = {}) {
  detail::check_fused_linear_ce("fused_linear_cross_entropy", hidden, head, labels, opt);
  namespace fl = detail::torch_linear_ce;
  fl::parts r;
  if (at::GradMode::is_enabled() && (hidden.requires_grad() || head.requires_grad()))
    r = fl::function::apply(hidden, head, labels, opt);
  else
    r = fl::compute(hidden, head, labels, opt, false, false);
  return {r[0], r[4], r[1], r[2], r[3]};
}

/// Forward plus grad_loss · ∂loss/∂hidden and ∂loss/∂head, without autograd (the raw call).
inline fused_linear_ce_gradients<at::Tensor> fused_linear_cross_entropy_and_grad(
    const at::Tensor& hidden, const at::Tensor& head, const at::Tensor& labels, const fused_linear_ce_options& opt = {},
    double grad_loss = 1.0) {
  const char* fn = "fused_linear_cross_entropy_and_grad";
  detail::check_fused_linear_ce(fn, hidden, head, labels, opt);
  detail::require_finite(fn, "grad_loss", grad_loss);
  const auto r = detail::torch_linear_ce::compute(hidden.detach(), head.detach(), labels, opt, true, true, grad_loss);
  return {{r[0], r[4], r[1], r[2], r[3]}, r[5], r[6]};
}

}  // namespace posttrain
