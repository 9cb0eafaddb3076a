// Peer conventions (issue 17): each option reproduces one framework's arithmetic to 1e-12 relative in float64.
// Golden values come from tests/reference/make_golden_conventions.py, which re-types verl (b178a3c), OpenRLHF
// (3c3be62, 0489850) and TRL (f2cd577) formulas with plain Python floats and differentiates them exactly with dual
// numbers; analytic backwards are also checked against central differences, and each default is checked to differ.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/posttrain.hpp"
#include "reference/golden_conventions.hpp"
#include "support/eigen_checks.hpp"
#include "support/finite_difference.hpp"

namespace test_peer_conventions {  // one namespace per test file: the unity build compiles several in one TU

using namespace posttrain;
namespace g = posttrain::golden_conventions;
using Catch::Matchers::Contains;

namespace {
using E = eigen_tensor<double>;
E bt(const std::vector<double>& v) { return test::make({g::B, g::T}, v); }
constexpr auto tol = test::conventions_tol;

/// got differs from want by more than the conventions tolerance (an option that changes nothing proves nothing).
bool differs(const E& got, const std::vector<double>& want) {
  const auto h = ops::to_host(got);
  for (std::size_t i = 0; i < h.size(); ++i)
    if (!tol.accepts(h[i], want[i])) return true;
  return false;
}

void expect_rejected(const std::function<void()>& call, const std::string& function, const std::string& argument) {
  INFO("expected posttrain::" << function << " to reject " << argument);
  CHECK_THROWS_AS(call(), posttrain::error);
  CHECK_THROWS_WITH(call(), Catch::Matchers::StartsWith("posttrain::" + function + ": "));
  CHECK_THROWS_WITH(call(), Contains(argument));
}
}  // namespace

TEST_CASE("Conventions: verl masked_mean / masked_var / masked_whiten (count + 1e-8)", "[conventions]") {
  const E x = bt(g::x), m = bt(g::mask);
  const auto verl = masked_options::verl();
  test::check_value("masked_mean", masked_mean(x, m, std::nullopt, verl), g::verl_masked_mean, tol);
  test::check_values("masked_mean rows", masked_mean(x, m, 1, verl), g::verl_masked_mean_rows, tol);
  test::check_value("masked_var", masked_var(x, m, true, std::nullopt, verl), g::verl_masked_var, tol);
  test::check_value("masked_var biased", masked_var(x, m, false, std::nullopt, verl), g::verl_masked_var_biased, tol);
  test::check_values("masked_whiten", masked_whiten(x, m, whiten_options::verl()), g::verl_masked_whiten, tol);
  // the default is the exact mean (TRL): it differs from verl's by more than the tolerance
  CHECK(differs(masked_mean(x, m), {g::verl_masked_mean}));
  CHECK(differs(masked_whiten(x, m, {.outside = whiten_outside::whitened}), g::verl_masked_whiten));
  // default: zero outside the mask; keep: the input there
  const auto zero = ops::to_host(masked_whiten(x, m)),
             keep = ops::to_host(masked_whiten(x, m, {.outside = whiten_outside::keep}));
  for (std::size_t i = 0; i < g::x.size(); ++i) {
    if (g::mask[i] != 0) continue;
    CHECK(zero[i] == 0.0);
    CHECK(keep[i] == g::x[i]);
  }
}

TEST_CASE("Conventions: OpenRLHF advantage normalisation (biased, floored, every position, centre-only)",
          "[conventions]") {
  test::check_values("whiten", masked_whiten(bt(g::x), bt(g::mask), whiten_options::openrlhf()), g::openrlhf_whiten,
                     tol);
  test::check_values("centre only (no_std_norm)", masked_whiten(bt(g::x), bt(g::mask), whiten_options::openrlhf(false)),
                     g::openrlhf_centre, tol);
  // variance below 1e-8: OpenRLHF floors it, the default adds ε
  const E xc = bt(g::x_const), mc = bt(g::mask_const);
  test::check_values("variance floor", masked_whiten(xc, mc, whiten_options::openrlhf()), g::openrlhf_whiten_floor,
                     tol);
  whiten_options added = whiten_options::openrlhf();
  added.guard = variance_guard::add;
  CHECK(differs(masked_whiten(xc, mc, added), g::openrlhf_whiten_floor));
}

TEST_CASE("Conventions: seq-mean-token-mean over token count + 1e-8 (verl agg_loss, OpenRLHF aggregate_loss)",
          "[conventions]") {
  const E L = bt(g::loss), m = bt(g::mask);
  const auto mode = aggregation::seq_mean_token_mean;
  test::check_value("verl agg_loss", aggregate(L, m, mode, std::nullopt, 1e-8), g::verl_seq_mean_token_mean, tol);
  test::check_value("verl agg_loss, global_batch_size 4", aggregate(L, m, mode, 4.0, 1e-8),
                    g::verl_seq_mean_token_mean_global, tol);
  test::check_value("OpenRLHF sample-level", aggregate(L, m, mode, std::nullopt, 1e-8), g::openrlhf_sample_level, tol);
  // the gradient with respect to the per-token loss is the weight matrix
  test::check_values("d loss / d L", aggregation_weights(m, mode, std::nullopt, 1e-8), g::verl_seq_mean_token_mean_grad,
                     tol);
  // default: exact per-sequence means (TRL grpo)
  CHECK(differs(aggregate(L, m, mode), {g::verl_seq_mean_token_mean}));
  // the guard only concerns seq_mean_token_mean
  test::check_same("token_mean ignores it", aggregate(L, m, aggregation::token_mean, std::nullopt, 1e-8),
                   aggregate(L, m, aggregation::token_mean), tol);
}

TEST_CASE("Conventions: verl GAE outputs outside the response mask", "[conventions]") {
  const E r = bt(g::rewards), v = bt(g::values), m = bt(g::mask);
  const auto verl = gae(r, v, m, gae_options::verl(0.9, 0.8));
  test::check_values("advantages (whitened, every position)", verl.advantages, g::verl_gae_advantages, tol);
  test::check_values("returns (carried A + V)", verl.returns, g::verl_gae_returns, tol);
  auto raw_opt = gae_options::verl(0.9, 0.8);
  raw_opt.whiten = false;
  test::check_values("raw advantages", gae(r, v, m, raw_opt).advantages, g::verl_gae_raw, tol);
  // default: the same values at kept positions (up to verl's +1e-8 count guard), 0 elsewhere
  const auto plain = gae(r, v, m, {.gamma = 0.9, .lambda = 0.8});
  const auto a = ops::to_host(plain.advantages), ret = ops::to_host(plain.returns);
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (g::mask[i] != 0) {
      CHECK(ret[i] == Approx(g::verl_gae_returns[i]).epsilon(1e-12));
      CHECK(a[i] == Approx(g::verl_gae_advantages[i]).epsilon(1e-6));
    } else {
      CHECK(a[i] == 0.0);
      CHECK(ret[i] == 0.0);
    }
  }
}

