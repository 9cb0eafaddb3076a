// posttrain/data/next_token.hpp — the two label/mask steps every causal-LM trainer writes by hand.
//
//   shift_labels(labels)             next-token targets for unshifted logits (Hugging Face convention)
//   completion_mask(ids, eos, like)  1 on a sampled completion up to and including its first EOS (TRL)
#pragma once

#include <cstdint>

#include "posttrain/data/index_ops.hpp"
#include "posttrain/detail/validate.hpp"
#include "posttrain/tensor.hpp"

namespace posttrain {

/// Next-token targets: out[..., t] = labels[..., t + 1] and out[..., T - 1] = ignore_index, the same
/// shape as `labels` [..., T]. Position t's logits predict token t + 1, so the result pairs with the
/// model's unshifted logits [..., T, V] in sft_loss / token_logprobs. This is Hugging Face
/// transformers' ForCausalLMLoss (labels padded on the right with ignore_index, then labels[..., 1:]);
/// prompt or padding positions already set to ignore_index stay ignored, one step earlier.
/// `labels` is an id tensor of a backend with index_ops (both of posttrain's); rank >= 1.
template <index_structure I>
I shift_labels(const I& labels, std::int64_t ignore_index = -100) {
  using ix = index_ops<I>;
  const shape_t s = ix::shape(labels);
  if (s.empty()) detail::fail("shift_labels", "labels must have rank >= 1 ([..., T]), got a 0-d tensor");
  const std::int64_t last = static_cast<std::int64_t>(s.size()) - 1, steps = s.back();
  if (steps == 0) return labels;
  shape_t column = s;
  column.back() = 1;
  return ix::concat({ix::slice(labels, last, 1, steps - 1), ix::full(labels, column, ignore_index)}, last);
}

/// The completion mask of sampled sequences `ids` [..., T] (completion tokens only): 1 up to and including
/// the first `eos_token_id` of each row, 0 after it; a row without EOS is kept whole. TRL GRPOTrainer:
/// `completion_mask = (arange(T) <= eos_idx)` with eos_idx the first EOS (T when none). The result is a
/// 0/1 tensor like `like` (its floating dtype and device), computed on the device: the exclusive running
/// count of EOS tokens is 0 exactly at the kept positions.
template <tensor T>
T completion_mask(const index_tensor_t<T>& ids, std::int64_t eos_token_id, const T& like) {
  constexpr const char* fn = "completion_mask";
  detail::require_index<T>(fn, "ids", ids);
  detail::require_floating(fn, "like", like);
  if (tensor_traits<T>::index_shape(ids).empty())
    detail::fail(fn, "ids must have rank >= 1 ([..., T]), got a 0-d tensor");
  const T is_eos = ops::sub(1.0, tensor_traits<T>::index_not_equal(ids, eos_token_id, like));
  const T eos_before = ops::sub(ops::cumsum(is_eos, -1), is_eos);
  return ops::eq(eos_before, 0.0);
}

}  // namespace posttrain
