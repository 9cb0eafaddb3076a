// posttrain/backends/eigen/tensor.hpp — the CPU reference backend: the tensor and its plain traits.
//
// This is the clean, minimal reference: a row-major N-d array (`eigen_tensor<Scalar>`, float or
// double) over an `Eigen::Array`, with readable loops for broadcasting, reductions and gathers.
// Slow is acceptable, wrong is not: in double precision it is the ground truth the LibTorch
// results (and a user's own trainer) are checked against. It has no autograd; gradients come from
// each algorithm's analytic backward, which the tests check against finite differences.
// This header holds no fused hook: with it alone every algorithm runs its generic composition (a
// test can pick the reference alone). backends/eigen/fused.hpp adds the one-pass CPU kernels, and
// backends/eigen.hpp includes both.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <numeric>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "posttrain/error.hpp"
#include "posttrain/tensor.hpp"

namespace posttrain {

/// A dense row-major tensor of rank 0 or more; float, double (values) or int64 (labels).
template <class Scalar>
class eigen_tensor {
 public:
  using scalar_type = Scalar;
  using storage_type = Eigen::Array<Scalar, Eigen::Dynamic, 1>;

  /// A 0-d tensor holding zero.
  eigen_tensor() : values_(storage_type::Zero(1)) {}

  /// A tensor of the given shape filled with `fill`.
  explicit eigen_tensor(shape_t shape, Scalar fill = Scalar(0)) : shape_(std::move(shape)) {
    values_ = storage_type::Constant(checked_numel(shape_), fill);
  }

  /// A tensor of the given shape over row-major `values` (sizes must agree).
  eigen_tensor(shape_t shape, storage_type values) : shape_(std::move(shape)), values_(std::move(values)) {
    if (values_.size() != checked_numel(shape_))
      detail::fail("eigen_tensor", "values has ", values_.size(), " elements but shape ", detail::shape_string(shape_),
                   " needs ", checked_numel(shape_));
  }

  /// From a shape and a row-major list of values, e.g. `eigen_tensor<double>({2, 2}, {1, 2, 3, 4})`.
  // An element copy, not an Eigen assignment from a Map: GCC 12 at -O2 reports a false -Warray-bounds for
  // the packet load Eigen's copy has in a branch that a 1-element list never takes, which breaks users'
  // -Werror builds.
  eigen_tensor(shape_t shape, const std::vector<Scalar>& values)
      : eigen_tensor(std::move(shape), copy_of(values)) {}
  eigen_tensor(shape_t shape, std::initializer_list<Scalar> values)
      : eigen_tensor(std::move(shape), std::vector<Scalar>(values)) {}

  /// Copies a (column- or row-major) Eigen matrix into a [rows, cols] row-major tensor.
  template <class Derived>
  static eigen_tensor from_matrix(const Eigen::DenseBase<Derived>& m) {
    eigen_tensor out(shape_t{m.rows(), m.cols()});
    for (Eigen::Index r = 0; r < m.rows(); ++r)
      for (Eigen::Index c = 0; c < m.cols(); ++c) out.values_(r * m.cols() + c) = static_cast<Scalar>(m(r, c));
    return out;
  }

  const shape_t& shape() const { return shape_; }
  std::int64_t rank() const { return static_cast<std::int64_t>(shape_.size()); }
  std::int64_t numel() const { return values_.size(); }
  storage_type& values() { return values_; }
  const storage_type& values() const { return values_; }
  Scalar* data() { return values_.data(); }
  const Scalar* data() const { return values_.data(); }

  /// Element access by a full multi-index, e.g. `t(b, t, v)`.
  template <class... I>
  Scalar& operator()(I... index) {
    return values_(offset({static_cast<std::int64_t>(index)...}));
  }
  template <class... I>
  const Scalar& operator()(I... index) const {
    return values_(offset({static_cast<std::int64_t>(index)...}));
  }

  static std::int64_t checked_numel(const shape_t& shape) {
    std::int64_t n = 1;
    for (auto d : shape) {
      if (d < 0) detail::fail("eigen_tensor", "negative dimension in shape ", detail::shape_string(shape));
      n *= d;
    }
    return n;
  }

 private:
  std::int64_t offset(std::initializer_list<std::int64_t> index) const {
    if (index.size() != shape_.size())
      detail::fail("eigen_tensor", "indexed with ", index.size(), " indices but rank is ", shape_.size());
    std::int64_t off = 0;
    std::size_t d = 0;
    for (auto i : index) off = off * shape_[d++] + i;
    return off;
  }

