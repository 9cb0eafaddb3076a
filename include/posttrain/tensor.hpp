// posttrain/tensor.hpp — the tensor concept: the small vocabulary every algorithm is written in.
//
// A backend is one specialisation of `posttrain::tensor_traits<T>` (the primary template is
// disabled). The concept `posttrain::tensor<T>` checks that the specialisation provides every
// operation below; the algorithms use nothing else (tests/archetype proves it with a tensor
// that has only these operations). The free functions at the bottom (`posttrain::ops`) are
// thin, dimension-normalising wrappers that algorithms call instead of the traits directly.
//
// Vocabulary (all element-wise operations broadcast like NumPy):
//   queries      shape, dtype_of, device; index_shape, index_dtype, index_device
//   creation     full(like, shape, value), one_hot(labels, n, like)
//   element-wise unary(op), binary(op), compare(op) -> 0/1 of the first operand's dtype,
//                where(cond, a, b), clamp(x, lo, hi)
//   reductions   reduce(sum|max|min, x, dim, keepdim), argmax_last
//   indexing     gather_last(x[..., V], index[...]) -> [...], argsort_last (stable, ascending)
//   structure    reshape, slice(x, dim, start, length), concat(parts, dim), cumsum(x, dim),
//                detach (stop-gradient), to_dtype, to_host
//   labels       index_not_equal, index_equal, index_replace, index_count_outside, index_to_host
//
// Optional fused hooks (one-pass logits statistics, the cross-entropy backward, distillation) are
// not part of the concept: a backend opts in through posttrain::fused_ops<T> (fused.hpp).
#pragma once

#include <concepts>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "posttrain/error.hpp"

