// posttrain/losses/prm.hpp — process reward model loss: cross-entropy at the step placeholders.
//
// A process reward model (Lightman et al. 2023, "Let's Verify Step by Step", arXiv:2305.20050 §2.4) is a
// language model trained to predict, at a placeholder token that closes each reasoning step, one of a few
// reward tokens ("+" / "-"). OpenRLHF's PRMLoss (openrlhf/models/loss.py, PRMLoss.forward, 3c3be62):
//
//   S = {positions p : input_ids[p] == placeholder_token_id}
//   z_p = logits[p, reward_token_ids]                     [|S|, K] (the whole vocabulary when no ids are given)
//   hard labels: y_p = the index of labels[p] in reward_token_ids (labels are token ids; ignore_index skipped)
//                ℓ_p = logsumexp(z_p) - z_p[y_p]
//   soft labels: q_p = labels[p] ∈ [0, 1] the probability of reward_token_ids[0] (K must be 2), target
//                (q_p, 1 - q_p):  ℓ_p = -(q_p log softmax(z_p)_0 + (1 - q_p) log softmax(z_p)_1)
//   loss = Σ_{p counted} ℓ_p / #counted   (torch CrossEntropyLoss(ignore_index=-100), reduction "mean")
//   accuracy = mean [argmax_k z_p == y_p]  (soft: y_p = argmax(q_p, 1 - q_p), i.e. 0 when q_p >= 1/2)
//
// Shapes: input_ids [...] (any integer dtype), logits [..., V], labels [...] (hard: integer token ids;
// soft: floating probabilities); usually [B, T] and [B, T, V]. No shift: the label at a placeholder is the
// reward token the logits at that same position should predict (OpenRLHF's PRM data layout).
// Counted positions: hard labels, placeholders whose label is not ignore_index; soft labels, every placeholder
// (PyTorch ignores ignore_index for probability targets).
// Gradient: ∂loss/∂logits[p, r_k] = (softmax(z_p)_k - target_{p,k}) / #counted at counted positions, 0 at every
// other position and vocabulary column.
//
// Where we differ from OpenRLHF, deliberately (each an input it would silently mis-handle):
//  * OpenRLHF's accuracy divides by every placeholder, so a placeholder with an ignored hard label counts as a
//    miss; `prm_options::accuracy` = `prm_accuracy::placeholders` (`prm_options::openrlhf`) reproduces it, the
//    default divides by the counted positions (the loss's own denominator). Soft labels: the two agree.
//  * A hard label at a placeholder that is neither ignore_index nor a reward token id (OpenRLHF: an index error
//    inside cross_entropy, or a wrong class), a soft label outside [0, 1] (OpenRLHF: a -100 soft label is a
//    target of (-100, 101)), duplicate reward ids and ignore_index among them are rejected by name.
//  * OpenRLHF maps label ids to columns with a sequential torch.where per id, which renames twice when a reward
//    token id is smaller than the number of reward tokens (ids [5, 0]: label 5 -> 0 -> 1); here a label is its
//    id's position in reward_token_ids, always (the two agree for real vocabulary ids).
//  * No selected position gives loss 0 and accuracy 0, not NaN. Half logits are computed in float32 (OpenRLHF
//    casts soft labels to the logits' dtype and takes the cross-entropy in it).
//  * Whole-vocabulary mode (no reward ids, hard labels only): every label must be in [0, V) or ignore_index,
//    placeholder or not (the common label check); with ids, labels away from placeholders are not read.
// Example: logits at one placeholder [0, 0] over ids {a, b}, label a -> loss log 2 = 0.693147, accuracy 1
// (a tie picks the first column, as torch.argmax).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string_view>
#include <utility>
#include <vector>

#include "posttrain/detail/validate.hpp"
#include "posttrain/numerics/logits.hpp"
#include "posttrain/tensor.hpp"