  static storage_type copy_of(const std::vector<Scalar>& values) {
    storage_type out(static_cast<Eigen::Index>(values.size()));
    std::copy(values.begin(), values.end(), out.data());
    return out;
  }

  shape_t shape_;
  storage_type values_;
};

using eigen_index = eigen_tensor<std::int64_t>;

namespace detail::eigen {

/// NumPy broadcasting of two shapes (aligned on the right); throws on a mismatch.
inline shape_t broadcast_shapes(const shape_t& a, const shape_t& b) {
  const std::size_t r = std::max(a.size(), b.size());
  shape_t out(r, 1);
  for (std::size_t k = 0; k < r; ++k) {
    const std::int64_t da = k < r - a.size() ? 1 : a[k - (r - a.size())];
    const std::int64_t db = k < r - b.size() ? 1 : b[k - (r - b.size())];
    if (da != db && da != 1 && db != 1)
      fail("eigen backend", "cannot broadcast shapes ", shape_string(a), " and ", shape_string(b));
    out[k] = da == 1 ? db : da;
  }
  return out;
}

/// Strides (in elements) for reading an operand of shape `in` as if it had shape `out`:
/// broadcast dimensions get stride 0.
inline shape_t broadcast_strides(const shape_t& in, const shape_t& out) {
  shape_t strides(out.size(), 0);
  std::int64_t stride = 1;
  for (std::size_t k = in.size(); k-- > 0;) {
    const std::size_t o = k + (out.size() - in.size());
    strides[o] = in[k] == 1 ? 0 : stride;
    stride *= in[k];
  }
  return strides;
}

/// Calls f(offsets...) for every element of `out` in row-major order, with each operand's offset.
template <std::size_t N, class F>
void for_each_broadcast(const shape_t& out, const std::array<shape_t, N>& in, F&& f) {
  std::array<shape_t, N> strides;
  for (std::size_t k = 0; k < N; ++k) strides[k] = broadcast_strides(in[k], out);
  std::int64_t total = 1;
  for (auto d : out) total *= d;
  std::vector<std::int64_t> counter(out.size(), 0);
  std::array<std::int64_t, N> off{};
  for (std::int64_t i = 0; i < total; ++i) {
    f(off);
    // Odometer increment, updating each operand's offset incrementally.
    for (std::size_t d = out.size(); d-- > 0;) {
      ++counter[d];
      for (std::size_t k = 0; k < N; ++k) off[k] += strides[k][d];
      if (counter[d] < out[d]) break;
      for (std::size_t k = 0; k < N; ++k) off[k] -= strides[k][d] * counter[d];
      counter[d] = 0;
    }
  }
}

}  // namespace detail::eigen

/// The Eigen backend's traits: float and double tensors, int64 labels, device "cpu".
template <class Scalar>
  requires std::is_same_v<Scalar, float> || std::is_same_v<Scalar, double>
struct tensor_traits<eigen_tensor<Scalar>> {
  using T = eigen_tensor<Scalar>;
  using index_tensor = eigen_index;
  using storage = typename T::storage_type;

  static shape_t shape(const T& x) { return x.shape(); }
  static dtype dtype_of(const T&) { return std::is_same_v<Scalar, float> ? dtype::float32 : dtype::float64; }
  static std::string device(const T&) { return "cpu"; }
  static shape_t index_shape(const index_tensor& i) { return i.shape(); }
  static dtype index_dtype(const index_tensor&) { return dtype::int64; }
  static std::string index_device(const index_tensor&) { return "cpu"; }

  static T full(const T&, const shape_t& s, double value) { return T(s, static_cast<Scalar>(value)); }

  static T one_hot(const index_tensor& i, std::int64_t n, const T&) {
    shape_t s = i.shape();
    s.push_back(n);
    T out(s);
    for (std::int64_t k = 0; k < i.numel(); ++k) {
      const auto c = i.values()(k);
      if (c < 0 || c >= n) detail::fail("one_hot", "index ", c, " outside [0, ", n, ")");
      out.values()(k * n + c) = Scalar(1);
    }
    return out;
  }

  /// Eigen 3.4's packet exp clamps its argument from below (at -88.38 in float, -709.4 in double, without
  /// AVX-512), so exp(-inf) comes out as 2.9e-39 / 5.6e-309 instead of 0: a padding column would get mass and
  /// 0·log 0 become a NaN. Arguments below the normal range are recomputed with std::exp (0 at -inf, exact
  /// denormals); the vectorised exp is kept everywhere else.
  static storage exact_exp(const storage& a) {
    storage e = a.exp();
    const Scalar low = std::log(std::numeric_limits<Scalar>::min());  // exp(low) is the smallest normal
    for (Eigen::Index k = 0; k < a.size(); ++k)
      if (a(k) < low) e(k) = std::exp(a(k));
    return e;
  }