TEST_CASE("Conventions: verl PPO metrics through verl_F.masked_mean (+ 1e-8)", "[conventions]") {
  const E lp = bt(g::logprobs), old = bt(g::old_logprobs), A = bt(g::advantages), m = bt(g::mask);
  auto o = ppo_options::verl();
  o.clip.clip_high = 0.28;
  const auto r = ppo_policy_loss(lp, old, A, m, o);
  test::check_value("pg_loss (token-mean)", r.loss, g::verl_pg_loss_token_mean, tol);
  test::check_value("pg_clipfrac", r.pg_clipfrac, g::verl_pg_clipfrac, tol);
  test::check_value("pg_clipfrac_lower", r.pg_clipfrac_lower, g::verl_pg_clipfrac_lower, tol);
  test::check_value("ppo_kl", r.approx_kl, g::verl_ppo_kl, tol);
  o.reduction = aggregation::seq_mean_token_mean;
  test::check_value("pg_loss (seq-mean-token-mean)", ppo_policy_loss(lp, old, A, m, o).loss,
                    g::verl_pg_loss_seq_mean_token_mean, tol);
  // default metrics: exact means, and ppo_kl before the clamp (OpenRLHF)
  o.metrics = {};
  CHECK(differs(ppo_policy_loss(lp, old, A, m, o).pg_clipfrac, {g::verl_pg_clipfrac}));
  o.metrics = masked_options::verl();
  o.clamped_kl_metric = false;
  CHECK(differs(ppo_policy_loss(lp, old, A, m, o).approx_kl, {g::verl_ppo_kl}));
}

TEST_CASE("Conventions: OpenRLHF compute_reward clamps scores before KL shaping", "[conventions]") {
  const E lp = bt(g::logprobs_reward), ref = bt(g::ref_logprobs), m = bt(g::mask_reward);
  const E scores = test::vec(g::scores);
  const kl_reward_options o{.beta = 0.05, .score_clip = score_range{-2.0, 2.0}};
  test::check_values("rewards", kl_shaped_rewards(scores, lp, ref, m, o).rewards, g::openrlhf_reward_clipped, tol);
  CHECK(differs(kl_shaped_rewards(scores, lp, ref, m, {.beta = 0.05}).rewards, g::openrlhf_reward_clipped));
}

TEST_CASE("Conventions: REINFORCE++-baseline, OpenRLHF centres the scores before the KL penalty", "[conventions]") {
  const auto m6 = test::make({g::B6, g::T6}, g::mask6);
  const auto lp = test::make({g::B6, g::T6}, g::logprobs6), ref = test::make({g::B6, g::T6}, g::ref_logprobs6);
  const E scores = test::vec(g::scores6);
  const eigen_index id({g::B6}, std::vector<std::int64_t>(g::index6.begin(), g::index6.end()));
  // -β·kl_t at kept tokens: kl_shaped_rewards with zero scores (OpenRLHF compute_reward's kl_reward)
  const E non_score = kl_shaped_rewards(E({g::B6}, 0.0), lp, ref, m6, {.beta = 0.05}).rewards;
  test::check_values(
      "OpenRLHF reinforce_baseline",
      reinforce_pp_baseline_advantages(scores, non_score, m6, id, reinforce_baseline_options::openrlhf()),
      g::openrlhf_reinforce_baseline, tol);
  // verl's order (the default) with verl's masked_whiten guard, zero outside the mask as verl multiplies by it
  whiten_options verl_whiten = whiten_options::verl();
  verl_whiten.outside = whiten_outside::zero;
  const auto verl = reinforce_pp_baseline_advantages(scores, non_score, m6, id, {.whitening = verl_whiten});
  test::check_values("verl reinforce_plus_plus_baseline", verl, g::verl_reinforce_pp_baseline, tol);
  // shaped_sum is the token-level entry on the shaped rewards
  const E kl_shaped = kl_shaped_rewards(scores, lp, ref, m6, {.beta = 0.05}).rewards;
  test::check_same("shaped_sum = token-level entry",
                   reinforce_pp_baseline_advantages(scores, non_score, m6, id, {.whitening = verl_whiten}),
                   reinforce_pp_baseline_advantages(kl_shaped, m6, id, singleton_policy::raw, verl_whiten), tol);
  CHECK(differs(
      reinforce_pp_baseline_advantages(scores, non_score, m6, id,
                                       {.singleton = singleton_policy::zero, .whitening = whiten_options::openrlhf()}),
      g::openrlhf_reinforce_baseline));
}

