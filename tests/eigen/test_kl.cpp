// KL estimators and the exact KL on the Eigen backend:
//  * k1 / abs / k2 / k3 against their closed forms (Schulman, "Approximating KL divergence", 2020),
//    verl's low_var_kl clamps (r to ±20, value to ±10: verl/trainer/ppo/core_algos.py kl_penalty),
//    the straight-through variant's value,
//  * kl_exact by hand on 2- and 3-token vocabularies (with a padding column), KL >= 0, KL(p || p) = 0,
//  * kl_penalty_backward (every estimator, clamps, straight-through) and kl_exact_backward against
//    central finite differences.
#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <vector>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/kl/estimators.hpp"
#include "posttrain/kl/exact.hpp"
#include "posttrain/losses/sft.hpp"
#include "posttrain/numerics/aggregate.hpp"
#include "posttrain/numerics/logits.hpp"
#include "posttrain/numerics/masked.hpp"
#include "posttrain/numerics/stable.hpp"
#include "support/data.hpp"
#include "support/eigen_checks.hpp"
#include "support/finite_difference.hpp"

namespace test_kl {  // one namespace per test file: the unity build compiles several in one TU

using namespace posttrain;

namespace {
const double ln2 = std::log(2.0), ln3 = std::log(3.0);
constexpr double inf = std::numeric_limits<double>::infinity();
constexpr kl_estimator all_estimators[] = {kl_estimator::k1, kl_estimator::abs, kl_estimator::k2, kl_estimator::k3};

/// logprobs and ref_logprobs with the given log-ratios r = logprobs - ref (ref fixed at -1.25).
template <class S>
std::pair<eigen_tensor<S>, eigen_tensor<S>> with_ratios(const std::vector<double>& r) {
  std::vector<double> lp(r.size()), ref(r.size(), -1.25);
  for (std::size_t i = 0; i < r.size(); ++i) lp[i] = -1.25 + r[i];
  return {test::vec<S>(lp), test::vec<S>(ref)};
}
}  // namespace

TEMPLATE_TEST_CASE("k1, abs, k2 and k3 match their closed forms", "[kl]", float, double) {
  const auto tol = test::tol_of<TestType>();
  // logp = log 0.5, ref = log 0.25 -> r = ln 2; swapped -> r = -ln 2; equal -> 0; then r = -2 and 2.5.
  const auto lp = test::vec<TestType>({std::log(0.5), std::log(0.25), -1.0, -3.0, -1.0});
  const auto ref = test::vec<TestType>({std::log(0.25), std::log(0.5), -1.0, -1.0, -3.5});
  const double r[] = {ln2, -ln2, 0.0, -2.0, 2.5};
  std::vector<double> k1, ab, k2, k3;
  for (double x : r) {
    k1.push_back(x);                       // k1 = r
    ab.push_back(std::abs(x));             // |r|
    k2.push_back(0.5 * x * x);             // ½ r²
    k3.push_back(std::exp(-x) + x - 1.0);  // e^{-r} + r - 1
  }
  // Written out: k3(ln 2) = 1/2 + ln 2 - 1 = 0.193147; k3(-ln 2) = 2 - ln 2 - 1 = 0.306853; k3(-2) = e² - 3.
  CHECK(k3[0] == Approx(ln2 - 0.5));
  CHECK(k3[1] == Approx(1.0 - ln2));
  test::check_values("k1", kl_penalty(lp, ref, {.estimator = kl_estimator::k1}), k1, tol);
  test::check_values("abs", kl_penalty(lp, ref, {.estimator = kl_estimator::abs}), ab, tol);
  test::check_values("k2", kl_penalty(lp, ref, {.estimator = kl_estimator::k2}), k2, tol);
  test::check_values("k3 (the default)", kl_penalty(lp, ref), k3, tol);
  // The straight-through variant returns the estimator's value unchanged.
  for (auto e : all_estimators) {
    INFO(kl_estimator_name(e));
    test::check_same("straight-through value", kl_penalty(lp, ref, {.estimator = e, .straight_through = true}),
                     kl_penalty(lp, ref, {.estimator = e}), tol);
  }
}

TEMPLATE_TEST_CASE("abs, k2 and k3 are non-negative on random inputs", "[kl]", float, double) {
  for (std::uint64_t seed : {61u, 62u}) {
    const auto lp = test::to_eigen<TestType>(test::random_normal({4, 7}, seed, 2.0, -2.0));
    const auto ref = test::to_eigen<TestType>(test::random_normal({4, 7}, seed + 1, 2.0, -2.0));
    // e^{-r} + r - 1 >= 0 for every r (convexity of e^{-r}, tangent at 0); |r| and ½ r² too.
    for (auto e : {kl_estimator::abs, kl_estimator::k2, kl_estimator::k3})
      for (double v : ops::to_host(kl_penalty(lp, ref, {.estimator = e}))) CHECK(v >= 0.0);
  }
}

TEMPLATE_TEST_CASE("verl's low_var_kl clamps r to ±20 and the value to ±10", "[kl][clamp]", float, double) {
  const auto tol = test::tol_of<TestType>();
  // verl kl_penalty "low_var_kl": kl = clamp(e^{ref - logp} - (ref - logp) - 1, -10, 10) with ref - logp
  // clamped to [-20, 20] first. With r = logp - ref:
  //   r =  30 -> 20:  e^-20 + 19 -> clamped to 10      r = -30 -> -20: e^20 - 21 -> 10
  //   r =   2:        e^-2 + 1 = 1.135335               r = -2:         e^2 - 3 = 4.389056
  //   r =  -3:        e^3 - 4 = 16.09 -> 10             r =  9:         e^-9 + 8 = 8.000123
  const auto [lp, ref] = with_ratios<TestType>({30, -30, 2, -2, -3, 9});
  test::check_values("verl low_var_kl", kl_penalty(lp, ref, kl_options::verl_low_var_kl()),
                     {10, 10, std::exp(-2.0) + 1, std::exp(2.0) - 3, 10, std::exp(-9.0) + 8}, tol);
  // Each clamp alone. k2 with r clamped to [-1, 1]: r = 3 -> ½; r = -0.5 -> 0.125; r = -7 -> ½.
  const auto [lp2, ref2] = with_ratios<TestType>({3, -0.5, -7});
  test::check_values("k2, log_ratio_clamp 1",
                     kl_penalty(lp2, ref2, {.estimator = kl_estimator::k2, .log_ratio_clamp = 1.0}), {0.5, 0.125, 0.5},
                     tol);
  // k1 with the value clamped to ±10 (OpenRLHF): r = -15 -> -10; 15 -> 10; 3 -> 3.
  const auto [lp3, ref3] = with_ratios<TestType>({-15, 15, 3});
  test::check_values("k1, value_clamp 10", kl_penalty(lp3, ref3, {.estimator = kl_estimator::k1, .value_clamp = 10.0}),
                     {-10, 10, 3}, tol);
  // abs with the value clamped to 1: |-2| -> 1; |0.5| -> 0.5.
  const auto [lp4, ref4] = with_ratios<TestType>({-2, 0.5});
  test::check_values("abs, value_clamp 1", kl_penalty(lp4, ref4, {.estimator = kl_estimator::abs, .value_clamp = 1.0}),
                     {1, 0.5}, tol);
  // Straight-through keeps the clamped value.
  auto st = kl_options::verl_low_var_kl();
  st.straight_through = true;
  test::check_same("straight-through verl value", kl_penalty(lp, ref, st),
                   kl_penalty(lp, ref, kl_options::verl_low_var_kl()), tol);
}

TEMPLATE_TEST_CASE("kl_exact by hand on 2- and 3-token vocabularies", "[kl][exact]", float, double) {
  const auto tol = test::tol_of<TestType>();
  // KL(p || q) = Σ_v p_v log(p_v / q_v).
  //   [0, 0] vs [0, ln 3]:     p = (1/2, 1/2), q = (1/4, 3/4): ½ ln 2 + ½ ln(2/3) = 0.143841
  //   [0, ln 2, ln 3] vs 0:    p = (1/6, 1/3, 1/2), q = 1/3:   Σ p ln(3p) = (1/6) ln(1/2) + 0 + (1/2) ln(3/2)
  //   [0, 0, -inf] vs [0, ln 3, 5]: p = (1/2, 1/2, 0), q = (1, 3, e^5) / (4 + e^5); the padding column has p = 0
  //                            and contributes 0: ½ ln(½ (4 + e^5)) + ½ ln(½ (4 + e^5) / 3) = ln((4 + e^5)/2) - ½ ln 3
  const auto p2 = test::make<TestType>({1, 2}, {0, 0});
  const auto q2 = test::make<TestType>({1, 2}, {0, ln3});
  test::check_value("V = 2", kl_exact(p2, q2), 0.5 * ln2 + 0.5 * std::log(2.0 / 3), tol);
  CHECK(test::rounds_to(0.5 * ln2 + 0.5 * std::log(2.0 / 3), 0.143841, 6));
  const auto p3 = test::make<TestType>({2, 3}, {0, ln2, ln3, 0, 0, -inf});
  const auto q3 = test::make<TestType>({2, 3}, {0, 0, 0, 0, ln3, 5});
  test::check_values("V = 3", kl_exact(p3, q3),
                     {std::log(0.5) / 6 + 0.5 * std::log(1.5), std::log((4 + std::exp(5.0)) / 2) - 0.5 * ln3}, tol);
  // q_v = 0 where p_v > 0: the divergence is +inf, its true value.
  test::check_value("q = 0 where p > 0", kl_exact(p2, test::make<TestType>({1, 2}, {0, -inf})), inf, tol);
  // V = 1: both distributions are the point mass, KL = 0.
  test::check_value("V = 1", kl_exact(test::make<TestType>({1, 1}, {3}), test::make<TestType>({1, 1}, {-8})), 0.0, tol);
  // KL(p || p) = 0 and KL >= 0 (Gibbs' inequality) on random logits.
  for (std::uint64_t seed : {71u, 72u}) {
    const auto x = test::to_eigen<TestType>(test::random_normal({3, 2, 9}, seed, 2.0));
    const auto y = test::to_eigen<TestType>(test::random_normal({3, 2, 9}, seed + 1, 2.0));
    test::check_values("KL(p || p)", kl_exact(x, x), std::vector<double>(6, 0.0), tol);
    for (double v : ops::to_host(kl_exact(x, y))) CHECK(v >= 0.0);
  }
}

TEST_CASE("kl_penalty_backward matches finite differences for every estimator and clamp", "[kl][grad]") {
  // Log-ratios away from every kink: r = 0 (abs), |r| = 20 (log_ratio_clamp 20), k3 = 10 (value clamp at
  // r ~ -2.61 and r ~ 11), |r| = 1.5 and |value| = 2 (the custom clamps below).
  const auto [lp, ref] = with_ratios<double>({-25, -2.8, -2.5, -1.1, -0.3, 0.4, 1.7, 9, 15, 25});
  const auto w = test::to_eigen<double>(test::random_normal({10}, 81));
  std::vector<kl_options> options;
  for (auto e : all_estimators) {
    options.push_back({.estimator = e});
    options.push_back({.estimator = e, .log_ratio_clamp = 20.0, .value_clamp = 10.0});
    options.push_back({.estimator = e, .log_ratio_clamp = 1.5});
    options.push_back({.estimator = e, .value_clamp = 2.0});
  }
  // Unclamped k3 at r = -25 is e^25 = 7e10: a central difference of it carries rounding eps·7e10 / h ~ 16,
  // so that case is checked without r = -25 (its extreme values are covered in test_extremes.cpp).
  const auto [lp_k3, ref_k3] = with_ratios<double>({-2.8, -2.5, -1.1, -0.3, 0.4, 1.7, 9, 15, 25, 0.2});
  for (const auto& o : options) {
    INFO(kl_estimator_name(o.estimator) << ", log_ratio_clamp " << (o.log_ratio_clamp ? *o.log_ratio_clamp : 0)
                                        << ", value_clamp " << (o.value_clamp ? *o.value_clamp : 0));
    const bool huge = o.estimator == kl_estimator::k3 && !o.log_ratio_clamp;
    const auto& x0 = huge ? lp_k3 : lp;
    const auto& r0 = huge ? ref_k3 : ref;
    test::check_gradient(
        "kl_penalty", kl_penalty_backward(x0, r0, w, o),
        [&](const auto& x) { return test::contract(w, kl_penalty(x, r0, o)); }, x0);
  }
  // Straight-through: the gradient of k2, i.e. r, whatever the estimator and clamps.
  for (auto e : all_estimators)
    for (bool clamps : {false, true}) {
      kl_options o{.estimator = e, .straight_through = true};
      if (clamps) o.log_ratio_clamp = 20.0, o.value_clamp = 10.0;
      INFO("straight-through " << kl_estimator_name(e) << (clamps ? " with clamps" : ""));
      test::check_gradient(
          "straight-through = k2's gradient", kl_penalty_backward(lp, ref, w, o),
          [&](const auto& x) { return test::contract(w, kl_penalty(x, ref, {.estimator = kl_estimator::k2})); }, lp);
    }
  // Inside the verl clamps the gradient is k3's slope 1 - e^{-r}; outside it is 0 (as autograd through clamp).
  const auto g = kl_penalty_backward(lp, ref, ops::full_like(lp, 1.0), kl_options::verl_low_var_kl());
  CHECK(g(0) == 0.0);                         // r = -25: r clamped
  CHECK(g(1) == 0.0);                         // r = -2.8: value e^2.8 - 3.8 = 12.6 clamped
  CHECK(g(2) == Approx(1 - std::exp(2.5)));   // r = -2.5: value 8.68
  CHECK(g(7) == Approx(1 - std::exp(-9.0)));  // r = 9: value 8.0001
  CHECK(g(8) == 0.0);                         // r = 15: value 14 clamped
}

TEST_CASE("kl_exact_backward matches finite differences", "[kl][exact][grad]") {
  for (std::uint64_t seed : {91u, 92u}) {
    INFO("seed " << seed);
    const auto x = test::to_eigen<double>(test::random_normal({2, 3, 5}, seed, 2.0));
    const auto y = test::to_eigen<double>(test::random_normal({2, 3, 5}, seed + 1, 2.0));
    const auto w = test::to_eigen<double>(test::random_normal({2, 3}, seed + 2));
    test::check_gradient(
        "kl_exact", kl_exact_backward(x, y, w), [&](const auto& p) { return test::contract(w, kl_exact(p, y)); }, x);
    // At p = q the KL is at its minimum: the gradient is 0.
    test::check_values("gradient at p = q", kl_exact_backward(x, x, w), std::vector<double>(30, 0.0),
                       test::float64_tol);
  }
}

}  // namespace test_kl
