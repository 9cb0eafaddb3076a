// posttrain/data/index_ops.hpp — the few structural operations the batch helpers need on index
// tensors (token ids, labels, roles): shape, slice, concat and full.
//
// The tensor concept (tensor.hpp) gives index tensors only what the losses need (compare, replace,
// count, to_host). Building batches also moves ids around, so a backend that wants the id helpers of
// posttrain/data/ specialises `index_ops<I>` for its index tensor type I; both of posttrain's backends
// do (backends/torch/index_ops.hpp, backends/eigen/index_ops.hpp). The helpers check for it with
// the `index_structure` concept, so a backend without it still has every loss.
#pragma once

#include <concepts>
#include <cstdint>
#include <vector>

#include "posttrain/tensor.hpp"

namespace posttrain {

/// Customisation point: specialise for an index tensor type. Dimensions are non-negative here.
template <class I>
struct index_ops;

// clang-format off
template <class I>
concept index_structure = requires(const I& i, const shape_t& s, std::int64_t n, const std::vector<I>& parts) {
  { index_ops<I>::shape(i) } -> std::same_as<shape_t>;
  { index_ops<I>::slice(i, n, n, n) } -> std::same_as<I>;   ///< i[..., start:start+length, ...] along dim
  { index_ops<I>::concat(parts, n) } -> std::same_as<I>;    ///< joined along dim
  { index_ops<I>::full(i, s, n) } -> std::same_as<I>;       ///< like i (dtype, device), filled with n
};
// clang-format on

}  // namespace posttrain
