// posttrain/backends/torch.hpp — the LibTorch backend: `torch::Tensor` on any device and dtype.
//
// Every operation is a LibTorch op, so autograd flows through every posttrain loss: call
// `result.loss.backward()` as with any torch expression. bfloat16/float16 inputs are computed in
// float32 by the algorithms (ops::upcast), as TRL and verl upcast logits before a loss.
#pragma once

#include <ATen/ATen.h>
#include <torch/types.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "posttrain/error.hpp"
#include "posttrain/tensor.hpp"

// posttrain's fused CPU kernels are written with Eigen's packet math: LibTorch CPU tensors use them
// when Eigen is on the include path (link posttrain::eigen too), and LibTorch's own ops otherwise.
#if __has_include(<Eigen/Core>)
#include <torch/csrc/autograd/custom_function.h>

#include "posttrain/kernels/logits_cpu.hpp"
#define POSTTRAIN_TORCH_CPU_KERNELS 1
#else
#define POSTTRAIN_TORCH_CPU_KERNELS 0
#endif

namespace posttrain {

#if POSTTRAIN_TORCH_CPU_KERNELS
namespace detail::torch_kernels {

/// The kernels read contiguous CPU float32/float64 buffers; anything else (CUDA, half types the
/// algorithms have not upcast, strided views) takes LibTorch's own ops.
inline bool usable(const at::Tensor& x) {
  return x.device().is_cpu() && x.layout() == at::kStrided && x.is_contiguous() && x.dim() >= 1 && x.numel() > 0 &&
         (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble);
}

enum class output { logsumexp, logprob, entropy };

/// One fused forward pass over the rows of x [..., V] (no autograd): the [...] result.
inline at::Tensor forward(const at::Tensor& x, const at::Tensor& labels, output what) {
  const std::int64_t v = x.size(-1);
  at::Tensor out = at::empty(x.sizes().slice(0, static_cast<std::size_t>(x.dim() - 1)), x.options());
  const std::int64_t rows = out.numel();
  const std::int64_t* lab = labels.defined() && labels.numel() > 0 ? labels.data_ptr<std::int64_t>() : nullptr;
  const auto run = [&](auto* xp, auto* op) {
    using S = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
    kernels::logits_forward<S>(xp, rows, v, lab, std::numeric_limits<std::int64_t>::min(),
                               what == output::logsumexp ? op : nullptr, what == output::logprob ? op : nullptr,
                               what == output::entropy ? op : nullptr);
  };
  if (x.scalar_type() == at::kFloat)
    run(x.data_ptr<float>(), out.data_ptr<float>());
  else
    run(x.data_ptr<double>(), out.data_ptr<double>());
  return out;
}

/// grad_x[r, v] = p·(α_r + β_r·log p) − b_r·[v = y_r] with the coefficients of `what` and the
/// incoming gradient g [...] (the analytic backward, one read for the statistics, one read + write).
inline at::Tensor backward(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& grad, output what) {
  const std::int64_t v = x.size(-1);
  at::Tensor out = at::empty_like(x);
  const at::Tensor g = grad.to(at::kCPU, x.scalar_type()).contiguous();
  const std::int64_t rows = g.numel();
  const auto run = [&](auto* xp, auto* gp, auto* op) {
    using S = std::remove_const_t<std::remove_pointer_t<decltype(xp)>>;
    const std::int64_t* lab = labels.defined() && labels.numel() > 0 ? labels.data_ptr<std::int64_t>() : nullptr;
    kernels::logits_backward<S>(
        xp, rows, v, what == output::logprob ? lab : nullptr,
        [&](std::int64_t r, const kernels::row_stats<S>& st) {
          const double gr = static_cast<double>(gp[r]);
          switch (what) {
            case output::logsumexp: return kernels::backward_coefficients{gr, 0.0, 0.0, 0.0};
            case output::logprob: return kernels::backward_coefficients{-gr, 0.0, -gr, 0.0};  // onehot - p
            case output::entropy: return kernels::backward_coefficients{-gr * st.entropy(), -gr, 0.0, 0.0};
          }
          return kernels::backward_coefficients{};
        },
        op);
  };
  if (x.scalar_type() == at::kFloat)
    run(x.data_ptr<float>(), g.data_ptr<float>(), out.data_ptr<float>());
  else
    run(x.data_ptr<double>(), g.data_ptr<double>(), out.data_ptr<double>());
  return out;
}

/// The same backward in LibTorch ops, differentiable again: used when the graph of the backward
/// is being recorded (create_graph = true), where the kernel's raw output would cut it.
inline at::Tensor backward_differentiable(const at::Tensor& x, const at::Tensor& labels, const at::Tensor& grad,
                                          output what) {
  const at::Tensor g = grad.unsqueeze(-1);
  const at::Tensor logp = at::log_softmax(x, -1);
  const at::Tensor p = logp.exp();
  switch (what) {
    case output::logsumexp: return p * g;
    case output::logprob: return (at::one_hot(labels, x.size(-1)).to(x.scalar_type()) - p) * g;
    case output::entropy: {
      const at::Tensor logp_safe =
          at::where(x.gt(-std::numeric_limits<double>::infinity()), logp, at::zeros_like(logp));
      const at::Tensor h = -(p * logp_safe).sum(-1, true);
      return -(p * (logp_safe + h)) * g;
    }
  }
  return {};
}

/// An autograd node around the fused forward whose backward is the analytic one.
template <output What>
struct fused_function : torch::autograd::Function<fused_function<What>> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& labels) {
    ctx->save_for_backward({x, labels});
    return torch_kernels::forward(x, labels, What);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor grad = at::GradMode::is_enabled() ? backward_differentiable(saved[0], saved[1], grads[0], What)
                                                       : torch_kernels::backward(saved[0], saved[1], grads[0], What);
    return {grad, at::Tensor()};
  }
};

