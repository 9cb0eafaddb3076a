// RL losses on the Eigen backend:
//  * PPO clipped surrogate: torchtune test_ppo_loss vectors (with the corrected low/unclipped values,
//    feature-anchors D2), clip-higher reducing to PPO when clip_low = clip_high, dual-clip, TRL's delta and
//    the log-ratio clamp by hand, metrics (clip ratios, verl pg_clipfrac(_lower), k1 and TRL's ½ dlogp²),
//  * value loss by hand (PPO2 convention, factor ½) and its clipfrac,
//  * GRPO presets grpo / bnpo / dr_grpo / dapo by hand (TRL GRPOTrainer normalisers), β·k3 and TRL's bias-corrected
//    k3·ρ, equivalence of grpo_loss(bnpo) with ppo_policy_loss,
//  * every backward against central finite differences (every option, every aggregation mode, empty rows),
//  * aggregation invariance: micro-batch sums with the global normaliser equal the whole batch (loss and gradient),
//  * KL controllers (Ziegler et al. 2019) by hand,
//  * errors naming the argument.
#include <catch2/catch.hpp>
#include <cmath>
#include <vector>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/posttrain.hpp"
#include "support/data.hpp"
#include "support/eigen_checks.hpp"
#include "support/finite_difference.hpp"

