// posttrain/backends/torch/autograd.hpp — the autograd node around the one-pass logits engine: one
// node for logsumexp, log p[label] and entropy together, whose backward is the engine's analytic
// one (backends/torch/logits_engine.hpp), so a loss that reads all three still reads the logits
// once forward and once backward.
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string_view>
#include <type_traits>
#include <vector>

#include "posttrain/backends/torch/logits_engine.hpp"
#include "posttrain/error.hpp"
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
  // Rows whose upstream gradients are all 0 get an exact 0, selected (as torch_kernels::backward): not 0·NaN
  // where their logits hold NaN.
  const auto nonzero = [&](const at::Tensor& t) {
    return t.defined() ? t.ne(0) : at::zeros({}, x.options().dtype(at::kBool));
  };
  at::Tensor keep = nonzero(g.logsumexp).logical_or(nonzero(g.entropy));
  if (g.logprob.defined() && labels.defined() && labels.numel() > 0)
    keep = keep.logical_or(g.logprob.ne(0).logical_and(labels.ne(ignore_index)));
  d = at::where(keep.unsqueeze(-1), d, at::zeros({}, d.options()));
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

/// The in-place nodes' answer to a backward that records a graph (create_graph = true): the gradient they write
/// over the logits is not differentiable.
[[noreturn]] inline void refuse_create_graph_in_place(std::string_view fn) {
  posttrain::detail::fail(fn,
                          "a backward with create_graph = true cannot differentiate the gradient it writes over the "
                          "logits; use the default mode (in_place_gradient = false)");
}