namespace posttrain {

/// Which placeholders the accuracy divides by (the loss always divides by the counted positions).
enum class prm_accuracy {
  counted,       ///< placeholders in the loss (default): an ignored hard label is neither hit nor miss
  placeholders,  ///< every placeholder: an ignored hard label is a miss (OpenRLHF PRMLoss, return_acc=True)
};

struct prm_options {
  /// The token id that closes each step (OpenRLHF --placeholder_token); required, >= 0.
  std::int64_t placeholder_token_id = -1;
  /// The vocabulary columns the cross-entropy is over (OpenRLHF --reward_tokens, e.g. the ids of "+" and "-");
  /// empty: the whole vocabulary, hard labels only. Soft labels need exactly two, the first the positive one.
  std::vector<std::int64_t> reward_token_ids = {};
  /// Hard labels equal to this are skipped (OpenRLHF and PyTorch: -100).
  std::int64_t ignore_index = default_ignore_index;
  /// The accuracy's denominator; see prm_accuracy.
  prm_accuracy accuracy = prm_accuracy::counted;

  /// OpenRLHF PRMLoss exactly: its accuracy counts ignored placeholders as misses.
  static prm_options openrlhf(std::int64_t placeholder_token_id, std::vector<std::int64_t> reward_token_ids) {
    return {.placeholder_token_id = placeholder_token_id,
            .reward_token_ids = std::move(reward_token_ids),
            .accuracy = prm_accuracy::placeholders};
  }
};

template <tensor T>
struct prm_result {
  T loss;           ///< 0-d: mean cross-entropy over the counted placeholders (differentiable)
  T per_step_loss;  ///< [...]: ℓ_p at counted placeholders, 0 elsewhere (differentiable)
  T accuracy;       ///< 0-d: fraction of placeholders (see prm_accuracy) whose argmax is the label (detached)
  T num_steps;      ///< 0-d: the counted placeholders, the loss's denominator (detached)
};

namespace detail {

inline void check_prm_options(std::string_view fn, const prm_options& o, std::int64_t vocab, bool soft) {
  if (o.placeholder_token_id < 0)
    fail(fn, "options.placeholder_token_id must be a token id >= 0, got ", o.placeholder_token_id);
  const auto& ids = o.reward_token_ids;
  if (soft && ids.size() != 2)
    fail(fn, "options.reward_token_ids must hold 2 token ids for soft labels (positive first), got ", ids.size());
  for (std::size_t k = 0; k < ids.size(); ++k) {
    if (ids[k] < 0 || ids[k] >= vocab)
      fail(fn, "options.reward_token_ids[", k, "] = ", ids[k], " is outside the vocabulary [0, ", vocab, ")");
    if (!soft && ids[k] == o.ignore_index)
      fail(fn, "options.reward_token_ids[", k, "] = ", ids[k], " equals options.ignore_index");
    for (std::size_t j = 0; j < k; ++j)
      if (ids[j] == ids[k]) fail(fn, "options.reward_token_ids holds ", ids[k], " twice (at ", j, " and ", k, ")");
  }
}

/// input_ids [...] and logits [..., V] (rank >= 2), options; returns nothing, throws posttrain::error.
template <tensor T>
void check_prm_common(std::string_view fn, const index_tensor_t<T>& input_ids, const T& logits, const prm_options& o,
                      bool soft) {
  using tr = tensor_traits<T>;
  require_logits(fn, "logits", logits);
  if (ops::rank(logits) < 2)
    fail(fn, "logits must be [..., V] with rank >= 2, got shape ", shape_string(ops::shape(logits)));
  require_index<T>(fn, "input_ids", input_ids);
  if (tr::index_device(input_ids) != ops::device(logits))
    fail(fn, "input_ids is on device ", tr::index_device(input_ids), " but logits is on ", ops::device(logits));
  shape_t rows = ops::shape(logits);
  rows.pop_back();
  if (tr::index_shape(input_ids) != rows)
    fail(fn, "input_ids has shape ", shape_string(tr::index_shape(input_ids)), " but logits has shape ",
         shape_string(ops::shape(logits)), "; expected input_ids of shape ", shape_string(rows));
  check_prm_options(fn, o, ops::size(logits, -1), soft);
}

template <tensor T>
void check_prm_hard(std::string_view fn, const index_tensor_t<T>& input_ids, const T& logits,
                    const index_tensor_t<T>& labels, const prm_options& o) {
  using tr = tensor_traits<T>;
  check_prm_common(fn, input_ids, logits, o, false);
  if (o.reward_token_ids.empty()) {  // whole vocabulary: the common label check, every position
    require_labels(fn, logits, labels, o.ignore_index);
    return;
  }
  require_index<T>(fn, "labels", labels);
  if (tr::index_device(labels) != ops::device(logits))
    fail(fn, "labels is on device ", tr::index_device(labels), " but logits is on ", ops::device(logits));
  if (tr::index_shape(labels) != tr::index_shape(input_ids))
    fail(fn, "labels has shape ", shape_string(tr::index_shape(labels)), " but input_ids has shape ",
         shape_string(tr::index_shape(input_ids)));
  if (!read_label_values(tr::index_device(labels))) return;  // label_checks.hpp: no host transfer
  const auto ids = tr::index_to_host(input_ids), y = tr::index_to_host(labels);
  const auto& reward = o.reward_token_ids;
  std::int64_t bad = 0, first = 0;
  for (std::size_t p = 0; p < ids.size(); ++p) {
    if (ids[p] != o.placeholder_token_id || y[p] == o.ignore_index) continue;
    if (std::find(reward.begin(), reward.end(), y[p]) == reward.end() && bad++ == 0) first = y[p];
  }
  if (bad > 0)
    fail(fn, "labels has ", bad, " value(s) at placeholder positions that are neither options.ignore_index (",
         o.ignore_index, ") nor one of options.reward_token_ids (the first: ", first, ")");
}

template <tensor T>
void check_prm_soft(std::string_view fn, const index_tensor_t<T>& input_ids, const T& logits, const T& labels,
                    const prm_options& o) {
  using tr = tensor_traits<T>;
  check_prm_common(fn, input_ids, logits, o, true);
  require_floating(fn, "labels", labels);
  require_same_device(fn, "logits", logits, "labels", labels);
  if (ops::shape(labels) != tr::index_shape(input_ids))
    fail(fn, "labels has shape ", shape_string(ops::shape(labels)), " but input_ids has shape ",
         shape_string(tr::index_shape(input_ids)));
  if (!read_label_values(ops::device(labels))) return;
  const auto ids = tr::index_to_host(input_ids);
  const auto q = ops::to_host(labels);
  std::int64_t bad = 0;
  double first = 0.0;
  for (std::size_t p = 0; p < ids.size(); ++p) {
    if (ids[p] != o.placeholder_token_id) continue;
    if (!(q[p] >= 0.0 && q[p] <= 1.0) && bad++ == 0) first = q[p];
  }
  if (bad > 0)
    fail(fn, "labels has ", bad, " soft label(s) at placeholder positions outside [0, 1] (the first: ", first, ")");
}

/// The reward columns of x [..., V] side by side: [..., K].
template <tensor T>
T prm_columns(const T& x, const std::vector<std::int64_t>& ids) {
  std::vector<T> cols;
  cols.reserve(ids.size());
  for (const auto id : ids) cols.push_back(ops::slice(x, -1, id, 1));
  return ops::concat(cols, ops::rank(x) - 1);
}

/// g [..., K] placed back at the reward columns of a [..., V] tensor of zeros.
template <tensor T>
T prm_scatter(const T& g, const std::vector<std::int64_t>& ids, std::int64_t vocab) {
  std::vector<std::size_t> order(ids.size());
  for (std::size_t k = 0; k < order.size(); ++k) order[k] = k;
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return ids[a] < ids[b]; });
  const std::int64_t last = ops::rank(g) - 1;
  shape_t s = ops::shape(g);
  std::vector<T> parts;
  std::int64_t at = 0;
  for (const auto k : order) {
    if (ids[k] > at) {
      s.back() = ids[k] - at;
      parts.push_back(ops::full(g, s, 0.0));
    }
    parts.push_back(ops::slice(g, -1, static_cast<std::int64_t>(k), 1));
    at = ids[k] + 1;
  }
  if (vocab > at) {
    s.back() = vocab - at;
    parts.push_back(ops::full(g, s, 0.0));
  }
  return ops::concat(parts, last);
}

