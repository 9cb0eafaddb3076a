// tests/support/linear_eigen.hpp — helpers shared by the fused linear kernels' Eigen tests
// (test_linear_ce.cpp, test_linear_logprobs.cpp): [rows, cols] tensors as Eigen matrices for the
// unfused reference's chain rule, elementwise comparison against a double reference, dtype
// casts, a thread-count guard, and the rejection check.
#pragma once

#include <catch2/catch.hpp>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/error.hpp"
#include "posttrain/kernels/logits_cpu.hpp"
#include "support/tolerances.hpp"

namespace posttrain::test {

using matrix_d = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Restores the kernels' default thread count when the test ends.
struct thread_guard {
  ~thread_guard() { kernels::set_num_threads(0); }
};

/// A [..., cols] tensor as a row-major [rows, cols] Eigen matrix.
inline matrix_d as_matrix(const eigen_tensor<double>& t) {
  const auto& s = t.shape();
  const std::int64_t cols = s.back(), rows = t.numel() / cols;
  return Eigen::Map<const matrix_d>(t.data(), rows, cols);
}
inline eigen_tensor<double> from_matrix(const matrix_d& m, shape_t shape) {
  eigen_tensor<double> t(std::move(shape));
  Eigen::Map<matrix_d>(t.data(), m.rows(), m.cols()) = m;
  return t;
}

/// Every element of `got` within `tol` of the double reference `want` (same shape).
template <class S>
void require_close(const std::string& what, const eigen_tensor<S>& got, const eigen_tensor<double>& want,
                   tolerance tol) {
  REQUIRE(got.shape() == want.shape());
  for (std::int64_t i = 0; i < want.numel(); ++i) {
    INFO(what << " element " << i << ": got " << got.values()(i) << ", want " << want.values()(i));
    REQUIRE(tol.accepts(static_cast<double>(got.values()(i)), want.values()(i)));
  }
}

template <class S>
eigen_tensor<S> cast(const eigen_tensor<double>& t) {
  eigen_tensor<S> out(t.shape());
  out.values() = t.values().template cast<S>();
  return out;
}
/// The values a float32 tensor would hold, in double (so the reference runs on the same inputs).
inline eigen_tensor<double> rounded_to_float(const eigen_tensor<double>& t) {
  eigen_tensor<double> out(t.shape());
  out.values() = t.values().cast<float>().cast<double>();
  return out;
}

/// `call` throws posttrain::error whose message starts with "posttrain::<function>: " and contains
/// every one of `parts`.
inline void expect_error(const std::function<void()>& call, const std::string& function,
                         const std::vector<std::string>& parts) {
  INFO("expected posttrain::" << function << " to reject its input, naming: " << Catch::Detail::stringify(parts));
  CHECK_THROWS_AS(call(), posttrain::error);
  CHECK_THROWS_WITH(call(), Catch::Matchers::StartsWith("posttrain::" + function + ": "));
  for (const auto& part : parts) CHECK_THROWS_WITH(call(), Catch::Matchers::Contains(part));
}

}  // namespace posttrain::test