#if POSTTRAIN_TORCH_CPU_KERNELS
/// The in-place variant of the node (logits_stats_request::gradient_in_place), for contiguous CPU
/// float32/float64 logits (the kernel path). The forward is the same one read, and also keeps each
/// row's max m and log s; the backward writes the gradient into x's own storage row by row,
///   x[r, v] <- p_v·(α_r + β_r·log p_v) + d_r·([v = y_r] − p_v),   log p_v = a·(x_v − m_r) − log s_r
/// (the coefficients of torch_kernels::backward; one read + one write of the logits, one exp per
/// logit, no statistics pass), bumps x's version counter and returns x's storage as the gradient:
/// no [N, V] allocation. x is saved with save_for_backward, so autograd itself raises its "modified
/// by an inplace operation" error where the overwritten logits would be read again: a second
/// backward through this node (retain_graph), or any other node that saved the logits and runs
/// after this one. A backward that records a graph (create_graph) is refused with posttrain::error.
struct logits_stats_in_place_function : torch::autograd::Function<logits_stats_in_place_function> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const at::Tensor& labels, std::int64_t bits, std::int64_t ignore_index,
                                                double temperature) {
    const logits_stats_request q = unpack(bits, ignore_index, temperature);
    const std::int64_t v = x.size(-1), rows = x.numel() / v;
    const bool dbl = x.scalar_type() == at::kDouble;
    const at::Tensor row_max = at::empty({rows}, x.options());
    const at::Tensor row_log_s = at::empty({rows}, x.options().dtype(at::kDouble));
    const auto rows_like = [&] {
      return at::empty(x.sizes().slice(0, static_cast<std::size_t>(x.dim() - 1)), x.options());
    };
    row_outputs r;
    r.entropy = q.entropy ? rows_like() : at::Tensor();  // kept for the entropy gradient's H
    if (q.logsumexp) r.logsumexp = rows_like();
    if (q.logprob) r.logprob = rows_like();
    if (q.argmax_hit) r.argmax_hit = rows_like();
    const std::int64_t* lab = labels.numel() > 0 ? labels.data_ptr<std::int64_t>() : nullptr;
    const auto run = [&](auto* xp) {
      using S = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
      const auto ptr = [](const at::Tensor& t) -> S* { return t.defined() ? t.data_ptr<S>() : nullptr; };
      kernels::logits_forward<S>(xp, rows, v, lab, ignore_index, ptr(r.logsumexp), ptr(r.logprob), ptr(r.entropy),
                                 row_max.data_ptr<S>(), row_log_s.data_ptr<double>(), ptr(r.argmax_hit),
                                 1.0 / temperature);
    };
    if (dbl)
      run(x.data_ptr<double>());
    else
      run(x.data_ptr<float>());
    ctx->save_for_backward({x, labels, row_max, row_log_s, r.entropy.defined() ? r.entropy : at::Tensor()});
    ctx->set_materialize_grads(false);
    ctx->saved_data["bits"] = bits;
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["temperature"] = temperature;
    torch::autograd::variable_list out;
    if (q.logsumexp) out.push_back(r.logsumexp);
    if (q.logprob) out.push_back(r.logprob);
    if (q.entropy) out.push_back(r.entropy.clone());  // the saved copy stays the node's own
    if (q.argmax_hit) {
      out.push_back(r.argmax_hit);
      ctx->mark_non_differentiable({r.argmax_hit});
    }
    return out;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    if (at::GradMode::is_enabled()) refuse_create_graph_in_place("sft_loss / logits statistics with in_place_gradient");
    const auto saved = ctx->get_saved_variables();  // raises if the logits were modified since the forward
    const at::Tensor& x = saved[0];
    const at::Tensor& labels = saved[1];
    const std::int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    const double temperature = ctx->saved_data["temperature"].toDouble();
    const logits_stats_request q = unpack(ctx->saved_data["bits"].toInt(), ignore_index, temperature);
    row_grads g;
    std::size_t i = 0;
    if (q.logsumexp) g.logsumexp = grads[i++];
    if (q.logprob) g.logprob = grads[i++];
    if (q.entropy) g.entropy = grads[i++];
    if (!g.logsumexp.defined() && !g.logprob.defined() && !g.entropy.defined())
      return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    const std::int64_t v = x.size(-1), rows = x.numel() / v;
    const bool with_labels = labels.numel() > 0 && g.logprob.defined();
    const std::int64_t* lab = with_labels ? labels.data_ptr<std::int64_t>() : nullptr;
    const double inv_t = 1.0 / temperature;
    const auto run = [&](auto* xp) {
      using S = std::remove_pointer_t<decltype(xp)>;
      const auto flat = [&](const at::Tensor& t) {
        return t.defined() ? t.to(x.scalar_type()).contiguous().view({-1}) : at::Tensor();
      };
      const at::Tensor gl = flat(g.logsumexp), gp = flat(g.logprob), ge = flat(g.entropy);
      const S* glp = gl.defined() ? gl.data_ptr<S>() : nullptr;
      const S* gpp = gp.defined() ? gp.data_ptr<S>() : nullptr;
      const S* gep = ge.defined() ? ge.data_ptr<S>() : nullptr;
      const S* h = gep ? saved[4].data_ptr<S>() : nullptr;
      const S* m = saved[2].data_ptr<S>();
      const double* log_s = saved[3].data_ptr<double>();
      kernels::parallel_rows(rows, v, [&](std::int64_t begin, std::int64_t end) {
        for (std::int64_t r = begin; r < end; ++r) {
          const std::int64_t y = lab && lab[r] != ignore_index ? lab[r] : std::int64_t{-1};
          const double a = glp ? static_cast<double>(glp[r]) : 0.0;
          const double d = gpp && y >= 0 ? static_cast<double>(gpp[r]) : 0.0;
          const double e = gep ? static_cast<double>(gep[r]) : 0.0;
          S* row = xp + r * v;
          if (a == 0.0 && d == 0.0 && e == 0.0) {  // no upstream gradient: an exact 0, even over NaN logits
            std::fill(row, row + v, S(0));
            continue;
          }
          const kernels::backward_coefficients k{a - (gep ? e * static_cast<double>(h[r]) : 0.0), -e, 0.0, 0.0, d};
          const kernels::row_stats<S> st{m[r], log_s[r], 0.0, inv_t};
          kernels::write_row_backward(row, v, st, k, y, row);  // reads each logit before it writes it
        }
      });
    };
    if (x.scalar_type() == at::kDouble)
      run(x.data_ptr<double>());
    else
      run(x.data_ptr<float>());
    x.unsafeGetTensorImpl()->bump_version();  // the logits are gone: a later read of the saved x raises
    return {x.detach(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};
#endif

/// Whether the in-place node takes x (the kernel path: contiguous CPU float32/float64).
inline bool in_place_takes(const at::Tensor& x) {
#if POSTTRAIN_TORCH_CPU_KERNELS
  return choose(x) == logits_path::kernel && x.numel() > 0;
#else
  (void)x;
  return false;
#endif
}

/// The requested statistics of x [..., V] with labels (int64, or empty): through the autograd node
/// when x requires grad, else the engine directly.
inline logits_row_stats<at::Tensor> logits_stats(const at::Tensor& x, const at::Tensor& labels,
                                                 const logits_stats_request& q) {
  logits_row_stats<at::Tensor> r;
  if (x.requires_grad() && at::GradMode::is_enabled()) {
    const bool in_place = q.gradient_in_place && in_place_takes(x);
#if POSTTRAIN_TORCH_CPU_KERNELS
    const auto out = in_place ? logits_stats_in_place_function::apply(x, labels, pack(q), q.ignore_index, q.temperature)
                              : logits_stats_function::apply(x, labels, pack(q), q.ignore_index, q.temperature);
#else
    (void)in_place;
    const auto out = logits_stats_function::apply(x, labels, pack(q), q.ignore_index, q.temperature);
#endif
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