TEST_CASE("Conventions: OpenRLHF GSPO, the gradient through the sequence-mean ratio (per-token advantages)",
          "[conventions]") {
  const E lp = bt(g::gspo_logprobs), old = bt(g::gspo_old_logprobs), A = bt(g::advantages), m = bt(g::mask);
  const policy_batch<E> b{.logprobs = lp, .advantages = A, .response_mask = m, .old_logprobs = old};
  const auto o = policy_variant_options::openrlhf_gspo();
  test::check_value("loss", policy_variant_loss(b, o).loss, g::openrlhf_gspo_loss, tol);
  const E grad = policy_variant_loss_backward(b, o);
  test::check_values("d loss / d logprobs", grad, g::openrlhf_gspo_grad, tol);
  // the analytic backward against central differences of the forward in double
  const auto f = [&](const E& x) {
    auto bx = b;
    bx.logprobs = x;
    return ops::item(policy_variant_loss(bx, o).loss);
  };
  test::check_gradient("OpenRLHF gspo backward", grad, f, lp);
  test::check_values(
      "grad_loss scales it", policy_variant_loss_backward(b, o, -2.5),
      [] {
        auto v = g::openrlhf_gspo_grad;
        for (auto& x : v) x *= -2.5;
        return v;
      }(),
      tol);
  // the default (GSPO-token, verl / TRL) has the same value, another gradient with per-token advantages
  auto token = o;
  token.gspo_grad = gspo_gradient::token;
  test::check_value("token form: same value", policy_variant_loss(b, token).loss, g::openrlhf_gspo_loss, tol);
  CHECK(differs(policy_variant_loss_backward(b, token), g::openrlhf_gspo_grad));
  // with A constant along each row the two forms agree
  const policy_batch<E> row_a{
      .logprobs = lp, .advantages = test::vec({0.7, -1.3, 0.4}), .response_mask = m, .old_logprobs = old};
  test::check_same("A per sequence: sequence = token form", policy_variant_loss_backward(row_a, o),
                   policy_variant_loss_backward(row_a, token), tol);
  // the default's aggregation (exact token counts) differs from OpenRLHF's count + 1e-8
  auto exact = o;
  exact.token_count_eps = 0.0;
  CHECK(differs(policy_variant_loss(b, exact).loss, {g::openrlhf_gspo_loss}));
  // luspo and ppo with sequence_ratio take the same gradient path
  auto seq_ppo = o;
  seq_ppo.variant = policy_variant::ppo;
  seq_ppo.sequence_ratio = true;
  test::check_same("ppo + sequence_ratio = gspo", policy_variant_loss_backward(b, seq_ppo), grad, tol);
}

