// posttrain/metrics.hpp — a result struct's logged scalars as one name -> value map, under the keys
// TRL or verl log them, from ONE host transfer.
//
//   auto out = posttrain::grpo_loss(batch, opts);
//   for (const auto& [key, value] : posttrain::metrics(out, posttrain::metric_keys::verl)) logger.log(key, value);
//
// The 0-d tensors of the result are detached, stacked into one 1-D tensor on their device
// (ops::concat) and converted with a single ops::to_host: one device-to-host copy (one CUDA sync)
// per call, instead of one .item() per metric. Values are doubles; the map is ordered by key.
//
// Keys (the framework each comes from; a result whose framework has no such trainer rejects verl keys):
//   sft_result            TRL SFTTrainer.compute_loss: loss, num_tokens, mean_token_accuracy, entropy
//                         verl fsdp_sft_trainer: train/loss
//   dpo_result            TRL DPOTrainer: loss, rewards/chosen, rewards/rejected, rewards/accuracies,
//                         rewards/margins, logps/chosen, logps/rejected                    (verl: none)
//   cpo_result            TRL CPOTrainer: the DPO keys + nll_loss                          (verl: none)
//   orpo_result           TRL ORPOTrainer: loss, rewards/{chosen,rejected,accuracies,margins}, nll_loss,
//                         log_odds_ratio, log_odds_chosen                                   (verl: none)
//   unpaired_result       TRL KTOTrainer / BCOTrainer: loss, kl, rewards/{chosen,rejected,margins},
//                         logps/{chosen,rejected}                                           (verl: none)
//   reward_model_result   TRL RewardTrainer: loss, accuracy, margin, min_reward, mean_reward, max_reward
//                         (mean_reward = mean over both columns)                            (verl: none)
//   ppo_policy_result     TRL PPOTrainer: loss/policy_avg, policy/approxkl_avg (½·mean Δlogp²),
//                         policy/clipfrac_avg, policy/entropy_avg, val/ratio; and GRPOTrainer's
//                         clip_ratio/{low_mean,low_min,high_mean,high_max,region_mean}
//                         verl dp_actor.update_policy: actor/pg_loss, actor/pg_clipfrac,
//                         actor/pg_clipfrac_lower, actor/ppo_kl, actor/entropy
//   policy_variant_result TRL GRPOTrainer._compute_loss: loss, entropy, clip_ratio/{low_mean,low_min,
//   grpo_result           high_mean,high_max,region_mean}, cispo_clip_ratio, vespo/phi_seq_mean,
//                         sampling/importance_sampling_ratio/{min,mean,max}; grpo_result adds kl
//                         verl: actor/pg_loss, actor/pg_clipfrac (= clip_ratio_region: verl's
//                         masked_mean(pg_losses2 > pg_losses1) is (ρ > 1+ε_h, A > 0) or (ρ < 1-ε_l, A < 0),
//                         TRL's region), actor/ppo_kl, actor/entropy; grpo_result adds actor/kl_loss
//   value_result          TRL PPOTrainer: loss/value_avg, val/clipfrac_avg
//                         verl dp_critic.update_critic: critic/vf_loss, critic/vf_clipfrac, critic/vpred_mean
//   ppo_objective_result  the policy's and the value's keys together, plus TRL's `loss` (the total)
//   distill_result        TRL GKDTrainer: loss                                              (verl: none)
//   group_advantage_result TRL GRPOTrainer._generate_and_score_completions (f2cd577): reward (the batch
//                         mean = the mean of the per-row group means), reward_std (the batch std, nanstd(rewards)),
//                         frac_reward_zero_std (of the batch std under group_scale::batch)   (verl: none)
// (gae_result, remax_result carry no scalars: nothing to log.) ppo_policy_result's `entropy` and the
// variants' / GRPO's `entropy` are 0 unless the caller passed per-token entropies.
#pragma once

#include <algorithm>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "posttrain/advantages/group.hpp"
#include "posttrain/detail/validate.hpp"
#include "posttrain/losses/cpo.hpp"
#include "posttrain/losses/distill.hpp"
#include "posttrain/losses/dpo.hpp"
#include "posttrain/losses/grpo.hpp"
#include "posttrain/losses/kto.hpp"
#include "posttrain/losses/orpo.hpp"
#include "posttrain/losses/policy_variants.hpp"
#include "posttrain/losses/ppo.hpp"
#include "posttrain/losses/reward_model.hpp"
#include "posttrain/losses/sft.hpp"
#include "posttrain/losses/value.hpp"
#include "posttrain/tensor.hpp"

