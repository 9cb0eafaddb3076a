// Advantage estimators on the Eigen backend, against published vectors and closed forms:
//  * GAE: torchtune test_rewards vectors (returns [γ³λ², γ²λ, γ, 1], whitened with and without the mean, masked),
//    λ = 1 equals the discounted return minus the value, λ = 0 the one-step TD error, verl's skipping of masked
//    (observation) tokens equals GAE on the sequence with those tokens removed,
//  * discounted returns with verl's reset after EOS, REINFORCE++ (batch whitening), REINFORCE++-baseline, ReMax,
//  * GRPO / Dr. GRPO / batch scaling on verl's test_algo_config vector (feature-anchors D7, ε = 1e-6 and TRL 1e-4),
//    interleaved groups, singletons and all-equal groups under each policy, the std floor, frac_reward_zero_std,
//    multi-reward aggregation, RLOO (hand leave-one-out), OPO, GPG and pass@k by hand,
//  * KL-shaped rewards: torchtune get_rewards_ppo vector, TRL's first-pad score placement, TRL RLOO's sequence k1,
//  * errors naming the argument (gamma/lambda outside [0, 1], group index of the wrong length).
#include <catch2/catch.hpp>
#include <cmath>
#include <vector>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/posttrain.hpp"
#include "support/data.hpp"
#include "support/eigen_checks.hpp"

namespace test_rl_advantages {  // one namespace per test file: the unity build compiles several in one TU

using namespace posttrain;
using Catch::Contains;

namespace {
using E = eigen_tensor<double>;
eigen_index idx(const std::vector<std::int64_t>& v) { return eigen_index({static_cast<std::int64_t>(v.size())}, v); }
void check_rounds(const std::string& what, const E& got, const std::vector<double>& quoted, int decimals) {
  const auto g = ops::to_host(got);
  REQUIRE(g.size() == quoted.size());
  for (std::size_t i = 0; i < g.size(); ++i) {
    INFO(what << "[" << i << "] = " << g[i] << " quoted " << quoted[i]);
    CHECK(test::rounds_to(g[i], quoted[i], decimals));
  }
}
}  // namespace

TEST_CASE("GAE: torchtune test_rewards vectors", "[rl][gae]") {
  const auto V = test::make({1, 4}, {0, 0, 0, 1});
  const auto R = test::make({1, 4}, {0, 0, 0, 1});
  const auto ones = test::make({1, 4}, {1, 1, 1, 1});
  const double g = 0.9, l = 0.95;
  auto r = gae(R, V, ones, {.gamma = g, .lambda = l, .skip_masked = false, .whiten = false});
  test::check_values("returns", r.returns, {g * g * g * l * l, g * g * l, g, 1.0}, test::float64_tol);
  test::check_values("advantages", r.advantages, {g * g * g * l * l, g * g * l, g, 0.0}, test::float64_tol);
  r = gae(R, V, ones, {.gamma = g, .lambda = l, .skip_masked = false});
  check_rounds("whitened", r.advantages, {0.190015, 0.468736, 0.794725, -1.453476}, 6);
  r = gae(R, V, ones, {.gamma = g, .lambda = l, .skip_masked = false, .whitening = {.keep_mean = true}});
  check_rounds("torchtune shift_mean", r.advantages, {0.771871, 1.050592, 1.376581, -0.871620}, 6);
  const auto m = test::make({1, 4}, {1, 1, 1, 0});
  r = gae(R, V, m, {.gamma = g, .lambda = l, .skip_masked = false, .whitening = {.keep_mean = true}});
  check_rounds("torchtune masked", r.advantages, {-0.197146, 0.723749, 1.800820, 0.0}, 6);
  r = gae(R, V, m, {.gamma = g, .lambda = l, .skip_masked = false});
  check_rounds("masked zero-mean", r.advantages, {-0.972954, -0.052058, 1.025012, 0.0}, 6);
}

TEST_CASE("GAE: lambda = 1 is the discounted return minus the value; lambda = 0 the TD error", "[rl][gae]") {
  const std::int64_t B = 3, T = 6;
  const auto rh = test::random_normal({B, T}, 7), vh = test::random_normal({B, T}, 8);
  const auto r = test::to_eigen<double>(rh), v = test::to_eigen<double>(vh);
  const auto m = test::make({B, T}, std::vector<double>(B * T, 1.0));
  for (double gamma : {1.0, 0.9, 0.0}) {
    std::vector<double> mc(B * T), td(B * T);
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t t = 0; t < T; ++t) {
        double ret = 0, disc = 1;
        for (std::int64_t k = t; k < T; ++k, disc *= gamma) ret += disc * rh.values[b * T + k];
        mc[b * T + t] = ret - vh.values[b * T + t];
        const double vnext = t + 1 < T ? vh.values[b * T + t + 1] : 0.0;
        td[b * T + t] = rh.values[b * T + t] + gamma * vnext - vh.values[b * T + t];
      }
    for (bool skip : {true, false}) {
      INFO("gamma " << gamma << " skip " << skip);
      test::check_values("lambda 1",
                         gae(r, v, m, {.gamma = gamma, .lambda = 1.0, .skip_masked = skip, .whiten = false}).advantages,
                         mc, test::float64_tol);
      test::check_values("lambda 0",
                         gae(r, v, m, {.gamma = gamma, .lambda = 0.0, .skip_masked = skip, .whiten = false}).advantages,
                         td, test::float64_tol);
    }
  }
}