TEST_CASE("Conventions: OpenRLHF rollout IS seq-mask-tis (row filter, token weights)", "[conventions]") {
  const E lp = bt(g::is_logprobs), old = bt(g::old_logprobs), roll = bt(g::is_rollout_logprobs),
          A = bt(g::is_advantages), m = bt(g::mask_reward);
  const policy_batch<E> b{
      .logprobs = lp, .advantages = A, .response_mask = m, .old_logprobs = old, .rollout_logprobs = roll};
  // OpenRLHF PolicyLoss("ppo"): log-ratio clamped to ±20, clip 0.2, token-level masked mean
  policy_variant_options o{.clip = {.clip_low = 0.2, .log_ratio_clamp = 20.0},
                           .rollout_is = rollout_is_options::openrlhf_seq_mask_tis(0.5, 5.0)};
  test::check_value("loss", policy_variant_loss(b, o).loss, g::openrlhf_seq_mask_tis_loss, tol);
  const E grad = policy_variant_loss_backward(b, o);
  test::check_values("d loss / d logprobs", grad, g::openrlhf_seq_mask_tis_grad, tol);
  const auto f = [&](const E& x) {
    auto bx = b;
    bx.logprobs = x;
    return ops::item(policy_variant_loss(bx, o).loss);
  };
  test::check_gradient("seq-mask-tis backward", grad, f, lp);
  // the factor: row 1 dropped (geometric ratio e^1.72 > 5), kept tokens carry their untruncated token ratio
  const auto w = ops::to_host(policy_variant_loss(b, o).is_weight);
  CHECK(w[5] == 0.0);
  CHECK(w[9] == 0.0);
  CHECK(w[0] == Approx(std::exp(1.9)).epsilon(1e-12));  // above the 5.0 threshold, not truncated
  CHECK(w[1] == Approx(std::exp(-0.9)).epsilon(1e-12));
  // the other modes at the same thresholds differ: the geometric mask weights by the row ratio, TIS truncates
  for (const auto mode : {is_mode::mask, is_mode::truncate}) {
    auto other = o;
    other.rollout_is->mode = mode;
    CHECK(differs(policy_variant_loss(b, other).loss, {g::openrlhf_seq_mask_tis_loss}));
  }
  // grpo_loss takes the same factor (β = 0; bnpo is the token-level masked mean)
  grpo_options go{.loss_type = grpo_loss_type::bnpo,
                  .beta = 0.0,
                  .clip = {.clip_low = 0.2, .log_ratio_clamp = 20.0},
                  .rollout_is = rollout_is_options::openrlhf_seq_mask_tis(0.5, 5.0)};
  const grpo_batch<E> gb{
      .logprobs = lp, .advantages = A, .response_mask = m, .old_logprobs = old, .rollout_logprobs = roll};
  test::check_value("grpo_loss bnpo", grpo_loss(gb, go).loss, g::openrlhf_seq_mask_tis_loss, tol);
  test::check_values("grpo_loss_backward bnpo", grpo_loss_backward(gb, go), g::openrlhf_seq_mask_tis_grad, tol);
}

TEST_CASE("Conventions: OpenRLHF VanillaKTOLoss, each side's loss against the other side's KL", "[conventions]") {
  const E ref = test::vec(g::kto_ref_logps), des = test::vec(g::kto_desirable);
  const auto o = kto_options::openrlhf_vanilla(0.1);
  struct fixture {
    const char* name;
    const std::vector<double>& logps;
    double loss;
    const std::vector<double>& grad;
  };
  for (const auto& [name, logps, loss, grad] :
       {fixture{"both baselines > 0", g::kto_logps, g::openrlhf_vanilla_kto_loss, g::openrlhf_vanilla_kto_grad},
        fixture{"z_U clamped to 0", g::kto_logps_neg, g::openrlhf_vanilla_kto_loss_neg,
                g::openrlhf_vanilla_kto_grad_neg}}) {
    INFO(name);
    const unpaired_batch<E> b{.logps = test::vec(logps), .ref_logps = ref, .desirable = des};
    const auto r = kto(b, o);
    test::check_value("loss", r.loss, loss, tol);
    const E gr = kto_backward(b, o);
    test::check_values("d loss / d logps", gr, grad, tol);
    const auto f = [&](const E& x) {
      auto bx = b;
      bx.logps = x;
      return ops::item(kto(bx, o).loss);
    };
    test::check_gradient("vanilla KTO backward", gr, f, b.logps);
    // the baselines, reported: z_D = max(0, mean_D l), z_U = max(0, mean_U l)
    double sd = 0, su = 0;
    for (std::size_t i = 0; i < logps.size(); ++i)
      (g::kto_desirable[i] != 0 ? sd : su) += (logps[i] - g::kto_ref_logps[i]) / 3.0;
    test::check_value("kl (z_D)", r.kl, std::max(sd, 0.0), tol);
    test::check_value("kl_rejected (z_U)", r.kl_rejected, std::max(su, 0.0), tol);
    // the default (TRL: one detached z, here 0 without kl_logps) differs
    CHECK(differs(kto(b, {.beta = 0.1}).loss, {loss}));
    CHECK(differs(kto_backward(b, {.beta = 0.1}), grad));
  }
}

TEST_CASE("Conventions: TRL grpo loss_type averages over every row, empty ones included", "[conventions]") {
  const E lp = bt(g::gspo_logprobs), old = bt(g::old_logprobs), m = bt(g::mask);
  const grpo_batch<E> b{
      .logprobs = lp, .advantages = test::vec(g::grpo_advantages), .response_mask = m, .old_logprobs = old};
  grpo_options o{.loss_type = grpo_loss_type::grpo};
  o.count_empty_rows = true;
  test::check_value("loss", grpo_loss(b, o).loss, g::trl_grpo_loss_empty_row, tol);
  const E grad = grpo_loss_backward(b, o);
  test::check_values("d loss / d logprobs", grad, g::trl_grpo_grad_empty_row, tol);
  const auto f = [&](const E& x) {
    auto bx = b;
    bx.logprobs = x;
    return ops::item(grpo_loss(bx, o).loss);
  };
  test::check_gradient("grpo backward", grad, f, lp);
  // = an explicit normaliser B; the default counts only the two rows with tokens (3/2 times TRL's here)
  test::check_same("normalizer = B", grpo_loss(b, {.loss_type = grpo_loss_type::grpo, .normalizer = 3.0}).loss,
                   grpo_loss(b, o).loss, tol);
  const auto plain = grpo_loss(b, {.loss_type = grpo_loss_type::grpo}).loss;
  CHECK(differs(plain, {g::trl_grpo_loss_empty_row}));
  test::check_value("default: over non-empty rows", plain, g::trl_grpo_loss_empty_row * 3.0 / 2.0, tol);
  // sapo reads it too (its normaliser is grpo's)
  auto sapo = o;
  sapo.loss_type = grpo_loss_type::sapo;
  CHECK_NOTHROW(grpo_loss(b, sapo));
}

