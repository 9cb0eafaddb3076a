// Extreme inputs on torch float32/float64 (logits of ±1e4, -inf vocabulary padding, log-ratios of
// ±500, all-masked rows, a single token, V = 1, V = 50000): values and autograd gradients are
// finite and agree with the Eigen double reference. Then the torch-only error cases (issue 2,
// item 8): each throws posttrain::error naming the function and the argument.
#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "posttrain/advantages/group.hpp"
#include "posttrain/backends/eigen.hpp"
#include "posttrain/backends/torch.hpp"
#include "posttrain/check/compare.hpp"
#include "posttrain/kl/estimators.hpp"
#include "posttrain/kl/exact.hpp"
#include "posttrain/losses/ppo.hpp"
#include "posttrain/losses/sft.hpp"
#include "posttrain/numerics/aggregate.hpp"
#include "posttrain/numerics/logits.hpp"
#include "posttrain/numerics/masked.hpp"
#include "posttrain/numerics/stable.hpp"
#include "support/data.hpp"
#include "support/tolerances.hpp"
#include "support/torch_data.hpp"

namespace test_extreme_errors {  // one namespace per test file: the unity build compiles several in one TU

using namespace posttrain;
using namespace posttrain::test;
using Catch::Contains;

namespace {

constexpr double inf = std::numeric_limits<double>::infinity();

/// The gradient of a scalar objective: LibTorch autograd through `forward` on torch, the analytic
/// `backward` on Eigen (the reference).
template <class Maker, class Forward, class Backward>
auto gradient(const Maker& mk, const host_tensor& x, Forward forward, Backward backward) {
  if constexpr (std::is_same_v<Maker, torch_maker>)
    return autograd_grad(mk.values(x), forward);
  else
    return backward(mk.values(x));
}

/// Runs `body` on torch float32 and float64 and on the Eigen double reference (same rounded
/// inputs); every output must be finite and agree within the dtype's tolerance.
template <class Body>
void extreme_check(Body&& body) {
  for (auto dt : {at::kFloat, at::kDouble}) run_and_compare(torch_maker{dt}, dt, body, /*expect_finite=*/true);
}

/// Logits, labels and the weights of the scalar objective Σ g · f used to take gradients.
struct logits_case {
  host_tensor logits;
  host_labels labels;
  host_tensor grad;
};

/// token_logprobs, entropy, logsumexp, sft_loss (with smoothing and z-loss) and their gradients.
/// logit_scale > 0: the largest |logit|, for the outputs that go through LibTorch's own
/// at::logsumexp in float32 (see float32_fused_logsumexp_tol).
void check_logit_primitives(const logits_case& c, bool with_smoothing = true, double logit_scale = 0.0) {
  extreme_check([&](const auto& mk) {
    std::optional<tolerance> fused;
    if constexpr (std::is_same_v<std::decay_t<decltype(mk)>, torch_maker>)
      if (mk.input == at::kFloat && logit_scale > 0) fused = float32_fused_logsumexp_tol(logit_scale);
    outputs o;
    const auto x = mk.values(c.logits);
    const auto y = mk.labels(c.labels);
    const auto g = mk.values(c.grad);
    o.add("token_logprobs", token_logprobs(x, y), fused);
    o.add("entropy", entropy(x));
    o.add("logsumexp", logsumexp(x));
    o.add("token_logprobs grad",
          gradient(
              mk, c.logits, [&](const auto& l) { return ops::sum_all(ops::mul(token_logprobs(l, y), g)); },
              [&](const auto& l) { return token_logprobs_backward(l, y, g); }),
          fused);
    o.add("token_logprobs_backward", token_logprobs_backward(x, y, g));
    o.add("entropy grad", gradient(
                              mk, c.logits, [&](const auto& l) { return ops::sum_all(ops::mul(entropy(l), g)); },
                              [&](const auto& l) { return entropy_backward(l, g); }));
    o.add("entropy_backward", entropy_backward(x, g));
    o.add("logsumexp grad",
          gradient(
              mk, c.logits, [&](const auto& l) { return ops::sum_all(ops::mul(logsumexp(l), g)); },
              [&](const auto& l) { return logsumexp_backward(l, g); }),
          fused);
    for (bool smooth : {false, true}) {
      if (smooth && !with_smoothing) continue;
      const sft_options opt{.label_smoothing = smooth ? 0.1 : 0.0, .z_loss = smooth ? 1e-4 : 0.0};
      const std::string name = smooth ? " smoothing+z" : "";
      const auto r = sft_loss(x, y, opt);
      o.add("sft loss" + name, r.loss, fused);
      o.add("sft per_token_loss" + name, r.per_token_loss, fused);
      o.add("sft token_accuracy" + name, r.token_accuracy);
      o.add("sft entropy" + name, r.entropy);
      o.add("sft grad" + name,
            gradient(
                mk, c.logits, [&](const auto& l) { return sft_loss(l, y, opt).loss; },
                [&](const auto& l) { return sft_loss_backward(l, y, opt); }),
            fused);
      o.add("sft_loss_backward" + name, sft_loss_backward(x, y, opt));
    }
    return o;
  });
}

/// kl_exact and its gradient (ref constant).
void check_kl_exact(const host_tensor& logits, const host_tensor& ref, const host_tensor& grad) {
  extreme_check([&](const auto& mk) {
    outputs o;
    const auto y = mk.values(ref);
    const auto g = mk.values(grad);
    o.add("kl_exact", kl_exact(mk.values(logits), y));
    o.add("kl_exact grad", gradient(
                               mk, logits, [&](const auto& l) { return ops::sum_all(ops::mul(kl_exact(l, y), g)); },
                               [&](const auto& l) { return kl_exact_backward(l, y, g); }));
    o.add("kl_exact_backward", kl_exact_backward(mk.values(logits), y, g));
    return o;
  });
}

/// ±1e4 logits: a random sign per entry, plus N(0, 1) so several entries compete for the max.
host_tensor huge_logits(const shape_t& s, std::uint64_t seed) {
  host_tensor x = random_normal(s, seed);
  const host_tensor sign = random_mask(s, seed + 1, 0.5);
  for (std::size_t i = 0; i < x.values.size(); ++i) x.values[i] += sign.values[i] > 0 ? 1e4 : -1e4;
  return x;
}

}  // namespace

TEST_CASE("extreme: logits of +-1e4", "[extreme]") {
  const shape_t s{4, 12};
  // |logit| <= 1e4 + a few (N(0, 1) noise): the scale of the fused-path exception.
  check_logit_primitives({huge_logits(s, 201), random_labels({4}, 12, 202, 0.25), random_normal({4}, 203)},
                         /*with_smoothing=*/true, /*logit_scale=*/1.01e4);
  check_kl_exact(huge_logits(s, 204), huge_logits(s, 205), random_normal({4}, 206));
}

TEST_CASE("extreme: -inf vocabulary padding columns", "[extreme]") {
  const shape_t s{2, 3, 10};
  host_tensor x = random_normal(s, 211, 3.0), ref = random_normal(s, 212, 3.0);
  // The last three columns are padding in both the policy and the reference (p = q = 0 there).
  for (std::size_t i = 0; i < x.values.size(); ++i)
    if (i % 10 >= 7) x.values[i] = ref.values[i] = -inf;
  // Smoothing averages log p over every column, so it is +inf with padding; not checked here.
  check_logit_primitives({x, random_labels({2, 3}, 7, 213, 0.2), random_normal({2, 3}, 214)},
                         /*with_smoothing=*/false);
  check_kl_exact(x, ref, random_normal({2, 3}, 215));
}

TEST_CASE("extreme: log-ratios of +-500 in every estimator", "[extreme][kl]") {
  host_tensor lp = random_normal({2, 6}, 221, 1.0), ref = lp;
  // r = lp - ref alternates +500, -500, with ordinary ratios between.
  for (std::size_t i = 0; i < lp.values.size(); ++i) {
    lp.values[i] = -std::abs(lp.values[i]);
    ref.values[i] = lp.values[i] + (i % 3 == 0 ? 500.0 : i % 3 == 1 ? -500.0 : 0.3);
  }
  const host_tensor grad = random_normal({2, 6}, 222);
  const kl_estimator estimators[] = {kl_estimator::k1, kl_estimator::abs, kl_estimator::k2, kl_estimator::k3};
  for (auto dt : {at::kFloat, at::kDouble}) {
    run_and_compare(
        torch_maker{dt}, dt,
        [&](const auto& mk) {
          outputs o;
          for (auto e : estimators)
            for (bool st : {false, true}) {
              // k3 = e^{-r} + r - 1 at r = -500 is e^500 = 1.4e217: finite in float64, but it overflows
              // float32 (max 3.4e38, i.e. e^88.7). verl clamps r to ±20 and k3 to ±10 for this
              // reason (kl_options::verl_low_var_kl), so float32 k3 runs with verl's guards.
              kl_options opt{e, st};
              if (e == kl_estimator::k3 && dt == at::kFloat) {
                opt = kl_options::verl_low_var_kl();
                opt.straight_through = st;
              }
              const std::string name = std::string(kl_estimator_name(e)) + (st ? " straight" : "");
              const auto r = mk.values(ref), g = mk.values(grad);
              o.add(name, kl_penalty(mk.values(lp), r, opt));
              o.add(name + " grad",
                    gradient(
                        mk, lp, [&](const auto& l) { return ops::sum_all(ops::mul(kl_penalty(l, r, opt), g)); },
                        [&](const auto& l) { return kl_penalty_backward(l, r, g, opt); }));
              o.add(name + " backward", kl_penalty_backward(mk.values(lp), r, g, opt));
            }
          return o;
        },
        /*expect_finite=*/true);
  }
}

TEST_CASE("extreme: all-masked rows and an all-masked batch", "[extreme]") {
  host_labels labels = random_labels({3, 4}, 6, 231);
  for (int t = 0; t < 4; ++t) labels.values[static_cast<std::size_t>(4 + t)] = -100;  // row 1: no token
  host_labels none = labels;
  for (auto& v : none.values) v = -100;  // nothing to learn from at all
  const host_tensor logits = random_normal({3, 4, 6}, 232, 2.0);
  host_tensor mask(random_mask({3, 4}, 233));
  for (int t = 0; t < 4; ++t) mask.values[static_cast<std::size_t>(4 + t)] = 0.0;
  const host_tensor zero_mask{{3, 4}, std::vector<double>(12, 0.0)};
  const std::vector<const host_tensor*> masks{&mask, &zero_mask};
  const host_tensor x = random_normal({3, 4}, 234);
  const aggregation modes[] = {aggregation::token_mean, aggregation::seq_mean_token_sum,
                               aggregation::seq_mean_token_mean, aggregation::seq_mean_token_sum_norm,
                               aggregation::sum};
  extreme_check([&](const auto& mk) {
    outputs o;
    for (const host_labels* l : {&labels, &none})
      for (auto mode : modes) {
        const std::string name = std::string(l == &none ? "all-masked batch " : "masked row ") + aggregation_name(mode);
        const sft_options opt{.label_smoothing = 0.1, .reduction = mode};
        const auto y = mk.labels(*l);
        const auto r = sft_loss(mk.values(logits), y, opt);
        o.add("sft loss " + name, r.loss);
        o.add("sft accuracy " + name, r.token_accuracy);
        o.add("sft entropy " + name, r.entropy);
        o.add("sft grad " + name, gradient(
                                      mk, logits, [&](const auto& z) { return sft_loss(z, y, opt).loss; },
                                      [&](const auto& z) { return sft_loss_backward(z, y, opt); }));
      }
    for (const host_tensor* m : masks) {
      const std::string name = m == &zero_mask ? " all-masked" : " masked row";
      const auto mv = mk.values(*m);
      o.add("masked_mean dim 1" + name, masked_mean(mk.values(x), mv, 1));
      o.add("masked_var dim 1" + name, masked_var(mk.values(x), mv, true, 1));
      o.add("masked_whiten" + name, masked_whiten(mk.values(x), mv));
      for (auto mode : modes)
        o.add(std::string("aggregate ") + aggregation_name(mode) + name, aggregate(mk.values(x), mv, mode));
    }
    return o;
  });
}

TEST_CASE("extreme: a single token, and V = 1", "[extreme]") {
  // One token: [1, 1, V].
  check_logit_primitives(
      {random_normal({1, 1, 9}, 241, 2.0), random_labels({1, 1}, 9, 242), random_normal({1, 1}, 243)});
  // V = 1: p = 1, so log p = 0, entropy 0, loss 0, every gradient 0.
  check_logit_primitives({random_normal({5, 1}, 244), random_labels({5}, 1, 245), random_normal({5}, 246)});
  check_kl_exact(random_normal({5, 1}, 247), random_normal({5, 1}, 248), random_normal({5}, 249));
  const auto v1 = to_torch(random_normal({5, 1}, 244), at::kDouble).requires_grad_();
  const auto r = sft_loss(v1, torch::zeros({5}, torch::kLong), {.label_smoothing = 0.1});
  r.loss.backward();
  CHECK(r.loss.item<double>() == 0.0);                 // log 1
  CHECK(v1.grad().abs().max().item<double>() == 0.0);  // softmax - onehot = 1 - 1
  // A single masked token: its whitened value is 0 (x - mean), its unbiased variance 0 by convention.
  extreme_check([&](const auto& mk) {
    outputs o;
    const host_tensor one{{1}, {3.5}}, keep{{1}, {1.0}};
    o.add("masked_var", masked_var(mk.values(one), mk.values(keep)));
    o.add("masked_whiten", masked_whiten(mk.values(one), mk.values(keep)));
    return o;
  });
}

TEST_CASE("extreme: V = 50000 (two rows)", "[extreme][large]") {
  const shape_t s{2, 50000};
  check_logit_primitives({random_normal(s, 251, 3.0), random_labels({2}, 50000, 252), random_normal({2}, 253)});
  check_kl_exact(random_normal(s, 254, 3.0), random_normal(s, 255, 3.0), random_normal({2}, 256));
}

// ---- errors (issue 2, item 8): the message names the function and the argument ----------------

TEST_CASE("errors: labels of a floating dtype are rejected, int32 labels are accepted", "[errors]") {
  const auto logits = torch::randn({3, 5}, torch::kDouble);
  const auto labels = torch::tensor({0, 4, 2}, torch::kLong);
  CHECK_THROWS_AS(token_logprobs(logits, labels.to(torch::kFloat)), posttrain::error);
  CHECK_THROWS_WITH(
      token_logprobs(logits, labels.to(torch::kFloat)),
      Contains("posttrain::token_logprobs") && Contains("labels must have an integer dtype") && Contains("float32"));
  CHECK_THROWS_WITH(sft_loss(logits, labels.to(torch::kDouble)),
                    Contains("posttrain::sft_loss") && Contains("labels") && Contains("float64"));
  CHECK_THROWS_WITH(sft_loss_backward(logits, labels.to(torch::kBool)),
                    Contains("posttrain::sft_loss_backward") && Contains("labels") && Contains("bool"));

  const auto i32 = labels.to(torch::kInt);
  const sft_options opt{.label_smoothing = 0.1};
  CHECK(torch::equal(token_logprobs(logits, i32), token_logprobs(logits, labels)));
  CHECK(torch::equal(sft_loss(logits, i32, opt).loss, sft_loss(logits, labels, opt).loss));
  CHECK(torch::equal(sft_loss_backward(logits, i32, opt), sft_loss_backward(logits, labels, opt)));
  CHECK(torch::equal(token_logprobs_backward(logits, i32, torch::ones({3}, torch::kDouble)),
                     token_logprobs_backward(logits, labels, torch::ones({3}, torch::kDouble))));
  // int32 ignore_index handling too
  const auto i32_ignored = torch::tensor({0, -100, 2}, torch::kInt);
  CHECK(token_logprobs(logits, i32_ignored)[1].item<double>() == 0.0);
}

TEST_CASE("errors: tensors on the meta device are rejected by argument before anything reads them",
          "[errors][issue13]") {
  // "meta" tensors carry a device, shape and dtype but no data (issue 13 defect 10: all-meta inputs used to
  // reach .item() and raise c10::NotImplementedError). On a machine without a second device this is also the
  // only "other device" there is, so it stands in for the device-mismatch checks.
  const auto meta = at::TensorOptions().device(at::kMeta);
  const auto cpu_logits = torch::randn({2, 5});
  const auto cpu_labels = torch::tensor({1, 3}, torch::kLong);
  const auto on_meta = [](const std::string& fn, const std::string& arg) {
    return Contains("posttrain::" + fn + ": " + arg + " is on the meta device");  // one matcher: held by value
  };
  CHECK_THROWS_AS(token_logprobs(cpu_logits, torch::empty({2}, meta.dtype(at::kLong))), posttrain::error);
  CHECK_THROWS_WITH(token_logprobs(cpu_logits, torch::empty({2}, meta.dtype(at::kLong))),
                    on_meta("token_logprobs", "labels"));
  CHECK_THROWS_WITH(sft_loss(torch::empty({2, 5}, meta), cpu_labels), on_meta("sft_loss", "logits"));
  CHECK_THROWS_WITH(sft_loss(torch::empty({2, 5}, meta), torch::empty({2}, meta.dtype(at::kLong))),
                    on_meta("sft_loss", "logits"));
  CHECK_THROWS_WITH(kl_penalty(torch::randn({4}), torch::empty({4}, meta)), on_meta("kl_penalty", "ref_logprobs"));
  CHECK_THROWS_WITH(kl_penalty(torch::empty({4}, meta), torch::empty({4}, meta)), on_meta("kl_penalty", "logprobs"));
  CHECK_THROWS_WITH(kl_exact(cpu_logits, torch::empty({2, 5}, meta)), on_meta("kl_exact", "ref_logits"));
  CHECK_THROWS_WITH(masked_mean(torch::randn({2, 3}), torch::empty({2, 3}, meta)), on_meta("masked_mean", "mask"));
  CHECK_THROWS_WITH(aggregate(torch::randn({2, 3}), torch::empty({2, 3}, meta), aggregation::token_mean),
                    on_meta("aggregate", "mask"));
  CHECK_THROWS_WITH(grpo_advantages(torch::empty({4}, meta), torch::empty({4}, meta.dtype(at::kLong))),
                    on_meta("grpo_advantages", "scores"));
  CHECK_THROWS_WITH(grpo_advantages(torch::randn({4}), torch::empty({4}, meta.dtype(at::kLong))),
                    on_meta("grpo_advantages", "group_index"));
}

TEST_CASE("errors: undefined (default-constructed) tensors are named, not reported as a dtype", "[errors][issue13]") {
  const at::Tensor undefined;
  const auto logits = torch::randn({2, 5});
  const auto labels = torch::tensor({1, 3}, torch::kLong);
  const auto is_undefined = [](const std::string& fn, const std::string& arg) {
    return Contains("posttrain::" + fn + ": " + arg + " is an undefined tensor");
  };
  CHECK_THROWS_AS(token_logprobs(undefined, labels), posttrain::error);
  CHECK_THROWS_WITH(token_logprobs(undefined, labels), is_undefined("token_logprobs", "logits"));
  CHECK_THROWS_WITH(token_logprobs(logits, undefined), is_undefined("token_logprobs", "labels"));
  CHECK_THROWS_WITH(sft_loss(logits, undefined), is_undefined("sft_loss", "labels"));
  CHECK_THROWS_WITH(entropy(undefined), is_undefined("entropy", "logits"));
  CHECK_THROWS_WITH(masked_mean(torch::randn({3}), undefined), is_undefined("masked_mean", "mask"));
  CHECK_THROWS_WITH(masked_mean(undefined, torch::ones({3})), is_undefined("masked_mean", "x"));
  CHECK_THROWS_WITH(kl_penalty(torch::randn({3}), undefined), is_undefined("kl_penalty", "ref_logprobs"));
  CHECK_THROWS_WITH(ppo_policy_loss(torch::randn({3}), torch::randn({3}), torch::randn({3}), undefined),
                    is_undefined("ppo_policy_loss", "response_mask"));
  CHECK_THROWS_WITH(grpo_advantages(torch::randn({3}), undefined), is_undefined("grpo_advantages", "group_index"));
}

TEST_CASE("uint8 and bool masks, and uint8 / int16 labels and group ids, equal their int64 / float forms",
          "[errors][issue13]") {
  const auto x = torch::randn({2, 3}, torch::kDouble);
  const auto m = torch::tensor({1, 0, 1, 1, 1, 0}, torch::kDouble).reshape({2, 3});
  for (auto dt : {torch::kByte, torch::kBool, torch::kChar, torch::kShort, torch::kInt, torch::kLong}) {
    INFO("mask dtype " << c10::toString(dt));
    CHECK(torch::equal(masked_mean(x, m.to(dt)), masked_mean(x, m)));
    CHECK(torch::equal(aggregate(x, m.to(dt), aggregation::seq_mean_token_mean),
                       aggregate(x, m, aggregation::seq_mean_token_mean)));
    const auto old = torch::randn({2, 3}, torch::kDouble), A = torch::randn({2, 3}, torch::kDouble);
    CHECK(torch::equal(ppo_policy_loss(x, old, A, m.to(dt)).loss, ppo_policy_loss(x, old, A, m).loss));
  }
  // Labels: V = 200, so uint8 label 156 is a valid column. It must not be taken for ignore_index -100
  // (-100 wraps to 156 in uint8 arithmetic).
  const auto logits = torch::randn({3, 200}, torch::kDouble);
  const auto labels = torch::tensor({156, 0, 199}, torch::kLong);
  for (auto dt : {torch::kByte, torch::kShort, torch::kInt}) {
    INFO("label dtype " << c10::toString(dt));
    CHECK(torch::equal(token_logprobs(logits, labels.to(dt)), token_logprobs(logits, labels)));
    CHECK(token_logprobs(logits, labels.to(dt))[0].item<double>() != 0.0);
    CHECK(torch::equal(sft_loss(logits, labels.to(dt)).loss, sft_loss(logits, labels).loss));
    CHECK(torch::equal(sft_loss_backward(logits, labels.to(dt)), sft_loss_backward(logits, labels)));
  }
  // Group ids of uint8, and sparse int64 ids (renumbered, defect 8).
  const auto scores = torch::tensor({1.0, 3.0, 0.5, 2.5}, torch::kDouble);
  const auto g = torch::tensor({7, 7, 200, 200}, torch::kLong);
  const auto dense = torch::tensor({0, 0, 1, 1}, torch::kLong);
  CHECK(
      torch::equal(grpo_advantages(scores, g.to(torch::kByte)).advantages, grpo_advantages(scores, dense).advantages));
  CHECK(torch::equal(grpo_advantages(scores, g * std::int64_t{1000000000000}).advantages,
                     grpo_advantages(scores, dense).advantages));
}

TEST_CASE("errors: mismatched dtypes", "[errors]") {
  const auto lp = torch::randn({4}, torch::kFloat), ref = torch::randn({4}, torch::kDouble);
  CHECK_THROWS_AS(kl_penalty(lp, ref), posttrain::error);
  CHECK_THROWS_WITH(kl_penalty(lp, ref), Contains("posttrain::kl_penalty") &&
                                             Contains("ref_logprobs has dtype float64 but logprobs has dtype float32"));
  CHECK_THROWS_WITH(kl_penalty_backward(lp, lp, ref),
                    Contains("posttrain::kl_penalty_backward") && Contains("grad has dtype float64"));
  CHECK_THROWS_WITH(kl_exact(torch::randn({2, 3}, torch::kFloat), torch::randn({2, 3}, torch::kBFloat16)),
                    Contains("posttrain::kl_exact") && Contains("ref_logits has dtype bfloat16"));
}

TEST_CASE("errors: an empty batch", "[errors]") {
  const auto empty = torch::randn({0, 7});
  const auto no_labels = torch::zeros({0}, torch::kLong);
  CHECK_THROWS_AS(sft_loss(empty, no_labels), posttrain::error);
  CHECK_THROWS_WITH(sft_loss(empty, no_labels),
                    Contains("posttrain::sft_loss") && Contains("logits is empty (shape [0, 7])"));
  CHECK_THROWS_WITH(token_logprobs(empty, no_labels), Contains("posttrain::token_logprobs") && Contains("logits"));
  CHECK_THROWS_WITH(entropy(empty), Contains("posttrain::entropy") && Contains("logits is empty"));
  CHECK_THROWS_WITH(logsumexp(empty), Contains("posttrain::logsumexp") && Contains("logits is empty"));
  CHECK_THROWS_WITH(kl_exact(empty, empty), Contains("posttrain::kl_exact") && Contains("logits is empty"));
  CHECK_THROWS_WITH(kl_penalty(torch::randn({0}), torch::randn({0})),
                    Contains("posttrain::kl_penalty") && Contains("logprobs is empty"));
  CHECK_THROWS_WITH(masked_mean(torch::randn({0, 3}), torch::ones({0, 3})),
                    Contains("posttrain::masked_mean") && Contains("x is empty"));
}

TEST_CASE("errors: labels out of range", "[errors]") {
  const auto logits = torch::randn({4, 5});
  CHECK_THROWS_AS(sft_loss(logits, torch::tensor({0, 5, -1, -100}, torch::kLong)), posttrain::error);
  CHECK_THROWS_WITH(sft_loss(logits, torch::tensor({0, 5, -1, -100}, torch::kLong)),
                    Contains("posttrain::sft_loss") && Contains("labels has 2 value(s) outside [0, 5)") &&
                        Contains("ignore_index (-100)"));
  CHECK_THROWS_WITH(token_logprobs(logits, torch::tensor({0, 1, 2, -100}, torch::kInt), /*ignore_index=*/-1),
                    Contains("posttrain::token_logprobs") && Contains("labels has 1 value(s) outside [0, 5)"));
  CHECK_THROWS_WITH(token_logprobs_backward(logits, torch::tensor({7, 1, 2, 3}, torch::kLong), torch::ones({4})),
                    Contains("posttrain::token_logprobs_backward") && Contains("labels"));
}

TEST_CASE("errors: wrong rank and mismatched shapes", "[errors]") {
  const auto logits = torch::randn({4, 5});
  const auto labels = torch::tensor({0, 1, 2, 3}, torch::kLong);
  CHECK_THROWS_AS(sft_loss(logits, labels, {.reduction = aggregation::seq_mean_token_mean}), posttrain::error);
  CHECK_THROWS_WITH(sft_loss(logits, labels, {.reduction = aggregation::seq_mean_token_mean}),
                    Contains("posttrain::sft_loss") && Contains("seq-mean-token-mean needs logits [B, T, V]"));
  CHECK_THROWS_WITH(logsumexp(torch::tensor(1.0)),
                    Contains("posttrain::logsumexp") && Contains("logits must have rank"));
  CHECK_THROWS_WITH(aggregation_weights(torch::ones({6}), aggregation::seq_mean_token_sum),
                    Contains("posttrain::aggregation_weights") && Contains("mask must have rank 2") && Contains("[6]"));
  CHECK_THROWS_WITH(sft_loss(logits, labels.reshape({2, 2})), Contains("posttrain::sft_loss") &&
                                                                  Contains("labels has shape [2, 2]") &&
                                                                  Contains("logits has shape [4, 5]"));
  CHECK_THROWS_WITH(kl_penalty(torch::randn({3}), torch::randn({4})),
                    Contains("posttrain::kl_penalty") && Contains("ref_logprobs has shape [4]"));
  CHECK_THROWS_WITH(masked_whiten(torch::randn({3}), torch::ones({3, 1})),
                    Contains("posttrain::masked_whiten") && Contains("mask has shape [3, 1]"));
}

TEST_CASE("errors: NaN and out-of-range hyper-parameters on torch inputs", "[errors]") {
  const auto logits = torch::randn({2, 3});
  const auto labels = torch::tensor({0, 2}, torch::kLong);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_WITH(sft_loss(logits, labels, {.label_smoothing = 1.0}),
                    Contains("posttrain::sft_loss") && Contains("label_smoothing must be in [0, 1)"));
  CHECK_THROWS_WITH(sft_loss(logits, labels, {.label_smoothing = nan}),
                    Contains("posttrain::sft_loss") && Contains("label_smoothing must be finite"));
  CHECK_THROWS_WITH(sft_loss(logits, labels, {.normalizer = nan}),
                    Contains("posttrain::sft_loss") && Contains("normalizer must be finite"));
  CHECK_THROWS_WITH(kl_penalty(torch::randn({2}), torch::randn({2}), {.log_ratio_clamp = nan}),
                    Contains("posttrain::kl_penalty") && Contains("log_ratio_clamp"));
  CHECK_THROWS_WITH(masked_whiten(torch::randn({2}), torch::ones({2}), {.eps = nan}),
                    Contains("posttrain::masked_whiten") && Contains("eps must be finite"));
}

}  // namespace test_extreme_errors