TEST_CASE("GAE: verl skips masked observation tokens", "[rl][gae]") {
  // kept positions 0, 2, 3 = GAE on rewards [0, 0, 1], values [.5, .25, .75]; γ = λ = 1: A = 1 - V
  const auto R = test::make({1, 4}, {0, 0, 0, 1});
  const auto V = test::make({1, 4}, {0.5, 9.0, 0.25, 0.75});
  const auto m = test::make({1, 4}, {1, 0, 1, 1});
  auto r = gae(R, V, m, {.gamma = 1.0, .lambda = 1.0, .whiten = false});
  test::check_values("advantages", r.advantages, {0.5, 0.0, 0.75, 0.25}, test::float64_tol);
  test::check_values("returns", r.returns, {1.0, 0.0, 1.0, 1.0}, test::float64_tol);
  // γ = 0.5, λ = 0.5 against the compressed sequence by hand: δ = [0 + .5·.25 - .5, 0 + .5·.75 - .25, 1 - .75]
  const double d0 = 0.125 - 0.5, d1 = 0.375 - 0.25, d2 = 0.25;
  const double a2 = d2, a1 = d1 + 0.25 * a2, a0 = d0 + 0.25 * a1;
  r = gae(R, V, m, {.gamma = 0.5, .lambda = 0.5, .whiten = false});
  test::check_values("advantages γλ", r.advantages, {a0, 0.0, a1, a2}, test::float64_tol);
}

TEST_CASE("Discounted returns, REINFORCE++, REINFORCE++-baseline, ReMax", "[rl][reinforce]") {
  const auto tol = test::float64_tol;
  // G_t = r_t + γ G_{t+1}: [1, 2, 3] with γ = 0.5 -> [2.75, 3.5, 3]
  test::check_values("returns",
                     discounted_returns(test::make({1, 4}, {1, 2, 3, 7}), test::make({1, 4}, {1, 1, 1, 0}), 0.5),
                     {2.75, 3.5, 3.0, 0.0}, tol);
  // verl's reset: a masked token cuts the return flowing to earlier tokens
  test::check_values("reset", discounted_returns(test::make({1, 3}, {1, 5, 2}), test::make({1, 3}, {1, 0, 1})),
                     {1, 0, 2}, tol);
  // REINFORCE++: returns [[1,1,1],[2,2,0]] whitened over the 6 tokens (mean 7/6, unbiased var)
  const auto r = test::make({2, 3}, {0, 0, 1, 0, 2, 0});
  const auto m = test::make({2, 3}, {1, 1, 1, 1, 1, 1});
  const std::vector<double> g = {1, 1, 1, 2, 2, 0};
  double mean = 0, var = 0;
  for (double x : g) mean += x / 6;
  for (double x : g) var += (x - mean) * (x - mean) / 5;
  std::vector<double> w;
  for (double x : g) w.push_back((x - mean) / std::sqrt(var + 1e-8));
  test::check_values("reinforce++", reinforce_pp_advantages(r, m), w, tol);
  // baseline: scores [1, 2] in groups {0}, {0} -> centred [-0.5, 0.5] broadcast, whitened (mean 0, var 0.3)
  const double s = 0.5 / std::sqrt(0.3 + 1e-8);
  test::check_values("reinforce++ baseline", reinforce_pp_baseline_advantages(r, m, idx({0, 0})), {-s, -s, -s, s, s, s},
                     tol);
  // ReMax: returns [[1,1,1],[2,2,0]], baselines [0.5, 1]
  const auto rm = remax_advantages(r, test::vec({0.5, 1.0}), m);
  test::check_values("remax returns", rm.returns, g, tol);
  test::check_values("remax advantages", rm.advantages, {0.5, 0.5, 0.5, 1, 1, -1}, tol);
}