  static T unary(unary_op op, const T& x) {
    const auto& a = x.values();
    switch (op) {
      case unary_op::neg: return T(x.shape(), storage(-a));
      case unary_op::exp: return T(x.shape(), exact_exp(a));
      case unary_op::log: return T(x.shape(), storage(a.log()));
      case unary_op::log1p: return T(x.shape(), storage(a.log1p()));
      case unary_op::expm1: return T(x.shape(), storage(a.unaryExpr([](Scalar v) { return std::expm1(v); })));
      case unary_op::abs: return T(x.shape(), storage(a.abs()));
      case unary_op::sqrt: return T(x.shape(), storage(a.sqrt()));
      case unary_op::sign:
        return T(x.shape(), storage(a.unaryExpr([](Scalar v) { return Scalar((v > 0) - (v < 0)); })));
    }
    return x;
  }

  static Scalar apply(binary_op op, Scalar a, Scalar b) {
    switch (op) {
      case binary_op::add: return a + b;
      case binary_op::sub: return a - b;
      case binary_op::mul: return a * b;
      case binary_op::div: return a / b;
      // NaN-propagating like torch.maximum / torch.minimum.
      case binary_op::maximum:
        return std::isnan(a) || std::isnan(b) ? std::numeric_limits<Scalar>::quiet_NaN() : std::max(a, b);
      case binary_op::minimum:
        return std::isnan(a) || std::isnan(b) ? std::numeric_limits<Scalar>::quiet_NaN() : std::min(a, b);
    }
    return a;
  }

  static bool apply(compare_op op, Scalar a, Scalar b) {
    switch (op) {
      case compare_op::lt: return a < b;
      case compare_op::le: return a <= b;
      case compare_op::gt: return a > b;
      case compare_op::ge: return a >= b;
      case compare_op::eq: return a == b;
      case compare_op::ne: return a != b;
    }
    return false;
  }

  template <class F>
  static T elementwise2(const T& a, const T& b, F f) {
    const shape_t s = detail::eigen::broadcast_shapes(a.shape(), b.shape());
    T out(s);
    std::int64_t o = 0;
    detail::eigen::for_each_broadcast<2>(s, {a.shape(), b.shape()}, [&](const std::array<std::int64_t, 2>& off) {
      out.values()(o++) = f(a.values()(off[0]), b.values()(off[1]));
    });
    return out;
  }

  static T binary(binary_op op, const T& a, const T& b) {
    return elementwise2(a, b, [op](Scalar x, Scalar y) { return apply(op, x, y); });
  }
  static T compare(compare_op op, const T& a, const T& b) {
    return elementwise2(a, b, [op](Scalar x, Scalar y) { return Scalar(apply(op, x, y) ? 1 : 0); });
  }

  static T where(const T& cond, const T& a, const T& b) {
    const shape_t s =
        detail::eigen::broadcast_shapes(cond.shape(), detail::eigen::broadcast_shapes(a.shape(), b.shape()));
    T out(s);
    std::int64_t o = 0;
    detail::eigen::for_each_broadcast<3>(
        s, {cond.shape(), a.shape(), b.shape()}, [&](const std::array<std::int64_t, 3>& off) {
          out.values()(o++) = cond.values()(off[0]) != Scalar(0) ? a.values()(off[1]) : b.values()(off[2]);
        });
    return out;
  }

  static T clamp(const T& x, double lo, double hi) {
    const auto l = static_cast<Scalar>(lo), h = static_cast<Scalar>(hi);
    return T(x.shape(), storage(x.values().unaryExpr([=](Scalar v) { return v < l ? l : (v > h ? h : v); })));
  }

