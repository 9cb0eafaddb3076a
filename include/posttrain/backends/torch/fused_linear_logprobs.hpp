// posttrain/backends/torch/fused_linear_logprobs.hpp — differentiable fused per-token log-probs and
// entropy from hidden states and the LM head on LibTorch tensors.
//
//   auto [lp, ent] = posttrain::fused_linear_logprobs(hidden, lm_head.weight(), labels, {.temperature = 0.7});
//   auto r = posttrain::ppo_policy_loss(lp, old_logprobs, advantages, response_mask);
//   (r.loss - 0.01 * posttrain::masked_mean(ent, response_mask)).backward();  // hidden.grad(), head.grad()
// Formulas, options and the ignore_index convention: losses/fused_linear_logprobs.hpp. Both outputs
// are differentiable through a torch::autograd::Function (verl's FusedLinearForPPO scheme): forward
// computes them chunk by chunk and saves hidden, head and labels (not the logits); backward
// recomputes each chunk's logits Z_c = X_c·Wᵀ/τ and forms
//   G_c = a·(onehot(y) − p) − b·p·(log p + H),   ∂X_c = G_c·W/τ,   ∂W += G_cᵀ·X_c/τ
// with a, b the upstream gradients of logprobs and entropy (an undefined one counts as zero; a is
// dropped at ignored tokens). Peak extra memory is one chunk of logits (~64 MiB by default), never
// [N, V]. Calling backward twice with retain_graph works (the inputs stay saved); double backward
// (create_graph) is not supported: the backward is computed without a graph.
//
// Paths (as backends/torch/fused_linear_ce.hpp):
//   CPU tensors  kernels/linear_logprobs_cpu.hpp with Eigen's GEMM over contiguous float32/float64
//       buffers; strided inputs are made contiguous, bfloat16/float16 ones converted to float32 copies.
//   anything else (CUDA)  the same chunked algorithm in LibTorch ops (at::matmul, at::logsumexp, the
//       chunk's gradient formed in place, ∂W accumulated with addmm_), in float32 for half inputs.
// Outputs come back in the compute dtype (float32 for bfloat16/float16 inputs, as sft_loss and
// fused_linear_cross_entropy; verl returns them in the input dtype, which rounds a log-prob to 3
// significant digits before the PPO ratio); gradients in the inputs' dtypes.
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/types.h>

#include <atomic>
#include <cstdint>
#include <optional>
#include <vector>

#include "posttrain/backends/linear_kernel_options.hpp"
#include "posttrain/backends/torch/intra_op.hpp"
#include "posttrain/backends/torch/logits_engine.hpp"
#include "posttrain/backends/torch/memory.hpp"
#include "posttrain/backends/torch/tensor.hpp"
#include "posttrain/kernels/linear_logprobs_cpu.hpp"
#include "posttrain/losses/fused_linear_logprobs.hpp"