TEST_CASE("Conventions: verl value loss metrics through verl_F.masked_mean (+ 1e-8)", "[conventions]") {
  const E V = bt(g::vf_vpreds), old = bt(g::vf_old_values), R = bt(g::vf_returns), m = bt(g::mask);
  auto o = value_options::verl(0.5);
  const auto r = value_loss(V, old, R, m, o);
  test::check_value("vf_loss (token-mean)", r.loss, g::verl_vf_loss_token_mean, tol);
  test::check_value("vf_clipfrac", r.clipfrac, g::verl_vf_clipfrac, tol);
  test::check_value("vpred_mean", r.vpred_mean, g::verl_vpred_mean, tol);
  test::check_values("d vf_loss / d vpreds (token-mean)", value_loss_backward(V, old, R, m, o),
                     g::verl_vf_grad_token_mean, tol);
  o.reduction = aggregation::seq_mean_token_mean;
  test::check_value("vf_loss (seq-mean-token-mean)", value_loss(V, old, R, m, o).loss,
                    g::verl_vf_loss_seq_mean_token_mean, tol);
  const E grad = value_loss_backward(V, old, R, m, o);
  test::check_values("d vf_loss / d vpreds (seq-mean-token-mean)", grad, g::verl_vf_grad_seq_mean_token_mean, tol);
  const auto f = [&](const E& x) { return ops::item(value_loss(x, old, R, m, o).loss); };
  test::check_gradient("value backward", grad, f, V);
  // the defaults: exact means
  const auto plain = value_loss(V, old, R, m, {.clip = 0.5});
  CHECK(differs(plain.clipfrac, {g::verl_vf_clipfrac}));
  CHECK(differs(plain.vpred_mean, {g::verl_vpred_mean}));
  CHECK(differs(value_loss(V, old, R, m, {.clip = 0.5, .reduction = aggregation::seq_mean_token_mean}).loss,
                {g::verl_vf_loss_seq_mean_token_mean}));
}

