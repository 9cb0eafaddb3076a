// posttrain/data/multi_turn.hpp — which tokens of a multi-turn, tool-using episode are trained on.
//
// An agentic sample interleaves tokens the policy generated (assistant turns, tool calls) with tokens
// it did not (the user, a tool's or an environment's reply). Only the former have log-probs under the
// policy's sampling, so only they may carry a loss: verl's multi-turn rollout builds a `response_mask`
// (its `loss_mask`) that is 1 on assistant tokens and 0 on tool/observation tokens, OpenRLHF's agent
// path an `action_mask` the same way. Pass the result as the response/completion mask of any loss;
// masked positions then get exactly zero gradient (masked reductions select, numerics/masked.hpp).
//   multi_turn_mask(like, samples, T)     from each sample's turn lengths, on the host
//   role_mask(roles, trained_role, like)  from a per-token role id tensor, on the device
#pragma once

#include <cstdint>
#include <vector>

#include "posttrain/detail/validate.hpp"
#include "posttrain/tensor.hpp"

namespace posttrain {

/// `length` consecutive tokens of one turn, produced by the policy (`trained`) or not (user, tool, environment).
struct turn_segment {
  std::int64_t length = 0;
  bool trained = false;
};

/// A [B, length] 0/1 mask like `like` (its floating dtype and device): row b follows samples[b]'s segments in
/// order, 1 on trained segments and 0 on the others; positions after the last segment (padding) are 0.
/// Each row's segments must fit in `length`; lengths are >= 0.
template <tensor T>
T multi_turn_mask(const T& like, const std::vector<std::vector<turn_segment>>& samples, std::int64_t length) {
  constexpr const char* fn = "multi_turn_mask";
  detail::require_floating(fn, "like", like);
  if (length < 0) detail::fail(fn, "length must be >= 0, got ", length);
  const auto rows = static_cast<std::int64_t>(samples.size());
  if (rows == 0) return ops::full(like, shape_t{0, length}, 0.0);
  std::vector<T> row_masks;
  row_masks.reserve(samples.size());
  for (std::int64_t b = 0; b < rows; ++b) {
    std::vector<T> pieces;
    std::int64_t used = 0;
    for (std::size_t k = 0; k < samples[static_cast<std::size_t>(b)].size(); ++k) {
      const turn_segment& seg = samples[static_cast<std::size_t>(b)][k];
      if (seg.length < 0) detail::fail(fn, "samples[", b, "][", k, "].length must be >= 0, got ", seg.length);
      if (seg.length > length - used)
        detail::fail(fn, "samples[", b, "]'s segments need more than length = ", length, " tokens (segment ", k,
                     " ends at ", used + seg.length, ")");
      if (seg.length > 0) pieces.push_back(ops::full(like, shape_t{1, seg.length}, seg.trained ? 1.0 : 0.0));
      used += seg.length;
    }
    if (used < length || pieces.empty()) pieces.push_back(ops::full(like, shape_t{1, length - used}, 0.0));
    row_masks.push_back(pieces.size() == 1 ? pieces.front() : ops::concat(pieces, 1));
  }
  return row_masks.size() == 1 ? row_masks.front() : ops::concat(row_masks, 0);
}

/// A 0/1 mask like `like` (its floating dtype and device) of `roles`' shape: 1 where roles == trained_role.
/// For a tokenizer's per-token role (or segment) ids, e.g. 0 system/user, 1 assistant, 2 tool.
template <tensor T>
T role_mask(const index_tensor_t<T>& roles, std::int64_t trained_role, const T& like) {
  constexpr const char* fn = "role_mask";
  detail::require_index<T>(fn, "roles", roles);
  detail::require_floating(fn, "like", like);
  return ops::sub(1.0, tensor_traits<T>::index_not_equal(roles, trained_role, like));
}

}  // namespace posttrain
