// posttrain/losses/token_selection.hpp — which tokens of a [B, T] batch a policy loss trains on: TRL's
// top-entropy mask and the covariance selection of Clip-Cov / KL-Cov (Cui et al. 2025 arXiv:2505.22617
// "The Entropy Mechanism of RL for Reasoning LMs" §4; verl compute_policy_loss_clip_cov / _kl_cov).
//
//   top entropy  keep valid tokens with H ≥ quantile_{1-q}(H over valid tokens), linear interpolation as
//                torch.quantile (TRL get_high_entropy_mask, top_entropy_quantile q; q = 1 keeps every valid
//                token). Example: H = [1, 2, 3, 4] all valid, q = 0.5: quantile_0.5 = 2.5, keep [0, 0, 1, 1].
//   covariance   cov_t = (A_t - Ā)(logπ_t - mean logπ), means over every valid token of the batch; k =
//                max(⌊ratio·N_valid⌋, 1) of the candidate tokens are selected: the largest covariances
//                (cov_rule::top, verl kl_cov's torch.topk; ties to the lower row-major index) or a seeded
//                uniform draw (cov_rule::random, verl clip_cov's torch.randperm, which uses the global RNG;
//                here a splitmix64 Fisher-Yates over the candidates in row-major order, the same tokens for a
//                seed on every platform and backend).
// The selections are constants of the step (they only pick tokens); policy_variants.hpp applies them.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

#include "posttrain/detail/validate.hpp"
#include "posttrain/numerics/masked.hpp"
#include "posttrain/tensor.hpp"

