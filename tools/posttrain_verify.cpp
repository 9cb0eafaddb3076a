// posttrain-verify — check a trainer's dumped tensors against posttrain's double-precision Eigen reference.
//
//   posttrain-verify step.safetensors --loss dpo --set loss_type=sigmoid,beta=0.1
//   posttrain-verify --template grpo
//
// The dump (safetensors; or torch.save's zip format, read through LibTorch's unpickler in a module loaded for
// .pt dumps only, when the tool was built with LibTorch) holds one step's inputs and whichever outputs the
// trainer saved, under the framework's names (TRL/verl). Every input is converted to double, the loss is
// recomputed with the Eigen reference, and each output present in the dump is compared element-wise with the
// tolerance of its precision: |got - reference| <= atol + rtol·|reference|. Exit status: 0 every compared output
// passes, 1 one fails, 2 the input or the command line is malformed (one line on stderr).
#include <CLI/CLI.hpp>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <iomanip>
#include <iostream>
#include <iterator>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "posttrain/advantages/gae.hpp"
#include "posttrain/advantages/group.hpp"
#include "posttrain/backends/eigen.hpp"
#include "posttrain/check/compare.hpp"
#include "posttrain/io/safetensors.hpp"
#include "posttrain/kl/estimators.hpp"
#include "posttrain/losses/distill.hpp"
#include "posttrain/losses/dpo.hpp"
#include "posttrain/losses/grpo.hpp"
#include "posttrain/losses/ppo.hpp"
#include "posttrain/losses/reward_model.hpp"
#include "posttrain/losses/sft.hpp"
#if POSTTRAIN_VERIFY_WITH_TORCH
#include <dlfcn.h>

#include <filesystem>
#endif