/// The targets [..., K] and the counted positions [...] (0/1) of a PRM batch with reward ids.
template <tensor T>
struct prm_targets {
  T z;             ///< [..., K] reward-column logits (compute dtype)
  T target;        ///< [..., K] one-hot (hard) or (q, 1 - q) (soft)
  T counted;       ///< [...] 1 at positions in the loss
  T placeholders;  ///< [...] 1 at every placeholder
};

template <tensor T>
prm_targets<T> prm_hard_targets(const index_tensor_t<T>& input_ids, const T& logits, const index_tensor_t<T>& labels,
                                const prm_options& o) {
  using tr = tensor_traits<T>;
  const T z = prm_columns(ops::upcast(logits), o.reward_token_ids);                        // [..., K]
  const T sel = ops::sub(1.0, tr::index_not_equal(input_ids, o.placeholder_token_id, z));  // [...]
  std::vector<T> cols;
  for (const auto id : o.reward_token_ids)
    cols.push_back(ops::unsqueeze(ops::sub(1.0, tr::index_not_equal(labels, id, z)), -1));  // [..., 1]: label == id
  const T onehot = ops::concat(cols, ops::rank(z) - 1);
  // validated: at a placeholder the label is ignore_index (no column) or exactly one reward id
  const T counted = ops::mul(sel, ops::sum(onehot, -1));
  return {z, onehot, counted, sel};
}