template <output What>
at::Tensor apply(const at::Tensor& x, const at::Tensor& labels) {
  // autograd::Function needs defined tensors: "no labels" travels as an empty index tensor.
  if (x.requires_grad() && at::GradMode::is_enabled())
    return fused_function<What>::apply(x, labels.defined() ? labels : at::empty({0}, at::kLong));
  return torch_kernels::forward(x, labels, What);
}

}  // namespace detail::torch_kernels
#endif

template <>
struct tensor_traits<at::Tensor> {
  using T = at::Tensor;
  using index_tensor = at::Tensor;

  static dtype from_scalar_type(c10::ScalarType t) {
    switch (t) {
      case at::kHalf: return dtype::float16;
      case at::kBFloat16: return dtype::bfloat16;
      case at::kFloat: return dtype::float32;
      case at::kDouble: return dtype::float64;
      case at::kInt: return dtype::int32;
      case at::kLong: return dtype::int64;
      case at::kBool: return dtype::boolean;
      default: return dtype::other;
    }
  }
  static c10::ScalarType to_scalar_type(dtype d) {
    switch (d) {
      case dtype::float16: return at::kHalf;
      case dtype::bfloat16: return at::kBFloat16;
      case dtype::float32: return at::kFloat;
      case dtype::float64: return at::kDouble;
      case dtype::int32: return at::kInt;
      case dtype::int64: return at::kLong;
      case dtype::boolean: return at::kBool;
      case dtype::other: break;
    }
    detail::fail("torch backend", "no torch scalar type for dtype ", dtype_name(d));
  }

  static shape_t shape(const T& x) { return x.sizes().vec(); }
  static dtype dtype_of(const T& x) { return from_scalar_type(x.scalar_type()); }
  static std::string device(const T& x) { return x.device().str(); }
  static shape_t index_shape(const T& i) { return i.sizes().vec(); }
  static dtype index_dtype(const T& i) { return from_scalar_type(i.scalar_type()); }
  static std::string index_device(const T& i) { return i.device().str(); }

  static T full(const T& like, const shape_t& s, double value) {
    return at::full(s, value, like.options().requires_grad(false));
  }
  static T one_hot(const T& i, std::int64_t n, const T& like) {
    return at::one_hot(i.to(at::kLong), n).to(like.options().requires_grad(false));
  }

  static T unary(unary_op op, const T& x) {
    switch (op) {
      case unary_op::neg: return -x;
      case unary_op::exp: return x.exp();
      case unary_op::log: return x.log();
      case unary_op::log1p: return x.log1p();
      case unary_op::expm1: return x.expm1();
      case unary_op::abs: return x.abs();
      case unary_op::sqrt: return x.sqrt();
      case unary_op::sign: return x.sign();
    }
    return x;
  }
  static T binary(binary_op op, const T& a, const T& b) {
    switch (op) {
      case binary_op::add: return a + b;
      case binary_op::sub: return a - b;
      case binary_op::mul: return a * b;
      case binary_op::div: return a / b;
      case binary_op::maximum: return at::maximum(a, b);
      case binary_op::minimum: return at::minimum(a, b);
    }
    return a;
  }
  static T compare(compare_op op, const T& a, const T& b) {
    T r;
    switch (op) {
      case compare_op::lt: r = a.lt(b); break;
      case compare_op::le: r = a.le(b); break;
      case compare_op::gt: r = a.gt(b); break;
      case compare_op::ge: r = a.ge(b); break;
      case compare_op::eq: r = a.eq(b); break;
      case compare_op::ne: r = a.ne(b); break;
    }
    return r.to(a.scalar_type());
  }
  static T where(const T& cond, const T& a, const T& b) { return at::where(cond.ne(0), a, b); }
  static T clamp(const T& x, double lo, double hi) {
    const auto bound = [](double v) -> c10::optional<at::Scalar> {
      if (std::isinf(v)) return c10::nullopt;
      return at::Scalar(v);
    };
    return at::clamp(x, bound(lo), bound(hi));
  }
  static T reduce(reduce_op op, const T& x, std::int64_t dim, bool keepdim) {
    switch (op) {
      case reduce_op::sum: return x.sum(dim, keepdim);
      case reduce_op::max: return at::amax(x, {dim}, keepdim);
      case reduce_op::min: return at::amin(x, {dim}, keepdim);
    }
    return x;
  }
  static T argmax_last(const T& x) { return x.argmax(-1); }
  static T gather_last(const T& x, const T& i) { return x.gather(-1, i.to(at::kLong).unsqueeze(-1)).squeeze(-1); }
  static T reshape(const T& x, const shape_t& s) { return x.reshape(s); }
  static T detach(const T& x) { return x.detach(); }
  static T to_dtype(const T& x, dtype d) { return x.to(to_scalar_type(d)); }
  static std::vector<double> to_host(const T& x) {
    const T c = x.detach().to(at::kCPU, at::kDouble).contiguous();
    return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
  }