namespace posttrain {

/// Whose metric names: TRL's trainers or verl's actor/critic workers.
enum class metric_keys { trl, verl };

inline const char* metric_keys_name(metric_keys k) { return k == metric_keys::trl ? "trl" : "verl"; }

namespace detail {

/// The named 0-d tensors of one result, in the order they are stacked.
template <tensor T>
using named_scalars = std::vector<std::pair<std::string, T>>;

/// One host transfer: every scalar detached, converted to the first one's dtype, reshaped to [1],
/// concatenated along dim 0 on its device, then ops::to_host once.
template <tensor T>
std::map<std::string, double> host_metrics(std::string_view fn, const named_scalars<T>& named) {
  std::map<std::string, double> out;
  if (named.empty()) return out;
  std::vector<T> parts;
  parts.reserve(named.size());
  for (const auto& [key, value] : named) {
    require_floating(fn, key, value);
    if (ops::numel(value) != 1)
      fail(fn, key, " must be a scalar (one element), got shape ", shape_string(ops::shape(value)));
  }
  const dtype d = ops::dtype_of(named.front().second);
  const std::string device = ops::device(named.front().second);
  for (const auto& [key, value] : named) {
    if (ops::device(value) != device)
      fail(fn, key, " is on device ", ops::device(value), " but ", named.front().first, " is on ", device);
    parts.push_back(ops::reshape(ops::to_dtype(ops::detach(value), d), shape_t{1}));
  }
  const std::vector<double> host = ops::to_host(ops::concat(parts, 0));  // [n]: the one transfer
  for (std::size_t i = 0; i < named.size(); ++i) out[named[i].first] = host[i];
  return out;
}

[[noreturn]] inline void no_verl_keys(std::string_view result) {
  fail("metrics", "verl has no trainer that logs a ", result, "; use metric_keys::trl");
}

/// The mean of a [B] tensor as a 0-d tensor (on its device).
template <tensor T>
T mean_all(const T& x) {
  return ops::div(ops::sum_all(x), static_cast<double>(std::max<std::int64_t>(ops::numel(x), 1)));
}

}  // namespace detail

/// TRL SFTTrainer: loss, num_tokens, mean_token_accuracy, entropy. verl fsdp_sft_trainer: train/loss.
template <tensor T>
std::map<std::string, double> metrics(const sft_result<T>& r, metric_keys keys = metric_keys::trl) {
  if (keys == metric_keys::verl) return detail::host_metrics<T>("metrics", {{"train/loss", r.loss}});
  return detail::host_metrics<T>("metrics", {{"loss", r.loss},
                                             {"num_tokens", r.num_tokens},
                                             {"mean_token_accuracy", r.token_accuracy},
                                             {"entropy", r.entropy}});
}

/// TRL DPOTrainer's rewards/* and logps/* (rewards are β·(log π - log π_ref)).
template <tensor T>
std::map<std::string, double> metrics(const dpo_result<T>& r, metric_keys keys = metric_keys::trl) {
  if (keys == metric_keys::verl) detail::no_verl_keys("dpo_result");
  return detail::host_metrics<T>("metrics", {{"loss", r.loss},
                                             {"rewards/chosen", r.rewards_chosen},
                                             {"rewards/rejected", r.rewards_rejected},
                                             {"rewards/accuracies", r.reward_accuracy},
                                             {"rewards/margins", r.reward_margin},
                                             {"logps/chosen", r.logps_chosen},
                                             {"logps/rejected", r.logps_rejected}});
}

/// TRL CPOTrainer: DPO's keys plus nll_loss.
template <tensor T>
std::map<std::string, double> metrics(const cpo_result<T>& r, metric_keys keys = metric_keys::trl) {
  if (keys == metric_keys::verl) detail::no_verl_keys("cpo_result");
  return detail::host_metrics<T>("metrics", {{"loss", r.loss},
                                             {"nll_loss", r.nll_loss},
                                             {"rewards/chosen", r.rewards_chosen},
                                             {"rewards/rejected", r.rewards_rejected},
                                             {"rewards/accuracies", r.reward_accuracy},
                                             {"rewards/margins", r.reward_margin},
                                             {"logps/chosen", r.logps_chosen},
                                             {"logps/rejected", r.logps_rejected}});
}

/// TRL ORPOTrainer: rewards/*, nll_loss, log_odds_ratio, log_odds_chosen.
template <tensor T>
std::map<std::string, double> metrics(const orpo_result<T>& r, metric_keys keys = metric_keys::trl) {
  if (keys == metric_keys::verl) detail::no_verl_keys("orpo_result");
  return detail::host_metrics<T>("metrics", {{"loss", r.loss},
                                             {"nll_loss", r.nll_loss},
                                             {"log_odds_ratio", r.log_odds_ratio},
                                             {"log_odds_chosen", r.log_odds_chosen},
                                             {"rewards/chosen", r.rewards_chosen},
                                             {"rewards/rejected", r.rewards_rejected},
                                             {"rewards/accuracies", r.reward_accuracy},
                                             {"rewards/margins", r.reward_margin}});
}

/// TRL KTOTrainer / BCOTrainer: kl (KTO's z, BCO's δ), rewards/*, logps/*.
template <tensor T>
std::map<std::string, double> metrics(const unpaired_result<T>& r, metric_keys keys = metric_keys::trl) {
  if (keys == metric_keys::verl) detail::no_verl_keys("unpaired_result");
  return detail::host_metrics<T>("metrics", {{"loss", r.loss},
                                             {"kl", r.kl},
                                             {"rewards/chosen", r.rewards_chosen},
                                             {"rewards/rejected", r.rewards_rejected},
                                             {"rewards/margins", r.reward_margin},
                                             {"logps/chosen", r.logps_chosen},
                                             {"logps/rejected", r.logps_rejected}});
}

/// TRL RewardTrainer: accuracy, margin, {min,mean,max}_reward (mean over both columns of equal length).
template <tensor T>
std::map<std::string, double> metrics(const reward_model_result<T>& r, metric_keys keys = metric_keys::trl) {
  if (keys == metric_keys::verl) detail::no_verl_keys("reward_model_result");
  return detail::host_metrics<T>("metrics", {{"loss", r.loss},
                                             {"accuracy", r.accuracy},
                                             {"margin", r.margin},
                                             {"min_reward", r.min_reward},
                                             {"mean_reward", ops::mul(ops::add(r.mean_chosen, r.mean_rejected), 0.5)},
                                             {"max_reward", r.max_reward}});
}

namespace detail {
template <tensor T>
named_scalars<T> ppo_policy_scalars(const ppo_policy_result<T>& r, metric_keys keys) {
  if (keys == metric_keys::verl)
    // verl dp_actor.update_policy / core_algos.compute_policy_loss_vanilla
    return {{"actor/pg_loss", r.loss},
            {"actor/pg_clipfrac", r.pg_clipfrac},
            {"actor/pg_clipfrac_lower", r.pg_clipfrac_lower},
            {"actor/ppo_kl", r.approx_kl},
            {"actor/entropy", r.entropy}};
  // TRL PPOTrainer (loss/policy_avg, policy/*, val/ratio) and GRPOTrainer (clip_ratio/*)
  return {{"loss/policy_avg", r.loss},
          {"policy/approxkl_avg", r.approx_kl_sq},
          {"policy/clipfrac_avg", r.pg_clipfrac},
          {"policy/entropy_avg", r.entropy},
          {"val/ratio", r.ratio_mean},
          {"clip_ratio/low_mean", r.clip_ratio_low},
          {"clip_ratio/low_min", r.clip_ratio_low_min},
          {"clip_ratio/high_mean", r.clip_ratio_high},
          {"clip_ratio/high_max", r.clip_ratio_high_max},
          {"clip_ratio/region_mean", r.clip_ratio_region}};
}

template <tensor T>
named_scalars<T> value_scalars(const value_result<T>& r, metric_keys keys) {
  if (keys == metric_keys::verl)  // verl dp_critic.update_critic
    return {{"critic/vf_loss", r.loss}, {"critic/vf_clipfrac", r.clipfrac}, {"critic/vpred_mean", r.vpred_mean}};
  return {{"loss/value_avg", r.loss}, {"val/clipfrac_avg", r.clipfrac}};  // TRL PPOTrainer
}

/// The keys policy_variant_result and grpo_result share.
template <tensor T, class R>
named_scalars<T> variant_scalars(const R& r, metric_keys keys) {
  if (keys == metric_keys::verl)
    return {{"actor/pg_loss", r.loss},
            {"actor/pg_clipfrac", r.clip_ratio_region},
            {"actor/ppo_kl", r.approx_kl},
            {"actor/entropy", r.entropy}};
  return {{"loss", r.loss},
          {"entropy", r.entropy},
          {"clip_ratio/low_mean", r.clip_ratio_low},
          {"clip_ratio/low_min", r.clip_ratio_low_min},
          {"clip_ratio/high_mean", r.clip_ratio_high},
          {"clip_ratio/high_max", r.clip_ratio_high_max},
          {"clip_ratio/region_mean", r.clip_ratio_region},
          {"cispo_clip_ratio", r.cispo_clip_ratio}};
}
}  // namespace detail

/// TRL PPOTrainer + GRPOTrainer's clip_ratio/*, or verl's actor/* (see the file comment).
template <tensor T>
std::map<std::string, double> metrics(const ppo_policy_result<T>& r, metric_keys keys = metric_keys::trl) {
  return detail::host_metrics("metrics", detail::ppo_policy_scalars(r, keys));
}

/// TRL PPOTrainer's loss/value_avg, val/clipfrac_avg, or verl's critic/*.
template <tensor T>
std::map<std::string, double> metrics(const value_result<T>& r, metric_keys keys = metric_keys::trl) {
  return detail::host_metrics("metrics", detail::value_scalars(r, keys));
}

/// The policy's and the value's keys, plus TRL's `loss` (the combined objective).
template <tensor T>
std::map<std::string, double> metrics(const ppo_objective_result<T>& r, metric_keys keys = metric_keys::trl) {
  detail::named_scalars<T> all = detail::ppo_policy_scalars(r.policy, keys);
  for (auto& kv : detail::value_scalars(r.value, keys)) all.push_back(std::move(kv));
  if (keys == metric_keys::trl) all.emplace_back("loss", r.loss);
  return detail::host_metrics("metrics", all);
}

/// TRL GRPOTrainer's keys for a policy-loss variant (VESPO's phi, rollout IS ratios), or verl's actor/*.
template <tensor T>
std::map<std::string, double> metrics(const policy_variant_result<T>& r, metric_keys keys = metric_keys::trl) {
  detail::named_scalars<T> all = detail::variant_scalars<T>(r, keys);
  if (keys == metric_keys::trl) {
    all.emplace_back("vespo/phi_seq_mean", r.phi_mean);
    all.emplace_back("sampling/importance_sampling_ratio/min", r.is_ratio_min);
    all.emplace_back("sampling/importance_sampling_ratio/mean", r.is_ratio_mean);
    all.emplace_back("sampling/importance_sampling_ratio/max", r.is_ratio_max);
  }
  return detail::host_metrics("metrics", all);
}

/// TRL GRPOTrainer._compute_loss's keys (with kl), or verl's actor/* (with actor/kl_loss).
template <tensor T>
std::map<std::string, double> metrics(const grpo_result<T>& r, metric_keys keys = metric_keys::trl) {
  detail::named_scalars<T> all = detail::variant_scalars<T>(r, keys);
  if (keys == metric_keys::verl) {
    all.emplace_back("actor/kl_loss", r.kl);
  } else {
    all.emplace_back("kl", r.kl);
    all.emplace_back("vespo/phi_seq_mean", r.vespo_phi_seq_mean);
    all.emplace_back("sampling/importance_sampling_ratio/min", r.is_ratio_min);
    all.emplace_back("sampling/importance_sampling_ratio/mean", r.is_ratio_mean);
    all.emplace_back("sampling/importance_sampling_ratio/max", r.is_ratio_max);
  }
  return detail::host_metrics("metrics", all);
}

/// TRL GKDTrainer logs the loss alone.
template <tensor T>
std::map<std::string, double> metrics(const distill_result<T>& r, metric_keys keys = metric_keys::trl) {
  if (keys == metric_keys::verl) detail::no_verl_keys("distill_result");
  return detail::host_metrics<T>("metrics", {{"loss", r.loss}});
}

/// TRL GRPOTrainer (f2cd577): reward = nanmean(rewards) (= the mean of the per-row group means), reward_std =
/// nanstd(rewards) (the batch std; older TRL logged the mean of the group stds), frac_reward_zero_std.
template <tensor T>
std::map<std::string, double> metrics(const group_advantage_result<T>& r, metric_keys keys = metric_keys::trl) {
  if (keys == metric_keys::verl) detail::no_verl_keys("group_advantage_result");
  return detail::host_metrics<T>("metrics", {{"reward", detail::mean_all(r.group_mean)},
                                             {"reward_std", r.reward_std},
                                             {"frac_reward_zero_std", r.frac_reward_zero_std}});
}

}  // namespace posttrain