template <tensor T>
prm_targets<T> prm_soft_targets(const index_tensor_t<T>& input_ids, const T& logits, const T& labels,
                                const prm_options& o) {
  using tr = tensor_traits<T>;
  const T z = prm_columns(ops::upcast(logits), o.reward_token_ids);  // [..., 2]
  const T sel = ops::sub(1.0, tr::index_not_equal(input_ids, o.placeholder_token_id, z));
  // (q, 1 - q), q read only at placeholders (elsewhere 0: any value, NaN included, is dropped)
  const T q = ops::where(sel, ops::to_dtype(labels, ops::dtype_of(z)), 0.0);
  const T target =
      ops::concat(std::vector<T>{ops::unsqueeze(q, -1), ops::unsqueeze(ops::sub(1.0, q), -1)}, ops::rank(z) - 1);
  return {z, target, sel, sel};
}

/// The forward over reward columns: ℓ_p = logsumexp(z_p) - Σ_k t_pk z_pk (Σ_k t_pk = 1), metrics.
template <tensor T>
prm_result<T> prm_forward(const prm_targets<T>& t, const prm_options& o, bool soft) {
  // -Σ_k t_k log softmax(z)_k = logsumexp(z) - Σ_k t_k z_k when Σ_k t_k = 1, with z shifted by its detached row max
  const T zs = shift_by_row_max(t.z);
  const T per = ops::sub(logsumexp_unchecked(zs), ops::sum(ops::mul(t.target, zs), -1));  // [...]
  prm_result<T> r;
  r.per_step_loss = ops::where(t.counted, per, 0.0);
  const T n = ops::detach(ops::sum_all(t.counted));
  r.num_steps = n;
  r.loss = ops::div(ops::sum_all(r.per_step_loss), ops::maximum(n, 1.0));
  // accuracy: torch.argmax (first maximum) of the logits against the label class (soft: argmax of (q, 1 - q))
  const T zd = ops::detach(t.z);
  const T cls = soft ? ops::one_hot(ops::argmax_last(t.target), 2, zd) : t.target;
  const T hit = ops::mul(ops::gather_last(cls, ops::argmax_last(zd)), t.counted);  // [...]
  const T denom = o.accuracy == prm_accuracy::counted ? n : ops::sum_all(t.placeholders);
  r.accuracy = ops::detach(ops::div(ops::sum_all(hit), ops::maximum(denom, 1.0)));
  return r;
}

/// ∂loss/∂logits over reward columns: (softmax(z) - t) · counted · grad_loss / #counted, scattered to [..., V].
template <tensor T>
T prm_backward(const T& logits, const prm_targets<T>& t, const prm_options& o, double grad_loss) {
  const T n = ops::maximum(ops::sum_all(t.counted), 1.0);
  const T w = ops::div(ops::mul(t.counted, grad_loss), n);                                  // [...]
  const T d = ops::mul(ops::sub(softmax_unchecked(t.z), t.target), ops::unsqueeze(w, -1));  // [..., K]
  const T g = ops::where(ops::unsqueeze(t.counted, -1), d, 0.0);  // selected: no NaN from other rows
  return ops::to_dtype(prm_scatter(g, o.reward_token_ids, ops::size(logits, -1)), ops::dtype_of(logits));
}

}  // namespace detail

