// Numerics primitives on the Eigen backend (float and double):
//  * stable scalar functions against their closed forms, including |x| = 500,
//  * logsumexp / token_logprobs / softmax / entropy on vocabularies small enough to do by hand,
//  * the backend's fused overrides against the generic compositions,
//  * every analytic backward against central finite differences (double).
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

namespace test_numerics {  // one namespace per test file: the unity build compiles several in one TU

using namespace posttrain;

namespace {
const double ln2 = std::log(2.0), ln3 = std::log(3.0), ln4 = std::log(4.0), ln6 = std::log(6.0);
constexpr double inf = std::numeric_limits<double>::infinity();
/// float64_tol's relative part alone: for values near 1e-218 any absolute tolerance would hide them.
constexpr test::tolerance relative64{0.0, test::float64_tol.rtol};
}  // namespace

TEMPLATE_TEST_CASE("softplus, log_sigmoid and sigmoid match their closed forms", "[numerics][stable]", float, double) {
  const auto tol = test::tol_of<TestType>();
  const auto x = test::vec<TestType>({0.0, ln3, -ln3, 500.0, -500.0});
  // softplus(x) = log(1 + e^x):
  //   0 -> ln 2;  ln 3 -> log 4;  -ln 3 -> log(4/3);
  //   500 -> 500 + log1p(e^-500) = 500 (e^-500 ~ 7e-218 is far below half an ulp of 500);
  //   -500 -> log1p(e^-500) = e^-500 ~ 0 (checked relatively in double below).
  test::check_values("softplus", softplus(x), {ln2, ln4, std::log(4.0 / 3.0), 500.0, 0.0}, tol);
  // log sigmoid(x) = -softplus(-x): 0 -> -ln 2; ln 3 -> log(3/4); -ln 3 -> log(1/4); 500 -> -e^-500 ~ 0;
  // -500 -> -500 - log1p(e^-500) = -500.
  test::check_values("log_sigmoid", log_sigmoid(x), {-ln2, std::log(0.75), -ln4, 0.0, -500.0}, tol);
  // sigmoid(x) = 1 / (1 + e^-x): 1/2, 3/4, 1/4, 1, e^-500 ~ 0.
  test::check_values("sigmoid", sigmoid(x), {0.5, 0.75, 0.25, 1.0, 0.0}, tol);
  for (const auto& y : {softplus(x), log_sigmoid(x), sigmoid(x)}) CHECK(test::finite_everywhere(y));

  if constexpr (std::is_same_v<TestType, double>) {
    // In double e^-500 = 7.12e-218 is representable: log1p(u) = u (1 - u/2 + ...) = u to rounding.
    const auto tiny = test::vec({-500.0});
    test::check_value("softplus(-500)", softplus(tiny), std::exp(-500.0), relative64);
    test::check_value("sigmoid(-500)", sigmoid(tiny), std::exp(-500.0), relative64);
    test::check_value("log_sigmoid(500)", log_sigmoid(test::vec({500.0})), -std::exp(-500.0), relative64);
  }
}

TEMPLATE_TEST_CASE("log1mexp matches log(1 - e^x) on both sides of -ln 2", "[numerics][stable]", float, double) {
  const auto tol = test::tol_of<TestType>();
  // log(1 - e^x):
  //   x = -ln(4/3) (> -ln 2, expm1 branch): 1 - 3/4 = 1/4 -> -ln 4
  //   x = -ln 2 (the switch point):         1 - 1/2 = 1/2 -> -ln 2
  //   x = -ln 4 (< -ln 2, log1p branch):    1 - 1/4 = 3/4 -> log(3/4)
  //   x = -1e-10: 1 - e^x = 1e-10 (1 - 5e-11 + ...) -> ln(1e-10) - 5e-11
  //   x = -50, -500: log1p(-e^x) = -e^x - e^{2x}/2 ... = -e^x to rounding (~ 0 at this tolerance)
  //   x = 0: log 0 = -inf (the true value)
  const auto x = test::vec<TestType>({-std::log(4.0 / 3.0), -ln2, -ln4, -1e-10, -50.0, -500.0, 0.0});
  test::check_values("log1mexp", log1mexp(x), {-ln4, -ln2, std::log(0.75), std::log(1e-10) - 5e-11, 0.0, 0.0, -inf},
                     tol);
  // Just either side of the switch the two branches agree with the closed form (continuity).
  for (double d : {-1e-3, 1e-3}) {
    const double at = -ln2 + d;
    test::check_value("log1mexp near -ln 2", log1mexp(test::vec<TestType>({at})), std::log(1.0 - std::exp(at)), tol);
  }
  if constexpr (std::is_same_v<TestType, double>) {
    test::check_value("log1mexp(-50)", log1mexp(test::vec({-50.0})), -std::exp(-50.0), relative64);
    test::check_value("log1mexp(-500)", log1mexp(test::vec({-500.0})), -std::exp(-500.0), relative64);
  }
}

TEMPLATE_TEST_CASE("logsumexp, softmax, token_logprobs and entropy on tiny vocabularies", "[numerics][logits]", float,
                   double) {
  const auto tol = test::tol_of<TestType>();
  // Rows chosen so every softmax is a ratio of small integers:
  //   r0 = [0, ln 2, ln 3]     Z = 1 + 2 + 3 = 6, p = [1/6, 1/3, 1/2]
  //   r1 = [7, 7, 7]           Z = 3 e^7, p = 1/3 each
  //   r2 = [0, 0, -inf]        Z = 2, p = [1/2, 1/2, 0]  (a padding column)
  //   r3 = [0, ln 3, -inf]     Z = 4, p = [1/4, 3/4, 0]
  const auto logits = test::make<TestType>({4, 3}, {0, ln2, ln3, 7, 7, 7, 0, 0, -inf, 0, ln3, -inf});
  // logsumexp = log Z
  test::check_values("logsumexp", logsumexp(logits), {ln6, 7 + ln3, ln2, ln4}, tol);
  test::check_values("softmax", softmax_last(logits),
                     {1. / 6, 1. / 3, 0.5, 1. / 3, 1. / 3, 1. / 3, 0.5, 0.5, 0, 0.25, 0.75, 0}, tol);
  // H = -Σ p log p (0 log 0 := 0):
  //   r0: (1/6) ln 6 + (1/3) ln 3 + (1/2) ln 2;  r1: ln 3;  r2: ln 2;  r3: (1/4) ln 4 + (3/4) ln(4/3) = ln 4 - (3/4) ln
  //   3
  test::check_values("entropy", entropy(logits), {ln6 / 6 + ln3 / 3 + ln2 / 2, ln3, ln2, ln4 - 0.75 * ln3}, tol);
  // log p[label]: r0 label 2 -> log(1/2); r1 label 0 -> log(1/3); r2 label 1 -> log(1/2); r3 ignored (-100) -> 0
  const eigen_index labels({4}, {2, 0, 1, -100});
  test::check_values("token_logprobs", token_logprobs(logits, labels), {-ln2, -ln3, -ln2, 0.0}, tol);
  // A custom ignore_index may lie outside [0, V): it is skipped, not range-checked.
  const eigen_index custom({4}, {1, 5, 5, 1});
  test::check_values("token_logprobs(ignore_index = 5)", token_logprobs(logits, custom, 5),
                     {-ln6 + ln2, 0, 0, ln3 - ln4}, tol);
  // A -inf logit has probability 0: its log-probability is -inf (the true value).
  test::check_values("token_logprobs of a padding column", token_logprobs(logits, eigen_index({4}, {0, 0, 2, 2})),
                     {-ln6, -ln3, -inf, -inf}, tol);
}

TEMPLATE_TEST_CASE("a uniform distribution over V has entropy log V", "[numerics][logits]", float, double) {
  const auto tol = test::tol_of<TestType>();
  for (std::int64_t v : {1, 2, 5, 1000}) {
    // logits all equal to c: Z = V e^c, p = 1/V, H = log V, log p = -log V.
    const double c = -3.5;
    const eigen_tensor<TestType> x({2, v}, static_cast<TestType>(c));
    const double lv = std::log(static_cast<double>(v));
    INFO("V = " << v);
    test::check_values("entropy", entropy(x), {lv, lv}, tol);
    test::check_values("logsumexp", logsumexp(x), {c + lv, c + lv}, tol);
    test::check_values("token_logprobs", token_logprobs(x, eigen_index({2}, {0, v - 1})), {-lv, -lv}, tol);
  }
}

TEMPLATE_TEST_CASE("rank-1 and rank-3 logits give the rows of the rank-2 result", "[numerics][logits]", float, double) {
  const auto tol = test::tol_of<TestType>();
  const auto h = test::random_normal({2, 3, 5}, 11, 2.0);
  const auto x3 = test::to_eigen<TestType>(h);
  const auto x2 = ops::reshape(x3, {6, 5});
  test::check_same("logsumexp rank 3", ops::reshape(logsumexp(x3), {6}), logsumexp(x2), tol);
  test::check_same("entropy rank 3", ops::reshape(entropy(x3), {6}), entropy(x2), tol);
  // A single row [V] with a 0-d label.
  const eigen_tensor<TestType> row({3}, std::vector<TestType>{0, TestType(ln2), TestType(ln3)});
  test::check_value("token_logprobs rank 1", token_logprobs(row, eigen_index(shape_t{}, {1})), std::log(1.0 / 3), tol);
  test::check_value("logsumexp rank 1", logsumexp(row), ln6, tol);
}

TEMPLATE_TEST_CASE("the Eigen backend's fused primitives agree with the generic compositions", "[numerics][fused]",
                   float, double) {
  const auto tol = test::tol_of<TestType>();
  for (std::uint64_t seed : {1u, 2u, 3u}) {
    auto h = test::random_normal({3, 4, 9}, seed, 3.0);
    h.values[5] = -inf;  // a padding column in one row
    const auto x = test::to_eigen<TestType>(h);
    const auto labels = test::to_eigen(test::random_labels({3, 4}, 9, seed + 10));
    INFO("seed " << seed);
    test::check_same("logsumexp", logsumexp(x), generic::logsumexp_last(x), tol);
    test::check_same("entropy", entropy(x), generic::entropy_last(x), tol);
    test::check_same("token_logprobs", token_logprobs(x, labels), generic::token_logprobs(x, labels), tol);
  }
}

TEST_CASE("logsumexp, token_logprobs and entropy backward match finite differences", "[numerics][grad]") {
  for (std::uint64_t seed : {3u, 4u}) {
    INFO("seed " << seed);
    const auto x = test::to_eigen<double>(test::random_normal({2, 3, 5}, seed, 2.0));
    const auto w = test::to_eigen<double>(test::random_normal({2, 3}, seed + 100));
    test::check_gradient(
        "logsumexp", logsumexp_backward(x, w), [&](const auto& p) { return test::contract(w, logsumexp(p)); }, x);
    test::check_gradient(
        "entropy", entropy_backward(x, w), [&](const auto& p) { return test::contract(w, entropy(p)); }, x);
    // Two of six positions ignored: their gradient is exactly zero.
    auto lh = test::random_labels({2, 3}, 5, seed + 200);
    lh.values[1] = lh.values[4] = -100;
    const auto labels = test::to_eigen(lh);
    const auto g = token_logprobs_backward(x, labels, w);
    test::check_gradient(
        "token_logprobs", g, [&](const auto& p) { return test::contract(w, token_logprobs(p, labels)); }, x);
    for (std::int64_t v = 0; v < 5; ++v) CHECK(g(0, 1, v) == 0.0);
    // Custom ignore_index.
    const eigen_index custom({2, 3}, {0, 7, 4, 7, 2, 1});
    test::check_gradient(
        "token_logprobs (ignore_index 7)", token_logprobs_backward(x, custom, w, 7),
        [&](const auto& p) { return test::contract(w, token_logprobs(p, custom, 7)); }, x);
  }
}

}  // namespace test_numerics
