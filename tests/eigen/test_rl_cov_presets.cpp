// Clip-Cov / KL-Cov, the policy-variant presets of grpo_loss and VESPO with a rollout ratio, on the Eigen
// backend (double):
//  * Clip-Cov and KL-Cov values, selections and gradients by hand (verl compute_policy_loss_clip_cov /
//    compute_policy_loss_kl_cov; Cui et al. 2025 arXiv:2505.22617 §4), the seeded random draw (count, subset
//    of the candidates, reproducible, every candidate reachable), the top rule's tie order, backward vs
//    finite differences,
//  * grpo_loss presets (TRL loss_type cispo, sapo, luspo, vespo; grpo with importance_sampling_level sequence)
//    against TRL's _compute_loss written out here in plain loops, and each preset = policy_variant_loss +
//    β·aggregate(kl) under the preset's aggregation (value and gradient), backward vs finite differences,
//  * TRL's metrics: cispo_clip_ratio, vespo/phi_seq_mean, sampling/importance_sampling_ratio/{min,mean,max},
//    clip_ratio/{low_min,high_max},
//  * VESPO with a token-level rollout ratio inside φ (TRL get_gamma_weights), truncate and mask,
//  * errors naming the argument.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/losses/grpo.hpp"
#include "posttrain/losses/policy_variants.hpp"
#include "support/data.hpp"
#include "support/eigen_checks.hpp"
#include "support/finite_difference.hpp"

