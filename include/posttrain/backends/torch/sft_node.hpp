// posttrain/backends/torch/sft_node.hpp — sft_loss in its plain form (fused.hpp's sft hook) as one
// autograd node over the CPU kernels.
//
// The generic sft_loss is a composition of ~35 LibTorch ops around the one-pass statistics node (the
// mask, the count, the aggregation, three metrics, their autograd nodes): on a small batch ([64, 12, 64])
// their dispatch costs more than the kernels. This node computes, from one read per row
// (kernels::logits_forward, which also keeps each row's max m and log-sum log s):
//   ℓ_t = -log p_t[y_t] (0 where y_t = ignore_index),  loss = c·Σ_t ℓ_t,
//   c = 1/max(n, 1) (token_mean, PyTorch's reduction="mean") or the request's constant (1/normalizer, 1 for sum),
//   n = #{t : y_t != ignore_index}, accuracy = Σ_t [argmax_t = y_t] / max(n, 1),
//   entropy = Σ_{counted t} H_t / max(n, 1)  (selected, so an ignored row's NaN logits cannot reach it)
// with the sums in double. Its backward, for upstream gradients g_loss (0-d) and g_ℓ ([...]), writes per
// counted row w_t = g_loss·c + g_ℓ[t] and
//   d/dx_t = w_t·(p_t − onehot(y_t)) / T,   p_t = softmax(x_t / T)
// in one read + write per row from the saved m and log s (no statistics pass; kernels::write_row_backward),
// into a fresh tensor or, with the request's gradient_in_place, over the logits themselves (the contract of
// sft_options::in_place_gradient and autograd.hpp's in-place node: x is saved, its version counter bumped).
// Ignored rows get an exact 0. A backward that records a graph (create_graph) takes
// autograd.hpp's differentiable LibTorch form (refused in the in-place mode).
// Taken for contiguous CPU float32/float64 logits with at least one row and one column (the kernel path);
// other inputs go back to the generic composition.
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>

#include "posttrain/backends/torch/autograd.hpp"
#include "posttrain/backends/torch/knobs.hpp"
#include "posttrain/backends/torch/logits_engine.hpp"
#include "posttrain/error.hpp"
#include "posttrain/fused.hpp"