TEST_CASE("GRPO advantages: verl test_algo_config vector", "[rl][group]") {
  // rewards [[1,.5,0],[2,1,0],[.5,.2,0],[1.5,.8,0]] -> scores [1.5, 3, 0.7, 2.3], index [0,0,1,1]
  const auto tlr = test::make({4, 3}, {1, .5, 0, 2, 1, 0, .5, .2, 0, 1.5, .8, 0});
  const auto scores = ops::sum(tlr, 1);
  const auto id = idx({0, 0, 1, 1});
  auto r = grpo_advantages(scores, id, {.eps = 1e-6});
  check_rounds("verl eps 1e-6", r.advantages, {-0.707106, 0.707106, -0.707106, 0.707106}, 6);
  // the closed form (r - mean)/(std + ε) with std = |Δ|/√2
  const double e = 1e-6;
  test::check_values("closed form", r.advantages,
                     {-0.75 / (1.5 / std::sqrt(2.0) + e), 0.75 / (1.5 / std::sqrt(2.0) + e),
                      -0.8 / (1.6 / std::sqrt(2.0) + e), 0.8 / (1.6 / std::sqrt(2.0) + e)},
                     test::float64_tol);
  test::check_values("group mean", r.group_mean, {2.25, 2.25, 1.5, 1.5}, test::float64_tol);
  check_rounds("TRL eps 1e-4", grpo_advantages(scores, id).advantages, {-0.707040, 0.707040, -0.707044, 0.707044}, 6);
  test::check_values("Dr. GRPO", grpo_advantages(scores, id, {.scale = group_scale::none}).advantages,
                     {-0.75, 0.75, -0.8, 0.8}, test::float64_tol);
  // batch std (TRL scale_rewards="batch"): unbiased std of all four scores
  const double mu = 7.5 / 4;
  double ss = 0;
  for (double x : {1.5, 3.0, 0.7, 2.3}) ss += (x - mu) * (x - mu);
  const double sb = std::sqrt(ss / 3) + 1e-4;
  test::check_values("batch", grpo_advantages(scores, id, {.scale = group_scale::batch}).advantages,
                     {-0.75 / sb, 0.75 / sb, -0.8 / sb, 0.8 / sb}, test::float64_tol);
  // interleaved groups give the same advantages, permuted
  const auto inter = grpo_advantages(test::vec({1.5, 0.7, 3.0, 2.3}), idx({4, 9, 4, 9}), {.eps = 1e-6});
  const auto a = ops::to_host(r.advantages);
  test::check_values("interleaved", inter.advantages, {a[0], a[2], a[1], a[3]}, test::float64_tol);
  // RLOO: r - (S - r)/(n - 1)
  test::check_values("rloo", rloo_advantages(scores, id), {-1.5, 1.5, -1.6, 1.6}, test::float64_tol);
  test::check_values(
      "token broadcast",
      broadcast_to_tokens(rloo_advantages(scores, id), test::make({4, 3}, {1, 1, 0, 1, 1, 1, 0, 0, 0, 1, 0, 0})),
      {-1.5, -1.5, 0, 1.5, 1.5, 1.5, 0, 0, 0, 1.6, 0, 0}, test::float64_tol);
}