TEST_CASE("Conventions: every new option rejects bad values, naming function and argument", "[conventions]") {
  const E x = bt(g::x), m = bt(g::mask);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  expect_rejected([&] { masked_mean(x, m, std::nullopt, {.count_eps = -1e-8}); }, "masked_mean", "options.count_eps");
  expect_rejected([&] { masked_var(x, m, true, std::nullopt, {.count_eps = nan}); }, "masked_var", "options.count_eps");
  expect_rejected([&] { masked_whiten(x, m, {.count_eps = -1.0}); }, "masked_whiten", "options.count_eps");
  expect_rejected([&] { masked_whiten(x, m, {.eps = 0.0, .guard = variance_guard::floor}); }, "masked_whiten",
                  "options.eps");
  expect_rejected([&] { masked_whiten(x, m, {.guard = static_cast<variance_guard>(9)}); }, "masked_whiten",
                  "options.guard");
  expect_rejected([&] { masked_whiten(x, m, {.outside = static_cast<whiten_outside>(9)}); }, "masked_whiten",
                  "options.outside");
  expect_rejected([&] { aggregate(x, m, aggregation::seq_mean_token_mean, std::nullopt, -1e-8); }, "aggregate",
                  "token_count_eps");
  expect_rejected([&] { aggregation_weights(m, aggregation::seq_mean_token_mean, std::nullopt, nan); },
                  "aggregation_weights", "token_count_eps");
  expect_rejected([&] { gae(x, x, m, {.outside = static_cast<gae_outside>(7)}); }, "gae", "options.outside");
  expect_rejected(
      [&] {
        auto o = gae_options::verl();
        o.whitening.count_eps = -1.0;
        gae(x, x, m, o);
      },
      "gae", "options.whitening.count_eps");
  expect_rejected([&] { ppo_policy_loss(x, x, x, m, {.token_count_eps = -1.0}); }, "ppo_policy_loss",
                  "options.token_count_eps");
  expect_rejected([&] { ppo_policy_loss_backward(x, x, x, m, {.metrics = {.count_eps = nan}}); },
                  "ppo_policy_loss_backward", "options.metrics.count_eps");
  const E scores = test::vec(g::scores);
  expect_rejected(
      [&] {
        kl_shaped_rewards(scores, x, x, m, {.score_clip = score_range{2.0, -2.0}});
      },
      "kl_shaped_rewards", "options.score_clip");
  expect_rejected(
      [&] {
        kl_shaped_rewards(scores, x, x, m, {.score_clip = score_range{nan, 1.0}});
      },
      "kl_shaped_rewards", "options.score_clip.low");
  const eigen_index id({g::B}, std::vector<std::int64_t>{0, 0, 1});
  expect_rejected(
      [&] { reinforce_pp_baseline_advantages(scores, x, m, id, {.order = static_cast<baseline_order>(5)}); },
      "reinforce_pp_baseline_advantages", "options.order");
  expect_rejected([&] { reinforce_pp_baseline_advantages(scores, x, m, id, {.whitening = {.eps = -1.0}}); },
                  "reinforce_pp_baseline_advantages", "options.whitening.eps");
  const policy_batch<E> pb{.logprobs = x, .advantages = x, .response_mask = m};
  auto bad_gspo = policy_variant_options::openrlhf_gspo();
  bad_gspo.gspo_grad = static_cast<gspo_gradient>(4);
  expect_rejected([&] { policy_variant_loss(pb, bad_gspo); }, "policy_variant_loss", "options.gspo_grad");
  bad_gspo.gspo_grad = gspo_gradient::sequence;
  bad_gspo.variant = policy_variant::cispo;
  expect_rejected([&] { policy_variant_loss_backward(pb, bad_gspo); }, "policy_variant_loss_backward",
                  "options.gspo_grad");
  bad_gspo = policy_variant_options::openrlhf_gspo();
  bad_gspo.token_count_eps = -1e-8;
  expect_rejected([&] { policy_variant_loss(pb, bad_gspo); }, "policy_variant_loss", "options.token_count_eps");
  policy_variant_options bad_is{.rollout_is = rollout_is_options::openrlhf_seq_mask_tis()};
  bad_is.rollout_is->mode = static_cast<is_mode>(7);
  const policy_batch<E> pbr{.logprobs = x, .advantages = x, .response_mask = m, .rollout_logprobs = x};
  expect_rejected([&] { policy_variant_loss(pbr, bad_is); }, "policy_variant_loss", "options.rollout_is.mode");
  bad_is.rollout_is = rollout_is_options::openrlhf_seq_mask_tis(6.0, 5.0);
  expect_rejected([&] { policy_variant_loss(pbr, bad_is); }, "policy_variant_loss", "options.rollout_is.lower");
  const E kl = test::vec(g::kto_logps), kref = test::vec(g::kto_ref_logps), kdes = test::vec(g::kto_desirable);
  const unpaired_batch<E> ub{.logps = kl, .ref_logps = kref, .desirable = kdes};
  auto bad_kto = kto_options::openrlhf_vanilla(0.1);
  bad_kto.baseline = static_cast<kto_baseline>(3);
  expect_rejected([&] { kto(ub, bad_kto); }, "kto", "options.baseline");
  bad_kto = kto_options::openrlhf_vanilla(0.1);
  bad_kto.loss = kto_loss::apo_zero_unpaired;
  expect_rejected([&] { kto_backward(ub, bad_kto); }, "kto_backward", "options.baseline");
  auto with_kl = ub;
  with_kl.kl_logps = kl, with_kl.ref_kl_logps = kref;
  expect_rejected([&] { kto(with_kl, kto_options::openrlhf_vanilla(0.1)); }, "kto", "kl_logps");
  const grpo_batch<E> gb{.logprobs = x, .advantages = x, .response_mask = m};
  grpo_options bad_grpo{.loss_type = grpo_loss_type::dapo};
  bad_grpo.count_empty_rows = true;
  expect_rejected([&] { grpo_loss(gb, bad_grpo); }, "grpo_loss", "options.count_empty_rows");
  expect_rejected([&] { grpo_loss_backward(gb, bad_grpo); }, "grpo_loss_backward", "options.count_empty_rows");
  auto bad_value = value_options::verl();
  bad_value.metrics.count_eps = -1.0;
  expect_rejected([&] { value_loss(x, x, x, m, bad_value); }, "value_loss", "options.metrics.count_eps");
  bad_value = value_options::verl();
  bad_value.token_count_eps = nan;
  expect_rejected([&] { value_loss_backward(x, x, x, m, bad_value); }, "value_loss_backward",
                  "options.token_count_eps");
  expect_rejected([&] { reinforce_pp_advantages(x, m, 1.0, {.count_eps = -1.0}); }, "reinforce_pp_advantages",
                  "whitening.count_eps");
  expect_rejected([&] { reinforce_pp_baseline_advantages(x, m, id, singleton_policy::raw, {.count_eps = nan}); },
                  "reinforce_pp_baseline_advantages", "whitening.count_eps");
}

