// posttrain::metrics (issue 15 item 5): a result's scalars as a name -> value map under TRL's or verl's
// keys, from one host transfer. Keys and values are checked against the result's own fields (read one
// by one here), the new GRPO / variant metrics (verl actor/ppo_kl, TRL `entropy`) against masked means
// written out in loops, and a recording backend (tests/support/recording.hpp) shows one concat and one
// to_host per call. Rejections: verl keys for a result verl has no trainer for, a non-scalar field.
#include <catch2/catch.hpp>
#include <cmath>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/metrics.hpp"
#include "support/data.hpp"
#include "support/eigen_checks.hpp"
#include "support/linear_eigen.hpp"
#include "support/recording.hpp"
#include "support/tolerances.hpp"

namespace recording {
/// The concept's operations only, each call counted.
struct metrics_recorder {
  posttrain::eigen_tensor<double> value;
};
}  // namespace recording

namespace posttrain {
template <>
struct tensor_traits<recording::metrics_recorder> : recording_traits<recording::metrics_recorder> {};
}  // namespace posttrain

namespace test_metrics_map {  // one namespace per test file: the unity build compiles several in one TU

using namespace posttrain;
using recording::metrics_recorder;
using tensor_d = eigen_tensor<double>;
using test::expect_error;
using test::make;

namespace {

double item(const tensor_d& x) { return ops::item(x); }

std::set<std::string> keys_of(const std::map<std::string, double>& m) {
  std::set<std::string> k;
  for (const auto& kv : m) k.insert(kv.first);
  return k;
}

/// Every key present, and each value equal (exactly: the same double read back) to its field.
void require_map(const std::map<std::string, double>& got, const std::map<std::string, double>& want) {
  CHECK(keys_of(got) == keys_of(want));
  for (const auto& [k, v] : want) {
    INFO(k);
    REQUIRE(got.count(k) == 1);
    CHECK(got.at(k) == v);
  }
}

preference_batch<tensor_d> pairs() {
  return {.chosen_logps = make({3}, {-1.0, -4.0, -2.5}),
          .rejected_logps = make({3}, {-2.0, -3.0, -6.0}),
          .ref_chosen_logps = make({3}, {-1.5, -3.5, -2.0}),
          .ref_rejected_logps = make({3}, {-1.0, -3.2, -5.0})};
}

/// A [2, 4] GRPO batch: row 1's last token masked, old log-probs and entropies given.
grpo_batch<tensor_d> grpo_inputs() {
  return {.logprobs = make({2, 4}, {-1.0, -0.5, -2.0, -0.1, -0.3, -1.2, -0.8, -9.0}),
          .advantages = make({2}, {0.7, -0.4}),
          .response_mask = make({2, 4}, {1, 1, 1, 1, 1, 1, 1, 0}),
          .old_logprobs = make({2, 4}, {-1.4, -0.2, -2.0, -0.6, -0.1, -1.0, -1.5, -3.0}),
          .entropies = make({2, 4}, {0.5, 1.5, 2.0, 0.25, 1.0, 0.75, 3.0, 99.0})};
}

}  // namespace

TEST_CASE("metrics: DPO, CPO, ORPO, KTO and reward-model results under TRL's keys", "[metrics]") {
  const auto d = dpo(pairs());
  require_map(metrics(d), {{"loss", item(d.loss)},
                           {"rewards/chosen", item(d.rewards_chosen)},
                           {"rewards/rejected", item(d.rewards_rejected)},
                           {"rewards/accuracies", item(d.reward_accuracy)},
                           {"rewards/margins", item(d.reward_margin)},
                           {"logps/chosen", item(d.logps_chosen)},
                           {"logps/rejected", item(d.logps_rejected)}});
  // rewards/margins by hand: β·mean((l_c - l_c,ref) - (l_r - l_r,ref)) with β = 0.1 (TRL's default)
  CHECK(metrics(d).at("rewards/margins") ==
        Approx(0.1 * ((0.5 - -1.0) + (-0.5 - 0.2) + (-0.5 - -1.0)) / 3.0).epsilon(1e-12));

  const auto rm = reward_model_loss(make({3}, {1.0, 0.5, -2.0}), make({3}, {0.0, 1.5, -3.0}));
  const auto rmm = metrics(rm);
  // TRL mean_reward: the mean over all six rewards, -2/6 (computed on the device from the two column means)
  CHECK(rmm.at("mean_reward") == Approx(-2.0 / 6.0).epsilon(1e-12));
  require_map(rmm, {{"loss", item(rm.loss)},
                    {"accuracy", item(rm.accuracy)},
                    {"margin", item(rm.margin)},
                    {"min_reward", item(rm.min_reward)},
                    {"mean_reward", rmm.at("mean_reward")},
                    {"max_reward", item(rm.max_reward)}});
}

TEST_CASE("metrics: SFT under TRL's and verl's keys", "[metrics]") {
  const tensor_d logits = test::to_eigen<double>(test::random_normal({2, 3, 5}, 1601));
  const eigen_index labels({2, 3}, {1, -100, 4, 0, 2, 2});
  const auto r = sft_loss(logits, labels);
  require_map(metrics(r), {{"loss", item(r.loss)},
                           {"num_tokens", 5.0},
                           {"mean_token_accuracy", item(r.token_accuracy)},
                           {"entropy", item(r.entropy)}});
  require_map(metrics(r, metric_keys::verl), {{"train/loss", item(r.loss)}});
}

TEST_CASE("metrics: GRPO reports verl's ppo_kl and TRL's entropy, defined as the frameworks define them",
          "[metrics][rl]") {
  const auto b = grpo_inputs();
  const auto r = grpo_loss(b, {.beta = 0.0});
  // verl ppo_kl = masked_mean(old - new): over the 7 kept tokens
  const double kl =
      ((-1.4 + 1.0) + (-0.2 + 0.5) + 0.0 + (-0.6 + 0.1) + (-0.1 + 0.3) + (-1.0 + 1.2) + (-1.5 + 0.8)) / 7.0;
  CHECK(item(r.approx_kl) == Approx(kl).epsilon(1e-12));
  // TRL mean_entropy = Σ H·m / Σ m (the masked 99 never counts)
  CHECK(item(r.entropy) == Approx((0.5 + 1.5 + 2.0 + 0.25 + 1.0 + 0.75 + 3.0) / 7.0).epsilon(1e-12));
  require_map(metrics(r), {{"loss", item(r.loss)},
                           {"entropy", item(r.entropy)},
                           {"kl", item(r.kl)},
                           {"clip_ratio/low_mean", item(r.clip_ratio_low)},
                           {"clip_ratio/low_min", item(r.clip_ratio_low_min)},
                           {"clip_ratio/high_mean", item(r.clip_ratio_high)},
                           {"clip_ratio/high_max", item(r.clip_ratio_high_max)},
                           {"clip_ratio/region_mean", item(r.clip_ratio_region)},
                           {"cispo_clip_ratio", item(r.cispo_clip_ratio)},
                           {"vespo/phi_seq_mean", item(r.vespo_phi_seq_mean)},
                           {"sampling/importance_sampling_ratio/min", item(r.is_ratio_min)},
                           {"sampling/importance_sampling_ratio/mean", item(r.is_ratio_mean)},
                           {"sampling/importance_sampling_ratio/max", item(r.is_ratio_max)}});
  require_map(metrics(r, metric_keys::verl), {{"actor/pg_loss", item(r.loss)},
                                              {"actor/pg_clipfrac", item(r.clip_ratio_region)},
                                              {"actor/ppo_kl", item(r.approx_kl)},
                                              {"actor/entropy", item(r.entropy)},
                                              {"actor/kl_loss", item(r.kl)}});
  // Without entropies (and on-policy) both are 0.
  auto on_policy = b;
  on_policy.entropies.reset();
  on_policy.old_logprobs.reset();
  const auto r0 = grpo_loss(on_policy);
  CHECK(item(r0.entropy) == 0.0);
  CHECK(item(r0.approx_kl) == 0.0);
}

TEST_CASE("metrics: verl's pg_clipfrac is TRL's clip_ratio/region_mean (ppo_policy_loss computes both)",
          "[metrics][rl]") {
  const auto b = grpo_inputs();
  const tensor_d A = make({2, 4}, {0.7, 0.7, 0.7, 0.7, -0.4, -0.4, -0.4, -0.4});
  const auto p = ppo_policy_loss(b.logprobs, *b.old_logprobs, A, b.response_mask, {}, b.entropies);
  CHECK(item(p.pg_clipfrac) == item(p.clip_ratio_region));
  require_map(metrics(p, metric_keys::verl), {{"actor/pg_loss", item(p.loss)},
                                              {"actor/pg_clipfrac", item(p.pg_clipfrac)},
                                              {"actor/pg_clipfrac_lower", item(p.pg_clipfrac_lower)},
                                              {"actor/ppo_kl", item(p.approx_kl)},
                                              {"actor/entropy", item(p.entropy)}});
  require_map(metrics(p), {{"loss/policy_avg", item(p.loss)},
                           {"policy/approxkl_avg", item(p.approx_kl_sq)},
                           {"policy/clipfrac_avg", item(p.pg_clipfrac)},
                           {"policy/entropy_avg", item(p.entropy)},
                           {"val/ratio", item(p.ratio_mean)},
                           {"clip_ratio/low_mean", item(p.clip_ratio_low)},
                           {"clip_ratio/low_min", item(p.clip_ratio_low_min)},
                           {"clip_ratio/high_mean", item(p.clip_ratio_high)},
                           {"clip_ratio/high_max", item(p.clip_ratio_high_max)},
                           {"clip_ratio/region_mean", item(p.clip_ratio_region)}});
  // The policy variants carry the same two new metrics as GRPO.
  const policy_batch<tensor_d> pb{b.logprobs, b.advantages, b.response_mask, b.old_logprobs, std::nullopt, b.entropies};
  const auto v = policy_variant_loss(pb);
  CHECK(item(v.approx_kl) == item(p.approx_kl));
  CHECK(item(v.entropy) == item(p.entropy));
  require_map(metrics(v, metric_keys::verl), {{"actor/pg_loss", item(v.loss)},
                                              {"actor/pg_clipfrac", item(v.clip_ratio_region)},
                                              {"actor/ppo_kl", item(v.approx_kl)},
                                              {"actor/entropy", item(v.entropy)}});
  CHECK(metrics(v).size() == 12);
}

TEST_CASE("metrics: value loss and the combined PPO objective", "[metrics][rl]") {
  const auto b = grpo_inputs();
  const tensor_d values = make({2, 4}, {0.1, 0.4, -0.2, 0.3, 1.0, 0.0, 0.5, 7.0});
  const tensor_d old_values = make({2, 4}, {0.0, 0.9, -0.1, 0.3, 0.5, 0.1, 0.5, 7.0});
  const tensor_d returns = make({2, 4}, {0.5, 0.5, 0.5, 0.5, -1.0, -1.0, -1.0, -1.0});
  const auto vr = value_loss(values, old_values, returns, b.response_mask);
  require_map(metrics(vr, metric_keys::verl), {{"critic/vf_loss", item(vr.loss)},
                                               {"critic/vf_clipfrac", item(vr.clipfrac)},
                                               {"critic/vpred_mean", item(vr.vpred_mean)}});
  require_map(metrics(vr), {{"loss/value_avg", item(vr.loss)}, {"val/clipfrac_avg", item(vr.clipfrac)}});
  const tensor_d A = make({2, 4}, {0.7, 0.7, 0.7, 0.7, -0.4, -0.4, -0.4, -0.4});
  const auto obj = ppo_objective(b.logprobs, *b.old_logprobs, A, values, old_values, returns, b.response_mask);
  const auto m = metrics(obj);
  CHECK(m.size() == 10 + 2 + 1);
  CHECK(m.at("loss") == item(obj.loss));
  CHECK(m.at("loss/value_avg") == item(obj.value.loss));
  CHECK(m.at("loss/policy_avg") == item(obj.policy.loss));
  CHECK(metrics(obj, metric_keys::verl).size() == 5 + 3);
}

TEST_CASE("metrics: group advantages under TRL's reward keys", "[metrics][rl]") {
  const auto g = grpo_advantages(make({4}, {1.0, 0.0, 2.0, 2.0}), eigen_index({4}, {0, 0, 1, 1}));
  // TRL f2cd577: reward = nanmean(rewards) = the mean of the per-row group means = (0.5 + 0.5 + 2 + 2) / 4;
  // reward_std = nanstd(rewards), the batch std: deviations -0.25, -1.25, 0.75, 0.75 -> sqrt(2.75 / 3)
  const auto m = metrics(g);
  CHECK(m.at("reward") == Approx(1.25).epsilon(1e-12));
  CHECK(m.at("reward_std") == Approx(std::sqrt(2.75 / 3.0)).epsilon(1e-12));
  CHECK(m.at("frac_reward_zero_std") == Approx(0.5).epsilon(1e-12));
}

TEST_CASE("metrics: one concat and one host transfer per call (recording backend)", "[metrics][archetype]") {
  const auto wrap = [](const tensor_d& x) { return metrics_recorder{x}; };
  const auto p = pairs();
  const preference_batch<metrics_recorder> rb{.chosen_logps = wrap(p.chosen_logps),
                                              .rejected_logps = wrap(p.rejected_logps),
                                              .ref_chosen_logps = wrap(*p.ref_chosen_logps),
                                              .ref_rejected_logps = wrap(*p.ref_rejected_logps)};
  const auto d = dpo(rb);
  recording::reset();
  const auto m = metrics(d);
  CHECK(m.size() == 7);
  CHECK(recording::count("to_host") == 1);
  CHECK(recording::count("concat") == 1);
  CHECK(m.at("rewards/margins") == item(dpo(pairs()).reward_margin));

  const auto b = grpo_inputs();
  const grpo_batch<metrics_recorder> gb{.logprobs = wrap(b.logprobs),
                                        .advantages = wrap(b.advantages),
                                        .response_mask = wrap(b.response_mask),
                                        .old_logprobs = wrap(*b.old_logprobs),
                                        .entropies = wrap(*b.entropies)};
  const auto r = grpo_loss(gb);
  for (const auto keys : {metric_keys::trl, metric_keys::verl}) {
    recording::reset();
    const auto gm = metrics(r, keys);
    CHECK(gm.size() == (keys == metric_keys::trl ? 13u : 5u));
    CHECK(recording::count("to_host") == 1);
    CHECK(recording::count("concat") == 1);
  }
}

TEST_CASE("metrics rejects verl keys where verl has no such trainer, and a non-scalar field", "[metrics][errors]") {
  const auto d = dpo(pairs());
  expect_error([&] { (void)metrics(d, metric_keys::verl); }, "metrics", {"verl", "dpo_result", "metric_keys::trl"});
  const auto rm = reward_model_loss(make({2}, {1.0, 0.5}), make({2}, {0.0, 1.5}));
  expect_error([&] { (void)metrics(rm, metric_keys::verl); }, "metrics", {"verl", "reward_model_result"});
  auto broken = d;
  broken.rewards_chosen = make({2}, {0.1, 0.2});  // a per-pair tensor where a scalar belongs
  expect_error([&] { (void)metrics(broken); }, "metrics", {"rewards/chosen", "must be a scalar", "[2]"});
}

}  // namespace test_metrics_map