namespace posttrain {

/// How Clip-Cov / KL-Cov pick tokens among the candidates: a seeded uniform draw (verl clip_cov's randperm)
/// or the largest covariances (verl kl_cov's topk).
enum class cov_rule { random, top };

namespace detail {

/// The q-quantile (0 ≤ q ≤ 1) of v, linearly interpolated (torch.quantile's default); 0 when v is empty.
inline double linear_quantile(std::vector<double> v, double q) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const double pos = q * double(v.size() - 1);
  const auto lo = static_cast<std::size_t>(std::floor(pos));
  const std::size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (pos - double(lo)) * (v[hi] - v[lo]);
}

/// TRL get_high_entropy_mask on checked inputs: H (compute dtype) and m (0/1) of one shape, 0 ≤ q ≤ 1.
template <tensor T>
T top_entropy_keep(const T& H, const T& m, double top_quantile) {
  const auto hv = ops::to_host(H), mv = ops::to_host(m);
  std::vector<double> valid;
  for (std::size_t i = 0; i < hv.size(); ++i)
    if (mv[i] != 0) valid.push_back(hv[i]);
  // torch.quantile(H[valid], 1 - q), keep H ≥ it
  const double thr = linear_quantile(std::move(valid), 1.0 - top_quantile);
  return ops::mul(ops::ge(H, thr), m);
}

/// The top-entropy mask for a threshold computed elsewhere (global_top_entropy_threshold): H ≥ thr and valid.
template <tensor T>
T top_entropy_keep_at(const T& H, const T& m, double threshold) {
  return ops::mul(ops::ge(H, threshold), m);
}

/// splitmix64 (Steele, Lea, Flood 2014): the seeded generator of Clip-Cov's random draw (integer-only, so a
/// seed picks the same tokens on every platform and backend).
inline std::uint64_t splitmix64(std::uint64_t& state) {
  std::uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

/// cov_t = (A_t - masked_mean A)·(sg(logπ_t) - masked_mean sg(logπ)) over the valid tokens (verl), [B, T].
template <tensor T>
T token_covariance(const T& A, const T& lp, const T& m) {
  const T l = ops::detach(lp);
  return ops::mul(ops::sub(A, masked_mean(A, m)), ops::sub(l, masked_mean(l, m)));
}

/// verl's selection size max(int(ratio · N_valid), 1); 0 when there is no valid token.
inline std::size_t cov_select_count(double ratio, double n_valid) {
  return n_valid > 0 ? std::max<std::size_t>(static_cast<std::size_t>(std::floor(ratio * n_valid)), 1) : std::size_t{0};
}

/// The positions (into the candidate list, in its order) of the k candidates `rule` picks, in pick order.
/// cv: the candidates' covariances in row-major order. top: largest first, ties to the lower position; random:
/// the first k of a Fisher-Yates shuffle of the positions driven by splitmix64(seed). Positions follow the
/// row-major order, so any split of the batch whose candidate lists concatenate to the whole batch's picks the
/// same tokens (global_cov_selection).
inline std::vector<std::size_t> cov_pick(const std::vector<double>& cv, std::size_t k, cov_rule rule,
                                         std::uint64_t seed) {
  std::vector<std::size_t> idx(cv.size());
  for (std::size_t i = 0; i < idx.size(); ++i) idx[i] = i;
  k = std::min(k, idx.size());
  const auto kk = static_cast<std::ptrdiff_t>(k);
  if (rule == cov_rule::top) {
    std::partial_sort(idx.begin(), idx.begin() + kk, idx.end(),
                      [&](std::size_t a, std::size_t b) { return cv[a] > cv[b] || (cv[a] == cv[b] && a < b); });
  } else {
    std::uint64_t state = seed;
    for (std::size_t i = 0; i < k; ++i) std::swap(idx[i], idx[i + splitmix64(state) % (idx.size() - i)]);
  }
  idx.resize(k);
  return idx;
}

/// A 0/1 tensor like x2 ([B, T]) with 1 at the given row-major flat indices. O(k·B·T) (k is small).
template <tensor T>
T flat_index_mask(const T& x2, const std::vector<std::size_t>& flat) {
  T sel = ops::full_like(x2, 0.0);
  if (flat.empty()) return sel;
  const T one = ops::full_like(x2, 1.0);
  const T row = ops::sub(ops::cumsum(one, 0), 1.0), col = ops::sub(ops::cumsum(one, 1), 1.0);  // [B, T] indices
  const auto width = static_cast<std::size_t>(ops::size(x2, 1));
  for (std::size_t f : flat)
    sel = ops::add(sel, ops::mul(ops::eq(row, double(f / width)), ops::eq(col, double(f % width))));
  return sel;
}

/// k of the candidate tokens (cand != 0) of a [B, T] batch, chosen on the host by `rule` (cov_pick), as a 0/1
/// tensor like cov. Building the mask costs O(k·B·T).
template <tensor T>
T cov_select(const T& cov, const T& cand, std::size_t k, cov_rule rule, std::uint64_t seed) {
  const auto cv = ops::to_host(cov), ok = ops::to_host(cand);
  std::vector<std::size_t> flat;
  std::vector<double> values;
  for (std::size_t i = 0; i < ok.size(); ++i)
    if (ok[i] != 0) flat.push_back(i), values.push_back(cv[i]);
  std::vector<std::size_t> picked;
  for (std::size_t p : cov_pick(values, k, rule, seed)) picked.push_back(flat[p]);
  return flat_index_mask(cov, picked);
}

}  // namespace detail

/// TRL get_high_entropy_mask: 1 where entropies ≥ the (1 - top_quantile) linear quantile of the valid
/// entropies, and the token is valid. entropies, mask: [B, T] (or any shape).
template <tensor T>
T top_entropy_mask(const T& entropies, const T& mask, double top_quantile) {
  constexpr std::string_view fn = "top_entropy_mask";
  if (!(top_quantile >= 0 && top_quantile <= 1)) detail::fail(fn, "top_quantile must be in [0, 1], got ", top_quantile);
  detail::require_values(fn, "entropies", entropies);
  const T m = ops::ne(ops::upcast(detail::checked_mask(fn, "entropies", entropies, "mask", mask)), 0.0);
  return detail::top_entropy_keep(ops::upcast(entropies), m, top_quantile);
}

}  // namespace posttrain
