// posttrain/advantages/group.hpp — outcome-reward advantage estimators over groups of samples
// (GRPO and kin). Each row b has a scalar score (a verifiable reward, or token rewards summed) and a
// group id group_index[b] (the prompt it answers); rows of a group need not be contiguous.
//
// Group statistics are computed with a one-hot [B, G] matrix (G = the number of distinct ids; ids are
// renumbered densely, so hashed prompt ids or dataset row numbers cost nothing more) in two passes (mean first, then
// Σ(x - mean)²), never as sqrt(E[x²] - E[x]²), whose float32 residue can make the std of an all-equal group ~1e-4 and
// blow an advantage up thousands of times (NeMo-RL #4161). Std is unbiased (n - 1), as TRL, verl and OpenRLHF.
// Centering is shifted by a member of the group (its largest reward p_g): r - mean_g is computed as
// (r - p_g) - Σ_g (r - p_g) / n_g. The differences r - p_g are exact for rewards of one magnitude, so
// equal rewards centre to exactly 0 in float32 (the plain Σ r / n of three copies of 1e6 + 0.1 is off
// by 0.04 and gave advantages of -0.8), and the rest match a double computation to float32 rounding.
// The batch std (group_scale::batch) is shifted by the largest reward of the batch the same way.
//
// Estimators (formula source on each function):
//   grpo      (r - mean_g) / (std + ε), std over the group, the batch, or none (= Dr. GRPO: r - mean_g)
//   rloo      r - (Σ_g r - r) / (n_g - 1)
//   opo       r - Σ_g |o| r / Σ_g |o|         (length-weighted baseline)
//   gpg       α (r - mean_g) / f_norm, α = B / #(r ≠ 0)
//   passk     only each group's best sample: r_max - r_2nd (optionally / (std + ε))
//   reinforce_pp, reinforce_pp_baseline, remax: token-level, see their comments.
// Edge cases are explicit options (frameworks disagree):
//   singleton groups: `singleton_policy::zero` (default; verl rloo_vectorized) or `raw` (verl grpo/opo/
//     gpg: mean 0 and std 1, so the advantage is the raw reward).
//   all-equal groups: `all_equal_policy::zero` (default) makes their advantage exactly 0 (only the KL
//     term then moves them); `formula` leaves whatever the formula gives (≈ 0 up to rounding).
// Advantages are constants in training: no backward.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <string_view>
#include <vector>

#include "posttrain/advantages/gae.hpp"
#include "posttrain/detail/validate.hpp"
#include "posttrain/numerics/masked.hpp"
#include "posttrain/tensor.hpp"