namespace posttrain {
namespace detail::torch_linear_logprobs {

/// Test switch: when set, CPU tensors also take the chunked LibTorch-op path (the CUDA path).
inline std::atomic<bool>& force_chunked_ops() {
  static std::atomic<bool> on{false};
  return on;
}

inline at::ScalarType compute_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline bool use_kernel(const at::Tensor& hidden, const at::Tensor& head) {
  return hidden.device().is_cpu() && head.device().is_cpu() && !force_chunked_ops().load();
}

inline std::int64_t chunk_rows(const fused_linear_logprobs_options& o, std::int64_t vocab, at::ScalarType cdt) {
  return o.chunk_rows.value_or(kernels::default_chunk_rows(vocab, at::elementSize(cdt)));
}

/// An upstream gradient flattened to [N] in the compute dtype; undefined stays undefined.
inline at::Tensor upstream(const at::Tensor& g, at::ScalarType cdt) {
  return g.defined() ? g.reshape({-1}).to(cdt).contiguous() : g;
}

/// Runs kernels::linear_logprobs over contiguous compute-dtype copies of hidden and head (no copy
/// when already so); io(S{}) gives the buffers for scalar type S.
template <class Buffers>
void run_kernel(const at::Tensor& hidden, const at::Tensor& head, const at::Tensor& y,
                const fused_linear_logprobs_options& o, Buffers&& io) {
  const at::ScalarType cdt = compute_dtype(hidden);
  const at::Tensor x = hidden.to(cdt).contiguous(), w = head.to(cdt).contiguous();
  const auto run = [&](auto tag) {
    using S = decltype(tag);
    kernels::linear_logprobs<S>(x.data_ptr<S>(), w.data_ptr<S>(), y.numel(), w.size(1), w.size(0),
                                y.data_ptr<std::int64_t>(), kernel_options(o), io(tag));
  };
  if (cdt == at::kFloat)
    run(float{});
  else
    run(double{});
}

/// One chunk [c0, c1) of the op path: log p = Z - logsumexp(Z) with Z = X_c·Wᵀ/τ ([C, V], computed in
/// place), the chunk's hidden states in the compute dtype, and its labels (ignored ones replaced by 0).
struct chunk_logits {
  at::Tensor xc, keep, safe, logp;
};
inline chunk_logits logits_of_chunk(const at::Tensor& x, const at::Tensor& w, const at::Tensor& y,
                                    const fused_linear_logprobs_options& o, std::int64_t c0, std::int64_t c1) {
  chunk_logits c;
  const at::Tensor yc = y.slice(0, c0, c1);
  c.keep = yc.ne(o.ignore_index);
  c.safe = at::where(c.keep, yc, at::zeros_like(yc)).unsqueeze(1);  // [C, 1]
  c.xc = x.slice(0, c0, c1).to(w.scalar_type());                    // [C, H]
  at::Tensor z = at::matmul(c.xc, w.t());                           // [C, V]
  if (o.temperature != 1.0) z.div_(o.temperature);
  c.logp = z.sub_(at::logsumexp(z, {1}, true));
  return c;
}

/// What forward and backward both start from: the compute dtype, H, V, N, the labels flattened
/// to int64 [N], and the options of compute-dtype tensors on hidden's device.
struct sizes {
  at::ScalarType cdt;
  std::int64_t h, v, n;
  at::Tensor y;
  at::TensorOptions opts;
  sizes(const at::Tensor& hidden, const at::Tensor& head, const at::Tensor& labels)
      : cdt(compute_dtype(hidden)),
        h(head.size(1)),
        v(head.size(0)),
        n(labels.numel()),
        y(labels.reshape({-1}).to(at::kLong).contiguous()),
        opts(hidden.options().dtype(cdt)) {}
};

/// Forward: {logprobs, entropy}, each of labels' shape in the compute dtype.
inline std::vector<at::Tensor> forward(const at::Tensor& hidden, const at::Tensor& head, const at::Tensor& labels,
                                       const fused_linear_logprobs_options& o) {
  at::NoGradGuard no_grad;
  const auto [cdt, h, v, n, y, opts] = sizes(hidden, head, labels);
  at::Tensor lp = at::empty({n}, opts), ent = at::empty({n}, opts);
  if (use_kernel(hidden, head)) {
    run_kernel(hidden, head, y, o, [&](auto tag) {
      using S = decltype(tag);
      kernels::linear_logprobs_buffers<S> io;
      io.logprob = lp.data_ptr<S>();
      io.entropy = ent.data_ptr<S>();
      return io;
    });
  } else {
    // Per chunk: Z = X_c·Wᵀ/τ, log p = Z - logsumexp(Z), lp = log p[y] (0 if ignored), H = -Σ p·log p.
    const at::Tensor x = hidden.reshape({-1, h}), w = head.to(cdt);
    const std::int64_t chunk = std::min(n, chunk_rows(o, v, cdt));
    for (std::int64_t c0 = 0; c0 < n; c0 += chunk) {
      const std::int64_t c1 = std::min(n, c0 + chunk);
      const chunk_logits c = logits_of_chunk(x, w, y, o, c0, c1);
      ent.slice(0, c0, c1).copy_(-(c.logp.exp() * c.logp).sum(1));
      const at::Tensor l = c.logp.gather(1, c.safe).squeeze(1);
      lp.slice(0, c0, c1).copy_(at::where(c.keep, l, at::zeros_like(l)));
    }
  }
  return {lp.reshape(labels.sizes()), ent.reshape(labels.sizes())};
}

/// Backward: {∂L/∂hidden (undefined unless want_hidden), ∂L/∂head (undefined unless want_head)} in
/// the inputs' dtypes, from the upstream gradients g_lp, g_ent (labels' shape; undefined = zero).
inline std::vector<at::Tensor> backward(const at::Tensor& hidden, const at::Tensor& head, const at::Tensor& labels,
                                        const fused_linear_logprobs_options& o, const at::Tensor& g_lp,
                                        const at::Tensor& g_ent, bool want_hidden, bool want_head) {
  at::NoGradGuard no_grad;
  const auto [cdt, h, v, n, y, opts] = sizes(hidden, head, labels);
  at::Tensor gx, gw;
  // On CPU, large gradients on transparent huge pages (backends/torch/memory.hpp: a fresh [V, H]
  // head gradient per step otherwise costs seconds of page faults on the test VM).
  if (want_hidden) gx = large_cpu_zeros({n, h}, opts);
  if (want_head) gw = large_cpu_zeros({v, h}, opts);  // accumulated into
  const at::Tensor a = upstream(g_lp, cdt), b = upstream(g_ent, cdt);
  if ((want_hidden || want_head) && (a.defined() || b.defined())) {
    if (use_kernel(hidden, head)) {
      run_kernel(hidden, head, y, o, [&](auto tag) {
        using S = decltype(tag);
        kernels::linear_logprobs_buffers<S> io;
        io.grad_logprob = a.defined() ? a.data_ptr<S>() : nullptr;
        io.grad_entropy = b.defined() ? b.data_ptr<S>() : nullptr;
        io.grad_hidden = want_hidden ? gx.data_ptr<S>() : nullptr;
        io.grad_head = want_head ? gw.data_ptr<S>() : nullptr;
        return io;
      });
    } else {
      // Per chunk: G/τ = p·(α + β·log p) + (a/τ)·onehot(y), α = -(a + b·H)/τ, β = -b/τ (a = 0 at ignored rows).
      const at::Tensor x = hidden.reshape({-1, h}), w = head.to(cdt);
      const std::int64_t chunk = std::min(n, chunk_rows(o, v, cdt));
      const double inv_t = 1.0 / o.temperature;
      for (std::int64_t c0 = 0; c0 < n; c0 += chunk) {
        const std::int64_t c1 = std::min(n, c0 + chunk);
        const chunk_logits c = logits_of_chunk(x, w, y, o, c0, c1);
        const at::Tensor& logp = c.logp;  // [C, V]
        const at::Tensor p = logp.exp();
        const at::Tensor ac = a.defined() ? at::where(c.keep, a.slice(0, c0, c1), at::zeros({c1 - c0}, opts)) : a;
        at::Tensor alpha = at::zeros({c1 - c0}, opts);  // [C]
        if (ac.defined()) alpha.sub_(ac);
        at::Tensor g;
        if (b.defined()) {
          const at::Tensor bc = b.slice(0, c0, c1);
          const at::Tensor ent = -(p * logp).sum(1);
          alpha.sub_(bc * ent);
          g = logp.mul_(-bc.unsqueeze(1)).add_(alpha.unsqueeze(1)).mul_(p);  // p·(α - b·log p), over log p
        } else {
          g = p.mul_(alpha.unsqueeze(1));
        }
        if (ac.defined()) g.scatter_add_(1, c.safe, ac.unsqueeze(1));
        if (o.temperature != 1.0) g.mul_(inv_t);
        if (want_hidden) gx.slice(0, c0, c1).copy_(at::matmul(g, w));  // [C, H]
        if (want_head) gw.addmm_(g.t(), c.xc);                         // [V, H]
      }
    }
  }
  std::vector<at::Tensor> r(2);
  if (want_hidden) r[0] = gx.reshape(hidden.sizes()).to(hidden.scalar_type());
  if (want_head) r[1] = gw.to(head.scalar_type());
  return r;
}

/// The autograd node: forward saves hidden, head and labels; backward recomputes the logits.
struct function : torch::autograd::Function<function> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& hidden,
                                                const at::Tensor& head, const at::Tensor& labels,
                                                const fused_linear_logprobs_options& o) {
    ctx->set_materialize_grads(false);  // an unused output's gradient arrives undefined: zero
    ctx->save_for_backward({hidden, head, labels});
    ctx->saved_data["ignore_index"] = o.ignore_index;
    ctx->saved_data["temperature"] = o.temperature;
    ctx->saved_data["chunk_rows"] = o.chunk_rows.value_or(0);
    return detail::torch_linear_logprobs::forward(hidden, head, labels, o);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    fused_linear_logprobs_options o;
    o.ignore_index = ctx->saved_data["ignore_index"].toInt();
    o.temperature = ctx->saved_data["temperature"].toDouble();
    const std::int64_t chunk = ctx->saved_data["chunk_rows"].toInt();
    if (chunk > 0) o.chunk_rows = chunk;
    const auto g = detail::torch_linear_logprobs::backward(saved[0], saved[1], saved[2], o, grads[0], grads[1],
                                                           ctx->needs_input_grad(0), ctx->needs_input_grad(1));
    return {g[0], g[1], at::Tensor(), at::Tensor()};
  }
};

}  // namespace detail::torch_linear_logprobs

