// tests/support/eigen_checks.hpp — small assertions shared by the Eigen-only tests.
#pragma once

#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/check/compare.hpp"
#include "posttrain/tensor.hpp"
#include "support/tolerances.hpp"

namespace posttrain::test {

/// The tolerance of computations in scalar type S (float32_tol or float64_tol).
template <class S>
constexpr tolerance tol_of() {
  return tolerance_for(std::is_same_v<S, float> ? dtype::float32 : dtype::float64);
}

/// Every element of `got` within `tol` of `want` (a flat row-major list); prints the worst on failure.
template <tensor T>
void check_values(const std::string& what, const T& got, const std::vector<double>& want, tolerance tol) {
  const auto g = ops::to_host(got);
  REQUIRE(g.size() == want.size());
  const auto r = check::compare_values(g, want, tol.atol, tol.rtol);
  INFO(what << ": " << r.str() << " (atol " << tol.atol << ", rtol " << tol.rtol << ")");
  CHECK(r.ok);
}

/// A one-element tensor within `tol` of `want`.
template <tensor T>
void check_value(const std::string& what, const T& got, double want, tolerance tol) {
  check_values(what, got, std::vector<double>{want}, tol);
}

/// Two tensors of any backends: same shape, values within `tol` (`want` is the reference).
template <tensor A, tensor B>
void check_same(const std::string& what, const A& got, const B& want, tolerance tol) {
  REQUIRE(detail::shape_string(ops::shape(got)) == detail::shape_string(ops::shape(want)));
  check_values(what, got, ops::to_host(want), tol);
}

/// No NaN or Inf in any element.
template <tensor T>
bool finite_everywhere(const T& x) {
  for (double v : ops::to_host(x))
    if (!std::isfinite(v)) return false;
  return true;
}

/// `got` rounded to `decimals` places equals a value quoted with that many places (a published
/// test vector). This is the precision of the quotation, not a numerical tolerance.
inline bool rounds_to(double got, double quoted, int decimals) {
  const double scale = std::pow(10.0, decimals);
  return std::round(got * scale) / scale == std::round(quoted * scale) / scale;
}

/// A rank-1 tensor from a list of values.
template <class S = double>
eigen_tensor<S> vec(const std::vector<double>& v) {
  std::vector<S> s(v.begin(), v.end());
  return eigen_tensor<S>({static_cast<std::int64_t>(v.size())}, s);
}

/// A tensor of the given shape from a list of values (converted to S).
template <class S = double>
eigen_tensor<S> make(const shape_t& shape, const std::vector<double>& v) {
  std::vector<S> s(v.begin(), v.end());
  return eigen_tensor<S>(shape, s);
}

}  // namespace posttrain::test
