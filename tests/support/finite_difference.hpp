// tests/support/finite_difference.hpp — central finite differences on the Eigen backend in double.
//
// The gradient of a scalar function f at x, one coordinate at a time:
//   df/dx_i ≈ (f(x + h e_i) - f(x - h e_i)) / 2h        (truncation O(h² f'''), rounding O(eps |f| / h))
// with h = fd_step. A tensor-valued forward F is checked through the scalar Σ_k w_k F(x)_k, whose
// gradient is the backward of F applied to the cotangent w (`contract`). Compared with
// finite_difference_tol (tolerances.hpp).
#pragma once

#include <catch2/catch.hpp>
#include <cstdint>
#include <string>
#include <utility>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/check/compare.hpp"
#include "posttrain/tensor.hpp"
#include "support/tolerances.hpp"

namespace posttrain::test {

/// Central-difference gradient of the scalar function `f(eigen_tensor<double>) -> double` at x.
template <class F>
eigen_tensor<double> fd_gradient(F&& f, const eigen_tensor<double>& x, double h = fd_step) {
  eigen_tensor<double> grad(x.shape());
  eigen_tensor<double> probe = x;
  for (Eigen::Index i = 0; i < x.numel(); ++i) {
    const double x0 = probe.values()(i);
    probe.values()(i) = x0 + h;
    const double up = f(std::as_const(probe));
    probe.values()(i) = x0 - h;
    const double down = f(std::as_const(probe));
    probe.values()(i) = x0;
    grad.values()(i) = (up - down) / (2.0 * h);
  }
  return grad;
}

/// Σ_k w_k y_k for same-shaped tensors: the scalar whose gradient is a backward applied to w.
inline double contract(const eigen_tensor<double>& w, const eigen_tensor<double>& y) {
  REQUIRE(detail::shape_string(w.shape()) == detail::shape_string(y.shape()));
  return (w.values() * y.values()).sum();
}

/// Checks an analytic gradient against central finite differences of `f` at x (finite_difference_tol).
template <class F>
void check_gradient(const std::string& what, const eigen_tensor<double>& analytic, F&& f,
                    const eigen_tensor<double>& x) {
  const eigen_tensor<double> numeric = fd_gradient(std::forward<F>(f), x);
  REQUIRE(detail::shape_string(analytic.shape()) == detail::shape_string(numeric.shape()));
  const auto r = check::compare(analytic, numeric, finite_difference_tol.atol, finite_difference_tol.rtol);
  INFO(what << ": analytic vs finite differences: " << r.str());
  CHECK(r.ok);
}

}  // namespace posttrain::test
