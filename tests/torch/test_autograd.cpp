// LibTorch autograd through each forward vs the analytic backward functions (on torch and on the
// Eigen double reference), central finite differences of the torch float64 forward for the masked
// reductions, and the fused LibTorch kernels vs posttrain::generic's compositions.
#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <cmath>
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

/// Turns sft_loss's one-node form on or off for a scope (torch_backend::set_sft_node), restoring it after.
struct sft_node_setting {
  explicit sft_node_setting(bool on) { torch_backend::set_sft_node(on); }
  ~sft_node_setting() { torch_backend::set_sft_node(true); }
  sft_node_setting(const sft_node_setting&) = delete;
  sft_node_setting& operator=(const sft_node_setting&) = delete;
};

TEST_CASE("sft_loss one-node form: values, metrics and gradients equal the composition and the Eigen reference",
          "[sft][grad][sft_node]") {
  // The plain options (no smoothing, z-loss or DFT; token_mean or sum) take backends/torch/sft_node.hpp;
  // the composition around the statistics node (set_sft_node(false)) and the Eigen double reference are
  // what it must equal: the loss, each per-token loss, the three metrics, and the gradient of a function
  // that reads both differentiable outputs (g_loss and g_ℓ both reach the node's backward).
  const host_tensor clean = random_normal({3, 5, 13}, 181, 2.5);
  host_tensor logits = clean;
  const host_labels labels = random_labels({3, 5}, 13, 182, 0.3);
  // An ignored row of NaN logits: excluded from the loss and every metric, an exact 0 gradient.
  std::int64_t ignored = -1;
  for (std::size_t r = 0; r < labels.values.size(); ++r)
    if (labels.values[r] == default_ignore_index) ignored = static_cast<std::int64_t>(r);
  REQUIRE(ignored >= 0);
  for (std::int64_t v = 0; v < 13; ++v)
    logits.values[static_cast<std::size_t>(ignored * 13 + v)] = std::numeric_limits<double>::quiet_NaN();
  const host_tensor token_weights = random_normal({3, 5}, 183, 1.0);
  const std::vector<sft_options> options = {
      {},
      {.reduction = aggregation::sum},
      {.reduction = aggregation::token_mean, .normalizer = 6.0},
      {.reduction = aggregation::sum, .normalizer = 4.0},
      {.temperature = 0.7},
  };
  for (auto dt : float_types)
    for (const sft_options& opt : options) {
      const torch_maker mk{dt};
      const eigen_maker<double> ref{dt};
      const auto tol = output_tolerance(dtype_of(dt));
      INFO(mk.name() << " " << aggregation_name(opt.reduction) << " normalizer " << opt.normalizer.value_or(0) << " T "
                     << opt.temperature);
      const at::Tensor y = mk.labels(labels), c = mk.values(token_weights);
      const auto f = [&](const at::Tensor& x) {
        const sft_result<at::Tensor> r = sft_loss(x, y, opt);
        return r.loss * 0.75 + (r.per_token_loss * c).sum();
      };
      const at::Tensor x_node = mk.leaf(logits);
      const sft_result<at::Tensor> node = sft_loss(x_node, y, opt);
      REQUIRE(node.loss.grad_fn());
      CHECK_THAT(node.loss.grad_fn()->name(), Catch::Contains("sft_function"));
      sft_result<at::Tensor> comp;
      at::Tensor g_comp, g1_comp, g2_comp;
      {
        const sft_node_setting off(false);
        comp = sft_loss(mk.leaf(logits), y, opt);
        CHECK_THAT(comp.loss.grad_fn()->name(), !Catch::Contains("sft_function"));
        // (on finite logits: the composition's autograd gradient is NaN on an ignored NaN row, README "Status")
        g_comp = autograd_grad(mk.values(clean), f);
        const at::Tensor leaf = mk.leaf(clean);
        const at::Tensor g1 = torch::autograd::grad({f(leaf)}, {leaf}, {}, true, true)[0];
        g1_comp = g1.detach();
        g2_comp = torch::autograd::grad({(g1 * g1).sum()}, {leaf})[0];
      }
      const sft_result<eigen_tensor<double>> want = sft_loss(ref.values(logits), ref.labels(labels), opt);
      const std::pair<const char*, std::pair<at::Tensor, at::Tensor>> fields[] = {
          {"loss", {node.loss, comp.loss}},
          {"per_token_loss", {node.per_token_loss, comp.per_token_loss}},
          {"num_tokens", {node.num_tokens, comp.num_tokens}},
          {"token_accuracy", {node.token_accuracy, comp.token_accuracy}},
          {"entropy", {node.entropy, comp.entropy}}};
      const eigen_tensor<double>* wants[] = {&want.loss, &want.per_token_loss, &want.num_tokens, &want.token_accuracy,
                                             &want.entropy};
      for (std::size_t i = 0; i < 5; ++i) {
        INFO(fields[i].first);
        CHECK(fields[i].second.first.sizes() == fields[i].second.second.sizes());
        CHECK(fields[i].second.first.scalar_type() == fields[i].second.second.scalar_type());
        CHECK(all_finite(fields[i].second.first));
        require_agree("node vs composition", fields[i].second.first, ops::to_host(fields[i].second.second), tol);
        require_agree("node vs eigen double", fields[i].second.first, ops::to_host(*wants[i]), tol);
      }
      // No grad: the same values without a node.
      {
        const torch::NoGradGuard no_grad;
        const sft_result<at::Tensor> plain = sft_loss(mk.values(logits), y, opt);
        CHECK_FALSE(plain.loss.grad_fn());
        require_agree("no-grad loss", plain.loss, ops::to_host(node.loss), tol);
        require_agree("no-grad entropy", plain.entropy, ops::to_host(node.entropy), tol);
      }
      // The node's gradient against central finite differences of its own forward (float64, finite logits).
      if (dt == at::kDouble)
        require_agree("gradient: node vs central differences", autograd_grad(mk.values(clean), f),
                      central_differences(mk.values(clean), f), finite_difference_tol);
      // Gradient through both outputs.
      const at::Tensor g_node = autograd_grad(mk.values(logits), f);
      CHECK(all_finite(g_node));
      CHECK(g_node.view({-1, 13})[ignored].abs().sum().item<double>() == 0.0);
      require_agree("gradient: node vs composition", autograd_grad(mk.values(clean), f), ops::to_host(g_comp), tol);
      // The Eigen reference: 0.75·d loss + Σ_t c_t d ℓ_t, from sft_loss_backward (loss) and the sum form.
      sft_options as_sum = opt;
      as_sum.reduction = aggregation::sum;
      as_sum.normalizer = std::nullopt;
      const eigen_tensor<double> g_ref_loss = sft_loss_backward(ref.values(logits), ref.labels(labels), opt, 0.75);
      std::vector<double> g_ref = ops::to_host(g_ref_loss);
      for (std::int64_t t = 0; t < 15; ++t) {
        host_labels one = labels;  // ℓ_t alone: every other label ignored
        for (std::int64_t u = 0; u < 15; ++u)
          if (u != t) one.values[static_cast<std::size_t>(u)] = default_ignore_index;
        const std::vector<double> gt = ops::to_host(sft_loss_backward(
            ref.values(logits), ref.labels(one), as_sum, token_weights.values[static_cast<std::size_t>(t)]));
        for (std::size_t i = 0; i < g_ref.size(); ++i) g_ref[i] += gt[i];
      }
      require_agree("gradient: node vs eigen double", g_node, g_ref, tol);
      // create_graph (finite logits: the composition's LibTorch form is NaN on a NaN row, ignored or not): the
      // node's LibTorch form, differentiable again; first and second derivatives as the composition's.
      const at::Tensor leaf = mk.leaf(clean);
      const at::Tensor g1 = torch::autograd::grad({f(leaf)}, {leaf}, {}, true, true)[0];
      require_agree("create_graph gradient", g1, ops::to_host(g1_comp), tol);
      const at::Tensor g2 = torch::autograd::grad({(g1 * g1).sum()}, {leaf})[0];
      CHECK(g2.abs().sum().item<double>() > 0.0);
      require_agree("second derivative: node vs composition", g2, ops::to_host(g2_comp), tol);
      // ... and on the NaN row's logits the node's create_graph gradient is still an exact 0 there.
      const at::Tensor leaf_nan = mk.leaf(logits);
      const at::Tensor g1_nan = torch::autograd::grad({f(leaf_nan)}, {leaf_nan}, {}, true, true)[0];
      CHECK(g1_nan.view({-1, 13})[ignored].abs().sum().item<double>() == 0.0);
      require_agree("create_graph gradient, NaN ignored row", g1_nan, ops::to_host(g_node), tol);
    }
}

