// posttrain/backends/torch/tensor.hpp — the LibTorch backend's traits: `torch::Tensor` on any device
// and dtype as a posttrain tensor.
//
// Every operation is a LibTorch op, so autograd flows through every posttrain loss: call
// `result.loss.backward()` as with any torch expression. bfloat16/float16 inputs are computed in
// float32, as TRL and verl upcast logits before a loss (ops::upcast). The fused hooks that read the
// logits once, half ones included, are backends/torch/fused.hpp.
#pragma once

#include <ATen/ATen.h>
#include <torch/types.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "posttrain/error.hpp"
#include "posttrain/tensor.hpp"

namespace posttrain {

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
      case at::kByte: return dtype::uint8;
      case at::kChar: return dtype::int8;
      case at::kShort: return dtype::int16;
      case at::kInt: return dtype::int32;
      case at::kLong: return dtype::int64;
      case at::kBool: return dtype::boolean;
      case c10::ScalarType::Undefined: return dtype::undefined;
      default: return dtype::other;
    }
  }
  static c10::ScalarType to_scalar_type(dtype d) {
    switch (d) {
      case dtype::float16: return at::kHalf;
      case dtype::bfloat16: return at::kBFloat16;
      case dtype::float32: return at::kFloat;
      case dtype::float64: return at::kDouble;
      case dtype::uint8: return at::kByte;
      case dtype::int8: return at::kChar;
      case dtype::int16: return at::kShort;
      case dtype::int32: return at::kInt;
      case dtype::int64: return at::kLong;
      case dtype::boolean: return at::kBool;
      case dtype::undefined:
      case dtype::other: break;
    }
    detail::fail("torch backend", "no torch scalar type for dtype ", dtype_name(d));
  }

  // Not inlined: GCC 12 at -O2 -DNDEBUG, seeing ArrayRef::vec()'s allocation and the vector's destruction
  // in one function (ops::numel inside require_nonempty), reports a false -Wfree-nonheap-object, which
  // breaks users' -Werror builds (tests/consumer builds a strict LibTorch program at -O2 and -O3).
  [[gnu::noinline]] static shape_t shape(const T& x) { return x.sizes().vec(); }
  static dtype dtype_of(const T& x) { return x.defined() ? from_scalar_type(x.scalar_type()) : dtype::undefined; }
  static std::string device(const T& x) { return x.defined() ? x.device().str() : std::string("undefined"); }
  [[gnu::noinline]] static shape_t index_shape(const T& i) { return i.defined() ? i.sizes().vec() : shape_t{}; }
  static dtype index_dtype(const T& i) { return i.defined() ? from_scalar_type(i.scalar_type()) : dtype::undefined; }
  static std::string index_device(const T& i) { return i.defined() ? i.device().str() : std::string("undefined"); }
  /// Index tensors of 8- and 16-bit types are compared in int64: a uint8 label compared with ignore_index -100
  /// would otherwise wrap -100 to 156.
  static T wide_index(const T& i) {
    const auto t = i.scalar_type();
    return t == at::kLong || t == at::kInt ? i : i.to(at::kLong);
  }

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

  static T index_not_equal(const T& i, std::int64_t value, const T& like) {
    return wide_index(i).ne(value).to(like.scalar_type());
  }
  static T index_equal(const T& a, const T& b, const T& like) {
    return wide_index(a).eq(wide_index(b)).to(like.scalar_type());
  }
  static T index_replace(const T& i, std::int64_t from, std::int64_t to) {
    const T w = wide_index(i);
    return at::where(w.eq(from), at::full({}, to, w.options()), w);
  }
  static std::int64_t index_count_outside(const T& i, std::int64_t lo, std::int64_t hi, std::int64_t except) {
    // Contiguous CPU int64/int32 labels (the usual ones): one loop over the values, no LibTorch ops
    // (seven ops and a 0-d result cost ~9 µs per call, a fifth of a small sft_loss step).
    if (i.device().is_cpu() && i.is_contiguous()) {
      if (i.scalar_type() == at::kLong) return count_outside(i.data_ptr<std::int64_t>(), i.numel(), lo, hi, except);
      if (i.scalar_type() == at::kInt) return count_outside(i.data_ptr<std::int32_t>(), i.numel(), lo, hi, except);
    }
    const T w = wide_index(i);
    return (w.ne(except) & (w.lt(lo) | w.ge(hi))).sum().item<std::int64_t>();
  }
  template <class I>
  static std::int64_t count_outside(const I* p, std::int64_t n, std::int64_t lo, std::int64_t hi, std::int64_t except) {
    std::int64_t bad = 0;
    for (std::int64_t k = 0; k < n; ++k) {
      const auto v = static_cast<std::int64_t>(p[k]);
      bad += (v != except && (v < lo || v >= hi)) ? 1 : 0;
    }
    return bad;
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
};

static_assert(tensor<at::Tensor>);

}  // namespace posttrain
