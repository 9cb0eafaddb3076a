// The tensor concept is enough, and the fused-override dispatch works (range-v3's archetypes, stdexec's
// recording fakes):
//  (a) `archetype` wraps eigen_tensor<double> and its tensor_traits provide ONLY the concept's operations
//      (no fused_ops specialisation). Every algorithm compiles against it and gives the values
//      eigen_tensor<double> (which has fused hooks) gives; a log of every traits call shows the generic
//      compositions ran.
//  (b) `fused_recorder` adds the one-pass logits_stats hook (fused.hpp); the log shows the public entries
//      called it, once per call, instead of the generic compositions.
//  (c) `declining_recorder` has the hook but declines every input (an empty optional, as a backend does
//      for a device or layout it cannot take); the log shows the algorithms fell back to the generic
//      composition themselves.
#include <catch2/catch.hpp>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/kl/estimators.hpp"
#include "posttrain/kl/exact.hpp"
#include "posttrain/losses/sequence_logps.hpp"
#include "posttrain/losses/sft.hpp"
#include "posttrain/numerics/aggregate.hpp"
#include "posttrain/numerics/logits.hpp"
#include "posttrain/numerics/masked.hpp"
#include "posttrain/numerics/stable.hpp"
#include "support/data.hpp"
#include "support/eigen_checks.hpp"
#include "support/recording.hpp"

namespace recording {

/// Only what the concept asks for: no arithmetic operators, no members beyond the wrapped value.
struct archetype {
  posttrain::eigen_tensor<double> value;
};
/// The same, with a backend that also provides the fused logits hook.
struct fused_recorder {
  posttrain::eigen_tensor<double> value;
};
/// The same, with a hook that declines every input.
struct declining_recorder {
  posttrain::eigen_tensor<double> value;
};

}  // namespace recording

namespace posttrain {

/// (a) The concept's operations and nothing else.
template <>
struct tensor_traits<recording::archetype> : recording_traits<recording::archetype> {};

/// (b) The same plus the one-pass logits hook, forwarding to the Eigen backend's.
template <>
struct tensor_traits<recording::fused_recorder> : recording_traits<recording::fused_recorder> {};
template <>
struct fused_ops<recording::fused_recorder> {
  using W = recording::fused_recorder;
  static std::optional<logits_row_stats<W>> logits_stats(const W& x, const eigen_index* labels,
                                                         const logits_stats_request& q) {
    ++recording::calls()["logits_stats"];
    const auto r = fused_ops<eigen_tensor<double>>::logits_stats(x.value, labels, q);
    return logits_row_stats<W>{W{r->logsumexp}, W{r->logprob}, W{r->entropy}, W{r->argmax_hit}};
  }
};

/// (c) The hook present but declining every input.
template <>
struct tensor_traits<recording::declining_recorder> : recording_traits<recording::declining_recorder> {};
template <>
struct fused_ops<recording::declining_recorder> {
  using W = recording::declining_recorder;
  static std::optional<logits_row_stats<W>> logits_stats(const W&, const eigen_index*, const logits_stats_request&) {
    ++recording::calls()["logits_stats declined"];
    return std::nullopt;
  }
};

}  // namespace posttrain

