// Regression tests for what the fuzz targets (fuzz/) found: each case is the minimal input of one
// finding, with the function, what happened, and the value it must give now.
#include <catch2/catch.hpp>
#include <cmath>
#include <limits>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/kl/estimators.hpp"
#include "posttrain/losses/dpo.hpp"
#include "posttrain/losses/orpo.hpp"
#include "posttrain/numerics/divergences.hpp"
#include "posttrain/numerics/logits.hpp"

namespace test_fuzz_regressions {  // one namespace per test file: the unity build compiles several in one TU

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

TEST_CASE("fuzz regression: orpo_backward is finite at a denormal rejected log-prob", "[fuzz][eigen][orpo]") {
  // fuzz_preference (fuzz/corpus/preference/crash-0afa5658...): chosen_logps {-0.0078278782330052366},
  // rejected_logps {-4.94e-324} (a denormal just below 0), lengths 2 / 0 (read as 1), β = 0.1: the loss was
  // finite (73.89) and d/d rejected_logps +inf (dz/expm1(ū_r) = 0.1/4.9e-324 = 2e323 > DBL_MAX). The true
  // derivative β σ(-z)/(1 - e^{ū_r}) is beyond double's range there; orpo_backward bounds 1 - e^{ū} below by
  // the smallest normal t, so it gives β σ(-z)/t (the derivative at ū_r = -t), and the exact formula for |ū| >= t.
  using T = eigen_tensor<double>;
  const double uc = -0.0078278782330052366 / 2, t = std::numeric_limits<double>::min();
  const cpo_batch<T> batch{T({1}, {-0.0078278782330052366}), T({1}, {-4.9406564584124654e-324}), T({1}, {2.0}),
                           T({1}, {0.0})};
  const orpo_options o{.beta = 0.1};
  const double loss = ops::item(orpo(batch, o).loss);
  REQUIRE(std::isfinite(loss));
  CHECK(loss == Approx(73.893795795494995).epsilon(1e-12));
  const auto g = orpo_backward(batch, o);
  REQUIRE(std::isfinite(g.chosen_logps(0)));
  REQUIRE(std::isfinite(g.rejected_logps(0)));
  // z = (ū_c - ū_r) - (log(1 - e^{ū_c}) - log(1 - e^{ū_r})) with 1 - e^{ū_r} = 4.94e-324 exactly
  const double z = uc - std::log(-std::expm1(uc)) + std::log(4.9406564584124654e-324);
  const double sig_neg_z = 1.0 / (1.0 + std::exp(z));
  CHECK(g.rejected_logps(0) == Approx(0.1 * sig_neg_z / t).epsilon(1e-12));
  // d/d chosen_logps is smooth here: a central difference of the loss, and the closed form
  // (-β σ(-z)/(1 - e^{ū_c}))/|c| - 1/|c| = -β/((1 - e^{ū_c}) + e^{ū_c - ū_r}(1 - e^{ū_r}))/2 - 1/2
  const double h = 1e-6;
  auto plus = batch, minus = batch;
  plus.chosen_logps(0) += h;
  minus.chosen_logps(0) -= h;
  const double central = (ops::item(orpo(plus, o).loss) - ops::item(orpo(minus, o).loss)) / (2 * h);
  CHECK(g.chosen_logps(0) == Approx(central).epsilon(1e-6));
  CHECK(g.chosen_logps(0) == Approx(-0.1 * sig_neg_z / -std::expm1(uc) / 2 - 0.5).epsilon(1e-12));

  // Both averages denormal: d_or_c's denominator (1 - e^{ū_c}) + e^{ū_c - ū_r}(1 - e^{ū_r}) ≈ 1e-320 overflowed too.
  const cpo_batch<T> both{T({1}, {-1e-320}), T({1}, {-4.9406564584124654e-324}), T({1}, {1.0}), T({1}, {1.0})};
  REQUIRE(std::isfinite(ops::item(orpo(both, o).loss)));
  const auto gb = orpo_backward(both, o);
  CHECK(std::isfinite(gb.chosen_logps(0)));
  CHECK(std::isfinite(gb.rejected_logps(0)));
  // A small normal ū_r keeps the exact derivative β σ(-z)/(1 - e^{ū_r}) (here ≈ 0.1/1e-300).
  const cpo_batch<T> normal{T({1}, {-1.0}), T({1}, {-1e-300}), T({1}, {1.0}), T({1}, {1.0})};
  const double zn = -1.0 - std::log(-std::expm1(-1.0)) + std::log(1e-300);
  CHECK(orpo_backward(normal, o).rejected_logps(0) == Approx(0.1 / (1.0 + std::exp(zn)) / 1e-300).epsilon(1e-12));

  // float32: a rejected log-prob of -1.4e-45 gave 0.1/1.4e-45 = +inf; now 0.1·σ(-z)/FLT_MIN.
  using F = eigen_tensor<float>;
  const cpo_batch<F> bf{F({1}, {-0.0078278782f}), F({1}, {-1.4e-45f}), F({1}, {2.0f}), F({1}, {0.0f})};
  REQUIRE(std::isfinite(ops::item(orpo(bf, o).loss)));
  const auto gf = orpo_backward(bf, o);
  REQUIRE(std::isfinite(gf.rejected_logps(0)));
  CHECK(std::isfinite(gf.chosen_logps(0)));
  CHECK(gf.rejected_logps(0) == Approx(0.1 / std::numeric_limits<float>::min()).epsilon(1e-5));
}

TEST_CASE("fuzz regression: kl_penalty_backward is an exact 0 where the value clamp is active at r = -inf",
          "[fuzz][eigen][kl]") {
  // fuzz_rl (fuzz/corpus/rl/crash-22bac71d...), float32: k2 with value_clamp 10, logprobs {-inf, 1e-8},
  // ref_logprobs {1e-8, 1e-8}: kl_penalty {10, 0}, but the backward multiplied the slope r = -inf by the
  // clamp's 0/1 mask: 0·(-inf) = NaN. A clamped value's gradient is exactly 0 (torch.clamp's backward).
  // k3 at r = -inf was inf - inf = NaN before its clamp (10 from Eigen's packet min/max, NaN from the scalar
  // one); its true value is +inf (e^{-r} dominates), so it clamps to 10 on every path.
  const double inf = std::numeric_limits<double>::infinity();
  const auto check = [&](auto zero) {
    using S = decltype(zero);
    using T = eigen_tensor<S>;
    const S e8 = S(9.9999999392252903e-09), ninf = -std::numeric_limits<S>::infinity();
    const T lp({1, 3}, {ninf, e8, S(0.5)}), ref({1, 3}, {e8, e8, S(0)});
    const T g({1, 3}, {S(-0.076615549623966217), S(-0.99716180562973022), S(2)});
    for (const kl_estimator e : {kl_estimator::k1, kl_estimator::abs, kl_estimator::k2, kl_estimator::k3}) {
      INFO(kl_estimator_name(e));
      const kl_options o{.estimator = e, .value_clamp = 10.0};
      const T kl = kl_penalty(lp, ref, o), dkl = kl_penalty_backward(lp, ref, g, o);
      CHECK(kl(0, 0) == S(e == kl_estimator::k1 ? -10 : 10));
      CHECK(dkl(0, 0) == S(0));  // clamped: exactly 0, not NaN
      // r = 0: slope 1 for k1, 0 for the others (sign(0) = 0, r, 1 - e^0)
      CHECK(dkl(0, 1) == (e == kl_estimator::k1 ? g(0, 1) : S(0)));
      // r = 0.5, inside the clamp: g·slope, slope = 1, sign(r) = 1, r, 1 - e^{-r}
      const double slope = e == kl_estimator::k2 ? 0.5 : e == kl_estimator::k3 ? -std::expm1(-0.5) : 1.0;
      CHECK(dkl(0, 2) == Approx(2 * slope).epsilon(std::is_same_v<S, float> ? 1e-6 : 1e-14));
      // with the log-ratio clamp as well (verl low_var_kl), still 0 at r = -inf
      const kl_options lr{.estimator = e, .log_ratio_clamp = 20.0, .value_clamp = 10.0};
      CHECK(kl_penalty_backward(lp, ref, g, lr)(0, 0) == S(0));
    }
    // k3 without a clamp: +inf at r = -inf (not NaN), one element (Eigen's scalar path) or several
    const kl_options k3{.estimator = kl_estimator::k3};
    CHECK(kl_penalty(T({1}, {ninf}), T({1}, {S(0)}), k3)(0) == S(inf));
    CHECK(kl_penalty(lp, ref, k3)(0, 0) == S(inf));
    const kl_options k3c{.estimator = kl_estimator::k3, .value_clamp = 10.0};
    CHECK(kl_penalty(T({1}, {ninf}), T({1}, {S(0)}), k3c)(0) == S(10));
    CHECK(kl_penalty_backward(T({1}, {ninf}), T({1}, {S(0)}), T({1}, {S(1)}), k3c)(0) == S(0));
  };
  check(0.0f);
  check(0.0);
}

TEST_CASE("fuzz regression: reverse-KL student gradient at teacher logits near -FLT_MAX", "[fuzz][eigen][distill]") {
  // fuzz_distill (fuzz/corpus/distill/crash-a987fd39...), float64, reverse_kl: student [-0.22197299153124295,
  // 1e-310], teacher [1e-310, -3.4028234663852886e+38], row weight g = 1e308: D = KL(q||p) = 1.89e38 and the
  // gradient {-inf, +inf}. That is the true value: g·dD/ds = 1e308 · ∓8.4e37 is beyond double's range (so is
  // g·D); the fuzz target now checks finiteness only where g·(D + log V + 1)/min(τ, 1) fits the dtype. At g = 1
  // the gradient is finite and equals the closed form q_v (log q_v - log p_v - K), K = KL(q||p).
  using T = eigen_tensor<double>;
  const T s({1, 2}, {-0.22197299153124295, 1e-310}), t({1, 2}, {1e-310, -3.4028234663852886e+38});
  const divergence_options o{.divergence = kd_divergence::reverse_kl};
  const double d = ops::item(ops::sum_all(kd_per_token(s, t, o)));
  REQUIRE(std::isfinite(d));
  // closed form: log q = s - logsumexp(s); log p = [0, -3.4e38] (log(1 + e^{-3.4e38}) = 0)
  const double lse = std::log1p(std::exp(-0.22197299153124295 - 1e-310)) + 1e-310;
  const double lq[2] = {-0.22197299153124295 - lse, 1e-310 - lse}, lp[2] = {0.0, -3.4028234663852886e+38};
  const double q[2] = {std::exp(lq[0]), std::exp(lq[1])};
  const double k = q[0] * (lq[0] - lp[0]) + q[1] * (lq[1] - lp[1]);
  CHECK(d == Approx(k).epsilon(1e-14));
  const T one({1}, {1.0});
  for (const T& gr : {kd_per_token_backward(s, t, one, o), generic::kd_per_token_backward(s, t, one, o)})
    for (int v = 0; v < 2; ++v) {
      REQUIRE(std::isfinite(gr(0, v)));
      CHECK(gr(0, v) == Approx(q[v] * (lq[v] - lp[v] - k)).epsilon(1e-12));
    }
  // smooth in the student logits: a central difference (D ~ 1e38 moves by ~1e32 at h = 1e-6, far above its ulp)
  const double h = 1e-6;
  const T sp({1, 2}, {-0.22197299153124295 + h, 1e-310}), sm({1, 2}, {-0.22197299153124295 - h, 1e-310});
  const double central =
      (ops::item(ops::sum_all(kd_per_token(sp, t, o))) - ops::item(ops::sum_all(kd_per_token(sm, t, o)))) / (2 * h);
  CHECK(kd_per_token_backward(s, t, one, o)(0, 0) == Approx(central).epsilon(1e-6));
  // g = 1e308: the product overflows with the sign of the closed form
  const T huge({1}, {1e308});
  const T gh = kd_per_token_backward(s, t, huge, o);
  CHECK(gh(0, 0) == -std::numeric_limits<double>::infinity());
  CHECK(gh(0, 1) == std::numeric_limits<double>::infinity());

  // The same area held a real defect of the fused kernel: q (log q - log p - K) was evaluated as
  // q·((b - a) + shift), and (b - a) + shift overflows at a column with q = 0 when K is near the top of the
  // range: student [0, -3.3e38], teacher [-3.3e38, 0] (float32; double at ±1e308) has D = 3.3e38 (1e308),
  // finite, and the fused gradient was {0, NaN}. The true gradient is {0, 0} (q = [1, 0], d_0 = K).
  const auto top = [](auto big) {
    using S = decltype(big);
    using U = eigen_tensor<S>;
    const U st({1, 2}, {S(0), -big}), te({1, 2}, {-big, S(0)});
    for (const kd_divergence dv : {kd_divergence::reverse_kl, kd_divergence::symmetric_kl}) {
      const divergence_options od{.divergence = dv};
      const S val = kd_per_token(st, te, od)(0);
      REQUIRE(std::isfinite(val));
      for (const U& gr : {kd_per_token_backward(st, te, U({1}, {S(1)}), od),
                          generic::kd_per_token_backward(st, te, U({1}, {S(1)}), od)})
        for (int v = 0; v < 2; ++v) {
          INFO(kd_divergence_name(dv) << " column " << v);
          REQUIRE(std::isfinite(gr(0, v)));
          // reverse: 0; symmetric (r = ½): ½ (q - p) = ½ {1, -1}
          CHECK(gr(0, v) == Approx(dv == kd_divergence::reverse_kl ? 0.0 : (v == 0 ? 0.5 : -0.5)).margin(1e-6));
        }
    }
  };
  top(3.3e38f);
  top(1e308);
}

TEST_CASE("fuzz regression: fused kd backward where row weight x scale/tau overflows", "[fuzz][eigen][distill]") {
  // fuzz_distill (fuzz/corpus/distill/crash-c677c16e...), float64: symmetric_kl with ratio 1, V = 1, student [1e4],
  // teacher [2.42], τ = 2 with τ², row weight g = 1e308: the fused kernel folded g·τ²/τ = 2e308 = +inf into one
  // coefficient, so inf·q - inf·p = NaN, where the generic path gives the true gradient g·τ·(q - p) = 0 (V = 1:
  // q = p = 1). The same with two columns and q = p (equal rows), and in float32 with g = FLT_MAX.
  const auto check = [](auto big) {
    using S = decltype(big);
    using U = eigen_tensor<S>;
    for (const kd_divergence dv : {kd_divergence::forward_kl, kd_divergence::reverse_kl, kd_divergence::symmetric_kl}) {
      const divergence_options o{
          .divergence = dv, .symmetric_ratio = 1.0, .temperature = 2.0, .scale_by_temperature_squared = true};
      INFO(kd_divergence_name(dv));
      const U s1({1}, {S(1e4)}), t1({1}, {S(2.4200961318379495)});
      CHECK(kd_per_token_backward(s1, t1, U({}, {big}), o)(0) == S(0));
      CHECK(generic::kd_per_token_backward(s1, t1, U({}, {big}), o)(0) == S(0));
      const U s2({1, 2}, {S(0.5), S(-1)}), t2({1, 2}, {S(0.5), S(-1)});
      const U g2 = kd_per_token_backward(s2, t2, U({1}, {big}), o);
      CHECK(g2(0, 0) == S(0));
      CHECK(g2(0, 1) == S(0));
    }
  };
  check(1e308);
  check(std::numeric_limits<float>::max());
}

TEST_CASE("fuzz regression: a row with no finite logit on a side is NaN on both kd paths, every divergence",
          "[fuzz][eigen][distill]") {
  // fuzz_distill, seed 11 (fuzz/corpus/distill/crash-a50d4e35...), float32, reverse_kl: student [2, 1, 2] of
  // 1e-8, teacher rows [-inf, -inf] and [-1e15, 1e15]. The fused kernel gave NaN for the first row (the teacher
  // has no distribution there) and the generic composition +inf (all of the student's mass outside the empty
  // teacher support), while the generic forward KL of the same row was NaN. Both paths now give NaN, value and
  // gradient, for a row with no finite logit on either side, and agree on the other row.
  const auto run = [](auto zero) {
    using S = decltype(zero);
    using U = eigen_tensor<S>;
    const S inf = std::numeric_limits<S>::infinity(), tiny = S(1e-8);
    const U empty_second({2, 1, 2}, {tiny, tiny, tiny, tiny}), with_empty({2, 1, 2}, {-inf, -inf, S(-1e15), S(1e15)});
    const U ones({2, 1}, {S(1), S(1)});
    for (const kd_divergence dv : {kd_divergence::forward_kl, kd_divergence::forward_cross_entropy,
                                   kd_divergence::reverse_kl, kd_divergence::symmetric_kl, kd_divergence::jsd})
      for (const bool teacher_empty : {true, false}) {
        INFO(kd_divergence_name(dv) << (teacher_empty ? ", teacher" : ", student") << " row without a finite logit");
        const divergence_options o{.divergence = dv};
        const U& st = teacher_empty ? empty_second : with_empty;
        const U& te = teacher_empty ? with_empty : empty_second;
        const U fv = kd_per_token(st, te, o), gv = generic::kd_per_token(st, te, o);
        CHECK(std::isnan(fv(0, 0)));
        CHECK(std::isnan(gv(0, 0)));
        CHECK(!std::isnan(fv(1, 0)));
        CHECK(fv(1, 0) == Approx(gv(1, 0)).epsilon(1e-5));
        const U fg = kd_per_token_backward(st, te, ones, o), gg = generic::kd_per_token_backward(st, te, ones, o);
        for (int v = 0; v < 2; ++v) {
          CHECK(std::isnan(fg(0, 0, v)));
          CHECK(std::isnan(gg(0, 0, v)));
          REQUIRE(std::isfinite(fg(1, 0, v)));
          CHECK(fg(1, 0, v) == Approx(gg(1, 0, v)).epsilon(1e-5).margin(1e-6));
        }
      }
  };
  run(0.0f);
  run(0.0);
}

TEST_CASE("fuzz regression: fused kd backward at g = +inf keeps columns whose q - p is below float32's normal range",
          "[fuzz][eigen][distill]") {
  // fuzz_distill, seed 11 (fuzz/corpus/distill/crash-8dae56d0...), float32, forward_cross_entropy, τ = 1, row weight
  // g = +inf: student [-1e15, 89, -1e15, 1e-8], teacher [89, 89, 0.678584, 1e-8]. The gradient is g·(q - p):
  // q ≈ (0, 1, 0, e^-89) and p ≈ (1/2, 1/2, e^-89.01/2·..., e^-89/2), so q - p has signs (-, +, -, +) and the
  // last two magnitudes ~1e-39, below float32's normal range. The fused kernel rounded the unit-weight gradient
  // to float32 first (0 there: Eigen's SSE packet exp, the default flags, gives 0 below the normal range; the
  // AVX-512 one does not, so the defect showed in the default-flags and sanitizer builds only) and then gave
  // inf·0 = NaN; the generic g·(q - p) and the true value are -inf and +inf.
  using U = eigen_tensor<float>;
  const float inf = std::numeric_limits<float>::infinity();
  const U s({1, 4}, {-1e15f, 89.0f, -1e15f, 1e-8f}), t({1, 4}, {89.0f, 89.0f, 0.678584f, 1e-8f});
  const divergence_options o{.divergence = kd_divergence::forward_cross_entropy};
  const U g({1}, {inf});
  const U fused = kd_per_token_backward(s, t, g, o), gen = generic::kd_per_token_backward(s, t, g, o);
  const float expected[4] = {-inf, inf, -inf, inf};
  for (int v = 0; v < 4; ++v) {
    INFO("column " << v);
    CHECK(fused(0, v) == expected[v]);
    CHECK(gen(0, v) == expected[v]);
  }
  // The same row with a finite g: the double unit gradient changes nothing where coef fits in float32.
  const U fin = kd_per_token_backward(s, t, U({1}, {1.0f}), o);
  CHECK(fin(0, 0) == Approx(-0.5).margin(1e-6));
  CHECK(fin(0, 1) == Approx(0.5).margin(1e-6));
}

TEST_CASE("fuzz regression: the sft term of dpo gives an exact 0 for a rejected log-prob it does not read",
          "[fuzz][eigen][dpo]") {
  // fuzz_preference, seed 12 (fuzz/corpus/preference/crash-1e6da723...), float32: loss sft, alpha divergence
  // (α = 2), rejected [NaN, 89]: the loss was finite (the sft term reads the chosen side only) but the rejected
  // gradient was {NaN, 0}: 0 (∂L/∂s_r) times the score's slope at the NaN log-ratio. Now an exact 0.
  const auto run = [](auto zero) {
    using S = decltype(zero);
    using U = eigen_tensor<S>;
    const S qnan = std::numeric_limits<S>::quiet_NaN(), tiny = S(1e-8);
    preference_batch<U> batch{U({2}, {S(-1e15), tiny}), U({2}, {qnan, S(89)})};
    batch.ref_chosen_logps = U({2}, {tiny, tiny});
    batch.ref_rejected_logps = U({2}, {tiny, tiny});
    batch.chosen_lengths = U({2}, {S(3), S(3)});
    batch.rejected_lengths = U({2}, {S(3), S(3)});
    for (const f_divergence dv : {f_divergence::reverse_kl, f_divergence::forward_kl, f_divergence::js_divergence,
                                  f_divergence::alpha_divergence}) {
      const dpo_options o{.loss = dpo_loss::sft, .divergence = dv, .alpha = 2.0};
      const double loss = static_cast<double>(ops::item(dpo(batch, o).loss));
      // -Σ chosen / Σ |c| = (1e15 - 1e-8) / 6
      CHECK(loss == Approx((1e15 - 1e-8) / 6).epsilon(1e-6));
      const auto g = dpo_backward(batch, o);
      for (int i = 0; i < 2; ++i) {
        CHECK(g.rejected_logps(i) == S(0));
        CHECK(g.chosen_logps(i) == Approx(-1.0 / 6).epsilon(1e-6));  // d/dl_c of -Σ l_c / 6, then mean over 2
      }
    }
  };
  run(0.0f);
  run(0.0);
}

}  // namespace test_fuzz_regressions
