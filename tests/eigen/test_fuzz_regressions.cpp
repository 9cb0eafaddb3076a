// Regression tests for what the fuzz targets (fuzz/) found: each case is the minimal input of one
// finding, with the function, what happened, and the value it must give now.
#include <catch2/catch.hpp>
#include <cmath>
#include <limits>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/losses/orpo.hpp"
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

TEST_CASE("fuzz regression: generic entropy where x - max overflows, and of a row of only -inf",
          "[fuzz][eigen][entropy]") {
  // fuzz_logits_sft: generic::entropy_last([-1e308, 1e308, 1e308]) was NaN (x - max = -inf, a live
  // entry, and 0·(-inf)); the fused kernel gives ln 2. A row of only -inf was NaN (generic) vs 0 (fused).
  const double inf = std::numeric_limits<double>::infinity();
  const eigen_tensor<double> x({2, 3}, {-1e308, 1e308, 1e308, -inf, -inf, -inf});
  const auto g = generic::entropy_last(x), f = entropy(x);
  CHECK(g(0) == Approx(std::log(2.0)).epsilon(1e-15));
  CHECK(f(0) == Approx(std::log(2.0)).epsilon(1e-15));
  CHECK(g(1) == 0.0);
  CHECK(f(1) == 0.0);
  const auto gb = entropy_backward(x, eigen_tensor<double>({2}, {1.0, 1.0}));
  for (std::int64_t i = 0; i < gb.numel(); ++i) CHECK(std::isfinite(gb.data()[i]));
  const eigen_tensor<float> xf({1, 3}, {-3e38f, 3e38f, 3e38f});
  CHECK(generic::entropy_last(xf)(0) == Approx(std::log(2.0f)).epsilon(1e-6));
  CHECK(entropy(xf)(0) == Approx(std::log(2.0f)).epsilon(1e-6));
}

TEST_CASE("fuzz regression: orpo_backward is finite at a chosen log-prob of exactly 0", "[fuzz][eigen][orpo]") {
  // fuzz_preference: chosen_logps {-0, -1}, rejected_logps {-1, -1}, lengths 0 (read as 1): the loss
  // was finite (4.055) and the gradient of the first pair NaN (σ(-z) / expm1(ū_c) = 0/0). The limit
  // from below is finite: compare with a one-sided difference of the loss.
  using T = eigen_tensor<double>;
  const cpo_batch<T> batch{T({2}, {-0.0, -1.0}), T({2}, {-1.0, -1.0}), T({2}, {0.0, 0.0}), T({2}, {0.0, 0.0})};
  const orpo_options o{.beta = 0.1};
  const double loss = ops::item(orpo(batch, o).loss);
  REQUIRE(std::isfinite(loss));
  const auto g = orpo_backward(batch, o);
  REQUIRE(std::isfinite(g.chosen_logps(0)));
  REQUIRE(std::isfinite(g.rejected_logps(0)));
  const double h = 1e-7;
  auto below = batch;
  below.chosen_logps(0) = -h;
  const double left = (loss - ops::item(orpo(below, o).loss)) / h;
  CHECK(g.chosen_logps(0) == Approx(left).epsilon(1e-5));
  // the closed form: -β/B / (e^{ū_c - ū_r}(1 - e^{ū_r})) - 1/max(Σ|c|, 1) at ū_c = 0, ū_r = -1
  CHECK(g.chosen_logps(0) == Approx(-0.05 / (std::exp(1.0) * (1 - std::exp(-1.0))) - 1.0).epsilon(1e-12));
}