namespace {

using posttrain::eigen_index;
using posttrain::eigen_tensor;
using posttrain::io::st_dtype;
using tensor = eigen_tensor<double>;
using shape_t = std::vector<std::int64_t>;

/// A usage or input problem: reported on one line, exit status 2.
struct usage_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

std::string join(const std::vector<std::string>& parts, const std::string& sep = ", ") {
  std::string out;
  for (std::size_t i = 0; i < parts.size(); ++i) out += (i ? sep : "") + parts[i];
  return out;
}

// ---- loss specifications --------------------------------------------------------------------

struct tensor_spec {
  std::string name;                  ///< verl/TRL name looked up in the dump
  std::vector<std::string> aliases;  ///< other frameworks' names for the same tensor
  std::string shape;                 ///< e.g. "[B, T, V]"
  std::string dtype;                 ///< e.g. "float (F32/F64/BF16/F16)"
  bool required = true;
  std::string doc;
  bool on_mask = false;  ///< an output compared only where response_mask keeps (elsewhere frameworks differ)
};

struct option_spec {
  std::string key;
  std::string fallback;             ///< the default, as text ("" = unset)
  std::vector<std::string> values;  ///< the valid spellings of an enum option; empty for numbers/booleans
  std::string doc;
  bool boolean = false;
};

using options_t = std::map<std::string, std::string>;

/// What a loss reads and computes. `compute` returns the reference of every output it knows, by name.
struct loss_spec {
  std::string name;
  std::string framework;
  std::vector<tensor_spec> inputs;
  std::vector<tensor_spec> outputs;
  std::vector<option_spec> options;
  std::function<std::string(const options_t&)> explain;
  /// --preset names; the first is the default ("none": the framework named above, no other choice).
  std::vector<std::string> presets = {"none"};
};

const std::string float_dtype = "float (F64/F32/BF16/F16)";
const std::string int_dtype = "integer (I64/I32)";

double number_option(const options_t& o, const std::string& key) {
  const std::string& text = o.at(key);
  std::size_t used = 0;
  double v = 0;
  try {
    v = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != text.size() || !std::isfinite(v))
    throw usage_error("--set " + key + "=" + text + ": not a finite number");
  return v;
}

std::optional<double> optional_number(const options_t& o, const std::string& key) {
  if (o.at(key).empty()) return std::nullopt;
  return number_option(o, key);
}

bool bool_option(const options_t& o, const std::string& key) {
  const std::string& v = o.at(key);
  if (v == "true" || v == "1" || v == "True") return true;
  if (v == "false" || v == "0" || v == "False") return false;
  throw usage_error("--set " + key + "=" + v + ": expected true or false");
}

// DPO loss types TRL's dpo_loss implements on its (chosen_logps, rejected_logps, ref_*) arguments alone.
const std::vector<std::pair<std::string, posttrain::dpo_loss>> dpo_types = {
    {"sigmoid", posttrain::dpo_loss::sigmoid},
    {"hinge", posttrain::dpo_loss::hinge},
    {"ipo", posttrain::dpo_loss::ipo},
    {"exo_pair", posttrain::dpo_loss::exo_pair},
    {"nca_pair", posttrain::dpo_loss::nca_pair},
    {"robust", posttrain::dpo_loss::robust},
    {"bco_pair", posttrain::dpo_loss::bco_pair},
    {"sppo_hard", posttrain::dpo_loss::sppo_hard},
    {"apo_zero", posttrain::dpo_loss::apo_zero},
    {"apo_down", posttrain::dpo_loss::apo_down},
    {"discopop", posttrain::dpo_loss::discopop},
    {"aot", posttrain::dpo_loss::aot},
    {"aot_pair", posttrain::dpo_loss::aot_unpaired}};

const std::vector<std::pair<std::string, posttrain::grpo_loss_type>> grpo_types = {
    {"grpo", posttrain::grpo_loss_type::grpo},
    {"bnpo", posttrain::grpo_loss_type::bnpo},
    {"dr_grpo", posttrain::grpo_loss_type::dr_grpo},
    {"dapo", posttrain::grpo_loss_type::dapo}};

/// verl core_algos.kl_penalty's names: kl/k1, abs, mse/k2, low_var_kl/k3 (clamped as verl), and "+" (straight-
/// through: the value of the estimator, the gradient of k2).
posttrain::kl_options kl_options_of(const std::string& name) {
  std::string base = name;
  const bool plus = !base.empty() && base.back() == '+';
  if (plus) base.pop_back();
  posttrain::kl_options o;
  if (base == "kl" || base == "k1")
    o.estimator = posttrain::kl_estimator::k1;
  else if (base == "abs")
    o.estimator = posttrain::kl_estimator::abs;
  else if (base == "mse" || base == "k2")
    o.estimator = posttrain::kl_estimator::k2;
  else
    o = posttrain::kl_options::verl_low_var_kl();  // low_var_kl, k3
  o.straight_through = plus;
  return o;
}

const std::vector<std::string> kl_names = {"kl",  "k1",   "abs",  "mse", "k2",          "low_var_kl", "k3",
                                           "k1+", "abs+", "mse+", "k2+", "low_var_kl+", "k3+"};

template <class E>
E lookup(const std::vector<std::pair<std::string, E>>& table, const std::string& name) {
  for (const auto& [n, e] : table)
    if (n == name) return e;
  throw usage_error("unknown value " + name);  // unreachable: values are validated against the spec first
}

template <class E>
std::vector<std::string> names_of(const std::vector<std::pair<std::string, E>>& table) {
  std::vector<std::string> out;
  for (const auto& p : table) out.push_back(p.first);
  return out;
}

std::vector<loss_spec> make_specs() {
  std::vector<loss_spec> specs;
  // -- sft -------------------------------------------------------------------------------------
  specs.push_back(
      {"sft",
       "Hugging Face transformers ForCausalLMLoss (TRL SFTTrainer)",
       {{"logits", {}, "[B, T, V]", float_dtype, true, "the model's logits"},
        {"labels",
         {"input_ids"},
         "[B, T]",
         int_dtype,
         true,
         "token ids, -100 where ignored; unshifted (HF) unless shift_labels=false"}},
       {{"loss", {}, "[]", float_dtype, false, "the mean cross-entropy over counted tokens"},
        {"per_token_loss",
         {"losses"},
         "[B, T]",
         float_dtype,
         false,
         "reduction='none' after the shift (0 at ignored positions)"},
        {"logits.grad", {"logits_grad"}, "[B, T, V]", float_dtype, false, "d loss / d logits"}},
       {{"ignore_index", "-100", {}, "labels equal to it are skipped"},
        {"label_smoothing", "0", {}, "epsilon of torch cross_entropy"},
        {"shift_labels", "true", {}, "labels[t+1] is the target of logits[t] (HF); false: already shifted", true},
        {"num_items_in_batch", "", {}, "divide the summed loss by this count (HF/TRL gradient accumulation)"}},
       [](const options_t& o) {
         return "per token  l_t = -(1-eps) log softmax(logits_t)[y_t] - eps/V sum_v log softmax(logits_t)[v]\n"
                "targets    y_t = labels[t+1] (shift_labels=" +
                o.at("shift_labels") +
                ", HF ForCausalLMLoss pads labels with ignore_index and shifts them left)\n"
                "loss       sum_t m_t l_t / " +
                (o.at("num_items_in_batch").empty() ? std::string("sum_t m_t") : o.at("num_items_in_batch")) +
                ",  m_t = [y_t != " + o.at("ignore_index") +
                "]\n"
                "gradient   logits.grad = d loss / d logits (0 at the last position of each row after the shift)\n";
       }});
  // -- dpo -------------------------------------------------------------------------------------
  specs.push_back(
      {"dpo",
       "TRL DPOTrainer.dpo_loss (trl/trainer/dpo_trainer.py)",
       {{"chosen_logps",
         {"policy_chosen_logps"},
         "[B]",
         float_dtype,
         true,
         "policy log-prob of each chosen completion"},
        {"rejected_logps", {"policy_rejected_logps"}, "[B]", float_dtype, true, "policy, rejected"},
        {"ref_chosen_logps", {"reference_chosen_logps"}, "[B]", float_dtype, true, "reference model, chosen"},
        {"ref_rejected_logps", {"reference_rejected_logps"}, "[B]", float_dtype, true, "reference model, rejected"}},
       {{"losses", {}, "[B]", float_dtype, false, "dpo_loss's per-pair losses"},
        {"chosen_rewards", {}, "[B]", float_dtype, false, "beta (chosen_logps - ref_chosen_logps)"},
        {"rejected_rewards", {}, "[B]", float_dtype, false, "beta (rejected_logps - ref_rejected_logps)"},
        {"loss", {}, "[]", float_dtype, false, "losses.mean()"},
        {"chosen_logps.grad", {}, "[B]", float_dtype, false, "d loss / d chosen_logps"},
        {"rejected_logps.grad", {}, "[B]", float_dtype, false, "d loss / d rejected_logps"}},
       {{"loss_type", "sigmoid", names_of(dpo_types), "TRL DPOConfig.loss_type"},
        {"beta", "0.1", {}, "TRL DPOConfig.beta"},
        {"label_smoothing", "0", {}, "cDPO / robust / exo_pair epsilon"}},
       [](const options_t& o) {
         const std::string& t = o.at("loss_type");
         std::string f;
         if (t == "sigmoid")
           f = "-(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)";
         else if (t == "hinge")
           f = "relu(1 - beta h)";
         else if (t == "ipo")
           f = "(h - 1/(2 beta))^2   (TRL passes length-averaged logps for ipo: the dump's logps are used as they are)";
         else
           f = "TRL dpo_loss's '" + t + "' branch (see include/posttrain/losses/dpo.hpp)";
         return "h = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)\n"
                "losses = " +
                f +
                "\n"
                "chosen_rewards = beta (chosen_logps - ref_chosen_logps), rejected_rewards likewise\n"
                "loss = losses.mean(); gradients of loss w.r.t. chosen_logps and rejected_logps\n"
                "beta = " +
                o.at("beta") + ", label_smoothing = " + o.at("label_smoothing") + "\n";
       }});
  // -- grpo ------------------------------------------------------------------------------------
  specs.push_back(
      {"grpo",
       "TRL GRPOTrainer._compute_loss (trl/trainer/grpo_trainer.py), verl names",
       {{"log_probs", {"per_token_logps"}, "[B, T]", float_dtype, true, "current policy per-token log-probs"},
        {"advantages", {}, "[B] or [B, T]", float_dtype, true, "group-normalised advantages"},
        {"response_mask", {"completion_mask"}, "[B, T]", "float, integer or BOOL", true, "1 on completion tokens"},
        {"old_log_probs",
         {"old_per_token_logps"},
         "[B, T]",
         float_dtype,
         false,
         "the sampling policy's (absent: on-policy, ratio 1)"},
        {"ref_log_prob", {"ref_per_token_logps"}, "[B, T]", float_dtype, false, "reference model (when beta != 0)"}},
       {{"loss", {}, "[]", float_dtype, false, "the aggregated loss"},
        {"per_token_loss", {}, "[B, T]", float_dtype, false, "per-token loss times response_mask"},
        {"kl", {}, "[]", float_dtype, false, "masked mean of the per-token k3 KL (TRL metric 'kl')"},
        {"log_probs.grad", {"per_token_logps.grad"}, "[B, T]", float_dtype, false, "d loss / d log_probs"}},
       {{"loss_type", "dapo", names_of(grpo_types), "TRL GRPOConfig.loss_type"},
        {"epsilon", "0.2", {}, "lower clip: ratio >= 1 - epsilon"},
        {"epsilon_high", "", {}, "upper clip: ratio <= 1 + epsilon_high (default epsilon)"},
        {"beta", "0", {}, "KL coefficient (k3 per token, TRL)"},
        {"max_completion_length", "", {}, "dr_grpo's divisor B * max_completion_length (default: T)"},
        {"num_items_in_batch", "", {}, "dapo's global token count (default: the dump's)"}},
       [](const options_t& o) {
         const std::string& t = o.at("loss_type");
         std::string agg = t == "grpo"      ? "mean_b( sum_t m L / sum_t m )   (TRL grpo)"
                           : t == "bnpo"    ? "sum m L / sum m   (TRL bnpo)"
                           : t == "dr_grpo" ? "sum m L / (B * max_completion_length)   (TRL dr_grpo)"
                                            : "sum m L / num_items_in_batch   (TRL dapo; default the dump's count)";
         return "ratio_t = exp(log_probs - old_log_probs)  (old = log_probs detached when absent)\n"
                "L_t = -min(ratio A, clip(ratio, 1 - epsilon, 1 + epsilon_high) A) + beta k3_t,\n"
                "      k3_t = exp(ref - logp) - (ref - logp) - 1\n"
                "loss = " +
                agg + "\nepsilon = " + o.at("epsilon") +
                ", epsilon_high = " + (o.at("epsilon_high").empty() ? o.at("epsilon") : o.at("epsilon_high")) +
                ", beta = " + o.at("beta") +
                "\nnote: TRL grpo averages over every row, posttrain over rows with at least one token: dumps with "
                "an all-masked row differ\n";
       }});
  // -- kl --------------------------------------------------------------------------------------
  specs.push_back(
      {"kl",
       "verl core_algos.kl_penalty (verl/trainer/ppo/core_algos.py)",
       {{"log_probs", {"logprob"}, "[...]", float_dtype, true, "policy per-token log-probs"},
        {"ref_log_prob", {"ref_logprob"}, "[...]", float_dtype, true, "reference per-token log-probs"},
        {"response_mask", {}, "[...]", "float, integer or BOOL", false, "token-mean mask of `loss` (default: all)"}},
       {{"kl", {"kld"}, "[...]", float_dtype, false, "the per-token estimate"},
        {"loss", {}, "[]", float_dtype, false, "masked token mean of kl (verl agg_loss token-mean)"},
        {"log_probs.grad", {}, "[...]", float_dtype, false, "d loss / d log_probs"}},
       {{"kl_penalty", "low_var_kl", kl_names, "verl kl_penalty / kl_loss_type"}},
       [](const options_t& o) {
         return "r = log_probs - ref_log_prob; kl/k1: r; abs: |r|; mse/k2: r^2/2;\n"
                "low_var_kl/k3: exp(-r) + r - 1 with r clamped to [-20, 20] and the value to [-10, 10] (verl)\n"
                "a trailing '+': the value of the estimator, the gradient of k2 (verl straight-through)\n"
                "loss = sum m kl / sum m; kl_penalty = " +
                o.at("kl_penalty") + "\n";
       }});
  // -- ppo -------------------------------------------------------------------------------------
  specs.push_back(
      {"ppo",
       "verl core_algos.compute_policy_loss (vanilla) + agg_loss (verl/trainer/ppo/core_algos.py)",
       {{"log_probs", {"log_prob"}, "[B, T]", float_dtype, true, "current policy per-token log-probs"},
        {"old_log_probs", {"old_log_prob"}, "[B, T]", float_dtype, true, "the sampling policy's"},
        {"advantages", {}, "[B, T]", float_dtype, true, "per-token advantages"},
        {"response_mask", {}, "[B, T]", "float, integer or BOOL", true, "1 on response tokens"}},
       {{"loss", {"pg_loss"}, "[]", float_dtype, false, "agg_loss(pg_losses, response_mask, loss_agg_mode)"},
        {"per_token_loss", {"pg_losses"}, "[B, T]", float_dtype, false, "pg_losses times response_mask"},
        {"pg_clipfrac", {}, "[]", float_dtype, false, "masked_mean(pg_losses2 > pg_losses1)"},
        {"ppo_kl", {}, "[]", float_dtype, false, "masked_mean(old_log_prob - log_prob)"},
        {"pg_clipfrac_lower", {}, "[]", float_dtype, false, "masked_mean((clip_pg_losses1 > pg_losses3) & (A < 0))"},
        {"log_probs.grad", {"log_prob.grad"}, "[B, T]", float_dtype, false, "d loss / d log_probs"}},
       {{"clip_ratio", "0.2", {}, "epsilon of both sides unless clip_ratio_low/high are set"},
        {"clip_ratio_low", "", {}, "ratio >= 1 - clip_ratio_low (default clip_ratio)"},
        {"clip_ratio_high", "", {}, "ratio <= 1 + clip_ratio_high (default clip_ratio)"},
        {"clip_ratio_c", "3.0", {}, "dual-clip bound for negative advantages"},
        {"loss_agg_mode",
         "token-mean",
         {"token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"},
         "verl actor.loss_agg_mode"}},
       [](const options_t& o) {
         return "log ratio = clamp(log_probs - old_log_probs, -20, 20); ratio = exp(log ratio)\n"
                "pg_losses = A < 0 ? min(-A clip_ratio_c, max(-A ratio, -A clip(ratio, 1 - lo, 1 + hi)))\n"
                "                  : max(-A ratio, -A clip(ratio, 1 - lo, 1 + hi))\n"
                "loss = agg_loss(pg_losses, response_mask, " +
                o.at("loss_agg_mode") +
                ")\n"
                "preset verl (posttrain::ppo_options::verl()): every masked mean divides by sum(mask) + 1e-8 "
                "(verl_F.masked_mean), seq-mean-token-mean each row's by its count + 1e-8, seq-mean-token-sum-norm "
                "divides by T (loss_mask.shape[-1]), ppo_kl is of the clamped log ratio\n";
       },
       {"verl"}});
  // -- reward --------------------------------------------------------------------------------------
  specs.push_back(
      {"reward",
       "TRL RewardTrainer.compute_loss (trl/trainer/reward_trainer.py)",
       {{"rewards_chosen", {}, "[B]", float_dtype, true, "the reward model's score of each chosen completion"},
        {"rewards_rejected", {}, "[B]", float_dtype, true, "rejected"},
        {"margin", {}, "[B]", float_dtype, false, "the dataset's margin column"}},
       {{"loss", {}, "[]", float_dtype, false, "-logsigmoid(r_c - r_r - margin).mean() + c mean((r_c + r_r)^2)"},
        {"rewards_chosen.grad", {}, "[B]", float_dtype, false, "d loss / d rewards_chosen"},
        {"rewards_rejected.grad", {}, "[B]", float_dtype, false, "d loss / d rewards_rejected"}},
       {{"center_rewards_coefficient", "0", {}, "TRL RewardConfig.center_rewards_coefficient"}},
       [](const options_t& o) {
         return "loss = mean_b -log sigmoid(r_c - r_r - margin) + c mean_b (r_c + r_r)^2, c = " +
                o.at("center_rewards_coefficient") + "\n";
       }});
  // -- gae ---------------------------------------------------------------------------------------
  specs.push_back(
      {"gae",
       "TRL PPOTrainer.train (GAE block, trl/trainer/ppo_trainer.py) or verl compute_gae_advantage_return",
       {{"token_level_rewards", {"rewards"}, "[B, T]", float_dtype, true, "per-token rewards"},
        {"values", {}, "[B, T]", float_dtype, true, "the critic's values"},
        {"response_mask", {}, "[B, T]", "float, integer or BOOL", true, "1 on response tokens"}},
       {{"advantages",
         {},
         "[B, T]",
         float_dtype,
         false,
         "whitened GAE advantages (compared where the mask keeps)",
         true},
        {"returns",
         {},
         "[B, T]",
         float_dtype,
         false,
         "advantages before whitening + values (where the mask keeps)",
         true}},
       {{"gamma", "1.0", {}, "discount"}, {"lam", "0.95", {}, "GAE lambda (TRL lam 0.95; verl's default is 1.0)"}},
       [](const options_t& o) {
         return "delta_t = r_t + gamma V_{t+1} - V_t, A_t = delta_t + gamma lam A_{t+1}, returns = A + V; A whitened "
                "over the mask (unbiased variance, + 1e-8 under the root)\n"
                "preset trl: the plain recursion over every position; preset verl: masked tokens are skipped (V and A "
                "carried across them) and the whitening's masked means divide by sum(mask) + 1e-8\n"
                "gamma = " +
                o.at("gamma") + ", lam = " + o.at("lam") + "\n";
       },
       {"trl", "verl"}});
  // -- group advantages -------------------------------------------------------------------------
  specs.push_back(
      {"advantages",
       "TRL GRPOTrainer._generate_and_score_completions (trl/trainer/grpo_trainer.py) or verl "
       "core_algos.compute_grpo_outcome_advantage / compute_rloo_outcome_advantage",
       {{"rewards", {"scores"}, "[N]", float_dtype, true, "one outcome reward per completion"},
        {"index",
         {"uid", "group_index"},
         "[N]",
         int_dtype,
         false,
         "group id per completion (verl uid); without it, consecutive blocks of num_generations (TRL)"},
        {"response_mask",
         {},
         "[N, T]",
         "float, integer or BOOL",
         false,
         "verl: each completion's advantage is broadcast over its response tokens"}},
       {{"advantages", {}, "[N] or [N, T]", float_dtype, false, "the group-relative advantages"}},
       {{"estimator", "grpo", {"grpo", "rloo"}, "verl adv_estimator"},
        {"scale_rewards",
         "group",
         {"group", "batch", "none"},
         "TRL scale_rewards (none is verl norm_adv_by_std_in_grpo=False, Dr. GRPO)"},
        {"epsilon", "", {}, "added to the std; default by preset: trl 1e-4, verl 1e-6"},
        {"num_generations", "", {}, "the group size when the dump has no index (TRL)"}},
       [](const options_t& o) {
         return std::string(o.at("estimator") == "rloo"
                                ? "A_i = r_i - (sum_{j in g, j != i} r_j) / (n_g - 1)\n"
                                : "A_i = (r_i - mean_g) / (std + epsilon), std: unbiased, of the group (group), the "
                                  "batch (batch) or 1 (none)\n") +
                "preset trl: groups are consecutive blocks of num_generations (or index), epsilon 1e-4; preset verl: "
                "groups by index (uid), epsilon 1e-6, a singleton group keeps its raw score (mean 0, std 1), "
                "the advantage times response_mask when the dump has one\n";
       },
       {"trl", "verl"}});
  // -- distill -----------------------------------------------------------------------------------
  specs.push_back(
      {"distill",
       "TRL GKDTrainer.generalized_jsd_loss (trl/trainer/gkd_trainer.py)",
       {{"student_logits", {}, "[B, T, V]", float_dtype, true, "the student's logits, aligned with labels"},
        {"teacher_logits", {}, "[B, T, V]", float_dtype, true, "the teacher's"},
        {"labels", {}, "[B, T]", int_dtype, true, "-100 where ignored (already aligned: no shift)"}},
       {{"loss", {}, "[]", float_dtype, false, "jsd summed over kept tokens / their count (batchmean)"},
        {"student_logits.grad", {}, "[B, T, V]", float_dtype, false, "d loss / d student_logits"}},
       {{"beta", "0.5", {}, "teacher weight of the mixture; 0: KL(teacher||student), 1: KL(student||teacher)"},
        {"temperature", "1.0", {}, "divides both logits"}},
       [](const options_t& o) {
         return "s = log_softmax(student / tau), t = log_softmax(teacher / tau), m = log((1 - beta) e^s + beta e^t)\n"
                "jsd = beta KL(t || m) + (1 - beta) KL(s || m) per token (beta = 0: KL(t || s); beta = 1: KL(s || t), "
                "TRL's special cases)\n"
                "loss = sum over labels != -100 / their count; beta = " +
                o.at("beta") + ", tau = " + o.at("temperature") + "\n";
       }});
  return specs;
}

const loss_spec& find_spec(const std::vector<loss_spec>& specs, const std::string& name) {
  std::vector<std::string> names;
  for (const auto& s : specs) {
    if (s.name == name) return s;
    names.push_back(s.name);
  }
  throw usage_error("unknown loss '" + name + "'; valid: " + join(names));
}

// ---- the dump -------------------------------------------------------------------------------

#if POSTTRAIN_VERIFY_WITH_TORCH
/// Reads a torch.save file through the module posttrain_verify_torch (tools/torch_save.hpp), loaded now: from the
/// tool's own folder (the build tree) or POSTTRAIN_VERIFY_TORCH_MODULE_DIR relative to it (an install).
posttrain::io::safetensors_file read_torch_save(const std::vector<unsigned char>& bytes, const std::string& path) {
  using entry_t =
      void (*)(const unsigned char*, std::size_t, const std::string*, posttrain::io::safetensors_file*, std::string*);
  std::error_code ec;
  const std::filesystem::path exe_dir = std::filesystem::read_symlink("/proc/self/exe", ec).parent_path();
  std::string tried;
  void* module = nullptr;
  for (const auto& dir : {exe_dir, exe_dir / POSTTRAIN_VERIFY_TORCH_MODULE_DIR}) {
    const std::string file = (dir / POSTTRAIN_VERIFY_TORCH_MODULE).string();
    module = dlopen(file.c_str(), RTLD_NOW | RTLD_LOCAL);  // never closed: LibTorch does not unload cleanly
    if (module) break;
    const char* why = dlerror();
    tried += std::string(tried.empty() ? "" : "; ") + (why ? why : file);
  }
  if (!module)
    throw usage_error(path + ": a torch.save file, but the tool's LibTorch module cannot be loaded (" + tried + ")");
  void* symbol = dlsym(module, "posttrain_verify_read_torch_save");
  if (!symbol) throw usage_error(path + ": the tool's LibTorch module has no posttrain_verify_read_torch_save");
  entry_t entry;
  std::memcpy(&entry, &symbol, sizeof entry);
  posttrain::io::safetensors_file file;
  std::string error;
  entry(bytes.data(), bytes.size(), &path, &file, &error);
  if (!error.empty()) throw usage_error(error);
  return file;
}
#endif

/// Reads a dump, its format told by its first bytes: "PK" (a zip archive) is torch.save's default format, read
/// through LibTorch's unpickler when the tool is built with LibTorch (tools/torch_save.hpp); 0x80 0x02 (a bare
/// pickle) is torch.save's legacy format (_use_new_zipfile_serialization=False), refused; anything else is
/// parsed as safetensors. Returns the tensors and the format's name.
std::pair<posttrain::io::safetensors_file, std::string> read_dump(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw usage_error(path + ": cannot open the file");
  const std::vector<unsigned char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw usage_error(path + ": read error");
  if (bytes.size() >= 2 && bytes[0] == 'P' && bytes[1] == 'K') {
#if POSTTRAIN_VERIFY_WITH_TORCH
    return {read_torch_save(bytes, path), "torch.save"};
#else
    throw usage_error(path +
                      ": a zip archive (torch.save's format): reading .pt dumps needs posttrain-verify built with "
                      "LibTorch (this build has none); or dump with safetensors.torch.save_file");
#endif
  }
  if (bytes.size() >= 2 && bytes[0] == 0x80 && bytes[1] == 0x02)
    throw usage_error(path +
                      ": a legacy torch.save file (a bare pickle, _use_new_zipfile_serialization=False): save it "
                      "with torch.save's default zip format, or with safetensors");
  return {posttrain::io::parse_safetensors(bytes, path), "safetensors"};
}

struct dump_view {
  const posttrain::io::safetensors_file* file;
  std::map<std::string, std::string> map;  ///< ours -> theirs
  std::set<std::string> used;