TEST_CASE("Group estimators: singletons, all-equal groups, std floor", "[rl][group]") {
  const auto s = test::vec({1.0, 3.0, 5.0});
  const auto id = idx({0, 0, 1});
  auto r = grpo_advantages(s, id);
  test::check_value("singleton zero", ops::slice(r.advantages, 0, 2, 1), 0.0, test::float64_tol);
  r = grpo_advantages(s, id, {.singleton = singleton_policy::raw});
  test::check_value("singleton raw (verl)", ops::slice(r.advantages, 0, 2, 1), 5.0 / (1.0 + 1e-4), test::float64_tol);
  test::check_values("rloo singleton zero", rloo_advantages(s, id), {-2, 2, 0}, test::float64_tol);
  test::check_values("rloo singleton raw", rloo_advantages(s, id, singleton_policy::raw), {-2, 2, 5},
                     test::float64_tol);
  // all-equal group in float32 (0.1 is inexact): advantage exactly 0, no NaN, frac_reward_zero_std counts it
  const auto f = eigen_tensor<float>({4}, {0.1f, 0.1f, 0.1f, 1.0f});
  // eps = 1e-300 (eps must be > 0) is 0 in float32: the singleton's raw reward comes out exactly
  const auto rf = grpo_advantages(f, idx({0, 0, 0, 1}), {.eps = 1e-300, .singleton = singleton_policy::raw});
  const auto af = ops::to_host(rf.advantages);
  CHECK(af[0] == 0.0);
  CHECK(af[1] == 0.0);
  CHECK(af[2] == 0.0);
  CHECK(af[3] == 1.0);
  CHECK(test::float64_tol.accepts(ops::item(rf.frac_reward_zero_std), 1.0));
  // std floor bounds the amplification of a near-constant group: ±5e-7 / (1e-3 + 1e-4)
  const auto near = test::vec({1.0, 1.0 + 1e-6});
  const auto rn = grpo_advantages(near, idx({0, 0}), {.std_floor = 1e-3, .all_equal = all_equal_policy::formula});
  test::check_values("floor", rn.advantages, {-5e-7 / 1.1e-3, 5e-7 / 1.1e-3}, {1e-10, 1e-6});
}

TEST_CASE("Multi-reward GRPO, OPO, GPG, pass@k by hand", "[rl][group]") {
  const auto tol = test::float64_tol;
  const auto id = idx({0, 0, 1, 1});
  // rewards [[1,0],[0,1],[1,1],[0,2]], weights [1, 0.5]
  const auto rw = test::make({4, 2}, {1, 0, 0, 1, 1, 1, 0, 2});
  const double c = 1 / std::sqrt(2.0);
  // sum then normalise: scores [1, 0.5, 1.5, 1]: each group a pair differing by 0.5 -> ±0.25/(0.5c + ε)
  const double p = 0.25 / (0.5 * c + 1e-4);
  test::check_values("sum_then_normalize", grpo_advantages_multi(rw, {1.0, 0.5}, id), {p, -p, p, -p}, tol);
  // normalise then sum: column 0 -> ±0.5/(c + ε), column 1 -> ±0.5/(c + ε) (group 0) and ±0.5/(c + ε) (group 1)
  const double q = 0.5 / (c + 1e-4);
  test::check_values("normalize_then_sum", grpo_advantages_multi(rw, {1.0, 0.5}, id, multi_reward::normalize_then_sum),
                     {q - 0.5 * q, -q + 0.5 * q, q - 0.5 * q, -q + 0.5 * q}, tol);
  // OPO: scores [1, 0, 2], lengths [2, 1, 3] -> baseline 8/6
  const auto om = test::make({3, 3}, {1, 1, 0, 1, 0, 0, 1, 1, 1});
  test::check_values("opo", opo_advantages(test::vec({1, 0, 2}), om, idx({0, 0, 0})), {1 - 4. / 3, -4. / 3, 2 - 4. / 3},
                     tol);
  // GPG: α = 4 / 2 nonzero; mean 0.5 in each group
  test::check_values("gpg", gpg_advantages(test::vec({1, 0, 0, 1}), id), {1, -1, -1, 1}, tol);
  // pass@k: only the best gets r_max - r_2nd, divided by the group std + ε
  const std::vector<double> ps = {0.2, 0.9, 0.5, 0.7};
  double mu = 0.575, ss = 0;
  for (double x : ps) ss += (x - mu) * (x - mu);
  test::check_values("passk", grpo_passk_advantages(test::vec(ps), idx({0, 0, 0, 0})),
                     {0, 0.2 / (std::sqrt(ss / 3) + 1e-6), 0, 0}, tol);
  test::check_values("passk unscaled, tie -> 0", grpo_passk_advantages(test::vec({0.9, 0.9, 0.1, 0.3}), id, false),
                     {0, 0, 0, 0.2}, tol);
  CHECK_THROWS_WITH(grpo_passk_advantages(test::vec({1, 2, 3}), idx({0, 0, 1})), Contains("group_index"));
}

