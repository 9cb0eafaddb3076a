// posttrain/data/pairs.hpp — one forward for both halves of a preference pair.
//
// Preference losses (DPO and kin) need the policy's log-probs of the chosen and the rejected
// completion. TRL's DPOTrainer runs them as one batch: concatenated_inputs pads both to a common
// length and stacks chosen over rejected; after the forward, the first B rows are the chosen ones.
//   concat_pairs(chosen, rejected, pad)  [B, Tc] + [B, Tr] -> [2B, max(Tc, Tr)] (ids, masks or values)
//   split_pairs(x)                       [2B, ...] -> {chosen [B, ...], rejected [B, ...]}
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "posttrain/data/index_ops.hpp"
#include "posttrain/error.hpp"
#include "posttrain/tensor.hpp"

namespace posttrain {

namespace detail::pairs {
/// The structural operations for X: the tensor concept's when X is a value tensor (LibTorch's
/// at::Tensor is both), else index_ops (the Eigen backend's id tensors).
template <class X>
struct structure {
  static shape_t shape(const X& x) {
    if constexpr (tensor<X>)
      return ops::shape(x);
    else
      return index_ops<X>::shape(x);
  }
  static X slice(const X& x, std::int64_t dim, std::int64_t start, std::int64_t length) {
    if constexpr (tensor<X>)
      return ops::slice(x, dim, start, length);
    else
      return index_ops<X>::slice(x, dim, start, length);
  }
  static X concat(const std::vector<X>& parts, std::int64_t dim) {
    if constexpr (tensor<X>)
      return ops::concat(parts, dim);
    else
      return index_ops<X>::concat(parts, dim);
  }
  static X full(const X& like, const shape_t& s, double value) {
    if constexpr (tensor<X>)
      return ops::full(like, s, value);
    else
      return index_ops<X>::full(like, s, static_cast<std::int64_t>(value));
  }
};
}  // namespace detail::pairs

template <class X>
concept pairable = tensor<X> || index_structure<X>;

/// Stacks chosen [B, Tc, ...] over rejected [B, Tr, ...] into [2B, max(Tc, Tr), ...], padding the shorter
/// one on the right of dimension 1 with `pad_value` (TRL concatenated_inputs: pad_to_length with
/// pad_token_id for input_ids, 0 for attention masks, -100 for labels). Rows 0..B-1 are the chosen ones.
/// Rank-1 inputs [B] are stacked without padding. Both must agree on every other dimension.
template <pairable X>
X concat_pairs(const X& chosen, const X& rejected, double pad_value = 0.0) {
  using st = detail::pairs::structure<X>;
  constexpr const char* fn = "concat_pairs";
  shape_t c = st::shape(chosen), r = st::shape(rejected);
  if (c.empty() || r.empty() || c.size() != r.size())
    detail::fail(fn, "chosen and rejected must have the same rank >= 1, got shapes ", detail::shape_string(c), " and ",
                 detail::shape_string(r));
  if (c.size() == 1) {
    if (c != r)
      detail::fail(fn, "chosen has shape ", detail::shape_string(c), " but rejected has ", detail::shape_string(r));
    return st::concat({chosen, rejected}, 0);
  }
  shape_t c_rest = c, r_rest = r;
  c_rest[1] = r_rest[1] = 0;
  if (c_rest != r_rest)
    detail::fail(fn, "chosen ", detail::shape_string(c), " and rejected ", detail::shape_string(r),
                 " must agree on every dimension but 1 (the sequence)");
  const std::int64_t length = std::max(c[1], r[1]);
  const auto padded = [&](const X& x, shape_t s) {
    if (s[1] == length) return x;
    const std::int64_t have = s[1];
    s[1] = length - have;
    return st::concat({x, st::full(x, s, pad_value)}, 1);
  };
  return st::concat({padded(chosen, c), padded(rejected, r)}, 0);
}

template <class X>
struct pair_halves {
  X chosen;    ///< rows 0..B-1
  X rejected;  ///< rows B..2B-1
};

/// Splits a [2B, ...] result of a concat_pairs batch (per-sequence log-probs, logits, masks) back into
/// its chosen and rejected halves. The first dimension must be even.
template <pairable X>
pair_halves<X> split_pairs(const X& stacked) {
  using st = detail::pairs::structure<X>;
  const shape_t s = st::shape(stacked);
  if (s.empty() || s[0] % 2 != 0)
    detail::fail("split_pairs", "stacked must have an even first dimension (2B), got shape ", detail::shape_string(s));
  const std::int64_t b = s[0] / 2;
  return {st::slice(stacked, 0, 0, b), st::slice(stacked, 0, b, b)};
}

}  // namespace posttrain
