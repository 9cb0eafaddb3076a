// Issue 13 (reliability) on the Eigen backend: no NaN where the math is finite, every bad input a
// clear posttrain::error. One section per defect of the issue (tag [issue13]); expected values are
// closed forms or double computations written out here, never the library's own output.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/posttrain.hpp"
#include "support/eigen_checks.hpp"

using namespace posttrain;
using Catch::Matchers::Contains;

namespace {
[[maybe_unused]] constexpr double qnan = std::numeric_limits<double>::quiet_NaN();
[[maybe_unused]] constexpr double inf = std::numeric_limits<double>::infinity();

[[maybe_unused]] eigen_index ids(const std::vector<std::int64_t>& v) {
  return eigen_index({static_cast<std::int64_t>(v.size())}, v);
}

/// `call` throws posttrain::error whose message starts with "posttrain::<function>: " and contains every part.
[[maybe_unused]] void expect_error(const std::function<void()>& call, const std::string& function,
                                   const std::vector<std::string>& parts) {
  INFO("expected posttrain::" << function << " to reject its input, naming: " << Catch::Detail::stringify(parts));
  CHECK_THROWS_AS(call(), posttrain::error);
  CHECK_THROWS_WITH(call(), Catch::Matchers::StartsWith("posttrain::" + function + ": "));
  for (const auto& p : parts) CHECK_THROWS_WITH(call(), Contains(p));
}

/// Unbiased mean and std of a list, in double (the reference for group statistics).
struct moments {
  double mean, std;
};
[[maybe_unused]] moments unbiased_moments(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  const double mean = s / static_cast<double>(v.size());
  double ss = 0;
  for (double x : v) ss += (x - mean) * (x - mean);
  return {mean, std::sqrt(ss / static_cast<double>(v.size() - 1))};
}
}  // namespace

// ----------------------------------------------------------------------------------------------
// defect 9: the adaptive KL controller's β never goes negative.

TEST_CASE("adaptive KL controller: beta is clamped at 0 where TRL's formula goes negative", "[issue13][kl]") {
  // KL 0 below target 1: e = clip(0/1 - 1, ±0.2) = -0.2; n = 60000, horizon 10000: factor 1 - 1.2 = -0.2.
  // TRL would give 0.1 · (-0.2) = -0.02; posttrain gives 0.
  adaptive_kl_controller c{.value = 0.1, .target = 1.0, .horizon = 10000};
  c.update(0.0, 60000);
  CHECK(c.value == 0.0);
  CHECK_FALSE(std::signbit(c.value));
  // Exactly 5·horizon: factor 1 - 1 = 0.
  adaptive_kl_controller d{.value = 0.1, .target = 1.0, .horizon = 10000};
  d.update(0.0, 50000);
  CHECK(d.value == 0.0);
  // Inside the range nothing changes: 0.1 · (1 - 0.2 · 0.5) = 0.09, and the header's example 0.102.
  adaptive_kl_controller e{.value = 0.1, .target = 1.0, .horizon = 10000};
  e.update(0.0, 5000);
  CHECK(test::float64_tol.accepts(e.value, 0.09));
  e = adaptive_kl_controller{.value = 0.1, .target = 1.0, .horizon = 10000};
  e.update(2.0, 1000);
  CHECK(test::float64_tol.accepts(e.value, 0.102));
}

// ----------------------------------------------------------------------------------------------
// defect 5: eps <= 0 where eps guards a division is rejected by function, argument and value.