namespace posttrain {

enum class group_scale {
  group,  ///< std over the group (TRL scale_rewards="group", verl norm_adv_by_std_in_grpo=True)
  batch,  ///< std over the whole batch (TRL scale_rewards="batch")
  none,   ///< no division: Dr. GRPO (TRL "none", verl norm_adv_by_std_in_grpo=False, OpenRLHF dr_grpo)
};
enum class singleton_policy { zero, raw };
enum class all_equal_policy { zero, formula };

struct group_options {
  group_scale scale = group_scale::group;
  /// ε added to the std: TRL 1e-4 (the default here), verl 1e-6, OpenRLHF 1e-9; must be > 0.
  double eps = 1e-4;
  /// Floor on the std in the denominator, max(std, floor) + ε (NeMo-RL: 1e-3); off when empty.
  std::optional<double> std_floor = std::nullopt;
  singleton_policy singleton = singleton_policy::zero;
  all_equal_policy all_equal = all_equal_policy::zero;
};

template <tensor T>
struct group_advantage_result {
  T advantages;  ///< [B]
  T group_mean;  ///< [B]: the mean of each row's group (TRL logs `reward`)
  T group_std;   ///< [B]: unbiased std of each row's group (TRL `reward_std`), 0 for singletons
  /// TRL frac_reward_zero_std: fraction of rows whose std is 0 by torch.isclose(std, 0) (std <= 1e-8), the std
  /// being the one TRL's scaling uses: the row's group std (scale group or none; singletons count as 0), or under
  /// group_scale::batch the batch std, so every row or none (TRL GRPOTrainer._generate_and_score_completions,
  /// f2cd577: is_std_zero = isclose(std_rewards, 0)).
  T frac_reward_zero_std;
  /// TRL reward_std: the unbiased std of the scores over the whole batch (GRPOTrainer logs nanstd(rewards),
  /// f2cd577; older TRL logged the mean of the group stds, which is mean_all(group_std)). 0-d; 0 for one row.
  T reward_std;
};

namespace detail {

inline void check_group_options(std::string_view fn, const group_options& o) {
  require_finite(fn, "options.eps", o.eps);
  // ε divides (r - mean) / (std + ε), and std is 0 for an all-equal group: ε must be > 0.
  if (o.eps <= 0) detail::fail(fn, "options.eps must be > 0, got ", o.eps);
  if (o.std_floor) {
    require_finite(fn, "options.std_floor", *o.std_floor);
    if (*o.std_floor < 0) detail::fail(fn, "options.std_floor must be >= 0, got ", *o.std_floor);
  }
}

/// Per-row statistics of each row's group, all [B].
template <tensor T>
struct group_stats {
  T onehot;       ///< [B, G]
  T count;        ///< n_g
  T shifted;      ///< r - p_g, p_g = max_g r (a member of the group)
  T shifted_sum;  ///< Σ_g (r - p_g)
  T centred;      ///< r - mean_g = (r - p_g) - Σ_g (r - p_g) / n_g: exactly 0 for equal rewards
  T mean;         ///< p_g + Σ_g (r - p_g) / n_g
  T std;          ///< unbiased, 0 when n_g = 1
  T all_equal;    ///< 1 where max_g r == min_g r
};

/// group_index renumbered densely (0 .. G-1, in ascending order of the ids) and G, the number of distinct ids.
template <tensor T>
struct dense_groups {
  index_tensor_t<T> index;
  std::int64_t groups;
};

/// Validates group_index against scores [B] and renumbers it densely: ids are any non-negative integers (hashed
/// prompt ids, dataset row numbers), so the one-hot is [B, distinct ids], never [B, max id + 1] (issue 13
/// defect 8). Ids that are already 0 .. G-1 are kept as they are.
template <tensor T>
dense_groups<T> check_group_index(std::string_view fn, const T& scores, const index_tensor_t<T>& group_index) {
  using tr = tensor_traits<T>;
  detail::require_index<T>(fn, "group_index", group_index);
  if (tr::index_device(group_index) != ops::device(scores))
    detail::fail(fn, "group_index is on device ", tr::index_device(group_index), " but scores is on ",
                 ops::device(scores));
  if (tr::index_shape(group_index) != shape_t{ops::size(scores, 0)})
    detail::fail(fn, "group_index has shape ", shape_string(tr::index_shape(group_index)), " but scores has shape ",
                 shape_string(ops::shape(scores)), "; expected one group id per row, shape [", ops::size(scores, 0),
                 "]");
  auto ids = tr::index_to_host(group_index);
  for (auto id : ids)
    if (id < 0) detail::fail(fn, "group_index has a negative id ", id);
  std::sort(ids.begin(), ids.end());
  ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
  const auto groups = static_cast<std::int64_t>(ids.size());
  if (ids.empty() || ids.back() + 1 == groups) return {group_index, groups};  // already dense
  // Ascending: the k-th smallest id is >= k, and every id still to be renamed is larger than the current one,
  // so renaming ids[k] -> k never merges two groups.
  index_tensor_t<T> dense = group_index;
  for (std::int64_t k = 0; k < groups; ++k)
    if (ids[static_cast<std::size_t>(k)] != k) dense = tr::index_replace(dense, ids[static_cast<std::size_t>(k)], k);
  return {dense, groups};
}

/// Σ over each row's group of x (per row, [B]) through the one-hot matrix (selected, not multiplied:
/// an Inf in one group is not 0·Inf = NaN in the others).
template <tensor T>
T per_group_sum(const T& onehot, const T& x) {
  const T per_group = ops::sum(ops::where(onehot, ops::unsqueeze(x, 1), 0.0), 0);  // [G]
  return ops::sum(ops::where(onehot, ops::unsqueeze(per_group, 0), 0.0), 1);       // [B]
}

template <tensor T>
T per_group_extreme(const T& onehot, const T& x, bool take_max) {
  const double inf = std::numeric_limits<double>::infinity();
  const T filled = ops::where(onehot, ops::unsqueeze(x, 1), take_max ? -inf : inf);  // [B, G]
  const T per_group = take_max ? ops::max(filled, 0) : ops::min(filled, 0);          // [G], ±inf if empty
  return ops::sum(ops::where(onehot, ops::unsqueeze(per_group, 0), 0.0), 1);         // [B]
}

template <tensor T>
group_stats<T> compute_group_stats(std::string_view fn, const T& s, const index_tensor_t<T>& group_index) {
  const auto g = check_group_index(fn, s, group_index);
  const T oh = ops::one_hot(g.index, g.groups, s);            // [B, G], G distinct ids
  const T count = per_group_sum(oh, ops::full_like(s, 1.0));  // [B] n_g
  const T pivot = per_group_extreme(oh, s, true);             // [B] p_g = max_g r
  const T d = ops::sub(s, pivot);                             // [B] r - p_g, 0 for equal rewards
  const T dsum = per_group_sum(oh, d);                        // [B] Σ_g (r - p_g)
  const T dmean = ops::div(dsum, ops::maximum(count, 1.0));   // [B]
  const T centred = ops::sub(d, dmean);                       // [B] r - mean_g
  // unbiased std, two-pass: sqrt(Σ_g (r - mean)² / (n_g - 1))
  const T ss = per_group_sum(oh, ops::square(centred));
  const T stdv = ops::sqrt(ops::div(ss, ops::maximum(ops::sub(count, 1.0), 1.0)));
  const T eq = ops::eq(pivot, per_group_extreme(oh, s, false));
  return {oh, count, d, dsum, centred, ops::add(pivot, dmean), stdv, eq};
}

template <tensor T>
T checked_scores(std::string_view fn, const T& scores) {
  require_values(fn, "scores", scores);
  require_rank(fn, "scores", scores, 1, 1);
  return ops::upcast(scores);
}

/// Applies the singleton and all-equal policies to an advantage [B].
template <tensor T>
T apply_group_policies(const T& adv, const T& raw, const group_stats<T>& st, singleton_policy sp, all_equal_policy ap,
                       bool singleton_raw_allowed = true) {
  const T single = ops::le(st.count, 1.0);
  T out = adv;
  if (ap == all_equal_policy::zero) out = ops::where(st.all_equal, 0.0, out);
  out =
      ops::where(single, (sp == singleton_policy::raw && singleton_raw_allowed) ? raw : ops::full_like(raw, 0.0), out);
  return out;
}

}  // namespace detail

/// GRPO advantages (Shao et al. 2024, DeepSeekMath §4.1.2 outcome supervision):
/// A_i = (r_i - mean_g) / (std + ε), std per group / per batch / none (Dr. GRPO, Liu et al. 2025 §3.1).
/// scores [B], group_index [B] -> advantages [B]. With singleton_policy::raw a singleton gets (r - 0)/(1)
/// (verl: mean 0, std 1); with group_scale::batch the batch std still divides it.
/// Example (verl test_algo_config scores [1.5, 3, 0.7, 2.3], index [0,0,1,1], ε 1e-6):
/// [-0.707106, 0.707106, -0.707106, 0.707106].
template <tensor T>
group_advantage_result<T> grpo_advantages(const T& scores, const index_tensor_t<T>& group_index,
                                          const group_options& opt = {}) {
  constexpr std::string_view fn = "grpo_advantages";
  detail::check_group_options(fn, opt);
  const T s = detail::checked_scores(fn, scores);
  const auto st = detail::compute_group_stats(fn, s, group_index);
  const T single = ops::le(st.count, 1.0);
  const bool raw_single = opt.singleton == singleton_policy::raw;
  // verl: a singleton group has mean 0 and std 1
  T adv = raw_single ? ops::where(single, s, st.centred) : st.centred;  // r - mean
  const bool batch = opt.scale == group_scale::batch;
  const T all = ops::full_like(s, 1.0);
  // TRL scale_rewards="batch": rewards.std() over every row (unbiased); [B]
  const T reward_std = ops::sqrt(masked_var(ops::sub(s, ops::max_all(s)), all));  // 0-d, shifted by max r
  const T bstd = batch ? ops::mul(all, reward_std) : all;
  // TRL logs frac_reward_zero_std from the std its scaling uses: torch.isclose(std_rewards, 0), i.e. std <= 1e-8
  constexpr double zero_std_atol = 1e-8;
  const T zero_std = batch ? ops::le(bstd, zero_std_atol)
                           : ops::maximum(ops::mul(ops::le(st.std, zero_std_atol), ops::gt(st.count, 1.0)), single);
  if (opt.scale != group_scale::none) {
    T sd = bstd;
    if (opt.scale == group_scale::group) sd = raw_single ? ops::where(single, 1.0, st.std) : st.std;
    if (opt.std_floor) sd = ops::maximum(sd, *opt.std_floor);
    adv = ops::div(adv, ops::add(sd, opt.eps));
  }
  adv = detail::apply_group_policies(adv, adv, st, opt.singleton, opt.all_equal);
  return {adv, st.mean, st.std, ops::div(ops::sum_all(zero_std), double(ops::size(s, 0))), reward_std};
}

/// How several rewards per row [B, K] are combined (TRL multi_objective_aggregation).
enum class multi_reward {
  sum_then_normalize,  ///< grpo_advantages(Σ_k w_k r_k) (TRL default)
  normalize_then_sum,  ///< Σ_k w_k grpo_advantages(r_k), no batch step (GDPO-style)
  /// Σ_k w_k grpo_advantages(r_k), then (x - mean_B x) / (std_B x + ε) over the batch (TRL "normalize_then_sum")
  normalize_then_sum_batch,
};

/// GRPO advantages from K rewards per row, rewards [B, K], weights (K values; TRL reward_weights):
///   sum_then_normalize (TRL default): grpo_advantages(Σ_k w_k r_k)
///   normalize_then_sum (GDPO-style): x = Σ_k w_k grpo_advantages(r_k), each reward normalised within its group.
///   normalize_then_sum_batch: x as above, then normalised once more over the batch, (x - mean_B x) /
///     (std_B x + ε), std unbiased, ε = opt.eps (TRL GRPOTrainer._generate_and_score_completions,
///     multi_objective_aggregation="normalize_then_sum", f2cd577: advantages = (rewards - nanmean(rewards)) /
///     (nanstd(rewards) + 1e-4)). TRL divides each reward by its group std + 1e-4 whatever scale_rewards says:
///     keep opt.scale = group_scale::group (the default) to match it. A batch of one row gives 0.
template <tensor T>
T grpo_advantages_multi(const T& rewards, const std::vector<double>& weights, const index_tensor_t<T>& group_index,
                        multi_reward mode = multi_reward::sum_then_normalize, const group_options& opt = {}) {
  constexpr std::string_view fn = "grpo_advantages_multi";
  detail::require_values(fn, "rewards", rewards);
  detail::require_rank(fn, "rewards", rewards, 2, 2);
  const std::int64_t B = ops::size(rewards, 0), K = ops::size(rewards, 1);
  if (static_cast<std::int64_t>(weights.size()) != K)
    detail::fail(fn, "weights has ", weights.size(), " entries but rewards has K = ", K, " columns (shape ",
                 detail::shape_string(ops::shape(rewards)), ")");
  for (double w : weights) detail::require_finite(fn, "weights", w);
  const T r = ops::upcast(rewards);
  const auto column = [&](std::int64_t k) { return ops::reshape(ops::slice(r, 1, k, 1), shape_t{B}); };
  if (mode == multi_reward::sum_then_normalize) {
    T total = ops::mul(column(0), weights[0]);
    for (std::int64_t k = 1; k < K; ++k)
      total = ops::add(total, ops::mul(column(k), weights[static_cast<std::size_t>(k)]));
    return grpo_advantages(total, group_index, opt).advantages;
  }
  T total = ops::mul(grpo_advantages(column(0), group_index, opt).advantages, weights[0]);
  for (std::int64_t k = 1; k < K; ++k)
    total = ops::add(
        total, ops::mul(grpo_advantages(column(k), group_index, opt).advantages, weights[static_cast<std::size_t>(k)]));
  if (mode == multi_reward::normalize_then_sum) return total;
  // TRL: (x - mean_B) / (std_B + ε), unbiased std over every row
  const T all = ops::full_like(total, 1.0);
  const T centred = ops::sub(total, ops::div(ops::sum_all(total), static_cast<double>(B)));
  const T bstd = ops::sqrt(masked_var(centred, all));
  return ops::div(centred, ops::add(bstd, opt.eps));
}

/// RLOO (Ahmadian et al. 2024, eq. 4; Kool et al. 2019): A_i = r_i - (Σ_{j≠i} r_j) / (n_g - 1).
/// Equivalently n/(n-1) · (r_i - mean_g). scores [B] -> [B]. Singletons: the option (verl rloo_vectorized 0,
/// verl rloo raw). Example (verl test vector scores [1.5, 3, 0.7, 2.3], index [0,0,1,1]): [-1.5, 1.5, -1.6, 1.6].
template <tensor T>
T rloo_advantages(const T& scores, const index_tensor_t<T>& group_index,
                  singleton_policy singleton = singleton_policy::zero) {
  constexpr std::string_view fn = "rloo_advantages";
  const T s = detail::checked_scores(fn, scores);
  const auto st = detail::compute_group_stats(fn, s, group_index);
  // r_i - (S_g - r_i)/(n_g - 1), shifted by p_g: d_i - (Σ_g d - d_i)/(n_g - 1) with d = r - p_g
  const T baseline = ops::div(ops::sub(st.shifted_sum, st.shifted), ops::maximum(ops::sub(st.count, 1.0), 1.0));
  return detail::apply_group_policies(ops::sub(st.shifted, baseline), s, st, singleton, all_equal_policy::formula);
}

/// OPO (Hao et al. 2025, "On-policy RL with optimal reward baseline"; verl compute_opo_outcome_advantage):
/// A_i = r_i - Σ_g |o_j| r_j / Σ_g |o_j|, |o| = Σ_t response_mask. scores [B], response_mask [B, T] -> [B].
template <tensor T>
T opo_advantages(const T& scores, const T& response_mask, const index_tensor_t<T>& group_index,
                 singleton_policy singleton = singleton_policy::zero) {
  constexpr std::string_view fn = "opo_advantages";
  const T s = detail::checked_scores(fn, scores);
  detail::require_rank(fn, "response_mask", response_mask, 2, 2);
  if (ops::size(response_mask, 0) != ops::size(s, 0))
    detail::fail(fn, "response_mask has shape ", detail::shape_string(ops::shape(response_mask)),
                 " but scores has shape ", detail::shape_string(ops::shape(s)), "; expected ", ops::size(s, 0),
                 " rows");
  const auto st = detail::compute_group_stats(fn, s, group_index);
  const T len =
      ops::sum(ops::to_dtype(ops::ne(ops::to_dtype(response_mask, ops::dtype_of(s)), 0.0), ops::dtype_of(s)), 1);
  // baseline = Σ |o| r / Σ |o| over the group, shifted by p_g: r - baseline = d - Σ |o| d / Σ |o|
  // (a group without tokens keeps baseline 0: A = r)
  const T lsum = detail::per_group_sum(st.onehot, len);
  const T baseline = ops::div(detail::per_group_sum(st.onehot, ops::mul(len, st.shifted)), ops::maximum(lsum, 1e-30));
  const T adv = ops::where(ops::gt(lsum, 0.0), ops::sub(st.shifted, baseline), s);
  return detail::apply_group_policies(adv, s, st, singleton, all_equal_policy::formula);
}

/// GPG (Chu et al. 2025, "GPG: a simple and strong RL baseline"; verl compute_gpg_outcome_advantage):
/// A_i = α (r_i - mean_g) / f_norm with α = B / max(#{r ≠ 0}, 1). Singletons: mean 0 with `raw` (verl).
template <tensor T>
T gpg_advantages(const T& scores, const index_tensor_t<T>& group_index, double f_norm = 1.0,
                 singleton_policy singleton = singleton_policy::zero) {
  constexpr std::string_view fn = "gpg_advantages";
  detail::require_finite(fn, "f_norm", f_norm);
  if (f_norm <= 0) detail::fail(fn, "f_norm must be > 0, got ", f_norm);
  const T s = detail::checked_scores(fn, scores);
  const auto st = detail::compute_group_stats(fn, s, group_index);
  const T alpha = ops::div(double(ops::size(s, 0)), ops::maximum(ops::sum_all(ops::ne(s, 0.0)), 1.0));
  const T adv = ops::div(ops::mul(st.centred, alpha), f_norm);
  return detail::apply_group_policies(adv, ops::div(ops::mul(s, alpha), f_norm), st, singleton,
                                      all_equal_policy::formula);
}

/// GRPO pass@k (verl compute_grpo_passk_outcome_advantage; Chen et al. 2025 "Pass@k training"): in each
/// group only the first best sample gets A = r_max - r_2nd (divided by std_g + ε when `scale_by_std`), the
/// rest 0. Every group needs at least 2 samples (verl asserts). scores [B] -> [B].
template <tensor T>
T grpo_passk_advantages(const T& scores, const index_tensor_t<T>& group_index, bool scale_by_std = true,
                        double eps = 1e-6) {
  constexpr std::string_view fn = "grpo_passk_advantages";
  detail::require_finite(fn, "eps", eps);
  if (eps <= 0) detail::fail(fn, "eps must be > 0, got ", eps);  // divides by std + ε, 0 for equal rewards
  const T s = detail::checked_scores(fn, scores);
  const auto st = detail::compute_group_stats(fn, s, group_index);
  if (ops::item(ops::min(ops::where(ops::gt(ops::sum(st.onehot, 0), 0.0), ops::sum(st.onehot, 0), 1e9), 0)) < 2)
    detail::fail(fn, "group_index has a group with fewer than 2 samples; pass@k needs at least 2 per group");
  const T r_max = detail::per_group_extreme(st.onehot, s, true);
  const T is_max = ops::eq(s, r_max);
  // the first maximal row of each group: running count of maxima within the group equals 1
  const T running = ops::sum(ops::mul(ops::cumsum(ops::mul(st.onehot, ops::unsqueeze(is_max, 1)), 0), st.onehot), 1);
  const T first = ops::mul(is_max, ops::eq(running, 1.0));
  const double inf = std::numeric_limits<double>::infinity();
  const T r_second = detail::per_group_extreme(st.onehot, ops::where(first, -inf, s), true);
  T adv = ops::sub(r_max, r_second);
  if (scale_by_std) adv = ops::div(adv, ops::add(st.std, eps));
  return ops::where(first, adv, 0.0);
}

/// A sequence-level advantage [B] on every kept token: adv[:, None] · mask (verl's broadcast).
template <tensor T>
T broadcast_to_tokens(const T& advantages, const T& response_mask) {
  detail::require_values("broadcast_to_tokens", "advantages", advantages);
  detail::require_rank("broadcast_to_tokens", "advantages", advantages, 1, 1);
  detail::require_rank("broadcast_to_tokens", "response_mask", response_mask, 2, 2);
  if (ops::size(response_mask, 0) != ops::size(advantages, 0))
    detail::fail("broadcast_to_tokens", "response_mask has shape ", detail::shape_string(ops::shape(response_mask)),
                 " but advantages has shape ", detail::shape_string(ops::shape(advantages)));
  const T a = ops::upcast(advantages);
  return ops::where(ops::ne(ops::to_dtype(response_mask, ops::dtype_of(a)), 0.0), ops::unsqueeze(a, 1), 0.0);
}

/// REINFORCE++ (Hu 2025, arXiv:2501.03262 §3; verl compute_reinforce_plus_plus_outcome_advantage):
/// discounted returns reset after EOS, whitened over the whole batch. [B, T] -> [B, T].
template <tensor T>
T reinforce_pp_advantages(const T& token_level_rewards, const T& response_mask, double gamma = 1.0,
                          whiten_options whitening = {}) {
  detail::check_whiten_options("reinforce_pp_advantages", "whitening.", whitening);
  const T g = discounted_returns(token_level_rewards, response_mask, gamma);
  return masked_whiten(g, ops::ne(ops::to_dtype(response_mask, ops::dtype_of(g)), 0.0), whitening);
}

/// REINFORCE++-baseline (verl compute_reinforce_plus_plus_baseline_outcome_advantage): score = Σ_t r_t, minus its
/// group mean (singletons per policy; verl: raw), broadcast to tokens, whitened over the batch. -> [B, T].
/// This is verl's order (KL-shaped rewards summed, then centred). OpenRLHF reinforce_baseline centres the raw scores
/// before adding the KL penalty, which differs whenever β != 0: use the (scores, non_score_rewards, ...) overload
/// below with reinforce_baseline_options::openrlhf().
template <tensor T>
T reinforce_pp_baseline_advantages(const T& token_level_rewards, const T& response_mask,
                                   const index_tensor_t<T>& group_index,
                                   singleton_policy singleton = singleton_policy::raw, whiten_options whitening = {}) {
  constexpr std::string_view fn = "reinforce_pp_baseline_advantages";
  detail::check_whiten_options(fn, "whitening.", whitening);
  detail::require_values(fn, "token_level_rewards", token_level_rewards);
  detail::require_rank(fn, "token_level_rewards", token_level_rewards, 2, 2);
  const T r = ops::upcast(token_level_rewards);
  const T m = ops::ne(
      ops::upcast(detail::checked_mask(fn, "token_level_rewards", token_level_rewards, "response_mask", response_mask)),
      0.0);
  const T s = ops::sum(r, 1);
  const auto st = detail::compute_group_stats(fn, s, group_index);
  const T centred = detail::apply_group_policies(st.centred, s, st, singleton, all_equal_policy::formula);
  return masked_whiten(ops::where(m, ops::unsqueeze(centred, 1), 0.0), m, whitening);
}

/// The order of REINFORCE++-baseline's two steps when the KL penalty sits in the reward (issue 17).
enum class baseline_order {
  /// Shape first, then centre (default; verl compute_reinforce_plus_plus_baseline_outcome_advantage): the group
  /// mean is taken of score_b + Σ_t (non-score rewards), broadcast over the kept tokens.
  shaped_sum,
  /// Centre first, then shape (OpenRLHF experience_maker.py compute_advantages_and_returns, reinforce_baseline):
  /// the group mean is subtracted from the raw scores, the centred score is placed at the last kept token, the
  /// per-token non-score rewards are added (openrlhf/models/utils.py compute_reward), and the returns
  /// G_t = Σ_{k>=t} m_k·r_k (get_cumulative_returns, γ = 1, accumulated across masked tokens) are the advantages.
  /// The two differ whenever the KL coefficient is non-zero (OpenRLHF's default).
  score_first,
};

struct reinforce_baseline_options {
  /// verl's order (default) or OpenRLHF's (see baseline_order).
  baseline_order order = baseline_order::shaped_sum;
  /// A group of one: its raw value (default, verl) or 0 (OpenRLHF: r - mean of one sample).
  singleton_policy singleton = singleton_policy::raw;
  /// The batch whitening (whiten_options::openrlhf() for OpenRLHF's normalisation, whiten_options::verl() for
  /// verl's masked_whiten). Under score_first, positions outside the mask carry the returns OpenRLHF computes there.
  whiten_options whitening = {};

