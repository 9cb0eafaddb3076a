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

namespace test_reliability {  // one namespace per test file: the unity build compiles several in one TU

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

// ----------------------------------------------------------------------------------------------
// defect 3: NaN / Inf at a masked-out or ignored position reaches no metric, loss or gradient
// (selected with where, not multiplied by the mask).

TEMPLATE_TEST_CASE("sft_loss: NaN logits on an ignored row reach no metric, loss or gradient", "[issue13][sft]", float,
                   double) {
  const auto tol = test::tol_of<TestType>();
  // Rows: uniform over 4 (label 0), [0, 1, 0, 0] (label 1), NaN everywhere (ignored).
  const auto logits = test::make<TestType>({3, 4}, {0, 0, 0, 0, 0, 1, 0, 0, qnan, qnan, qnan, qnan});
  const eigen_index labels({3}, {0, 1, -100});
  const double e = std::exp(1.0), lse1 = std::log(3.0 + e);
  // NLL: log 4 and lse1 - 1; entropy H = lse - Σ p x: log 4 and lse1 - e/(3 + e); both argmaxes hit.
  const auto r = sft_loss(logits, labels);
  test::check_value("loss", r.loss, (std::log(4.0) + lse1 - 1.0) / 2.0, tol);
  test::check_value("entropy", r.entropy, (std::log(4.0) + lse1 - e / (3.0 + e)) / 2.0, tol);
  test::check_value("token_accuracy", r.token_accuracy, 1.0, tol);
  test::check_value("num_tokens", r.num_tokens, 2.0, tol);
  test::check_values("per_token_loss", r.per_token_loss, {std::log(4.0), lse1 - 1.0, 0.0}, tol);
  // Gradient: (softmax - onehot) / 2 on the counted rows, exactly 0 on the ignored one.
  const double p1 = 1.0 / (3.0 + e), pe = e / (3.0 + e);
  test::check_values("grad", sft_loss_backward(logits, labels),
                     {-0.375, 0.125, 0.125, 0.125, p1 / 2, (pe - 1.0) / 2, p1 / 2, p1 / 2, 0, 0, 0, 0}, tol);
}

TEMPLATE_TEST_CASE("token_logprobs_backward: NaN logits on an ignored row give a zero gradient row",
                   "[issue13][logits]", float, double) {
  const auto tol = test::tol_of<TestType>();
  const auto logits = test::make<TestType>({2, 3}, {0, 0, 0, qnan, qnan, qnan});
  const eigen_index labels({2}, {2, -100});
  // d log p[2] / dx = onehot(2) - softmax = [-1/3, -1/3, 2/3]; the ignored row is 0 by definition.
  test::check_values("grad", token_logprobs_backward(logits, labels, test::vec<TestType>({1, 1})),
                     {-1.0 / 3, -1.0 / 3, 2.0 / 3, 0, 0, 0}, tol);
}

TEST_CASE("entropy_bonus_backward: NaN logits at a masked token give a zero gradient row", "[issue13][value]") {
  // Token 0: logits [0, log 3], p = [1/4, 3/4], H = log 4 - (3/4) log 3, dH/dx_v = -p_v (log p_v + H)
  // = [(3/16) log 3, -(3/16) log 3]; token_mean over one token: weight 1. Token 1 is masked (NaN logits).
  const auto logits = test::make<double>({1, 2, 2}, {0, std::log(3.0), qnan, qnan});
  const auto m = test::make<double>({1, 2}, {1, 0});
  const double g = 3.0 / 16.0 * std::log(3.0);
  test::check_value("entropy_bonus", entropy_bonus(logits, m), std::log(4.0) - 0.75 * std::log(3.0), test::float64_tol);
  test::check_values("entropy_bonus_backward", entropy_bonus_backward(logits, m), {g, -g, 0, 0}, test::float64_tol);
}

TEST_CASE("kto: an undesirable example with log-probability -inf leaves the desirable metrics finite",
          "[issue13][kto]") {
  const auto tol = test::float64_tol;
  // Row 0 desirable, l = -1 - (-2) = 1; row 1 undesirable, l = -inf (its loss term 1 - σ(+inf) = 0).
  const unpaired_batch<eigen_tensor<double>> b{
      .logps = test::vec({-1.0, -inf}), .ref_logps = test::vec({-2.0, -3.0}), .desirable = test::vec({1.0, 0.0})};
  const auto r = kto(b, {.beta = 0.1, .loss = kto_loss::apo_zero_unpaired});
  // apo_zero_unpaired: L_D = 1 - σ(βl) = 1 - σ(0.1), L_U = σ(-inf) = 0; mean over 2 rows.
  test::check_value("loss", r.loss, (1.0 - 1.0 / (1.0 + std::exp(-0.1))) / 2.0, tol);
  test::check_value("rewards_chosen", r.rewards_chosen, 0.1, tol);
  test::check_value("logps_chosen", r.logps_chosen, -1.0, tol);
  CHECK(ops::item(r.rewards_rejected) == -inf);
}

TEST_CASE("group advantages: a non-finite score in one group does not reach another", "[issue13][group]") {
  const auto tol = test::float64_tol;
  // Group 0 = {1, 3}: mean 2, unbiased std √2. Group 1 = {+inf} is a singleton (advantage 0 by policy).
  const auto s = test::vec({1.0, 3.0, inf});
  const auto id = ids({0, 0, 1});
  const double a = 1.0 / (std::sqrt(2.0) + 1e-4);
  test::check_values("grpo", grpo_advantages(s, id).advantages, {-a, a, 0.0}, tol);
  test::check_values("rloo", rloo_advantages(s, id), {-2.0, 2.0, 0.0}, tol);
  test::check_values("gpg", gpg_advantages(s, id), {-1.0, 1.0, 0.0}, tol);
}

TEST_CASE("discounted_returns: a NaN reward at a masked position does not flow to kept tokens", "[issue13][returns]") {
  // γ = 1: G = [1 + 2, 2, masked] = [3, 2, 0]; the masked token resets the running return.
  const auto r = test::make<double>({1, 3}, {1, 2, qnan});
  const auto m = test::make<double>({1, 3}, {1, 1, 0});
  test::check_values("returns", discounted_returns(r, m), {3, 2, 0}, test::float64_tol);
}

// ----------------------------------------------------------------------------------------------
// defect 6: group centering is exact in float32 (identical rewards give 0) and matches a double reference.

TEST_CASE("float32 group centering: identical rewards give exactly 0, others match a double reference",
          "[issue13][group]") {
  // 1e6 + 0.1 rounds to a float f; three copies must centre to exactly 0 and have std exactly 0.
  const float f = 1e6f + 0.1f;
  const eigen_tensor<float> same({3}, {f, f, f});
  const auto g = ids({0, 0, 0});
  const group_options formula{.all_equal = all_equal_policy::formula};
  for (auto scale : {group_scale::group, group_scale::batch, group_scale::none}) {
    group_options o = formula;
    o.scale = scale;
    const auto r = grpo_advantages(same, g, o);
    for (double v : ops::to_host(r.advantages)) CHECK(v == 0.0);
    for (double v : ops::to_host(r.group_mean)) CHECK(v == static_cast<double>(f));
    for (double v : ops::to_host(r.group_std)) CHECK(v == 0.0);
  }
  for (double v : ops::to_host(rloo_advantages(same, g))) CHECK(v == 0.0);
  for (double v : ops::to_host(gpg_advantages(same, g))) CHECK(v == 0.0);
  const eigen_tensor<float> lens({3, 2}, {1, 1, 1, 0, 1, 1});
  for (double v : ops::to_host(opo_advantages(same, lens, g))) CHECK(v == 0.0);

  // Distinct float32 rewards near 1e6 (exactly representable: multiples of 1/16) against double.
  const std::vector<double> v0{1000000.125, 1000000.5, 1000000.25}, v1{999999.0, 999999.5, 1000001.0};
  const eigen_tensor<float> s({6}, {1000000.125f, 1000000.5f, 1000000.25f, 999999.0f, 999999.5f, 1000001.0f});
  const auto id = ids({0, 0, 0, 1, 1, 1});
  std::vector<double> all = v0;
  all.insert(all.end(), v1.begin(), v1.end());
  const double batch_std = unbiased_moments(all).std;
  std::vector<double> want_grpo, want_batch, want_rloo, want_mean, want_std;
  for (const auto* v : {&v0, &v1}) {
    const moments mo = unbiased_moments(*v);
    double total = 0;
    for (double x : *v) total += x;
    for (double x : *v) {
      want_grpo.push_back((x - mo.mean) / (mo.std + 1e-4));
      want_batch.push_back((x - mo.mean) / (batch_std + 1e-4));
      want_rloo.push_back(x - (total - x) / 2.0);
      want_mean.push_back(mo.mean);
      want_std.push_back(mo.std);
    }
  }
  const auto r = grpo_advantages(s, id);
  test::check_values("grpo advantages", r.advantages, want_grpo, test::float32_tol);
  test::check_values("group_mean", r.group_mean, want_mean, test::float32_tol);
  test::check_values("group_std", r.group_std, want_std, test::float32_tol);
  test::check_values("rloo", rloo_advantages(s, id), want_rloo, test::float32_tol);
  test::check_values("grpo, batch std", grpo_advantages(s, id, {.scale = group_scale::batch}).advantages, want_batch,
                     test::float32_tol);
}

// ----------------------------------------------------------------------------------------------
// defect 1: a log-ratio past exp's range (+100 in float32, +710 in float64) without a clamp: every finite
// loss has a finite gradient, and a clipped token contributes an exact 0.

namespace {
/// log ρ large enough that exp overflows in S.
template <class S>
constexpr double overflowing_log_ratio() {
  return std::is_same_v<S, float> ? 100.0 : 710.0;
}

/// The finite-loss => finite-gradient invariant, and the exact zero on tokens 1 and 2 (clipped / A = 0).
template <tensor T>
void check_overflow_gradient(const std::string& what, const T& loss, const T& grad) {
  INFO(what);
  REQUIRE(std::isfinite(ops::item(loss)));
  REQUIRE(test::finite_everywhere(grad));
  const auto g = ops::to_host(grad);
  CHECK(g.at(1) == 0.0);
  CHECK(g.at(2) == 0.0);
}
}  // namespace

TEMPLATE_TEST_CASE("PPO-family surrogates at an overflowing log-ratio: finite gradient, exact zeros when clipped",
                   "[issue13][ppo]", float, double) {
  using T = eigen_tensor<TestType>;
  const auto tol = test::tol_of<TestType>();
  const double L = overflowing_log_ratio<TestType>();
  REQUIRE(std::isinf(static_cast<TestType>(std::exp(L))));
  // Tokens: (log ρ, A) = (0.1, 1) inside the clip range; (L, 1) clipped above; (L, 0); (-0.05, -1) inside.
  const std::vector<double> lr{0.1, L, L, -0.05}, adv{1, 1, 0, -1};
  const T lp = test::make<TestType>({1, 4}, {-1, -1, -1, -1});
  const T old = test::make<TestType>({1, 4}, {-1 - lr[0], -1 - lr[1], -1 - lr[2], -1 - lr[3]});
  const T A = test::make<TestType>({1, 4}, adv);
  const T m = test::make<TestType>({1, 4}, {1, 1, 1, 1});
  const double r0 = std::exp(0.1), r3 = std::exp(-0.05);

  // PPO eq. 7, token-mean over 4 tokens: L = [-ρ0, -1.2, 0, ρ3] / 4, dL/dlog ρ = [-ρ0, 0, 0, ρ3] / 4.
  const auto p = ppo_policy_loss(lp, old, A, m);
  test::check_value("ppo loss", p.loss, (-r0 - 1.2 + r3) / 4.0, tol);
  const T gp = ppo_policy_loss_backward(lp, old, A, m);
  check_overflow_gradient("ppo", p.loss, gp);
  test::check_values("ppo grad", gp, {-r0 / 4, 0, 0, r3 / 4}, tol);

  // Dual-clip (Ye et al. eq. 5, c = 3) with a fourth token (L, -1): min(+inf, 3·1) = 3, gradient 0.
  const T A2 = test::make<TestType>({1, 4}, {1, 1, 0, -1});
  const T old2 = test::make<TestType>({1, 4}, {-1 - lr[0], -1 - L, -1 - L, -1 - L});
  const ppo_options dual{.clip = {.clip_c = 3.0}};
  const auto pd = ppo_policy_loss(lp, old2, A2, m, dual);
  test::check_value("dual-clip loss", pd.loss, (-r0 - 1.2 + 0 + 3.0) / 4.0, tol);
  const T gd = ppo_policy_loss_backward(lp, old2, A2, m, dual);
  check_overflow_gradient("dual-clip", pd.loss, gd);
  test::check_values("dual-clip grad", gd, {-r0 / 4, 0, 0, 0}, tol);
  // TRL's δ = 2 bounds the unclipped branch: the same fourth token gives min(ρ, 2) = 2, gradient 0.
  const ppo_options delta{.clip = clip_options::trl(0.2, std::nullopt, 2.0)};
  const auto pl = ppo_policy_loss(lp, old2, A2, m, delta);
  test::check_value("delta loss", pl.loss, (-r0 - 1.2 + 0 + 2.0) / 4.0, tol);
  check_overflow_gradient("delta", pl.loss, ppo_policy_loss_backward(lp, old2, A2, m, delta));

  // GRPO presets and SAPO through grpo_loss: every finite loss has a finite gradient with zeros at tokens 1, 2.
  const grpo_batch<T> gb{.logprobs = lp, .advantages = A, .response_mask = m, .old_logprobs = old};
  for (auto type : {grpo_loss_type::grpo, grpo_loss_type::dapo, grpo_loss_type::dr_grpo, grpo_loss_type::bnpo,
                    grpo_loss_type::sapo, grpo_loss_type::luspo}) {
    const grpo_options o{.loss_type = type};
    check_overflow_gradient(grpo_loss_type_name(type), grpo_loss(gb, o).loss, grpo_loss_backward(gb, o));
  }
  // SAPO eq. 5 closed form: f(ρ) = 4σ(τ(ρ - 1))/τ; token-mean (TRL's sapo aggregation) of -A·f.
  const auto sig = [](double x) { return 1.0 / (1.0 + std::exp(-x)); };
  const double s0 = sig(r0 - 1.0), s3 = sig(1.05 * (r3 - 1.0));
  const grpo_options sapo{.loss_type = grpo_loss_type::sapo};
  test::check_value("sapo loss", grpo_loss(gb, sapo).loss, (-4.0 * s0 - 4.0 + 0.0 + 4.0 * s3 / 1.05) / 4.0, tol);
  test::check_values("sapo grad", grpo_loss_backward(gb, sapo),
                     {-4 * s0 * (1 - s0) * r0 / 4, 0, 0, 4 * s3 * (1 - s3) * r3 / 4}, tol);

  // Clip-Cov and KL-Cov (verl): clip_cov is PPO's surrogate with a selection; kl_cov has no clip, so its
  // overflowing token must have A = 0 for the loss to be finite: A = [1, 0, 0, -1].
  const policy_batch<T> pb{.logprobs = lp, .advantages = A, .response_mask = m, .old_logprobs = old};
  const policy_variant_options cc{.variant = policy_variant::clip_cov, .clip_cov_ratio = 0.5};
  check_overflow_gradient("clip_cov", policy_variant_loss(pb, cc).loss, policy_variant_loss_backward(pb, cc));
  const policy_batch<T> pk{.logprobs = lp,
                           .advantages = test::make<TestType>({1, 4}, {1, 0, 0, -1}),
                           .response_mask = m,
                           .old_logprobs = old};
  for (auto v : {policy_variant::kl_cov, policy_variant::ppo, policy_variant::sapo, policy_variant::gspo}) {
    const policy_variant_options o{.variant = v};
    INFO("variant " << static_cast<int>(v));
    const auto r = policy_variant_loss(pk, o);
    if (v == policy_variant::gspo) continue;  // one sequence ratio exp(mean log ρ): also overflows, A·ρ rowwide
    check_overflow_gradient("variant", r.loss, policy_variant_loss_backward(pk, o));
  }
}

// ----------------------------------------------------------------------------------------------
// defect 2: float32 distillation with logits near ±3e38 (a row whose max - min overflows float32).

TEST_CASE("float32 distillation at logits of ±3e38: no NaN, the double value where float32 can hold it",
          "[issue13][distill]") {
  const double big = 3e38;
  // Rows (student | teacher), V = 4:
  //  0: one column dominates both sides: p = q = one-hot, every divergence 0, gradient 0.
  //  1: two tied dominant columns on both sides: p = q = (½, ½, 0, 0), every divergence 0.
  //  2: ordinary logits (a reference away from the extremes).
  //  3: the dominant columns differ: p = one-hot(1), q = one-hot(0). KL(p||q) = -log q_1 = 6e38, past
  //     float32's range (+inf is its honest value), while the β-JSD stays finite (m covers both).
  const std::vector<double> s{big, -big, 0, 1, big, big, -big, -big, 0.5, -1, 2, 0, big, -big, 0, 0};
  const std::vector<double> t{big, -big, 1, 0, big, big, -big, -big, 1, 0, -0.5, 0.2, -big, big, 0, 0};
  const auto s32 = test::make<float>({4, 4}, s), t32 = test::make<float>({4, 4}, t);
  const auto s64 = test::make<double>({4, 4}, s), t64 = test::make<double>({4, 4}, t);
  const auto g32 = test::make<float>({4}, {1, 1, 1, 1});
  const auto g64 = test::make<double>({4}, {1, 1, 1, 1});
  const std::pair<std::string, divergence_options> modes[] = {
      {"forward_kl", {.divergence = kd_divergence::forward_kl}},
      {"forward_cross_entropy", {.divergence = kd_divergence::forward_cross_entropy}},
      {"reverse_kl", {.divergence = kd_divergence::reverse_kl}},
      {"symmetric_kl", {.divergence = kd_divergence::symmetric_kl, .symmetric_ratio = 0.3}},
      {"jsd beta=0.5", {.divergence = kd_divergence::jsd, .beta = 0.5}},
      {"jsd beta=0", {.divergence = kd_divergence::jsd, .beta = 0.0}},
      {"jsd beta=1", {.divergence = kd_divergence::jsd, .beta = 1.0}}};
  for (const auto& [name, o] : modes)
    for (bool fused : {true, false}) {
      INFO(name << (fused ? " (fused hooks)" : " (generic composition)"));
      const auto v32 = ops::to_host(fused ? kd_per_token(s32, t32, o) : generic::kd_per_token(s32, t32, o));
      const auto d32 = ops::to_host(fused ? kd_per_token_backward(s32, t32, g32, o)
                                          : generic::kd_per_token_backward(s32, t32, g32, o));
      const auto v64 = ops::to_host(generic::kd_per_token(s64, t64, o));
      const auto d64 = ops::to_host(generic::kd_per_token_backward(s64, t64, g64, o));
      for (std::size_t r = 0; r < 4; ++r) {
        INFO("row " << r << ": float32 " << v32[r] << ", float64 " << v64[r]);
        CHECK_FALSE(std::isnan(v32[r]));
        REQUIRE_FALSE(std::isnan(v64[r]));
        if (std::abs(v64[r]) < 1e30)
          CHECK(std::abs(v32[r] - v64[r]) <= 1e-6 + 1e-5 * std::abs(v64[r]));
        else
          CHECK(v32[r] == inf);
        for (std::size_t c = 0; c < 4; ++c) {
          const double g = d32[r * 4 + c], w = d64[r * 4 + c];
          INFO("gradient column " << c << ": float32 " << g << ", float64 " << w);
          if (!std::isfinite(v32[r])) continue;  // the gradient of an infinite divergence is not defined
          CHECK(std::isfinite(g));
          CHECK(std::abs(g - w) <= 1e-6 + 1e-5 * std::abs(w));
        }
      }
      // The closed forms: p = q on rows 0 and 1, so every divergence is 0 there but -Σ p log q = H(p), which
      // is log 2 on row 1; row 3's β-JSD is β log(1/β) + (1 - β) log(1/(1 - β)) (p and q disjoint).
      const bool ce = name == "forward_cross_entropy";
      CHECK(std::abs(v32[0]) <= 1e-6);
      CHECK(std::abs(v32[1] - (ce ? std::log(2.0) : 0.0)) <= 1e-6);
      if (name == "jsd beta=0.5") CHECK(std::abs(v32[3] - std::log(2.0)) <= 1e-6);
    }
}

TEST_CASE("float32 logits of ±3e38 in one row: log-probs, entropy and their gradients stay finite",
          "[issue13][logits]") {
  const double big = 3e38, l2 = std::log(2.0);
  // Row 0: one dominant column (p = one-hot(0)); row 1: two tied dominant columns (p = (½, ½, 0, 0)).
  const auto x = test::make<float>({2, 4}, {big, -big, 0, 1, big, big, -big, 0});
  const eigen_index y({2}, {0, 1});
  const auto ones = test::make<float>({2}, {1, 1});
  const auto tol = test::float32_tol;
  test::check_values("token_logprobs", token_logprobs(x, y), {0, -l2}, tol);
  test::check_values("entropy", entropy(x), {0, l2}, tol);
  test::check_values("generic entropy", generic::entropy_last(x), {0, l2}, tol);
  // dH/dx = -p (log p + H): 0 on both rows (p = 0 or log p = -H on the support).
  test::check_values("entropy_backward", entropy_backward(x, ones), std::vector<double>(8, 0.0), tol);
  // d log p_y/dx = onehot - p.
  test::check_values("token_logprobs_backward", token_logprobs_backward(x, y, ones), {0, 0, 0, 0, -0.5, 0.5, 0, 0},
                     tol);
  const auto r = sft_loss(x, y);
  test::check_value("sft loss", r.loss, l2 / 2, tol);
  test::check_value("sft entropy", r.entropy, l2 / 2, tol);
  test::check_values("sft grad", sft_loss_backward(x, y), {0, 0, 0, 0, 0.25, -0.25, 0, 0}, tol);
}

// ----------------------------------------------------------------------------------------------
// defect 7: eigen_tensor<float> sums accumulate in double.

TEST_CASE("eigen_tensor<float> sums are the float32 rounding of the exact sum, not a sequential float sum",
          "[issue13][eigen]") {
  // 2e6 copies of 0.1f: the exact sum is 2e6 · double(0.1f); a sequential float32 sum is off by ~1e-2 relative.
  const std::int64_t n = 2000000;
  const eigen_tensor<float> x({n}, 0.1f);
  const double exact = static_cast<double>(n) * static_cast<double>(0.1f);
  CHECK(ops::item(ops::sum_all(x)) == static_cast<double>(static_cast<float>(exact)));
  CHECK(ops::to_host(ops::cumsum(x, 0)).back() == static_cast<double>(static_cast<float>(exact)));
  // SFT over 2e5 tokens of uniform logits over V = 2: every per-token loss is float(log 2); their mean is that.
  const std::int64_t rows = 200000;
  const eigen_tensor<float> logits({rows, 2}, 0.0f);
  const eigen_index labels({rows}, std::vector<std::int64_t>(static_cast<std::size_t>(rows), 1));
  const double per_token = static_cast<double>(static_cast<float>(std::log(2.0)));
  const double loss = ops::item(sft_loss(logits, labels).loss);
  CHECK(std::abs(loss - per_token) <= 1e-7 * per_token);
}

// ----------------------------------------------------------------------------------------------
// defect 8: group ids are any non-negative integers; they are renumbered, not used as dense indices.

TEST_CASE("group ids of 1e7 and 2^40 give the same advantages as dense ids, without a huge one-hot",
          "[issue13][group]") {
  const auto s = test::vec({1.0, 3.0, 0.5, 2.5, 7.0, 4.0});
  const std::int64_t big = std::int64_t{1} << 40;
  const auto sparse = ids({10000000, 10000000, big, big, 5, 10000000});
  const auto dense = ids({1, 1, 2, 2, 0, 1});  // the ascending renumbering of the ids above
  const auto tol = test::float64_tol;
  test::check_same("grpo", grpo_advantages(s, sparse).advantages, grpo_advantages(s, dense).advantages, tol);
  test::check_same("group_mean", grpo_advantages(s, sparse).group_mean, grpo_advantages(s, dense).group_mean, tol);
  test::check_same("rloo", rloo_advantages(s, sparse), rloo_advantages(s, dense), tol);
  test::check_same("gpg", gpg_advantages(s, sparse), gpg_advantages(s, dense), tol);
  // Independently: group {1, 3, 4} has mean 8/3 and unbiased std sqrt(13/3); {0.5, 2.5}: ±1/sqrt(2)... / (std + ε).
  const double m0 = 8.0 / 3.0, sd0 = std::sqrt(((1 - m0) * (1 - m0) + (3 - m0) * (3 - m0) + (4 - m0) * (4 - m0)) / 2);
  const double sd1 = std::sqrt(2.0);
  test::check_values("grpo closed form", grpo_advantages(s, sparse).advantages,
                     {(1 - m0) / (sd0 + 1e-4), (3 - m0) / (sd0 + 1e-4), -1 / (sd1 + 1e-4), 1 / (sd1 + 1e-4), 0.0,
                      (4 - m0) / (sd0 + 1e-4)},
                     tol);
  // Ids that are a permutation of 0 .. G-1 with gaps filled are kept as they are (no renumbering needed).
  test::check_same("dense ids", grpo_advantages(s, ids({2, 2, 0, 0, 1, 2})).advantages,
                   grpo_advantages(s, ids({1, 1, 0, 0, 2, 1})).advantages, tol);
}

}  // namespace test_reliability