TEST_CASE("eps <= 0 guarding a division is rejected by function, argument and value", "[issue13][errors]") {
  const auto x = test::vec({1.0, 2.0, 3.0});
  const auto m = test::vec({1.0, 0.0, 0.0});  // one kept token: var 0, eps = 0 would divide 0 by 0
  expect_error([&] { masked_whiten(x, m, {.eps = 0.0}); }, "masked_whiten", {"eps", "> 0", "got 0"});
  expect_error([&] { masked_whiten(x, m, {.eps = -1e-8}); }, "masked_whiten", {"eps", "> 0", "-1e-08"});
  const auto r2 = test::make<double>({1, 3}, {1, 2, 3});
  const auto m2 = test::make<double>({1, 3}, {1, 0, 0});
  expect_error([&] { gae(r2, r2, m2, {.whitening = {.eps = 0.0}}); }, "gae", {"options.whitening.eps", "> 0", "got 0"});
  expect_error([&] { reinforce_pp_advantages(r2, m2, 1.0, {.eps = 0.0}); }, "reinforce_pp_advantages",
               {"whitening.eps", "> 0", "got 0"});
  expect_error([&] { reinforce_pp_baseline_advantages(r2, m2, ids({0}), singleton_policy::raw, {.eps = -1.0}); },
               "reinforce_pp_baseline_advantages", {"whitening.eps", "> 0", "got -1"});
  // An all-equal group with all_equal = formula: (r - mean) / (0 + eps) is 0/0 at eps = 0.
  const auto s = test::vec({0.5, 0.5, 0.5});
  const auto g = ids({0, 0, 0});
  expect_error([&] { grpo_advantages(s, g, {.eps = 0.0, .all_equal = all_equal_policy::formula}); }, "grpo_advantages",
               {"options.eps", "> 0", "got 0"});
  expect_error([&] { grpo_advantages(s, g, {.eps = -1e-4}); }, "grpo_advantages", {"options.eps", "> 0", "-0.0001"});
  expect_error([&] { grpo_passk_advantages(s, g, true, 0.0); }, "grpo_passk_advantages", {"eps", "> 0", "got 0"});
  // Whitening with eps = 0 is still a division by sqrt(var): the smallest positive eps is accepted.
  CHECK(test::finite_everywhere(masked_whiten(x, m, {.eps = 1e-300})));
}

// ----------------------------------------------------------------------------------------------
// defect 4: a mask is boolean (non-zero keeps, counted once) in masked_sum/mean/var/whiten and aggregate.

TEMPLATE_TEST_CASE("a mask is boolean: any non-zero value keeps its position and counts once", "[issue13][masked]",
                   float, double) {
  const auto tol = test::tol_of<TestType>();
  const auto x = test::vec<TestType>({1, 2, 3});
  for (const auto& mask : {std::vector<double>{2, 1, 0}, std::vector<double>{-1, 0.5, 0}}) {
    INFO("mask " << mask[0] << ", " << mask[1] << ", " << mask[2]);
    const auto m = test::vec<TestType>(mask);
    // kept {1, 2}: sum 3, mean 1.5, Σ(x - 1.5)² = 0.5, unbiased 0.5 / 1, biased 0.5 / 2
    test::check_value("masked_sum", masked_sum(x, m), 3.0, tol);
    test::check_value("masked_mean", masked_mean(x, m), 1.5, tol);
    test::check_value("masked_var", masked_var(x, m), 0.5, tol);
    test::check_value("masked_var biased", masked_var(x, m, false), 0.25, tol);
    const double w = 0.5 / std::sqrt(0.5 + 1e-8);
    test::check_values("masked_whiten", masked_whiten(x, m), {-w, w, 0.0}, tol);
    test::check_value("aggregate token_mean", aggregate(x, m, aggregation::token_mean), 1.5, tol);
    test::check_value("aggregate sum", aggregate(x, m, aggregation::sum), 3.0, tol);
  }
  // Along a dimension: rows {1, 2, 3} mask {2, 0, 3} and {4, 5, 6} mask {0, 0, 0.25} -> means 2 and 6.
  const auto x2 = test::make<TestType>({2, 3}, {1, 2, 3, 4, 5, 6});
  const auto m2 = test::make<TestType>({2, 3}, {2, 0, 3, 0, 0, 0.25});
  test::check_values("masked_mean dim 1", masked_mean(x2, m2, 1), {2.0, 6.0}, tol);
  test::check_values("masked_var dim 1", masked_var(x2, m2, true, 1), {2.0, 0.0}, tol);
  // The sequence modes agree: seq-mean-token-mean = mean of the row means (2 + 6) / 2.
  test::check_value("aggregate seq_mean_token_mean", aggregate(x2, m2, aggregation::seq_mean_token_mean), 4.0, tol);
}
