// posttrain/distributed/global.hpp — the statistics that span a batch, computed over every micro-batch
// of every data-parallel rank through a communicator (communicator.hpp), so that a data-parallel step
// with gradient accumulation computes what one process computes on the whole batch.
//
// Three kinds of global form:
//   1. counts       global_batch: built once per optimizer step from the masks of this rank's
//                   micro-batches; normalizer(mode) is the double every micro-batch's loss takes as its
//                   `normalizer` option, so that Σ over micro-batches and ranks of the losses (and of their
//                   gradients) is the single-process loss of the whole batch (HF blog #2414 "gradient
//                   accumulation"; TRL num_items_in_batch; verl's global token count and dp_size scaling).
//   2. sums         global_masked_sum/mean/var/whiten, global_mean_kl, global_metrics: an all-reduce of
//                   [Σ, count] (variance: two passes, the global mean first, then Σ m (x - mean)², as
//                   masked_var); equal to the single-process value up to summation order (1e-12 relative in
//                   double, float32 rounding in float).
//   3. gathers      group advantages (GRPO with group/batch/none scaling, Dr. GRPO, RLOO, OPO, GPG, pass@k,
//                   REINFORCE++-baseline, several reward columns) and the top-entropy quantile: the rows (or
//                   values) of every rank are all-gathered, the single-process function runs on the whole batch,
//                   and each rank keeps its slice. Exact by construction (the same inputs and the same code as one
//                   process), with group members anywhere: group ids are global, rows are ordered rank by rank.
//                   Clip-Cov / KL-Cov selection: global covariance means (an all-reduce), then the candidates'
//                   covariances gathered and the same pick run on every rank (global_cov_selection).
//   Selections made globally enter the losses as inputs: grpo_options / policy_variant_options
//   top_entropy_threshold (global_top_entropy_threshold) and policy_batch::cov_selection (global_cov_selection).
//
// Row order: "the whole batch" is the concatenation of rank 0's rows, then rank 1's, ...; within a rank,
// its micro-batches in order. Communication per optimizer step: global_batch 1 all-gather + 2 all-reduces
// (one host sync: the normaliser is a host double); each masked mean 1 all-reduce, a variance or whitening 2;
// a group advantage 3 all-gathers (lengths with an options hash, scores, ids; OPO a 4th, the lengths |o|; several
// reward columns a 4th, every column); the top-entropy threshold 2 all-gathers (lengths with a hash of q, values);
// Clip-Cov / KL-Cov 1 all-reduce and 2 all-gathers; global_metrics 1 all-gather (a hash of the names) and 1 all-reduce
// per kind used (mean, max, min). Each call also checks, through the same collectives, that its options agree across
// ranks (a hash), and throws posttrain::error naming the function when they differ.
//
// Global statistics are constants: nothing is differentiated through the communication (a global mean's
// gradient would need the other ranks' backward). Advantages are constants anyway; losses get their global
// scale through `normalizer`, whose gradient is then exactly the full batch's.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "posttrain/advantages/gae.hpp"
#include "posttrain/advantages/group.hpp"
#include "posttrain/detail/validate.hpp"
#include "posttrain/distributed/communicator.hpp"
#include "posttrain/losses/grpo.hpp"
#include "posttrain/losses/token_selection.hpp"
#include "posttrain/numerics/aggregate.hpp"
#include "posttrain/numerics/masked.hpp"
#include "posttrain/tensor.hpp"

namespace posttrain {

namespace detail {

/// A 1-D tensor like `like` (dtype, device) holding `values` (small vectors only: one full() per value).
template <tensor T>
T small_vector(const T& like, const std::vector<double>& values) {
  std::vector<T> parts;
  parts.reserve(values.size());
  for (double v : values) parts.push_back(ops::full(like, shape_t{1}, v));
  return ops::concat(parts, 0);
}

/// x [n] (1-D) -> element k as a 0-d tensor.
template <tensor T>
T element(const T& x, std::int64_t k) {
  return ops::reshape(ops::slice(x, 0, k, 1), shape_t{});
}

/// A small hash of option values (FNV-1a over their bit patterns), folded to [0, 2^20) so that it travels
/// exactly in a float32 tensor.
class options_hash {
 public:
  options_hash& add(double v) {
    if (v == 0) v = 0;  // -0 hashes as 0
    return mix(std::bit_cast<std::uint64_t>(v));
  }
  options_hash& add(std::int64_t v) { return mix(static_cast<std::uint64_t>(v)); }
  options_hash& add(bool v) { return mix(v ? 1u : 2u); }
  double value() const { return static_cast<double>((h_ ^ (h_ >> 20) ^ (h_ >> 40)) & ((1u << 20) - 1)); }