  static T index_not_equal(const T& i, std::int64_t value, const T& like) { return i.ne(value).to(like.scalar_type()); }
  static T index_equal(const T& a, const T& b, const T& like) { return a.eq(b).to(like.scalar_type()); }
  static T index_replace(const T& i, std::int64_t from, std::int64_t to) {
    return at::where(i.eq(from), at::full({}, to, i.options()), i);
  }
  static std::int64_t index_count_outside(const T& i, std::int64_t lo, std::int64_t hi, std::int64_t except) {
    return (i.ne(except) & (i.lt(lo) | i.ge(hi))).sum().item<std::int64_t>();
  }

  static std::vector<std::int64_t> index_to_host(const T& i) {
    const T c = i.to(at::kCPU, at::kLong).contiguous();
    return std::vector<std::int64_t>(c.data_ptr<std::int64_t>(), c.data_ptr<std::int64_t>() + c.numel());
  }
  static T argsort_last(const T& x) { return std::get<1>(x.sort(/*stable=*/true, /*dim=*/-1, /*descending=*/false)); }
  static T slice(const T& x, std::int64_t dim, std::int64_t start, std::int64_t length) {
    return x.narrow(dim, start, length);
  }
  static T concat(const std::vector<T>& parts, std::int64_t dim) { return at::cat(parts, dim); }
  static T cumsum(const T& x, std::int64_t dim) { return x.cumsum(dim); }

  // ---- fused overrides ----
  // Contiguous CPU float32/float64 logits go through posttrain::kernels (one pass per row; an
  // autograd node with the analytic backward when they require grad); everything else (CUDA,
  // strided views) through LibTorch's own kernels, autograd intact.

  /// logsumexp over the last dimension; rows of -inf give -inf.
  static T fused_logsumexp_last(const T& x) {
#if POSTTRAIN_TORCH_CPU_KERNELS
    if (detail::torch_kernels::usable(x))
      return detail::torch_kernels::apply<detail::torch_kernels::output::logsumexp>(x, T());
#endif
    return at::logsumexp(x, {-1});
  }
  /// TRL's selective log-softmax: log p(label) = (x_y - m) - log Σ e^{x - m}, no [N, V] log_softmax.
  static T fused_token_logprobs(const T& x, const T& labels) {
#if POSTTRAIN_TORCH_CPU_KERNELS
    if (detail::torch_kernels::usable(x) && labels.device().is_cpu()) {
      const T lab = labels.to(at::kLong).contiguous();
      if (index_count_outside(lab, 0, x.size(-1), std::numeric_limits<std::int64_t>::min()) != 0)
        detail::fail("fused_token_logprobs", "a label is outside [0, ", x.size(-1), ")");
      return detail::torch_kernels::apply<detail::torch_kernels::output::logprob>(x, lab);
    }
#endif
    return gather_last(x, labels) - at::logsumexp(x, {-1});
  }
  /// Entropy -Σ p log p over the last dimension; -inf logits contribute 0.
  static T fused_entropy_last(const T& x) {
#if POSTTRAIN_TORCH_CPU_KERNELS
    if (detail::torch_kernels::usable(x))
      return detail::torch_kernels::apply<detail::torch_kernels::output::entropy>(x, T());
#endif
    // Shift by the detached row max (0 for rows of -inf) so float32 keeps precision at large |x|.
    const T m = at::amax(x, {-1}, true).detach();
    const T xs = x - at::where(m.eq(-std::numeric_limits<double>::infinity()), at::zeros_like(m), m);
    const T logp = xs - at::logsumexp(xs, {-1}, true);
    const T logp_safe = at::where(x.gt(-std::numeric_limits<double>::infinity()), logp, at::zeros_like(logp));
    return -(logp.exp() * logp_safe).sum(-1);
  }
};

static_assert(tensor<at::Tensor>);

}  // namespace posttrain