  static T reduce(reduce_op op, const T& x, std::int64_t dim, bool keepdim) {
    const shape_t& s = x.shape();
    if (dim < 0 || dim >= static_cast<std::int64_t>(s.size()))
      detail::fail("eigen backend", "reduction over dim ", dim, " of a tensor of shape ", detail::shape_string(s));
    std::int64_t outer = 1, inner = 1;
    for (std::int64_t d = 0; d < dim; ++d) outer *= s[d];
    for (std::size_t d = dim + 1; d < s.size(); ++d) inner *= s[d];
    const std::int64_t n = s[dim];
    shape_t out_shape = s;
    if (keepdim)
      out_shape[dim] = 1;
    else
      out_shape.erase(out_shape.begin() + dim);
    T out(out_shape);
    if (op == reduce_op::sum) {
      // Sums accumulate in double whatever Scalar is: a sequential float32 sum of 2e5 per-token losses is off by
      // ~3e-5 relative (LibTorch's pairwise float32 sum by ~1e-7); in double the result is the float32 rounding
      // of the exact sum for any batch a trainer has (issue 13 defect 7).
      for (std::int64_t o = 0; o < outer; ++o)
        for (std::int64_t i = 0; i < inner; ++i) {
          double acc = 0.0;
          for (std::int64_t k = 0; k < n; ++k) acc += static_cast<double>(x.values()((o * n + k) * inner + i));
          out.values()(o * inner + i) = static_cast<Scalar>(acc);
        }
      return out;
    }
    for (std::int64_t o = 0; o < outer; ++o)
      for (std::int64_t i = 0; i < inner; ++i) {
        Scalar acc = op == reduce_op::sum   ? Scalar(0)
                     : op == reduce_op::max ? -std::numeric_limits<Scalar>::infinity()
                                            : std::numeric_limits<Scalar>::infinity();
        for (std::int64_t k = 0; k < n; ++k) {
          const Scalar v = x.values()((o * n + k) * inner + i);
          if (op == reduce_op::sum)
            acc += v;
          else if (std::isnan(v) || std::isnan(acc))
            acc = std::numeric_limits<Scalar>::quiet_NaN();
          else
            acc = op == reduce_op::max ? std::max(acc, v) : std::min(acc, v);
        }
        out.values()(o * inner + i) = acc;
      }
    return out;
  }

  static index_tensor argmax_last(const T& x) {
    const std::int64_t v = x.shape().empty() ? 1 : x.shape().back();
    shape_t s = x.shape();
    if (!s.empty()) s.pop_back();
    index_tensor out(s);
    for (std::int64_t r = 0; r < out.numel(); ++r) {
      std::int64_t best = 0;  // first maximum, as torch.argmax
      for (std::int64_t k = 1; k < v; ++k)
        if (x.values()(r * v + k) > x.values()(r * v + best)) best = k;
      out.values()(r) = best;
    }
    return out;
  }

  static T gather_last(const T& x, const index_tensor& i) {
    shape_t rows = x.shape();
    if (!rows.empty()) rows.pop_back();
    if (i.shape() != rows)
      detail::fail("gather_last", "index has shape ", detail::shape_string(i.shape()), " but x has shape ",
                   detail::shape_string(x.shape()), "; expected one index per row, shape ", detail::shape_string(rows));
    const std::int64_t v = x.shape().back();
    T out(i.shape());
    for (std::int64_t r = 0; r < i.numel(); ++r) {
      const auto c = i.values()(r);
      if (c < 0 || c >= v) detail::fail("gather_last", "index ", c, " outside [0, ", v, ")");
      out.values()(r) = x.values()(r * v + c);
    }
    return out;
  }

  static T reshape(const T& x, const shape_t& s) {
    if (T::checked_numel(s) != x.numel())
      detail::fail("reshape", "cannot reshape ", detail::shape_string(x.shape()), " to ", detail::shape_string(s));
    return T(s, x.values());
  }
  static T detach(const T& x) { return x; }
  static T to_dtype(const T& x, dtype d) {
    if (d != dtype_of(x))
      detail::fail("eigen backend", "to_dtype(", dtype_name(d), ") on an eigen_tensor of ", dtype_name(dtype_of(x)),
                   "; the Eigen backend keeps each tensor's scalar type");
    return x;
  }
  static std::vector<double> to_host(const T& x) {
    return std::vector<double>(x.values().data(), x.values().data() + x.numel());
  }

  static T index_not_equal(const index_tensor& i, std::int64_t value, const T&) {
    return T(i.shape(), storage((i.values() != value).template cast<Scalar>()));
  }
  static T index_equal(const index_tensor& a, const index_tensor& b, const T&) {
    if (a.shape() != b.shape())
      detail::fail("index_equal", "shapes ", detail::shape_string(a.shape()), " and ", detail::shape_string(b.shape()));
    return T(a.shape(), storage((a.values() == b.values()).template cast<Scalar>()));
  }
  static index_tensor index_replace(const index_tensor& i, std::int64_t from, std::int64_t to) {
    return index_tensor(i.shape(), typename index_tensor::storage_type((i.values() == from).select(to, i.values())));
  }
  static std::int64_t index_count_outside(const index_tensor& i, std::int64_t lo, std::int64_t hi,
                                          std::int64_t except) {
    return ((i.values() != except) && ((i.values() < lo) || (i.values() >= hi))).count();
  }

