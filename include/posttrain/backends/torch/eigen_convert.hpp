// posttrain/backends/torch/eigen_convert.hpp — LibTorch tensors to the Eigen reference and back.
//
// For checking a LibTorch computation (yours or a Python trainer's saved tensors) against the
// double-precision reference: convert the inputs with to_eigen<double>, run the same posttrain call on
// both, and compare (check/compare.hpp), or convert the reference's result back with to_torch.
//   to_eigen<S>(x)      any dtype (half, float, double, integer, bool), device and strides -> eigen_tensor<S>
//   to_eigen_index(i)   any integer (or bool) id tensor -> eigen_index (int64)
//   to_torch(e)         eigen_tensor<float|double> -> CPU at::Tensor of the same dtype (or `options`')
//   to_torch(i)         eigen_index -> CPU int64 at::Tensor
// Each copies (the results share no memory with the arguments) and synchronises a device tensor; values
// are converted exactly where the target type can hold them (to_eigen<float> rounds double to nearest).
// Needs Eigen and LibTorch: included by backends/torch.hpp when <Eigen/Core> is on the include path.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>

#include "posttrain/backends/eigen/tensor.hpp"
#include "posttrain/backends/torch/tensor.hpp"
#include "posttrain/detail/validate.hpp"

namespace posttrain {

namespace detail::convert {
inline void require_convertible(std::string_view fn, const at::Tensor& x) {
  const dtype d = tensor_traits<at::Tensor>::dtype_of(x);
  require_data(fn, "x", d, tensor_traits<at::Tensor>::device(x));
  if (!is_floating(d) && !is_integer(d) && d != dtype::boolean)
    fail(fn, "x must have a floating, integer or bool dtype, got ", dtype_name(d), " (", x.scalar_type(), ")");
}
}  // namespace detail::convert

/// A row-major eigen_tensor<S> (S float or double) holding x's values: any dtype, device and strides.
template <class S>
  requires std::is_same_v<S, float> || std::is_same_v<S, double> eigen_tensor<S> to_eigen(const at::Tensor& x) {
    detail::convert::require_convertible("to_eigen", x);
    constexpr auto target = std::is_same_v<S, float> ? at::kFloat : at::kDouble;
    const at::Tensor c = x.detach().to(at::kCPU).to(target).contiguous();
    const shape_t s(c.sizes().begin(), c.sizes().end());
    eigen_tensor<S> out(s);
    std::copy(c.data_ptr<S>(), c.data_ptr<S>() + c.numel(), out.data());
    return out;
  }

/// An eigen_index (int64) holding an integer or bool id tensor's values: any width, device and strides.
inline eigen_index to_eigen_index(const at::Tensor& i) {
  constexpr const char* fn = "to_eigen_index";
  const dtype d = tensor_traits<at::Tensor>::dtype_of(i);
  detail::require_data(fn, "i", d, tensor_traits<at::Tensor>::device(i));
  if (!is_integer(d) && d != dtype::boolean)
    detail::fail(fn, "i must have an integer or bool dtype, got ", dtype_name(d));
  const at::Tensor c = i.to(at::kCPU).to(at::kLong).contiguous();
  eigen_index out(shape_t(c.sizes().begin(), c.sizes().end()));
  std::copy(c.data_ptr<std::int64_t>(), c.data_ptr<std::int64_t>() + c.numel(), out.data());
  return out;
}

/// A contiguous CPU at::Tensor of e's shape and values, in e's dtype unless `options` names one (and a
/// device, to move it there).
template <class S>
  requires std::is_same_v<S, float> || std::is_same_v<S, double> at::Tensor to_torch(const eigen_tensor<S>& e,
                                                                                     at::TensorOptions options = {}) {
    constexpr auto own = std::is_same_v<S, float> ? at::kFloat : at::kDouble;
    at::Tensor out = at::empty(e.shape(), at::TensorOptions().dtype(own));
    std::copy(e.data(), e.data() + out.numel(), out.data_ptr<S>());
    if (options.has_dtype() || options.has_device())
      out = out.to(options.has_device() ? options.device() : out.device(),
                   options.has_dtype() ? c10::typeMetaToScalarType(options.dtype()) : own);
    return out;
  }

/// A contiguous CPU int64 at::Tensor of i's shape and values.
inline at::Tensor to_torch(const eigen_index& i) {
  at::Tensor out = at::empty(i.shape(), at::TensorOptions().dtype(at::kLong));
  std::copy(i.data(), i.data() + out.numel(), out.data_ptr<std::int64_t>());
  return out;
}

}  // namespace posttrain
