// Regression tests for what the fuzz targets (fuzz/) found: each case is the minimal input of one
// finding, with the function, what happened, and the value it must give now.
#include <catch2/catch.hpp>
#include <cmath>
#include <limits>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/numerics/logits.hpp"

using namespace posttrain;

TEST_CASE("fuzz regression: the Eigen backend's exp underflows to the true value, not Eigen's clamp",
          "[fuzz][eigen][exp]") {
  // Eigen 3.4's packet exp returned 5.6e-309 (double) / 2.9e-39 (float) for every argument below
  // its range; std::exp gives the true value (0 past the denormals).
  const eigen_tensor<double> xd({4}, {-1e308, -800.0, -740.0, -700.0});
  const auto ed = ops::exp(xd);
  CHECK(ed(0) == 0.0);
  CHECK(ed(1) == 0.0);
  CHECK(ed(2) == std::exp(-740.0));
  CHECK(ed(3) == Approx(std::exp(-700.0)).epsilon(1e-15));
  const eigen_tensor<float> xf({3}, {-3e38f, -110.0f, -100.0f});
  const auto ef = ops::exp(xf);
  CHECK(ef(0) == 0.0f);
  CHECK(ef(1) == 0.0f);
  CHECK(ef(2) == std::exp(-100.0f));
}

TEST_CASE("fuzz regression: generic entropy of a row with a logit 1e308 above the others is 0",
          "[fuzz][eigen][entropy]") {
  // fuzz_logits_sft: generic::entropy_last([1e-8, 1e308, -0.654, -0.998, -inf]) gave 1.6667 (each
  // p = exp(-1e308) came out 5.6e-309, times log p = -1e308) where the fused kernel gives ~0.
  const double inf = std::numeric_limits<double>::infinity();
  const eigen_tensor<double> x({2, 5}, {1e-8, 1e308, -0.65401693751430534, -0.99777218280308233, -inf,  //
                                        0.0, 1e308, 0.0, 0.0, 0.0});
  const auto generic_h = generic::entropy_last(x);
  const auto fused_h = entropy(x);
  for (int r = 0; r < 2; ++r) {
    CHECK(std::abs(generic_h(r)) < 1e-300);
    CHECK(std::abs(fused_h(r)) < 1e-300);
  }
  // float32: exp(-1e38) came out 2.9e-39, so p·log p was -0.29 instead of 0
  const eigen_tensor<float> xf({1, 2}, {0.0f, 1e38f});
  CHECK(generic::entropy_last(xf)(0) == 0.0f);
  CHECK(entropy(xf)(0) == 0.0f);
}
