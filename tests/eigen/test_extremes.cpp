// Extreme inputs on the Eigen backend in float and double: logits of ±1e4, log-ratios of ±500,
// all-masked rows, a single token, V = 1 and V = 50000. Every value and gradient is finite (no NaN,
// no Inf) and matches its closed form; then float32 against float64 on random inputs over several
// shapes, seeds and masks (float32_tol, the double run fed the same float-rounded inputs).
#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
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

namespace test_extremes {  // one namespace per test file: the unity build compiles several in one TU

using namespace posttrain;

namespace {
const double ln2 = std::log(2.0), ln4 = std::log(4.0);
constexpr aggregation all_modes[] = {aggregation::token_mean, aggregation::seq_mean_token_sum,
                                     aggregation::seq_mean_token_mean, aggregation::seq_mean_token_sum_norm,
                                     aggregation::sum};
constexpr kl_estimator all_estimators[] = {kl_estimator::k1, kl_estimator::abs, kl_estimator::k2, kl_estimator::k3};

/// Every SFT option combination the extremes run through.
std::vector<sft_options> sft_option_grid() {
  std::vector<sft_options> out;
  for (double eps : {0.0, 0.1})
    for (double z : {0.0, 1e-4})
      for (bool dft : {false, true})
        for (auto mode : all_modes) out.push_back({.label_smoothing = eps, .z_loss = z, .reduction = mode, .dft = dft});
  return out;
}

std::string describe(const sft_options& o) {
  return "eps " + std::to_string(o.label_smoothing) + ", z " + std::to_string(o.z_loss) + ", dft " +
         std::to_string(o.dft) + ", " + aggregation_name(o.reduction);
}

/// Runs SFT forward and backward and requires every output finite.
template <class S>
sft_result<eigen_tensor<S>> sft_all_finite(const eigen_tensor<S>& logits, const eigen_index& labels,
                                           const sft_options& o) {
  const auto r = sft_loss(logits, labels, o);
  for (const auto* t : {&r.loss, &r.per_token_loss, &r.num_tokens, &r.token_accuracy, &r.entropy})
    CHECK(test::finite_everywhere(*t));
  CHECK(test::finite_everywhere(sft_loss_backward(logits, labels, o)));
  return r;
}

/// host data rounded through float32: what a float tensor made from it holds.
test::host_tensor rounded_to_float(test::host_tensor h) {
  for (auto& v : h.values) v = static_cast<double>(static_cast<float>(v));
  return h;
}
}  // namespace

TEMPLATE_TEST_CASE("logits of ±1e4: finite values and gradients, closed forms", "[extreme][numerics][sft][kl]", float,
                   double) {
  const auto tol = test::tol_of<TestType>();
  const double b = 1e4;
  // Six rows of logits [2, 3, 4]; e^{-1e4} and e^{-2e4} are 0 in both types:
  //   r0 [b, -b, -b, -b]  Z = e^b            lse b,        H 0,    y = 0: log p 0
  //   r1 [b, b, -b, 0]    Z = 2 e^b          lse b + ln 2, H ln 2, y = 3: log p = -b - ln 2
  //   r2 [-b, -b, -b, -b] Z = 4 e^-b         lse -b + ln 4, H ln 4, y = 2: log p = -ln 4
  //   r3 [0, b, -b, b]    Z = 2 e^b          lse b + ln 2, H ln 2, y = 2: log p = -2b - ln 2
  //   r4 [-b, 0, 0, -b]   Z = 2              lse ln 2,     H ln 2, y = 1: log p = -ln 2
  //   r5 [b, -b, 0, 5]    Z = e^b            lse b,        H 0,    ignored
  const auto logits = test::make<TestType>(
      {2, 3, 4}, {b, -b, -b, -b, b, b, -b, 0, -b, -b, -b, -b, 0, b, -b, b, -b, 0, 0, -b, b, -b, 0, 5});
  const eigen_index labels({2, 3}, {0, 3, 2, 2, 1, -100});
  test::check_values("logsumexp", logsumexp(logits), {b, b + ln2, -b + ln4, b + ln2, ln2, b}, tol);
  test::check_values("entropy", entropy(logits), {0, ln2, ln4, ln2, ln2, 0}, tol);
  test::check_values("token_logprobs", token_logprobs(logits, labels), {0, -b - ln2, -ln4, -2 * b - ln2, -ln2, 0}, tol);
  // The generic compositions (what a backend without fused kernels runs) keep the same precision.
  test::check_values("generic logsumexp", generic::logsumexp_last(logits), {b, b + ln2, -b + ln4, b + ln2, ln2, b},
                     tol);
  test::check_values("generic entropy", generic::entropy_last(logits), {0, ln2, ln4, ln2, ln2, 0}, tol);
  test::check_values("generic token_logprobs", generic::token_logprobs(logits, eigen_index({2, 3}, {0, 3, 2, 2, 1, 0})),
                     {0, -b - ln2, -ln4, -2 * b - ln2, -ln2, 0}, tol);
  const auto w = eigen_tensor<TestType>({2, 3}, TestType(1));
  CHECK(test::finite_everywhere(logsumexp_backward(logits, w)));
  CHECK(test::finite_everywhere(entropy_backward(logits, w)));
  CHECK(test::finite_everywhere(token_logprobs_backward(logits, labels, w)));
  CHECK(test::finite_everywhere(softmax_last(logits)));
  // softmax of r0 is the point mass on 0; of r1 half on 0 and 1.
  const auto p = softmax_last(logits);
  CHECK(p(0, 0, 0) == Approx(1.0));
  CHECK(p(0, 1, 1) == Approx(0.5));
  // The NLL token mean: (0 + (b + ln 2) + ln 4 + (2b + ln 2) + ln 2) / 5 counted tokens.
  for (const auto& o : sft_option_grid()) {
    INFO(describe(o));
    sft_all_finite(logits, labels, o);
  }
  test::check_value("sft mean NLL", sft_loss(logits, labels).loss, (3 * b + 3 * ln2 + ln4) / 5, tol);
  // Token accuracy: argmax r0 = 0 (hit), r1 = 0 (miss, y = 3), r2 = 0 (miss, tie broken to the first),
  // r3 = 1 (miss), r4 = 1 (hit) -> 2/5.
  test::check_value("token_accuracy", sft_loss(logits, labels).token_accuracy, 2.0 / 5, tol);
  // Exact KL between r0 and -r0 = [-b, b, b, b]: p = onehot(0), log q_0 = -b - (b + ln 3) -> KL = 2b + ln 3.
  const auto x0 = test::make<TestType>({1, 4}, {b, -b, -b, -b});
  const auto y0 = test::make<TestType>({1, 4}, {-b, b, b, b});
  test::check_value("kl_exact", kl_exact(x0, y0), 2 * b + std::log(3.0), tol);
  const auto neg = ops::neg(logits);
  CHECK(test::finite_everywhere(kl_exact(logits, neg)));
  CHECK(test::finite_everywhere(kl_exact_backward(logits, neg, w)));
}

TEMPLATE_TEST_CASE("log-ratios of ±500: every estimator and gradient", "[extreme][kl]", float, double) {
  const auto tol = test::tol_of<TestType>();
  // r = logp - ref = [-500, 500, 500, -500].
  const auto lp = test::vec<TestType>({-500, 0, -0.5, -500.25});
  const auto ref = test::vec<TestType>({0, -500, -500.5, -0.25});
  const auto ones = test::vec<TestType>({1, 1, 1, 1});
  // k1 = r, |r| = 500, ½ r² = 125000; their slopes 1, sign r, r.
  test::check_values("k1", kl_penalty(lp, ref, {.estimator = kl_estimator::k1}), {-500, 500, 500, -500}, tol);
  test::check_values("abs", kl_penalty(lp, ref, {.estimator = kl_estimator::abs}), {500, 500, 500, 500}, tol);
  test::check_values("k2", kl_penalty(lp, ref, {.estimator = kl_estimator::k2}), {125000, 125000, 125000, 125000}, tol);
  test::check_values("k1'", kl_penalty_backward(lp, ref, ones, {.estimator = kl_estimator::k1}), {1, 1, 1, 1}, tol);
  test::check_values("abs'", kl_penalty_backward(lp, ref, ones, {.estimator = kl_estimator::abs}), {-1, 1, 1, -1}, tol);
  test::check_values("k2'", kl_penalty_backward(lp, ref, ones, {.estimator = kl_estimator::k2}), {-500, 500, 500, -500},
                     tol);
  // Straight-through: gradient r = ±500 for every estimator, finite in both types.
  for (auto e : all_estimators) {
    INFO(kl_estimator_name(e));
    test::check_values("straight-through gradient",
                       kl_penalty_backward(lp, ref, ones, {.estimator = e, .straight_through = true}),
                       {-500, 500, 500, -500}, tol);
  }
  // verl's clamps: r -> ±20, k3(20) = e^-20 + 19 and k3(-20) = e^20 - 21 both clamp to 10; the gradient is 0.
  for (auto st : {false, true}) {
    auto o = kl_options::verl_low_var_kl();
    o.straight_through = st;
    test::check_values("verl k3", kl_penalty(lp, ref, o), {10, 10, 10, 10}, tol);
    CHECK(test::finite_everywhere(kl_penalty_backward(lp, ref, ones, o)));
  }
  test::check_values("verl k3'", kl_penalty_backward(lp, ref, ones, kl_options::verl_low_var_kl()), {0, 0, 0, 0}, tol);
  if constexpr (std::is_same_v<TestType, double>) {
    // In double the unclamped k3 is finite: k3(500) = e^-500 + 499 = 499; k3(-500) = e^500 - 501 = 1.4e217;
    // slopes 1 - e^{-r}: 1 - e^-500 = 1 and 1 - e^500.
    const auto k3 = kl_penalty(lp, ref);
    CHECK(test::finite_everywhere(k3));
    test::check_values("k3", k3, {std::exp(500.0) - 501, 499, 499, std::exp(500.0) - 501}, test::float64_tol);
    const auto g = kl_penalty_backward(lp, ref, ones);
    CHECK(test::finite_everywhere(g));
    test::check_values("k3'", g, {1 - std::exp(500.0), 1, 1, 1 - std::exp(500.0)}, test::float64_tol);
  } else {
    // In float32 e^500 exceeds FLT_MAX = 3.4e38 = e^88.7: unclamped k3 is +inf there (the documented
    // overflow, not a NaN), which is why float32 callers use verl's clamps above.
    const auto k3 = ops::to_host(kl_penalty(lp, ref));
    CHECK(std::isinf(k3[0]));
    CHECK(k3[1] == Approx(499.0));
  }
}

TEMPLATE_TEST_CASE("all-masked rows, a single token and V = 1", "[extreme][sft][kl][numerics]", float, double) {
  const auto tol = test::tol_of<TestType>();
  SECTION("all-masked rows") {
    // Row 1 of [2, 3, 5] is entirely ignored: every mode gives the loss of row 0 alone (seq modes
    // exclude the empty row; sum_norm still divides by B·T = 6), never NaN.
    const auto logits = test::to_eigen<TestType>(test::random_normal({2, 3, 5}, 101, 1e4));
    const eigen_index labels({2, 3}, {1, 4, 0, -100, -100, -100});
    for (const auto& o : sft_option_grid()) {
      INFO(describe(o));
      const auto r = sft_all_finite(logits, labels, o);
      const auto alone = sft_loss(
          ops::reshape(logits, {6, 5}), eigen_index({6}, {1, 4, 0, -100, -100, -100}),
          {.label_smoothing = o.label_smoothing, .z_loss = o.z_loss, .reduction = aggregation::sum, .dft = o.dft});
      const double total = ops::item(alone.loss);
      const double want = o.reduction == aggregation::token_mean                ? total / 3
                          : o.reduction == aggregation::seq_mean_token_sum      ? total
                          : o.reduction == aggregation::seq_mean_token_mean     ? total / 3
                          : o.reduction == aggregation::seq_mean_token_sum_norm ? total / 6
                                                                                : total;
      test::check_value("loss", r.loss, want, tol);
    }
    // Masked reductions over a [2, 3] value tensor whose second row is masked out, and a fully masked one.
    const auto x = test::make<TestType>({2, 3}, {1, 2, 3, 4, 5, 6});
    for (const auto& m : {test::make<TestType>({2, 3}, {1, 1, 0, 0, 0, 0}), eigen_tensor<TestType>({2, 3})}) {
      for (const auto& y : {masked_mean(x, m, 1), masked_var(x, m, true, 1), masked_sum(x, m, 1), masked_whiten(x, m)})
        CHECK(test::finite_everywhere(y));
      for (auto mode : all_modes) {
        CHECK(test::finite_everywhere(aggregate(x, m, mode)));
        CHECK(test::finite_everywhere(aggregation_weights(m, mode)));
      }
    }
  }
  SECTION("a single token") {
    // logits [1, 1, 3] = [0, ln 2, ln 3] (p = [1/6, 1/3, 1/2]), label 2: NLL ln 2 under every
    // reduction (one token, one sequence, B·T = 1).
    const auto logits = test::make<TestType>({1, 1, 3}, {0, ln2, std::log(3.0)});
    const eigen_index labels({1, 1}, {2});
    for (auto mode : all_modes) {
      INFO(aggregation_name(mode));
      test::check_value("loss", sft_all_finite(logits, labels, {.reduction = mode}).loss, ln2, tol);
      test::check_values("grad", sft_loss_backward(logits, labels, {.reduction = mode}), {1. / 6, 1. / 3, -0.5}, tol);
    }
    // A single token as rank-1 logits [V] with a 0-d label.
    const auto row = test::make<TestType>({3}, {0, ln2, std::log(3.0)});
    const eigen_index label(shape_t{}, {2});
    test::check_value("rank-1 sft", sft_all_finite(row, label, {}).loss, ln2, tol);
    // One log-ratio: k3(ln 2) = ln 2 - 1/2.
    test::check_value("k3", kl_penalty(test::vec<TestType>({std::log(0.5)}), test::vec<TestType>({std::log(0.25)})),
                      ln2 - 0.5, tol);
  }
  SECTION("V = 1") {
    // One class: p = 1, so logsumexp = x, log p = 0, H = 0, cross-entropy 0 (label smoothing's
    // mean_v(-log p_v) is 0 too) and its gradient 0; z-loss leaves z·x² with gradient 2 z x.
    const auto logits = test::make<TestType>({2, 2, 1}, {3, -1e4, 1e4, 0.5});
    const eigen_index labels({2, 2}, {0, 0, 0, -100});
    test::check_values("logsumexp", logsumexp(logits), {3, -1e4, 1e4, 0.5}, tol);
    test::check_values("token_logprobs", token_logprobs(logits, labels), {0, 0, 0, 0}, tol);
    test::check_values("entropy", entropy(logits), {0, 0, 0, 0}, tol);
    test::check_values("kl_exact", kl_exact(logits, ops::neg(logits)), {0, 0, 0, 0}, tol);
    const auto w = eigen_tensor<TestType>({2, 2}, TestType(1));
    test::check_values("kl_exact'", kl_exact_backward(logits, ops::neg(logits), w), {0, 0, 0, 0}, tol);
    test::check_values("entropy'", entropy_backward(logits, w), {0, 0, 0, 0}, tol);
    for (const auto& o : sft_option_grid()) {
      INFO(describe(o));
      const auto r = sft_all_finite(logits, labels, o);
      test::check_values("per-token", r.per_token_loss, {o.z_loss * 9, o.z_loss * 1e8, o.z_loss * 1e8, 0}, tol);
      test::check_value("entropy metric", r.entropy, 0.0, tol);
      test::check_value("accuracy", r.token_accuracy, 1.0, tol);
    }
    const sft_options z{.z_loss = 1e-4, .reduction = aggregation::sum};
    test::check_values("z-loss gradient", sft_loss_backward(logits, labels, z), {2e-4 * 3, 2e-4 * -1e4, 2e-4 * 1e4, 0},
                       tol);
  }
}

TEMPLATE_TEST_CASE("V = 50000: closed forms on a few rows", "[extreme][numerics][sft]", float, double) {
  const auto tol = test::tol_of<TestType>();
  const std::int64_t v = 50000;
  // Row 0 uniform at c = 2: lse c + ln V, H = ln V, log p = -ln V. Row 1 a spike of 1e4 at column 777 over
  // zeros: lse 1e4 (+ 49999 e^-1e4 = 0), H 0, log p[777] = 0.
  eigen_tensor<TestType> logits({2, v}, TestType(0));
  for (std::int64_t k = 0; k < v; ++k) logits(0, k) = 2;
  logits(1, 777) = 1e4;
  const eigen_index labels({2}, {123, 777});
  const double lv = std::log(static_cast<double>(v));
  test::check_values("logsumexp", logsumexp(logits), {2 + lv, 1e4}, tol);
  test::check_values("entropy", entropy(logits), {lv, 0}, tol);
  test::check_values("token_logprobs", token_logprobs(logits, labels), {-lv, 0}, tol);
  // The NLL alone is (ln V + 0) / 2. (Gradients at V = 50000 are checked finite in the float32-vs-float64
  // case below; each pass over [2, 50000] costs ~0.1 s in a Debug build.)
  const auto r = sft_loss(logits, labels);
  test::check_value("sft", r.loss, lv / 2, tol);
  test::check_value("sft entropy metric", r.entropy, lv / 2, tol);
  CHECK(test::finite_everywhere(entropy_backward(logits, eigen_tensor<TestType>({2}, TestType(1)))));
}

TEST_CASE("float32 agrees with float64 on random inputs over shapes, seeds and masks", "[extreme][float32]") {
  const auto tol = test::float32_tol;
  const shape_t shapes[] = {{1, 1, 3}, {2, 5, 7}, {3, 4, 33}};
  for (const auto& s : shapes)
    for (std::uint64_t seed : {1u, 2u, 3u}) {
      const shape_t tokens{s[0], s[1]};
      const auto hl = rounded_to_float(test::random_normal(s, seed, 2.0));
      const auto hr = rounded_to_float(test::random_normal(s, seed + 50, 2.0));
      const auto hlp = rounded_to_float(test::random_normal(tokens, seed + 60, 1.0, -2.0));
      const auto href = rounded_to_float(test::random_normal(tokens, seed + 70, 1.0, -2.0));
      const auto hw = rounded_to_float(test::random_normal(tokens, seed + 80));
      // Masks: random, and with the first row fully masked (ignored).
      for (bool empty_row : {false, true}) {
        auto lab = test::random_labels(tokens, s.back(), seed + 90, 0.3);
        auto hm = test::random_mask(tokens, seed + 95);
        if (empty_row)
          for (std::int64_t t = 0; t < s[1]; ++t) lab.values[t] = -100, hm.values[t] = 0;
        const auto labels = test::to_eigen(lab);
        INFO("shape " << detail::shape_string(s) << ", seed " << seed << (empty_row ? ", empty row" : ""));
        const auto xf = test::to_eigen<float>(hl);
        const auto xd = test::to_eigen<double>(hl);
        const auto yf = test::to_eigen<float>(hr);
        const auto yd = test::to_eigen<double>(hr);
        const auto lpf = test::to_eigen<float>(hlp);
        const auto lpd = test::to_eigen<double>(hlp);
        const auto rf = test::to_eigen<float>(href);
        const auto rd = test::to_eigen<double>(href);
        const auto wf = test::to_eigen<float>(hw);
        const auto wd = test::to_eigen<double>(hw);
        const auto mf = test::to_eigen<float>(hm);
        const auto md = test::to_eigen<double>(hm);

        test::check_same("logsumexp", logsumexp(xf), logsumexp(xd), tol);
        test::check_same("entropy", entropy(xf), entropy(xd), tol);
        test::check_same("token_logprobs", token_logprobs(xf, labels), token_logprobs(xd, labels), tol);
        test::check_same("logsumexp'", logsumexp_backward(xf, wf), logsumexp_backward(xd, wd), tol);
        test::check_same("entropy'", entropy_backward(xf, wf), entropy_backward(xd, wd), tol);
        test::check_same("token_logprobs'", token_logprobs_backward(xf, labels, wf),
                         token_logprobs_backward(xd, labels, wd), tol);
        test::check_same("kl_exact", kl_exact(xf, yf), kl_exact(xd, yd), tol);
        test::check_same("kl_exact'", kl_exact_backward(xf, yf, wf), kl_exact_backward(xd, yd, wd), tol);
        // A third of the option grid per input (rotating with the seed), so every option meets several inputs.
        const auto grid = sft_option_grid();
        for (std::size_t i = seed % 3; i < grid.size(); i += 3) {
          const auto& o = grid[i];
          INFO(describe(o));
          const auto a = sft_loss(xf, labels, o);
          const auto b = sft_loss(xd, labels, o);
          test::check_same("sft loss", a.loss, b.loss, tol);
          test::check_same("sft per-token", a.per_token_loss, b.per_token_loss, tol);
          test::check_same("sft accuracy", a.token_accuracy, b.token_accuracy, tol);
          test::check_same("sft entropy", a.entropy, b.entropy, tol);
          test::check_same("sft'", sft_loss_backward(xf, labels, o), sft_loss_backward(xd, labels, o), tol);
        }
        for (auto e : all_estimators)
          for (bool clamps : {false, true}) {
            kl_options o{.estimator = e};
            if (clamps) o.log_ratio_clamp = 20.0, o.value_clamp = 10.0;
            INFO(kl_estimator_name(e) << (clamps ? " with clamps" : ""));
            test::check_same("kl_penalty", kl_penalty(lpf, rf, o), kl_penalty(lpd, rd, o), tol);
            test::check_same("kl_penalty'", kl_penalty_backward(lpf, rf, wf, o), kl_penalty_backward(lpd, rd, wd, o),
                             tol);
          }
        test::check_same("masked_mean", masked_mean(wf, mf), masked_mean(wd, md), tol);
        test::check_same("masked_var", masked_var(wf, mf, true, 1), masked_var(wd, md, true, 1), tol);
        test::check_same("masked_whiten", masked_whiten(wf, mf), masked_whiten(wd, md), tol);
        for (auto mode : all_modes) {
          INFO(aggregation_name(mode));
          test::check_same("aggregate", aggregate(wf, mf, mode), aggregate(wd, md, mode), tol);
        }
      }
    }
}

TEST_CASE("float32 agrees with float64 at V = 50000", "[extreme][float32]") {
  // One row of random logits (std 3) over a 50k vocabulary (Debug builds make every pass over it costly),
  // with every SFT term on; values and gradients finite in both types and within float32_tol.
  const auto h = rounded_to_float(test::random_normal({1, 50000}, 121, 3.0));
  const auto xf = test::to_eigen<float>(h);
  const auto xd = test::to_eigen<double>(h);
  const eigen_index labels({1}, {31337});
  const auto tol = test::float32_tol;
  test::check_same("logsumexp", logsumexp(xf), logsumexp(xd), tol);
  test::check_same("entropy", entropy(xf), entropy(xd), tol);
  test::check_same("token_logprobs", token_logprobs(xf, labels), token_logprobs(xd, labels), tol);
  const sft_options o{.label_smoothing = 0.1, .z_loss = 1e-4, .dft = true};
  const auto gf = sft_loss_backward(xf, labels, o);
  const auto gd = sft_loss_backward(xd, labels, o);
  CHECK(test::finite_everywhere(gf));
  CHECK(test::finite_everywhere(gd));
  test::check_same("sft loss", sft_loss(xf, labels, o).loss, sft_loss(xd, labels, o).loss, tol);
  test::check_same("sft'", gf, gd, tol);
}

}  // namespace test_extremes