TEST_CASE("Conventions: TRL WPO weights (use_weighting) from the policy's logits, through the DPO loss",
          "[conventions][dpo]") {
  const auto logits = test::make({g::BW, g::TW, g::VW}, g::wpo_logits);
  const eigen_index labels({g::BW, g::TW}, std::vector<std::int64_t>(g::wpo_labels.begin(), g::wpo_labels.end()));
  const E w = wpo_weights(logits, labels);
  test::check_values("weights", w, g::trl_wpo_weights, tol);
  CHECK(ops::to_host(w)[0] > 1.0);  // TRL f2cd577 does not clamp at 1
  // TRL's concatenated batch [chosen 0, chosen 1, rejected 0, rejected 1]
  const E logps = sequence_logps(logits, labels).logps;
  preference_batch<E> b{ops::slice(logps, 0, 0, 2), ops::slice(logps, 0, 2, 2)};
  b.ref_chosen_logps = test::vec(g::wpo_ref_chosen);
  b.ref_rejected_logps = test::vec(g::wpo_ref_rejected);
  b.chosen_weights = ops::slice(w, 0, 0, 2);
  b.rejected_weights = ops::slice(w, 0, 2, 2);
  test::check_value("weighted sigmoid DPO loss", dpo(b, {.beta = 0.1}).loss, g::trl_wpo_dpo_loss, tol);
  const auto grad = dpo_backward(b, {.beta = 0.1});
  const auto& gw = g::trl_wpo_dpo_grad;
  test::check_values("d loss / d chosen_logps (weights constant)", grad.chosen_logps, {gw[0], gw[1]}, tol);
  test::check_values("d loss / d rejected_logps", grad.rejected_logps, {gw[2], gw[3]}, tol);
  // closed forms: logits [0, 0] -> w = 1; an empty row -> exp(0) = 1
  test::check_values("uniform and empty rows",
                     wpo_weights(test::make({2, 1, 2}, {0.0, 0.0, 5.0, -3.0}), eigen_index({2, 1}, {1, -100})),
                     {1.0, 1.0}, tol);
  // float32: the same weights to float32 precision
  test::check_values("float32", wpo_weights(test::make<float>({g::BW, g::TW, g::VW}, g::wpo_logits), labels),
                     g::trl_wpo_weights, test::float32_tol);
  expect_rejected(
      [&] {
        (void)wpo_weights(test::make({4, 12}, g::wpo_logits), labels);
      },
      "wpo_weights", "logits must have rank 3");
  expect_rejected(
      [&] {
        (void)wpo_weights(logits, eigen_index({g::BW, g::TW}, std::vector<std::int64_t>(12, 4)));
      },
      "wpo_weights", "outside [0, 4)");
}

TEST_CASE("Conventions: TRL multi-reward normalize_then_sum renormalises over the batch", "[conventions][grpo]") {
  const auto rewards = test::make({6, 2}, g::multi_rewards);
  const eigen_index groups({6}, std::vector<std::int64_t>{0, 0, 0, 1, 1, 1});
  const E trl = grpo_advantages_multi(rewards, {1.0, 0.5}, groups, multi_reward::normalize_then_sum_batch);
  test::check_values("normalize_then_sum (TRL)", trl, g::trl_normalize_then_sum, tol);
  // the batch step is what differs from the per-group sum alone
  CHECK(differs(grpo_advantages_multi(rewards, {1.0, 0.5}, groups, multi_reward::normalize_then_sum),
                g::trl_normalize_then_sum));
  // zero mean and unit (unbiased) std up to ε: (x - m) / (s + 1e-4) has std s / (s + 1e-4)
  const auto a = ops::to_host(trl);
  double mean = 0.0;
  for (double v : a) mean += v / 6.0;
  CHECK(std::abs(mean) < 1e-15);
  // one row: 0, not NaN
  const auto one = grpo_advantages_multi(test::make({1, 2}, {1.0, 2.0}), {1.0, 1.0}, eigen_index({1}, {0}),
                                         multi_reward::normalize_then_sum_batch);
  test::check_values("one row", one, {0.0}, tol);
}

TEST_CASE("Conventions: TRL frac_reward_zero_std under scale_rewards=\"batch\" is of the batch std",
          "[conventions][grpo]") {
  const E s = test::vec(g::batch_scores);
  const eigen_index groups({6}, std::vector<std::int64_t>{0, 0, 1, 1, 2, 2});
  const auto r = grpo_advantages(s, groups, {.scale = group_scale::batch});
  test::check_values("advantages", r.advantages, g::trl_batch_advantages, tol);
  test::check_value("frac_reward_zero_std (batch std > 0)", r.frac_reward_zero_std, g::trl_batch_frac_zero_std, tol);
  // TRL logs reward_std = nanstd(rewards), the batch std, under every scaling
  test::check_value("reward_std", r.reward_std, g::trl_reward_std, tol);
  CHECK(metrics(grpo_advantages(s, groups)).at("reward_std") == Approx(g::trl_reward_std).epsilon(1e-12));
  // the group std counts group 1 (equal rewards): a third of the rows
  test::check_value("group scaling counts the equal group",
                    grpo_advantages(s, groups, {.scale = group_scale::group}).frac_reward_zero_std, 1.0 / 3.0, tol);
  const auto eq = grpo_advantages(test::vec(std::vector<double>(6, 0.7)), groups, {.scale = group_scale::batch});
  test::check_value("all equal", eq.frac_reward_zero_std, g::trl_batch_frac_zero_std_equal, tol);
  // isclose(std, 0): a group std of 7.1e-9 counts as zero (TRL atol 1e-8), 2.8e-8 does not
  const auto tiny = grpo_advantages(test::vec({1.0, 1.0 + 1e-8, 2.0, 2.0 + 4e-8}), eigen_index({4}, {0, 0, 1, 1}));
  test::check_value("isclose threshold", tiny.frac_reward_zero_std, 0.5, tol);
}