  /// OpenRLHF 3c3be62 reinforce_baseline: centre the scores first, OpenRLHF's normalisation over every position.
  static constexpr reinforce_baseline_options openrlhf() {
    return {.order = baseline_order::score_first,
            .singleton = singleton_policy::zero,
            .whitening = whiten_options::openrlhf()};
  }
};

/// REINFORCE++-baseline from the scores [B] and the per-token non-score rewards [B, T] (-β·kl_t, e.g.
/// kl_shaped_rewards(zero scores, ...).rewards; read only at kept tokens), with the order of centring and KL
/// shaping an option (reinforce_baseline_options). response_mask [B, T], group_index [B] -> advantages [B, T].
/// shaped_sum equals reinforce_pp_baseline_advantages(token_level_rewards, ...) on the rewards with the score
/// added at each row's last kept token.
template <tensor T>
T reinforce_pp_baseline_advantages(const T& scores, const T& non_score_rewards, const T& response_mask,
                                   const index_tensor_t<T>& group_index, const reinforce_baseline_options& opt = {}) {
  constexpr std::string_view fn = "reinforce_pp_baseline_advantages";
  detail::check_whiten_options(fn, "options.whitening.", opt.whitening);
  if (opt.order != baseline_order::shaped_sum && opt.order != baseline_order::score_first)
    detail::fail(fn, "options.order must be baseline_order::shaped_sum or baseline_order::score_first, got ",
                 static_cast<int>(opt.order));
  detail::require_values(fn, "non_score_rewards", non_score_rewards);
  detail::require_rank(fn, "non_score_rewards", non_score_rewards, 2, 2);
  const T s = detail::checked_scores(fn, scores);
  if (ops::size(s, 0) != ops::size(non_score_rewards, 0))
    detail::fail(fn, "scores has shape ", detail::shape_string(ops::shape(scores)), " but non_score_rewards has shape ",
                 detail::shape_string(ops::shape(non_score_rewards)), "; expected [", ops::size(non_score_rewards, 0),
                 "]");
  const T r = ops::upcast(non_score_rewards);
  const T m = ops::ne(
      ops::upcast(detail::checked_mask(fn, "non_score_rewards", non_score_rewards, "response_mask", response_mask)),
      0.0);
  // the last kept position of each row (-1 when none): where the score sits (OpenRLHF compute_reward eos_indices)
  const T pos = ops::sub(ops::cumsum(ops::full_like(r, 1.0), 1), 1.0);
  const T at_last = ops::eq(pos, ops::max(ops::where(m, pos, -1.0), 1, true));  // [B, T]
  const T kept = ops::where(m, r, 0.0);
  if (opt.order == baseline_order::shaped_sum) {
    // verl: token_level_rewards = score at the last token + non-score rewards, summed, then centred
    const T token_level = ops::add(kept, ops::mul(at_last, ops::unsqueeze(s, 1)));
    return reinforce_pp_baseline_advantages(token_level, m, group_index, opt.singleton, opt.whitening);
  }
  // OpenRLHF: rewards = rewards - rewards.mean(-1) over the group, before compute_reward adds -β·kl
  const auto st = detail::compute_group_stats(fn, s, group_index);
  const T centred = detail::apply_group_policies(st.centred, s, st, opt.singleton, all_equal_policy::formula);
  const T shaped = ops::add(kept, ops::mul(at_last, ops::unsqueeze(centred, 1)));  // [B, T], 0 where masked
  // get_cumulative_returns: G_t = r_t·m_t + γ·G_{t+1}, γ = 1, never reset (a masked token adds 0)
  const std::int64_t B = ops::size(r, 0), len = ops::size(r, 1);
  T running = ops::full(r, {B, 1}, 0.0);
  std::vector<T> cols;
  cols.reserve(static_cast<std::size_t>(len));
  for (std::int64_t t = len - 1; t >= 0; --t) {
    running = ops::add(ops::slice(shaped, 1, t, 1), running);  // G_t = m_t·r_t + G_{t+1}
    cols.push_back(running);
  }
  const T returns = detail::reversed_concat(std::move(cols));
  return masked_whiten(returns, m, opt.whitening);
}

template <tensor T>
struct remax_result {
  T advantages;  ///< [B, T]
  T returns;     ///< [B, T]
};

/// ReMax (Li et al. 2024, arXiv:2310.10505 Alg. 1; verl compute_remax_outcome_advantage): returns
/// R_t = Σ_{k≥t} r_k m_k, advantages R_t - b with b the greedy response's reward [B].
template <tensor T>
remax_result<T> remax_advantages(const T& token_level_rewards, const T& reward_baselines, const T& response_mask) {
  constexpr std::string_view fn = "remax_advantages";
  detail::require_values(fn, "token_level_rewards", token_level_rewards);
  detail::require_rank(fn, "token_level_rewards", token_level_rewards, 2, 2);
  detail::require_values(fn, "reward_baselines", reward_baselines);
  if (ops::shape(reward_baselines) != shape_t{ops::size(token_level_rewards, 0)})
    detail::fail(fn, "reward_baselines has shape ", detail::shape_string(ops::shape(reward_baselines)),
                 " but token_level_rewards has shape ", detail::shape_string(ops::shape(token_level_rewards)),
                 "; expected [", ops::size(token_level_rewards, 0), "]");
  const T r = ops::upcast(token_level_rewards);
  const T m = ops::ne(
      ops::upcast(detail::checked_mask(fn, "token_level_rewards", token_level_rewards, "response_mask", response_mask)),
      0.0);
  const T rm = ops::where(m, r, 0.0);
  // reverse cumulative sum: Σ_{k≥t} = total - Σ_{k≤t} + r_t
  const T returns = ops::where(m, ops::add(ops::sub(ops::sum(rm, 1, true), ops::cumsum(rm, 1)), rm), 0.0);
  const T adv = ops::where(m, ops::sub(returns, ops::unsqueeze(ops::upcast(reward_baselines), 1)), 0.0);
  return {adv, returns};
}

}  // namespace posttrain
