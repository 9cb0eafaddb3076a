// posttrain/numerics/aggregate.hpp — reducing a per-token loss [B, T] to the scalar a trainer
// back-propagates, in the four modes the frameworks use, plus a plain sum.
//
// A mask is boolean, as in numerics/masked.hpp: a non-zero value keeps its token and counts once
// (token_mean of [1, 2, 3] under [2, 1, 0] is 1.5, equal to masked_mean), never a weight.
//
// Every mode is linear in the per-token loss: loss = Σ_{b,t} w_{b,t} · L_{b,t} with weights that
// depend only on the mask. aggregation_weights() returns those weights, which are also the
// gradient of the aggregate with respect to L (each loss's backward uses them).
//
// Global normaliser: pass the count over the whole optimiser step (all micro-batches and all
// data-parallel ranks) and the sum of the per-shard losses equals the loss of the whole batch
// (the gradient-accumulation fix of HF blog #2414 / torchtune #1875). For data-parallel training
// whose gradient is averaged over `world` ranks, pass normalizer / world (verl multiplies by
// dp_size for the same reason).
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

#include "posttrain/detail/validate.hpp"
#include "posttrain/numerics/masked.hpp"
#include "posttrain/tensor.hpp"

namespace posttrain {

enum class aggregation {
  /// Σ m·L / Σ m: every token weighs the same (verl/OpenRLHF "token-mean"; DAPO; TRL dapo/bnpo).
  /// normalizer: the global token count.
  token_mean,
  /// mean over sequences of Σ_t m·L (verl "seq-mean-token-sum").
  /// normalizer: the global count of sequences with at least one token.
  seq_mean_token_sum,
  /// mean over sequences of the per-sequence token mean (verl "seq-mean-token-mean"; vanilla
  /// GRPO; TRL grpo). Sequences with no token are excluded. normalizer: as seq_mean_token_sum.
  /// Each sequence divides by its token count n_b exactly (default; TRL) or, with token_count_eps > 0,
  /// by n_b + token_count_eps (verl agg_loss and OpenRLHF aggregate_loss(token_level_loss=False): 1e-8).
  seq_mean_token_mean,
  /// Σ m·L / (B · T) with T the padded length (Dr. GRPO; TRL dr_grpo uses B ·
  /// max_completion_length). normalizer: the whole divisor. verl's form Σ m·L / T (no mean over
  /// sequences) is normalizer = T.
  seq_mean_token_sum_norm,
  /// Σ m·L (PyTorch reduction="sum"). normalizer: a constant divisor, if given.
  sum,
};

constexpr const char* aggregation_name(aggregation a) {
  switch (a) {
    case aggregation::token_mean: return "token-mean";
    case aggregation::seq_mean_token_sum: return "seq-mean-token-sum";
    case aggregation::seq_mean_token_mean: return "seq-mean-token-mean";
    case aggregation::seq_mean_token_sum_norm: return "seq-mean-token-sum-norm";
    case aggregation::sum: return "sum";
  }
  return "?";
}

namespace detail {
inline void check_normalizer(std::string_view fn, std::optional<double> normalizer) {
  if (!normalizer) return;
  require_finite(fn, "normalizer", *normalizer);
  if (*normalizer <= 0) fail(fn, "normalizer must be > 0, got ", *normalizer);
}
/// seq_mean_token_mean's per-sequence count guard: finite, >= 0 (0: the exact count).
inline void check_token_count_eps(std::string_view fn, std::string_view name, double eps) {
  require_finite(fn, name, eps);
  if (eps < 0) fail(fn, name, " must be >= 0, got ", eps);
}
}  // namespace detail

/// The weights w[B, T] (or w[N] for token_mean/sum on rank-1 masks) with aggregate = Σ w·L.
/// Rows with no token get weight 0; an all-masked batch gives all-zero weights (loss 0, no NaN).
/// token_count_eps (seq_mean_token_mean only; ignored by the other modes): 0 (default, TRL) divides each
/// sequence by its token count, > 0 by count + token_count_eps (verl, OpenRLHF: 1e-8).
template <tensor T>
T aggregation_weights(const T& mask, aggregation mode, std::optional<double> normalizer = std::nullopt,
                      double token_count_eps = 0.0) {
  constexpr std::string_view fn = "aggregation_weights";
  detail::require_nonempty(fn, "mask", mask);
  detail::check_normalizer(fn, normalizer);
  detail::check_token_count_eps(fn, "token_count_eps", token_count_eps);
  const bool per_sequence = mode != aggregation::token_mean && mode != aggregation::sum;
  if (per_sequence) detail::require_rank(fn, "mask", mask, 2, 2);
  const T m = is_floating(ops::dtype_of(mask)) ? mask : ops::to_dtype(mask, dtype::float32);
  const T mb = ops::ne(m, 0.0);  // 0/1 whatever the mask's values
  switch (mode) {
    case aggregation::token_mean: {
      const T count = normalizer ? ops::scalar_like(mb, *normalizer) : ops::maximum(ops::sum_all(mb), 1.0);
      return ops::div(mb, count);
    }
    case aggregation::sum: return normalizer ? ops::div(mb, *normalizer) : mb;
    case aggregation::seq_mean_token_sum_norm: {
      const double divisor = normalizer ? *normalizer : static_cast<double>(ops::size(mb, 0) * ops::size(mb, 1));
      return ops::div(mb, divisor);
    }
    case aggregation::seq_mean_token_sum:
    case aggregation::seq_mean_token_mean: {
      const T tokens = ops::sum(mb, 1, true);                                   // [B, 1]
      const T has_tokens = ops::gt(tokens, 0.0);                                // [B, 1]
      const T seqs = normalizer ? ops::scalar_like(mb, *normalizer)             // global count, or
                                : ops::maximum(ops::sum_all(has_tokens), 1.0);  // local non-empty rows
      T w = ops::div(mb, seqs);
      // verl agg_loss "seq-mean-token-mean": Σ_t m·L / (Σ_t m + 1e-8) per sequence (OpenRLHF aggregate_loss
      // token_level_loss=False likewise); TRL grpo: / clamp(Σ_t m, min=1)
      if (mode == aggregation::seq_mean_token_mean)
        w = ops::div(w, token_count_eps > 0 ? ops::add(tokens, token_count_eps) : ops::maximum(tokens, 1.0));
      return w;
    }
  }
  return mb;
}

/// Reduces a per-token loss [B, T] (or [N]) under `mask` to a 0-d tensor. Masked-out positions
/// are never read (NaN there is harmless). See `aggregation` for each mode's formula.
/// Example (OpenRLHF test): L = [[1,2,0],[3,4,5],[7,0,0]], M = [[1,1,0],[1,1,1],[1,0,0]],
/// token_mean -> 22/6 = 3.666667.
/// token_count_eps: see aggregation_weights (verl/OpenRLHF seq-mean-token-mean guard, 1e-8; default 0).
template <tensor T>
T aggregate(const T& loss, const T& mask, aggregation mode, std::optional<double> normalizer = std::nullopt,
            double token_count_eps = 0.0) {
  detail::require_values("aggregate", "loss", loss);
  detail::check_normalizer("aggregate", normalizer);  // named here, not by aggregation_weights below
  detail::check_token_count_eps("aggregate", "token_count_eps", token_count_eps);
  if (mode != aggregation::token_mean && mode != aggregation::sum)
    detail::require_rank("aggregate", "loss", loss, 2, 2);
  const T m = detail::checked_mask("aggregate", "loss", loss, "mask", mask);
  const T w = aggregation_weights(m, mode, normalizer, token_count_eps);
  return ops::sum_all(ops::mul(ops::where(m, loss, 0.0), w));
}

}  // namespace posttrain