TEST_CASE("KL-shaped rewards: torchtune get_rewards_ppo, TRL first-pad placement, TRL RLOO", "[rl][kl_reward]") {
  const auto tol = test::float64_tol;
  const auto lp = test::make({3, 3}, {.1, .2, .3, .4, .5, .6, .6, .7, .8});
  const auto ref = test::make({3, 3}, {.2, .3, .4, .6, .7, .8, .9, 1, 1.1});
  const auto m = test::make({3, 3}, std::vector<double>(9, 1.0));
  const auto scores = test::vec({1, 2, 3});
  auto r = kl_shaped_rewards(scores, lp, ref, m, {.beta = 0.5});
  test::check_values("rewards", r.rewards, {.05, .05, 1.05, .1, .1, 2.1, .15, .15, 3.15}, tol);
  test::check_values("kl", r.kl, {-.1, -.1, -.1, -.2, -.2, -.2, -.3, -.3, -.3}, {1e-10, 1e-9});
  // TRL PPO: the score at the first pad (row 0: position 2); a full row keeps it on its last token
  const auto pm = test::make({3, 3}, {1, 1, 0, 1, 0, 0, 1, 1, 1});
  r = kl_shaped_rewards(scores, lp, ref, pm, {.beta = 0.5, .position = score_position::first_pad});
  test::check_values("first pad", r.rewards, {.05, .05, 1, .1, 2, 0, .15, .15, 3.15}, tol);
  r = kl_shaped_rewards(scores, lp, ref, pm, {.beta = 0.5});
  test::check_values("last token", r.rewards, {.05, 1.05, 0, 2.1, 0, 0, .15, .15, 3.15}, tol);
  // TRL RLOO: score - β Σ_t k1
  test::check_values("rloo kl", kl_penalized_scores(scores, lp, ref, pm, 0.5), {1 + 0.1, 2 + 0.1, 3 + 0.45}, tol);
  // k3 in the reward: with r = -0.1, k3 = e^{0.1} - 1.1
  r = kl_shaped_rewards(test::vec({0}), test::make({1, 1}, {0.1}), test::make({1, 1}, {0.2}), test::make({1, 1}, {1}),
                        {.beta = 1.0, .kl = {.estimator = kl_estimator::k3}});
  test::check_value("k3", r.rewards, -(std::exp(0.1) - 1.1), tol);
}

TEST_CASE("Advantage estimators reject bad input naming the argument", "[rl][errors]") {
  const auto x = test::make({2, 3}, {0, 0, 0, 0, 0, 0});
  CHECK_THROWS_WITH(gae(x, x, x, {.gamma = 1.5}), Contains("gamma"));
  CHECK_THROWS_WITH(gae(x, x, x, {.lambda = -0.1}), Contains("lambda"));
  CHECK_THROWS_WITH(gae(x, test::make({2, 2}, {0, 0, 0, 0}), x), Contains("values"));
  CHECK_THROWS_WITH(gae(x, x, test::make({3, 2}, {0, 0, 0, 0, 0, 0})), Contains("response_mask"));
  CHECK_THROWS_WITH(discounted_returns(x, x, 2.0), Contains("gamma"));
  const auto s = test::vec({1, 2});
  CHECK_THROWS_WITH(grpo_advantages(s, idx({0, 0, 1})), Contains("group_index"));
  CHECK_THROWS_WITH(rloo_advantages(s, idx({0})), Contains("group_index"));
  CHECK_THROWS_WITH(grpo_advantages(s, idx({0, -1})), Contains("group_index"));
  CHECK_THROWS_WITH(grpo_advantages(s, idx({0, 0}), {.eps = -1}), Contains("eps"));
  CHECK_THROWS_WITH(grpo_advantages_multi(x, {1.0}, idx({0, 0})), Contains("weights"));
  CHECK_THROWS_WITH(kl_shaped_rewards(test::vec({1, 2, 3}), x, x, x), Contains("scores"));
  CHECK_THROWS_WITH(remax_advantages(x, test::vec({1}), x), Contains("reward_baselines"));
}

}  // namespace test_rl_advantages
