// Peer conventions (issue 17) on LibTorch: every option of the README "Peer conventions" table reproduces the
// SAME python golden values as the Eigen backend (tests/eigen/test_peer_conventions.cpp) to 1e-12 relative, in
// float64. Golden values: tests/reference/make_golden_conventions.py (verl b178a3c, OpenRLHF 3c3be62 / 0489850, TRL
// f2cd577 re-typed with plain Python floats, gradients by dual numbers). Gradients: LibTorch autograd through the
// forward against the golden gradient (or a closed form), and the analytic backward against both. The defaults
// differing from each option, and input validation, are tested once, on the Eigen backend.
// openrlhf_gspo, seq-mask-tis, vanilla KTO and wpo_weights, also checked against the Eigen reference on random
// inputs in test_rl_variants_torch.cpp / test_preference_torch.cpp, are here against the golden values too; the PRM
// loss (tests/reference/golden_prm.hpp) too.
#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "posttrain/backends/torch.hpp"
#include "posttrain/posttrain.hpp"
#include "reference/golden_conventions.hpp"
#include "reference/golden_prm.hpp"
#include "support/eigen_checks.hpp"
#include "support/torch_data.hpp"

namespace test_peer_conventions_torch {  // one namespace per test file: the unity build compiles several in one TU

using namespace posttrain;
namespace g = posttrain::golden_conventions;
using test::check_value;
using test::check_values;

namespace {
constexpr auto tol = test::conventions_tol;
using Tn = at::Tensor;

Tn tvec(const std::vector<double>& v) { return torch::tensor(v, torch::kDouble); }
Tn bt(const std::vector<double>& v, std::int64_t B = g::B, std::int64_t T = g::T) { return tvec(v).reshape({B, T}); }
Tn ids(const std::vector<std::int64_t>& v) { return torch::tensor(v, torch::kLong); }
std::vector<double> scaled(std::vector<double> v, double s) {
  for (auto& x : v) x *= s;
  return v;
}

/// d loss / d x by autograd through `forward` at `x`, and `analytic` (the library's backward at `x`), both
/// against `want` (a golden gradient).
void check_gradient(const std::string& what, const Tn& x, const std::function<Tn(const Tn&)>& forward,
                    const std::optional<Tn>& analytic, const std::vector<double>& want) {
  check_values(what + ": autograd", test::autograd_grad(x, forward), want, tol);
  if (analytic) check_values(what + ": analytic backward", *analytic, want, tol);
}
}  // namespace

TEST_CASE("Peer conventions, torch: verl masked_mean / masked_var / masked_whiten", "[peer][conventions][torch]") {
  const Tn x = bt(g::x), m = bt(g::mask);
  const auto verl = masked_options::verl();
  check_value("masked_mean", masked_mean(x, m, std::nullopt, verl), g::verl_masked_mean, tol);
  check_values("masked_mean rows", masked_mean(x, m, 1, verl), g::verl_masked_mean_rows, tol);
  check_value("masked_var", masked_var(x, m, true, std::nullopt, verl), g::verl_masked_var, tol);
  check_value("masked_var biased", masked_var(x, m, false, std::nullopt, verl), g::verl_masked_var_biased, tol);
  check_values("masked_whiten", masked_whiten(x, m, whiten_options::verl()), g::verl_masked_whiten, tol);
  // d masked_mean / d x_i = m_i / (n + 1e-8) (closed form, n = 7)
  std::vector<double> dmean(g::mask.size());
  for (std::size_t i = 0; i < dmean.size(); ++i) dmean[i] = g::mask[i] / (7.0 + 1e-8);
  check_gradient(
      "masked_mean", x, [&](const Tn& v) { return masked_mean(v, m, std::nullopt, verl); }, std::nullopt, dmean);
}

TEST_CASE("Peer conventions, torch: OpenRLHF advantage normalisation (floor, biased, centre-only)",
          "[peer][conventions][torch]") {
  check_values("whiten", masked_whiten(bt(g::x), bt(g::mask), whiten_options::openrlhf()), g::openrlhf_whiten, tol);
  check_values("centre only", masked_whiten(bt(g::x), bt(g::mask), whiten_options::openrlhf(false)), g::openrlhf_centre,
               tol);
  check_values("variance floor", masked_whiten(bt(g::x_const), bt(g::mask_const), whiten_options::openrlhf()),
               g::openrlhf_whiten_floor, tol);
}

TEST_CASE("Peer conventions, torch: token_count_eps (verl agg_loss, OpenRLHF aggregate_loss)",
          "[peer][conventions][torch]") {
  const Tn L = bt(g::loss), m = bt(g::mask);
  const auto mode = aggregation::seq_mean_token_mean;
  check_value("verl agg_loss", aggregate(L, m, mode, std::nullopt, 1e-8), g::verl_seq_mean_token_mean, tol);
  check_value("global_batch_size 4", aggregate(L, m, mode, 4.0, 1e-8), g::verl_seq_mean_token_mean_global, tol);
  check_value("OpenRLHF sample level", aggregate(L, m, mode, std::nullopt, 1e-8), g::openrlhf_sample_level, tol);
  check_gradient(
      "aggregate", L, [&](const Tn& v) { return aggregate(v, m, mode, std::nullopt, 1e-8); },
      aggregation_weights(m, mode, std::nullopt, 1e-8), g::verl_seq_mean_token_mean_grad);
}

TEST_CASE("Peer conventions, torch: verl GAE outside the mask", "[peer][conventions][torch]") {
  const Tn r = bt(g::rewards), v = bt(g::values), m = bt(g::mask);
  const auto verl = gae(r, v, m, gae_options::verl(0.9, 0.8));
  check_values("advantages", verl.advantages, g::verl_gae_advantages, tol);
  check_values("returns", verl.returns, g::verl_gae_returns, tol);
  auto raw = gae_options::verl(0.9, 0.8);
  raw.whiten = false;
  check_values("raw advantages", gae(r, v, m, raw).advantages, g::verl_gae_raw, tol);
}

TEST_CASE("Peer conventions, torch: verl PPO metrics (ppo_options::verl)", "[peer][conventions][torch]") {
  const Tn lp = bt(g::logprobs), old = bt(g::old_logprobs), A = bt(g::advantages), m = bt(g::mask);
  auto o = ppo_options::verl();
  o.clip.clip_high = 0.28;
  const auto r = ppo_policy_loss(lp, old, A, m, o);
  check_value("pg_loss", r.loss, g::verl_pg_loss_token_mean, tol);
  check_value("pg_clipfrac", r.pg_clipfrac, g::verl_pg_clipfrac, tol);
  check_value("pg_clipfrac_lower", r.pg_clipfrac_lower, g::verl_pg_clipfrac_lower, tol);
  check_value("ppo_kl", r.approx_kl, g::verl_ppo_kl, tol);
  for (const auto agg : {aggregation::token_mean, aggregation::seq_mean_token_mean}) {
    o.reduction = agg;
    INFO("reduction " << static_cast<int>(agg));
    // no golden gradient for this case: autograd through the forward vs the analytic backward
    const Tn analytic = ppo_policy_loss_backward(lp, old, A, m, o);
    check_values("autograd = analytic",
                 test::autograd_grad(lp, [&](const Tn& x) { return ppo_policy_loss(x, old, A, m, o).loss; }),
                 ops::to_host(analytic), tol);
  }
  check_value("pg_loss seq-mean-token-mean", ppo_policy_loss(lp, old, A, m, o).loss,
              g::verl_pg_loss_seq_mean_token_mean, tol);
}

TEST_CASE("Peer conventions, torch: OpenRLHF score clamp, REINFORCE++-baseline orders", "[peer][conventions][torch]") {
  const kl_reward_options clip{.beta = 0.05, .score_clip = score_range{-2.0, 2.0}};
  check_values(
      "compute_reward clamp",
      kl_shaped_rewards(tvec(g::scores), bt(g::logprobs_reward), bt(g::ref_logprobs), bt(g::mask_reward), clip).rewards,
      g::openrlhf_reward_clipped, tol);
  const Tn m6 = bt(g::mask6, g::B6, g::T6), lp = bt(g::logprobs6, g::B6, g::T6),
           ref = bt(g::ref_logprobs6, g::B6, g::T6), scores = tvec(g::scores6);
  const Tn id = ids(std::vector<std::int64_t>(g::index6.begin(), g::index6.end()));
  const Tn non_score = kl_shaped_rewards(torch::zeros({g::B6}, torch::kDouble), lp, ref, m6, {.beta = 0.05}).rewards;
  check_values("OpenRLHF reinforce_baseline",
               reinforce_pp_baseline_advantages(scores, non_score, m6, id, reinforce_baseline_options::openrlhf()),
               g::openrlhf_reinforce_baseline, tol);
  whiten_options verl_whiten = whiten_options::verl();
  verl_whiten.outside = whiten_outside::zero;
  check_values("verl reinforce_plus_plus_baseline",
               reinforce_pp_baseline_advantages(scores, non_score, m6, id, {.whitening = verl_whiten}),
               g::verl_reinforce_pp_baseline, tol);
}

TEST_CASE("Peer conventions, torch: policy losses against golden gradients", "[peer][conventions][torch]") {
  // one row per option: the loss and d loss / d logprobs from the golden script, by autograd and by the backward
  struct policy_case {
    const char* name;
    std::function<Tn(const Tn&)> loss;
    std::function<Tn()> backward;
    double want_loss;
    std::vector<double> want_grad;
    Tn at;
  };
  const Tn m = bt(g::mask), old = bt(g::old_logprobs), A = bt(g::advantages);
  std::vector<policy_case> cases;

  {  // OpenRLHF GSPO: gradient through the sequence-mean ratio, count + 1e-8
    const Tn lp = bt(g::gspo_logprobs), gold = bt(g::gspo_old_logprobs);
    const auto o = policy_variant_options::openrlhf_gspo();
    const auto batch = [=](const Tn& x) {
      return policy_batch<Tn>{.logprobs = x, .advantages = A, .response_mask = m, .old_logprobs = gold};
    };
    cases.push_back({"OpenRLHF gspo", [=](const Tn& x) { return policy_variant_loss(batch(x), o).loss; },
                     [=] { return policy_variant_loss_backward(batch(lp), o); }, g::openrlhf_gspo_loss,
                     g::openrlhf_gspo_grad, lp});
    cases.push_back({"OpenRLHF gspo, grad_loss -2.5",
                     [=](const Tn& x) { return policy_variant_loss(batch(x), o).loss * -2.5; },
                     [=] { return policy_variant_loss_backward(batch(lp), o, -2.5); }, -2.5 * g::openrlhf_gspo_loss,
                     scaled(g::openrlhf_gspo_grad, -2.5), lp});
  }
  {  // OpenRLHF seq-mask-tis, through policy_variant_loss and grpo_loss (bnpo)
    const Tn lp = bt(g::is_logprobs), roll = bt(g::is_rollout_logprobs), Ai = bt(g::is_advantages),
             mr = bt(g::mask_reward);
    const policy_variant_options o{.clip = {.clip_low = 0.2, .log_ratio_clamp = 20.0},
                                   .rollout_is = rollout_is_options::openrlhf_seq_mask_tis(0.5, 5.0)};
    const auto batch = [=](const Tn& x) {
      return policy_batch<Tn>{
          .logprobs = x, .advantages = Ai, .response_mask = mr, .old_logprobs = old, .rollout_logprobs = roll};
    };
    cases.push_back({"seq-mask-tis", [=](const Tn& x) { return policy_variant_loss(batch(x), o).loss; },
                     [=] { return policy_variant_loss_backward(batch(lp), o); }, g::openrlhf_seq_mask_tis_loss,
                     g::openrlhf_seq_mask_tis_grad, lp});
    const grpo_options go{.loss_type = grpo_loss_type::bnpo,
                          .beta = 0.0,
                          .clip = {.clip_low = 0.2, .log_ratio_clamp = 20.0},
                          .rollout_is = rollout_is_options::openrlhf_seq_mask_tis(0.5, 5.0)};
    const auto gbatch = [=](const Tn& x) {
      return grpo_batch<Tn>{
          .logprobs = x, .advantages = Ai, .response_mask = mr, .old_logprobs = old, .rollout_logprobs = roll};
    };
    cases.push_back({"seq-mask-tis, grpo_loss bnpo", [=](const Tn& x) { return grpo_loss(gbatch(x), go).loss; },
                     [=] { return grpo_loss_backward(gbatch(lp), go); }, g::openrlhf_seq_mask_tis_loss,
                     g::openrlhf_seq_mask_tis_grad, lp});
  }
  {  // TRL grpo: count_empty_rows
    const Tn lp = bt(g::gspo_logprobs), Ag = tvec(g::grpo_advantages);
    grpo_options o{.loss_type = grpo_loss_type::grpo};
    o.count_empty_rows = true;
    const auto batch = [=](const Tn& x) {
      return grpo_batch<Tn>{.logprobs = x, .advantages = Ag, .response_mask = m, .old_logprobs = old};
    };
    cases.push_back({"TRL grpo count_empty_rows", [=](const Tn& x) { return grpo_loss(batch(x), o).loss; },
                     [=] { return grpo_loss_backward(batch(lp), o); }, g::trl_grpo_loss_empty_row,
                     g::trl_grpo_grad_empty_row, lp});
  }
  {  // verl value loss: token-mean and seq-mean-token-mean over n_b + 1e-8
    const Tn V = bt(g::vf_vpreds), vold = bt(g::vf_old_values), R = bt(g::vf_returns);
    const auto o = value_options::verl(0.5);
    auto os = o;
    os.reduction = aggregation::seq_mean_token_mean;
    cases.push_back({"verl value loss token-mean", [=](const Tn& x) { return value_loss(x, vold, R, m, o).loss; },
                     [=] { return value_loss_backward(V, vold, R, m, o); }, g::verl_vf_loss_token_mean,
                     g::verl_vf_grad_token_mean, V});
    cases.push_back({"verl value loss seq-mean-token-mean",
                     [=](const Tn& x) { return value_loss(x, vold, R, m, os).loss; },
                     [=] { return value_loss_backward(V, vold, R, m, os); }, g::verl_vf_loss_seq_mean_token_mean,
                     g::verl_vf_grad_seq_mean_token_mean, V});
  }

  {  // OpenRLHF VanillaKTOLoss: each side against the other side's KL (z not detached); z_U > 0 and z_U clamped
    const Tn ref = tvec(g::kto_ref_logps), des = tvec(g::kto_desirable);
    const auto o = kto_options::openrlhf_vanilla(0.1);
    const auto batch = [=](const Tn& x) { return unpaired_batch<Tn>{.logps = x, .ref_logps = ref, .desirable = des}; };
    for (const auto& [logps, loss, grad] :
         {std::tuple{&g::kto_logps, g::openrlhf_vanilla_kto_loss, &g::openrlhf_vanilla_kto_grad},
          std::tuple{&g::kto_logps_neg, g::openrlhf_vanilla_kto_loss_neg, &g::openrlhf_vanilla_kto_grad_neg}}) {
      const Tn lp = tvec(*logps);
      cases.push_back({"OpenRLHF vanilla KTO", [=](const Tn& x) { return kto(batch(x), o).loss; },
                       [=] { return kto_backward(batch(lp), o); }, loss, *grad, lp});
    }
  }

  for (const auto& c : cases) {
    INFO(c.name);
    check_value("loss", c.loss(c.at), c.want_loss, tol);
    check_gradient("d loss / d input", c.at, c.loss, c.backward(), c.want_grad);
  }
}

TEST_CASE("Peer conventions, torch: verl value-loss metrics (value_options::verl)", "[peer][conventions][torch]") {
  const auto r =
      value_loss(bt(g::vf_vpreds), bt(g::vf_old_values), bt(g::vf_returns), bt(g::mask), value_options::verl(0.5));
  check_value("vf_clipfrac", r.clipfrac, g::verl_vf_clipfrac, tol);
  check_value("vpred_mean", r.vpred_mean, g::verl_vpred_mean, tol);
}

TEST_CASE("Peer conventions, torch: TRL normalize_then_sum (batch) and frac_reward_zero_std under batch scaling",
          "[peer][conventions][torch]") {
  const Tn rewards = tvec(g::multi_rewards).reshape({6, 2});
  check_values(
      "normalize_then_sum",
      grpo_advantages_multi(rewards, {1.0, 0.5}, ids({0, 0, 0, 1, 1, 1}), multi_reward::normalize_then_sum_batch),
      g::trl_normalize_then_sum, tol);
  const Tn groups = ids({0, 0, 1, 1, 2, 2});
  const auto r = grpo_advantages(tvec(g::batch_scores), groups, {.scale = group_scale::batch});
  check_values("advantages", r.advantages, g::trl_batch_advantages, tol);
  check_value("frac_reward_zero_std", r.frac_reward_zero_std, g::trl_batch_frac_zero_std, tol);
  check_value("reward_std", r.reward_std, g::trl_reward_std, tol);
  check_value("group scaling counts the equal group",
              grpo_advantages(tvec(g::batch_scores), groups, {.scale = group_scale::group}).frac_reward_zero_std,
              1.0 / 3.0, tol);
  check_value(
      "all equal",
      grpo_advantages(tvec(std::vector<double>(6, 0.7)), groups, {.scale = group_scale::batch}).frac_reward_zero_std,
      g::trl_batch_frac_zero_std_equal, tol);
}

TEST_CASE("Peer conventions, torch: whole steps (TRL GRPO, verl PPO, OpenRLHF REINFORCE++-baseline)",
          "[peer][conventions][step][torch]") {
  SECTION("TRL: group advantages -> dapo loss with k3 -> metrics") {
    const auto b4 = [](const std::vector<double>& v) { return bt(v, g::BS, g::TS); };
    const Tn lp = b4(g::step_logprobs), m = b4(g::step_mask);
    const auto adv = grpo_advantages(tvec(g::step_scores), ids({0, 0, 1, 1}));
    check_values("advantages", adv.advantages, g::trl_step_advantages, tol);
    const auto batch = [&](const Tn& x) {
      return grpo_batch<Tn>{.logprobs = x,
                            .advantages = adv.advantages,
                            .response_mask = m,
                            .old_logprobs = b4(g::step_old_logprobs),
                            .ref_logprobs = b4(g::step_ref_logprobs)};
    };
    const grpo_options o{.beta = 0.04, .clip = clip_options::trl(0.2, 0.28)};
    const auto r = grpo_loss(batch(lp), o);
    check_value("loss", r.loss, g::trl_step_loss, tol);
    check_value("kl", r.kl, g::trl_step_kl, tol);
    check_value("clip_ratio/low_mean", r.clip_ratio_low, g::trl_step_clip_ratio_low, tol);
    check_value("clip_ratio/high_mean", r.clip_ratio_high, g::trl_step_clip_ratio_high, tol);
    check_value("clip_ratio/region_mean", r.clip_ratio_region, g::trl_step_clip_ratio_region, tol);
    check_value("clip_ratio/low_min", r.clip_ratio_low_min, g::trl_step_clip_ratio_low_min, tol);
    check_value("clip_ratio/high_max", r.clip_ratio_high_max, g::trl_step_clip_ratio_high_max, tol);
    check_gradient(
        "d loss / d logprobs", lp, [&](const Tn& x) { return grpo_loss(batch(x), o).loss; },
        grpo_loss_backward(batch(lp), o), g::trl_step_grad);
  }
  SECTION("verl: GAE -> policy loss and value loss -> metrics") {
    const Tn v = bt(g::values), m = bt(g::mask), lp = bt(g::logprobs), old = bt(g::old_logprobs);
    const auto est = gae(bt(g::rewards), v, m, gae_options::verl(0.9, 0.8));
    const auto o = ppo_options::verl();
    const auto pg = ppo_policy_loss(lp, old, est.advantages, m, o);
    check_value("actor/pg_loss", pg.loss, g::verl_step_pg_loss, tol);
    check_value("actor/pg_clipfrac", pg.pg_clipfrac, g::verl_step_pg_clipfrac, tol);
    check_value("actor/pg_clipfrac_lower", pg.pg_clipfrac_lower, g::verl_step_pg_clipfrac_lower, tol);
    check_value("actor/ppo_kl", pg.approx_kl, g::verl_step_ppo_kl, tol);
    check_gradient(
        "d pg_loss / d logprobs", lp, [&](const Tn& x) { return ppo_policy_loss(x, old, est.advantages, m, o).loss; },
        ppo_policy_loss_backward(lp, old, est.advantages, m, o), g::verl_step_pg_grad);
    const Tn vp = bt(g::vf_vpreds);
    const auto vo = value_options::verl(0.5);
    const auto vf = value_loss(vp, v, est.returns, m, vo);
    check_value("critic/vf_loss", vf.loss, g::verl_step_vf_loss, tol);
    check_value("critic/vf_clipfrac", vf.clipfrac, g::verl_step_vf_clipfrac, tol);
    check_value("critic/vpred_mean", vf.vpred_mean, g::verl_step_vpred_mean, tol);
    check_gradient(
        "d vf_loss / d vpreds", vp, [&](const Tn& x) { return value_loss(x, v, est.returns, m, vo).loss; },
        value_loss_backward(vp, v, est.returns, m, vo), g::verl_step_vf_grad);
  }
  SECTION("OpenRLHF: reinforce_baseline -> PPO policy loss -> metrics") {
    const auto b6 = [](const std::vector<double>& x) { return bt(x, g::B6, g::T6); };
    const Tn m6 = b6(g::mask6), old = b6(g::logprobs6), ref = b6(g::ref_logprobs6), lp = b6(g::openrlhf_step_logprobs);
    const Tn id = ids(std::vector<std::int64_t>(g::index6.begin(), g::index6.end()));
    const Tn non_score = kl_shaped_rewards(torch::zeros({g::B6}, torch::kDouble), old, ref, m6, {.beta = 0.05}).rewards;
    const Tn adv =
        reinforce_pp_baseline_advantages(tvec(g::scores6), non_score, m6, id, reinforce_baseline_options::openrlhf());
    const ppo_options o{.clip = {.clip_low = 0.2, .log_ratio_clamp = 20.0}};
    const auto pg = ppo_policy_loss(lp, old, adv, m6, o);
    check_value("policy loss", pg.loss, g::openrlhf_step_loss, tol);
    check_value("clip_ratio", pg.pg_clipfrac, g::openrlhf_step_clip_ratio, tol);
    check_value("ppo_kl", pg.approx_kl, g::openrlhf_step_ppo_kl, tol);
    check_gradient(
        "d loss / d log_probs", lp, [&](const Tn& x) { return ppo_policy_loss(x, old, adv, m6, o).loss; },
        ppo_policy_loss_backward(lp, old, adv, m6, o), g::openrlhf_step_grad);
  }
}

TEST_CASE("Peer conventions, torch: TRL WPO weights from the logits, through the weighted DPO loss",
          "[peer][conventions][dpo][torch]") {
  const Tn logits = tvec(g::wpo_logits).reshape({g::BW, g::TW, g::VW});
  const Tn labels = ids(std::vector<std::int64_t>(g::wpo_labels.begin(), g::wpo_labels.end())).reshape({g::BW, g::TW});
  const Tn w = wpo_weights(logits, labels);
  check_values("weights", w, g::trl_wpo_weights, tol);
  // TRL's concatenated batch [chosen 0, chosen 1, rejected 0, rejected 1]; the weights are constants
  const Tn logps = sequence_logps(logits, labels).logps;
  const auto batch = [&](const Tn& chosen, const Tn& rejected) {
    preference_batch<Tn> b{chosen, rejected};
    b.ref_chosen_logps = tvec(g::wpo_ref_chosen);
    b.ref_rejected_logps = tvec(g::wpo_ref_rejected);
    b.chosen_weights = w.slice(0, 0, 2);
    b.rejected_weights = w.slice(0, 2, 4);
    return b;
  };
  const Tn chosen = logps.slice(0, 0, 2), rejected = logps.slice(0, 2, 4);
  check_value("weighted sigmoid DPO loss", dpo(batch(chosen, rejected), {.beta = 0.1}).loss, g::trl_wpo_dpo_loss, tol);
  const auto& gw = g::trl_wpo_dpo_grad;
  const auto grad = dpo_backward(batch(chosen, rejected), {.beta = 0.1});
  check_gradient("d loss / d chosen_logps", chosen,
                 [&](const Tn& x) { return dpo(batch(x, rejected), {.beta = 0.1}).loss; }, grad.chosen_logps,
                 {gw[0], gw[1]});
  check_gradient("d loss / d rejected_logps", rejected,
                 [&](const Tn& x) { return dpo(batch(chosen, x), {.beta = 0.1}).loss; }, grad.rejected_logps,
                 {gw[2], gw[3]});
}

TEST_CASE("Peer conventions, torch: OpenRLHF PRMLoss (hard, soft, whole vocabulary) against its golden values",
          "[peer][conventions][prm][torch]") {
  namespace p = posttrain::golden_prm;
  const auto idx = [](const std::vector<std::int64_t>& v) { return ids(v).reshape({p::B, p::T}); };
  const Tn in = idx(p::input_ids), x = tvec(p::logits).reshape({p::B, p::T, p::V}),
           soft = tvec(p::soft_labels).reshape({p::B, p::T});
  const auto rewards = prm_options::openrlhf(p::placeholder, p::reward_ids);
  const auto vocab = prm_options::openrlhf(p::placeholder, {});
  struct prm_case {
    const char* name;
    std::function<prm_result<Tn>(const Tn&)> forward;
    std::function<Tn()> backward;
    double loss, accuracy;
    const std::vector<double>&per_step, &grad;
  };
  const std::vector<prm_case> cases{
      {"hard", [&](const Tn& z) { return prm_loss(in, z, idx(p::labels), rewards); },
       [&] { return prm_loss_backward(in, x, idx(p::labels), rewards); }, p::hard_loss, p::hard_acc_openrlhf,
       p::hard_per_step, p::hard_grad},
      {"soft", [&](const Tn& z) { return prm_loss_soft(in, z, soft, rewards); },
       [&] { return prm_loss_soft_backward(in, x, soft, rewards); }, p::soft_loss, p::soft_acc_openrlhf,
       p::soft_per_step, p::soft_grad},
      {"whole vocabulary", [&](const Tn& z) { return prm_loss(in, z, idx(p::labels_vocab), vocab); },
       [&] { return prm_loss_backward(in, x, idx(p::labels_vocab), vocab); }, p::vocab_loss, p::vocab_acc_openrlhf,
       p::vocab_per_step, p::vocab_grad},
  };
  for (const auto& c : cases) {
    INFO(c.name);
    const auto r = c.forward(x);
    check_value("loss", r.loss, c.loss, tol);
    check_value("accuracy (OpenRLHF: over every placeholder)", r.accuracy, c.accuracy, tol);
    check_values("per-step loss", r.per_step_loss, c.per_step, tol);
    check_gradient(
        "d loss / d logits", x, [&](const Tn& z) { return c.forward(z).loss; }, c.backward(), c.grad);
  }
}

}  // namespace test_peer_conventions_torch
