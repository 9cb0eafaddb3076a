// RL policy-loss variants and off-policy controls on the Eigen backend (double):
//  * each variant's value against the published formula written out here in plain loops (source named at
//    each): GSPO, LUSPO, GMPO, CISPO (TRL cap and verl band), SAPO, VESPO, REINFORCE/GPG,
//  * reductions: GSPO with one token per sequence equals token-level PPO (value and gradient); GSPO's
//    token-form gradient equals the finite-difference gradient of TRL's sequence form when A is per sequence;
//    SAPO's gate at large τ zeroes the gradient outside the trust region like hard clipping and keeps -A at
//    ρ = 1, at small τ it tends to the unclipped gradient; CISPO's gradient equals ρ × REINFORCE's where no clip
//    is active (and REINFORCE's exactly on-policy); VESPO's φ(1) = 1,
//  * rollout IS (token/sequence/geometric, truncate/mask), cap = +inf changes nothing, OPSM and the
//    top-entropy mask on TRL's test_grpo_trainer vectors,
//  * every backward against central finite differences (every variant, several aggregations, IS/OPSM/entropy),
//  * one clip_options (clip.hpp) for PPO, the variants and GRPO: TRL spellings, the same clip fractions,
//  * errors naming the argument.
#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <vector>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/losses/grpo.hpp"
#include "posttrain/losses/policy_variants.hpp"
#include "posttrain/losses/ppo.hpp"
#include "support/data.hpp"
#include "support/eigen_checks.hpp"
#include "support/finite_difference.hpp"