TEST_CASE("autograd: a row of NaN logits with no upstream gradient gets an exact 0 on every path",
          "[sft][grad][numerics]") {
  // Issue 13's rule (a finite loss has a finite gradient): an ignored token of sft_loss with label smoothing
  // (the composition around the statistics node), or a masked token of masked_mean(token_logprobs(...)),
  // whose logits hold NaN. Its upstream gradients are all 0; the statistics node's backward wrote 0·NaN = NaN
  // there before. Each path of the node: kernel, rows (forced), chunked (forced), and the in-place node.
  host_tensor logits = random_normal({4, 9}, 191, 2.0);
  host_labels labels = random_labels({4}, 9, 192, 0.0);
  labels.values[2] = default_ignore_index;
  for (std::int64_t v = 0; v < 9; ++v) logits.values[static_cast<std::size_t>(2 * 9 + v)] = std::nan("");
  const host_tensor mask_values{{4}, {1.0, 1.0, 0.0, 1.0}};
  using torch_backend::logits_path;
  for (const logits_path path : {logits_path::automatic, logits_path::rows, logits_path::chunked})
    for (auto dt : float_types) {
      torch_backend::force_logits_path(path);
      const torch_maker mk{dt};
      INFO(mk.name() << " path " << static_cast<int>(path));
      const at::Tensor y = mk.labels(labels), mask = mk.values(mask_values);
      for (const bool in_place : {false, true}) {
        const sft_options smoothing{.label_smoothing = 0.1, .in_place_gradient = in_place};
        const at::Tensor x = mk.leaf(logits);
        const at::Tensor loss = sft_loss(x, y, smoothing).loss;
        REQUIRE(std::isfinite(loss.item<double>()));
        loss.backward();
        CHECK(all_finite(x.grad()));
        CHECK(x.grad()[2].abs().sum().item<double>() == 0.0);
      }
      const auto masked_value = [&](const at::Tensor& x) {
        return masked_mean(token_logprobs(x, y), mask) + masked_mean(entropy(x), mask);
      };
      const at::Tensor x = mk.leaf(logits);
      const at::Tensor value = masked_value(x);
      REQUIRE(std::isfinite(value.item<double>()));
      value.backward();
      CHECK(all_finite(x.grad()));
      CHECK(x.grad()[2].abs().sum().item<double>() == 0.0);
      // create_graph: the node's backward in LibTorch ops, the same exact 0, and equal to the first-order result
      const at::Tensor x2 = mk.leaf(logits);
      const at::Tensor g2 = torch::autograd::grad({masked_value(x2)}, {x2}, {}, true, true)[0];
      CHECK(all_finite(g2));
      CHECK(g2[2].abs().sum().item<double>() == 0.0);
      require_agree("create_graph vs first order", g2, ops::to_host(x.grad()), output_tolerance(dtype_of(dt)));
      const at::Tensor x3 = mk.leaf(logits);
      const at::Tensor g3 =
          torch::autograd::grad({sft_loss(x3, y, {.label_smoothing = 0.1}).loss}, {x3}, {}, true, true)[0];
      CHECK(all_finite(g3));
    }
  torch_backend::force_logits_path(logits_path::automatic);
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
