// Input validation (issue item 8) on the Eigen backend: every public entry throws posttrain::error
// (an std::invalid_argument) whose message starts with "posttrain::<function>: " and names the offending
// argument, with the shapes or values. Covers mismatched shapes, wrong rank, labels outside [0, V) other
// than ignore_index, empty batches, NaN / infinite hyper-parameters, label smoothing outside [0, 1),
// normalisers <= 0, and sequence aggregation modes on rank-2 inputs. (Dtype and device mismatches
// cannot be built with Eigen tensors: the LibTorch tests cover them.)
#include <catch2/catch.hpp>
#include <cmath>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/kl/estimators.hpp"
#include "posttrain/kl/exact.hpp"
#include "posttrain/losses/sft.hpp"
#include "posttrain/numerics/aggregate.hpp"
#include "posttrain/numerics/logits.hpp"
#include "posttrain/numerics/masked.hpp"

namespace test_errors {  // one namespace per test file: the unity build compiles several in one TU

using namespace posttrain;
using Catch::Matchers::Contains;
using tensor_d = eigen_tensor<double>;

namespace {
constexpr double qnan = std::numeric_limits<double>::quiet_NaN();
constexpr double inf = std::numeric_limits<double>::infinity();

/// `call` throws posttrain::error (also catchable as std::invalid_argument) whose message starts with
/// "posttrain::<function>: " and contains every one of `parts` (the argument's name, shapes, values).
void expect_error(const std::function<void()>& call, const std::string& function,
                  const std::vector<std::string>& parts) {
  INFO("expected posttrain::" << function << " to reject its input, naming: " << Catch::Detail::stringify(parts));
  CHECK_THROWS_AS(call(), posttrain::error);
  CHECK_THROWS_AS(call(), std::invalid_argument);
  CHECK_THROWS_WITH(call(), Catch::Matchers::StartsWith("posttrain::" + function + ": "));
  for (const auto& p : parts) CHECK_THROWS_WITH(call(), Contains(p));
}

const tensor_d logits3({2, 3, 5}, 0.5);
const eigen_index labels3({2, 3}, {0, 1, 2, 3, 4, -100});
const tensor_d logits2({6, 5}, 0.5);
const eigen_index labels2({6}, {0, 1, 2, 3, 4, -100});
const tensor_d row({6}, 1.0);
}  // namespace

TEST_CASE("mismatched shapes name both arguments and their shapes", "[errors]") {
  const tensor_d lp({3}, -1.0), ref4({4}, -1.0), ref3({3}, -1.0), grad4({4}, 1.0);
  expect_error([&] { kl_penalty(lp, ref4); }, "kl_penalty", {"ref_logprobs", "[4]", "logprobs", "[3]"});
  expect_error([&] { kl_penalty_backward(lp, ref4, ref3); }, "kl_penalty_backward", {"ref_logprobs", "[4]"});
  expect_error([&] { kl_penalty_backward(lp, ref3, grad4); }, "kl_penalty_backward", {"grad", "[4]", "[3]"});
  const tensor_d other({2, 3, 4}, 0.0);
  expect_error([&] { kl_exact(logits3, other); }, "kl_exact", {"ref_logits", "[2, 3, 4]", "[2, 3, 5]"});
  expect_error(
      [&] {
        kl_exact_backward(logits3, other, tensor_d({2, 3}, 1.0));
      },
      "kl_exact_backward", {"ref_logits", "[2, 3, 4]"});
  // labels must be logits' shape without the last dimension.
  const eigen_index wrong({2, 4}, {0, 0, 0, 0, 0, 0, 0, 0});
  expect_error([&] { sft_loss(logits3, wrong); }, "sft_loss", {"labels", "[2, 4]", "[2, 3, 5]", "[2, 3]"});
  expect_error([&] { sft_loss_backward(logits3, wrong); }, "sft_loss_backward", {"labels", "[2, 4]"});
  expect_error([&] { token_logprobs(logits3, wrong); }, "token_logprobs", {"labels", "[2, 4]"});
  expect_error([&] { token_logprobs_and_entropy(logits3, wrong); }, "token_logprobs_and_entropy",
               {"labels", "[2, 4]", "[2, 3, 5]"});
  expect_error(
      [&] {
        token_logprobs_backward(logits3, wrong, tensor_d({2, 4}, 1.0));
      },
      "token_logprobs_backward", {"labels", "[2, 4]"});
  // Masks must match their values.
  const tensor_d mask5({5}, 1.0);
  expect_error([&] { masked_sum(row, mask5); }, "masked_sum", {"mask", "[5]", "[6]"});
  expect_error([&] { masked_mean(row, mask5); }, "masked_mean", {"mask", "[5]", "[6]"});
  expect_error([&] { masked_var(row, mask5); }, "masked_var", {"mask", "[5]", "[6]"});
  expect_error([&] { masked_whiten(row, mask5); }, "masked_whiten", {"mask", "[5]", "[6]"});
  expect_error([&] { aggregate(row, mask5, aggregation::token_mean); }, "aggregate", {"mask", "[5]", "[6]"});
}

TEST_CASE("upstream gradients of the wrong shape are rejected by name", "[errors]") {
  // grad has one value per row of logits [2, 3, 5]: shape [2, 3]. [3] or [1] would broadcast silently.
  for (const tensor_d& bad : {tensor_d({3}, 1.0), tensor_d({1}, 1.0), tensor_d({2, 3, 5}, 1.0)}) {
    const auto s = detail::shape_string(bad.shape());
    expect_error([&] { logsumexp_backward(logits3, bad); }, "logsumexp_backward", {"grad", s, "[2, 3]"});
    expect_error([&] { entropy_backward(logits3, bad); }, "entropy_backward", {"grad", s, "[2, 3]"});
    expect_error([&] { token_logprobs_backward(logits3, labels3, bad); }, "token_logprobs_backward",
                 {"grad", s, "[2, 3]"});
    expect_error([&] { kl_exact_backward(logits3, logits3, bad); }, "kl_exact_backward", {"grad", s, "[2, 3]"});
  }
}

TEST_CASE("wrong ranks, and sequence aggregation modes on rank-2 inputs", "[errors]") {
  const tensor_d scalar;  // a 0-d tensor
  expect_error([&] { logsumexp(scalar); }, "logsumexp", {"logits", "rank"});
  expect_error([&] { entropy(scalar); }, "entropy", {"logits", "rank"});
  expect_error([&] { softmax_last(scalar); }, "softmax_last", {"logits", "rank"});
  expect_error([&] { kl_exact(scalar, scalar); }, "kl_exact", {"logits", "rank"});
  expect_error([&] { sft_loss(scalar, eigen_index(shape_t{}, {0})); }, "sft_loss", {"logits", "rank"});
  for (auto mode :
       {aggregation::seq_mean_token_sum, aggregation::seq_mean_token_mean, aggregation::seq_mean_token_sum_norm}) {
    const std::string name = aggregation_name(mode);
    // SFT's sequence modes need logits [B, T, V].
    expect_error([&] { sft_loss(logits2, labels2, {.reduction = mode}); }, "sft_loss",
                 {"reduction", name, "[B, T, V]", "[6, 5]"});
    expect_error([&] { sft_loss_backward(logits2, labels2, {.reduction = mode}); }, "sft_loss_backward",
                 {"reduction", name, "[6, 5]"});
    // ... and a [B, T] mask / loss.
    expect_error([&] { aggregation_weights(row, mode); }, "aggregation_weights", {"mask", "rank 2", "[6]"});
    expect_error([&] { aggregate(row, row, mode); }, "aggregate", {"loss", "rank 2", "[6]"});
    expect_error([&] { aggregate(logits3, logits3, mode); }, "aggregate", {"loss", "rank 2", "[2, 3, 5]"});
  }
}

TEST_CASE("labels outside 0 to V - 1 that are not ignore_index", "[errors]") {
  for (std::int64_t bad : {std::int64_t{5}, std::int64_t{-1}, std::int64_t{-99}, std::int64_t{1000}}) {
    const eigen_index labels({2, 3}, {0, 1, bad, 3, 4, -100});
    INFO("label " << bad);
    expect_error([&] { sft_loss(logits3, labels); }, "sft_loss", {"labels", "outside [0, 5)", "-100"});
    expect_error([&] { sft_loss_backward(logits3, labels); }, "sft_loss_backward", {"labels", "outside [0, 5)"});
    expect_error([&] { token_logprobs(logits3, labels); }, "token_logprobs", {"labels", "outside [0, 5)"});
    expect_error([&] { token_logprobs_and_entropy(logits3, labels); }, "token_logprobs_and_entropy",
                 {"labels", "outside [0, 5)"});
    expect_error(
        [&] {
          token_logprobs_backward(logits3, labels, tensor_d({2, 3}, 1.0));
        },
        "token_logprobs_backward", {"labels", "outside [0, 5)"});
  }
  // -100 is only special while it is the ignore_index.
  expect_error([&] { sft_loss(logits3, labels3, {.ignore_index = 7}); }, "sft_loss", {"labels", "1 value(s)", "(7)"});
}

TEST_CASE("empty batches", "[errors]") {
  const tensor_d no_rows({0, 5}), no_vocab({2, 0}), empty_tokens({0}), empty_seq({2, 0, 5});
  expect_error([&] { logsumexp(no_rows); }, "logsumexp", {"logits", "empty", "[0, 5]"});
  expect_error([&] { entropy(no_vocab); }, "entropy", {"logits", "empty", "[2, 0]"});
  expect_error([&] { token_logprobs(no_rows, eigen_index({0})); }, "token_logprobs", {"logits", "empty"});
  expect_error([&] { token_logprobs_and_entropy(no_rows, eigen_index({0})); }, "token_logprobs_and_entropy",
               {"logits", "empty"});
  expect_error([&] { sft_loss(no_rows, eigen_index({0})); }, "sft_loss", {"logits", "empty", "[0, 5]"});
  expect_error([&] { sft_loss(empty_seq, eigen_index({2, 0})); }, "sft_loss", {"logits", "empty", "[2, 0, 5]"});
  expect_error([&] { sft_loss_backward(no_rows, eigen_index({0})); }, "sft_loss_backward", {"logits", "empty"});
  expect_error([&] { kl_penalty(empty_tokens, empty_tokens); }, "kl_penalty", {"logprobs", "empty"});
  expect_error([&] { kl_penalty_backward(empty_tokens, empty_tokens, empty_tokens); }, "kl_penalty_backward",
               {"logprobs", "empty"});
  expect_error([&] { kl_exact(no_rows, no_rows); }, "kl_exact", {"logits", "empty"});
  expect_error([&] { masked_mean(empty_tokens, empty_tokens); }, "masked_mean", {"x", "empty"});
  expect_error([&] { masked_var(empty_tokens, empty_tokens); }, "masked_var", {"x", "empty"});
  expect_error([&] { masked_whiten(empty_tokens, empty_tokens); }, "masked_whiten", {"x", "empty"});
  expect_error([&] { aggregate(empty_tokens, empty_tokens, aggregation::token_mean); }, "aggregate", {"loss", "empty"});
  expect_error([&] { aggregation_weights(empty_tokens, aggregation::sum); }, "aggregation_weights", {"mask", "empty"});
}

TEST_CASE("NaN and out-of-range hyper-parameters", "[errors]") {
  const eigen_index& l = labels3;
  const auto& x = logits3;
  // Each SFT option, through the forward and the backward.
  struct sft_case {
    sft_options options;
    std::vector<std::string> parts;
  };
  const sft_case sft_cases[] = {
      {{.label_smoothing = qnan}, {"options.label_smoothing", "finite", "nan"}},
      {{.label_smoothing = inf}, {"options.label_smoothing", "finite", "inf"}},
      {{.label_smoothing = -0.1}, {"options.label_smoothing", "[0, 1)", "-0.1"}},
      {{.label_smoothing = 1.0}, {"options.label_smoothing", "[0, 1)", "got 1"}},
      {{.label_smoothing = 1.5}, {"options.label_smoothing", "[0, 1)", "1.5"}},
      {{.z_loss = qnan}, {"options.z_loss", "finite", "nan"}},
      {{.z_loss = -1e-4}, {"options.z_loss", ">= 0", "-0.0001"}},
      {{.normalizer = qnan}, {"normalizer", "finite", "nan"}},
      {{.normalizer = 0.0}, {"normalizer", "> 0", "got 0"}},
      {{.normalizer = -3.0}, {"normalizer", "> 0", "-3"}},
  };
  for (const auto& c : sft_cases) {
    expect_error([&] { sft_loss(x, l, c.options); }, "sft_loss", c.parts);
    expect_error([&] { sft_loss_backward(x, l, c.options); }, "sft_loss_backward", c.parts);
  }
  expect_error([&] { sft_loss_backward(x, l, {}, qnan); }, "sft_loss_backward", {"grad_loss", "finite", "nan"});

  // KL clamps: > 0 when set.
  const tensor_d lp({3}, -1.0), ref({3}, -2.0), g({3}, 1.0);
  for (double bad : {qnan, 0.0, -1.0}) {
    expect_error([&] { kl_penalty(lp, ref, {.log_ratio_clamp = bad}); }, "kl_penalty",
                 {"options.log_ratio_clamp", "> 0"});
    expect_error([&] { kl_penalty(lp, ref, {.value_clamp = bad}); }, "kl_penalty", {"options.value_clamp", "> 0"});
    expect_error([&] { kl_penalty_backward(lp, ref, g, {.log_ratio_clamp = bad}); }, "kl_penalty_backward",
                 {"options.log_ratio_clamp", "> 0"});
    expect_error([&] { kl_penalty_backward(lp, ref, g, {.value_clamp = bad}); }, "kl_penalty_backward",
                 {"options.value_clamp", "> 0"});
  }

  // Aggregation normalisers.
  const tensor_d m({6}, 1.0);
  for (double bad : {qnan, 0.0, -2.0, -inf}) {
    expect_error([&] { aggregate(row, m, aggregation::token_mean, bad); }, "aggregate", {"normalizer"});
    expect_error([&] { aggregation_weights(m, aggregation::sum, bad); }, "aggregation_weights", {"normalizer"});
  }

  // Whitening eps: finite and > 0 (it guards a division by sqrt(var + eps), var 0 for one kept value).
  expect_error([&] { masked_whiten(row, m, {.eps = qnan}); }, "masked_whiten", {"eps", "finite", "nan"});
  expect_error([&] { masked_whiten(row, m, {.eps = -1e-8}); }, "masked_whiten", {"eps", "> 0"});
}

}  // namespace test_errors
