// posttrain/posttrain.hpp — every algorithm, no backend. Include a backend header beside it:
// <posttrain/backends/eigen.hpp> (CPU reference) and/or <posttrain/backends/torch.hpp>.
#pragma once

#include "posttrain/check/compare.hpp"
#include "posttrain/error.hpp"
#include "posttrain/kl/estimators.hpp"
#include "posttrain/kl/exact.hpp"
#include "posttrain/losses/cpo.hpp"
#include "posttrain/losses/dpo.hpp"
#include "posttrain/losses/kto.hpp"
#include "posttrain/losses/orpo.hpp"
#include "posttrain/losses/reward_model.hpp"
#include "posttrain/losses/sequence_logps.hpp"
#include "posttrain/losses/sft.hpp"
#include "posttrain/numerics/aggregate.hpp"
#include "posttrain/numerics/logits.hpp"
#include "posttrain/numerics/masked.hpp"
#include "posttrain/numerics/stable.hpp"
#include "posttrain/tensor.hpp"
// RL core (issue 4): PPO, value loss, GAE, group estimators, KL-shaped rewards, KL controllers, GRPO.
#include "posttrain/advantages/gae.hpp"
#include "posttrain/advantages/group.hpp"
#include "posttrain/advantages/kl_reward.hpp"
#include "posttrain/kl/controller.hpp"
#include "posttrain/losses/distill.hpp"  // distillation (issue 6): KD divergences, temperature, hard-label mixing
#include "posttrain/losses/clip.hpp"  // the clip range shared by PPO, the policy variants and GRPO
#include "posttrain/losses/grpo.hpp"
#include "posttrain/losses/off_policy.hpp"       // rollout importance sampling, OPSM
#include "posttrain/losses/policy_variants.hpp"  // RL variants (issue 7): GSPO ... VESPO, Clip-Cov, KL-Cov
#include "posttrain/losses/ppo.hpp"
#include "posttrain/losses/token_selection.hpp"  // top-entropy mask, Clip-Cov / KL-Cov covariance selection
#include "posttrain/losses/value.hpp"