namespace posttrain {

using shape_t = std::vector<std::int64_t>;

/// Element types a backend reports. Half types are computed in float32 internally. `undefined` is a tensor
/// without data (LibTorch's default-constructed at::Tensor); `other` is any type posttrain does not take.
enum class dtype { float16, bfloat16, float32, float64, uint8, int8, int16, int32, int64, boolean, undefined, other };

constexpr const char* dtype_name(dtype d) {
  switch (d) {
    case dtype::float16: return "float16";
    case dtype::bfloat16: return "bfloat16";
    case dtype::float32: return "float32";
    case dtype::float64: return "float64";
    case dtype::uint8: return "uint8";
    case dtype::int8: return "int8";
    case dtype::int16: return "int16";
    case dtype::int32: return "int32";
    case dtype::int64: return "int64";
    case dtype::boolean: return "bool";
    case dtype::undefined: return "undefined";
    case dtype::other: return "other";
  }
  return "other";
}
constexpr bool is_floating(dtype d) {
  return d == dtype::float16 || d == dtype::bfloat16 || d == dtype::float32 || d == dtype::float64;
}
/// Integer element types: labels, group ids and masks may have any of them (torch's uint8 masks included).
constexpr bool is_integer(dtype d) {
  return d == dtype::uint8 || d == dtype::int8 || d == dtype::int16 || d == dtype::int32 || d == dtype::int64;
}

enum class unary_op { neg, exp, log, log1p, expm1, abs, sqrt, sign };
enum class binary_op { add, sub, mul, div, maximum, minimum };
enum class compare_op { lt, le, gt, ge, eq, ne };
enum class reduce_op { sum, max, min };

/// Customisation point: specialise for a tensor type to make it a posttrain backend.
template <class T>
struct tensor_traits;

// clang-format off
template <class T>
concept tensor = requires { typename tensor_traits<T>::index_tensor; } &&
  requires(const T& x, const T& y, const typename tensor_traits<T>::index_tensor& i,
           const shape_t& s, double v, std::int64_t n, bool keep) {
    { tensor_traits<T>::shape(x) } -> std::same_as<shape_t>;
    { tensor_traits<T>::dtype_of(x) } -> std::same_as<dtype>;
    { tensor_traits<T>::device(x) } -> std::same_as<std::string>;
    { tensor_traits<T>::index_shape(i) } -> std::same_as<shape_t>;
    { tensor_traits<T>::index_dtype(i) } -> std::same_as<dtype>;
    { tensor_traits<T>::index_device(i) } -> std::same_as<std::string>;
    { tensor_traits<T>::full(x, s, v) } -> std::same_as<T>;
    { tensor_traits<T>::one_hot(i, n, x) } -> std::same_as<T>;
    { tensor_traits<T>::unary(unary_op::exp, x) } -> std::same_as<T>;
    { tensor_traits<T>::binary(binary_op::add, x, y) } -> std::same_as<T>;
    { tensor_traits<T>::compare(compare_op::lt, x, y) } -> std::same_as<T>;
    { tensor_traits<T>::where(x, x, y) } -> std::same_as<T>;
    { tensor_traits<T>::clamp(x, v, v) } -> std::same_as<T>;
    { tensor_traits<T>::reduce(reduce_op::sum, x, n, keep) } -> std::same_as<T>;
    { tensor_traits<T>::argmax_last(x) } -> std::same_as<typename tensor_traits<T>::index_tensor>;
    { tensor_traits<T>::gather_last(x, i) } -> std::same_as<T>;
    { tensor_traits<T>::reshape(x, s) } -> std::same_as<T>;
    { tensor_traits<T>::detach(x) } -> std::same_as<T>;
    { tensor_traits<T>::to_dtype(x, dtype::float32) } -> std::same_as<T>;
    { tensor_traits<T>::to_host(x) } -> std::same_as<std::vector<double>>;
    { tensor_traits<T>::index_not_equal(i, n, x) } -> std::same_as<T>;
    { tensor_traits<T>::index_equal(i, i, x) } -> std::same_as<T>;
    { tensor_traits<T>::index_replace(i, n, n) } -> std::same_as<typename tensor_traits<T>::index_tensor>;
    { tensor_traits<T>::index_count_outside(i, n, n, n) } -> std::same_as<std::int64_t>;
    { tensor_traits<T>::index_to_host(i) } -> std::same_as<std::vector<std::int64_t>>;
    { tensor_traits<T>::argsort_last(x) } -> std::same_as<typename tensor_traits<T>::index_tensor>;
    { tensor_traits<T>::slice(x, n, n, n) } -> std::same_as<T>;
    { tensor_traits<T>::concat(std::vector<T>{}, n) } -> std::same_as<T>;
    { tensor_traits<T>::cumsum(x, n) } -> std::same_as<T>;
  };
// clang-format on

template <tensor T>
using index_tensor_t = typename tensor_traits<T>::index_tensor;

/// Thin wrappers over the traits, so algorithms read like math. Dimensions may be negative.
namespace ops {

template <tensor T>
using tr = tensor_traits<T>;

// The wrappers read as a table, one line each where they fit.
// clang-format off

template <tensor T> shape_t shape(const T& x) { return tr<T>::shape(x); }
template <tensor T> std::int64_t rank(const T& x) { return static_cast<std::int64_t>(ops::shape(x).size()); }
template <tensor T> std::int64_t numel(const T& x) {
  std::int64_t n = 1;
  for (auto d : ops::shape(x)) n *= d;
  return n;
}
template <tensor T> std::int64_t size(const T& x, std::int64_t dim) {
  const auto s = ops::shape(x);
  return s.at(static_cast<std::size_t>(dim < 0 ? dim + static_cast<std::int64_t>(s.size()) : dim));
}
template <tensor T> dtype dtype_of(const T& x) { return tr<T>::dtype_of(x); }
template <tensor T> std::string device(const T& x) { return tr<T>::device(x); }

/// A tensor like `like` (dtype, device) of the given shape filled with `value`.
template <tensor T> T full(const T& like, const shape_t& s, double value) { return tr<T>::full(like, s, value); }
/// A tensor of x's shape, dtype and device filled with `value`.
template <tensor T> T full_like(const T& x, double value) { return tr<T>::full(x, ops::shape(x), value); }
/// A 0-d tensor of x's dtype and device (broadcasts against anything).
template <tensor T> T scalar_like(const T& x, double value) { return tr<T>::full(x, shape_t{}, value); }

template <tensor T> T neg(const T& x) { return tr<T>::unary(unary_op::neg, x); }
template <tensor T> T exp(const T& x) { return tr<T>::unary(unary_op::exp, x); }
template <tensor T> T log(const T& x) { return tr<T>::unary(unary_op::log, x); }
template <tensor T> T log1p(const T& x) { return tr<T>::unary(unary_op::log1p, x); }
template <tensor T> T expm1(const T& x) { return tr<T>::unary(unary_op::expm1, x); }
template <tensor T> T abs(const T& x) { return tr<T>::unary(unary_op::abs, x); }
template <tensor T> T sqrt(const T& x) { return tr<T>::unary(unary_op::sqrt, x); }
template <tensor T> T sign(const T& x) { return tr<T>::unary(unary_op::sign, x); }

#define POSTTRAIN_BINARY(name, op)                                                               \
  template <tensor T> T name(const T& a, const T& b) { return tr<T>::binary(binary_op::op, a, b); } \
  template <tensor T> T name(const T& a, double b) { return tr<T>::binary(binary_op::op, a, ops::scalar_like(a, b)); } \
  template <tensor T> T name(double a, const T& b) { return tr<T>::binary(binary_op::op, ops::scalar_like(b, a), b); }
POSTTRAIN_BINARY(add, add)
POSTTRAIN_BINARY(sub, sub)
POSTTRAIN_BINARY(mul, mul)
POSTTRAIN_BINARY(div, div)
POSTTRAIN_BINARY(maximum, maximum)
POSTTRAIN_BINARY(minimum, minimum)
#undef POSTTRAIN_BINARY

#define POSTTRAIN_COMPARE(name, op)                                                                  \
  template <tensor T> T name(const T& a, const T& b) { return tr<T>::compare(compare_op::op, a, b); } \
  template <tensor T> T name(const T& a, double b) { return tr<T>::compare(compare_op::op, a, ops::scalar_like(a, b)); }
POSTTRAIN_COMPARE(lt, lt)
POSTTRAIN_COMPARE(le, le)
POSTTRAIN_COMPARE(gt, gt)
POSTTRAIN_COMPARE(ge, ge)
POSTTRAIN_COMPARE(eq, eq)
POSTTRAIN_COMPARE(ne, ne)
#undef POSTTRAIN_COMPARE

template <tensor T> T square(const T& x) { return ops::mul(x, x); }

/// Element-wise select: cond is 0/1 (non-zero means take `a`).
template <tensor T> T where(const T& cond, const T& a, const T& b) { return tr<T>::where(cond, a, b); }
template <tensor T> T where(const T& cond, const T& a, double b) { return tr<T>::where(cond, a, ops::scalar_like(a, b)); }
template <tensor T> T where(const T& cond, double a, const T& b) { return tr<T>::where(cond, ops::scalar_like(b, a), b); }

/// Clamp into [lo, hi] (either may be infinite); gradient 1 inside, 0 outside.
template <tensor T> T clamp(const T& x, double lo, double hi) { return tr<T>::clamp(x, lo, hi); }

namespace detail_dims {
inline std::int64_t normalise(std::int64_t dim, std::int64_t rank) { return dim < 0 ? dim + rank : dim; }
}  // namespace detail_dims

template <tensor T> T sum(const T& x, std::int64_t dim, bool keepdim = false) {
  return tr<T>::reduce(reduce_op::sum, x, detail_dims::normalise(dim, ops::rank(x)), keepdim);
}
template <tensor T> T max(const T& x, std::int64_t dim, bool keepdim = false) {
  return tr<T>::reduce(reduce_op::max, x, detail_dims::normalise(dim, ops::rank(x)), keepdim);
}
template <tensor T> T min(const T& x, std::int64_t dim, bool keepdim = false) {
  return tr<T>::reduce(reduce_op::min, x, detail_dims::normalise(dim, ops::rank(x)), keepdim);
}
template <tensor T> T reshape(const T& x, const shape_t& s) { return tr<T>::reshape(x, s); }
/// Sum over every element: a 0-d tensor.
template <tensor T> T sum_all(const T& x) { return ops::sum(ops::reshape(x, shape_t{ops::numel(x)}), 0); }
template <tensor T> T max_all(const T& x) { return ops::max(ops::reshape(x, shape_t{ops::numel(x)}), 0); }
/// Inserts a dimension of size one at `dim` (negative counts from the end of the result).
template <tensor T> T unsqueeze(const T& x, std::int64_t dim) {
  auto s = ops::shape(x);
  const auto r = static_cast<std::int64_t>(s.size()) + 1;
  s.insert(s.begin() + detail_dims::normalise(dim, r), 1);
  return ops::reshape(x, s);
}
template <tensor T> T detach(const T& x) { return tr<T>::detach(x); }
template <tensor T> T to_dtype(const T& x, dtype d) { return tr<T>::to_dtype(x, d); }
template <tensor T> std::vector<double> to_host(const T& x) { return tr<T>::to_host(x); }
/// The single value of a one-element tensor, as double (synchronises a GPU tensor).
template <tensor T> double item(const T& x) { return ops::to_host(x).at(0); }

template <tensor T> T gather_last(const T& x, const index_tensor_t<T>& i) { return tr<T>::gather_last(x, i); }
template <tensor T> index_tensor_t<T> argmax_last(const T& x) { return tr<T>::argmax_last(x); }
template <tensor T> T one_hot(const index_tensor_t<T>& i, std::int64_t n, const T& like) {
  return tr<T>::one_hot(i, n, like);
}
template <tensor T> shape_t index_shape(const index_tensor_t<T>& i) { return tr<T>::index_shape(i); }
/// Indices that sort the last dimension ascending; ties keep their order (stable).
template <tensor T> index_tensor_t<T> argsort_last(const T& x) { return tr<T>::argsort_last(x); }
/// x[..., start:start+length, ...] along `dim`.
template <tensor T> T slice(const T& x, std::int64_t dim, std::int64_t start, std::int64_t length) {
  return tr<T>::slice(x, detail_dims::normalise(dim, ops::rank(x)), start, length);
}
/// Joins tensors that agree on every other dimension along `dim` (non-negative).
template <tensor T> T concat(const std::vector<T>& parts, std::int64_t dim) { return tr<T>::concat(parts, dim); }
/// Running sum along `dim`: out[k] = Σ_{j <= k} x[j].
template <tensor T> T cumsum(const T& x, std::int64_t dim) {
  return tr<T>::cumsum(x, detail_dims::normalise(dim, ops::rank(x)));
}

/// Computes half-precision inputs in float32 (the frameworks' upcast before a loss).
template <tensor T> T upcast(const T& x) {
  const auto d = ops::dtype_of(x);
  return d == dtype::float16 || d == dtype::bfloat16 ? ops::to_dtype(x, dtype::float32) : x;
}

// clang-format on
}  // namespace ops
}  // namespace posttrain