/// Per-token log-probs and entropy of hidden·headᵀ/τ on LibTorch tensors; both outputs are
/// differentiable with respect to hidden and head (autograd). See losses/fused_linear_logprobs.hpp.
inline fused_linear_logprobs_result<at::Tensor> fused_linear_logprobs(const at::Tensor& hidden, const at::Tensor& head,
                                                                      const at::Tensor& labels,
                                                                      const fused_linear_logprobs_options& opt = {}) {
  detail::check_fused_linear_logprobs("fused_linear_logprobs", hidden, head, labels, opt);
  namespace fl = detail::torch_linear_logprobs;
  std::vector<at::Tensor> r;
  if (at::GradMode::is_enabled() && (hidden.requires_grad() || head.requires_grad()))
    r = fl::function::apply(hidden, head, labels, opt);
  else
    r = fl::forward(hidden, head, labels, opt);
  return {r[0], r[1]};
}

/// ∂L/∂hidden and ∂L/∂head from upstream gradients of logprobs and entropy (labels' shape; absent or
/// undefined means zero), without autograd: the raw backward, recomputing the logits chunk by chunk.
inline fused_linear_logprobs_gradients<at::Tensor> fused_linear_logprobs_backward(
    const at::Tensor& hidden, const at::Tensor& head, const at::Tensor& labels,
    const fused_linear_logprobs_options& opt, const std::optional<at::Tensor>& grad_logprobs,
    const std::optional<at::Tensor>& grad_entropy) {
  constexpr std::string_view fn = "fused_linear_logprobs_backward";
  detail::check_fused_linear_logprobs(fn, hidden, head, labels, opt);
  const auto present = [](const std::optional<at::Tensor>& g) {
    return g && g->defined() ? g : std::optional<at::Tensor>{};
  };
  const std::optional<at::Tensor> a = present(grad_logprobs), b = present(grad_entropy);
  detail::check_fused_linear_logprobs_grad(fn, "grad_logprobs", hidden, a);
  detail::check_fused_linear_logprobs_grad(fn, "grad_entropy", hidden, b);
  const auto g = detail::torch_linear_logprobs::backward(hidden.detach(), head.detach(), labels, opt,
                                                         a ? a->detach() : at::Tensor(), b ? b->detach() : at::Tensor(),
                                                         true, true);
  return {g[0], g[1]};
}

}  // namespace posttrain