  static std::vector<std::int64_t> index_to_host(const index_tensor& i) {
    return std::vector<std::int64_t>(i.values().data(), i.values().data() + i.numel());
  }

  static index_tensor argsort_last(const T& x) {
    if (x.shape().empty()) detail::fail("argsort_last", "needs rank >= 1");
    const std::int64_t v = x.shape().back();
    index_tensor out(x.shape());
    for (std::int64_t r = 0; r * v < x.numel(); ++r) {
      std::vector<std::int64_t> order(static_cast<std::size_t>(v));
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(),
                       [&](std::int64_t a, std::int64_t b) { return x.values()(r * v + a) < x.values()(r * v + b); });
      for (std::int64_t k = 0; k < v; ++k) out.values()(r * v + k) = order[static_cast<std::size_t>(k)];
    }
    return out;
  }

  /// The [outer, n, inner] view of a shape around `dim`.
  static std::array<std::int64_t, 3> around(const shape_t& s, std::int64_t dim) {
    std::int64_t outer = 1, inner = 1;
    for (std::int64_t d = 0; d < dim; ++d) outer *= s[d];
    for (std::size_t d = dim + 1; d < s.size(); ++d) inner *= s[d];
    return {outer, s[dim], inner};
  }

  static T slice(const T& x, std::int64_t dim, std::int64_t start, std::int64_t length) {
    if (dim < 0 || dim >= x.rank() || start < 0 || length < 0 || start + length > x.shape()[dim])
      detail::fail("slice", "[", start, ", ", start + length, ") along dim ", dim, " of shape ",
                   detail::shape_string(x.shape()));
    const auto [outer, n, inner] = around(x.shape(), dim);
    shape_t s = x.shape();
    s[dim] = length;
    T out(s);
    for (std::int64_t o = 0; o < outer; ++o)
      for (std::int64_t k = 0; k < length; ++k)
        for (std::int64_t i = 0; i < inner; ++i)
          out.values()((o * length + k) * inner + i) = x.values()((o * n + start + k) * inner + i);
    return out;
  }

  static T concat(const std::vector<T>& parts, std::int64_t dim) {
    if (parts.empty()) detail::fail("concat", "no tensors to join");
    shape_t s = parts.front().shape();
    if (dim < 0 || dim >= static_cast<std::int64_t>(s.size())) detail::fail("concat", "dim ", dim, " out of range");
    std::int64_t total = 0;
    for (const auto& p : parts) {
      shape_t a = p.shape(), b = s;
      if (a.size() != b.size()) detail::fail("concat", "ranks differ");
      a[dim] = b[dim] = 0;
      if (a != b) detail::fail("concat", "shapes ", detail::shape_string(p.shape()), " and ", detail::shape_string(s));
      total += p.shape()[dim];
    }
    s[dim] = total;
    T out(s);
    const auto [outer, n, inner] = around(s, dim);
    std::int64_t offset = 0;
    for (const auto& p : parts) {
      const std::int64_t len = p.shape()[dim];
      for (std::int64_t o = 0; o < outer; ++o)
        for (std::int64_t k = 0; k < len; ++k)
          for (std::int64_t i = 0; i < inner; ++i)
            out.values()((o * n + offset + k) * inner + i) = p.values()((o * len + k) * inner + i);
      offset += len;
    }
    return out;
  }

  static T cumsum(const T& x, std::int64_t dim) {
    if (dim < 0 || dim >= x.rank()) detail::fail("cumsum", "dim ", dim, " of shape ", detail::shape_string(x.shape()));
    const auto [outer, n, inner] = around(x.shape(), dim);
    T out = x;
    for (std::int64_t o = 0; o < outer; ++o)
      for (std::int64_t i = 0; i < inner; ++i) {
        double acc = 0.0;  // in double, as reduce's sums
        for (std::int64_t k = 0; k < n; ++k) {
          auto& v = out.values()((o * n + k) * inner + i);
          acc += static_cast<double>(v);
          v = static_cast<Scalar>(acc);
        }
      }
    return out;
  }
};

static_assert(tensor<eigen_tensor<float>>);
static_assert(tensor<eigen_tensor<double>>);

}  // namespace posttrain