  /// The dump's tensor for `spec`: --map first, then the name, then its aliases.
  const posttrain::io::safetensor* find(const tensor_spec& spec) {
    std::vector<std::string> candidates;
    if (auto m = map.find(spec.name); m != map.end())
      candidates.push_back(m->second);
    else {
      candidates.push_back(spec.name);
      for (const auto& a : spec.aliases) candidates.push_back(a);
    }
    for (const auto& c : candidates)
      if (const auto* t = file->find(c)) {
        used.insert(c);
        return t;
      }
    return nullptr;
  }
};

tensor as_double(const posttrain::io::safetensor& t) { return tensor(t.shape, t.to_double()); }

eigen_index as_index(const posttrain::io::safetensor& t) {
  if (posttrain::io::st_is_floating(t.dtype) || t.dtype == st_dtype::boolean)
    throw usage_error("tensor '" + t.name + "' must hold integers (I64/I32), got " +
                      posttrain::io::st_dtype_name(t.dtype));
  return eigen_index(t.shape, t.to_int64());
}

/// Precision rank: lower is less precise.
int precision_rank(st_dtype d) {
  switch (d) {
    case st_dtype::bf16: return 0;
    case st_dtype::f16: return 1;
    case st_dtype::f32: return 2;
    default: return 3;
  }
}

struct tolerance {
  double atol, rtol;
  std::string basis;
};

/// posttrain's per-dtype tolerances (tests/support/tolerances.hpp): float64 1e-10; float32 1e-5; half dtypes add
/// their unit roundoff (2^-8 bfloat16, 2^-11 float16) to float32's rtol.
tolerance tolerance_for(st_dtype d) {
  switch (d) {
    case st_dtype::bf16: return {1e-5, 1e-5 + 0x1p-8, "BF16"};
    case st_dtype::f16: return {1e-5, 1e-5 + 0x1p-11, "F16"};
    case st_dtype::f32: return {1e-5, 1e-5, "F32"};
    default: return {1e-10, 1e-10, "F64"};
  }
}

// ---- computing the reference ----------------------------------------------------------------

using reference_map = std::map<std::string, tensor>;

reference_map compute_sft(dump_view& d, const loss_spec& s, const options_t& o) {
  const tensor logits = as_double(*d.find(s.inputs[0]));
  eigen_index labels = as_index(*d.find(s.inputs[1]));
  posttrain::sft_options opt;
  opt.ignore_index = static_cast<std::int64_t>(number_option(o, "ignore_index"));
  opt.label_smoothing = number_option(o, "label_smoothing");
  opt.normalizer = optional_number(o, "num_items_in_batch");
  if (bool_option(o, "shift_labels")) {
    if (labels.shape().empty()) throw usage_error("labels must have rank >= 1 to be shifted");
    const std::int64_t t = labels.shape().back();
    eigen_index shifted(labels.shape());
    for (std::int64_t i = 0; i < labels.numel(); ++i)
      shifted.data()[i] = (i % t == t - 1) ? opt.ignore_index : labels.data()[i + 1];
    labels = shifted;
  }
  const auto r = posttrain::sft_loss(logits, labels, opt);
  return {{"loss", r.loss},
          {"per_token_loss", r.per_token_loss},
          {"logits.grad", posttrain::sft_loss_backward(logits, labels, opt)}};
}

reference_map compute_dpo(dump_view& d, const loss_spec& s, const options_t& o) {
  posttrain::preference_batch<tensor> b{as_double(*d.find(s.inputs[0])), as_double(*d.find(s.inputs[1]))};
  b.ref_chosen_logps = as_double(*d.find(s.inputs[2]));
  b.ref_rejected_logps = as_double(*d.find(s.inputs[3]));
  posttrain::dpo_options opt;
  opt.beta = number_option(o, "beta");
  opt.loss = lookup(dpo_types, o.at("loss_type"));
  opt.label_smoothing = number_option(o, "label_smoothing");
  opt.ipo_sum = true;  // TRL hands dpo_loss logps already averaged over the completion for ipo
  const auto r = posttrain::dpo(b, opt);
  const auto g = posttrain::dpo_backward(b, opt);
  namespace ops = posttrain::ops;
  return {{"losses", r.per_pair_loss},
          {"chosen_rewards", ops::mul(ops::sub(b.chosen_logps, *b.ref_chosen_logps), opt.beta)},
          {"rejected_rewards", ops::mul(ops::sub(b.rejected_logps, *b.ref_rejected_logps), opt.beta)},
          {"loss", r.loss},
          {"chosen_logps.grad", g.chosen_logps},
          {"rejected_logps.grad", g.rejected_logps}};
}

reference_map compute_grpo(dump_view& d, const loss_spec& s, const options_t& o) {
  posttrain::grpo_batch<tensor> b{as_double(*d.find(s.inputs[0])), as_double(*d.find(s.inputs[1])),
                                  as_double(*d.find(s.inputs[2]))};
  if (const auto* t = d.find(s.inputs[3])) b.old_logprobs = as_double(*t);
  if (const auto* t = d.find(s.inputs[4])) b.ref_logprobs = as_double(*t);
  posttrain::grpo_options opt;
  opt.loss_type = lookup(grpo_types, o.at("loss_type"));
  opt.clip.clip_low = number_option(o, "epsilon");
  opt.clip.clip_high = optional_number(o, "epsilon_high");
  opt.beta = number_option(o, "beta");
  if (auto m = optional_number(o, "max_completion_length")) opt.max_completion_length = static_cast<std::int64_t>(*m);
  if (opt.loss_type == posttrain::grpo_loss_type::dapo) opt.normalizer = optional_number(o, "num_items_in_batch");
  if (opt.beta != 0 && !b.ref_logprobs)
    throw usage_error("beta = " + o.at("beta") + " needs the reference log-probs: the dump has no tensor '" +
                      s.inputs[4].name + "' (or " + join(s.inputs[4].aliases) + ")");
  const auto r = posttrain::grpo_loss(b, opt);
  return {{"loss", r.loss},
          {"per_token_loss", r.per_token_loss},
          {"kl", r.kl},
          {"log_probs.grad", posttrain::grpo_loss_backward(b, opt)}};
}

reference_map compute_kl(dump_view& d, const loss_spec& s, const options_t& o) {
  namespace ops = posttrain::ops;
  const tensor lp = as_double(*d.find(s.inputs[0])), ref = as_double(*d.find(s.inputs[1]));
  const auto* mt = d.find(s.inputs[2]);
  const tensor m = mt ? as_double(*mt) : ops::full_like(lp, 1.0);
  if (m.shape() != lp.shape())
    throw usage_error("response_mask has shape " + posttrain::detail::shape_string(m.shape()) +
                      " but log_probs has shape " + posttrain::detail::shape_string(lp.shape()));
  const auto opt = kl_options_of(o.at("kl_penalty"));
  const tensor kl = posttrain::kl_penalty(lp, ref, opt);
  const tensor keep = ops::ne(m, 0.0);
  const double count = ops::to_host(ops::sum_all(keep))[0];
  const tensor loss = ops::div(ops::sum_all(ops::mul(kl, keep)), std::max(count, 1.0));
  const tensor grad = posttrain::kl_penalty_backward(lp, ref, ops::div(keep, std::max(count, 1.0)), opt);
  return {{"kl", kl}, {"loss", loss}, {"log_probs.grad", grad}};
}

reference_map compute_ppo(dump_view& d, const loss_spec& s, const options_t& o) {
  namespace ops = posttrain::ops;
  const tensor lp = as_double(*d.find(s.inputs[0])), old = as_double(*d.find(s.inputs[1]));
  const tensor A = as_double(*d.find(s.inputs[2])), m = as_double(*d.find(s.inputs[3]));
  posttrain::ppo_options opt = posttrain::ppo_options::verl();
  const double eps = number_option(o, "clip_ratio");
  opt.clip.clip_low = o.at("clip_ratio_low").empty() ? eps : number_option(o, "clip_ratio_low");
  opt.clip.clip_high = o.at("clip_ratio_high").empty() ? eps : number_option(o, "clip_ratio_high");
  opt.clip.clip_c = number_option(o, "clip_ratio_c");
  const std::string& mode = o.at("loss_agg_mode");
  const tensor keep = ops::ne(m, 0.0);
  const double count = ops::to_host(ops::sum_all(keep))[0];
  if (mode == "token-mean") {
    // verl agg_loss token-mean: verl_F.masked_mean, sum / (mask.sum() + 1e-8)
    opt.reduction = posttrain::aggregation::token_mean;
    opt.normalizer = count + 1e-8;
  } else if (mode == "seq-mean-token-sum") {
    opt.reduction = posttrain::aggregation::seq_mean_token_sum;
  } else if (mode == "seq-mean-token-mean") {
    opt.reduction = posttrain::aggregation::seq_mean_token_mean;
  } else {
    opt.reduction = posttrain::aggregation::seq_mean_token_sum_norm;
    if (lp.shape().size() == 2) opt.normalizer = static_cast<double>(lp.shape()[1]);  // verl: / loss_mask.shape[-1]
  }
  // ppo_options::verl() gives verl's metrics: pg_clipfrac / pg_clipfrac_lower / ppo_kl as verl_F.masked_mean
  // (sum / (mask.sum() + 1e-8)), ppo_kl of the log-ratio after its clamp to [-20, 20] (clamped_kl_metric).
  const auto r = posttrain::ppo_policy_loss(lp, old, A, m, opt);
  return {{"loss", r.loss},
          {"per_token_loss", r.per_token_loss},
          {"pg_clipfrac", r.pg_clipfrac},
          {"ppo_kl", r.approx_kl},
          {"pg_clipfrac_lower", r.pg_clipfrac_lower},
          {"log_probs.grad", posttrain::ppo_policy_loss_backward(lp, old, A, m, opt)}};
}

reference_map compute_reward(dump_view& d, const loss_spec& s, const options_t& o) {
  const tensor rc = as_double(*d.find(s.inputs[0])), rr = as_double(*d.find(s.inputs[1]));
  posttrain::reward_model_options<tensor> opt;
  if (const auto* t = d.find(s.inputs[2])) opt.margin = as_double(*t);
  opt.center_rewards_coefficient = number_option(o, "center_rewards_coefficient");
  const auto r = posttrain::reward_model_loss(rc, rr, opt);
  const auto g = posttrain::reward_model_loss_backward(rc, rr, opt);
  return {{"loss", r.loss}, {"rewards_chosen.grad", g.rewards_chosen}, {"rewards_rejected.grad", g.rewards_rejected}};
}

reference_map compute_gae(dump_view& d, const loss_spec& s, const options_t& o, const std::string& preset) {
  namespace ops = posttrain::ops;
  const tensor r = as_double(*d.find(s.inputs[0])), v = as_double(*d.find(s.inputs[1]));
  const tensor m = as_double(*d.find(s.inputs[2]));
  posttrain::gae_options opt;
  opt.gamma = number_option(o, "gamma");
  opt.lambda = number_option(o, "lam");
  opt.skip_masked = preset == "verl";
  opt.whiten = preset != "verl";  // TRL's masked_whiten is posttrain's; verl's is below
  auto g = posttrain::gae(r, v, m, opt);
  if (preset == "verl") {
    // verl_F.masked_whiten with verl_F.masked_mean = sum / (sum(mask) + 1e-8), Bessel-corrected variance
    const tensor keep = ops::ne(m, 0.0);
    const double n = ops::to_host(ops::sum_all(keep))[0];
    const tensor mean = ops::div(ops::sum_all(ops::mul(g.advantages, keep)), n + 1e-8);
    const tensor centered = ops::sub(g.advantages, mean);
    const tensor var = ops::mul(ops::div(ops::sum_all(ops::mul(ops::square(centered), keep)), n + 1e-8), n / (n - 1));
    g.advantages = ops::where(keep, ops::div(centered, ops::sqrt(ops::add(var, 1e-8))), 0.0);
  }
  return {{"advantages", g.advantages}, {"returns", g.returns}, {"__mask__", m}};
}

reference_map compute_advantages(dump_view& d, const loss_spec& s, const options_t& o, const std::string& preset) {
  namespace ops = posttrain::ops;
  const tensor r = as_double(*d.find(s.inputs[0]));
  if (r.shape().size() != 1)
    throw usage_error("rewards must be [N], got " + posttrain::detail::shape_string(r.shape()));
  const std::int64_t n = r.shape()[0];
  eigen_index groups;
  if (const auto* t = d.find(s.inputs[1])) {
    groups = as_index(*t);
  } else {
    const auto g = optional_number(o, "num_generations");
    if (!g) throw usage_error("--loss advantages: the dump has no index (uid) tensor; pass --set num_generations=G");
    const auto size = static_cast<std::int64_t>(*g);
    if (size < 1 || static_cast<double>(size) != *g || n % size != 0)
      throw usage_error("--set num_generations=" + o.at("num_generations") +
                        ": must be a positive integer dividing N = " + std::to_string(n));
    std::vector<std::int64_t> ids(static_cast<std::size_t>(n));
    for (std::int64_t i = 0; i < n; ++i) ids[static_cast<std::size_t>(i)] = i / size;  // TRL rewards.view(-1, G)
    groups = eigen_index({n}, ids);
  }
  const bool verl = preset == "verl";
  // verl gives a singleton group mean 0 and std 1 (its score unchanged); TRL has no singleton groups (G >= 2).
  const auto singleton = verl ? posttrain::singleton_policy::raw : posttrain::singleton_policy::zero;
  tensor adv;
  if (o.at("estimator") == "rloo") {
    adv = posttrain::rloo_advantages(r, groups, singleton);
  } else {
    posttrain::group_options g;
    const std::string& scale = o.at("scale_rewards");
    g.scale = scale == "batch"  ? posttrain::group_scale::batch
              : scale == "none" ? posttrain::group_scale::none
                                : posttrain::group_scale::group;
    g.eps = o.at("epsilon").empty() ? (verl ? 1e-6 : 1e-4) : number_option(o, "epsilon");
    g.singleton = singleton;
    adv = posttrain::grpo_advantages(r, groups, g).advantages;
  }
  if (const auto* m = d.find(s.inputs[2])) {
    const tensor mask = as_double(*m);
    if (mask.shape().size() != 2 || mask.shape()[0] != n)
      throw usage_error("response_mask must be [N, T] with N = " + std::to_string(n) + ", got " +
                        posttrain::detail::shape_string(mask.shape()));
    adv = ops::mul(ops::reshape(adv, {n, 1}), mask);  // verl: scores.unsqueeze(-1) * response_mask
  }
  return {{"advantages", adv}};
}

reference_map compute_distill(dump_view& d, const loss_spec& s, const options_t& o) {
  const tensor student = as_double(*d.find(s.inputs[0])), teacher = as_double(*d.find(s.inputs[1]));
  const eigen_index labels = as_index(*d.find(s.inputs[2]));
  posttrain::distill_options opt;
  opt.beta = number_option(o, "beta");
  opt.temperature = number_option(o, "temperature");
  // TRL: beta == 0 is F.kl_div(student, teacher) = KL(teacher || student); beta == 1 is KL(student || teacher)
  opt.divergence = opt.beta == 0   ? posttrain::kd_divergence::forward_kl
                   : opt.beta == 1 ? posttrain::kd_divergence::reverse_kl
                                   : posttrain::kd_divergence::jsd;
  const auto r = posttrain::distill_loss(student, teacher, labels, opt);
  return {{"loss", r.loss}, {"student_logits.grad", posttrain::distill_loss_backward(student, teacher, labels, opt)}};
}

reference_map compute(const loss_spec& s, dump_view& d, const options_t& o, const std::string& preset) {
  if (s.name == "distill") return compute_distill(d, s, o);
  if (s.name == "gae") return compute_gae(d, s, o, preset);
  if (s.name == "advantages") return compute_advantages(d, s, o, preset);
  if (s.name == "ppo") return compute_ppo(d, s, o);
  if (s.name == "reward") return compute_reward(d, s, o);
  if (s.name == "sft") return compute_sft(d, s, o);
  if (s.name == "dpo") return compute_dpo(d, s, o);
  if (s.name == "grpo") return compute_grpo(d, s, o);
  return compute_kl(d, s, o);
}

// ---- options ----------------------------------------------------------------------------------

options_t parse_options(const loss_spec& s, const std::vector<std::string>& sets) {
  options_t o;
  for (const auto& opt : s.options) o[opt.key] = opt.fallback;
  std::vector<std::string> keys;
  for (const auto& opt : s.options) keys.push_back(opt.key);
  for (const auto& set : sets) {
    std::stringstream items(set);
    std::string item;
    while (std::getline(items, item, ',')) {
      if (item.empty()) continue;
      const auto eq = item.find('=');
      if (eq == std::string::npos) throw usage_error("--set " + item + ": expected key=value");
      const std::string key = item.substr(0, eq), value = item.substr(eq + 1);
      const auto it = std::find_if(s.options.begin(), s.options.end(), [&](const auto& x) { return x.key == key; });
      if (it == s.options.end())
        throw usage_error("--set: unknown key '" + key + "' for --loss " + s.name + "; valid: " + join(keys));
      if (!it->values.empty() && std::find(it->values.begin(), it->values.end(), value) == it->values.end())
        throw usage_error("--set " + key + "=" + value + ": unknown value for --loss " + s.name +
                          "; valid: " + join(it->values));
      o[key] = value;
    }
  }
  // validate every number and boolean now, so that a bad value is a usage error before any work
  for (const auto& opt : s.options) {
    if (!opt.values.empty() || o[opt.key].empty()) continue;
    if (opt.boolean)
      bool_option(o, opt.key);
    else
      number_option(o, opt.key);
  }
  return o;
}

std::map<std::string, std::string> parse_maps(const std::vector<std::string>& maps) {
  std::map<std::string, std::string> out;
  for (const auto& m : maps) {
    std::stringstream items(m);
    std::string item;
    while (std::getline(items, item, ',')) {
      if (item.empty()) continue;
      const auto eq = item.find('=');
      if (eq == std::string::npos || eq == 0 || eq + 1 == item.size())
        throw usage_error("--map " + item + ": expected ours=theirs");
      out[item.substr(0, eq)] = item.substr(eq + 1);
    }
  }
  return out;
}

// ---- reporting ----------------------------------------------------------------------------------

std::string index_string(std::int64_t flat, const shape_t& shape) {
  if (flat < 0) return "-";
  if (shape.empty()) return "[]";
  std::vector<std::int64_t> idx(shape.size());
  for (std::size_t k = shape.size(); k-- > 0;) {
    idx[k] = shape[k] ? flat % shape[k] : 0;
    flat = shape[k] ? flat / shape[k] : 0;
  }
  return posttrain::detail::shape_string(idx);
}

struct row {
  std::string name, dump_name, dtype, shape, max_abs_index, worst_index;
  double max_abs = 0, max_rel = 0, got = 0, expected = 0;
  std::int64_t mismatches = 0;
  tolerance tol;
  bool pass = true;
};

std::string fmt(double v, int precision = 3) {
  std::ostringstream out;
  out << std::setprecision(precision) << v;
  return out.str();
}

void print_template(const loss_spec& s) {
  std::cout << "posttrain-verify --loss " << s.name << "  (" << s.framework << ")\n\ninputs:\n";
  auto list = [](const std::vector<tensor_spec>& v, bool inputs) {
    for (const auto& t : v) {
      std::cout << "  " << std::left << std::setw(22) << t.name << std::setw(15) << t.shape << std::setw(26) << t.dtype
                << (t.required || !inputs ? "" : "(optional) ") << t.doc;
      if (!t.aliases.empty()) std::cout << " [also: " << join(t.aliases) << "]";
      std::cout << '\n';
    }
  };
  list(s.inputs, true);
  std::cout << "\noutputs compared when present:\n";
  list(s.outputs, false);
  std::cout << "\noptions (--set key=value,...):\n";
  for (const auto& o : s.options) {
    std::cout << "  " << std::left << std::setw(22) << o.key << "default " << std::setw(12)
              << (o.fallback.empty() ? "unset" : o.fallback) << o.doc;
    if (!o.values.empty()) std::cout << "; one of " << join(o.values);
    std::cout << '\n';
  }
}

int run(int argc, char** argv) {
  CLI::App app{"posttrain-verify: check a trainer's dumped tensors against posttrain's double-precision reference"};
  std::string dump_path, loss_name, template_name, preset;
  std::vector<std::string> sets, maps;
  bool json = false, explain = false;
  std::optional<double> atol, rtol;
  app.add_option("dump", dump_path,
                 "the dump: a safetensors or torch.save (.pt, with LibTorch) file of one step's inputs and outputs");
  app.add_option("--loss", loss_name, "sft | dpo | grpo | kl | ppo | reward | gae | distill");
  app.add_option("--preset", preset, "the framework whose arithmetic to reproduce (ppo: verl; gae: trl, verl)");
  app.add_option("--set", sets, "options in the framework's words: key=value[,key=value...]");
  app.add_option("--map", maps, "our tensor name = the dump's name: ours=theirs[,...]");
  app.add_option("--template", template_name, "print the tensors and options LOSS expects, and exit");
  app.add_flag("--json", json, "print the report as JSON");
  app.add_flag("--explain", explain, "print the formula and conventions used");
  app.add_option("--atol", atol, "override the absolute tolerance");
  app.add_option("--rtol", rtol, "override the relative tolerance");
  try {
    app.parse(argc, argv);
  } catch (const CLI::Success& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    throw usage_error(e.what());
  }
  const auto specs = make_specs();
  if (!template_name.empty()) {
    print_template(find_spec(specs, template_name));
    return 0;
  }
  if (loss_name.empty())
    throw usage_error(
        "--loss is required (sft, dpo, grpo, kl, ppo, reward, gae, distill); --template LOSS lists a loss");
  const loss_spec& spec = find_spec(specs, loss_name);
  const options_t options = parse_options(spec, sets);
  if (preset.empty()) preset = spec.presets.front();
  if (std::find(spec.presets.begin(), spec.presets.end(), preset) == spec.presets.end())
    throw usage_error("--preset " + preset + ": unknown for --loss " + spec.name + "; valid: " + join(spec.presets));
  if (dump_path.empty()) throw usage_error("no dump file given");
  const auto [file, format] = read_dump(dump_path);

  dump_view view{&file, parse_maps(maps), {}};
  std::vector<std::string> missing_inputs;
  st_dtype least = st_dtype::f64;  // the least precise floating input
  for (const auto& in : spec.inputs) {
    const auto* t = view.find(in);
    if (!t && in.required) {
      std::string names = in.name;
      if (view.map.count(in.name)) names = view.map.at(in.name) + " (mapped from " + in.name + ")";
      for (const auto& a : in.aliases) names += " or " + a;
      missing_inputs.push_back(names);
    }
    if (t && posttrain::io::st_is_floating(t->dtype) && precision_rank(t->dtype) < precision_rank(least))
      least = t->dtype;
  }
  if (!missing_inputs.empty()) {
    std::vector<std::string> req;
    for (const auto& in : spec.inputs)
      if (in.required) req.push_back(in.name);
    throw usage_error(dump_path + ": missing input tensor(s) " + join(missing_inputs) + " (--loss " + spec.name +
                      " expects " + join(req) + "; --map ours=theirs renames)");
  }
  if (explain && !json) std::cout << "formula (" << spec.framework << "):\n" << spec.explain(options) << '\n';

  reference_map reference = compute(spec, view, options, preset);

  std::vector<row> rows;
  std::vector<std::string> absent;
  for (const auto& out : spec.outputs) {
    const auto* t = view.find(out);
    if (!t) {
      absent.push_back(out.name);
      continue;
    }
    const tensor& want = reference.at(out.name);
    if (!posttrain::io::st_is_floating(t->dtype))
      throw usage_error(dump_path + ": output '" + t->name + "' must be floating point, got " +
                        posttrain::io::st_dtype_name(t->dtype));
    if (t->shape != want.shape())
      throw usage_error(dump_path + ": output '" + t->name + "' has shape " +
                        posttrain::detail::shape_string(t->shape) + " but the inputs give " +
                        posttrain::detail::shape_string(want.shape()));
    row r;
    r.name = out.name;
    r.dump_name = t->name;
    r.dtype = posttrain::io::st_dtype_name(t->dtype);
    r.shape = posttrain::detail::shape_string(t->shape);
    r.tol = tolerance_for(precision_rank(t->dtype) < precision_rank(least) ? t->dtype : least);
    if (atol) r.tol.atol = *atol, r.tol.basis = "--atol";
    if (rtol) r.tol.rtol = *rtol, r.tol.basis = "--rtol";
    std::vector<double> got = t->to_double();
    if (out.on_mask) {  // padding holds whatever the framework left there: compare the kept positions
      const std::vector<double> keep = posttrain::ops::to_host(reference.at("__mask__"));
      for (std::size_t i = 0; i < got.size() && i < keep.size(); ++i)
        if (keep[i] == 0) got[i] = 0.0;
    }
    const std::vector<double> ref = posttrain::ops::to_host(want);
    const auto c = posttrain::check::compare_values(got, ref, r.tol.atol, r.tol.rtol);
    std::int64_t arg = got.empty() ? -1 : 0;
    for (std::size_t i = 0; i < got.size(); ++i) {
      const double e = std::isnan(got[i]) && std::isnan(ref[i]) ? 0.0 : std::abs(got[i] - ref[i]);
      const double e_or_inf = std::isnan(e) ? INFINITY : e;
      if (e_or_inf > r.max_abs) r.max_abs = e_or_inf, arg = static_cast<std::int64_t>(i);
      if (ref[i] != 0 && std::isfinite(e)) r.max_rel = std::max(r.max_rel, e / std::abs(ref[i]));
      if (!std::isfinite(e_or_inf) || (ref[i] == 0 && e > 0 && !std::isfinite(r.max_rel))) r.max_rel = INFINITY;
    }
    r.max_abs_index = index_string(arg, t->shape);
    r.pass = c.ok;
    r.mismatches = c.mismatches;
    r.worst_index = index_string(c.worst_index, t->shape);
    if (!c.ok) r.got = c.got_at_worst, r.expected = c.reference_at_worst;
    rows.push_back(r);
  }
  std::vector<std::string> ignored;
  for (const auto& t : file.tensors)
    if (!view.used.count(t.name)) ignored.push_back(t.name);
  if (rows.empty()) {
    std::vector<std::string> outs;
    for (const auto& out : spec.outputs) outs.push_back(out.name);
    throw usage_error(dump_path + ": the dump holds none of the outputs of --loss " + spec.name +
                      " to compare (expected one of " + join(outs) + ")");
  }
  const bool all_pass = std::all_of(rows.begin(), rows.end(), [](const row& r) { return r.pass; });
  std::string opts_text;
  for (const auto& o : spec.options)
    opts_text +=
        (opts_text.empty() ? "" : ",") + o.key + "=" + (options.at(o.key).empty() ? "unset" : options.at(o.key));

  if (json) {
    nlohmann::json j;
    j["dump"] = dump_path;
    j["format"] = format;
    j["loss"] = spec.name;
    j["framework"] = spec.framework;
    j["options"] = options;
    j["preset"] = preset;
    j["pass"] = all_pass;
    j["tensors"] = nlohmann::json::array();
    for (const auto& r : rows)
      j["tensors"].push_back({{"name", r.name},
                              {"dump_name", r.dump_name},
                              {"shape", r.shape},
                              {"dtype", r.dtype},
                              {"max_abs_err", r.max_abs},
                              {"max_abs_err_index", r.max_abs_index},
                              {"max_rel_err", r.max_rel},
                              {"atol", r.tol.atol},
                              {"rtol", r.tol.rtol},
                              {"tolerance_basis", r.tol.basis},
                              {"mismatches", r.mismatches},
                              {"worst_index", r.worst_index},
                              {"pass", r.pass}});
    j["not_in_dump"] = absent;
    j["ignored"] = ignored;
    if (explain) j["explain"] = spec.explain(options);
    std::cout << j.dump(2) << '\n';
  } else {
    std::cout << "posttrain-verify " << dump_path << " (" << format << ")\nloss " << spec.name << " (" << spec.framework
              << "): " << opts_text << (preset == "none" ? std::string() : ", preset " + preset)
              << "\nreference: posttrain Eigen backend in float64; PASS when |got - ref| <= atol + "
              << "rtol |ref| (tolerance of the least precise of the tensor and the inputs)\n\n";
    std::cout << std::left << std::setw(22) << "tensor" << std::setw(12) << "shape" << std::setw(6) << "dtype"
              << std::setw(12) << "max|err|" << std::setw(12) << "at" << std::setw(12) << "max rel" << std::setw(20)
              << "tol (atol, rtol)"
              << "result\n";
    for (const auto& r : rows) {
      std::cout << std::left << std::setw(22) << r.name << std::setw(12) << r.shape << std::setw(6) << r.dtype
                << std::setw(12) << fmt(r.max_abs) << std::setw(12) << r.max_abs_index << std::setw(12)
                << fmt(r.max_rel) << std::setw(20) << (fmt(r.tol.atol, 2) + ", " + fmt(r.tol.rtol, 2))
                << (r.pass ? "PASS" : "FAIL");
      if (!r.pass)
        std::cout << "  " << r.mismatches << " element(s) out of tolerance; worst at " << r.worst_index << ": got "
                  << fmt(r.got, 10) << ", reference " << fmt(r.expected, 10);
      std::cout << '\n';
    }
    if (!absent.empty()) std::cout << "\nnot in the dump (not compared): " << join(absent) << '\n';
    if (!ignored.empty()) std::cout << "in the dump but not used: " << join(ignored) << '\n';
    const auto failed = std::count_if(rows.begin(), rows.end(), [](const row& r) { return !r.pass; });
    std::cout << "\nresult: " << (all_pass ? "PASS" : "FAIL") << " (" << rows.size() << " compared, " << failed
              << " failed)\n";
  }
  return all_pass ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const usage_error& e) {
    std::cerr << "posttrain-verify: error: " << e.what() << '\n';
  } catch (const posttrain::error& e) {
    std::cerr << "posttrain-verify: error: " << e.what() << '\n';
  } catch (const std::exception& e) {
    std::cerr << "posttrain-verify: error: " << e.what() << '\n';
  }
  return 2;
}