namespace posttrain::detail::torch_sft {

#if POSTTRAIN_TORCH_CPU_KERNELS

/// Whether the node takes x (contiguous CPU float32/float64, non-empty; torch_backend::set_sft_node(false): never).
inline bool takes(const at::Tensor& x) {
  return torch_backend::sft_node() && torch_kernels::choose(x) == torch_backend::logits_path::kernel && x.dim() >= 1 &&
         x.size(-1) > 0 && x.numel() > 0;
}

/// The forward's tensors: the five outputs, and what the backward needs.
struct forward_out {
  at::Tensor loss, per_token, num_tokens, accuracy, entropy;
  at::Tensor row_max, row_log_s;  // [N] S, [N] double
  double count_at_least_1 = 1.0;
};

/// One read per row, then the O(N) reductions in double. labels: contiguous CPU int64, x's leading shape.
inline forward_out forward_values(const at::Tensor& x, const at::Tensor& labels, const sft_fused_request& q) {
  const std::int64_t v = x.size(-1), rows = x.numel() / v;
  const auto lead = x.sizes().slice(0, static_cast<std::size_t>(x.dim() - 1));
  forward_out f;
  f.per_token = at::empty(lead, x.options());
  const at::Tensor entropy_rows = at::empty({rows}, x.options()), hit = at::empty({rows}, x.options());
  f.row_max = at::empty({rows}, x.options());
  f.row_log_s = at::empty({rows}, x.options().dtype(at::kDouble));
  const std::int64_t* lab = labels.data_ptr<std::int64_t>();
  const auto run = [&](auto* xp) {
    using S = std::remove_pointer_t<decltype(xp)>;
    S* tok = f.per_token.data_ptr<S>();
    S* ent = entropy_rows.data_ptr<S>();
    S* h = hit.data_ptr<S>();
    kernels::logits_forward<S>(xp, rows, v, lab, q.ignore_index, nullptr, tok, ent, f.row_max.data_ptr<S>(),
                               f.row_log_s.data_ptr<double>(), h, 1.0 / q.temperature);
    // tok holds log p[y] (0 where ignored): ℓ = -log p[y]; sums in double, ignored rows selected out.
    double n = 0.0, nll = 0.0, hits = 0.0, ent_sum = 0.0;
    for (std::int64_t r = 0; r < rows; ++r) {
      tok[r] = -tok[r];
      if (lab[r] == q.ignore_index) {
        tok[r] = S(0);  // -0 otherwise
        continue;
      }
      n += 1.0;
      nll += static_cast<double>(tok[r]);
      hits += static_cast<double>(h[r]);
      ent_sum += static_cast<double>(ent[r]);
    }
    f.count_at_least_1 = std::max(n, 1.0);
    const double c = q.divide_by_count ? 1.0 / f.count_at_least_1 : q.weight;
    const auto scalar = [&](double value) { return at::scalar_tensor(static_cast<S>(value), x.options()); };
    f.loss = scalar(q.divide_by_count ? nll / f.count_at_least_1 : nll * c);
    f.num_tokens = scalar(n);
    f.accuracy = scalar(hits / f.count_at_least_1);
    f.entropy = scalar(ent_sum / f.count_at_least_1);
  };
  if (x.scalar_type() == at::kDouble)
    run(x.data_ptr<double>());
  else
    run(x.data_ptr<float>());
  return f;
}

/// The per-row weight w_t = g_loss·c + g_ℓ[t] as an [N] tensor of x's dtype (0 where ignored), through
/// LibTorch ops: the create_graph form.
inline at::Tensor row_weights_differentiable(const at::Tensor& g_loss, const at::Tensor& g_tok,
                                             const at::Tensor& labels, std::int64_t ignore_index, double c,
                                             const at::Tensor& x) {
  const std::int64_t rows = labels.numel();
  at::Tensor w = at::zeros({rows}, x.options());
  if (g_loss.defined()) w = w + g_loss.to(x.scalar_type()) * c;
  if (g_tok.defined()) w = w + g_tok.to(x.scalar_type()).reshape({-1});
  return at::where(labels.reshape({-1}).ne(ignore_index), w, at::zeros({}, x.options()));
}

/// The node: outputs loss, per-token loss (differentiable), count, accuracy, entropy (not).
struct sft_function : torch::autograd::Function<sft_function> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const at::Tensor& labels, std::int64_t ignore_index, double temperature,
                                                bool divide_by_count, double weight, bool in_place) {
    const sft_fused_request q{ignore_index, temperature, divide_by_count, weight, in_place};
    forward_out f = forward_values(x, labels, q);
    ctx->save_for_backward({x, labels, f.row_max, f.row_log_s});
    ctx->set_materialize_grads(false);
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["c"] = divide_by_count ? 1.0 / f.count_at_least_1 : weight;
    ctx->saved_data["in_place"] = in_place;
    ctx->mark_non_differentiable({f.num_tokens, f.accuracy, f.entropy});
    return {f.loss, f.per_token, f.num_tokens, f.accuracy, f.entropy};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const bool in_place = ctx->saved_data["in_place"].toBool();
    const torch::autograd::variable_list none{at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
                                              at::Tensor(), at::Tensor(), at::Tensor()};
    if (in_place && at::GradMode::is_enabled())
      torch_kernels::refuse_create_graph_in_place("sft_loss with in_place_gradient");
    const auto saved = ctx->get_saved_variables();  // raises if the logits were modified since the forward
    const at::Tensor& x = saved[0];
    const at::Tensor& labels = saved[1];
    const std::int64_t ignore_index = ctx->saved_data["ignore_index"].toInt();
    const double temperature = ctx->saved_data["temperature"].toDouble();
    const double c = ctx->saved_data["c"].toDouble();
    const at::Tensor& g_loss = grads[0];
    const at::Tensor& g_tok = grads[1];
    if (!g_loss.defined() && !g_tok.defined()) return none;
    if (at::GradMode::is_enabled()) {
      // create_graph: the same gradient in LibTorch ops (d log p_y / dx's form with g_lp = -w).
      torch_kernels::row_grads g;
      g.logprob = -row_weights_differentiable(g_loss, g_tok, labels, ignore_index, c, x).reshape(labels.sizes());
      torch::autograd::variable_list out = none;
      // selected, not multiplied: an ignored row's NaN logits give an exact 0 there
      out[0] = at::where(labels.ne(ignore_index).unsqueeze(-1),
                         torch_kernels::backward_differentiable(x, labels, g, ignore_index, temperature),
                         at::zeros({}, x.options()));
      return out;
    }
    const std::int64_t v = x.size(-1), rows = x.numel() / v;
    const std::int64_t* lab = labels.data_ptr<std::int64_t>();
    at::Tensor out = in_place ? x : at::empty(x.sizes(), x.options());
    const double inv_t = 1.0 / temperature;
    const auto run = [&](auto* xp) {
      using S = std::remove_pointer_t<decltype(xp)>;
      const double gl = g_loss.defined() ? g_loss.item<double>() * c : 0.0;  // a CPU 0-d tensor: no device sync
      const at::Tensor gt = g_tok.defined() ? g_tok.to(x.scalar_type()).contiguous().view({-1}) : at::Tensor();
      const S* gtp = gt.defined() ? gt.data_ptr<S>() : nullptr;
      const S* m = saved[2].data_ptr<S>();
      const double* log_s = saved[3].data_ptr<double>();
      S* o = out.data_ptr<S>();
      kernels::parallel_rows(rows, v, [&](std::int64_t begin, std::int64_t end) {
        for (std::int64_t r = begin; r < end; ++r) {
          S* row_out = o + r * v;
          if (lab[r] == ignore_index) {
            std::fill(row_out, row_out + v, S(0));
            continue;
          }
          const double w = gl + (gtp ? static_cast<double>(gtp[r]) : 0.0);
          // d log p_y/dx = onehot − p, times the upstream -w: the backward form's d = -w.
          const kernels::backward_coefficients k{0.0, 0.0, 0.0, 0.0, -w};
          const kernels::row_stats<S> st{m[r], log_s[r], 0.0, inv_t};
          kernels::write_row_backward(xp + r * v, v, st, k, lab[r], row_out);  // reads each logit before writing
        }
      });
    };
    if (x.scalar_type() == at::kDouble)
      run(x.data_ptr<double>());
    else
      run(x.data_ptr<float>());
    if (in_place) {
      x.unsafeGetTensorImpl()->bump_version();  // the logits are gone: a later read of the saved x raises
      out = x.detach();
    }
    torch::autograd::variable_list result = none;
    result[0] = out;
    return result;
  }
};

/// sft_loss's plain form for logits the node takes (else empty): through the node when x requires grad.
inline std::optional<sft_fused_outputs<at::Tensor>> sft(const at::Tensor& x, const at::Tensor& labels_any,
                                                        const sft_fused_request& q) {
  if (!takes(x)) return std::nullopt;
  const at::Tensor labels = labels_any.to(at::kCPU, at::kLong).contiguous();
  if (x.requires_grad() && at::GradMode::is_enabled()) {
    const bool in_place = q.gradient_in_place;
    const auto out =
        sft_function::apply(x, labels, q.ignore_index, q.temperature, q.divide_by_count, q.weight, in_place);
    return sft_fused_outputs<at::Tensor>{out[0], out[1], out[2], out[3], out[4]};
  }
  forward_out f = forward_values(x, labels, q);
  return sft_fused_outputs<at::Tensor>{f.loss, f.per_token, f.num_tokens, f.accuracy, f.entropy};
}

#else

inline std::optional<sft_fused_outputs<at::Tensor>> sft(const at::Tensor&, const at::Tensor&,
                                                        const sft_fused_request&) {
  return std::nullopt;
}

#endif

}  // namespace posttrain::detail::torch_sft
