// posttrain/losses/reward_model.hpp — Bradley-Terry reward-model loss on preference pairs.
//
//   loss = mean_b -log σ(r_c - r_r - m_b)                      (Bradley-Terry; InstructGPT eq. 1;
//                                                               TRL RewardTrainer, OpenRLHF PairWiseLoss)
//        + c · mean_b (r_c + r_r)²                             (TRL center_rewards_coefficient,
//                                                               Eisenstein et al. 2023)
// rewards_chosen, rewards_rejected, margin: [B]. The margin is optional (TRL's "margin" column);
// OpenRLHF's LogExpLoss ignores it, which here is simply margin = nullopt.
// Gradient: ∂/∂r_c = -σ(-(r_c - r_r - m))/B + 2c(r_c + r_r)/B, ∂/∂r_r = -∂/∂r_c of the first term
// + the same centring term: the loss pushes the two rewards apart by the sigmoid's residual.
// Example: r_c = 1, r_r = 0 -> loss = log(1 + e^{-1}) = 0.313262.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

#include "posttrain/detail/validate.hpp"
#include "posttrain/numerics/logits.hpp"
#include "posttrain/numerics/stable.hpp"
#include "posttrain/tensor.hpp"

namespace posttrain {

template <tensor T>
struct reward_model_options {
  /// Per-pair margin m_b [B] (TRL's dataset "margin" column); none by default.
  std::optional<T> margin = std::nullopt;
  /// TRL's center_rewards_coefficient (recommended 0.01); 0 disables the term.
  double center_rewards_coefficient = 0.0;
};

template <tensor T>
struct reward_model_result {
  T loss;         ///< 0-d
  T accuracy;     ///< 0-d: fraction of pairs with r_c > r_r (TRL "accuracy")
  T margin;       ///< 0-d: mean r_c - r_r (TRL "margin")
  T mean_chosen;  ///< 0-d: mean r_c
  T mean_rejected;
  T min_reward;  ///< 0-d over both columns (TRL min_reward / max_reward)
  T max_reward;
};

template <tensor T>
struct reward_model_gradients {
  T rewards_chosen;    ///< [B]
  T rewards_rejected;  ///< [B]
};

namespace detail {
template <tensor T>
T reward_model_logits(std::string_view fn, const T& rc, const T& rr, const reward_model_options<T>& o) {
  require_values(fn, "rewards_chosen", rc);
  require_rank(fn, "rewards_chosen", rc, 1, 1);
  require_like(fn, "rewards_chosen", rc, "rewards_rejected", rr);
  require_finite(fn, "options.center_rewards_coefficient", o.center_rewards_coefficient);
  if (o.center_rewards_coefficient < 0)
    fail(fn, "options.center_rewards_coefficient must be >= 0, got ", o.center_rewards_coefficient);
  T z = ops::sub(ops::upcast(rc), ops::upcast(rr));
  if (o.margin) {
    require_like(fn, "rewards_chosen", rc, "options.margin", *o.margin);
    z = ops::sub(z, ops::upcast(*o.margin));
  }
  return z;
}
}  // namespace detail

/// Bradley-Terry loss and TRL's logged metrics. See the file comment.
template <tensor T>
reward_model_result<T> reward_model_loss(const T& rewards_chosen, const T& rewards_rejected,
                                         const reward_model_options<T>& opt = {}) {
  const T z = detail::reward_model_logits("reward_model_loss", rewards_chosen, rewards_rejected, opt);
  const T rc = ops::upcast(rewards_chosen), rr = ops::upcast(rewards_rejected);
  const double n = static_cast<double>(ops::numel(z));
  // -log σ(r_c - r_r - m), averaged over pairs
  T loss = ops::div(ops::sum_all(ops::neg(log_sigmoid(z))), n);
  if (opt.center_rewards_coefficient > 0.0)
    loss = ops::add(loss,
                    ops::mul(ops::div(ops::sum_all(ops::square(ops::add(rc, rr))), n), opt.center_rewards_coefficient));
  reward_model_result<T> r;
  r.loss = loss;
  const T c = ops::detach(rc), j = ops::detach(rr);
  r.accuracy = ops::div(ops::sum_all(ops::gt(c, j)), n);
  r.margin = ops::div(ops::sum_all(ops::sub(c, j)), n);
  r.mean_chosen = ops::div(ops::sum_all(c), n);
  r.mean_rejected = ops::div(ops::sum_all(j), n);
  r.min_reward = ops::minimum(ops::min(c, 0), ops::min(j, 0));
  r.max_reward = ops::maximum(ops::max(c, 0), ops::max(j, 0));
  return r;
}

/// Gradient of reward_model_loss with respect to both reward columns, times grad_loss.
template <tensor T>
reward_model_gradients<T> reward_model_loss_backward(const T& rewards_chosen, const T& rewards_rejected,
                                                     const reward_model_options<T>& opt = {}, double grad_loss = 1.0) {
  const T z = detail::reward_model_logits("reward_model_loss_backward", rewards_chosen, rewards_rejected, opt);
  detail::require_finite("reward_model_loss_backward", "grad_loss", grad_loss);
  const double n = static_cast<double>(ops::numel(z));
  // d/dz -log σ(z) = -σ(-z)
  const T dz = ops::mul(sigmoid(ops::neg(z)), -grad_loss / n);
  T gc = dz, gr = ops::neg(dz);
  if (opt.center_rewards_coefficient > 0.0) {
    const T center = ops::mul(ops::add(ops::upcast(rewards_chosen), ops::upcast(rewards_rejected)),
                              2.0 * opt.center_rewards_coefficient * grad_loss / n);
    gc = ops::add(gc, center);
    gr = ops::add(gr, center);
  }
  return {gc, gr};
}

/// Listwise generalisation: Plackett-Luce over K responses ranked best first (Plackett 1975;
/// the ranking loss of InstructGPT's K-way comparisons, and of LiPO's list MLE):
///   loss = mean_b Σ_{k=0}^{K-2} [ log Σ_{j>=k} e^{r_{b,j}} - r_{b,k} ]
/// At K = 2 this is Bradley-Terry: log(e^{r_0} + e^{r_1}) - r_0 = -log σ(r_0 - r_1).
/// rewards: [B, K], column 0 the best response. Each suffix log-sum-exp is max-shifted.
template <tensor T>
T plackett_luce_loss(const T& rewards) {
  constexpr std::string_view fn = "plackett_luce_loss";
  detail::require_values(fn, "rewards", rewards);
  detail::require_rank(fn, "rewards", rewards, 2, 2);
  const T r = ops::upcast(rewards);
  const std::int64_t k_count = ops::size(r, 1);
  T total = ops::full(r, shape_t{ops::size(r, 0)}, 0.0);  // [B]
  for (std::int64_t k = 0; k + 1 < k_count; ++k) {
    const T tail = ops::slice(r, 1, k, k_count - k);  // [B, K - k]
    // log Σ_{j>=k} e^{r_j} - r_k
    total = ops::add(total, ops::sub(logsumexp(tail), ops::reshape(ops::slice(r, 1, k, 1), ops::shape(total))));
  }
  return ops::div(ops::sum_all(total), static_cast<double>(ops::size(r, 0)));
}

/// Gradient of plackett_luce_loss: ∂/∂r_{b,j} = (Σ_{k<=min(j, K-2)} softmax_k(r_{b, k:})_j - [j <= K-2]) / B.
template <tensor T>
T plackett_luce_loss_backward(const T& rewards, double grad_loss = 1.0) {
  constexpr std::string_view fn = "plackett_luce_loss_backward";
  detail::require_values(fn, "rewards", rewards);
  detail::require_rank(fn, "rewards", rewards, 2, 2);
  detail::require_finite(fn, "grad_loss", grad_loss);
  const T r = ops::upcast(rewards);
  const std::int64_t b = ops::size(r, 0), k_count = ops::size(r, 1);
  T grad = ops::full_like(r, 0.0);
  for (std::int64_t k = 0; k + 1 < k_count; ++k) {
    // softmax over the suffix k.., minus the indicator of column k, placed back at columns k..
    const T tail = ops::slice(r, 1, k, k_count - k);
    T d = softmax_last(tail);
    d = ops::sub(d, ops::one_hot(ops::argmax_last(ops::full(r, shape_t{b, 1}, 0.0)), k_count - k, r));
    if (k > 0) d = ops::concat(std::vector<T>{ops::full(r, shape_t{b, k}, 0.0), d}, 1);
    grad = ops::add(grad, d);
  }
  return ops::to_dtype(ops::mul(grad, grad_loss / static_cast<double>(b)), ops::dtype_of(rewards));
}

}  // namespace posttrain
