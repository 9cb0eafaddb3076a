// LibTorch autograd through each forward vs the analytic backward functions (on torch and on the
// Eigen double reference), central finite differences of the torch float64 forward for the masked
// reductions, and the fused LibTorch kernels vs posttrain::generic's compositions.
#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/backends/torch.hpp"
#include "posttrain/check/compare.hpp"
#include "posttrain/kl/estimators.hpp"
#include "posttrain/kl/exact.hpp"
#include "posttrain/losses/sft.hpp"
#include "posttrain/numerics/aggregate.hpp"
#include "posttrain/numerics/logits.hpp"
#include "posttrain/numerics/masked.hpp"
#include "posttrain/numerics/stable.hpp"
#include "support/data.hpp"
#include "support/tolerances.hpp"
#include "support/torch_data.hpp"

namespace test_autograd {  // one namespace per test file: the unity build compiles several in one TU

using namespace posttrain;
using namespace posttrain::test;

namespace {

/// Central finite differences of a scalar f at x (float64), step fd_step.
template <class F>
std::vector<double> central_differences(const at::Tensor& x, F f) {
  std::vector<double> g(static_cast<std::size_t>(x.numel()));
  for (std::int64_t i = 0; i < x.numel(); ++i) {
    at::Tensor up = x.detach().clone(), down = x.detach().clone();
    up.view({-1})[i] += fd_step;
    down.view({-1})[i] -= fd_step;
    g[static_cast<std::size_t>(i)] = (f(up).template item<double>() - f(down).template item<double>()) / (2 * fd_step);
  }
  return g;
}

const at::ScalarType float_types[] = {at::kFloat, at::kDouble};
const std::vector<shape_t> logits_shapes = {{5, 13}, {2, 3, 8}};

}  // namespace

TEST_CASE("autograd: sft_loss backward() equals sft_loss_backward, every option", "[sft][grad]") {
  const aggregation modes[] = {aggregation::token_mean, aggregation::seq_mean_token_sum,
                               aggregation::seq_mean_token_mean, aggregation::seq_mean_token_sum_norm,
                               aggregation::sum};
  const host_tensor logits = random_normal({2, 5, 9}, 101, 2.5);
  const host_labels labels = random_labels({2, 5}, 9, 102, 0.3);
  for (auto dt : {at::kFloat, at::kDouble, at::kBFloat16}) {
    const torch_maker mk{dt};
    const eigen_maker<double> ref{dt};
    for (auto mode : modes)
      for (double ls : {0.0, 0.15})
        for (double z : {0.0, 1e-2})
          for (bool dft : {false, true})
            for (std::optional<double> norm : {std::optional<double>{}, std::optional<double>{6.0}}) {
              const sft_options opt{
                  .label_smoothing = ls, .z_loss = z, .reduction = mode, .normalizer = norm, .dft = dft};
              INFO(mk.name() << " " << aggregation_name(mode) << " ls " << ls << " z " << z << " dft " << dft
                             << " normalizer " << norm.value_or(0));
              const at::Tensor y = mk.labels(labels);
              const at::Tensor g = autograd_grad(
                  mk.values(logits), [&](const at::Tensor& x) { return ops::mul(sft_loss(x, y, opt).loss, 0.75); });
              const auto tol = output_tolerance(dtype_of(dt));
              require_agree("autograd vs torch analytic", g,
                            ops::to_host(sft_loss_backward(mk.values(logits), y, opt, 0.75)), tol);
              require_agree("autograd vs eigen double analytic", g,
                            ops::to_host(sft_loss_backward(ref.values(logits), ref.labels(labels), opt, 0.75)), tol);
            }
  }
}

TEST_CASE("autograd: token_logprobs, entropy, logsumexp vs their analytic backwards", "[numerics][grad]") {
  for (auto dt : float_types)
    for (const auto& s : logits_shapes) {
      const torch_maker mk{dt};
      const eigen_maker<double> ref{dt};
      const shape_t ts(s.begin(), s.end() - 1);
      const host_tensor logits = random_normal(s, 111, 3.0);
      const host_labels labels = random_labels(ts, s.back(), 112, 0.3);
      const host_tensor grad = random_normal(ts, 113);
      const at::Tensor gt = mk.values(grad), y = mk.labels(labels);
      const auto tol = tolerance_for(dtype_of(dt));
      INFO(mk.name() << " shape " << posttrain::detail::shape_string(s));

      const at::Tensor g_lp = autograd_grad(
          mk.values(logits), [&](const at::Tensor& x) { return ops::sum_all(ops::mul(token_logprobs(x, y), gt)); });
      require_agree("token_logprobs torch analytic", g_lp,
                    ops::to_host(token_logprobs_backward(mk.values(logits), y, gt)), tol);
      require_agree("token_logprobs eigen analytic", g_lp,
                    ops::to_host(token_logprobs_backward(ref.values(logits), ref.labels(labels), ref.values(grad))),
                    tol);

      const at::Tensor g_h =
          autograd_grad(mk.values(logits), [&](const at::Tensor& x) { return ops::sum_all(ops::mul(entropy(x), gt)); });
      require_agree("entropy torch analytic", g_h, ops::to_host(entropy_backward(mk.values(logits), gt)), tol);
      require_agree("entropy eigen analytic", g_h, ops::to_host(entropy_backward(ref.values(logits), ref.values(grad))),
                    tol);

      const at::Tensor g_lse = autograd_grad(
          mk.values(logits), [&](const at::Tensor& x) { return ops::sum_all(ops::mul(logsumexp(x), gt)); });
      require_agree("logsumexp torch analytic", g_lse, ops::to_host(logsumexp_backward(mk.values(logits), gt)), tol);
      require_agree("logsumexp eigen analytic", g_lse,
                    ops::to_host(logsumexp_backward(ref.values(logits), ref.values(grad))), tol);
    }
}

TEST_CASE("autograd: kl_penalty vs kl_penalty_backward, straight_through gives k2's gradient", "[kl][grad]") {
  const kl_estimator estimators[] = {kl_estimator::k1, kl_estimator::abs, kl_estimator::k2, kl_estimator::k3};
  host_tensor lp = random_normal({4, 6}, 121, 1.5), ref_lp = random_normal({4, 6}, 122, 1.5);
  for (auto& v : lp.values) v = -std::abs(v);
  for (auto& v : ref_lp.values) v = -std::abs(v);
  const host_tensor grad = random_normal({4, 6}, 123);
  for (auto dt : float_types) {
    const torch_maker mk{dt};
    const eigen_maker<double> ref{dt};
    const auto tol = tolerance_for(dtype_of(dt));
    const at::Tensor r = mk.values(ref_lp), gt = mk.values(grad);
    // k2's gradient in closed form: d(½ (lp - ref)²)/d lp · g = (lp - ref) · g, from the rounded inputs.
    const host_tensor lp_r = round_through(lp, dt), ref_r = round_through(ref_lp, dt), g_r = round_through(grad, dt);
    std::vector<double> k2_grad(lp_r.values.size());
    for (std::size_t i = 0; i < k2_grad.size(); ++i) k2_grad[i] = (lp_r.values[i] - ref_r.values[i]) * g_r.values[i];
    for (auto e : estimators)
      for (std::optional<double> ratio_clamp : {std::optional<double>{}, std::optional<double>{0.7}})
        for (std::optional<double> value_clamp : {std::optional<double>{}, std::optional<double>{0.3}})
          for (bool st : {false, true}) {
            const kl_options opt{e, st, ratio_clamp, value_clamp};
            INFO(mk.name() << " " << kl_estimator_name(e) << " ratio clamp " << ratio_clamp.value_or(0)
                           << " value clamp " << value_clamp.value_or(0) << " straight " << st);
            const at::Tensor g = autograd_grad(
                mk.values(lp), [&](const at::Tensor& x) { return ops::sum_all(ops::mul(kl_penalty(x, r, opt), gt)); });
            require_agree("torch analytic", g, ops::to_host(kl_penalty_backward(mk.values(lp), r, gt, opt)), tol);
            require_agree("eigen analytic", g,
                          ops::to_host(kl_penalty_backward(ref.values(lp), ref.values(ref_lp), ref.values(grad), opt)),
                          tol);
            if (st) require_agree("k2 closed form", g, k2_grad, tol);
          }
  }
}

TEST_CASE("autograd: kl_exact vs kl_exact_backward", "[kl][grad]") {
  for (auto dt : float_types)
    for (const auto& s : logits_shapes) {
      const torch_maker mk{dt};
      const eigen_maker<double> ref{dt};
      const auto tol = tolerance_for(dtype_of(dt));
      const host_tensor x = random_normal(s, 131, 2.0), y = random_normal(s, 132, 2.0);
      const host_tensor grad = random_normal(shape_t(s.begin(), s.end() - 1), 133);
      const at::Tensor yt = mk.values(y), gt = mk.values(grad);
      INFO(mk.name() << " shape " << posttrain::detail::shape_string(s));
      const at::Tensor g = autograd_grad(
          mk.values(x), [&](const at::Tensor& xt) { return ops::sum_all(ops::mul(kl_exact(xt, yt), gt)); });
      require_agree("torch analytic", g, ops::to_host(kl_exact_backward(mk.values(x), yt, gt)), tol);
      require_agree("eigen analytic", g,
                    ops::to_host(kl_exact_backward(ref.values(x), ref.values(y), ref.values(grad))), tol);
    }
}

TEST_CASE("autograd: masked_whiten and masked_var match central differences (float64)", "[numerics][masked][grad]") {
  const host_tensor x = random_normal({3, 5}, 141, 1.5, 0.3);
  host_tensor m = random_mask({3, 5}, 142);
  for (int t = 0; t < 5; ++t) m.values[static_cast<std::size_t>(5 + t)] = 0.0;  // an all-masked row
  const at::Tensor mt = to_torch(m), c = to_torch(random_normal({3, 5}, 143));
  for (bool keep_mean : {false, true})
    for (bool unbiased : {true, false})
      for (double eps : {1e-8, 0.25}) {
        INFO("keep_mean " << keep_mean << " unbiased " << unbiased << " eps " << eps);
        const auto f = [&](const at::Tensor& xt) {
          return ops::sum_all(ops::mul(masked_whiten(xt, mt, {keep_mean, eps, unbiased}), c));
        };
        require_agree("masked_whiten", autograd_grad(to_torch(x), f), central_differences(to_torch(x), f),
                      finite_difference_tol);
      }
  for (bool unbiased : {true, false})
    for (std::optional<std::int64_t> dim : {std::optional<std::int64_t>{}, std::optional<std::int64_t>{1}}) {
      INFO("masked_var unbiased " << unbiased << " dim " << dim.value_or(-9));
      const auto f = [&](const at::Tensor& xt) {
        return ops::mul(ops::sum_all(masked_var(xt, mt, unbiased, dim)), 1.5);
      };
      require_agree("masked_var", autograd_grad(to_torch(x), f), central_differences(to_torch(x), f),
                    finite_difference_tol);
    }
}

TEST_CASE("autograd: aggregate's gradient is aggregation_weights (eigen double)", "[numerics][aggregate][grad]") {
  const aggregation modes[] = {aggregation::token_mean, aggregation::seq_mean_token_sum,
                               aggregation::seq_mean_token_mean, aggregation::seq_mean_token_sum_norm,
                               aggregation::sum};
  const host_tensor loss = random_normal({4, 6}, 151);
  host_tensor m = random_mask({4, 6}, 152);
  for (int t = 0; t < 6; ++t) m.values[static_cast<std::size_t>(12 + t)] = 0.0;
  for (auto dt : float_types)
    for (auto mode : modes)
      for (std::optional<double> norm : {std::optional<double>{}, std::optional<double>{11.0}}) {
        INFO(dtype_name(dtype_of(dt)) << " " << aggregation_name(mode) << " normalizer " << norm.value_or(0));
        const at::Tensor mt = to_torch(m, dt);
        const at::Tensor g =
            autograd_grad(to_torch(loss, dt), [&](const at::Tensor& l) { return aggregate(l, mt, mode, norm); });
        require_agree("aggregate", g, ops::to_host(aggregation_weights(to_eigen<double>(m), mode, norm)),
                      tolerance_for(dtype_of(dt)));
        // masked_mean / masked_sum are token_mean / sum without a normalizer.
        if (mode == aggregation::token_mean && !norm)
          require_agree("masked_mean",
                        autograd_grad(to_torch(loss, dt), [&](const at::Tensor& l) { return masked_mean(l, mt); }),
                        ops::to_host(aggregation_weights(to_eigen<double>(m), mode)), tolerance_for(dtype_of(dt)));
        if (mode == aggregation::sum && !norm)
          require_agree("masked_sum",
                        autograd_grad(to_torch(loss, dt), [&](const at::Tensor& l) { return masked_sum(l, mt); }),
                        m.values, tolerance_for(dtype_of(dt)));
      }
}

TEST_CASE("fused vs generic on torch: logsumexp, token_logprobs, entropy (values and autograd)", "[numerics][fused]") {
  const double inf = std::numeric_limits<double>::infinity();
  for (auto dt : float_types)
    for (const auto& s : logits_shapes)
      for (bool padded : {false, true}) {
        const torch_maker mk{dt};
        const auto tol = tolerance_for(dtype_of(dt));
        const shape_t ts(s.begin(), s.end() - 1);
        host_tensor logits = random_normal(s, 161, 3.0);
        // Vocabulary padding: the last two columns are -inf (labels never point there).
        if (padded)
          for (std::size_t i = 0; i < logits.values.size(); ++i)
            if (static_cast<std::int64_t>(i) % s.back() >= s.back() - 2) logits.values[i] = -inf;
        const host_labels labels = random_labels(ts, s.back() - 2, 162);
        const at::Tensor y = mk.labels(labels), gt = mk.values(random_normal(ts, 163));
        INFO(mk.name() << " shape " << posttrain::detail::shape_string(s) << " padded " << padded);
        const at::Tensor x = mk.values(logits);

        require_agree("logsumexp value", logsumexp(x), ops::to_host(generic::logsumexp_last(x)), tol);
        require_agree("token_logprobs value", token_logprobs(x, y), ops::to_host(generic::token_logprobs(x, y)), tol);
        require_agree("entropy value", entropy(x), ops::to_host(generic::entropy_last(x)), tol);

        const auto grad_of = [&](auto f) {
          const at::Tensor g = autograd_grad(x, [&](const at::Tensor& l) { return ops::sum_all(ops::mul(f(l), gt)); });
          CHECK(all_finite(g));
          return g;
        };
        require_agree("logsumexp grad", grad_of([](const at::Tensor& l) { return logsumexp(l); }),
                      ops::to_host(grad_of([](const at::Tensor& l) { return generic::logsumexp_last(l); })), tol);
        require_agree("token_logprobs grad", grad_of([&](const at::Tensor& l) { return token_logprobs(l, y); }),
                      ops::to_host(grad_of([&](const at::Tensor& l) { return generic::token_logprobs(l, y); })), tol);
        require_agree("entropy grad", grad_of([](const at::Tensor& l) { return entropy(l); }),
                      ops::to_host(grad_of([](const at::Tensor& l) { return generic::entropy_last(l); })), tol);
      }
}

TEST_CASE("autograd: sft_loss in_place_gradient writes the default gradient over the logits; misuse raises",
          "[sft][grad][in_place]") {
  const host_tensor logits = random_normal({3, 4, 11}, 171, 2.5);
  const host_labels labels = random_labels({3, 4}, 11, 172, 0.3);
  const sft_options plain{}, variant{.label_smoothing = 0.1,
                                     .z_loss = 1e-2,
                                     .reduction = aggregation::seq_mean_token_mean,
                                     .dft = true,
                                     .temperature = 0.7};
  for (auto dt : float_types)
    for (const sft_options& base_opt : {plain, variant}) {
      const torch_maker mk{dt};
      const auto tol = output_tolerance(dtype_of(dt));
      const at::Tensor y = mk.labels(labels);
      sft_options in_place = base_opt;
      in_place.in_place_gradient = true;
      INFO(mk.name() << " smoothing " << base_opt.label_smoothing);
      const auto f = [&](const sft_options& o) {
        return [&y, o](const at::Tensor& x) { return ops::mul(sft_loss(x, y, o).loss, 0.75); };
      };
      const at::Tensor expected = autograd_grad(mk.values(logits), f(base_opt));
      const double expected_loss = 0.75 * sft_loss(mk.values(logits), y, base_opt).loss.item<double>();

      // Logits computed from a parameter (clone saves nothing): the parameter gets the gradient, and
      // the logits' own storage now holds it.
      const at::Tensor w = mk.leaf(logits);
      const at::Tensor x = w.clone();
      const void* storage = x.data_ptr();
      const at::Tensor loss = f(in_place)(x);
      CHECK(loss.item<double>() == Approx(expected_loss).epsilon(1e-6));
      loss.backward();
      require_agree("in place: parameter gradient", w.grad(), ops::to_host(expected), tol);
      CHECK(x.data_ptr() == storage);
      // With label smoothing the logits have a second use (their row sum), whose gradient autograd adds
      // on the way to w; without, the fused node is their only use and their storage is the gradient.
      if (base_opt.label_smoothing == 0.0)
        require_agree("in place: the logits hold their gradient", x.detach(), ops::to_host(expected), tol);
      else
        CHECK_FALSE(at::equal(x.detach(), mk.values(logits)));  // overwritten all the same

      // Leaf logits: .grad() holds the default gradient (sharing the logits' storage).
      const at::Tensor leaf = mk.leaf(logits);
      f(in_place)(leaf).backward();
      require_agree("in place: leaf gradient", leaf.grad(), ops::to_host(expected), tol);

      // retain_graph: the second backward would read the overwritten logits; autograd raises.
      const at::Tensor w2 = mk.leaf(logits);
      const at::Tensor twice = f(in_place)(w2.clone());
      twice.backward({}, /*retain_graph=*/true);
      CHECK_THROWS(twice.backward());

      // Another node that saved the logits (tanh saves its output) and runs after: autograd raises.
      const at::Tensor w3 = mk.leaf(logits);
      CHECK_THROWS(f(in_place)(w3.tanh()).backward());

      // create_graph: refused with posttrain::error's message.
      const at::Tensor w4 = mk.leaf(logits);
      const at::Tensor l4 = f(in_place)(w4.clone());
      CHECK_THROWS_WITH(torch::autograd::grad({l4}, {w4}, {}, /*retain_graph=*/true, /*create_graph=*/true),
                        Catch::Contains("create_graph"));
    }
  // Logits the kernel path does not take (bfloat16): the default node runs and the logits are left alone.
  const torch_maker bf{at::kBFloat16};
  const at::Tensor xb = bf.leaf(logits);
  const at::Tensor before = xb.detach().clone();
  sft_loss(xb, bf.labels(labels), {.in_place_gradient = true}).loss.backward();
  CHECK(at::equal(xb.detach(), before));
  require_agree("bf16 falls back: gradient", xb.grad(),
                ops::to_host(autograd_grad(bf.values(logits),
                                           [&](const at::Tensor& x) { return sft_loss(x, bf.labels(labels)).loss; })),
                output_tolerance(dtype::bfloat16));
}

}  // namespace test_autograd
