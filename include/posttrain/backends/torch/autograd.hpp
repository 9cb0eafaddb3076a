// posttrain/backends/torch/autograd.hpp — the autograd node around the one-pass logits engine: one
// node for logsumexp, log p[label] and entropy together, whose backward is the engine's analytic
// one (backends/torch/logits_engine.hpp), so a loss that reads all three still reads the logits
// once forward and once backward.
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "posttrain/backends/torch/logits_engine.hpp"
#include "posttrain/fused.hpp"

namespace posttrain::detail::torch_kernels {

/// The same backward in LibTorch ops, differentiable again: used when the graph of the backward
/// is being recorded (create_graph = true), where the engine's raw output would cut it. (Whole
/// tensors: a half input is upcast to one float32 copy here.)
///   d = p·g_lse + (onehot(y) − p)·g_lp − p·(log p + H)·g_H,   p = softmax(x / T), then d / T.
inline at::Tensor backward_differentiable(const at::Tensor& x_in, const at::Tensor& labels, const row_grads& g,
                                          std::int64_t ignore_index, double temperature = 1.0) {
  const at::Tensor x_up = is_half(x_in.scalar_type()) ? x_in.to(at::kFloat) : x_in;
  const at::Tensor x = temperature == 1.0 ? x_up : x_up / temperature;
  const at::Tensor logp = at::log_softmax(x, -1);
  const at::Tensor p = logp.exp();
  at::Tensor d = at::zeros_like(x);
  if (g.logsumexp.defined()) d = d + p * g.logsumexp.to(x.scalar_type()).unsqueeze(-1);
  if (g.logprob.defined() && labels.defined() && labels.numel() > 0) {
    const at::Tensor valid = labels.ne(ignore_index);
    const at::Tensor y = at::where(valid, labels, at::zeros_like(labels));
    const at::Tensor gl = at::where(valid, g.logprob.to(x.scalar_type()), at::zeros({}, x.options()));
    d = d + (at::one_hot(y, x.size(-1)).to(x.scalar_type()) - p) * gl.unsqueeze(-1);
  }
  if (g.entropy.defined()) {
    const at::Tensor logp_safe = at::where(x.gt(-std::numeric_limits<double>::infinity()), logp, at::zeros_like(logp));
    const at::Tensor h = -(p * logp_safe).sum(-1, true);
    d = d - p * (logp_safe + h) * g.entropy.to(x.scalar_type()).unsqueeze(-1);
  }
  if (temperature != 1.0) d = d / temperature;
  return d.to(x_in.scalar_type());
}

/// Packs a request into an int64 for the node's saved data (and back).
inline std::int64_t pack(const logits_stats_request& q) {
  return (q.logsumexp ? 1 : 0) | (q.logprob ? 2 : 0) | (q.entropy ? 4 : 0) | (q.argmax_hit ? 8 : 0);
}
inline logits_stats_request unpack(std::int64_t bits, std::int64_t ignore_index, double temperature) {
  return {(bits & 1) != 0, (bits & 2) != 0, (bits & 4) != 0, (bits & 8) != 0, ignore_index, temperature};
}

/// The autograd node: outputs the requested [lse, logprob, entropy] in that order, then the argmax
/// hit (not differentiable) when asked.
struct logits_stats_function : torch::autograd::Function<logits_stats_function> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const at::Tensor& labels, std::int64_t bits, std::int64_t ignore_index,
                                                double temperature) {
    const logits_stats_request q = unpack(bits, ignore_index, temperature);
    ctx->save_for_backward({x, labels});
    ctx->set_materialize_grads(false);  // an unused output's gradient stays undefined: no work for it
    ctx->saved_data["bits"] = bits;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["temperature"] = temperature;
    const row_outputs r = torch_kernels::forward(x, labels, q);
    torch::autograd::variable_list out;
    if (q.logsumexp) out.push_back(r.logsumexp);
    if (q.logprob) out.push_back(r.logprob);
    if (q.entropy) out.push_back(r.entropy);
    if (q.argmax_hit) {
      out.push_back(r.argmax_hit);
      ctx->mark_non_differentiable({r.argmax_hit});
    }
    return out;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const std::int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    const double temperature = ctx->saved_data["temperature"].toDouble();
    const logits_stats_request q = unpack(ctx->saved_data["bits"].toInt(), ignore_index, temperature);
    row_grads g;
    std::size_t i = 0;
    if (q.logsumexp) g.logsumexp = grads[i++];
    if (q.logprob) g.logprob = grads[i++];
    if (q.entropy) g.entropy = grads[i++];
    const at::Tensor grad = at::GradMode::is_enabled()
                                ? backward_differentiable(saved[0], saved[1], g, ignore_index, temperature)
                                : torch_kernels::backward(saved[0], saved[1], g, ignore_index, temperature);
    return {grad, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

/// The requested statistics of x [..., V] with labels (int64, or empty): through the autograd node
/// when x requires grad, else the engine directly.
inline logits_row_stats<at::Tensor> logits_stats(const at::Tensor& x, const at::Tensor& labels,
                                                 const logits_stats_request& q) {
  logits_row_stats<at::Tensor> r;
  if (x.requires_grad() && at::GradMode::is_enabled()) {
    const auto out = logits_stats_function::apply(x, labels, pack(q), q.ignore_index, q.temperature);
    std::size_t i = 0;
    if (q.logsumexp) r.logsumexp = out[i++];
    if (q.logprob) r.logprob = out[i++];
    if (q.entropy) r.entropy = out[i++];
    if (q.argmax_hit) r.argmax_hit = out[i++];
    return r;
  }
  row_outputs o = torch_kernels::forward(x, labels, q);
  r.logsumexp = std::move(o.logsumexp);
  r.logprob = std::move(o.logprob);
  r.entropy = std::move(o.entropy);
  r.argmax_hit = std::move(o.argmax_hit);
  return r;
}

}  // namespace posttrain::detail::torch_kernels