/// Process reward model loss with hard labels (token ids). See the file comment for the formula and options.
template <tensor T>
prm_result<T> prm_loss(const index_tensor_t<T>& input_ids, const T& logits, const index_tensor_t<T>& labels,
                       const prm_options& opt) {
  constexpr std::string_view fn = "prm_loss";
  detail::check_prm_hard(fn, input_ids, logits, labels, opt);
  using tr = tensor_traits<T>;
  if (!opt.reward_token_ids.empty())
    return detail::prm_forward(detail::prm_hard_targets(input_ids, logits, labels, opt), opt, false);
  // whole vocabulary: the cross-entropy of the label token, read in one pass with its argmax hit
  const logits_row_stats<T> st = detail::logits_stats_unchecked(
      logits, &labels, {.logprob = true, .argmax_hit = true, .ignore_index = opt.ignore_index});
  const T sel = ops::sub(1.0, tr::index_not_equal(input_ids, opt.placeholder_token_id, st.logprob));  // [...]
  const T counted = ops::mul(sel, tr::index_not_equal(labels, opt.ignore_index, st.logprob));
  prm_result<T> r;
  r.per_step_loss = ops::where(counted, ops::neg(st.logprob), 0.0);
  const T n = ops::detach(ops::sum_all(counted));
  r.num_steps = n;
  r.loss = ops::div(ops::sum_all(r.per_step_loss), ops::maximum(n, 1.0));
  const T denom = opt.accuracy == prm_accuracy::counted ? n : ops::sum_all(sel);
  r.accuracy =
      ops::detach(ops::div(ops::sum_all(ops::mul(ops::detach(st.argmax_hit), counted)), ops::maximum(denom, 1.0)));
  return r;
}

/// Process reward model loss with soft labels: labels [...] the probability of reward_token_ids[0].
template <tensor T>
prm_result<T> prm_loss_soft(const index_tensor_t<T>& input_ids, const T& logits, const T& labels,
                            const prm_options& opt) {
  detail::check_prm_soft("prm_loss_soft", input_ids, logits, labels, opt);
  return detail::prm_forward(detail::prm_soft_targets(input_ids, logits, labels, opt), opt, true);
}

/// Gradient of prm_loss with respect to the logits [..., V] (in the logits' dtype), times grad_loss.
template <tensor T>
T prm_loss_backward(const index_tensor_t<T>& input_ids, const T& logits, const index_tensor_t<T>& labels,
                    const prm_options& opt, double grad_loss = 1.0) {
  constexpr std::string_view fn = "prm_loss_backward";
  detail::check_prm_hard(fn, input_ids, logits, labels, opt);
  detail::require_finite(fn, "grad_loss", grad_loss);
  using tr = tensor_traits<T>;
  if (!opt.reward_token_ids.empty())
    return detail::prm_backward(logits, detail::prm_hard_targets(input_ids, logits, labels, opt), opt, grad_loss);
  // whole vocabulary: d(-log p[y])/dx = softmax - onehot(y), weighted by counted / #counted
  const T like = ops::upcast(ops::scalar_like(logits, 0.0));
  const T counted = ops::mul(ops::sub(1.0, tr::index_not_equal(input_ids, opt.placeholder_token_id, like)),
                             tr::index_not_equal(labels, opt.ignore_index, like));  // [...]
  const T w = ops::div(ops::mul(counted, -grad_loss), ops::maximum(ops::sum_all(counted), 1.0));
  // token_logprobs_backward: w · (onehot - softmax), 0 at ignored labels; w is 0 away from placeholders
  const T g = detail::token_logprobs_backward_unchecked(logits, labels, w, opt.ignore_index);
  return ops::where(ops::unsqueeze(ops::to_dtype(counted, ops::dtype_of(g)), -1), g, 0.0);
}

/// Gradient of prm_loss_soft with respect to the logits [..., V] (in the logits' dtype), times grad_loss.
template <tensor T>
T prm_loss_soft_backward(const index_tensor_t<T>& input_ids, const T& logits, const T& labels, const prm_options& opt,
                         double grad_loss = 1.0) {
  constexpr std::string_view fn = "prm_loss_soft_backward";
  detail::check_prm_soft(fn, input_ids, logits, labels, opt);
  detail::require_finite(fn, "grad_loss", grad_loss);
  return detail::prm_backward(logits, detail::prm_soft_targets(input_ids, logits, labels, opt), opt, grad_loss);
}

}  // namespace posttrain
