// posttrain/advantages/kl_reward.hpp — KL-shaped token rewards: the KL leash placed in the reward.
//
// InstructGPT (Ouyang et al. 2022, eq. 2) / Ziegler et al. 2019: the per-token reward is
//   r_t = -β · kl_t + [t = t_score] · score,     kl_t an estimator of log π/π_ref at token t (kl/estimators.hpp)
// with the score at the last response token (verl apply_kl_penalty, torchtune get_rewards_ppo; the
// default) or at the first padding position after it when there is one (TRL PPOTrainer: `sequence_lengths_p1`,
// falling back to the last token when the response fills the row).
// TRL RLOO puts a sequence-level k1 in the scalar reward instead: r = score - β Σ_t (logπ - logπ_ref)
// (kl_penalized_scores).
// Example (torchtune test_rewards): scores [1, 2, 3], logπ - logπ_ref = -0.1/-0.2/-0.3 per row, β = 0.5, k1
// -> rewards [[.05, .05, 1.05], [.1, .1, 2.1], [.15, .15, 3.15]].
#pragma once

#include <optional>
#include <string_view>

#include "posttrain/detail/validate.hpp"
#include "posttrain/kl/estimators.hpp"
#include "posttrain/numerics/masked.hpp"
#include "posttrain/tensor.hpp"

namespace posttrain {

enum class score_position {
  last_token,  ///< the last kept token (verl, torchtune, InstructGPT)
  first_pad,   ///< the position after it, or the last token when the row is full (TRL PPOTrainer)
};

/// A closed range [low, high] the scores are clamped to before KL shaping.
struct score_range {
  double low;
  double high;
};

struct kl_reward_options {
  /// β: verl kl_ctrl.kl_coef 0.001; TRL PPO kl_coef 0.05 (the default here).
  double beta = 0.05;
  /// TRL PPO kl_estimator "k1" (the default here); verl kl_penalty "kl" (k1) too.
  kl_options kl = {.estimator = kl_estimator::k1};
  score_position position = score_position::last_token;
  /// Clamp the scores to [low, high] before shaping (OpenRLHF openrlhf/models/utils.py compute_reward:
  /// `r = r.clamp(min=reward_clip_range[0], max=reward_clip_range[1])`). None (default): TRL, verl, torchtune
  /// use the scores as they are. low <= high, both finite.
  std::optional<score_range> score_clip = std::nullopt;
};

template <tensor T>
struct kl_reward_result {
  T rewards;           ///< [B, T] token_level_rewards
  T kl;                ///< [B, T] per-token KL estimate (0 where masked)
  T non_score_reward;  ///< 0-d: TRL objective/non_score_reward, mean over rows of Σ_t -β kl_t
  T mean_kl;           ///< 0-d: mean over rows of Σ_t kl_t (TRL objective/kl; verl actor/reward_kl_penalty
                       ///< is the token mean instead: masked_mean(kl))
};

/// scores [B], logprobs / ref_logprobs / response_mask [B, T] -> token-level rewards. Rows with no kept
/// token receive their score only under first_pad (at position 0, as TRL).
template <tensor T>
kl_reward_result<T> kl_shaped_rewards(const T& scores, const T& logprobs, const T& ref_logprobs, const T& response_mask,
                                      const kl_reward_options& opt = {}) {
  constexpr std::string_view fn = "kl_shaped_rewards";
  detail::require_finite(fn, "options.beta", opt.beta);
  if (opt.score_clip) {
    detail::require_finite(fn, "options.score_clip.low", opt.score_clip->low);
    detail::require_finite(fn, "options.score_clip.high", opt.score_clip->high);
    if (opt.score_clip->low > opt.score_clip->high)
      detail::fail(fn, "options.score_clip must have low <= high, got [", opt.score_clip->low, ", ",
                   opt.score_clip->high, "]");
  }
  detail::require_values(fn, "logprobs", logprobs);
  detail::require_rank(fn, "logprobs", logprobs, 2, 2);
  detail::require_values(fn, "scores", scores);
  if (ops::shape(scores) != shape_t{ops::size(logprobs, 0)})
    detail::fail(fn, "scores has shape ", detail::shape_string(ops::shape(scores)), " but logprobs has shape ",
                 detail::shape_string(ops::shape(logprobs)), "; expected [", ops::size(logprobs, 0), "]");
  const T m0 = detail::checked_mask(fn, "logprobs", logprobs, "response_mask", response_mask);
  const T kl_raw = kl_penalty(logprobs, ref_logprobs, opt.kl);
  const T m = ops::ne(ops::to_dtype(m0, ops::dtype_of(kl_raw)), 0.0);
  const T kl = ops::where(m, kl_raw, 0.0);
  const std::int64_t len = ops::size(kl, 1);
  // positions 0..T-1 per column, and the last kept position per row (-1 if none)
  const T pos = ops::sub(ops::cumsum(ops::full_like(kl, 1.0), 1), 1.0);
  const T last = ops::max(ops::where(m, pos, -1.0), 1, true);  // [B, 1]
  const T target =
      opt.position == score_position::last_token ? last : ops::minimum(ops::add(last, 1.0), double(len - 1));
  const T at_score = ops::eq(pos, target);
  // OpenRLHF compute_reward: scores clamped to reward_clip_range before the KL term is added
  const T sc =
      opt.score_clip ? ops::clamp(ops::upcast(scores), opt.score_clip->low, opt.score_clip->high) : ops::upcast(scores);
  // r_t = -β kl_t + [t = t_score] score   (InstructGPT eq. 2)
  const T non_score = ops::mul(kl, -opt.beta);
  const T rewards = ops::add(non_score, ops::mul(at_score, ops::unsqueeze(sc, 1)));
  return {rewards, kl, ops::div(ops::sum_all(non_score), double(ops::size(kl, 0))),
          ops::div(ops::sum_all(kl), double(ops::size(kl, 0)))};
}

/// TRL RLOOTrainer: the KL in the scalar reward, score - β Σ_t kl_t (k1 by default). scores [B] -> [B].
template <tensor T>
T kl_penalized_scores(const T& scores, const T& logprobs, const T& ref_logprobs, const T& response_mask, double beta,
                      const kl_options& kl = {.estimator = kl_estimator::k1}) {
  constexpr std::string_view fn = "kl_penalized_scores";
  detail::require_finite(fn, "beta", beta);
  detail::require_values(fn, "logprobs", logprobs);
  detail::require_rank(fn, "logprobs", logprobs, 2, 2);
  detail::require_values(fn, "scores", scores);
  if (ops::shape(scores) != shape_t{ops::size(logprobs, 0)})
    detail::fail(fn, "scores has shape ", detail::shape_string(ops::shape(scores)), " but logprobs has shape ",
                 detail::shape_string(ops::shape(logprobs)), "; expected [", ops::size(logprobs, 0), "]");
  const T m0 = detail::checked_mask(fn, "logprobs", logprobs, "response_mask", response_mask);
  const T k = kl_penalty(logprobs, ref_logprobs, kl);
  // r = score - β Σ_t (logπ - logπ_ref)   (TRL RLOO)
  return ops::sub(ops::upcast(scores), ops::mul(masked_sum(k, ops::to_dtype(m0, ops::dtype_of(k)), 1), beta));
}

}  // namespace posttrain