 private:
  options_hash& mix(std::uint64_t v) {
    for (int i = 0; i < 8; ++i) {
      h_ ^= (v >> (8 * i)) & 0xffu;
      h_ *= 0x100000001b3ULL;
    }
    return *this;
  }
  std::uint64_t h_ = 0xcbf29ce484222325ULL;
};

/// all_gather of [n, hash] from every rank (one collective): checks the result's shape, that every rank's
/// hash equals this rank's (else: `what` differs across ranks), and returns every rank's n.
template <tensor T>
std::vector<std::int64_t> gather_lengths(std::string_view fn, const communicator<T>& comm, const T& like,
                                         std::int64_t n, double hash, std::string_view what) {
  const int world = comm.world_size();
  const T all = comm.all_gather(small_vector(like, {double(n), hash}));
  if (ops::shape(all) != shape_t{2 * std::int64_t{world}})
    fail(fn, "comm.all_gather returned shape ", shape_string(ops::shape(all)), " for [2] per rank; expected [",
         2 * world, "] (", world, " ranks)");
  const auto v = ops::to_host(all);
  std::vector<std::int64_t> lengths(static_cast<std::size_t>(world));
  for (int r = 0; r < world; ++r) {
    const auto k = static_cast<std::size_t>(r);
    if (v[2 * k + 1] != hash)
      fail(fn, what, " differ across ranks: rank ", r, " hashes them to ", v[2 * k + 1], ", rank ", comm.rank(), " to ",
           hash, " (every rank must pass the same options)");
    lengths[k] = static_cast<std::int64_t>(v[2 * k]);
  }
  return lengths;
}

/// Sums non-negative integer counts (< 2^48) over ranks exactly in any float dtype: each count travels as four
/// base-2^12 limbs, whose sums stay below 2^24 (float32's exact integers) for up to 4096 ranks.
template <tensor T>
std::vector<double> exact_count_sum(std::string_view fn, const communicator<T>& comm, const T& like,
                                    const std::vector<double>& counts) {
  constexpr double base = 4096.0;
  std::vector<double> limbs;
  for (double c : counts) {
    if (!(c >= 0 && c < 0x1p48)) fail(fn, "a count ", c, " is outside [0, 2^48)");
    double rest = c;
    for (int k = 0; k < 4; ++k) {
      const double limb = std::fmod(rest, base);
      limbs.push_back(limb);
      rest = (rest - limb) / base;
    }
  }
  const T reduced = comm.all_reduce(small_vector(like, limbs), reduce_op::sum);
  if (ops::shape(reduced) != shape_t{static_cast<std::int64_t>(limbs.size())})
    fail(fn, "comm.all_reduce returned shape ", shape_string(ops::shape(reduced)), " for shape [", limbs.size(), "]");
  const auto v = ops::to_host(reduced);
  std::vector<double> out(counts.size());
  for (std::size_t i = 0; i < counts.size(); ++i)
    out[i] = ((v[4 * i + 3] * base + v[4 * i + 2]) * base + v[4 * i + 1]) * base + v[4 * i];
  return out;
}

/// all_reduce with a shape check (a communicator that returns another shape is a bug worth naming).
template <tensor T>
T checked_all_reduce(std::string_view fn, const communicator<T>& comm, const T& x, reduce_op op) {
  T out = comm.all_reduce(x, op);
  if (ops::shape(out) != ops::shape(x))
    fail(fn, "comm.all_reduce(", reduce_op_name(op), ") returned shape ", shape_string(ops::shape(out)), " for shape ",
         shape_string(ops::shape(x)));
  return out;
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------------------
// 1. Counts: the global batch and its normalisers
// ---------------------------------------------------------------------------------------------------------

/// How the trainer combines the ranks' gradients.
enum class gradient_sync {
  /// The ranks' gradients are summed (FSDP/DDP with the average turned off, or an explicit all-reduce sum):
  /// Σ over micro-batches and ranks of the losses is the full-batch loss. The definition; the default.
  sum,
  /// The ranks' gradients are averaged (PyTorch DDP's and FSDP's default all-reduce): every normaliser is
  /// divided by the world size, i.e. each rank's loss is multiplied by world, as verl does (dp_actor.py:
  /// `loss = ... * dp_size` under its global-token normalisation), so the averaged gradient is the full batch's.
  average,
};

struct global_batch_options {
  /// sum (default) or average: see gradient_sync.
  gradient_sync sync = gradient_sync::sum;
  /// seq_mean_token_sum_norm's (and dr_grpo's) L in B · L: TRL max_completion_length. Empty: the padded width of
  /// the whole batch, the largest width of any non-empty micro-batch of any rank (what one process padding the
  /// whole batch would use).
  std::optional<std::int64_t> max_completion_length = std::nullopt;
};

/// The counts of one optimizer step's whole batch (every micro-batch of every rank), and the normaliser each
/// aggregation mode needs. Build it once per step, before the micro-batches' forward passes:
///
///   posttrain::global_batch gb(masks, comm);              // masks: this rank's micro-batches, [B_i, T_i] each
///   for (i ...) loss_i = grpo_loss(batch_i, {.loss_type = dapo, .normalizer = gb.normalizer(grpo_loss_type::dapo)});
///
/// Σ_i Σ_ranks loss_i equals grpo_loss of the whole batch (and so do the gradients, once summed; with
/// gradient_sync::average, once averaged by DDP). A mask is 0/1 (non-zero keeps; any float or integer dtype, as
/// aggregate.hpp), rank 2; a micro-batch may have 0 rows ([0, T]) and a rank may have no kept token. Cost: one
/// host transfer of the local row counts, one all-gather (options hash) and two small all-reduces (counts as exact
/// 12-bit limbs in any dtype, widths by max), one host transfer.
class global_batch {
 public:
  template <tensor T>
  global_batch(const std::vector<T>& masks, const communicator<T>& comm, const global_batch_options& options = {})
      : options_(options) {
    constexpr std::string_view fn = "global_batch";
    world_ = detail::check_communicator(fn, comm).second;
    if (options.sync != gradient_sync::sum && options.sync != gradient_sync::average)
      detail::fail(fn, "options.sync must be gradient_sync::sum or gradient_sync::average, got ",
                   static_cast<int>(options.sync));
    if (options.max_completion_length && *options.max_completion_length <= 0)
      detail::fail(fn, "options.max_completion_length must be > 0, got ", *options.max_completion_length);
    if (masks.empty())
      detail::fail(fn, "masks is empty; pass at least one micro-batch mask (a [0, T] mask for a rank without rows)");
    std::vector<T> row_counts;
    std::int64_t width = 0;
    for (std::size_t i = 0; i < masks.size(); ++i) {
      const T& m = masks[i];
      const std::string name = "masks[" + std::to_string(i) + "]";
      const dtype d = ops::dtype_of(m);
      detail::require_data(fn, name, d, ops::device(m));
      if (!is_floating(d) && !is_integer(d) && d != dtype::boolean)
        detail::fail(fn, name, " must be a 0/1 mask of a floating, integer or bool dtype, got ", dtype_name(d));
      detail::require_rank(fn, name, m, 2, 2);
      if (i > 0) detail::require_same_device(fn, "masks[0]", masks[0], name, m);
      const std::int64_t rows = ops::size(m, 0);
      micro_rows_.push_back(double(rows));
      if (rows == 0) continue;
      width = std::max(width, ops::size(m, 1));
      const T mf = is_floating(d) ? m : ops::to_dtype(m, dtype::float32);
      row_counts.push_back(ops::sum(ops::ne(mf, 0.0), 1));  // [B_i] kept tokens per row (exact: T < 2^24)
    }
    // the local counts, per micro-batch, from one host transfer
    std::vector<double> per_row;
    if (!row_counts.empty()) per_row = ops::to_host(ops::concat(row_counts, 0));
    std::size_t at = 0;
    double tokens = 0, seqs = 0, rows = 0;
    for (double r : micro_rows_) {
      double t = 0, s = 0;
      for (std::size_t k = 0; k < static_cast<std::size_t>(r); ++k, ++at) t += per_row[at], s += per_row[at] > 0;
      micro_tokens_.push_back(t);
      micro_sequences_.push_back(s);
      tokens += t, seqs += s, rows += r;
    }
    local_ = {tokens, seqs, rows};
    // a float like masks[0] carries the collectives (the communicator's tensor type)
    // float32 or wider (a half mask would round the hash and the limbs)
    const T like = ops::full(
        is_floating(ops::dtype_of(masks[0])) ? ops::upcast(masks[0]) : ops::to_dtype(masks[0], dtype::float32),
        shape_t{}, 0.0);
    detail::options_hash h;
    h.add(static_cast<std::int64_t>(options.sync)).add(options.max_completion_length.value_or(-1));
    (void)detail::gather_lengths(fn, comm, like, 0, h.value(), "the options (sync, max_completion_length)");
    const auto total = detail::exact_count_sum(fn, comm, like, {tokens, seqs, rows});
    tokens_ = total[0], sequences_ = total[1], rows_ = total[2];
    const T w = detail::checked_all_reduce(fn, comm, ops::full(like, shape_t{1}, double(width)), reduce_op::max);
    max_length_ = static_cast<std::int64_t>(ops::item(w));
  }

  /// Kept tokens of the whole batch (Σ over micro-batches and ranks).
  double tokens() const { return tokens_; }
  /// Rows with at least one kept token, whole batch (seq-mean modes divide by it).
  double sequences() const { return sequences_; }
  /// Rows of the whole batch, empty ones included (TRL's .mean() over rows; luspo).
  double rows() const { return rows_; }
  /// The padded width of the whole batch: the largest width of a non-empty micro-batch of any rank.
  std::int64_t max_length() const { return max_length_; }
  int world_size() const { return world_; }
  /// This rank's {tokens, sequences, rows}.
  std::vector<double> local_counts() const { return local_; }
  /// Per micro-batch of this rank, in the order given: kept tokens, non-empty rows, rows (metric weights).
  const std::vector<double>& micro_batch_tokens() const { return micro_tokens_; }
  const std::vector<double>& micro_batch_sequences() const { return micro_sequences_; }
  const std::vector<double>& micro_batch_rows() const { return micro_rows_; }

  /// The `normalizer` option of every micro-batch's loss under `mode` (aggregate.hpp), so that the losses summed
  /// over micro-batches and ranks equal aggregate(loss, mask, mode) of the whole batch:
  ///   token_mean                                  tokens()                        (verl/TRL global token count)
  ///   seq_mean_token_sum, seq_mean_token_mean     sequences()                     (rows with a token)
  ///   seq_mean_token_sum_norm                     rows() · L, L = options.max_completion_length or max_length()
  ///   sum                                         1
  /// each at least 1 (an all-masked batch has loss 0 either way), divided by world_size() under
  /// gradient_sync::average.
  double normalizer(aggregation mode) const {
    double n = 1.0;
    switch (mode) {
      case aggregation::token_mean: n = tokens_; break;
      case aggregation::seq_mean_token_sum:
      case aggregation::seq_mean_token_mean: n = sequences_; break;
      case aggregation::seq_mean_token_sum_norm:
        n = std::max(rows_, 1.0) *
            double(options_.max_completion_length.value_or(std::max<std::int64_t>(max_length_, 1)));
        break;
      case aggregation::sum: n = 1.0; break;
      default: detail::fail("global_batch::normalizer", "mode ", static_cast<int>(mode), " is not an aggregation");
    }
    return scaled(std::max(n, 1.0));
  }

  /// grpo_options::normalizer for a GRPO preset (grpo.hpp): dapo/bnpo/cispo/vespo the token count (bnpo's
  /// "local batch" is then the whole batch), grpo/sapo the non-empty rows (every row with count_empty_rows, as
  /// TRL), dr_grpo rows · L, luspo the rows.
  double normalizer(grpo_loss_type type, bool count_empty_rows = false) const {
    switch (type) {
      case grpo_loss_type::grpo:
      case grpo_loss_type::sapo:
        return count_empty_rows ? scaled(std::max(rows_, 1.0)) : normalizer(aggregation::seq_mean_token_mean);
      case grpo_loss_type::luspo: return scaled(std::max(rows_, 1.0));
      default: return normalizer(grpo_aggregation(type));
    }
  }

 private:
  double scaled(double n) const { return options_.sync == gradient_sync::average ? n / double(world_) : n; }

  global_batch_options options_;
  int world_ = 1;
  double tokens_ = 0, sequences_ = 0, rows_ = 0;
  std::int64_t max_length_ = 0;
  std::vector<double> local_, micro_tokens_, micro_sequences_, micro_rows_;
};

// ---------------------------------------------------------------------------------------------------------
// 2. Sums: masked mean / variance / whitening, the controller's KL, metrics
// ---------------------------------------------------------------------------------------------------------

namespace detail {
/// [Σ m·x, Σ m] of this rank as a [2] tensor (x may be empty: a rank without rows).
template <tensor T>
T local_sum_count(const T& x, const T& m) {
  const T zero = ops::full(x, shape_t{1}, 0.0);
  if (ops::numel(x) == 0) return ops::concat(std::vector<T>{zero, zero}, 0);
  return ops::concat(std::vector<T>{ops::reshape(ops::sum_all(ops::where(m, x, 0.0)), shape_t{1}),
                                    ops::reshape(ops::sum_all(m), shape_t{1})},
                     0);
}
template <tensor T>
T global_checked_mask(std::string_view fn, const T& x, const T& mask) {
  require_floating(fn, "x", x);
  return ops::ne(checked_mask(fn, "x", x, "mask", mask), 0.0);
}
/// {global Σ m·x, global n} as 0-d tensors.
template <tensor T>
std::pair<T, T> global_sum_count(std::string_view fn, const communicator<T>& comm, const T& x, const T& m) {
  const T g = checked_all_reduce(fn, comm, local_sum_count(x, m), reduce_op::sum);
  return {element(g, 0), element(g, 1)};
}
template <tensor T>
T global_mean_of(std::string_view fn, const communicator<T>& comm, const T& x, const T& m, const masked_options& o) {
  const auto [total, count] = global_sum_count(fn, comm, x, m);
  return ops::div(total, mean_divisor(count, o));
}
/// masked_var's formula with global sums: mean first (one all-reduce), then Σ m (x - mean)² (another).
template <tensor T>
T global_var_of(std::string_view fn, const communicator<T>& comm, const T& x, const T& m, bool unbiased,
                const masked_options& o) {
  const auto [total, count] = global_sum_count(fn, comm, x, m);
  const T mean = ops::div(total, mean_divisor(count, o));
  const T ss =
      element(checked_all_reduce(
                  fn, comm,
                  ops::numel(x) == 0
                      ? ops::full(x, shape_t{1}, 0.0)
                      : ops::reshape(ops::sum_all(ops::square(ops::where(m, ops::sub(x, mean), 0.0))), shape_t{1}),
                  reduce_op::sum),
              0);
  if (o.count_eps > 0) {  // verl masked_var: both means over n + 1e-8, then · n / (n - 1)
    const T var = ops::div(ss, ops::add(count, o.count_eps));
    return unbiased ? ops::mul(var, ops::div(count, ops::maximum(ops::sub(count, 1.0), 1.0))) : var;
  }
  return ops::div(ss, unbiased ? ops::maximum(ops::sub(count, 1.0), 1.0) : ops::maximum(count, 1.0));
}
}  // namespace detail

/// masked_sum over every rank: Σ x over the kept positions of every rank's x (0-d). x, mask: this rank's part
/// (same shape; may be empty). One all-reduce.
template <tensor T>
T global_masked_sum(const T& x, const T& mask, const communicator<T>& comm) {
  constexpr std::string_view fn = "global_masked_sum";
  detail::check_communicator(fn, comm);
  const T m = detail::global_checked_mask(fn, x, mask);
  return detail::global_sum_count(fn, comm, x, m).first;
}

/// masked_mean (masked.hpp) over the positions every rank keeps: Σ x / max(n, 1) (or / (n + count_eps), verl),
/// n the global count. 0-d. One all-reduce of [Σ, n]. A rank may keep nothing or hold an empty x.
template <tensor T>
T global_masked_mean(const T& x, const T& mask, const communicator<T>& comm, const masked_options& options = {}) {
  constexpr std::string_view fn = "global_masked_mean";
  detail::check_communicator(fn, comm);
  detail::check_count_eps(fn, "options.count_eps", options.count_eps);
  const T m = detail::global_checked_mask(fn, x, mask);
  return detail::global_mean_of(fn, comm, x, m, options);
}

/// masked_var (masked.hpp) over every rank, two-pass: the global mean first, then Σ m (x - mean)² over every
/// rank, divided as masked_var (n - 1 unbiased, n biased; verl's count_eps form). 0-d. Two all-reduces.
template <tensor T>
T global_masked_var(const T& x, const T& mask, const communicator<T>& comm, bool unbiased = true,
                    const masked_options& options = {}) {
  constexpr std::string_view fn = "global_masked_var";
  detail::check_communicator(fn, comm);
  detail::check_count_eps(fn, "options.count_eps", options.count_eps);
  const T m = detail::global_checked_mask(fn, x, mask);
  return detail::global_var_of(fn, comm, x, m, unbiased, options);
}

/// masked_whiten (masked.hpp) with the mean and variance of every rank's kept positions (batch-wide whitening
/// of advantages: GAE, REINFORCE++): this rank's x whitened, every whiten_options field as masked_whiten.
/// One all-reduce (scale = false) or two.
template <tensor T>
T global_masked_whiten(const T& x, const T& mask, const communicator<T>& comm, whiten_options opt = {}) {
  constexpr std::string_view fn = "global_masked_whiten";
  detail::check_communicator(fn, comm);
  detail::check_whiten_options(fn, "options.", opt);
  const T m = detail::global_checked_mask(fn, x, mask);
  const masked_options count{.count_eps = opt.count_eps};
  const T mean = detail::global_mean_of(fn, comm, x, m, count);
  if (ops::numel(x) == 0) {
    if (opt.scale) (void)detail::global_var_of(fn, comm, x, m, opt.unbiased, count);  // the other ranks' 2nd pass
    return x;
  }
  T w = ops::sub(x, mean);
  if (opt.scale) {
    const T var = detail::global_var_of(fn, comm, x, m, opt.unbiased, count);
    // TRL/verl masked_whiten: (x - μ)·rsqrt(var + 1e-8); OpenRLHF: (x - μ)·rsqrt(max(var, 1e-8))
    const T guarded = opt.guard == variance_guard::add ? ops::add(var, opt.eps) : ops::maximum(var, opt.eps);
    w = ops::div(w, ops::sqrt(guarded));
  }
  if (opt.keep_mean) w = ops::add(w, mean);
  switch (opt.outside) {
    case whiten_outside::zero: return ops::where(m, w, 0.0);
    case whiten_outside::whitened: return w;
    case whiten_outside::keep: return ops::where(m, w, x);
  }
  return w;
}

/// The KL a KL controller (kl/controller.hpp) measures, over every rank's rows, as a host double:
///   token_mean            Σ m·kl / Σ m                                   (OpenRLHF's per-token mean)
///   seq_mean_token_mean   mean over rows with a token of the row's token mean  (verl apply_kl_penalty:
///                         masked_mean(kld, mask, axis=-1), then the mean over rows)
///   seq_mean_token_sum    mean over rows with a token of Σ_t m·kl         (legacy TRL PPOTrainer: kl.sum(1).mean())
/// kl, mask [B, T] of this rank. verl and TRL take the mean over every row, empty rows (KL 0) included: with
/// empty rows the value here is larger by rows / non-empty rows. Then ctl.update(value, n_steps) with n_steps the
/// global row count (global_batch::rows(); verl passes the batch size). One all-reduce and one host transfer.
template <tensor T>
double global_mean_kl(const T& kl, const T& mask, const communicator<T>& comm,
                      aggregation mode = aggregation::seq_mean_token_mean) {
  constexpr std::string_view fn = "global_mean_kl";
  detail::check_communicator(fn, comm);
  if (mode != aggregation::token_mean && mode != aggregation::seq_mean_token_mean &&
      mode != aggregation::seq_mean_token_sum)
    detail::fail(fn, "mode must be token_mean, seq_mean_token_mean or seq_mean_token_sum, got ",
                 aggregation_name(mode));
  detail::require_floating(fn, "kl", kl);
  detail::require_rank(fn, "kl", kl, 2, 2);
  const T m = detail::global_checked_mask(fn, kl, mask);
  T local = ops::full(kl, shape_t{2}, 0.0);
  if (ops::numel(kl) > 0) {
    // Σ of the per-row (or per-token) terms, unnormalised (normalizer 1), and the count they are averaged over
    const T num = aggregate(kl, m, mode, 1.0);
    const T count = mode == aggregation::token_mean ? ops::sum_all(m) : ops::sum_all(ops::gt(ops::sum(m, 1), 0.0));
    local = ops::concat(std::vector<T>{ops::reshape(num, shape_t{1}), ops::reshape(count, shape_t{1})}, 0);
  }
  const auto g = ops::to_host(detail::checked_all_reduce(fn, comm, local, reduce_op::sum));
  return g[0] / std::max(g[1], 1.0);
}

/// Logged metrics of the whole batch from the per-micro-batch values of every rank. Each metric is added once per
/// micro-batch with how it combines:
///   add_mean(name, value, weight)  Σ w·v / Σ w over micro-batches and ranks: a result's masked-mean metric
///                                  (clip fractions, approx_kl, entropy, ratio_mean, kl) weighted by that
///                                  micro-batch's kept tokens (global_batch::micro_batch_tokens()[i]) equals the
///                                  same metric of the whole batch; a per-row mean weighted by its rows.
///   add_max / add_min(name, value) the largest / smallest (TRL clip_ratio/high_max, low_min; is_ratio max/min).
/// reduce(comm) returns name -> value from three all-reduces (sum, max, min) and one host transfer; every rank
/// must add the same names (checked with an options hash). The values are 0-d tensors; nothing syncs before reduce.
template <tensor T>
class global_metrics {
 public:
  void add_mean(const std::string& name, const T& value, double weight) {
    detail::require_finite("global_metrics::add_mean", "weight", weight);
    if (weight < 0) detail::fail("global_metrics::add_mean", "weight must be >= 0, got ", weight, " for ", name);
    check_value("global_metrics::add_mean", name, value, kind::mean);
    const T wv = ops::reshape(ops::mul(ops::upcast(ops::detach(value)), weight), shape_t{1});
    auto& e = means_[name];
    e.first = e.first ? ops::add(*e.first, wv) : wv;
    e.second += weight;
  }
  void add_max(const std::string& name, const T& value) { add_extreme(name, value, kind::max); }
  void add_min(const std::string& name, const T& value) { add_extreme(name, value, kind::min); }

  std::map<std::string, double> reduce(const communicator<T>& comm) const {
    constexpr std::string_view fn = "global_metrics::reduce";
    detail::check_communicator(fn, comm);
    if (means_.empty() && max_.empty() && min_.empty()) detail::fail(fn, "no metric was added");
    const T& like = any_value();
    detail::options_hash h;
    for (const auto& [name, k] : kinds_) {
      for (char c : name) h.add(static_cast<std::int64_t>(c));
      h.add(static_cast<std::int64_t>(k));
    }
    (void)detail::gather_lengths(fn, comm, like, 0, h.value(), "the metric names");
    std::map<std::string, double> out;
    if (!means_.empty()) {
      std::vector<T> parts;
      for (const auto& [name, e] : means_)
        parts.push_back(*e.first), parts.push_back(ops::full(like, shape_t{1}, e.second));
      const auto v = ops::to_host(detail::checked_all_reduce(fn, comm, ops::concat(parts, 0), reduce_op::sum));
      std::size_t k = 0;
      for (const auto& [name, e] : means_) out[name] = v[2 * k + 1] > 0 ? v[2 * k] / v[2 * k + 1] : 0.0, ++k;
    }
    reduce_extreme(fn, comm, max_, reduce_op::max, out);
    reduce_extreme(fn, comm, min_, reduce_op::min, out);
    return out;
  }

 private:
  enum class kind { mean, max, min };
  void check_value(std::string_view fn, const std::string& name, const T& value, kind k) {
    detail::require_floating(fn, "value", value);
    if (ops::numel(value) != 1)
      detail::fail(fn, "value of ", name, " must have one element, got shape ",
                   detail::shape_string(ops::shape(value)));
    const auto [it, fresh] = kinds_.emplace(name, k);
    if (!fresh && it->second != k) detail::fail(fn, name, " was added before with another combination");
  }
  void add_extreme(const std::string& name, const T& value, kind k) {
    const std::string_view fn = k == kind::max ? "global_metrics::add_max" : "global_metrics::add_min";
    check_value(fn, name, value, k);
    const T v = ops::reshape(ops::upcast(ops::detach(value)), shape_t{1});
    auto& slot = (k == kind::max ? max_ : min_)[name];
    slot = !slot ? v : (k == kind::max ? ops::maximum(*slot, v) : ops::minimum(*slot, v));
  }
  const T& any_value() const {
    if (!means_.empty()) return *means_.begin()->second.first;
    if (!max_.empty()) return *max_.begin()->second;
    return *min_.begin()->second;
  }
  static void reduce_extreme(std::string_view fn, const communicator<T>& comm,
                             const std::map<std::string, std::optional<T>>& m, reduce_op op,
                             std::map<std::string, double>& out) {
    if (m.empty()) return;
    std::vector<T> parts;
    for (const auto& [name, v] : m) parts.push_back(*v);
    const auto v = ops::to_host(detail::checked_all_reduce(fn, comm, ops::concat(parts, 0), op));
    std::size_t k = 0;
    for (const auto& [name, value] : m) out[name] = v[k++];
  }

  std::map<std::string, kind> kinds_;
  std::map<std::string, std::pair<std::optional<T>, double>> means_;
  std::map<std::string, std::optional<T>> max_, min_;
};

// ---------------------------------------------------------------------------------------------------------
// 3. Gathers: group advantages, the top-entropy quantile, Clip-Cov / KL-Cov selection
// ---------------------------------------------------------------------------------------------------------

namespace detail {

/// Every rank's scores [n_r] and group ids, concatenated in rank order, and this rank's [offset, offset + n).
template <tensor T>
struct gathered_rows {
  T scores;
  index_tensor_t<T> group_index;
  std::int64_t offset = 0, count = 0;
};

template <tensor T>
gathered_rows<T> gather_rows(std::string_view fn, const communicator<T>& comm, const T& scores,
                             const index_tensor_t<T>& group_index, double options_hash_value) {
  using tr = tensor_traits<T>;
  const auto [rank, world] = check_communicator(fn, comm);
  require_floating(fn, "scores", scores);
  require_rank(fn, "scores", scores, 1, 1);
  require_index<T>(fn, "group_index", group_index);
  const std::int64_t n = ops::size(scores, 0);
  if (tr::index_shape(group_index) != shape_t{n})
    fail(fn, "group_index has shape ", shape_string(tr::index_shape(group_index)), " but scores has shape ",
         shape_string(ops::shape(scores)), "; expected one group id per row, shape [", n, "]");
  const auto lengths =
      gather_lengths(fn, comm, ops::full(ops::upcast(scores), shape_t{}, 0.0), n, options_hash_value, "the options");
  std::int64_t offset = 0, total = 0;
  for (int r = 0; r < world; ++r) {
    if (r < rank) offset += lengths[static_cast<std::size_t>(r)];
    total += lengths[static_cast<std::size_t>(r)];
  }
  if (total == 0) fail(fn, "every rank's scores is empty (no row in the whole batch)");
  gathered_rows<T> g{comm.all_gather(scores), comm.all_gather_index(group_index), offset, n};
  if (ops::shape(g.scores) != shape_t{total})
    fail(fn, "comm.all_gather returned shape ", shape_string(ops::shape(g.scores)), " for scores; expected [", total,
         "] (the ranks' lengths summed)");
  if (tr::index_shape(g.group_index) != shape_t{total})
    fail(fn, "comm.all_gather_index returned shape ", shape_string(tr::index_shape(g.group_index)),
         " for group_index; expected [", total, "]");
  return g;
}

template <tensor T>
T my_rows(const gathered_rows<T>& g, const T& x) {
  return ops::slice(x, 0, g.offset, g.count);
}

inline double hash_group_options(const group_options& o) {
  options_hash h;
  h.add(static_cast<std::int64_t>(o.scale)).add(o.eps).add(o.std_floor.value_or(-1.0));
  h.add(static_cast<std::int64_t>(o.singleton)).add(static_cast<std::int64_t>(o.all_equal));
  return h.value();
}
inline double hash_of(std::int64_t a, double b = 0, double c = 0) {
  options_hash h;
  h.add(a).add(b).add(c);
  return h.value();
}

}  // namespace detail

/// grpo_advantages (group.hpp) of the whole batch, this rank's rows: scores [n] and group_index [n] of this
/// rank (n may be 0), group ids global (one prompt = one id on every rank), group members on any rank. The per-row
/// fields (advantages, group_mean, group_std) are this rank's slice; the 0-d fields are whole-batch scalars.
/// Covers group / batch / none scaling (none = Dr. GRPO's advantage) and every option. Three all-gathers; exact (the
/// single-process function on the gathered batch).
template <tensor T>
group_advantage_result<T> global_grpo_advantages(const T& scores, const index_tensor_t<T>& group_index,
                                                 const communicator<T>& comm, const group_options& opt = {}) {
  constexpr std::string_view fn = "global_grpo_advantages";
  detail::check_group_options(fn, opt);
  const auto g = detail::gather_rows(fn, comm, scores, group_index, detail::hash_group_options(opt));
  // the per-row fields become this rank's rows; the whole-batch scalars (frac_reward_zero_std ...) stay as they are
  auto out = grpo_advantages(g.scores, g.group_index, opt);
  out.advantages = detail::my_rows(g, out.advantages);
  out.group_mean = detail::my_rows(g, out.group_mean);
  out.group_std = detail::my_rows(g, out.group_std);
  return out;
}

/// rloo_advantages (group.hpp) over the whole batch, this rank's rows [n]. Three all-gathers; exact.
template <tensor T>
T global_rloo_advantages(const T& scores, const index_tensor_t<T>& group_index, const communicator<T>& comm,
                         singleton_policy singleton = singleton_policy::zero) {
  const auto g = detail::gather_rows("global_rloo_advantages", comm, scores, group_index,
                                     detail::hash_of(static_cast<std::int64_t>(singleton)));
  return detail::my_rows(g, rloo_advantages(g.scores, g.group_index, singleton));
}

/// gpg_advantages (group.hpp) over the whole batch (α = B / #(r ≠ 0) of the whole batch), this rank's rows.
template <tensor T>
T global_gpg_advantages(const T& scores, const index_tensor_t<T>& group_index, const communicator<T>& comm,
                        double f_norm = 1.0, singleton_policy singleton = singleton_policy::zero) {
  const auto g = detail::gather_rows("global_gpg_advantages", comm, scores, group_index,
                                     detail::hash_of(static_cast<std::int64_t>(singleton), f_norm));
  return detail::my_rows(g, gpg_advantages(g.scores, g.group_index, f_norm, singleton));
}

/// grpo_passk_advantages (group.hpp) over the whole batch, this rank's rows.
template <tensor T>
T global_grpo_passk_advantages(const T& scores, const index_tensor_t<T>& group_index, const communicator<T>& comm,
                               bool scale_by_std = true, double eps = 1e-6) {
  const auto g = detail::gather_rows("global_grpo_passk_advantages", comm, scores, group_index,
                                     detail::hash_of(scale_by_std ? 1 : 2, eps));
  return detail::my_rows(g, grpo_passk_advantages(g.scores, g.group_index, scale_by_std, eps));
}

/// opo_advantages (group.hpp; verl compute_opo_outcome_advantage) over the whole batch: this rank's scores [n],
/// response_mask [n, T_r] (widths may differ across ranks) and group ids. The lengths |o| = Σ_t mask are gathered
/// with the scores (a fourth all-gather); the baseline Σ_g |o| r / Σ_g |o| is opo_advantages' formula.
template <tensor T>
T global_opo_advantages(const T& scores, const T& response_mask, const index_tensor_t<T>& group_index,
                        const communicator<T>& comm, singleton_policy singleton = singleton_policy::zero) {
  constexpr std::string_view fn = "global_opo_advantages";
  detail::require_rank(fn, "response_mask", response_mask, 2, 2);
  detail::require_floating(fn, "scores", scores);
  detail::require_rank(fn, "scores", scores, 1, 1);
  if (ops::size(response_mask, 0) != ops::size(scores, 0))
    detail::fail(fn, "response_mask has shape ", detail::shape_string(ops::shape(response_mask)),
                 " but scores has shape ", detail::shape_string(ops::shape(scores)), "; expected ",
                 ops::size(scores, 0), " rows");
  const auto g =
      detail::gather_rows(fn, comm, scores, group_index, detail::hash_of(static_cast<std::int64_t>(singleton)));
  const T s_local = ops::upcast(scores);
  const T len_local = ops::numel(response_mask) == 0
                          ? ops::full(s_local, shape_t{ops::size(scores, 0)}, 0.0)
                          : ops::sum(ops::ne(ops::to_dtype(response_mask, ops::dtype_of(s_local)), 0.0), 1);  // [n] |o|
  const T len = comm.all_gather(len_local);
  if (ops::shape(len) != ops::shape(g.scores))
    detail::fail(fn, "comm.all_gather returned shape ", detail::shape_string(ops::shape(len)),
                 " for the response lengths; expected ", detail::shape_string(ops::shape(g.scores)));
  const T s = detail::checked_scores(fn, g.scores);
  const auto st = detail::compute_group_stats(fn, s, g.group_index);
  // opo_advantages: r - Σ_g |o| r / Σ_g |o|, shifted by p_g (a group without tokens keeps A = r)
  const T lsum = detail::per_group_sum(st.onehot, len);
  const T baseline = ops::div(detail::per_group_sum(st.onehot, ops::mul(len, st.shifted)), ops::maximum(lsum, 1e-30));
  const T adv = ops::where(ops::gt(lsum, 0.0), ops::sub(st.shifted, baseline), s);
  return detail::my_rows(g, detail::apply_group_policies(adv, s, st, singleton, all_equal_policy::formula));
}

/// reinforce_pp_advantages (group.hpp; REINFORCE++): discounted returns of this rank's rows, whitened with the
/// mean and variance of every rank's kept tokens (global_masked_whiten). [n, T] -> [n, T]; n may be 0.
template <tensor T>
T global_reinforce_pp_advantages(const T& token_level_rewards, const T& response_mask, const communicator<T>& comm,
                                 double gamma = 1.0, whiten_options whitening = {}) {
  detail::check_whiten_options("global_reinforce_pp_advantages", "whitening.", whitening);
  // a rank without rows ([0, T]) still joins the whitening's collectives
  const T g = ops::numel(token_level_rewards) == 0 ? ops::upcast(token_level_rewards)
                                                   : discounted_returns(token_level_rewards, response_mask, gamma);
  return global_masked_whiten(g, ops::ne(ops::to_dtype(response_mask, ops::dtype_of(g)), 0.0), comm, whitening);
}

/// reinforce_pp_baseline_advantages (group.hpp, verl's order): the row sums of token_level_rewards centred by
/// their group mean over the whole batch, broadcast to the kept tokens, whitened over every rank's kept tokens.
/// [n, T] -> [n, T]; a rank may hold no row ([0, T]) or no kept token.
template <tensor T>
T global_reinforce_pp_baseline_advantages(const T& token_level_rewards, const T& response_mask,
                                          const index_tensor_t<T>& group_index, const communicator<T>& comm,
                                          singleton_policy singleton = singleton_policy::raw,
                                          whiten_options whitening = {}) {
  constexpr std::string_view fn = "global_reinforce_pp_baseline_advantages";
  detail::check_whiten_options(fn, "whitening.", whitening);
  detail::require_floating(fn, "token_level_rewards", token_level_rewards);
  detail::require_rank(fn, "token_level_rewards", token_level_rewards, 2, 2);
  const T r = ops::upcast(token_level_rewards);
  const T m = ops::ne(
      ops::upcast(detail::checked_mask(fn, "token_level_rewards", token_level_rewards, "response_mask", response_mask)),
      0.0);
  const T row_sums = ops::numel(r) == 0 ? ops::full(r, shape_t{ops::size(r, 0)}, 0.0) : ops::sum(r, 1);
  const auto g =
      detail::gather_rows(fn, comm, row_sums, group_index, detail::hash_of(static_cast<std::int64_t>(singleton)));
  const T s = g.scores;
  const auto st = detail::compute_group_stats(fn, s, g.group_index);
  const T centred =
      detail::my_rows(g, detail::apply_group_policies(st.centred, s, st, singleton, all_equal_policy::formula));
  return global_masked_whiten(ops::where(m, ops::unsqueeze(centred, 1), 0.0), m, comm, whitening);
}

/// grpo_advantages_multi (group.hpp; TRL multi_objective_aggregation) over the whole batch, this rank's rows:
/// rewards [n, K] of this rank (n may be 0; K the same on every rank), weights (K values), group ids global. Every
/// reward column of every rank is gathered (one all-gather of the [n·K] rewards after gather_rows' three), the
/// single-process function runs on the whole batch ([N, K], rows rank by rank) and each rank keeps its rows [n].
/// Covers every mode, normalize_then_sum_batch's batch statistics included. Exact (the same function on the same
/// batch).
template <tensor T>
T global_grpo_advantages_multi(const T& rewards, const std::vector<double>& weights,
                               const index_tensor_t<T>& group_index, const communicator<T>& comm,
                               multi_reward mode = multi_reward::sum_then_normalize, const group_options& opt = {}) {
  constexpr std::string_view fn = "global_grpo_advantages_multi";
  detail::check_group_options(fn, opt);
  detail::require_floating(fn, "rewards", rewards);
  detail::require_rank(fn, "rewards", rewards, 2, 2);
  const std::int64_t n = ops::size(rewards, 0), K = ops::size(rewards, 1);
  if (K < 1)
    detail::fail(fn, "rewards must have at least one column, got shape ", detail::shape_string(ops::shape(rewards)));
  if (static_cast<std::int64_t>(weights.size()) != K)
    detail::fail(fn, "weights has ", weights.size(), " entries but rewards has K = ", K, " columns (shape ",
                 detail::shape_string(ops::shape(rewards)), ")");
  if (mode != multi_reward::sum_then_normalize && mode != multi_reward::normalize_then_sum &&
      mode != multi_reward::normalize_then_sum_batch)
    detail::fail(fn, "mode must be a multi_reward, got ", static_cast<int>(mode));
  detail::options_hash h;
  h.add(static_cast<std::int64_t>(mode)).add(K).add(detail::hash_group_options(opt));
  for (double w : weights) h.add(w);
  const T r = ops::upcast(rewards);
  // column 0 travels with the ids (gather_rows: lengths + options hash, scores, ids), then every column at once
  const auto g =
      detail::gather_rows(fn, comm, ops::reshape(ops::slice(r, 1, 0, 1), shape_t{n}), group_index, h.value());
  const std::int64_t N = ops::size(g.scores, 0);
  const T all = comm.all_gather(ops::reshape(r, shape_t{n * K}));  // [N·K], row-major rows rank by rank
  if (ops::shape(all) != shape_t{N * K})
    detail::fail(fn, "comm.all_gather returned shape ", detail::shape_string(ops::shape(all)),
                 " for the rewards; expected [", N * K, "] (", N, " rows of ", K, " rewards)");
  return detail::my_rows(g, grpo_advantages_multi(ops::reshape(all, shape_t{N, K}), weights, g.group_index, mode, opt));
}

/// The threshold of TRL's top-entropy mask over the whole batch: quantile_{1-q} (linear, torch.quantile) of the
/// valid entropies of every micro-batch of every rank (entropies[i], masks[i]: this rank's micro-batch i, any
/// shape, the two alike; a micro-batch may be empty). Pass it as grpo_options / policy_variant_options
/// top_entropy_threshold to every micro-batch's loss: each then keeps the tokens TRL's get_high_entropy_mask keeps
/// on the whole batch (H ≥ threshold and valid). Two all-gathers (the lengths with a hash of q, then the
/// entropies, masked-out ones sent as NaN and dropped) and one host transfer; 0 when no rank has a valid token (nothing
/// to keep then anyway).
template <tensor T>
double global_top_entropy_threshold(const std::vector<T>& entropies, const std::vector<T>& masks, double top_quantile,
                                    const communicator<T>& comm) {
  constexpr std::string_view fn = "global_top_entropy_threshold";
  detail::check_communicator(fn, comm);
  if (!(top_quantile >= 0 && top_quantile <= 1)) detail::fail(fn, "top_quantile must be in [0, 1], got ", top_quantile);
  if (entropies.empty()) detail::fail(fn, "entropies is empty; pass at least one micro-batch (an empty one is fine)");
  if (masks.size() != entropies.size())
    detail::fail(fn, "masks has ", masks.size(), " micro-batches but entropies has ", entropies.size());
  std::vector<T> flats;
  for (std::size_t i = 0; i < entropies.size(); ++i) {
    const std::string e_name = "entropies[" + std::to_string(i) + "]", m_name = "masks[" + std::to_string(i) + "]";
    detail::require_floating(fn, e_name, entropies[i]);
    const T H = ops::upcast(entropies[i]);
    const T m = ops::ne(ops::upcast(detail::checked_mask(fn, e_name, entropies[i], m_name, masks[i])), 0.0);
    flats.push_back(ops::reshape(ops::where(m, H, std::numeric_limits<double>::quiet_NaN()), shape_t{ops::numel(H)}));
  }
  const T local = ops::concat(flats, 0);
  // every rank's length with a hash of q (a rank asking for another quantile is an error, not a hang)
  const auto lengths = detail::gather_lengths(fn, comm, ops::full(local, shape_t{}, 0.0), ops::numel(local),
                                              detail::hash_of(0, top_quantile), "the top_quantile values");
  std::int64_t total = 0;
  for (auto n : lengths) total += n;
  const T gathered = comm.all_gather(local);
  if (ops::shape(gathered) != shape_t{total})
    detail::fail(fn, "comm.all_gather returned shape ", detail::shape_string(ops::shape(gathered)),
                 " for the entropies; expected [", total, "] (the ranks' lengths summed)");
  const auto all = ops::to_host(gathered);
  std::vector<double> valid;
  for (double v : all)
    if (!std::isnan(v)) valid.push_back(v);
  // torch.quantile(H[valid], 1 - q) over the whole batch (token_selection.hpp's linear_quantile)
  return detail::linear_quantile(std::move(valid), 1.0 - top_quantile);
}

/// top_entropy_mask (token_selection.hpp; TRL get_high_entropy_mask) with the quantile of every rank's valid
/// entropies: 1 where this rank's entropies ≥ quantile_{1-q}(H over every rank's valid tokens) and the token is
/// valid. Two all-gathers (global_top_entropy_threshold).
template <tensor T>
T global_top_entropy_mask(const T& entropies, const T& mask, double top_quantile, const communicator<T>& comm) {
  const double thr = global_top_entropy_threshold(std::vector<T>{entropies}, std::vector<T>{mask}, top_quantile, comm);
  const T H = ops::upcast(entropies);
  if (ops::numel(H) == 0) return H;
  const T m =
      ops::ne(ops::upcast(detail::checked_mask("global_top_entropy_mask", "entropies", entropies, "mask", mask)), 0.0);
  return detail::top_entropy_keep_at(H, m, thr);
}

/// Clip-Cov / KL-Cov's token selection (policy_variants.hpp, token_selection.hpp; verl compute_policy_loss_clip_cov
/// / _kl_cov) over the whole batch: every micro-batch of every rank. micro_batches: this rank's, in order (logprobs,
/// advantages, response_mask, old_logprobs as the loss gets them; a [0, T] one is fine; entropies etc. unused).
/// Returns one 0/1 tensor per micro-batch ([B_i, T_i], compute dtype): pass each as policy_batch::cov_selection to
/// that micro-batch's policy_variant_loss (with the same options, the global normaliser as `normalizer`), and the
/// step selects the tokens one process selects on the whole batch with the same seed:
///   covariance  cov_t = (A_t - Ā)(sg logπ_t - mean sg logπ), the means over every rank's valid tokens (one
///               all-reduce of [Σ m·A, Σ m·logπ, Σ m]); the candidates per token as the loss (clip_cov: valid,
///               not clipped by PPO, lb < cov < ub; kl_cov: valid);
///   selection   k = max(⌊ratio·N_valid⌋, 1) of N_valid the global count; every rank's candidate covariances are
///               all-gathered in the whole batch's row-major order (rank by rank, micro-batch by micro-batch, row by
///               row: padding a micro-batch to another width adds no candidate, so the order is one process's),
///               and every rank runs the same pick (cov_pick: top-k with ties to the lower index, or the seeded
///               Fisher-Yates) and keeps its own tokens.
/// The selection uses the current logprobs (detached): compute every micro-batch's logprobs first (a forward pass,
/// no graph needed), select, then run the micro-batches' loss and backward. Communication: one all-reduce, two
/// all-gathers (lengths with an options hash, then the candidates' covariances, NaN elsewhere: O(tokens) values).
/// Equal to the single-process selection whenever no two covariances tie within rounding (the global means are
/// summed in another order).
template <tensor T>
std::vector<T> global_cov_selection(const std::vector<policy_batch<T>>& micro_batches, const communicator<T>& comm,
                                    const policy_variant_options& opt) {
  constexpr std::string_view fn = "global_cov_selection";
  const auto [rank, world] = detail::check_communicator(fn, comm);
  detail::check_variant_options(fn, opt);
  const bool clip = opt.variant == policy_variant::clip_cov;
  if (!clip && opt.variant != policy_variant::kl_cov)
    detail::fail(fn, "options.variant must be clip_cov or kl_cov, got ", static_cast<int>(opt.variant));
  if (micro_batches.empty())
    detail::fail(fn, "micro_batches is empty; pass at least one (a [0, T] batch for a rank without rows)");
  struct part {
    T m, A, lp, lr;
  };
  std::vector<part> parts;
  for (const auto& b : micro_batches) {
    detail::require_rank(fn, "logprobs", b.logprobs, 2, 2);
    if (ops::numel(b.logprobs) == 0) {  // an empty micro-batch ([0, T]): no token, still joins the collectives
      detail::require_floating(fn, "logprobs", b.logprobs);
      if (ops::shape(b.response_mask) != ops::shape(b.logprobs))
        detail::fail(fn, "response_mask has shape ", detail::shape_string(ops::shape(b.response_mask)),
                     " but logprobs has shape ", detail::shape_string(ops::shape(b.logprobs)));
      const T z = ops::upcast(b.logprobs);
      parts.push_back({z, z, z, z});
      continue;
    }
    detail::require_values(fn, "logprobs", b.logprobs);
    const T m =
        ops::ne(ops::upcast(detail::checked_mask(fn, "logprobs", b.logprobs, "response_mask", b.response_mask)), 0.0);
    const T lp = ops::detach(ops::upcast(b.logprobs));
    if (b.old_logprobs) detail::require_like(fn, "logprobs", b.logprobs, "old_logprobs", *b.old_logprobs);
    const T old = b.old_logprobs ? ops::upcast(*b.old_logprobs) : lp;
    parts.push_back({m, detail::token_advantages(fn, b.advantages, lp), lp, ops::where(m, ops::sub(lp, old), 0.0)});
  }
  const T like = ops::full(parts[0].lp, shape_t{}, 0.0);
  // [Σ m·A, Σ m·logπ, Σ m] of this rank, then of every rank
  T local = ops::full(like, shape_t{3}, 0.0);
  for (const auto& p : parts)
    if (ops::numel(p.m) > 0)
      local =
          ops::add(local, ops::concat(std::vector<T>{ops::reshape(ops::sum_all(ops::where(p.m, p.A, 0.0)), shape_t{1}),
                                                     ops::reshape(ops::sum_all(ops::where(p.m, p.lp, 0.0)), shape_t{1}),
                                                     ops::reshape(ops::sum_all(p.m), shape_t{1})},
                                      0));
  const T sums = detail::checked_all_reduce(fn, comm, local, reduce_op::sum);
  const T count = detail::element(sums, 2);
  // token_covariance's masked means, over every rank's valid tokens
  const T mean_A = ops::div(detail::element(sums, 0), detail::mean_divisor(count, masked_options{}));
  const T mean_lp = ops::div(detail::element(sums, 1), detail::mean_divisor(count, masked_options{}));
  std::vector<T> flats;
  std::int64_t local_n = 0;
  for (const auto& p : parts) {
    const T cov = ops::mul(ops::sub(p.A, mean_A), ops::sub(p.lp, mean_lp));  // [B_i, T_i]
    const T cand =
        clip ? detail::clip_cov_candidates(detail::clip_cov_surrogate(p.lr, p.A, opt.clip), cov, p.m, opt) : p.m;
    flats.push_back(ops::reshape(ops::where(ops::ne(cand, 0.0), cov, std::numeric_limits<double>::quiet_NaN()),
                                 shape_t{ops::numel(cov)}));
    local_n += ops::numel(cov);
  }
  detail::options_hash h;
  h.add(static_cast<std::int64_t>(opt.variant)).add(clip ? opt.clip_cov_ratio : opt.kl_cov_ratio);
  h.add(opt.clip_cov_lb).add(opt.clip_cov_ub).add(opt.clip.clip_low).add(opt.clip.high());
  h.add(static_cast<std::int64_t>(detail::cov_selection_rule(opt))).add(static_cast<std::int64_t>(opt.cov_seed));
  const auto lengths = detail::gather_lengths(fn, comm, like, local_n, h.value(), "the options");
  std::int64_t offset = 0, total = 0;
  for (int r = 0; r < world; ++r) {
    if (r < rank) offset += lengths[static_cast<std::size_t>(r)];
    total += lengths[static_cast<std::size_t>(r)];
  }
  const T gathered = comm.all_gather(ops::concat(flats, 0));
  if (ops::shape(gathered) != shape_t{total})
    detail::fail(fn, "comm.all_gather returned shape ", detail::shape_string(ops::shape(gathered)),
                 " for the covariances; expected [", total, "] (the ranks' token counts summed)");
  const auto all = ops::to_host(gathered);
  // the whole batch's candidates in row-major order; this rank's are positions [first, first + mine)
  std::vector<double> values;
  std::size_t first = 0;
  for (std::int64_t i = 0; i < total; ++i) {
    if (i == offset) first = values.size();
    if (!std::isnan(all[static_cast<std::size_t>(i)])) values.push_back(all[static_cast<std::size_t>(i)]);
  }
  if (offset == total) first = values.size();
  // verl: max(int(ratio · N_valid), 1) tokens of the whole batch
  const auto k = detail::cov_select_count(clip ? opt.clip_cov_ratio : opt.kl_cov_ratio, ops::item(count));
  std::vector<bool> picked(values.size(), false);
  for (std::size_t p : detail::cov_pick(values, k, detail::cov_selection_rule(opt), opt.cov_seed)) picked[p] = true;
  std::vector<T> out;
  std::size_t at = static_cast<std::size_t>(offset), cand = first;
  for (const auto& p : parts) {
    std::vector<std::size_t> flat;
    const auto n = static_cast<std::size_t>(ops::numel(p.m));
    for (std::size_t j = 0; j < n; ++j, ++at)
      if (!std::isnan(all[at]) && picked[cand++]) flat.push_back(j);
    out.push_back(detail::flat_index_mask(p.m, flat));
  }
  return out;
}

}  // namespace posttrain
