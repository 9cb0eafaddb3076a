// posttrain/posttrain.hpp — every algorithm, no backend. Include a backend header beside it:
// <posttrain/backends/eigen.hpp> (CPU reference) and/or <posttrain/backends/torch.hpp>.
#pragma once

// The bottom: errors, the tensor concept, the optional fused hooks.
#include "posttrain/error.hpp"
#include "posttrain/fused.hpp"
#include "posttrain/label_checks.hpp"  // when label values are read (a host transfer on a GPU)
#include "posttrain/tensor.hpp"
// Stable primitives.
#include "posttrain/numerics/aggregate.hpp"
#include "posttrain/numerics/divergences.hpp"  // per-token KD divergences
#include "posttrain/numerics/logits.hpp"
#include "posttrain/numerics/masked.hpp"
#include "posttrain/numerics/stable.hpp"
// SFT, reward models, preference optimisation, distillation.
#include "posttrain/losses/cpo.hpp"
#include "posttrain/losses/distill.hpp"
#include "posttrain/losses/dpo.hpp"
#include "posttrain/losses/fused_linear_ce.hpp"        // options/results; the entry points come with a backend
#include "posttrain/losses/fused_linear_logprobs.hpp"  // likewise
#include "posttrain/losses/kto.hpp"
#include "posttrain/losses/orpo.hpp"
#include "posttrain/losses/prm.hpp"  // process reward model (OpenRLHF PRMLoss)
#include "posttrain/losses/reward_model.hpp"
#include "posttrain/losses/sequence_logps.hpp"
#include "posttrain/losses/sft.hpp"
// RL: PPO, value loss, GRPO and the policy variants; advantages; KL estimators and controllers.
#include "posttrain/advantages/gae.hpp"
#include "posttrain/advantages/group.hpp"
#include "posttrain/advantages/kl_reward.hpp"
#include "posttrain/kl/controller.hpp"
#include "posttrain/kl/estimators.hpp"
#include "posttrain/kl/exact.hpp"
#include "posttrain/losses/clip.hpp"  // the clip range shared by PPO, the policy variants and GRPO
#include "posttrain/losses/grpo.hpp"
#include "posttrain/losses/off_policy.hpp"       // rollout importance sampling, OPSM
#include "posttrain/losses/policy_variants.hpp"  // GSPO ... VESPO, Clip-Cov, KL-Cov
#include "posttrain/losses/ppo.hpp"
#include "posttrain/losses/token_selection.hpp"  // top-entropy mask, Clip-Cov / KL-Cov covariance selection
#include "posttrain/losses/value.hpp"
// Batch helpers: next-token labels, completion masks, preference pairs, multi-turn masks.
#include "posttrain/data/multi_turn.hpp"
#include "posttrain/data/next_token.hpp"
#include "posttrain/data/pairs.hpp"
// Every result's logged scalars as a TRL / verl keyed map, one host transfer.
#include "posttrain/metrics.hpp"
// Comparing results across backends.
#include "posttrain/check/compare.hpp"