namespace test_archetype {  // one namespace per test file: the unity build compiles several in one TU

using namespace posttrain;
using recording::archetype;
using recording::declining_recorder;
using recording::fused_recorder;
using tensor_d = eigen_tensor<double>;

static_assert(tensor<archetype>);
static_assert(tensor<fused_recorder>);
static_assert(tensor<declining_recorder>);
static_assert(tensor<tensor_d>);
static_assert(!tensor<int>);
static_assert(!tensor<eigen_tensor<std::int64_t>>);  // labels are index tensors, not values
// The archetype really lacks the hooks; the recorders really have the logits hook (fused.hpp's concepts).
static_assert(!has_fused_logits_stats<archetype> && !has_fused_ce_backward<archetype> && !has_fused_kd<archetype>);
static_assert(has_fused_logits_stats<fused_recorder> && !has_fused_ce_backward<fused_recorder>);
static_assert(has_fused_logits_stats<recording::declining_recorder>);
static_assert(has_fused_logits_stats<tensor_d> && has_fused_ce_backward<tensor_d> && has_fused_kd<tensor_d>);

namespace {
const auto tol = test::float64_tol;

template <class W>
W wrap(const tensor_d& x) {
  return W{x};
}
template <class W>
void same(const std::string& what, const W& got, const tensor_d& want) {
  test::check_same(what, got.value, want, tol);
}

/// Inputs shared by every check: logits [2, 3, 5], labels with an ignored position, log-probs and a mask [2, 3].
struct inputs {
  tensor_d logits = test::to_eigen<double>(test::random_normal({2, 3, 5}, 131, 2.0));
  tensor_d ref_logits = test::to_eigen<double>(test::random_normal({2, 3, 5}, 132, 2.0));
  eigen_index labels = eigen_index({2, 3}, {4, 0, -100, 2, 1, 3});
  tensor_d lp = test::to_eigen<double>(test::random_normal({2, 3}, 133, 1.0, -2.0));
  tensor_d ref = test::to_eigen<double>(test::random_normal({2, 3}, 134, 1.0, -2.0));
  tensor_d grad = test::to_eigen<double>(test::random_normal({2, 3}, 135));
  tensor_d mask = eigen_tensor<double>({2, 3}, {1, 1, 0, 1, 0, 1});
};

/// Runs every algorithm on backend W and on eigen_tensor<double>, requiring equal values.
template <class W>
void every_algorithm_agrees() {
  const inputs in;
  const W logits = wrap<W>(in.logits), ref_logits = wrap<W>(in.ref_logits), lp = wrap<W>(in.lp), ref = wrap<W>(in.ref),
          grad = wrap<W>(in.grad), mask = wrap<W>(in.mask);

  same("logsumexp", logsumexp(logits), logsumexp(in.logits));
  same("logsumexp_backward", logsumexp_backward(logits, grad), logsumexp_backward(in.logits, in.grad));
  same("softmax_last", softmax_last(logits), softmax_last(in.logits));
  same("token_logprobs", token_logprobs(logits, in.labels), token_logprobs(in.logits, in.labels));
  same("token_logprobs_backward", token_logprobs_backward(logits, in.labels, grad),
       token_logprobs_backward(in.logits, in.labels, in.grad));
  same("entropy", entropy(logits), entropy(in.logits));
  {
    const auto a = token_logprobs_and_entropy(logits, in.labels);
    const auto b = token_logprobs_and_entropy(in.logits, in.labels);
    same("token_logprobs_and_entropy logprobs", a.logprobs, b.logprobs);
    same("token_logprobs_and_entropy entropy", a.entropy, b.entropy);
  }
  same("entropy_backward", entropy_backward(logits, grad), entropy_backward(in.logits, in.grad));
  same("softplus", softplus(lp), softplus(in.lp));
  same("log_sigmoid", log_sigmoid(lp), log_sigmoid(in.lp));
  same("sigmoid", sigmoid(lp), sigmoid(in.lp));
  same("log1mexp", log1mexp(lp), log1mexp(in.lp));

  for (const sft_options& o : {sft_options{}, sft_options{.label_smoothing = 0.1, .z_loss = 1e-3, .dft = true},
                               sft_options{.reduction = aggregation::seq_mean_token_mean, .normalizer = 4.0}}) {
    const auto a = sft_loss(logits, in.labels, o);
    const auto b = sft_loss(in.logits, in.labels, o);
    same("sft loss", a.loss, b.loss);
    same("sft per_token_loss", a.per_token_loss, b.per_token_loss);
    same("sft num_tokens", a.num_tokens, b.num_tokens);
    same("sft token_accuracy", a.token_accuracy, b.token_accuracy);
    same("sft entropy", a.entropy, b.entropy);
    same("sft_loss_backward", sft_loss_backward(logits, in.labels, o, 0.5),
         sft_loss_backward(in.logits, in.labels, o, 0.5));
  }
  auto verl_st = kl_options::verl_low_var_kl();
  verl_st.straight_through = true;
  for (const kl_options& o :
       {kl_options{}, kl_options{.estimator = kl_estimator::abs}, kl_options::verl_low_var_kl(), verl_st}) {
    same("kl_penalty", kl_penalty(lp, ref, o), kl_penalty(in.lp, in.ref, o));
    same("kl_penalty_backward", kl_penalty_backward(lp, ref, grad, o), kl_penalty_backward(in.lp, in.ref, in.grad, o));
  }
  same("kl_exact", kl_exact(logits, ref_logits), kl_exact(in.logits, in.ref_logits));
  same("kl_exact_backward", kl_exact_backward(logits, ref_logits, grad),
       kl_exact_backward(in.logits, in.ref_logits, in.grad));

  same("masked_sum", masked_sum(lp, mask), masked_sum(in.lp, in.mask));
  same("masked_mean", masked_mean(lp, mask, 1), masked_mean(in.lp, in.mask, 1));
  same("masked_var", masked_var(lp, mask), masked_var(in.lp, in.mask));
  same("masked_whiten", masked_whiten(lp, mask, {.keep_mean = true}),
       masked_whiten(in.lp, in.mask, {.keep_mean = true}));
  for (auto mode : {aggregation::token_mean, aggregation::seq_mean_token_sum, aggregation::seq_mean_token_mean,
                    aggregation::seq_mean_token_sum_norm, aggregation::sum}) {
    same("aggregate", aggregate(lp, mask, mode), aggregate(in.lp, in.mask, mode));
    same("aggregation_weights", aggregation_weights(mask, mode, 3.0), aggregation_weights(in.mask, mode, 3.0));
  }
}
}  // namespace

TEST_CASE("an archetype with only the concept's operations runs every algorithm", "[archetype][concept]") {
  recording::reset();
  every_algorithm_agrees<archetype>();
  // Nothing but the concept's operations exists on the archetype, so no fused call can appear; the log shows
  // the generic compositions doing the work.
  CHECK(recording::count_prefix("fused_") == 0);
  CHECK(recording::count("reduce") > 0);
  CHECK(recording::count("unary") > 0);
  CHECK(recording::count("gather_last") > 0);

  // Per primitive: logsumexp is max, exp, sum and log (reduce twice, unary twice at least).
  const archetype x{test::to_eigen<double>(test::random_normal({2, 4}, 141))};
  recording::reset();
  (void)logsumexp(x);
  CHECK(recording::count("reduce") >= 2);
  CHECK(recording::count("unary") >= 2);
  recording::reset();
  (void)token_logprobs(x, eigen_index({2}, {1, 3}));
  CHECK(recording::count("gather_last") == 1);
  CHECK(recording::count("reduce") >= 2);
  recording::reset();
  (void)entropy(x);
  CHECK(recording::count("reduce") >= 3);  // the row max, the logsumexp's sum, and Σ p log p
}

TEST_CASE("a backend's fused hook is what the public entries call, once per call", "[archetype][fused]") {
  every_algorithm_agrees<fused_recorder>();
  const fused_recorder x{test::to_eigen<double>(test::random_normal({2, 4}, 151))};
  const eigen_index labels({2}, {1, 3});

  recording::reset();
  (void)logsumexp(x);
  CHECK(recording::count("logits_stats") == 1);
  CHECK(recording::count("reduce") == 0);  // no generic max / sum ran
  CHECK(recording::count("unary") == 0);

  recording::reset();
  (void)token_logprobs(x, labels);
  CHECK(recording::count("logits_stats") == 1);
  CHECK(recording::count("reduce") == 0);
  CHECK(recording::count("gather_last") == 0);

  recording::reset();
  (void)entropy(x);
  CHECK(recording::count("logits_stats") == 1);
  CHECK(recording::count("reduce") == 0);

  // Log-probs and entropy together: one read.
  recording::reset();
  (void)token_logprobs_and_entropy(x, labels);
  CHECK(recording::count("logits_stats") == 1);
  CHECK(recording::count("reduce") == 0);

  // SFT takes log p[y], both metrics (argmax hit, entropy) and, with smoothing, the logsumexp from one
  // read; the only other pass over the logits is smoothing's Σ_v x_v.
  recording::reset();
  (void)sft_loss(x, labels);
  CHECK(recording::count("logits_stats") == 1);
  CHECK(recording::count("argmax_last") == 0);
  CHECK(recording::count("gather_last") == 0);
  recording::reset();
  (void)sft_loss(x, labels, {.label_smoothing = 0.1});
  CHECK(recording::count("logits_stats") == 1);
  CHECK(recording::count("argmax_last") == 0);

  // The sequence log-prob helper is on the same path.
  recording::reset();
  (void)sequence_logps(fused_recorder{test::to_eigen<double>(test::random_normal({1, 2, 4}, 152))},
                       eigen_index({1, 2}, {1, -100}));
  CHECK(recording::count("logits_stats") == 1);
  CHECK(recording::count("gather_last") == 0);

  // The generic compositions stay available on the same backend (what the fused ones are tested against).
  recording::reset();
  const auto g = generic::logsumexp_last(x);
  CHECK(recording::count("logits_stats") == 0);
  CHECK(recording::count("reduce") >= 2);
  test::check_same("generic vs fused", g.value, logsumexp(x).value, tol);
}

TEST_CASE("a hook that declines an input leaves the generic composition to run", "[archetype][fused]") {
  every_algorithm_agrees<declining_recorder>();
  const declining_recorder x{test::to_eigen<double>(test::random_normal({2, 4}, 153))};
  const eigen_index labels({2}, {1, 3});
  recording::reset();
  const auto r = token_logprobs_and_entropy(x, labels);
  CHECK(recording::count("logits_stats declined") == 1);
  CHECK(recording::count("gather_last") == 1);  // the generic selective log-softmax ran
  CHECK(recording::count("reduce") >= 4);       // and the generic logsumexp / entropy sums
  const tensor_d xd = x.value;
  test::check_same("declined log-probs", r.logprobs.value, generic::token_logprobs(xd, labels), tol);
  test::check_same("declined entropy", r.entropy.value, generic::entropy_last(xd), tol);
}

}  // namespace test_archetype