TEST_CASE("Whole step, TRL GRPO: group advantages -> dapo loss with k3 -> logged metrics", "[conventions][step]") {
  const auto bt4 = [](const std::vector<double>& v) { return test::make({g::BS, g::TS}, v); };
  const E lp = bt4(g::step_logprobs), m = bt4(g::step_mask);
  const auto adv = grpo_advantages(test::vec(g::step_scores), eigen_index({g::BS}, {0, 0, 1, 1}));
  test::check_values("advantages (scale group, 1e-4)", adv.advantages, g::trl_step_advantages, tol);
  const grpo_batch<E> b{.logprobs = lp,
                        .advantages = adv.advantages,
                        .response_mask = m,
                        .old_logprobs = bt4(g::step_old_logprobs),
                        .ref_logprobs = bt4(g::step_ref_logprobs)};
  const grpo_options o{.beta = 0.04, .clip = clip_options::trl(0.2, 0.28)};  // loss_type dapo, k3: TRL's defaults
  const auto r = grpo_loss(b, o);
  test::check_value("loss", r.loss, g::trl_step_loss, tol);
  test::check_value("kl", r.kl, g::trl_step_kl, tol);
  test::check_value("clip_ratio/low_mean", r.clip_ratio_low, g::trl_step_clip_ratio_low, tol);
  test::check_value("clip_ratio/high_mean", r.clip_ratio_high, g::trl_step_clip_ratio_high, tol);
  test::check_value("clip_ratio/region_mean", r.clip_ratio_region, g::trl_step_clip_ratio_region, tol);
  test::check_value("clip_ratio/low_min", r.clip_ratio_low_min, g::trl_step_clip_ratio_low_min, tol);
  test::check_value("clip_ratio/high_max", r.clip_ratio_high_max, g::trl_step_clip_ratio_high_max, tol);
  test::check_values("d loss / d logprobs", grpo_loss_backward(b, o), g::trl_step_grad, tol);
  const auto keyed = metrics(r);
  CHECK(keyed.at("clip_ratio/region_mean") == Approx(g::trl_step_clip_ratio_region).epsilon(1e-12));
}

TEST_CASE("Whole step, verl PPO: GAE -> vanilla policy loss and value loss -> metrics (ppo_options::verl())",
          "[conventions][step]") {
  const E r = bt(g::rewards), v = bt(g::values), m = bt(g::mask), lp = bt(g::logprobs), old = bt(g::old_logprobs);
  const auto est = gae(r, v, m, gae_options::verl(0.9, 0.8));
  const auto o = ppo_options::verl();
  const auto pg = ppo_policy_loss(lp, old, est.advantages, m, o);
  test::check_value("actor/pg_loss", pg.loss, g::verl_step_pg_loss, tol);
  test::check_value("actor/pg_clipfrac", pg.pg_clipfrac, g::verl_step_pg_clipfrac, tol);
  test::check_value("actor/pg_clipfrac_lower", pg.pg_clipfrac_lower, g::verl_step_pg_clipfrac_lower, tol);
  test::check_value("actor/ppo_kl", pg.approx_kl, g::verl_step_ppo_kl, tol);
  test::check_values("d pg_loss / d logprobs", ppo_policy_loss_backward(lp, old, est.advantages, m, o),
                     g::verl_step_pg_grad, tol);
  const E vp = bt(g::vf_vpreds);
  const auto vo = value_options::verl(0.5);
  const auto vf = value_loss(vp, v, est.returns, m, vo);
  test::check_value("critic/vf_loss", vf.loss, g::verl_step_vf_loss, tol);
  test::check_value("critic/vf_clipfrac", vf.clipfrac, g::verl_step_vf_clipfrac, tol);
  test::check_value("critic/vpred_mean", vf.vpred_mean, g::verl_step_vpred_mean, tol);
  test::check_values("d vf_loss / d vpreds", value_loss_backward(vp, v, est.returns, m, vo), g::verl_step_vf_grad, tol);
}

TEST_CASE("Whole step, OpenRLHF: reinforce_baseline advantages -> PPO policy loss -> metrics", "[conventions][step]") {
  const auto b6 = [](const std::vector<double>& x) { return test::make({g::B6, g::T6}, x); };
  const E m6 = b6(g::mask6), old = b6(g::logprobs6), ref = b6(g::ref_logprobs6), lp = b6(g::openrlhf_step_logprobs);
  const eigen_index id({g::B6}, std::vector<std::int64_t>(g::index6.begin(), g::index6.end()));
  const E non_score = kl_shaped_rewards(E({g::B6}, 0.0), old, ref, m6, {.beta = 0.05}).rewards;
  const E adv = reinforce_pp_baseline_advantages(test::vec(g::scores6), non_score, m6, id,
                                                 reinforce_baseline_options::openrlhf());
  // OpenRLHF PolicyLoss "ppo": clip 0.2, log-ratio clamped to ±20, token-level masked mean, ppo_kl of the raw ratio
  const ppo_options o{.clip = {.clip_low = 0.2, .log_ratio_clamp = 20.0}};
  const auto pg = ppo_policy_loss(lp, old, adv, m6, o);
  test::check_value("policy loss", pg.loss, g::openrlhf_step_loss, tol);
  test::check_value("clip_ratio (surr2 < surr1)", pg.pg_clipfrac, g::openrlhf_step_clip_ratio, tol);
  test::check_value("ppo_kl", pg.approx_kl, g::openrlhf_step_ppo_kl, tol);
  test::check_values("d loss / d log_probs", ppo_policy_loss_backward(lp, old, adv, m6, o), g::openrlhf_step_grad, tol);
}

}  // namespace test_peer_conventions