namespace test_rl_cov_presets {  // one namespace per test file: the unity build compiles several in one TU

using namespace posttrain;
using Catch::Contains;

namespace {
using E = eigen_tensor<double>;
const auto tol = test::float64_tol;
std::vector<double> host(const E& x) { return ops::to_host(x); }
double sigm(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// The worked batch of the Clip-Cov / KL-Cov cases: N = 5 valid tokens, A per sequence.
//   Ā = (3·1.5 + 2·(-0.5)) / 5 = 0.7, mean logπ = -1; cov_t = (A - Ā)(logπ - mean):
//   row 0: 0.8·[0, -1, 0.5] = [0, -0.8, 0.4]; row 1: -1.2·[-0.2, 0.7] = [0.24, -0.84]
//   lr = [0.1, 0.2, 0 | -0.2, 0]; with ε = 0.2 token 1 (ρ = e^0.2 > 1.2, A > 0) is clipped by PPO.
struct worked {
  E lp = test::make({2, 3}, {-1.0, -2.0, -0.5, -1.2, -0.3, -0.9});
  E old = test::make({2, 3}, {-1.1, -2.2, -0.5, -1.0, -0.3, -0.4});
  E m = test::make({2, 3}, {1, 1, 1, 1, 1, 0});
  E A = test::vec({1.5, -0.5});
  // max(L1, L2) per valid token (PPO eq. 7, ε = 0.2)
  std::vector<double> ppo{-1.5 * std::exp(0.1), -1.5 * 1.2, -1.5, 0.5 * std::exp(-0.2), 0.5};
  // -A·ρ per valid token (KL-Cov's unclipped term)
  std::vector<double> pg{-1.5 * std::exp(0.1), -1.5 * std::exp(0.2), -1.5, 0.5 * std::exp(-0.2), 0.5};
};

struct rl_inputs {
  E lp, old, ref, roll, A, At, m, H;
};
/// [B, T] random inputs: row 1 a single token, row 2 empty (when B > 2), log-ratios spread `spread`.
rl_inputs random_inputs(std::int64_t B, std::int64_t T, std::uint64_t seed, double spread = 0.35,
                        bool empty_row = true) {
  auto lp = test::random_normal({B, T}, seed, 0.5, -1.5);
  auto d = test::random_normal({B, T}, seed + 1, spread);
  auto rd = test::random_normal({B, T}, seed + 2, 0.3);
  auto kd = test::random_normal({B, T}, seed + 3, 0.4);
  auto m = test::random_mask({B, T}, seed + 4, 0.8);
  for (std::int64_t t = 0; t < T; ++t) {
    m.values[static_cast<std::size_t>(T + t)] = t == 0 ? 1.0 : 0.0;
    if (empty_row && B > 2) m.values[static_cast<std::size_t>(2 * T + t)] = 0.0;
  }
  m.values[0] = 1.0;
  auto old = lp, roll = lp, ref = lp;
  for (std::size_t i = 0; i < lp.values.size(); ++i) {
    old.values[i] = lp.values[i] - d.values[i];
    roll.values[i] = old.values[i] - rd.values[i];
    ref.values[i] = lp.values[i] - kd.values[i];
  }
  return {test::to_eigen<double>(lp),
          test::to_eigen<double>(old),
          test::to_eigen<double>(ref),
          test::to_eigen<double>(roll),
          test::to_eigen<double>(test::random_normal({B}, seed + 5)),
          test::to_eigen<double>(test::random_normal({B, T}, seed + 6)),
          test::to_eigen<double>(m),
          test::to_eigen<double>(test::random_normal({B, T}, seed + 7, 1.0, 2.0))};
}

// TRL GRPOTrainer._compute_loss (trl/trainer/grpo_trainer.py) in plain loops, one process, no gradient
// accumulation; A per sequence. IS: TRL's vllm importance_sampling_ratio, given here already processed
// (truncated / masked) per token or per row. luspo with beta != 0: posttrain's documented form Σ m(L + βkl)/B.
struct trl_args {
  std::string loss_type = "dapo";
  double beta = 0.0, eps = 0.2, eps_high = 0.2;
  bool sequence = false;
  double tau_pos = 1.0, tau_neg = 1.05;
  double k_pos = 2.0, lam_pos = 3.0, k_neg = 3.0, lam_neg = 2.0;
  std::vector<double> is_ratio;  // [B·T] processed IS ratio (empty: none)
};
double trl_loss(const E& lpE, const E& oldE, const E& refE, const E& AE, const E& mE, const trl_args& a) {
  const auto lp = host(lpE), old = host(oldE), ref = host(refE), A = host(AE), m = host(mE);
  const auto B = static_cast<std::size_t>(lpE.shape()[0]), T = static_cast<std::size_t>(lpE.shape()[1]);
  std::vector<double> L(B * T, 0.0);
  std::vector<double> n(B, 0.0), seq_lr(B, 0.0), vespo_log(B, 0.0);
  for (std::size_t b = 0; b < B; ++b)
    for (std::size_t t = 0; t < T; ++t) {
      const std::size_t i = b * T + t;
      n[b] += m[i];
      seq_lr[b] += m[i] * (lp[i] - old[i]);
      vespo_log[b] += m[i] * std::clamp(lp[i] - old[i], -20.0, 20.0);
      if (!a.is_ratio.empty() && m[i] != 0)  // get_gamma_weights: + Σ clamp(log r, log 1e-8, 20)
        vespo_log[b] += std::clamp(std::log(a.is_ratio[i]), std::log(1e-8), 20.0);
    }
  for (std::size_t b = 0; b < B; ++b)
    for (std::size_t t = 0; t < T; ++t) {
      const std::size_t i = b * T + t;
      const double coef1 = std::exp(a.sequence ? seq_lr[b] / std::max(n[b], 1.0) : lp[i] - old[i]);
      double pl = 0;
      if (a.loss_type == "cispo") {
        pl = -std::min(coef1, a.eps_high) * A[b] * lp[i];
      } else if (a.loss_type == "sapo") {
        const double tau = A[b] > 0 ? a.tau_pos : a.tau_neg;
        pl = -sigm(tau * (coef1 - 1)) * 4 / tau * A[b];
      } else if (a.loss_type == "vespo") {
        const double lw = std::clamp(vespo_log[b], std::log(1e-8), 20.0);
        const double k = A[b] >= 0 ? a.k_pos : a.k_neg, lam = A[b] >= 0 ? a.lam_pos : a.lam_neg;
        pl = -std::exp(lam + k * lw - lam * std::exp(lw)) * A[b] * lp[i];
      } else {
        pl = -std::min(coef1 * A[b], std::clamp(coef1, 1 - a.eps, 1 + a.eps_high) * A[b]);
      }
      if (!a.is_ratio.empty() && a.loss_type != "vespo") pl *= a.is_ratio[i];
      const double kl = std::exp(ref[i] - lp[i]) - (ref[i] - lp[i]) - 1;
      L[i] = pl + a.beta * kl;
    }
  double total = 0, tokens = 0;
  for (std::size_t i = 0; i < B * T; ++i) total += m[i] * L[i], tokens += m[i];
  if (a.loss_type == "grpo" || a.loss_type == "sapo") {  // ((L·m).sum(-1) / m.sum(-1).clamp(1)).mean()
    double s = 0;
    for (std::size_t b = 0; b < B; ++b) {
      double row = 0;
      for (std::size_t t = 0; t < T; ++t) row += m[b * T + t] * L[b * T + t];
      s += row / std::max(n[b], 1.0);
    }
    return s / double(B);
  }
  if (a.loss_type == "luspo") return total / double(B);  // (L_b · |o_b|).mean() over B rows
  return total / std::max(tokens, 1.0);                  // dapo/cispo/vespo: num_items_in_batch
}
}  // namespace

TEST_CASE("Clip-Cov by hand: verl's covariance selection", "[rl][variants][cov]") {
  const worked w;
  const policy_batch<E> b{w.lp, w.A, w.m, w.old};
  policy_variant_options o{.variant = policy_variant::clip_cov};
  // covariance bounds (0.1, 5): candidates tokens 2 (0.4) and 3 (0.24); ratio 0.2 -> max(⌊0.2·5⌋, 1) = 1 token
  o.clip_cov_lb = 0.1, o.clip_cov_ratio = 0.2, o.cov_selection = cov_rule::top;
  auto r = policy_variant_loss(b, o);
  test::check_values("top selects the largest cov", r.cov_selected, {0, 0, 1, 0, 0, 0}, tol);
  // verl: pg_losses = max(L1, L2)·corr, token 2 zeroed, the normaliser still 5
  test::check_value("loss", r.loss, (w.ppo[0] + w.ppo[1] + w.ppo[3] + w.ppo[4]) / 5, tol);
  test::check_value("selected fraction (verl pg_clipfrac)", r.cov_selected_frac, 1.0 / 5, tol);
  // gradient: the PPO gradient (token mean 1/5) with the selected token's zeroed
  const auto g = host(policy_variant_loss_backward(b, o));
  const std::vector<double> want{-1.5 * std::exp(0.1) / 5, 0, 0, 0.5 * std::exp(-0.2) / 5, 0.5 / 5, 0};
  for (std::size_t i = 0; i < want.size(); ++i) CHECK(tol.accepts(g[i], want[i]));
  // ratio 0.4 -> 2 tokens: both candidates
  o.clip_cov_ratio = 0.4;
  test::check_values("both candidates", policy_variant_loss(b, o).cov_selected, {0, 0, 1, 1, 0, 0}, tol);
  // lb 0.3 leaves one candidate: only it, whatever the count
  o.clip_cov_lb = 0.3;
  test::check_values("lb excludes 0.24", policy_variant_loss(b, o).cov_selected, {0, 0, 1, 0, 0, 0}, tol);
  // lb -1 admits tokens 0, 3, 4 too, but token 1 (cov -0.8 > -1) is clipped by PPO and never a candidate;
  // ratio 1 selects every candidate: the loss keeps only token 1's clipped value
  o.clip_cov_lb = -1.0, o.clip_cov_ratio = 1.0;
  r = policy_variant_loss(b, o);
  test::check_values("PPO-clipped token excluded", r.cov_selected, {1, 0, 1, 1, 1, 0}, tol);
  test::check_value("only the clipped token left", r.loss, w.ppo[1] / 5, tol);
  // ub below every covariance: nothing selected, the loss is PPO's
  o.clip_cov_lb = -1.0, o.clip_cov_ub = -0.9;
  r = policy_variant_loss(b, o);
  test::check_value("nothing in (lb, ub)", r.cov_selected_frac, 0.0, tol);
  test::check_same("= ppo", r.loss, policy_variant_loss(b, {.variant = policy_variant::ppo}).loss, tol);
}

TEST_CASE("Clip-Cov's seeded random draw", "[rl][variants][cov]") {
  const worked w;
  const policy_batch<E> b{w.lp, w.A, w.m, w.old};
  policy_variant_options o{.variant = policy_variant::clip_cov};  // default rule: random (verl randperm)
  o.clip_cov_lb = 0.1, o.clip_cov_ratio = 0.2;
  int picked2 = 0;
  for (std::uint64_t seed = 0; seed < 200; ++seed) {
    o.cov_seed = seed;
    const auto s = host(policy_variant_loss(b, o).cov_selected);
    // one of the two candidates, never another token
    REQUIRE(s[0] + s[1] + s[4] + s[5] == 0);
    REQUIRE(s[2] + s[3] == 1);
    picked2 += int(s[2]);
    // the same seed picks the same token (forward and backward agree on it)
    CHECK(host(policy_variant_loss(b, o).cov_selected) == s);
    const auto g = host(policy_variant_loss_backward(b, o));
    CHECK((s[2] == 1 ? g[3] != 0 && g[2] == 0 : g[2] != 0 && g[3] == 0));
  }
  // both candidates reachable, roughly evenly (splitmix64 is deterministic: this count is fixed)
  CHECK(picked2 > 60);
  CHECK(picked2 < 140);
}

TEST_CASE("KL-Cov by hand: |log-ratio| on the top-covariance tokens", "[rl][variants][cov]") {
  const worked w;
  const policy_batch<E> b{w.lp, w.A, w.m, w.old};
  // default ratio 2e-4: max(⌊2e-4·5⌋, 1) = 1 token, the largest cov (token 2, where lr = 0)
  policy_variant_options o{.variant = policy_variant::kl_cov};
  auto r = policy_variant_loss(b, o);
  test::check_values("one token", r.cov_selected, {0, 0, 1, 0, 0, 0}, tol);
  const double pg_sum = w.pg[0] + w.pg[1] + w.pg[2] + w.pg[3] + w.pg[4];
  test::check_value("loss, |lr| = 0 on token 2", r.loss, pg_sum / 5, tol);
  // ratio 0.4: 2 tokens (2, 3); coef 0.5 · |-0.2| joins token 3 (verl: -A·ρ + ppo_kl_coef·|lr|, no clipping)
  o.kl_cov_ratio = 0.4, o.kl_cov_coef = 0.5;
  r = policy_variant_loss(b, o);
  test::check_values("two tokens", r.cov_selected, {0, 0, 1, 1, 0, 0}, tol);
  test::check_value("loss", r.loss, (pg_sum + 0.5 * 0.2) / 5, tol);
  test::check_value("fraction", r.cov_selected_frac, 2.0 / 5, tol);
  // gradient: -A·ρ everywhere (token 1 unclipped), + coef·sign(lr) on token 3; sign(0) = 0 on token 2
  const auto g = host(policy_variant_loss_backward(b, o));
  const std::vector<double> want{w.pg[0] / 5, w.pg[1] / 5, w.pg[2] / 5, (w.pg[3] - 0.5) / 5, w.pg[4] / 5, 0};
  for (std::size_t i = 0; i < want.size(); ++i) CHECK(tol.accepts(g[i], want[i]));
  // the random rule draws among every valid token
  o.cov_selection = cov_rule::random, o.kl_cov_ratio = 0.6;
  const auto s = host(policy_variant_loss(b, o).cov_selected);
  CHECK(s[5] == 0);
  CHECK(s[0] + s[1] + s[2] + s[3] + s[4] == 3);
  // ties (A constant: every cov 0) go to the lower row-major index, as a stable sort would
  o = {.variant = policy_variant::kl_cov};
  o.kl_cov_ratio = 0.4;
  test::check_values("ties",
                     policy_variant_loss(policy_batch<E>{w.lp, test::vec({1.0, 1.0}), w.m, w.old}, o).cov_selected,
                     {1, 1, 0, 0, 0, 0}, tol);
  // no valid token: nothing selected, loss 0, no NaN
  const E none = test::make({2, 3}, {0, 0, 0, 0, 0, 0});
  r = policy_variant_loss(policy_batch<E>{w.lp, w.A, none, w.old}, o);
  test::check_value("empty batch", r.loss, 0.0, tol);
  test::check_value("empty batch fraction", r.cov_selected_frac, 0.0, tol);
}

TEST_CASE("Clip-Cov and KL-Cov: random batches, counts and finite differences", "[rl][variants][cov][grad]") {
  const auto in = random_inputs(6, 9, 31, 0.35);
  const double n_valid = ops::item(ops::sum_all(in.m));
  for (auto v : {policy_variant::clip_cov, policy_variant::kl_cov})
    for (auto rule : {cov_rule::random, cov_rule::top})
      for (aggregation agg : {aggregation::token_mean, aggregation::seq_mean_token_mean, aggregation::sum})
        for (double ratio : {2e-4, 0.1, 0.3}) {
          policy_variant_options o{.variant = v, .clip = {.clip_low = 0.2, .clip_high = 0.28}, .reduction = agg};
          o.clip_cov_ratio = o.kl_cov_ratio = ratio;
          o.clip_cov_lb = -0.2, o.clip_cov_ub = 0.8, o.kl_cov_coef = 0.3;
          o.cov_selection = rule, o.cov_seed = 7;
          INFO("variant " << int(v) << " rule " << int(rule) << " agg " << aggregation_name(agg) << " ratio " << ratio);
          const policy_batch<E> b{in.lp, in.A, in.m, in.old};
          const auto r = policy_variant_loss(b, o);
          const auto s = host(r.cov_selected), mv = host(in.m);
          double count = 0;
          for (std::size_t i = 0; i < s.size(); ++i) {
            CHECK((s[i] == 0 || (s[i] == 1 && mv[i] == 1)));
            count += s[i];
          }
          const double k = std::max(std::floor(ratio * n_valid), 1.0);
          if (v == policy_variant::kl_cov) CHECK(count == k);
          if (v == policy_variant::clip_cov) CHECK(count <= k);
          auto f = [&](const E& x) {
            return ops::item(policy_variant_loss(policy_batch<E>{x, in.A, in.m, in.old}, o).loss);
          };
          test::check_gradient("cov variant", policy_variant_loss_backward(b, o), f, in.lp);
        }
  // per-token advantages and a log-ratio clamp
  for (auto v : {policy_variant::clip_cov, policy_variant::kl_cov}) {
    policy_variant_options o{.variant = v, .clip = {.log_ratio_clamp = 0.3}};
    o.clip_cov_ratio = o.kl_cov_ratio = 0.2;
    o.clip_cov_lb = -0.5;
    auto f = [&](const E& x) {
      return ops::item(policy_variant_loss(policy_batch<E>{x, in.At, in.m, in.old}, o).loss);
    };
    test::check_gradient("per-token A", policy_variant_loss_backward(policy_batch<E>{in.lp, in.At, in.m, in.old}, o), f,
                         in.lp);
  }
}

TEST_CASE("VESPO with a rollout ratio: TRL puts it inside phi", "[rl][variants][vespo][is]") {
  // TRL get_gamma_weights: log w = Σ_t clamp(lr, ±20) + Σ_t clamp(log r_t, log 1e-8, 20), r_t the processed
  // (truncated / masked) token ratio π_old/π_sampler; the loss is -φ·A·logπ, not multiplied by r.
  const E lp = test::make({2, 2}, {-1.0, -2.0, -0.5, -3.0});
  const E old = test::make({2, 2}, {-1.2, -2.1, -0.1, -3.0});   // lr = 0.2, 0.1 | -0.4, 0
  const E roll = test::make({2, 2}, {-1.5, -2.1, -0.1, -2.0});  // old - roll = 0.3, 0 | 0, -1
  const E m = test::make({2, 2}, {1, 1, 1, 1});
  const E A = test::vec({1.0, -2.0});
  auto phi = [](double lw, bool pos) {
    lw = std::clamp(lw, std::log(1e-8), 20.0);
    const double k = pos ? 2.0 : 3.0, lam = pos ? 3.0 : 2.0;
    return std::exp(lam + k * lw - lam * std::exp(lw));
  };
  auto o = policy_variant_options::trl_vespo();
  // token truncate at 1.2: r = min(e^0.3, 1.2) = 1.2, 1 | 1, e^-1
  o.rollout_is = rollout_is_options{.level = is_level::token, .mode = is_mode::truncate, .cap = 1.2};
  const double p0 = phi(0.3 + std::log(1.2), true), p1 = phi(-0.4 - 1.0, false);
  auto r = policy_variant_loss(policy_batch<E>{lp, A, m, old, roll}, o);
  test::check_values("phi", r.phi, {p0, p0, p1, p1}, tol);
  test::check_value("loss (not multiplied by r)", r.loss, (-p0 * 1 * -3.0 - p1 * -2 * -3.5) / 4, tol);
  test::check_values("is weight reported", r.is_weight, {1.2, 1.0, 1.0, std::exp(-1.0)}, tol);
  // token mask [0.5, 1.2]: r = e^0.3 > 1.2 and e^-1 < 0.5 masked -> log 0 floored at log 1e-8: φ underflows
  o.rollout_is = rollout_is_options{.level = is_level::token, .mode = is_mode::mask, .cap = 1.2, .lower = 0.5};
  r = policy_variant_loss(policy_batch<E>{lp, A, m, old, roll}, o);
  const double q0 = phi(0.3 + std::log(1e-8), true), q1 = phi(-0.4 + std::log(1e-8), false);
  test::check_values("masked phi", r.phi, {q0, q0, q1, q1}, tol);
  CHECK(q0 < 1e-10);
  // cap = +inf, truncate: the raw ratio enters
  o.rollout_is = rollout_is_options{
      .level = is_level::token, .mode = is_mode::truncate, .cap = std::numeric_limits<double>::infinity()};
  const double s0 = phi(0.3 + 0.3, true), s1 = phi(-0.4 - 1.0, false);
  test::check_values("inf cap", policy_variant_loss(policy_batch<E>{lp, A, m, old, roll}, o).phi, {s0, s0, s1, s1},
                     tol);
  // rollout = old: φ as without IS
  test::check_same("no drift", policy_variant_loss(policy_batch<E>{lp, A, m, old, old}, o).loss,
                   policy_variant_loss(policy_batch<E>{lp, A, m, old}, policy_variant_options::trl_vespo()).loss, tol);
}

TEST_CASE("GRPO presets cispo, sapo, luspo, vespo, gspo against TRL's loops", "[rl][grpo][presets]") {
  const auto in = random_inputs(5, 7, 41, 0.35);
  // TRL's grpo/sapo normaliser divides by every row, posttrain's seq-mean-token-mean by the non-empty rows
  // (verl): with an empty row, normalizer = B reproduces TRL.
  const double B = 5;
  struct preset {
    grpo_loss_type type;
    std::string name;
    bool sequence;
  };
  for (const preset& p : {preset{grpo_loss_type::cispo, "cispo", false}, preset{grpo_loss_type::cispo, "cispo", true},
                          preset{grpo_loss_type::sapo, "sapo", false}, preset{grpo_loss_type::sapo, "sapo", true},
                          preset{grpo_loss_type::luspo, "luspo", true}, preset{grpo_loss_type::vespo, "vespo", false},
                          preset{grpo_loss_type::grpo, "grpo", true}, preset{grpo_loss_type::dapo, "dapo", false}})
    for (double beta : {0.0, 0.04})
      for (double eps_high : {0.28, 5.0}) {
        INFO(p.name << " sequence " << p.sequence << " beta " << beta << " eps_high " << eps_high);
        grpo_options o{.loss_type = p.type, .beta = beta, .clip = {.clip_high = eps_high}};
        o.importance_sampling_level = p.sequence ? grpo_is_level::sequence : grpo_is_level::token;
        if (p.type == grpo_loss_type::grpo || p.type == grpo_loss_type::sapo) o.normalizer = B;
        const grpo_batch<E> b{in.lp, in.A, in.m, in.old, in.ref};
        trl_args a;
        a.loss_type = p.name, a.beta = beta, a.eps_high = eps_high, a.sequence = p.sequence;
        test::check_value("vs TRL", grpo_loss(b, o).loss, trl_loss(in.lp, in.old, in.ref, in.A, in.m, a), tol);
        auto f = [&](const E& x) {
          // stop-gradient weights (CISPO's clamp, VESPO's φ) frozen by moving old with the probe
          const bool frozen = p.type == grpo_loss_type::cispo || p.type == grpo_loss_type::vespo;
          const E old = frozen ? ops::add(in.old, ops::sub(x, in.lp)) : in.old;
          return ops::item(grpo_loss(grpo_batch<E>{x, in.A, in.m, old, in.ref}, o).loss);
        };
        test::check_gradient("grpo preset backward", grpo_loss_backward(b, o), f, in.lp);
      }
}

TEST_CASE("Each GRPO preset is its policy variant plus beta times the aggregated KL", "[rl][grpo][presets]") {
  const auto in = random_inputs(5, 7, 43, 0.5);
  const double beta = 0.1;
  struct preset {
    grpo_loss_type type;
    policy_variant_options v;
    grpo_is_level level;
  };
  auto with_cap = [](double cap) {
    auto v = policy_variant_options::trl_cispo();
    v.cispo_cap = cap;
    return v;
  };
  auto seq = [](policy_variant_options v) {
    v.sequence_ratio = true;
    return v;
  };
  const policy_variant_options gspo{
      .variant = policy_variant::gspo, .clip = {.clip_high = 0.28}, .reduction = aggregation::seq_mean_token_mean};
  for (const preset& p :
       {preset{grpo_loss_type::cispo, with_cap(0.28), grpo_is_level::token},
        preset{grpo_loss_type::sapo, policy_variant_options::trl_sapo(), grpo_is_level::token},
        preset{grpo_loss_type::sapo, seq(policy_variant_options::trl_sapo()), grpo_is_level::sequence},
        preset{grpo_loss_type::luspo,
               {.variant = policy_variant::luspo, .clip = {.clip_high = 0.28}},
               grpo_is_level::sequence},
        preset{grpo_loss_type::vespo, policy_variant_options::trl_vespo(), grpo_is_level::token},
        preset{grpo_loss_type::grpo, gspo, grpo_is_level::sequence}})
    for (int extras = 0; extras < 3; ++extras) {
      grpo_options o{.loss_type = p.type, .beta = beta, .clip = {.clip_high = 0.28}};
      o.importance_sampling_level = p.level;
      auto v = p.v;
      if (p.type != grpo_loss_type::luspo && p.type != grpo_loss_type::grpo && p.type != grpo_loss_type::sapo)
        v.clip.clip_high = 0.28;
      if (extras >= 1) {
        o.rollout_is = v.rollout_is =
            rollout_is_options{.level = is_level::token, .mode = is_mode::truncate, .cap = 1.3};
        o.opsm_delta = v.opsm_delta = 0.05;
      }
      if (extras == 2) {
        o.top_entropy_quantile = v.top_entropy_quantile = 0.6;
        o.normalizer = v.normalizer = 11.0;  // a global normaliser passes through to both
      }
      INFO("loss type " << grpo_loss_type_name(p.type) << " extras " << extras);
      const grpo_batch<E> b{in.lp, in.A, in.m, in.old, in.ref, in.roll, in.H};
      const policy_batch<E> pb{in.lp, in.A, in.m, in.old, in.roll, in.H};
      const aggregation agg = grpo_aggregation(p.type);
      std::optional<double> norm = o.normalizer;
      if (p.type == grpo_loss_type::luspo && !norm) norm = 5.0;  // TRL luspo: the B rows
      v.reduction = agg;
      if (p.type == grpo_loss_type::luspo) v.normalizer = norm;
      const E kl = kl_penalty(in.lp, in.ref);
      const auto r = grpo_loss(b, o);
      const auto pv = policy_variant_loss(pb, v);
      test::check_value("value", r.loss, ops::item(pv.loss) + beta * ops::item(aggregate(kl, in.m, agg, norm)), tol);
      const E w = aggregation_weights(in.m, agg, norm);
      const E want_grad =
          ops::add(policy_variant_loss_backward(pb, v),
                   ops::mul(ops::mul(kl_penalty_backward(in.lp, in.ref, ops::full_like(in.lp, 1.0)), w), beta));
      test::check_same("gradient", grpo_loss_backward(b, o), want_grad, tol);
    }
}

TEST_CASE("GRPO preset metrics as TRL logs them", "[rl][grpo][presets][metrics]") {
  // rows: 0 = 3 tokens, 1 = 2 tokens, 2 empty; lr = [0.5, -0.1, 0.3 | -0.4, 0.05 | -]
  const E lp = test::make({3, 3}, {-1.0, -2.0, -0.5, -1.2, -0.3, -0.9, -1, -1, -1});
  const E old = test::make({3, 3}, {-1.5, -1.9, -0.8, -0.8, -0.35, -0.9, -1, -1, -1});
  const E roll = test::make({3, 3}, {-1.0, -1.9, -0.8, -0.3, -0.35, -0.9, -1, -1, -1});  // old-roll: -.5,0,0|-.5,0
  const E m = test::make({3, 3}, {1, 1, 1, 1, 1, 0, 0, 0, 0});
  const E A = test::vec({1.0, -1.0, 0.5});
  // cispo, cap ε_high = 1.2: (ρ > 1.2) & (A > 0): token 0 (e^0.5 = 1.65), token 2 (e^0.3 = 1.35) -> 2 / 5
  auto r = grpo_loss(grpo_batch<E>{lp, A, m, old}, {.loss_type = grpo_loss_type::cispo, .clip = {.clip_high = 1.2}});
  test::check_value("cispo_clip_ratio", r.cispo_clip_ratio, 2.0 / 5, tol);
  // sequence level: coef_1 per row = e^{0.7/3}, e^{-0.35/2}, e^0 = 1.26, 0.84, 1; over the 3 rows: row 0 -> 1/3
  grpo_options os{.loss_type = grpo_loss_type::cispo, .clip = {.clip_high = 1.2}};
  os.importance_sampling_level = grpo_is_level::sequence;
  test::check_value("cispo_clip_ratio, sequence", grpo_loss(grpo_batch<E>{lp, A, m, old}, os).cispo_clip_ratio, 1.0 / 3,
                    tol);
  // clip ratios, ε = 0.2 (dapo): high = (ρ > 1.2) & (A > 0): row 0 tokens 0, 2 -> 2/3; low = (ρ < 0.8) & (A < 0):
  // row 1 token 0 (e^-0.4 = 0.67) -> 1/2. high_mean 2/5, low_mean 1/5; low_min over rows with a token
  // min(0, 1/2) = 0; high_max = 2/3
  r = grpo_loss(grpo_batch<E>{lp, A, m, old}, {.loss_type = grpo_loss_type::dapo});
  test::check_value("high_mean", r.clip_ratio_high, 2.0 / 5, tol);
  test::check_value("low_mean", r.clip_ratio_low, 1.0 / 5, tol);
  test::check_value("low_min", r.clip_ratio_low_min, 0.0, tol);
  test::check_value("high_max", r.clip_ratio_high_max, 2.0 / 3, tol);
  // only row 1 kept: low_min = 1/2
  const E m1 = test::make({3, 3}, {0, 0, 0, 1, 1, 0, 0, 0, 0});
  r = grpo_loss(grpo_batch<E>{lp, A, m1, old}, {.loss_type = grpo_loss_type::dapo});
  test::check_value("low_min one row", r.clip_ratio_low_min, 0.5, tol);
  test::check_value("high_max one row", r.clip_ratio_high_max, 0.0, tol);
  // vespo/phi_seq_mean: mean of φ_i over the 3 rows (the empty row's w = 1, φ = 1)
  auto phi = [](double lw, bool pos) {
    const double k = pos ? 2.0 : 3.0, lam = pos ? 3.0 : 2.0;
    return std::exp(lam + k * lw - lam * std::exp(lw));
  };
  r = grpo_loss(grpo_batch<E>{lp, A, m, old}, {.loss_type = grpo_loss_type::vespo});
  test::check_value("vespo phi_seq_mean", r.vespo_phi_seq_mean, (phi(0.7, true) + phi(-0.35, false) + 1.0) / 3, tol);
  // IS statistics of the processed ratio (TRL logs it after truncation / masking). Token level: r = e^-0.5, 1, 1 |
  // e^-0.5, 1 truncated to [0.7, 3] (TRL clip_min 0.7): 0.7, 1, 1, 0.7, 1 -> min 0.7, mean 4.4/5, max 1
  grpo_options oi{.loss_type = grpo_loss_type::dapo};
  oi.rollout_is = rollout_is_options{.level = is_level::token, .mode = is_mode::truncate, .cap = 3.0, .lower = 0.7};
  r = grpo_loss(grpo_batch<E>{lp, A, m, old, std::nullopt, roll}, oi);
  test::check_value("is min", r.is_ratio_min, 0.7, tol);
  test::check_value("is mean", r.is_ratio_mean, 4.4 / 5, tol);
  test::check_value("is max", r.is_ratio_max, 1.0, tol);
  // sequence mask at 3 (TRL default): per row e^-0.5, e^-0.5, 1 (empty row: exp(0)) over the 3 rows
  oi.rollout_is = rollout_is_options{};
  r = grpo_loss(grpo_batch<E>{lp, A, m, old, std::nullopt, roll}, oi);
  test::check_value("seq is min", r.is_ratio_min, std::exp(-0.5), tol);
  test::check_value("seq is mean", r.is_ratio_mean, (2 * std::exp(-0.5) + 1) / 3, tol);
  test::check_value("seq is max", r.is_ratio_max, 1.0, tol);
  // without rollout IS: 1 (TRL does not log them)
  test::check_value("no IS", grpo_loss(grpo_batch<E>{lp, A, m, old}).is_ratio_mean, 1.0, tol);
}

TEST_CASE("Clip-Cov, KL-Cov and GRPO presets: errors name the argument", "[rl][variants][cov][errors]") {
  const worked w;
  const policy_batch<E> b{w.lp, w.A, w.m, w.old, w.old};
  auto cc = [](auto set) {
    policy_variant_options o{.variant = policy_variant::clip_cov};
    set(o);
    return o;
  };
  CHECK_THROWS_WITH(policy_variant_loss(b, cc([](auto& o) { o.clip_cov_ratio = 0.0; })), Contains("clip_cov_ratio"));
  CHECK_THROWS_WITH(policy_variant_loss(b, cc([](auto& o) { o.clip_cov_ratio = 1.5; })), Contains("clip_cov_ratio"));
  CHECK_THROWS_WITH(policy_variant_loss(b, cc([](auto& o) { o.clip_cov_lb = 5.0; })), Contains("clip_cov_lb"));
  CHECK_THROWS_WITH(policy_variant_loss(b, cc([](auto& o) { o.clip_cov_ub = std::nan(""); })), Contains("clip_cov_ub"));
  CHECK_THROWS_WITH(policy_variant_loss(b, cc([](auto& o) { o.kl_cov_ratio = -0.1; })), Contains("kl_cov_ratio"));
  CHECK_THROWS_WITH(policy_variant_loss(b, cc([](auto& o) { o.kl_cov_coef = -1.0; })), Contains("kl_cov_coef"));
  CHECK_THROWS_WITH(
      policy_variant_loss(b, cc([](auto& o) { o.kl_cov_coef = std::numeric_limits<double>::infinity(); })),
      Contains("kl_cov_coef"));
  auto ov = policy_variant_options::trl_vespo();
  ov.rollout_is = rollout_is_options{};  // sequence level
  CHECK_THROWS_WITH(policy_variant_loss(b, ov), Contains("rollout_is.level"));
  // grpo_loss
  const E bad = test::make({2, 2}, {0, 0, 0, 0});
  grpo_options og{.loss_type = grpo_loss_type::vespo};
  og.rollout_is = rollout_is_options{.level = is_level::token};
  CHECK_THROWS_WITH(grpo_loss(grpo_batch<E>{w.lp, w.A, w.m, w.old, std::nullopt, bad}, og),
                    Contains("rollout_logprobs has shape"));
  CHECK_THROWS_WITH(grpo_loss(grpo_batch<E>{w.lp, w.A, w.m, w.old}, og), Contains("rollout_logprobs is required"));
  og.rollout_is = rollout_is_options{.level = is_level::sequence};
  CHECK_THROWS_WITH(grpo_loss(grpo_batch<E>{w.lp, w.A, w.m, w.old, std::nullopt, w.old}, og),
                    Contains("rollout_is.level"));
  grpo_options os{.loss_type = grpo_loss_type::sapo, .beta = 0.1, .bias_corrected_kl = true};
  os.importance_sampling_level = grpo_is_level::sequence;
  CHECK_THROWS_WITH(grpo_loss(grpo_batch<E>{w.lp, w.A, w.m, w.old, w.lp}, os), Contains("bias_corrected_kl"));
  grpo_options ot{.loss_type = grpo_loss_type::sapo};
  ot.sapo_temperature_neg = 0.0;
  CHECK_THROWS_WITH(grpo_loss(grpo_batch<E>{w.lp, w.A, w.m, w.old}, ot), Contains("sapo_temperature_neg"));
  ot = {.loss_type = grpo_loss_type::vespo};
  ot.vespo_lambda_pos = -1.0;
  CHECK_THROWS_WITH(grpo_loss_backward(grpo_batch<E>{w.lp, w.A, w.m, w.old}, ot), Contains("vespo_lambda_pos"));
  ot = {};
  ot.top_entropy_quantile = 2.0;
  CHECK_THROWS_WITH(grpo_loss(grpo_batch<E>{w.lp, w.A, w.m, w.old, std::nullopt, std::nullopt, w.lp}, ot),
                    Contains("top_entropy_quantile"));
}

TEST_CASE("ppo_policy_loss: TRL's clip_ratio low_min / high_max and the entropy metric", "[rl][ppo][metrics]") {
  // the metrics case's rows: high = (ρ > 1.2) & (A > 0) row 0 -> 2/3; low = (ρ < 0.8) & (A < 0) row 1 -> 1/2
  const E lp = test::make({3, 3}, {-1.0, -2.0, -0.5, -1.2, -0.3, -0.9, -1, -1, -1});
  const E old = test::make({3, 3}, {-1.5, -1.9, -0.8, -0.8, -0.35, -0.9, -1, -1, -1});
  const E m = test::make({3, 3}, {1, 1, 1, 1, 1, 0, 0, 0, 0});
  const E A = test::make({3, 3}, {1, 1, 1, -1, -1, -1, 0.5, 0.5, 0.5});
  const E H = test::make({3, 3}, {0.5, 1.0, 1.5, 2.0, 3.0, 99, 99, 99, 99});
  const auto r = ppo_policy_loss(lp, old, A, m, {}, std::optional<E>(H));
  test::check_value("low_min (rows with a token: 0, 1/2)", r.clip_ratio_low_min, 0.0, tol);
  test::check_value("high_max", r.clip_ratio_high_max, 2.0 / 3, tol);
  test::check_value("entropy (masked mean)", r.entropy, 8.0 / 5, tol);
  // the same numbers as grpo_loss's dapo preset
  const auto g = grpo_loss(grpo_batch<E>{lp, test::vec({1.0, -1.0, 0.5}), m, old}, {.loss_type = grpo_loss_type::dapo});
  test::check_same("= grpo low_min", r.clip_ratio_low_min, g.clip_ratio_low_min, tol);
  test::check_same("= grpo high_max", r.clip_ratio_high_max, g.clip_ratio_high_max, tol);
  // rank-1 inputs are one row: low_min = low_mean, high_max = high_mean; no entropies -> 0
  const E lp1 = test::vec({-1.0, -2.0, -0.5, -1.2}), old1 = test::vec({-1.5, -1.9, -0.8, -0.8});
  const E A1 = test::vec({1, 1, -1, -1}), m1 = test::vec({1, 1, 1, 1});
  const auto r1 = ppo_policy_loss(lp1, old1, A1, m1);
  test::check_same("rank 1 low", r1.clip_ratio_low_min, r1.clip_ratio_low, tol);
  test::check_same("rank 1 high", r1.clip_ratio_high_max, r1.clip_ratio_high, tol);
  test::check_value("rank 1 high value (e^0.5 > 1.2)", r1.clip_ratio_high_max, 1.0 / 4, tol);
  test::check_value("no entropies", r1.entropy, 0.0, tol);
  CHECK_THROWS_WITH(ppo_policy_loss(lp, old, A, m, {}, std::optional<E>(test::make({3, 2}, {0, 0, 0, 0, 0, 0}))),
                    Contains("entropies"));
}

}  // namespace test_rl_cov_presets
