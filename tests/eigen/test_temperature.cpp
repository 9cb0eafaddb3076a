// Sampling temperature T (issue 15 item 4): every logits primitive and the losses over them take
// logits / T before the log-softmax, as TRL (GRPOTrainer._get_per_token_logps: `logits /= self.temperature`)
// and verl (dp_actor._forward_micro_batch: `logits.div_(temperature)`) do. Expected values are
// composed by hand: the T = 1 function applied to logits / T (divided here, in the test), plain loops
// for log-softmax and entropy, the chain rule (T = 1 backward on logits / T, times 1/T) and central
// finite differences of the forward. Both the fused path (the Eigen backend's hooks and kernels) and
// the generic composition (posttrain::generic) are checked, for T in {0.5, 0.7, 1.3}; T = 1 gives the
// untempered results exactly; T = 0, negative, NaN and inf are rejected by every entry.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/kernels/logits_cpu.hpp"
#include "posttrain/losses/fused_linear_ce.hpp"
#include "posttrain/losses/fused_linear_logprobs.hpp"
#include "posttrain/losses/sequence_logps.hpp"
#include "posttrain/losses/sft.hpp"
#include "posttrain/numerics/logits.hpp"
#include "support/data.hpp"
#include "support/eigen_checks.hpp"
#include "support/finite_difference.hpp"
#include "support/linear_eigen.hpp"
#include "support/tolerances.hpp"

