// Fused linear cross-entropy (losses/fused_linear_ce.hpp, kernels/linear_ce_cpu.hpp) on the Eigen
// backend against the unfused path in double: logits Z = X·Wᵀ materialised, then sft_loss /
// sft_loss_backward (G = ∂loss/∂Z), token_logprobs and entropy on Z, and the chain rule written
// out, ∂X = G·W and ∂W = Gᵀ·X. Also: central finite differences of the fused loss on tiny shapes,
// every chunk size giving the same result, results bitwise independent of the thread count,
// ignored rows, all labels ignored (0, not NaN), float32 against the double reference, and every
// rejected input.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/losses/fused_linear_ce.hpp"
#include "posttrain/losses/sft.hpp"
#include "posttrain/numerics/logits.hpp"
#include "support/data.hpp"
#include "support/finite_difference.hpp"
#include "support/linear_eigen.hpp"
#include "support/tolerances.hpp"

namespace test_linear_ce {  // one namespace per test file: the unity build compiles several in one TU

using namespace posttrain;
using Catch::Matchers::Contains;
using tensor_d = eigen_tensor<double>;
using test::as_matrix;
using test::cast;
using test::expect_error;
using test::from_matrix;
using test::matrix_d;
using test::require_close;
using test::rounded_to_float;
using test::thread_guard;

namespace {

/// The unfused reference in double: Z = X·Wᵀ, the SFT loss on Z and the chain rule.
struct reference {
  double loss = 0;
  tensor_d per_token, logprobs, entropy, grad_hidden, grad_head;
};
reference unfused(const tensor_d& hidden, const tensor_d& head, const eigen_index& labels,
                  const fused_linear_ce_options& o, double grad_loss = 1.0) {
  shape_t zshape = labels.shape();
  zshape.push_back(head.shape()[0]);
  const matrix_d X = as_matrix(hidden), W = as_matrix(head);
  const tensor_d Z = from_matrix(X * W.transpose(), zshape);  // [..., V]
  sft_options so;
  so.ignore_index = o.ignore_index;
  so.label_smoothing = o.label_smoothing;
  so.z_loss = o.z_loss;
  so.reduction = o.reduction;
  so.normalizer = o.normalizer;
  const auto r = sft_loss(Z, labels, so);
  const matrix_d G = as_matrix(sft_loss_backward(Z, labels, so, grad_loss));
  reference ref;
  ref.loss = r.loss.values()(0);
  ref.per_token = r.per_token_loss;
  ref.logprobs = token_logprobs(Z, labels, o.ignore_index);
  ref.entropy = entropy(Z);
  ref.grad_hidden = from_matrix(G * W, hidden.shape());          // [N, V]·[V, H]
  ref.grad_head = from_matrix(G.transpose() * X, head.shape());  // [V, N]·[N, H]
  return ref;
}

template <class S>
void require_matches(const fused_linear_ce_gradients<eigen_tensor<S>>& got, const reference& want,
                     test::tolerance tol) {
  INFO("loss " << got.result.loss.values()(0) << " vs " << want.loss);
  REQUIRE(tol.accepts(static_cast<double>(got.result.loss.values()(0)), want.loss));
  require_close("per_token_loss", got.result.per_token_loss, want.per_token, tol);
  require_close("logprobs", got.result.logprobs, want.logprobs, tol);
  require_close("entropy", got.result.entropy, want.entropy, tol);
  require_close("grad_hidden", got.grad_hidden, want.grad_hidden, tol);
  require_close("grad_head", got.grad_head, want.grad_head, tol);
}

struct problem {
  tensor_d hidden, head;
  eigen_index labels;
};
/// X ~ N(0, 1) [rows, H], W ~ N(0, w_scale) [V, H] (logits of spread ~ w_scale·√H).
problem make_problem(std::int64_t rows, std::int64_t h, std::int64_t v, std::uint64_t seed, double ignore = 0.0,
                     double w_scale = 0.3) {
  return {test::to_eigen<double>(test::random_normal({rows, h}, seed)),
          test::to_eigen<double>(test::random_normal({v, h}, seed + 1, w_scale)),
          test::to_eigen(test::random_labels({rows}, v, seed + 2, ignore))};
}

}  // namespace

TEST_CASE("fused linear CE equals the unfused logits path in double", "[linear_ce]") {
  // V = 1031 (prime): 5 vocabulary tiles of 256 with a ragged last one; 30% of the labels ignored.
  auto p = make_problem(13, 7, 1031, 11, 0.3);
  fused_linear_ce_options o;
  double grad_loss = 1.0;
  SECTION("token mean") {}
  SECTION("label smoothing 0.1") { o.label_smoothing = 0.1; }
  SECTION("z-loss 1e-3 with smoothing 0.2") {
    o.z_loss = 1e-3;
    o.label_smoothing = 0.2;
  }
  SECTION("sum reduction, grad_loss 0.7") {
    o.reduction = aggregation::sum;
    grad_loss = 0.7;
  }
  SECTION("token mean over a global normalizer 40") { o.normalizer = 40.0; }
  SECTION("ignore_index 5 (a real token id)") {
    o.ignore_index = 5;
    for (std::int64_t i = 0; i < p.labels.numel(); ++i)
      if (p.labels.data()[i] == -100) p.labels.data()[i] = 5;
  }
  const reference want = unfused(p.hidden, p.head, p.labels, o, grad_loss);
  for (std::int64_t chunk : {1, 3, 13, 20}) {
    o.chunk_rows = chunk;
    INFO("chunk_rows " << chunk);
    const auto got = fused_linear_cross_entropy_and_grad(p.hidden, p.head, p.labels, o, grad_loss);
    require_matches(got, want, test::float64_tol);
    // The forward-only call gives the same forward.
    const auto fwd = fused_linear_cross_entropy(p.hidden, p.head, p.labels, o);
    REQUIRE(fwd.loss.values()(0) == got.result.loss.values()(0));
    require_close("forward-only entropy", fwd.entropy, want.entropy, test::float64_tol);
  }
  // num_tokens counts the labels != ignore_index.
  std::int64_t valid = 0;
  for (std::int64_t i = 0; i < p.labels.numel(); ++i) valid += p.labels.data()[i] != o.ignore_index;
  CHECK(fused_linear_cross_entropy(p.hidden, p.head, p.labels, o).num_tokens.values()(0) == valid);
}

TEST_CASE("fused linear CE: hidden [B, T, H] with labels [B, T]", "[linear_ce]") {
  const tensor_d hidden = test::to_eigen<double>(test::random_normal({2, 5, 6}, 21));
  const tensor_d head = test::to_eigen<double>(test::random_normal({300, 6}, 22, 0.4));
  const eigen_index labels = test::to_eigen(test::random_labels({2, 5}, 300, 23, 0.2));
  const auto got = fused_linear_cross_entropy_and_grad(hidden, head, labels, {});
  REQUIRE(got.grad_hidden.shape() == shape_t{2, 5, 6});
  REQUIRE(got.result.entropy.shape() == shape_t{2, 5});
  require_matches(got, unfused(hidden, head, labels, {}), test::float64_tol);
}

TEST_CASE("fused linear CE closed form: zero hidden states give uniform logits", "[linear_ce]") {
  // X = 0 -> every logit 0 -> p = 1/V: loss log V, log p = -log V, entropy log V (any W).
  const std::int64_t v = 4;
  const tensor_d hidden({3, 2}, 0.0);
  const tensor_d head = test::to_eigen<double>(test::random_normal({v, 2}, 31));
  const eigen_index labels({3}, {0, 3, 1});
  const auto r = fused_linear_cross_entropy(hidden, head, labels);
  CHECK(r.loss.values()(0) == Approx(std::log(4.0)).epsilon(1e-15));  // 1.386294
  for (int i = 0; i < 3; ++i) {
    CHECK(r.logprobs.values()(i) == Approx(-std::log(4.0)).epsilon(1e-15));
    CHECK(r.entropy.values()(i) == Approx(std::log(4.0)).epsilon(1e-15));
  }
}

TEST_CASE("fused linear CE gradients match central finite differences", "[linear_ce][grad]") {
  // Tiny shapes, one ignored row, smoothing and z-loss on: every coordinate of X and W perturbed.
  auto p = make_problem(4, 3, 5, 41, 0.0, 1.0);
  p.labels.data()[2] = -100;
  fused_linear_ce_options o;
  o.label_smoothing = 0.1;
  o.z_loss = 0.01;
  o.chunk_rows = 3;
  const auto g = fused_linear_cross_entropy_and_grad(p.hidden, p.head, p.labels, o);
  const auto loss_of_hidden = [&](const tensor_d& x) {
    return fused_linear_cross_entropy(x, p.head, p.labels, o).loss.values()(0);
  };
  const auto loss_of_head = [&](const tensor_d& w) {
    return fused_linear_cross_entropy(p.hidden, w, p.labels, o).loss.values()(0);
  };
  test::check_gradient("d loss / d hidden", g.grad_hidden, loss_of_hidden, p.hidden);
  test::check_gradient("d loss / d head", g.grad_head, loss_of_head, p.head);
  // The ignored row has no gradient at all.
  for (int h = 0; h < 3; ++h) CHECK(g.grad_hidden(2, h) == 0.0);
}

TEST_CASE("fused linear CE with every label ignored is 0, not NaN", "[linear_ce]") {
  const auto p = make_problem(6, 4, 300, 51, 1.0);  // ignore fraction 1
  const auto g = fused_linear_cross_entropy_and_grad(p.hidden, p.head, p.labels, {});
  CHECK(g.result.loss.values()(0) == 0.0);
  CHECK(g.result.num_tokens.values()(0) == 0.0);
  CHECK((g.grad_hidden.values() == 0.0).all());
  CHECK((g.grad_head.values() == 0.0).all());
  // Entropy is still reported for every token (forward-only output).
  require_close("entropy", g.result.entropy, unfused(p.hidden, p.head, p.labels, {}).entropy, test::float64_tol);
}

TEST_CASE("fused linear CE results are bitwise independent of the thread count", "[linear_ce]") {
  thread_guard guard;
  // V = 3001: 8 tiles of 376; 37 rows in chunks of 16 (a ragged last chunk).
  const auto p = make_problem(37, 19, 3001, 61, 0.2);
  const auto hidden = cast<float>(p.hidden), head = cast<float>(p.head);
  fused_linear_ce_options o;
  o.chunk_rows = 16;
  o.label_smoothing = 0.05;
  kernels::set_num_threads(1);
  const auto one = fused_linear_cross_entropy_and_grad(hidden, head, p.labels, o);
  for (int threads : {2, 3, 8}) {
    kernels::set_num_threads(threads);
    INFO("threads " << threads);
    const auto many = fused_linear_cross_entropy_and_grad(hidden, head, p.labels, o);
    CHECK(many.result.loss.values()(0) == one.result.loss.values()(0));
    CHECK((many.result.per_token_loss.values() == one.result.per_token_loss.values()).all());
    CHECK((many.result.entropy.values() == one.result.entropy.values()).all());
    CHECK((many.grad_hidden.values() == one.grad_hidden.values()).all());
    CHECK((many.grad_head.values() == one.grad_head.values()).all());
  }
}

TEST_CASE("fused linear CE in float32 agrees with the double reference", "[linear_ce]") {
  // Inputs rounded to float first; the double reference runs on the same rounded values. Sum
  // reduction keeps gradients O(1e-2) so float32_tol's atol is a real bound; logits spread ~2.4.
  const auto p = make_problem(29, 64, 2053, 71, 0.25);
  const tensor_d x = rounded_to_float(p.hidden), w = rounded_to_float(p.head);
  fused_linear_ce_options o;
  o.reduction = aggregation::sum;
  o.label_smoothing = 0.1;
  o.chunk_rows = 8;
  const auto got = fused_linear_cross_entropy_and_grad(cast<float>(x), cast<float>(w), p.labels, o);
  require_matches(got, unfused(x, w, p.labels, o), test::float32_tol);
}

TEST_CASE("fused linear CE rejects invalid inputs, naming the argument", "[linear_ce][errors]") {
  const auto p = make_problem(4, 3, 7, 81);
  const std::string fwd = "fused_linear_cross_entropy", both = "fused_linear_cross_entropy_and_grad";
  const auto call = [&](const tensor_d& x, const tensor_d& w, const eigen_index& y, fused_linear_ce_options o = {}) {
    return [=] { (void)fused_linear_cross_entropy(x, w, y, o); };
  };
  const auto with = [&](auto set) {
    fused_linear_ce_options o;
    set(o);
    return o;
  };
  expect_error(call(tensor_d({3}, 1.0), p.head, p.labels), fwd, {"hidden", "rank 2"});
  expect_error(call(p.hidden, tensor_d({7, 3, 1}), p.labels), fwd, {"head", "rank 2", "[7, 3, 1]"});
  expect_error(call(p.hidden, tensor_d({7, 4}), p.labels), fwd, {"head", "[7, 4]", "[4, 3]", "[V, 3]"});
  expect_error(call(p.hidden, p.head, eigen_index({5}, {0, 1, 2, 3, 4})), fwd, {"labels", "[5]", "[4]"});
  expect_error(call(p.hidden, p.head, eigen_index({4}, {0, 7, 1, 2})), fwd, {"labels", "outside [0, 7)"});
  expect_error(call(p.hidden, p.head, eigen_index({4}, {0, -1, 1, 2})), fwd, {"labels", "outside [0, 7)", "-100"});
  expect_error(call(tensor_d({0, 3}), p.head, eigen_index({0}, std::vector<std::int64_t>{})), fwd, {"hidden", "empty"});
  expect_error(call(p.hidden, tensor_d({0, 3}), p.labels), fwd, {"head", "empty"});
  expect_error(call(p.hidden, p.head, p.labels, with([](auto& o) { o.chunk_rows = 0; })), fwd,
               {"options.chunk_rows", "> 0"});
  expect_error(call(p.hidden, p.head, p.labels, with([](auto& o) { o.chunk_rows = -3; })), fwd,
               {"options.chunk_rows", "-3"});
  expect_error(call(p.hidden, p.head, p.labels, with([](auto& o) { o.label_smoothing = 1.0; })), fwd,
               {"options.label_smoothing", "[0, 1)"});
  expect_error(call(p.hidden, p.head, p.labels, with([](auto& o) { o.label_smoothing = -0.1; })), fwd,
               {"options.label_smoothing"});
  expect_error(call(p.hidden, p.head, p.labels,
                    with([](auto& o) { o.label_smoothing = std::numeric_limits<double>::quiet_NaN(); })),
               fwd, {"options.label_smoothing", "finite"});
  expect_error(call(p.hidden, p.head, p.labels, with([](auto& o) { o.z_loss = -1e-4; })), fwd, {"options.z_loss"});
  expect_error(call(p.hidden, p.head, p.labels, with([](auto& o) { o.reduction = aggregation::seq_mean_token_mean; })),
               fwd, {"options.reduction", "seq-mean-token-mean"});
  expect_error(call(p.hidden, p.head, p.labels, with([](auto& o) { o.normalizer = 0.0; })), fwd, {"normalizer"});
  expect_error([&] { (void)fused_linear_cross_entropy_and_grad(p.hidden, p.head, p.labels, {}, std::nan("")); }, both,
               {"grad_loss", "finite"});
  expect_error(
      [&] {
        (void)fused_linear_cross_entropy_and_grad(p.hidden, tensor_d({7, 2}), p.labels);
      },
      both, {"head"});
}

}  // namespace test_linear_ce