namespace test_rl_ppo {  // one namespace per test file: the unity build compiles several in one TU

using namespace posttrain;
using Catch::Contains;

namespace {
using E = eigen_tensor<double>;
constexpr aggregation all_modes[] = {aggregation::token_mean, aggregation::seq_mean_token_sum,
                                     aggregation::seq_mean_token_mean, aggregation::seq_mean_token_sum_norm,
                                     aggregation::sum};

/// Random [B, T] RL inputs in double: log-ratios spread over ±0.6 so every clip branch is hit; row 2 masked out.
struct rl_inputs {
  E logprobs, old_logprobs, advantages, mask, ref_logprobs;
};
rl_inputs random_rl(std::int64_t B, std::int64_t T, std::uint64_t seed) {
  auto lp = test::random_normal({B, T}, seed, 0.5, -1.5);
  auto d = test::random_normal({B, T}, seed + 1, 0.35);
  auto a = test::random_normal({B, T}, seed + 2, 1.0);
  auto m = test::random_mask({B, T}, seed + 3, 0.75);
  auto rd = test::random_normal({B, T}, seed + 4, 0.4);
  for (std::int64_t t = 0; t < T && B > 2; ++t) m.values[static_cast<std::size_t>(2 * T + t)] = 0.0;  // empty row
  auto old = lp;
  auto ref = lp;
  for (std::size_t i = 0; i < lp.values.size(); ++i) {
    old.values[i] = lp.values[i] - d.values[i];
    ref.values[i] = lp.values[i] - rd.values[i];
  }
  return {test::to_eigen<double>(lp), test::to_eigen<double>(old), test::to_eigen<double>(a), test::to_eigen<double>(m),
          test::to_eigen<double>(ref)};
}
}  // namespace

TEST_CASE("PPO clip: torchtune test_ppo_loss vectors", "[rl][ppo]") {
  const auto tol = test::float64_tol;
  const auto old = test::vec({0.5, 0.8, 1.2});
  const auto A = test::vec({1.0, 1.0, 1.0});
  const auto m = test::vec({1.0, 1.0, 1.0});
  // high: ratio e > 1.2 everywhere -> loss -1.2, ratio mean e, clipfrac 1
  auto r = ppo_policy_loss(test::vec({1.5, 1.8, 2.2}), old, A, m);
  test::check_value("loss", r.loss, -1.2, tol);
  test::check_value("ratio_mean", r.ratio_mean, std::exp(1.0), tol);
  test::check_value("pg_clipfrac", r.pg_clipfrac, 1.0, tol);
  test::check_value("clip_ratio_high", r.clip_ratio_high, 1.0, tol);
  test::check_value("clip_ratio_low", r.clip_ratio_low, 0.0, tol);
  // low: ratio 1/e; with A > 0 the unclipped term wins the max -> -1/e, clipfrac 0 (the torchtune test's 0.8 is wrong)
  r = ppo_policy_loss(test::vec({-0.5, -0.2, 0.2}), old, A, m);
  test::check_value("loss low", r.loss, -std::exp(-1.0), tol);
  test::check_value("clipfrac low", r.pg_clipfrac, 0.0, tol);
  CHECK(test::rounds_to(ops::item(r.loss), -0.367879, 6));
  // inside the trust region: ratio e^0.1 -> -1.105171
  r = ppo_policy_loss(test::vec({0.6, 0.9, 1.3}), old, A, m);
  test::check_value("loss unclipped", r.loss, -std::exp(0.1), tol);
  CHECK(test::rounds_to(ops::item(r.loss), -1.105171, 6));
  test::check_value("clipfrac unclipped", r.pg_clipfrac, 0.0, tol);
}

TEST_CASE("PPO variants by hand: clip-higher, dual-clip, delta, log-ratio clamp, metrics", "[rl][ppo]") {
  const auto tol = test::float64_tol;
  const auto one = test::vec({1.0});
  const auto zero = test::vec({0.0});
  const auto lr = [](double ratio) { return test::vec({std::log(ratio)}); };
  // ratio 1.25, A = 1: symmetric ε = 0.2 clips to -1.2; clip_high 0.28 leaves -1.25 (DAPO)
  test::check_value("sym", ppo_policy_loss(lr(1.25), zero, one, one).loss, -1.2, tol);
  test::check_value("clip-higher", ppo_policy_loss(lr(1.25), zero, one, one, {.clip = {.clip_high = 0.28}}).loss, -1.25,
                    tol);
  // ratio 0.7, A = -1: clipped at 1 - ε_low = 0.8 -> max(0.7, 0.8) = 0.8, low-clipped
  auto r = ppo_policy_loss(lr(0.7), zero, test::vec({-1.0}), one, {.clip = {.clip_high = 0.28}});
  test::check_value("low clip", r.loss, 0.8, tol);
  test::check_value("clip_ratio_low", r.clip_ratio_low, 1.0, tol);
  test::check_value("clip_ratio_region", r.clip_ratio_region, 1.0, tol);
  // dual-clip (Ye et al. 2019): ratio 5, A = -1: max(5, 1.2) = 5, min(5, c = 3) = 3, gradient 0
  const auto neg = test::vec({-1.0});
  test::check_value("no dual", ppo_policy_loss(lr(5.0), zero, neg, one).loss, 5.0, tol);
  r = ppo_policy_loss(lr(5.0), zero, neg, one, {.clip = {.clip_c = 3.0}});
  test::check_value("dual", r.loss, 3.0, tol);
  test::check_value("pg_clipfrac_lower", r.pg_clipfrac_lower, 1.0, tol);
  test::check_value("dual grad", ppo_policy_loss_backward(lr(5.0), zero, neg, one, {.clip = {.clip_c = 3.0}}), 0.0,
                    tol);
  test::check_value("no dual grad = -A·ρ", ppo_policy_loss_backward(lr(5.0), zero, neg, one), 5.0, tol);
  // TRL delta: the unclipped ratio is capped at δ = 2 -> max(2, 1.2) = 2
  test::check_value("delta", ppo_policy_loss(lr(5.0), zero, neg, one, {.clip = {.delta = 2.0}}).loss, 2.0, tol);
  // log-ratio clamp 20: log ρ = 30 behaves as 20, gradient 0
  const auto big = test::vec({30.0});
  test::check_value("clamp", ppo_policy_loss(big, zero, neg, one, {.clip = {.log_ratio_clamp = 20.0}}).loss,
                    std::exp(20.0), tol);
  test::check_value("clamp grad", ppo_policy_loss_backward(big, zero, neg, one, {.clip = {.log_ratio_clamp = 20.0}}),
                    0.0, tol);
  // metrics over a mask: dlogp = [0.1, -0.3, (masked 9)]
  const auto lp = test::vec({0.1, -0.3, 9.0});
  const auto o3 = test::vec({0.0, 0.0, 0.0});
  const auto m3 = test::vec({1.0, 1.0, 0.0});
  r = ppo_policy_loss(lp, o3, test::vec({1.0, 1.0, 1.0}), m3);
  test::check_value("approx_kl k1 (verl ppo_kl)", r.approx_kl, (-0.1 + 0.3) / 2, tol);
  test::check_value("approx_kl_sq (TRL)", r.approx_kl_sq, 0.5 * (0.01 + 0.09) / 2, tol);
  test::check_value("ratio_min", r.ratio_min, std::exp(-0.3), tol);
  test::check_value("ratio_max", r.ratio_max, std::exp(0.1), tol);
  // A > 0: the pessimistic max keeps the unclipped -ρ for ρ = e^{-0.3} < 0.8 (clipping binds only on the side that
  // helps)
  test::check_values("per_token masked", r.per_token_loss, {-std::exp(0.1), -std::exp(-0.3), 0.0}, tol);
}

TEST_CASE("PPO: clip-higher with clip_low = clip_high reduces to PPO; verl preset", "[rl][ppo]") {
  const auto in = random_rl(4, 6, 11);
  const auto a = ppo_policy_loss(in.logprobs, in.old_logprobs, in.advantages, in.mask, {.clip = {.clip_low = 0.15}});
  const auto b = ppo_policy_loss(in.logprobs, in.old_logprobs, in.advantages, in.mask,
                                 {.clip = {.clip_low = 0.15, .clip_high = 0.15}});
  test::check_same("loss", b.loss, a.loss, test::float64_tol);
  test::check_same("per token", b.per_token_loss, a.per_token_loss, test::float64_tol);
  const auto v = ppo_options::verl();
  CHECK(v.clip.clip_c == 3.0);
  CHECK(v.clip.log_ratio_clamp == 20.0);
}

TEST_CASE("PPO policy backward vs finite differences: every option and aggregation mode", "[rl][ppo][fd]") {
  const auto in = random_rl(4, 5, 21);
  const std::vector<ppo_options> variants = {{},
                                             {.clip = {.clip_high = 0.28}},
                                             {.clip = {.clip_c = 3.0}},
                                             {.clip = {.delta = 1.5}},
                                             {.clip = {.clip_low = 0.1, .clip_c = 2.0, .delta = 1.3}},
                                             {.clip = {.log_ratio_clamp = 0.3}}};
  for (const auto& base : variants)
    for (auto mode : all_modes) {
      auto o = base;
      o.reduction = mode;
      const auto g = ppo_policy_loss_backward(in.logprobs, in.old_logprobs, in.advantages, in.mask, o, 1.7);
      test::check_gradient(
          std::string("ppo ") + aggregation_name(mode), g,
          [&](const E& x) {
            return 1.7 * ops::item(ppo_policy_loss(x, in.old_logprobs, in.advantages, in.mask, o).loss);
          },
          in.logprobs);
      // masked positions get no gradient
      const auto gh = ops::to_host(g), mh = ops::to_host(in.mask);
      for (std::size_t i = 0; i < gh.size(); ++i)
        if (mh[i] == 0) CHECK(gh[i] == 0.0);
    }
}

TEST_CASE("PPO aggregation invariance: micro-batch sums with the global normaliser equal the batch", "[rl][ppo]") {
  const std::int64_t B = 5, T = 4;
  const auto in = random_rl(B, T, 31);
  const auto rows = [&](const E& x, std::int64_t start, std::int64_t n) { return ops::slice(x, 0, start, n); };
  const auto mh = ops::to_host(in.mask);
  double tokens = 0, seqs = 0;
  for (std::int64_t b = 0; b < B; ++b) {
    double n = 0;
    for (std::int64_t t = 0; t < T; ++t) n += mh[static_cast<std::size_t>(b * T + t)];
    tokens += n;
    seqs += n > 0;
  }
  for (auto mode : all_modes) {
    std::optional<double> norm;
    if (mode == aggregation::token_mean) norm = tokens;
    if (mode == aggregation::seq_mean_token_sum || mode == aggregation::seq_mean_token_mean) norm = seqs;
    if (mode == aggregation::seq_mean_token_sum_norm) norm = double(B * T);
    const ppo_options whole_o{.clip = {.clip_c = 3.0}, .reduction = mode};
    ppo_options split_o = whole_o;
    split_o.normalizer = norm;
    const double whole = ops::item(ppo_policy_loss(in.logprobs, in.old_logprobs, in.advantages, in.mask, whole_o).loss);
    const auto whole_g = ppo_policy_loss_backward(in.logprobs, in.old_logprobs, in.advantages, in.mask, whole_o);
    for (std::int64_t cut : {1, 2, 3}) {
      double total = 0;
      std::vector<E> grads;
      for (auto [s, n] : {std::pair{std::int64_t{0}, cut}, std::pair{cut, B - cut}}) {
        total += ops::item(ppo_policy_loss(rows(in.logprobs, s, n), rows(in.old_logprobs, s, n),
                                           rows(in.advantages, s, n), rows(in.mask, s, n), split_o)
                               .loss);
        grads.push_back(ppo_policy_loss_backward(rows(in.logprobs, s, n), rows(in.old_logprobs, s, n),
                                                 rows(in.advantages, s, n), rows(in.mask, s, n), split_o));
      }
      INFO(aggregation_name(mode) << " cut " << cut);
      CHECK(test::float64_tol.accepts(total, whole));
      test::check_same("grad", ops::concat(grads, 0), whole_g, test::float64_tol);
    }
  }
}

TEST_CASE("Value loss by hand and vs finite differences", "[rl][value]") {
  const auto tol = test::float64_tol;
  // V = 1.5, V_old = 1, R = 0: V_clip = 1.2, ½ max(2.25, 1.44) = 1.125, not clipped
  // V = 0.1, V_old = 1, R = 0: V_clip = 0.8, ½ max(0.01, 0.64) = 0.32, clipped (gradient 0)
  // V = 0.9, V_old = 1, R = 2 (inside the range): ½ 1.21 = 0.605
  const auto V = test::vec({1.5, 0.1, 0.9, 7.0});
  const auto Vo = test::vec({1.0, 1.0, 1.0, 0.0});
  const auto R = test::vec({0.0, 0.0, 2.0, 0.0});
  const auto m = test::vec({1.0, 1.0, 1.0, 0.0});
  auto r = value_loss(V, Vo, R, m);
  test::check_values("per token", r.per_token_loss, {1.125, 0.32, 0.605, 0.0}, tol);
  test::check_value("loss", r.loss, (1.125 + 0.32 + 0.605) / 3, tol);
  test::check_value("clipfrac", r.clipfrac, 1.0 / 3, tol);
  test::check_value("vpred_mean", r.vpred_mean, 2.5 / 3, tol);
  test::check_values("grad", value_loss_backward(V, Vo, R, m), {1.5 / 3, 0.0, -1.1 / 3, 0.0}, tol);
  test::check_value("no clip", value_loss(V, Vo, R, m, {.clip = std::nullopt}).loss, (1.125 + 0.005 + 0.605) / 3, tol);
  // finite differences, every mode
  const auto in = random_rl(4, 5, 41);
  for (auto mode : all_modes)
    for (std::optional<double> clip : {std::optional<double>{0.2}, std::optional<double>{}}) {
      const value_options o{.clip = clip, .reduction = mode};
      test::check_gradient(
          std::string("value ") + aggregation_name(mode),
          value_loss_backward(in.logprobs, in.old_logprobs, in.advantages, in.mask, o),
          [&](const E& x) { return ops::item(value_loss(x, in.old_logprobs, in.advantages, in.mask, o).loss); },
          in.logprobs);
    }
}

TEST_CASE("Entropy bonus and PPO objective", "[rl][value]") {
  // uniform logits over V = 4 -> entropy ln 4 on every token
  const auto logits = E({2, 2, 4}, std::vector<double>(16, 0.3));
  const auto m = test::make({2, 2}, {1, 1, 1, 0});
  test::check_value("entropy", entropy_bonus(logits, m), std::log(4.0), test::float64_tol);
  auto rl = test::random_normal({2, 2, 4}, 5);
  const auto lg = test::to_eigen<double>(rl);
  test::check_gradient(
      "entropy bonus", entropy_bonus_backward(lg, m, aggregation::seq_mean_token_mean),
      [&](const E& x) { return ops::item(entropy_bonus(x, m, aggregation::seq_mean_token_mean)); }, lg);
  const auto in = random_rl(2, 2, 51);
  const ppo_objective_options o{.vf_coef = 0.5, .entropy_coef = 0.01};
  const auto obj = ppo_objective(in.logprobs, in.old_logprobs, in.advantages, in.ref_logprobs, in.old_logprobs,
                                 in.advantages, m, o, &lg);
  const double want =
      ops::item(obj.policy.loss) + 0.5 * ops::item(obj.value.loss) - 0.01 * ops::item(entropy_bonus(lg, m));
  test::check_value("objective", obj.loss, want, test::float64_tol);
}

TEST_CASE("GRPO presets by hand (TRL GRPOTrainer normalisers)", "[rl][grpo]") {
  const auto tol = test::float64_tol;
  // on-policy (ratio 1): per-token loss -A; A = [1, -2], mask [[1,1,0],[1,1,1]]
  const auto lp = test::make({2, 3}, {-1, -2, -3, -0.5, -1.5, -2.5});
  const auto A = test::vec({1.0, -2.0});
  const auto m = test::make({2, 3}, {1, 1, 0, 1, 1, 1});
  const grpo_batch<E> b{.logprobs = lp, .advantages = A, .response_mask = m};
  const auto loss = [&](grpo_options o) { return ops::item(grpo_loss(b, o).loss); };
  CHECK(test::float64_tol.accepts(loss({.loss_type = grpo_loss_type::grpo}), (-1.0 + 2.0) / 2));
  CHECK(test::float64_tol.accepts(loss({.loss_type = grpo_loss_type::bnpo}), (-2.0 + 6.0) / 5));
  CHECK(test::float64_tol.accepts(loss({.loss_type = grpo_loss_type::dapo}), (-2.0 + 6.0) / 5));
  CHECK(test::float64_tol.accepts(loss({.loss_type = grpo_loss_type::dapo, .normalizer = 10.0}), 0.4));
  CHECK(test::float64_tol.accepts(loss({.loss_type = grpo_loss_type::dr_grpo}), 4.0 / 6));
  CHECK(test::float64_tol.accepts(loss({.loss_type = grpo_loss_type::dr_grpo, .max_completion_length = 4}), 0.5));
  // on-policy gradient: -A times the aggregation weight (dapo: 1/5 per token)
  test::check_values("grad", grpo_loss_backward(b, {}), {-0.2, -0.2, 0.0, 0.4, 0.4, 0.4}, tol);
  // β·k3 with r = logp - ref = ln 2 everywhere: k3 = ½ + ln 2 - 1
  const double k3 = 0.5 + std::log(2.0) - 1.0;
  auto bk = b;
  bk.ref_logprobs = ops::sub(lp, std::log(2.0));
  const auto rk = grpo_loss(bk, {.loss_type = grpo_loss_type::bnpo, .beta = 0.04});
  test::check_value("beta k3", rk.loss, 0.8 + 0.04 * k3, tol);
  test::check_value("kl metric", rk.kl, k3, tol);
  // bias correction multiplies by ρ: with old = logp - 0.1, ρ = e^0.1 (A = 1 row unclipped at ε 0.2)
  bk.old_logprobs = ops::sub(lp, 0.1);
  const double rho = std::exp(0.1);
  const auto rb = grpo_loss(bk, {.loss_type = grpo_loss_type::bnpo, .beta = 0.04, .bias_corrected_kl = true});
  test::check_value("bias-corrected kl", rb.kl, k3 * rho, tol);
  test::check_value("bias-corrected loss", rb.loss, (2 * (-rho) + 3 * (2 * rho)) / 5 + 0.04 * k3 * rho, tol);
}

TEST_CASE("GRPO loss: equals ppo_policy_loss at beta 0; backward vs finite differences", "[rl][grpo][fd]") {
  const auto in = random_rl(4, 5, 61);
  const grpo_batch<E> b{.logprobs = in.logprobs,
                        .advantages = in.advantages,
                        .response_mask = in.mask,
                        .old_logprobs = in.old_logprobs,
                        .ref_logprobs = in.ref_logprobs};
  const auto g = grpo_loss(b, {.loss_type = grpo_loss_type::bnpo, .clip = {.clip_high = 0.28}});
  const auto p = ppo_policy_loss(in.logprobs, in.old_logprobs, in.advantages, in.mask, {.clip = {.clip_high = 0.28}});
  test::check_same("= ppo", g.loss, p.loss, test::float64_tol);
  test::check_same("clip_ratio_region", g.clip_ratio_region, p.clip_ratio_region, test::float64_tol);
  const std::vector<grpo_options> variants = {
      {.loss_type = grpo_loss_type::grpo, .beta = 0.04},
      {.loss_type = grpo_loss_type::bnpo, .beta = 0.1, .kl = {.estimator = kl_estimator::k2}},
      {.loss_type = grpo_loss_type::dr_grpo, .beta = 0.04, .max_completion_length = 8},
      {.loss_type = grpo_loss_type::dapo, .beta = 0.04, .clip = {.clip_high = 0.28}, .bias_corrected_kl = true},
      {.loss_type = grpo_loss_type::dapo,
       .beta = 0.02,
       .clip = {.clip_c = 3.0, .delta = 1.4, .log_ratio_clamp = 0.4},
       .kl = kl_options::verl_low_var_kl(),
       .bias_corrected_kl = true,
       .normalizer = 7.0}};
  for (const auto& o : variants) {
    auto bx = b;
    test::check_gradient(
        std::string("grpo ") + grpo_loss_type_name(o.loss_type), grpo_loss_backward(b, o, 0.7),
        [&](const E& x) {
          bx.logprobs = x;
          return 0.7 * ops::item(grpo_loss(bx, o).loss);
        },
        in.logprobs);
  }
  // sequence-level advantages [B] broadcast like [B, T]
  auto bs = b;
  bs.advantages = test::vec({0.5, -1.0, 2.0, 0.25});
  auto bt = bs;
  bt.advantages = broadcast_to_tokens(bs.advantages, test::make({4, 5}, std::vector<double>(20, 1.0)));
  test::check_same("[B] = [B,T]", grpo_loss(bs).loss, grpo_loss(bt).loss, test::float64_tol);
}

TEST_CASE("KL controllers (Ziegler et al. 2019 §2.2)", "[rl][kl]") {
  adaptive_kl_controller c{.value = 0.1, .target = 1.0, .horizon = 10000};
  c.update(2.0, 1000);  // e = clip(1, ±0.2) = 0.2 -> ×1.02
  CHECK(test::float64_tol.accepts(c.value, 0.102));
  c.update(0.95, 2000);  // e = -0.05 -> ×(1 - 0.01)
  CHECK(test::float64_tol.accepts(c.value, 0.102 * 0.99));
  fixed_kl_controller f{.value = 0.05};
  f.update(100.0, 10);
  CHECK(f.value == 0.05);
  CHECK_THROWS_WITH(c.update(1.0, -1), Contains("n_steps"));
  adaptive_kl_controller bad{.target = 0.0};
  CHECK_THROWS_WITH(bad.update(1.0, 1), Contains("target"));
}

TEST_CASE("RL losses reject bad input naming the argument", "[rl][errors]") {
  const auto x = test::make({2, 3}, {0, 0, 0, 0, 0, 0});
  const auto y = test::make({3, 2}, {0, 0, 0, 0, 0, 0});
  CHECK_THROWS_AS(ppo_policy_loss(x, y, x, x), posttrain::error);
  CHECK_THROWS_WITH(ppo_policy_loss(x, y, x, x), Contains("old_logprobs"));
  CHECK_THROWS_WITH(ppo_policy_loss(x, x, y, x), Contains("advantages"));
  CHECK_THROWS_WITH(ppo_policy_loss(x, x, x, y), Contains("response_mask"));
  CHECK_THROWS_WITH(ppo_policy_loss(x, x, x, x, {.clip = {.clip_low = 0.0}}), Contains("clip_low"));
  CHECK_THROWS_WITH(ppo_policy_loss(x, x, x, x, {.clip = {.clip_high = -0.1}}), Contains("clip_high"));
  CHECK_THROWS_WITH(ppo_policy_loss(x, x, x, x, {.clip = {.clip_c = 1.0}}), Contains("clip_c"));
  CHECK_THROWS_WITH(ppo_policy_loss_backward(x, x, x, x, {.clip = {.clip_c = 0.5}}), Contains("clip_c"));
  CHECK_THROWS_WITH(ppo_policy_loss(x, x, x, x, {.clip = {.delta = 1.0}}), Contains("delta"));
  CHECK_THROWS_WITH(value_loss(x, x, y, x), Contains("returns"));
  CHECK_THROWS_WITH(value_loss(x, x, x, x, {.clip = 0.0}), Contains("clip"));
  const grpo_batch<E> b{.logprobs = x, .advantages = test::vec({1, 2, 3}), .response_mask = x};
  CHECK_THROWS_WITH(grpo_loss(b), Contains("advantages"));
  const grpo_batch<E> b2{.logprobs = x, .advantages = x, .response_mask = x};
  CHECK_THROWS_WITH(grpo_loss(b2, {.beta = 0.1}), Contains("ref_logprobs"));
  CHECK_THROWS_WITH(grpo_loss(b2, {.clip = {.clip_low = -1}}),
                    Contains("options.clip.clip_low") && Contains("TRL epsilon"));
  CHECK_THROWS_WITH(grpo_loss(b2, {.loss_type = grpo_loss_type::dr_grpo, .max_completion_length = 0}),
                    Contains("max_completion_length"));
}

}  // namespace test_rl_ppo