namespace test_temperature {  // one namespace per test file: the unity build compiles several in one TU

using namespace posttrain;
using tensor_d = eigen_tensor<double>;
using tensor_f = eigen_tensor<float>;
using test::expect_error;
using test::require_close;

namespace {

const std::vector<double> temperatures{0.5, 0.7, 1.3};
constexpr double inf = std::numeric_limits<double>::infinity();

/// x / T element by element (the composition the frameworks write).
template <class S>
eigen_tensor<S> divided(const eigen_tensor<S>& x, double t) {
  eigen_tensor<S> out(x.shape());
  for (std::int64_t i = 0; i < x.numel(); ++i) out.data()[i] = static_cast<S>(static_cast<double>(x.data()[i]) / t);
  return out;
}
tensor_d times(const tensor_d& x, double k) {
  tensor_d out(x.shape());
  for (std::int64_t i = 0; i < x.numel(); ++i) out.data()[i] = x.data()[i] * k;
  return out;
}

/// logits [2, 3, 7] (normal, σ = 2), labels [2, 3] with position [1, 1] ignored.
tensor_d logits_small() { return test::to_eigen<double>(test::random_normal({2, 3, 7}, 1501, 2.0)); }
eigen_index labels_small() { return eigen_index({2, 3}, {3, 0, 6, 2, -100, 5}); }

/// Plain loops in double: log softmax(x_r / T)[y_r] (0 if ignored) and the entropy of softmax(x_r / T).
struct by_hand {
  std::vector<double> logprob, entropy;
};
by_hand loops(const tensor_d& x, const eigen_index& labels, double t) {
  const std::int64_t v = x.shape().back(), rows = x.numel() / v;
  by_hand r;
  for (std::int64_t i = 0; i < rows; ++i) {
    const double* row = x.data() + i * v;
    double m = -inf;
    for (std::int64_t j = 0; j < v; ++j) m = std::max(m, row[j] / t);
    double s = 0.0;
    for (std::int64_t j = 0; j < v; ++j) s += std::exp(row[j] / t - m);
    const double lse = m + std::log(s);
    double h = 0.0;
    for (std::int64_t j = 0; j < v; ++j) {
      const double lp = row[j] / t - lse;
      h -= std::exp(lp) * lp;
    }
    const std::int64_t y = labels.data()[i];
    r.logprob.push_back(y == -100 ? 0.0 : row[y] / t - lse);
    r.entropy.push_back(h);
  }
  return r;
}

void require_values(const std::string& what, const tensor_d& got, const std::vector<double>& want) {
  INFO(what);
  REQUIRE(got.numel() == static_cast<std::int64_t>(want.size()));
  for (std::size_t i = 0; i < want.size(); ++i) {
    INFO("element " << i << ": got " << got.data()[i] << ", want " << want[i]);
    CHECK(test::float64_tol.accepts(got.data()[i], want[i]));
  }
}

}  // namespace

TEST_CASE("token_logprobs, entropy and both together at temperature T are the T = 1 functions of logits / T",
          "[temperature]") {
  const tensor_d x = logits_small();
  const eigen_index y = labels_small();
  for (const double t : temperatures) {
    INFO("T = " << t);
    const tensor_d z = divided(x, t);
    const by_hand hand = loops(x, y, t);
    // fused path (the Eigen backend's logits_stats hook, kernels::logits_forward with 1/T)
    const tensor_d lp = token_logprobs(x, y, {.temperature = t});
    const tensor_d h = entropy(x, {.temperature = t});
    const auto both = token_logprobs_and_entropy(x, y, {.temperature = t});
    require_close("token_logprobs vs T = 1 on x / T", lp, token_logprobs(z, y), test::float64_tol);
    require_close("entropy vs T = 1 on x / T", h, entropy(z), test::float64_tol);
    require_close("together: log-probs", both.logprobs, token_logprobs(z, y), test::float64_tol);
    require_close("together: entropy", both.entropy, entropy(z), test::float64_tol);
    require_values("token_logprobs vs loops", lp, hand.logprob);
    require_values("entropy vs loops", h, hand.entropy);
    // generic path (posttrain::generic::logits_stats divides first, as TRL)
    const auto g =
        generic::logits_stats(x, &y, {.logsumexp = true, .logprob = true, .entropy = true, .temperature = t});
    require_values("generic log-probs vs loops", g.logprob, hand.logprob);
    require_values("generic entropy vs loops", g.entropy, hand.entropy);
    require_close("generic logsumexp vs logsumexp(x / T)", g.logsumexp, logsumexp(z), test::float64_tol);
    // float32 kernels against the double composition
    const tensor_f xf = test::cast<float>(x);
    const auto bf = token_logprobs_and_entropy(xf, y, {.temperature = t});
    require_close("float32 log-probs", bf.logprobs, token_logprobs(divided(test::rounded_to_float(x), t), y),
                  test::float32_tol);
    require_close("float32 entropy", bf.entropy, entropy(divided(test::rounded_to_float(x), t)), test::float32_tol);
  }
}

TEST_CASE("temperature 1 gives the untempered results bit for bit", "[temperature]") {
  const tensor_d x = logits_small();
  const eigen_index y = labels_small();
  const auto same_bits = [](const tensor_d& a, const tensor_d& b) {
    REQUIRE(a.shape() == b.shape());
    for (std::int64_t i = 0; i < a.numel(); ++i) CHECK(a.data()[i] == b.data()[i]);
  };
  same_bits(token_logprobs(x, y, {.temperature = 1.0}), token_logprobs(x, y));
  same_bits(entropy(x, {.temperature = 1.0}), entropy(x));
  same_bits(sft_loss(x, y, {.label_smoothing = 0.1, .temperature = 1.0}).loss,
            sft_loss(x, y, {.label_smoothing = 0.1}).loss);
  // The kernel's unscaled loop: a row through reduce_row with inv_t = 1 equals the default call exactly.
  const auto a = kernels::reduce_row(x.data(), 7, 1.0), b = kernels::reduce_row(x.data(), 7);
  CHECK(a.m == b.m);
  CHECK(a.log_s == b.log_s);
  CHECK(a.t_over_s == b.t_over_s);
}

TEST_CASE("gradients at temperature T carry 1/T: analytic vs composed and vs finite differences",
          "[temperature][grad]") {
  const tensor_d x = logits_small();
  const eigen_index y = labels_small();
  const tensor_d w = test::to_eigen<double>(test::random_normal({2, 3}, 1502));  // upstream ∂L/∂(per-token value)
  for (const double t : temperatures) {
    INFO("T = " << t);
    const tensor_d z = divided(x, t);
    // token_logprobs: d/dx lp(x / T) = (onehot - softmax(x / T)) / T
    const tensor_d g_lp = token_logprobs_backward(x, y, w, {.temperature = t});
    require_close("token_logprobs_backward vs T = 1 backward on x / T, / T", g_lp,
                  times(token_logprobs_backward(z, y, w), 1.0 / t), test::float64_tol);
    test::check_gradient(
        "token_logprobs", g_lp,
        [&](const tensor_d& p) { return test::contract(w, token_logprobs(p, y, {.temperature = t})); }, x);
    // entropy
    const tensor_d g_h = entropy_backward(x, w, {.temperature = t});
    require_close("entropy_backward vs composed", g_h, times(entropy_backward(z, w), 1.0 / t), test::float64_tol);
    test::check_gradient(
        "entropy", g_h, [&](const tensor_d& p) { return test::contract(w, entropy(p, {.temperature = t})); }, x);
  }
}

TEST_CASE("sequence_logps at temperature T: values and gradient", "[temperature][grad]") {
  const tensor_d x = logits_small();
  const eigen_index y = labels_small();
  const tensor_d g = test::make({2}, {0.7, -1.3});
  for (const double t : temperatures) {
    for (const auto red : {sequence_reduction::sum, sequence_reduction::mean}) {
      INFO("T = " << t << ", mean = " << (red == sequence_reduction::mean));
      const sequence_logps_options o{.reduction = red, .temperature = t};
      const auto r = sequence_logps(x, y, o);
      const auto ref = sequence_logps(divided(x, t), y, {.reduction = red});
      require_close("sequence log-probs vs T = 1 on x / T", r.logps, ref.logps, test::float64_tol);
      // by hand: Σ_t of the loops' log-probs (÷ 2 completion tokens in row 1 for mean, 3 in row 0)
      const by_hand hand = loops(x, y, t);
      const double n0 = red == sequence_reduction::mean ? 3.0 : 1.0, n1 = red == sequence_reduction::mean ? 2.0 : 1.0;
      require_values("sequence log-probs vs loops", r.logps,
                     {(hand.logprob[0] + hand.logprob[1] + hand.logprob[2]) / n0,
                      (hand.logprob[3] + hand.logprob[4] + hand.logprob[5]) / n1});
      const tensor_d grad = sequence_logps_backward(x, y, g, o);
      require_close("sequence_logps_backward vs composed", grad,
                    times(sequence_logps_backward(divided(x, t), y, g, {.reduction = red}), 1.0 / t),
                    test::float64_tol);
      test::check_gradient(
          "sequence_logps", grad, [&](const tensor_d& p) { return test::contract(g, sequence_logps(p, y, o).logps); },
          x);
    }
  }
}

TEST_CASE("sft_loss at temperature T: every option, fused and generic backward", "[temperature][grad]") {
  const tensor_d x = logits_small();
  const eigen_index y = labels_small();
  const std::vector<sft_options> cases{
      {},
      {.label_smoothing = 0.1},
      {.z_loss = 1e-2},
      {.dft = true},
      {.label_smoothing = 0.2, .z_loss = 1e-3, .reduction = aggregation::sum},
  };
  for (const double t : temperatures) {
    for (std::size_t c = 0; c < cases.size(); ++c) {
      INFO("T = " << t << ", option case " << c);
      sft_options o = cases[c];
      o.temperature = t;
      const sft_options o1 = cases[c];  // the same at T = 1, applied to x / T
      const tensor_d z = divided(x, t);
      const auto r = sft_loss(x, y, o);
      const auto ref = sft_loss(z, y, o1);
      require_close("loss", r.loss, ref.loss, test::float64_tol);
      require_close("per-token loss", r.per_token_loss, ref.per_token_loss, test::float64_tol);
      require_close("entropy metric", r.entropy, ref.entropy, test::float64_tol);
      require_close("token accuracy", r.token_accuracy, ref.token_accuracy, test::float64_tol);
      // fused ce_backward hook and the generic composition, against the chain rule and finite differences
      const tensor_d fused = sft_loss_backward(x, y, o, 0.9);
      const tensor_d plain = generic::sft_loss_backward(x, y, o, 0.9);
      const tensor_d composed = times(sft_loss_backward(z, y, o1, 0.9), 1.0 / t);
      require_close("fused backward vs composed", fused, composed, test::float64_tol);
      require_close("generic backward vs composed", plain, composed, test::float64_tol);
      if (!o.dft)  // DFT's weight is detached: its analytic gradient is not the derivative of the value
        test::check_gradient(
            "sft_loss", fused, [&](const tensor_d& p) { return 0.9 * sft_loss(p, y, o).loss.data()[0]; }, x);
    }
  }
}

TEST_CASE("the kernels' tempered row statistics and both backward writers on rows spanning several blocks",
          "[temperature][kernels]") {
  // V = 5000 (three blocks of 2048): the running max rises in the later blocks (rescaling in the
  // scaled units), one -inf padding column per 97, and the label in the last block.
  const std::int64_t v = 5000;
  auto h = test::random_normal({1, v}, 1503, 3.0);
  for (std::int64_t j = 0; j < v; ++j) h.values[static_cast<std::size_t>(j)] += 0.002 * static_cast<double>(j);
  for (std::int64_t j = 5; j < v; j += 97) h.values[static_cast<std::size_t>(j)] = -inf;
  const tensor_d x = test::to_eigen<double>(h);
  const std::int64_t label = 4321;
  const eigen_index y({1}, {label});
  for (const double t : temperatures) {
    INFO("T = " << t);
    const tensor_d z = divided(x, t);
    const auto st = kernels::reduce_row(x.data(), v, 1.0 / t);
    const auto sz = kernels::reduce_row(z.data(), v);
    CHECK(test::float64_tol.accepts(st.logsumexp(), sz.logsumexp()));
    CHECK(test::float64_tol.accepts(st.entropy(), sz.entropy()));
    CHECK(test::float64_tol.accepts(st.logp(x.data()[label]), sz.logp(z.data()[label])));
    // Gradient of a·lp + b·H + c·lse w.r.t. x: coefficients of d/dz (z = x / T), the writer applies 1/T.
    const double a = 0.8, b = -0.6, c = 0.3;
    const kernels::backward_coefficients k{c - b * st.entropy(), -b, 0.0, 0.0, a};
    tensor_d by_writer(x.shape()), by_kept(x.shape());
    kernels::write_row_backward(x.data(), v, st, k, label, by_writer.data());
    // the kept-exponential writer (β = 0 only): a·lp + c·lse
    const kernels::backward_coefficients k0{c, 0.0, 0.0, 0.0, a};
    std::vector<double> block_max(static_cast<std::size_t>(kernels::blocks_per_row(v)));
    const auto kept = kernels::reduce_row_keep(x.data(), v, by_kept.data(), block_max.data(), false, 1.0 / t);
    kernels::write_row_backward_kept(by_kept.data(), v, kept, block_max.data(), k0, label, by_kept.data());
    // composed: the T = 1 generic backwards on z, times 1/T
    const tensor_d one = test::make({1}, {1.0});
    const tensor_d d_lp = token_logprobs_backward(z, y, one), d_h = entropy_backward(z, one),
                   d_lse = logsumexp_backward(z, one);
    tensor_d want(x.shape()), want0(x.shape());
    for (std::int64_t j = 0; j < v; ++j) {
      want.data()[j] = (a * d_lp.data()[j] + b * d_h.data()[j] + c * d_lse.data()[j]) / t;
      want0.data()[j] = (a * d_lp.data()[j] + c * d_lse.data()[j]) / t;
    }
    require_close("write_row_backward", by_writer, want, test::float64_tol);
    require_close("write_row_backward_kept", by_kept, want0, test::float64_tol);
  }
}

TEST_CASE("fused_linear_cross_entropy at temperature τ: X·Wᵀ/τ, gradients with 1/τ", "[temperature][grad]") {
  const tensor_d hidden = test::to_eigen<double>(test::random_normal({5, 4}, 1504));
  const tensor_d head = test::to_eigen<double>(test::random_normal({9, 4}, 1505));
  const eigen_index y({5}, {1, 8, -100, 0, 4});
  const test::matrix_d X = test::as_matrix(hidden), W = test::as_matrix(head);
  const tensor_d logits = test::from_matrix(X * W.transpose(), {5, 9});
  for (const double t : temperatures) {
    for (const double eps : {0.0, 0.1}) {
      INFO("T = " << t << ", label smoothing " << eps);
      const fused_linear_ce_options o{.label_smoothing = eps, .z_loss = 1e-3, .chunk_rows = 2, .temperature = t};
      const auto r = fused_linear_cross_entropy_and_grad(hidden, head, y, o, 0.7);
      // the materialised logits through sft_loss at T, and through sft_loss at T = 1 on X·Wᵀ / T
      const sft_options so{.label_smoothing = eps, .z_loss = 1e-3, .temperature = t};
      const auto ref = sft_loss(logits, y, so);
      const auto ref1 = sft_loss(divided(logits, t), y, {.label_smoothing = eps, .z_loss = 1e-3});
      require_close("loss vs sft_loss at T", r.result.loss, ref.loss, test::float64_tol);
      require_close("loss vs sft_loss(X·Wᵀ / T)", r.result.loss, ref1.loss, test::float64_tol);
      require_close("per-token loss", r.result.per_token_loss, ref.per_token_loss, test::float64_tol);
      require_close("entropy", r.result.entropy, entropy(logits, {.temperature = t}), test::float64_tol);
      require_close("log-probs", r.result.logprobs, token_logprobs(logits, y, {.temperature = t}), test::float64_tol);
      // chain rule by hand: G = ∂loss/∂(X·Wᵀ) from sft_loss_backward at T (it carries 1/T); ∂X = G·W, ∂W = Gᵀ·X
      const test::matrix_d G = test::as_matrix(sft_loss_backward(logits, y, so, 0.7));
      require_close("grad hidden vs G·W", r.grad_hidden, test::from_matrix(G * W, hidden.shape()), test::float64_tol);
      require_close("grad head vs Gᵀ·X", r.grad_head, test::from_matrix(G.transpose() * X, head.shape()),
                    test::float64_tol);
      test::check_gradient(
          "fused_linear_cross_entropy (hidden)", r.grad_hidden,
          [&](const tensor_d& p) { return 0.7 * fused_linear_cross_entropy(p, head, y, o).loss.data()[0]; }, hidden);
      test::check_gradient(
          "fused_linear_cross_entropy (head)", r.grad_head,
          [&](const tensor_d& p) { return 0.7 * fused_linear_cross_entropy(hidden, p, y, o).loss.data()[0]; }, head);
    }
  }
}

TEST_CASE("a temperature that is zero, negative, NaN or infinite is rejected by every entry", "[temperature][errors]") {
  const tensor_d x = logits_small();
  const eigen_index y = labels_small();
  const tensor_d w = test::to_eigen<double>(test::random_normal({2, 3}, 1506));
  const tensor_d g = test::make({2}, {1.0, 1.0});
  const tensor_d hidden = test::to_eigen<double>(test::random_normal({2, 3, 4}, 1507));
  const tensor_d head = test::to_eigen<double>(test::random_normal({7, 4}, 1508));
  struct bad {
    double value;
    std::string text;
  };
  const std::vector<bad> bads{{0.0, "must be > 0, got 0"},
                              {-0.7, "must be > 0, got -0.7"},
                              {std::numeric_limits<double>::quiet_NaN(), "must be finite"},
                              {inf, "must be finite, got inf"},
                              {-inf, "must be finite, got -inf"}};
  for (const bad& b : bads) {
    const double t = b.value;
    INFO("T = " << t);
    const std::vector<std::string> parts{"options.temperature", b.text};
    expect_error([&] { (void)token_logprobs(x, y, {.temperature = t}); }, "token_logprobs", parts);
    expect_error([&] { (void)token_logprobs_backward(x, y, w, {.temperature = t}); }, "token_logprobs_backward", parts);
    expect_error([&] { (void)entropy(x, {.temperature = t}); }, "entropy", parts);
    expect_error([&] { (void)entropy_backward(x, w, {.temperature = t}); }, "entropy_backward", parts);
    expect_error([&] { (void)token_logprobs_and_entropy(x, y, {.temperature = t}); }, "token_logprobs_and_entropy",
                 parts);
    expect_error([&] { (void)sequence_logps(x, y, {.temperature = t}); }, "sequence_logps", parts);
    expect_error([&] { (void)sequence_logps_backward(x, y, g, {.temperature = t}); }, "sequence_logps_backward", parts);
    expect_error([&] { (void)sft_loss(x, y, {.temperature = t}); }, "sft_loss", parts);
    expect_error([&] { (void)sft_loss_backward(x, y, {.temperature = t}); }, "sft_loss_backward", parts);
    expect_error([&] { (void)fused_linear_cross_entropy(hidden, head, y, {.temperature = t}); },
                 "fused_linear_cross_entropy", parts);
    expect_error([&] { (void)fused_linear_cross_entropy_and_grad(hidden, head, y, {.temperature = t}); },
                 "fused_linear_cross_entropy_and_grad", parts);
    expect_error([&] { (void)fused_linear_logprobs(hidden, head, y, {.temperature = t}); }, "fused_linear_logprobs",
                 {"options.temperature"});
  }
}

}  // namespace test_temperature