namespace test_rl_variants {  // one namespace per test file: the unity build compiles several in one TU

using namespace posttrain;
using Catch::Contains;

namespace {
using E = eigen_tensor<double>;
const auto tol = test::float64_tol;

struct inputs {
  E lp, old, A, m, roll, H;
};
/// [B, T] random inputs: log-ratios spread over ±0.6, row 2 empty, row 1 a single token.
inputs random_inputs(std::int64_t B, std::int64_t T, std::uint64_t seed, double spread = 0.35) {
  auto lp = test::random_normal({B, T}, seed, 0.5, -1.5);
  auto d = test::random_normal({B, T}, seed + 1, spread);
  auto a = test::random_normal({B}, seed + 2, 1.0);
  auto m = test::random_mask({B, T}, seed + 3, 0.8);
  auto rd = test::random_normal({B, T}, seed + 4, 0.3);
  auto h = test::random_normal({B, T}, seed + 5, 1.0, 2.0);
  for (std::int64_t t = 0; t < T; ++t) {
    m.values[static_cast<std::size_t>(2 * T + t)] = 0.0;
    m.values[static_cast<std::size_t>(T + t)] = t == 0 ? 1.0 : 0.0;
  }
  m.values[0] = 1.0;
  auto old = lp, roll = lp;
  for (std::size_t i = 0; i < lp.values.size(); ++i) {
    old.values[i] = lp.values[i] - d.values[i];
    roll.values[i] = old.values[i] - rd.values[i];
  }
  return {test::to_eigen<double>(lp), test::to_eigen<double>(old),  test::to_eigen<double>(a),
          test::to_eigen<double>(m),  test::to_eigen<double>(roll), test::to_eigen<double>(h)};
}

std::vector<double> host(const E& x) { return ops::to_host(x); }
double sigm(double x) { return 1.0 / (1.0 + std::exp(-x)); }
}  // namespace

TEST_CASE("GSPO and LUSPO by hand: sequence ratio from the mean token log-ratio", "[rl][variants][gspo]") {
  // Two rows, A per sequence; GSPO eq. 7: s_i = exp(mean_t (logπ - logπ_old)), loss -min(sA, clip(s)A).
  const E lp = test::make({2, 3}, {-1.0, -2.0, -0.5, -1.2, -0.3, -0.9});
  const E old = test::make({2, 3}, {-1.1, -2.2, -0.5, -1.0, -0.3, -0.4});
  const E m = test::make({2, 3}, {1, 1, 1, 1, 1, 0});
  const E A = test::vec({1.5, -0.5});
  const double s0 = std::exp((0.1 + 0.2 + 0.0) / 3), s1 = std::exp((-0.2 + 0.0) / 2);  // 1.1052, 0.9048
  const double eps = 0.2;
  auto ppo = [&](double s, double a) { return std::max(-a * s, -a * std::clamp(s, 1 - eps, 1 + eps)); };
  policy_batch<E> b{lp, A, m, old};
  auto r = policy_variant_loss(b, {.variant = policy_variant::gspo, .reduction = aggregation::seq_mean_token_mean});
  test::check_value("gspo seq-mean-token-mean", r.loss, (ppo(s0, 1.5) + ppo(s1, -0.5)) / 2, tol);
  test::check_values("gspo ratio", r.ratio, {s0, s0, s0, s1, s1, s1}, tol);
  // clipped: ε = 0.05 -> s0 clipped at 1.05 (A > 0), s1 clipped at 0.95 (A < 0: max picks -A·0.95)
  r = policy_variant_loss(
      b, {.variant = policy_variant::gspo, .clip = {.clip_low = 0.05}, .reduction = aggregation::token_mean});
  const double want = (3 * (-1.5 * 1.05) + 2 * (0.5 * 0.95)) / 5;
  test::check_value("gspo token-mean clipped", r.loss, want, tol);
  test::check_value("gspo clip high", r.clip_ratio_high, 3.0 / 5, tol);
  test::check_value("gspo clip low", r.clip_ratio_low, 2.0 / 5, tol);
  // LUSPO (TRL luspo: (L·|o_i|).mean() over rows) = (3·L_0 + 2·L_1) / 2
  r = policy_variant_loss(b, {.variant = policy_variant::luspo});
  test::check_value("luspo", r.loss, (3 * ppo(s0, 1.5) + 2 * ppo(s1, -0.5)) / 2, tol);
  // The gradient of the token form equals the gradient of TRL's sequence form (A per sequence): finite
  // differences of L(lp) = mean_i -min(s_i A_i, clip(s_i) A_i), s_i from lp directly.
  for (double e : {0.2, 0.05}) {
    auto trl_seq = [&](const E& x) {
      const auto xv = host(x), ov = host(old), mv = host(m), av = host(A);
      double tot = 0;
      for (int i = 0; i < 2; ++i) {
        double sum = 0, n = 0;
        for (int t = 0; t < 3; ++t) sum += mv[i * 3 + t] * (xv[i * 3 + t] - ov[i * 3 + t]), n += mv[i * 3 + t];
        const double s = std::exp(sum / n);
        tot += std::max(-av[i] * s, -av[i] * std::clamp(s, 1 - e, 1 + e));
      }
      return tot / 2;
    };
    const auto g = policy_variant_loss_backward(
        b, {.variant = policy_variant::gspo, .clip = {.clip_low = e}, .reduction = aggregation::seq_mean_token_mean});
    test::check_gradient("gspo token form vs TRL sequence form", g, trl_seq, lp);
  }
}

TEST_CASE("GSPO with one token per sequence equals token-level PPO", "[rl][variants][gspo]") {
  auto in = random_inputs(5, 1, 11, 0.6);
  in.m = test::make({5, 1}, {1, 1, 1, 1, 1});
  for (aggregation agg : {aggregation::token_mean, aggregation::seq_mean_token_mean, aggregation::sum}) {
    const auto A = ops::reshape(in.A, {5, 1});
    const auto p = ppo_policy_loss(in.lp, in.old, A, in.m, {.reduction = agg});
    const auto g = policy_variant_loss(policy_batch<E>{in.lp, in.A, in.m, in.old},
                                       {.variant = policy_variant::gspo, .reduction = agg});
    test::check_same("loss", g.loss, p.loss, tol);
    test::check_same("ratio", g.ratio, p.ratio, tol);
    test::check_same("grad",
                     policy_variant_loss_backward(policy_batch<E>{in.lp, in.A, in.m, in.old},
                                                  {.variant = policy_variant::gspo, .reduction = agg}),
                     ppo_policy_loss_backward(in.lp, in.old, A, in.m, {.reduction = agg}), tol);
  }
}

TEST_CASE("GMPO by hand: verl geo_mean", "[rl][variants][gmpo]") {
  // verl compute_policy_loss_geo_mean: ρ̄ = exp(mean_t sgnA·min(sgnA·lr, sgnA·clip(lr, -ε_l, ε_h))), loss -Ā ρ̄
  const E lp = test::make({2, 3}, {-1.0, -2.0, -0.5, -1.2, -0.3, -0.9});
  const E old = test::make({2, 3}, {-1.6, -2.2, -0.5, -0.5, -0.3, -0.4});
  const E m = test::make({2, 3}, {1, 1, 1, 1, 1, 0});
  const E A = test::vec({2.0, -1.0});
  const double e = 0.4;
  // row 0, A > 0: lr = 0.6, 0.2, 0 -> min(lr, clip(lr)) = 0.4, 0.2, 0 ; row 1, A < 0: lr = -0.7, 0 -> -max(-lr.., ) =
  // sgn·min(-lr, -clip(lr)) = -min(0.7, 0.4) = -0.4, 0
  const double r0 = std::exp((0.4 + 0.2 + 0.0) / 3), r1 = std::exp((-0.4 + 0.0) / 2);
  const auto r = policy_variant_loss(policy_batch<E>{lp, A, m, old}, policy_variant_options::verl_gmpo());
  REQUIRE(e == 0.4);
  test::check_value("gmpo", r.loss, (-2.0 * r0 + 1.0 * r1) / 2, tol);
  test::check_values("gmpo ratio", r.ratio, {r0, r0, r0, r1, r1, r1}, tol);
}

TEST_CASE("CISPO by hand: TRL absolute cap and verl band, gradient vs REINFORCE", "[rl][variants][cispo]") {
  // MiniMax-M1 eq. 4: -sg(clip ρ)·A·logπ. ρ = e^{0.5}, e^{-0.5}, e^{2}, 1
  const E lp = test::make({1, 4}, {-1.0, -2.0, -0.5, -3.0});
  const E old = test::make({1, 4}, {-1.5, -1.5, -2.5, -3.0});
  const E m = test::make({1, 4}, {1, 1, 1, 1});
  const E A = test::make({1, 4}, {1.0, -2.0, 0.5, 3.0});
  const std::vector<double> rho{std::exp(0.5), std::exp(-0.5), std::exp(2.0), 1.0}, a{1, -2, 0.5, 3},
      l{-1, -2, -0.5, -3};
  policy_batch<E> b{lp, A, m, old};
  // TRL: clamp(ρ, max=cap) with cap 5 -> e^2 = 7.39 capped at 5
  double want = 0;
  for (int i = 0; i < 4; ++i) want += -std::min(rho[i], 5.0) * a[i] * l[i] / 4;
  auto r = policy_variant_loss(b, policy_variant_options::trl_cispo());
  test::check_value("cispo trl", r.loss, want, tol);
  test::check_value("cispo_clip_ratio", r.cispo_clip_ratio, 1.0 / 4, tol);  // (ρ > 5) & (A > 0): token 2
  // verl: clamp(ρ, 1-0.2, 1+0.28)
  want = 0;
  for (int i = 0; i < 4; ++i) want += -std::clamp(rho[i], 0.8, 1.28) * a[i] * l[i] / 4;
  const policy_variant_options verl{
      .variant = policy_variant::cispo, .clip = {.clip_high = 0.28}, .cispo = cispo_bound::verl_two_sided};
  r = policy_variant_loss(b, verl);
  test::check_value("cispo verl", r.loss, want, tol);
  test::check_value("cispo verl clip ratio", r.cispo_clip_ratio, 3.0 / 4, tol);
  // gradient: ρ · REINFORCE's gradient where no clip is active (TRL cap: tokens 0, 1, 3)
  const auto gc = host(policy_variant_loss_backward(b, policy_variant_options::trl_cispo()));
  const auto gr = host(policy_variant_loss_backward(b, {.variant = policy_variant::reinforce}));
  for (int i : {0, 1, 3}) CHECK(test::float64_tol.accepts(gc[i], rho[i] * gr[i]));
  CHECK(test::float64_tol.accepts(gc[2], 5.0 * gr[2]));
  // on-policy (no old_logprobs): ρ = 1, the REINFORCE gradient exactly, with either bound
  test::check_same("on-policy cispo = reinforce",
                   policy_variant_loss_backward(policy_batch<E>{lp, A, m}, policy_variant_options::trl_cispo()),
                   policy_variant_loss_backward(policy_batch<E>{lp, A, m}, {.variant = policy_variant::reinforce}),
                   tol);
  test::check_same("on-policy verl cispo = gpg", policy_variant_loss_backward(policy_batch<E>{lp, A, m}, verl),
                   policy_variant_loss_backward(policy_batch<E>{lp, A, m}, {.variant = policy_variant::gpg}), tol);
  // REINFORCE / GPG value: -A·logπ token mean
  test::check_value("reinforce", policy_variant_loss(b, {.variant = policy_variant::reinforce}).loss,
                    -(1 * -1.0 + -2 * -2.0 + 0.5 * -0.5 + 3 * -3.0) / 4, tol);
}

TEST_CASE("SAPO by hand and its temperature limits", "[rl][variants][sapo]") {
  // SAPO eq. 5 / TRL get_sapo_token_loss: -A·σ(τ(ρ-1))·4/τ, τ+ for A > 0, τ- otherwise
  const E lp = test::make({1, 4}, {-1.0, -2.0, -0.5, -3.0});
  const E old = test::make({1, 4}, {-1.5, -1.5, -0.7, -3.0});
  const E m = test::make({1, 4}, {1, 1, 1, 1});
  const E A = test::make({1, 4}, {1.0, -2.0, 0.5, 3.0});
  const std::vector<double> rho{std::exp(0.5), std::exp(-0.5), std::exp(0.2), 1.0}, a{1, -2, 0.5, 3};
  policy_batch<E> b{lp, A, m, old};
  double want = 0;
  for (int i = 0; i < 4; ++i) {
    const double tau = a[i] > 0 ? 1.0 : 1.05;
    want += -a[i] * sigm(tau * (rho[i] - 1)) * 4 / tau / 4;
  }
  test::check_value("sapo", policy_variant_loss(b, policy_variant_options::trl_sapo()).loss, want, tol);
  // large τ: gradient (per token, token_mean weight 1/4) vanishes where |ρ-1| > ε (as a hard clip would),
  // and is the unclipped -A·ρ/4 at ρ = 1
  for (double tau : {50.0, 500.0}) {
    const auto g = host(policy_variant_loss_backward(
        b, {.variant = policy_variant::sapo, .sapo_temperature_pos = tau, .sapo_temperature_neg = tau}));
    for (int i : {0, 1, 2}) CHECK(std::abs(g[i]) < 1e-3);
    CHECK(test::float64_tol.accepts(g[3], -3.0 / 4));
  }
  // small τ: σ(τx)·4/τ ≈ 2/τ + x, the unclipped surrogate's gradient -A·ρ
  const auto g = host(policy_variant_loss_backward(
      b, {.variant = policy_variant::sapo, .sapo_temperature_pos = 1e-5, .sapo_temperature_neg = 1e-5}));
  for (int i = 0; i < 4; ++i) CHECK(std::abs(g[i] - (-a[i] * rho[i] / 4)) < 1e-8);
}

TEST_CASE("VESPO by hand: TRL gamma weights", "[rl][variants][vespo]") {
  // TRL get_gamma_weights: w = exp(Σ_t lr), φ = exp(λ + k log w - λ w); loss -φ·A·logπ (dapo normaliser)
  const E lp = test::make({2, 2}, {-1.0, -2.0, -0.5, -3.0});
  const E old = test::make({2, 2}, {-1.2, -2.1, -0.1, -3.0});
  const E m = test::make({2, 2}, {1, 1, 1, 1});
  const E A = test::vec({1.0, -2.0});
  const double w0 = std::exp(0.3), w1 = std::exp(-0.4);
  const double phi0 = std::exp(3 + 2 * std::log(w0) - 3 * w0), phi1 = std::exp(2 + 3 * std::log(w1) - 2 * w1);
  const auto r = policy_variant_loss(policy_batch<E>{lp, A, m, old}, policy_variant_options::trl_vespo());
  test::check_value("vespo", r.loss, (-phi0 * 1 * (-3.0) - phi1 * -2 * (-3.5)) / 4, tol);
  test::check_values("phi", r.phi, {phi0, phi0, phi1, phi1}, tol);
  // on-policy: w = 1, φ = 1 -> REINFORCE
  test::check_same("vespo on-policy",
                   policy_variant_loss(policy_batch<E>{lp, A, m}, policy_variant_options::trl_vespo()).loss,
                   policy_variant_loss(policy_batch<E>{lp, A, m}, {.variant = policy_variant::reinforce}).loss, tol);
}

TEST_CASE("Rollout importance sampling: token and sequence, truncate and mask, infinite cap", "[rl][variants][is]") {
  const E lp = test::make({2, 2}, {-1.0, -2.0, -0.5, -3.0});
  const E old = test::make({2, 2}, {-1.0, -2.0, -0.5, -3.0});
  const E roll = test::make({2, 2}, {-2.5, -2.2, -0.5, -2.0});  // old - roll: 1.5, 0.2, 0, -1
  const E m = test::make({2, 2}, {1, 1, 1, 1});
  const E A = test::vec({1.0, -1.0});
  const policy_variant_options base{.variant = policy_variant::reinforce};
  auto with = [&](rollout_is_options r) {
    auto o = base;
    o.rollout_is = r;
    return o;
  };
  const policy_batch<E> b{lp, A, m, old, roll};
  // token truncate at 2 (verl TIS): min(e^1.5, 2), e^0.2, 1, e^-1
  auto r = policy_variant_loss(b, with(rollout_is_options::verl()));
  test::check_values("token truncate", r.is_weight, {2.0, std::exp(0.2), 1.0, std::exp(-1.0)}, tol);
  test::check_value("weighted loss", r.loss,
                    -(2.0 * -1.0 + std::exp(0.2) * -2.0 - 1.0 * -0.5 - std::exp(-1.0) * -3.0) / 4, tol);
  test::check_value("is max", r.is_ratio_max, std::exp(1.5), tol);
  test::check_value("is min", r.is_ratio_min, std::exp(-1.0), tol);
  // sequence mask at 3 (TRL default): row 0 e^1.7 = 5.47 > 3 -> 0; row 1 e^-1 kept
  r = policy_variant_loss(b, with({}));
  test::check_values("sequence mask", r.is_weight, {0, 0, std::exp(-1.0), std::exp(-1.0)}, tol);
  // geometric truncate: exp(mean) = e^0.85, e^-0.5
  r = policy_variant_loss(b, with({.level = is_level::geometric, .mode = is_mode::truncate}));
  test::check_values("geometric", r.is_weight, {std::exp(0.85), std::exp(0.85), std::exp(-0.5), std::exp(-0.5)}, tol);
  // mask with a lower bound 0.5: token ratios e^-1 = 0.37 < 0.5 dropped, e^1.5 > 2 dropped
  r = policy_variant_loss(b, with({.level = is_level::token, .mode = is_mode::mask, .cap = 2.0, .lower = 0.5}));
  test::check_values("token mask lower", r.is_weight, {0, std::exp(0.2), 1.0, 0}, tol);
  // cap = +inf: truncate and mask both give the raw ratio, the plain IS-weighted loss
  const double inf = std::numeric_limits<double>::infinity();
  for (is_mode mode : {is_mode::truncate, is_mode::mask}) {
    r = policy_variant_loss(b, with({.level = is_level::token, .mode = mode, .cap = inf}));
    test::check_values("inf cap", r.is_weight, {std::exp(1.5), std::exp(0.2), 1.0, std::exp(-1.0)}, tol);
  }
  // rollout = old: every weight 1, nothing changes
  r = policy_variant_loss(policy_batch<E>{lp, A, m, old, old},
                          with({.level = is_level::sequence, .mode = is_mode::truncate, .cap = inf}));
  test::check_same("no drift", r.loss, policy_variant_loss(policy_batch<E>{lp, A, m, old}, base).loss, tol);
}

TEST_CASE("OPSM and the top-entropy mask on TRL's test vectors", "[rl][variants][opsm][entropy]") {
  // TRL test_grpo_trainer off-policy mask: A = [1, -1, -1], logπ = -2, -0.5, -2 vs sampler 0, δ = 1 -> keep [1, 1, 0]
  const E lp = test::make({3, 2}, {-2, -2, -0.5, -0.5, -2, -2});
  const E roll = test::make({3, 2}, {0, 0, 0, 0, 0, 0});
  const E m = test::make({3, 2}, {1, 1, 1, 1, 1, 1});
  const E A = test::vec({1.0, -1.0, -1.0});
  auto r = policy_variant_loss(policy_batch<E>{lp, A, m, lp, roll},
                               {.variant = policy_variant::reinforce, .opsm_delta = 1.0});
  test::check_values("opsm keep", r.token_keep, {1, 1, 1, 1, 0, 0}, tol);
  // padding is ignored: a padded token with a huge drift does not change row 1's mean
  const E roll2 = test::make({3, 2}, {0, 0, 0, 50, 0, 0});
  const E m2 = test::make({3, 2}, {1, 1, 1, 0, 1, 1});
  r = policy_variant_loss(policy_batch<E>{lp, A, m2, lp, roll2},
                          {.variant = policy_variant::reinforce, .opsm_delta = 1.0});
  test::check_values("opsm padding", r.token_keep, {1, 1, 1, 0, 0, 0}, tol);

  // TRL get_high_entropy_mask with threshold t (= quantile level, top_entropy_quantile = 1 - t)
  const E H = test::make({2, 6}, {.1, .2, .3, .4, .5, .6, .7, .8, .9, 1.0, 1.1, 1.2});
  const E hm = test::make({2, 6}, {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0});
  test::check_values("t=0.8", top_entropy_mask(H, hm, 1 - 0.8), {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0}, tol);
  test::check_values("t=0.5", top_entropy_mask(H, hm, 1 - 0.5), {0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0}, tol);
  test::check_values("t=1", top_entropy_mask(H, hm, 0.0), {0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0}, tol);
  test::check_values("t=0", top_entropy_mask(H, hm, 1.0), {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0}, tol);
  const E H2 = test::make({2, 6}, {.1, .2, .3, 1.4, .5, .14, .5, .6, .7, .8, .9, 1.0});
  const E hm2 = test::make({2, 6}, {1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 0});
  test::check_values("second case", top_entropy_mask(H2, hm2, 1 - 0.8), {0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0}, tol);
  // in the loss: top_entropy_quantile keeps only the selected tokens, the normaliser still counts all 10
  const E lpH = test::make({2, 6}, {-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1});
  const auto rl = policy_variant_loss(policy_batch<E>{lpH, test::vec({1.0, 1.0}), hm, std::nullopt, std::nullopt, H},
                                      {.variant = policy_variant::reinforce, .top_entropy_quantile = 0.2});
  test::check_value("entropy-masked loss", rl.loss, 2.0 / 10, tol);
}

TEST_CASE("Every variant's backward vs finite differences", "[rl][variants][grad]") {
  const auto in = random_inputs(4, 5, 21, 0.35);
  const policy_variant variants[] = {policy_variant::ppo,   policy_variant::gspo,      policy_variant::luspo,
                                     policy_variant::gmpo,  policy_variant::cispo,     policy_variant::sapo,
                                     policy_variant::vespo, policy_variant::reinforce, policy_variant::gpg};
  // Token-local variants: finite differences of the forward value. Stop-gradient variants (CISPO's clip(ρ),
  // VESPO's φ): the weight is frozen by moving old_logprobs and rollout_logprobs with the probe (ρ, φ, the IS
  // weights and OPSM's drift stay fixed; only logπ moves). Sequence-ratio variants: the token form equals the
  // gradient of the forward value when every factor is constant along a row (sequence-level IS, OPSM).
  for (policy_variant v : variants) {
    const bool frozen = v == policy_variant::cispo || v == policy_variant::vespo;
    const bool seq = v == policy_variant::gspo || v == policy_variant::luspo;
    for (aggregation agg :
         {aggregation::token_mean, aggregation::seq_mean_token_mean, aggregation::seq_mean_token_sum}) {
      for (int extras = 0; extras < 4; ++extras) {
        policy_variant_options o{.variant = v, .clip = {.clip_low = 0.15, .clip_high = 0.25}, .reduction = agg};
        if (extras == 1)
          o.rollout_is = rollout_is_options{.level = is_level::token, .mode = is_mode::truncate, .cap = 1.2};
        if (extras == 2) {
          o.rollout_is = rollout_is_options{.level = is_level::token, .mode = is_mode::mask, .cap = 1.3};
          o.opsm_delta = 0.05;
          o.top_entropy_quantile = 0.7;
          o.cispo = cispo_bound::verl_two_sided;
          o.sapo_temperature_neg = 3.0;
        }
        if (extras == 3) {  // row-constant factors, sequence-level ratios
          // VESPO takes the rollout ratio inside φ, per token only (TRL)
          o.rollout_is = rollout_is_options{.level = v == policy_variant::vespo ? is_level::token : is_level::sequence,
                                            .mode = is_mode::truncate,
                                            .cap = 1.1};
          o.opsm_delta = 0.05;
          o.sequence_ratio = true;
        }
        if (seq && (extras == 1 || extras == 2)) continue;
        auto f = [&](const E& x) {
          if (!frozen)
            return ops::item(policy_variant_loss(policy_batch<E>{x, in.A, in.m, in.old, in.roll, in.H}, o).loss);
          const E shift = ops::sub(x, in.lp);
          return ops::item(
              policy_variant_loss(
                  policy_batch<E>{x, in.A, in.m, ops::add(in.old, shift), ops::add(in.roll, shift), in.H}, o)
                  .loss);
        };
        const auto g = policy_variant_loss_backward(policy_batch<E>{in.lp, in.A, in.m, in.old, in.roll, in.H}, o);
        INFO("variant " << int(v) << " agg " << aggregation_name(agg) << " extras " << extras);
        test::check_gradient("variant", g, f, in.lp);
      }
    }
  }
  // per-token advantages, dual-clip and delta on the PPO path, log-ratio clamp on GSPO
  const E A2 = test::to_eigen<double>(test::random_normal({4, 5}, 99, 1.0));
  for (const policy_variant_options& o :
       {policy_variant_options{.variant = policy_variant::ppo, .clip = {.clip_c = 3.0, .delta = 1.3}},
        policy_variant_options{
            .variant = policy_variant::gmpo, .clip = {.clip_low = 0.1}, .reduction = aggregation::seq_mean_token_mean},
        policy_variant_options{.variant = policy_variant::sapo, .clip = {.log_ratio_clamp = 0.2}}}) {
    auto f = [&](const E& x) { return ops::item(policy_variant_loss(policy_batch<E>{x, A2, in.m, in.old}, o).loss); };
    test::check_gradient("per-token A", policy_variant_loss_backward(policy_batch<E>{in.lp, A2, in.m, in.old}, o, 1.0),
                         f, in.lp);
  }
  // GSPO's log-ratio clamp (verl clamps log s ≤ 10) with A per sequence
  const policy_variant_options og{.variant = policy_variant::gspo, .clip = {.log_ratio_clamp = 0.1}};
  auto fg = [&](const E& x) { return ops::item(policy_variant_loss(policy_batch<E>{x, in.A, in.m, in.old}, og).loss); };
  test::check_gradient("gspo clamp", policy_variant_loss_backward(policy_batch<E>{in.lp, in.A, in.m, in.old}, og), fg,
                       in.lp);
}

TEST_CASE("Policy variants: errors name the argument", "[rl][variants][errors]") {
  const auto in = random_inputs(3, 4, 5);
  const policy_batch<E> b{in.lp, in.A, in.m, in.old, in.roll, in.H};
  CHECK_THROWS_WITH(policy_variant_loss(b, {.variant = policy_variant::sapo, .sapo_temperature_pos = 0.0}),
                    Contains("sapo_temperature_pos"));
  CHECK_THROWS_WITH(policy_variant_loss(b, {.variant = policy_variant::sapo, .sapo_temperature_neg = -1.0}),
                    Contains("sapo_temperature_neg"));
  CHECK_THROWS_WITH(policy_variant_loss(b, {.vespo_lambda_neg = 0.0}), Contains("vespo_lambda_neg"));
  CHECK_THROWS_WITH(policy_variant_loss(b, {.top_entropy_quantile = 1.5}), Contains("top_entropy_quantile"));
  CHECK_THROWS_WITH(policy_variant_loss(b, {.top_entropy_quantile = -0.1}), Contains("top_entropy_quantile"));
  CHECK_THROWS_WITH(top_entropy_mask(in.H, in.m, 2.0), Contains("top_quantile"));
  CHECK_THROWS_WITH(policy_variant_loss(b, {.rollout_is = rollout_is_options{.cap = 0.0}}), Contains("rollout_is.cap"));
  CHECK_THROWS_WITH(policy_variant_loss(b, {.cispo_cap = -1.0}), Contains("cispo_cap"));
  const E bad = test::to_eigen<double>(test::random_normal({3, 5}, 1));
  CHECK_THROWS_WITH(policy_variant_loss(policy_batch<E>{in.lp, in.A, in.m, in.old, bad}), Contains("rollout_logprobs"));
  CHECK_THROWS_WITH(policy_variant_loss_backward(policy_batch<E>{in.lp, in.A, in.m, in.old, bad}),
                    Contains("rollout_logprobs has shape"));
  CHECK_THROWS_WITH(policy_variant_loss(policy_batch<E>{in.lp, in.A, in.m}, {.rollout_is = rollout_is_options{}}),
                    Contains("rollout_logprobs is required"));
  CHECK_THROWS_WITH(policy_variant_loss(policy_batch<E>{in.lp, in.A, in.m}, {.top_entropy_quantile = 0.5}),
                    Contains("entropies is required"));
  CHECK_THROWS_WITH(policy_variant_loss(policy_batch<E>{in.lp, in.A, in.m, bad}), Contains("old_logprobs"));
  CHECK_THROWS_WITH(policy_variant_loss(policy_batch<E>{in.lp, test::vec({1.0, 2.0}), in.m}), Contains("advantages"));
}

TEST_CASE("One clip_options for PPO, the variants and GRPO: TRL spellings, shared metrics, one check",
          "[rl][variants][clip]") {
  // TRL GRPOConfig epsilon / epsilon_high / delta land on clip_low / clip_high / delta; ε_high defaults to ε
  constexpr clip_options trl = clip_options::trl(0.2, 0.28, 1.5);
  STATIC_REQUIRE(trl.clip_low == 0.2);
  STATIC_REQUIRE(trl.clip_high && *trl.clip_high == 0.28);
  STATIC_REQUIRE(trl.delta && *trl.delta == 1.5);
  STATIC_REQUIRE(!trl.clip_c && !trl.log_ratio_clamp);
  STATIC_REQUIRE(clip_options::trl(0.3).high() == 0.3);
  STATIC_REQUIRE(clip_options::verl().clip_c == 3.0 && clip_options::verl().log_ratio_clamp == 20.0);
  CHECK(ppo_options::verl().clip.clip_low == 0.2);
  CHECK(!ppo_options::verl().clip.clip_high);

  // The ppo variant, ppo_policy_loss and grpo_loss (beta 0, bnpo = token mean) with one clip give the same
  // loss and the same clip fractions, low_min / high_max included
  const auto in = random_inputs(4, 6, 23, 0.5);
  const clip_options clip{.clip_low = 0.15, .clip_high = 0.25, .clip_c = 3.0, .delta = 1.4};
  const auto A = ops::mul(ops::unsqueeze(in.A, 1), ops::full_like(in.lp, 1.0));
  const auto p = ppo_policy_loss(in.lp, in.old, A, in.m, {.clip = clip});
  const auto v = policy_variant_loss(policy_batch<E>{in.lp, in.A, in.m, in.old}, {.clip = clip});
  const auto g =
      grpo_loss(grpo_batch<E>{.logprobs = in.lp, .advantages = in.A, .response_mask = in.m, .old_logprobs = in.old},
                {.loss_type = grpo_loss_type::bnpo, .clip = clip});
  CHECK(ops::item(p.clip_ratio_region) > 0);  // the batch exercises the clip
  for (const auto* r : {&v.loss, &g.loss}) test::check_same("loss", *r, p.loss, tol);
  test::check_same("variant low", v.clip_ratio_low, p.clip_ratio_low, tol);
  test::check_same("variant high", v.clip_ratio_high, p.clip_ratio_high, tol);
  test::check_same("variant region", v.clip_ratio_region, p.clip_ratio_region, tol);
  test::check_same("variant low_min", v.clip_ratio_low_min, p.clip_ratio_low_min, tol);
  test::check_same("variant high_max", v.clip_ratio_high_max, p.clip_ratio_high_max, tol);
  test::check_same("grpo low", g.clip_ratio_low, p.clip_ratio_low, tol);
  test::check_same("grpo high", g.clip_ratio_high, p.clip_ratio_high, tol);
  test::check_same("grpo region", g.clip_ratio_region, p.clip_ratio_region, tol);
  test::check_same("grpo low_min", g.clip_ratio_low_min, p.clip_ratio_low_min, tol);
  test::check_same("grpo high_max", g.clip_ratio_high_max, p.clip_ratio_high_max, tol);

  // One check (clip.hpp) names the field and its TRL spelling, from every entry point
  const policy_batch<E> b{in.lp, in.A, in.m, in.old};
  const grpo_batch<E> gb{.logprobs = in.lp, .advantages = in.A, .response_mask = in.m};
  CHECK_THROWS_WITH(policy_variant_loss(b, {.clip = {.clip_low = 0.0}}),
                    Contains("options.clip.clip_low") && Contains("TRL epsilon"));
  CHECK_THROWS_WITH(policy_variant_loss_backward(b, {.clip = {.clip_high = -1.0}}),
                    Contains("options.clip.clip_high") && Contains("TRL epsilon_high"));
  CHECK_THROWS_WITH(grpo_loss(gb, {.clip = {.clip_c = 0.5}}), Contains("options.clip.clip_c"));
  CHECK_THROWS_WITH(grpo_loss_backward(gb, {.clip = {.log_ratio_clamp = -1.0}}),
                    Contains("options.clip.log_ratio_clamp"));
  CHECK_THROWS_WITH(ppo_policy_loss(in.lp, in.old, A, in.m, {.clip = {.delta = 0.5}}), Contains("options.clip.delta"));
}

}  // namespace test_rl_variants
