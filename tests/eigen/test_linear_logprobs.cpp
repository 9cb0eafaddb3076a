// Differentiable fused per-token log-probs and entropy (losses/fused_linear_logprobs.hpp,
// kernels/linear_logprobs_cpu.hpp) on the Eigen backend against the unfused path in double: logits
// Z = X·Wᵀ/τ materialised, token_logprobs / entropy on Z, their *_backward for G = ∂L/∂Z and the
// chain rule written out (∂X = G·W/τ, ∂W = Gᵀ·X/τ). Also: central finite differences of
// Σ(a·lp + b·H) with respect to hidden and head, the uniform-logits closed form, every chunk size
// giving the same result, thread-count independence, float32 against the double reference, and
// every rejected input.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/losses/fused_linear_logprobs.hpp"
#include "posttrain/numerics/logits.hpp"
#include "support/data.hpp"
#include "support/finite_difference.hpp"
#include "support/linear_eigen.hpp"
#include "support/tolerances.hpp"

namespace test_linear_logprobs {  // one namespace per test file: the unity build compiles several in one TU

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

/// The unfused reference in double: Z = X·Wᵀ/τ, token_logprobs / entropy and their backwards on Z.
struct reference {
  tensor_d logprobs, entropy, grad_hidden, grad_head;
};
reference unfused(const tensor_d& hidden, const tensor_d& head, const eigen_index& labels,
                  const fused_linear_logprobs_options& o, const std::optional<tensor_d>& a,
                  const std::optional<tensor_d>& b) {
  shape_t zshape = labels.shape();
  zshape.push_back(head.shape()[0]);
  const matrix_d X = as_matrix(hidden), W = as_matrix(head);
  const tensor_d Z = from_matrix(X * W.transpose() / o.temperature, zshape);  // [..., V]
  reference ref;
  ref.logprobs = token_logprobs(Z, labels, o.ignore_index);
  ref.entropy = entropy(Z);
  matrix_d G = matrix_d::Zero(X.rows(), W.rows());  // ∂L/∂Z, [N, V]
  if (a) G += as_matrix(token_logprobs_backward(Z, labels, *a, o.ignore_index));
  if (b) G += as_matrix(entropy_backward(Z, *b));
  ref.grad_hidden = from_matrix(G * W / o.temperature, hidden.shape());          // [N, V]·[V, H]
  ref.grad_head = from_matrix(G.transpose() * X / o.temperature, head.shape());  // [V, N]·[N, H]
  return ref;
}

struct problem {
  tensor_d hidden, head;
  eigen_index labels;
  tensor_d a, b;  // upstream gradients ∂L/∂lp, ∂L/∂H
};
/// X ~ N(0, 1) [rows, H], W ~ N(0, w_scale) [V, H]; upstream gradients ~ N(0, 1) [rows].
problem make_problem(shape_t lead, std::int64_t h, std::int64_t v, std::uint64_t seed, double ignore = 0.0,
                     double w_scale = 0.3) {
  shape_t xs = lead;
  xs.push_back(h);
  return {test::to_eigen<double>(test::random_normal(xs, seed)),
          test::to_eigen<double>(test::random_normal({v, h}, seed + 1, w_scale)),
          test::to_eigen(test::random_labels(lead, v, seed + 2, ignore)),
          test::to_eigen<double>(test::random_normal(lead, seed + 3)),
          test::to_eigen<double>(test::random_normal(lead, seed + 4))};
}

/// Forward and backward (with a, b, a only, b only) against the unfused reference.
void check_against_unfused(const problem& p, fused_linear_logprobs_options o, const std::vector<std::int64_t>& chunks) {
  const std::optional<tensor_d> a = p.a, b = p.b, none;
  const reference both = unfused(p.hidden, p.head, p.labels, o, a, b);
  const reference lp_only = unfused(p.hidden, p.head, p.labels, o, a, none);
  const reference ent_only = unfused(p.hidden, p.head, p.labels, o, none, b);
  for (std::int64_t chunk : chunks) {
    o.chunk_rows = chunk;
    INFO("chunk_rows " << chunk << ", temperature " << o.temperature << ", ignore_index " << o.ignore_index);
    const auto f = fused_linear_logprobs(p.hidden, p.head, p.labels, o);
    require_close("logprobs", f.logprobs, both.logprobs, test::float64_tol);
    require_close("entropy", f.entropy, both.entropy, test::float64_tol);
    const auto g = fused_linear_logprobs_backward(p.hidden, p.head, p.labels, o, a, b);
    require_close("grad_hidden", g.grad_hidden, both.grad_hidden, test::float64_tol);
    require_close("grad_head", g.grad_head, both.grad_head, test::float64_tol);
    const auto gl = fused_linear_logprobs_backward(p.hidden, p.head, p.labels, o, a, none);
    require_close("grad_hidden (logprobs only)", gl.grad_hidden, lp_only.grad_hidden, test::float64_tol);
    require_close("grad_head (logprobs only)", gl.grad_head, lp_only.grad_head, test::float64_tol);
    const auto ge = fused_linear_logprobs_backward(p.hidden, p.head, p.labels, o, none, b);
    require_close("grad_hidden (entropy only)", ge.grad_hidden, ent_only.grad_hidden, test::float64_tol);
    require_close("grad_head (entropy only)", ge.grad_head, ent_only.grad_head, test::float64_tol);
  }
}

}  // namespace

TEST_CASE("fused linear logprobs equal the unfused logits path in double", "[linear_logprobs]") {
  // V = 1031 (prime): 5 vocabulary tiles of 256 with a ragged last one; 30% of the labels ignored.
  auto p = make_problem({13}, 7, 1031, 11, 0.3);
  fused_linear_logprobs_options o;
  SECTION("temperature 1") {}
  SECTION("temperature 0.7") { o.temperature = 0.7; }
  SECTION("temperature 1.6") { o.temperature = 1.6; }
  SECTION("ignore_index 5 (a real token id)") {
    o.ignore_index = 5;
    for (std::int64_t i = 0; i < p.labels.numel(); ++i)
      if (p.labels.data()[i] == -100) p.labels.data()[i] = 5;
  }
  check_against_unfused(p, o, {1, 3, 13, 20});
}

TEST_CASE("fused linear logprobs: a small vocabulary in one tile, no ignored labels", "[linear_logprobs]") {
  fused_linear_logprobs_options o;
  o.temperature = 0.5;
  check_against_unfused(make_problem({6}, 3, 17, 15, 0.0, 1.0), o, {1, 4, 6, 7});
}

TEST_CASE("fused linear logprobs: logits of magnitude ~1e3 and a small temperature stay exact", "[linear_logprobs]") {
  // W ~ N(0, 30): logits X·Wᵀ/τ of spread ~ 30·√8/0.25 ≈ 340 and max ~1e3, so p is nearly one-hot:
  // the kernel shifts by the row max before exp (no overflow, log p exact near the max).
  fused_linear_logprobs_options o;
  o.temperature = 0.25;
  const auto p = make_problem({9}, 8, 700, 17, 0.2, 30.0);
  check_against_unfused(p, o, {4});
  const auto f = fused_linear_logprobs(p.hidden, p.head, p.labels, o);
  for (std::int64_t i = 0; i < 9; ++i) {
    CHECK(std::isfinite(f.logprobs.values()(i)));
    CHECK(std::isfinite(f.entropy.values()(i)));
  }
}

TEST_CASE("fused linear logprobs: hidden [B, T, H] with labels [B, T]", "[linear_logprobs]") {
  const auto p = make_problem({2, 5}, 6, 300, 21, 0.2, 0.4);
  fused_linear_logprobs_options o;
  o.temperature = 0.9;
  const auto f = fused_linear_logprobs(p.hidden, p.head, p.labels, o);
  REQUIRE(f.logprobs.shape() == shape_t{2, 5});
  REQUIRE(f.entropy.shape() == shape_t{2, 5});
  const auto g = fused_linear_logprobs_backward(p.hidden, p.head, p.labels, o, p.a, p.b);
  REQUIRE(g.grad_hidden.shape() == shape_t{2, 5, 6});
  REQUIRE(g.grad_head.shape() == shape_t{300, 6});
  check_against_unfused(p, o, {3, 10});
}

TEST_CASE("fused linear logprobs closed form: zero hidden states give uniform logits", "[linear_logprobs]") {
  // X = 0 -> every logit 0 at any τ -> p = 1/V: lp = -log V, H = log V; ignored token: lp = 0.
  // Backward at X = 0: H is maximal (∂H/∂z = -p(log p + H) = 0), and ∂lp/∂z = onehot - 1/V,
  // so ∂(Σ a·lp)/∂x_t = a_t·(W[y_t] - mean_v W[v]) / τ.
  const tensor_d hidden({3, 2}, 0.0);
  const tensor_d head({4, 2}, {1.0, 2.0, -1.0, 0.5, 3.0, -2.0, 0.0, 1.5});
  const eigen_index labels({3}, {0, -100, 2});
  fused_linear_logprobs_options o;
  o.temperature = 0.5;
  const auto r = fused_linear_logprobs(hidden, head, labels, o);
  CHECK(r.logprobs.values()(0) == Approx(-std::log(4.0)).epsilon(1e-15));  // -1.386294
  CHECK(r.logprobs.values()(1) == 0.0);
  CHECK(r.logprobs.values()(2) == Approx(-std::log(4.0)).epsilon(1e-15));
  for (int i = 0; i < 3; ++i) CHECK(r.entropy.values()(i) == Approx(std::log(4.0)).epsilon(1e-15));
  const tensor_d a({3}, {1.0, 5.0, -2.0}), b({3}, {3.0, 3.0, 3.0});
  const auto g = fused_linear_logprobs_backward(hidden, head, labels, o, a, b);
  // mean_v W[v] = (0.75, 0.5); W[0] - mean = (0.25, 1.5); W[2] - mean = (2.25, -2.5); τ = 0.5.
  CHECK(g.grad_hidden(0, 0) == Approx(1.0 * 0.25 / 0.5).margin(1e-14));
  CHECK(g.grad_hidden(0, 1) == Approx(1.0 * 1.5 / 0.5).margin(1e-14));
  CHECK(g.grad_hidden(1, 0) == Approx(0.0).margin(1e-14));  // ignored: a dropped; entropy flat
  CHECK(g.grad_hidden(1, 1) == Approx(0.0).margin(1e-14));
  CHECK(g.grad_hidden(2, 0) == Approx(-2.0 * 2.25 / 0.5).margin(1e-14));
  CHECK(g.grad_hidden(2, 1) == Approx(-2.0 * -2.5 / 0.5).margin(1e-14));
  // ∂W = Gᵀ·X/τ with X = 0.
  CHECK((g.grad_head.values() == 0.0).all());
}

TEST_CASE("fused linear logprobs gradients match central finite differences", "[linear_logprobs][grad]") {
  // Tiny shapes, one ignored row (its entropy still counts), τ = 0.6, chunks of 3 rows (a ragged
  // last chunk): every coordinate of X and W perturbed in f = Σ_t a_t·lp_t + b_t·H_t.
  auto p = make_problem({4}, 3, 5, 41, 0.0, 1.0);
  p.labels.data()[2] = -100;
  fused_linear_logprobs_options o;
  o.temperature = 0.6;
  o.chunk_rows = 3;
  const auto objective = [&](const tensor_d& x, const tensor_d& w) {
    const auto r = fused_linear_logprobs(x, w, p.labels, o);
    return test::contract(p.a, r.logprobs) + test::contract(p.b, r.entropy);
  };
  const auto g = fused_linear_logprobs_backward(p.hidden, p.head, p.labels, o, p.a, p.b);
  test::check_gradient(
      "d f / d hidden", g.grad_hidden, [&](const tensor_d& x) { return objective(x, p.head); }, p.hidden);
  test::check_gradient(
      "d f / d head", g.grad_head, [&](const tensor_d& w) { return objective(p.hidden, w); }, p.head);
  // Without the entropy term the ignored row gets no gradient at all (its a_t is dropped).
  const auto ge = fused_linear_logprobs_backward(p.hidden, p.head, p.labels, o, p.a, std::optional<tensor_d>{});
  for (int h = 0; h < 3; ++h) CHECK(ge.grad_hidden(2, h) == 0.0);
}

TEST_CASE("fused linear logprobs: no upstream gradient gives zero gradients", "[linear_logprobs]") {
  const auto p = make_problem({5}, 4, 300, 51, 0.2);
  const std::optional<tensor_d> none;
  const auto g = fused_linear_logprobs_backward(p.hidden, p.head, p.labels, {}, none, none);
  CHECK(g.grad_hidden.shape() == p.hidden.shape());
  CHECK(g.grad_head.shape() == p.head.shape());
  CHECK((g.grad_hidden.values() == 0.0).all());
  CHECK((g.grad_head.values() == 0.0).all());
}

TEST_CASE("fused linear logprobs are bitwise independent of the thread count", "[linear_logprobs]") {
  thread_guard guard;
  // V = 3001: 8 tiles of 376; 37 rows in chunks of 16 (a ragged last chunk).
  const auto p = make_problem({37}, 19, 3001, 61, 0.2);
  const auto hidden = cast<float>(p.hidden), head = cast<float>(p.head);
  const std::optional<eigen_tensor<float>> a = cast<float>(p.a), b = cast<float>(p.b);
  fused_linear_logprobs_options o;
  o.chunk_rows = 16;
  o.temperature = 0.8;
  kernels::set_num_threads(1);
  const auto f1 = fused_linear_logprobs(hidden, head, p.labels, o);
  const auto g1 = fused_linear_logprobs_backward(hidden, head, p.labels, o, a, b);
  for (int threads : {2, 3, 8}) {
    kernels::set_num_threads(threads);
    INFO("threads " << threads);
    const auto f = fused_linear_logprobs(hidden, head, p.labels, o);
    const auto g = fused_linear_logprobs_backward(hidden, head, p.labels, o, a, b);
    CHECK((f.logprobs.values() == f1.logprobs.values()).all());
    CHECK((f.entropy.values() == f1.entropy.values()).all());
    CHECK((g.grad_hidden.values() == g1.grad_hidden.values()).all());
    CHECK((g.grad_head.values() == g1.grad_head.values()).all());
  }
}

TEST_CASE("fused linear logprobs in float32 agree with the double reference", "[linear_logprobs]") {
  // Inputs and upstream gradients rounded to float first; the double reference runs on the same
  // rounded values. Logits spread ~2.4/τ; gradients O(1), so float32_tol's atol is a real bound.
  const auto p = make_problem({29}, 64, 2053, 71, 0.25);
  const tensor_d x = rounded_to_float(p.hidden), w = rounded_to_float(p.head);
  const tensor_d a = rounded_to_float(p.a), b = rounded_to_float(p.b);
  fused_linear_logprobs_options o;
  o.temperature = 0.7;
  o.chunk_rows = 8;
  const reference want = unfused(x, w, p.labels, o, a, b);
  const auto f = fused_linear_logprobs(cast<float>(x), cast<float>(w), p.labels, o);
  require_close("logprobs", f.logprobs, want.logprobs, test::float32_tol);
  require_close("entropy", f.entropy, want.entropy, test::float32_tol);
  const auto g = fused_linear_logprobs_backward(cast<float>(x), cast<float>(w), p.labels, o,
                                                std::optional<eigen_tensor<float>>(cast<float>(a)),
                                                std::optional<eigen_tensor<float>>(cast<float>(b)));
  require_close("grad_hidden", g.grad_hidden, want.grad_hidden, test::float32_tol);
  require_close("grad_head", g.grad_head, want.grad_head, test::float32_tol);
}

TEST_CASE("fused linear logprobs reject invalid inputs, naming the argument", "[linear_logprobs][errors]") {
  const auto p = make_problem({4}, 3, 7, 81);
  const std::string fwd = "fused_linear_logprobs", bwd = "fused_linear_logprobs_backward";
  const auto call = [&](const tensor_d& x, const tensor_d& w, const eigen_index& y,
                        fused_linear_logprobs_options o = {}) {
    return [=] { (void)fused_linear_logprobs(x, w, y, o); };
  };
  const auto with = [&](auto set) {
    fused_linear_logprobs_options o;
    set(o);
    return o;
  };
  expect_error(call(tensor_d({3}, 1.0), p.head, p.labels), fwd, {"hidden", "rank 2"});
  expect_error(call(p.hidden, tensor_d({7, 3, 1}), p.labels), fwd, {"head", "rank 2", "[7, 3, 1]"});
  expect_error(call(p.hidden, tensor_d({7, 4}), p.labels), fwd, {"head", "[7, 4]", "[4, 3]", "[V, 3]"});
  expect_error(call(p.hidden, p.head, eigen_index({5}, {0, 1, 2, 3, 4})), fwd, {"labels", "[5]", "[4]"});
  expect_error(call(p.hidden, p.head, eigen_index({4}, {0, 7, 1, 2})), fwd, {"labels", "outside [0, 7)"});
  expect_error(call(p.hidden, p.head, eigen_index({4}, {0, -1, 1, 2})), fwd, {"labels", "outside [0, 7)", "-100"});
  expect_error(call(p.hidden, p.head, eigen_index({4}, {0, -100, 1, 2}), with([](auto& o) { o.ignore_index = 3; })),
               fwd, {"labels", "outside [0, 7)", "(3)"});
  expect_error(call(tensor_d({0, 3}), p.head, eigen_index({0}, std::vector<std::int64_t>{})), fwd, {"hidden", "empty"});
  expect_error(call(p.hidden, tensor_d({0, 3}), p.labels), fwd, {"head", "empty"});
  expect_error(call(p.hidden, p.head, p.labels, with([](auto& o) { o.chunk_rows = 0; })), fwd,
               {"options.chunk_rows", "> 0"});
  expect_error(call(p.hidden, p.head, p.labels, with([](auto& o) { o.chunk_rows = -3; })), fwd,
               {"options.chunk_rows", "-3"});
  expect_error(call(p.hidden, p.head, p.labels, with([](auto& o) { o.temperature = 0.0; })), fwd,
               {"options.temperature", "> 0", "got 0"});
  expect_error(call(p.hidden, p.head, p.labels, with([](auto& o) { o.temperature = -0.5; })), fwd,
               {"options.temperature", "-0.5"});
  expect_error(
      call(p.hidden, p.head, p.labels, with([](auto& o) { o.temperature = std::numeric_limits<double>::quiet_NaN(); })),
      fwd, {"options.temperature", "finite"});
  expect_error(
      call(p.hidden, p.head, p.labels, with([](auto& o) { o.temperature = std::numeric_limits<double>::infinity(); })),
      fwd, {"options.temperature", "finite"});
  // The backward checks the same inputs and both upstream gradients' shapes.
  const std::optional<tensor_d> none;
  expect_error(
      [&] {
        (void)fused_linear_logprobs_backward(p.hidden, tensor_d({7, 2}), p.labels, {}, p.a, none);
      },
      bwd, {"head", "[7, 2]", "[V, 3]"});
  expect_error(
      [&] {
        (void)fused_linear_logprobs_backward(p.hidden, p.head, p.labels, with([](auto& o) { o.temperature = 0.0; }),
                                             p.a, none);
      },
      bwd, {"options.temperature"});
  expect_error([&] { (void)fused_linear_logprobs_backward(p.hidden, p.head, p.labels, {}, tensor_d({5}, 1.0), none); },
               bwd, {"grad_logprobs", "[5]", "hidden", "[4, 3]", "expected grad_logprobs of shape [4]"});
  expect_error(
      [&] {
        (void)fused_linear_logprobs_backward(p.hidden, p.head, p.labels, {}, none, tensor_d({4, 1}, 1.0));
      },
      bwd, {"grad_entropy", "[4, 1]", "expected grad_entropy of shape [4]"});
  expect_error([&] { (void)fused_linear_logprobs_backward(p.hidden, p.head, p.labels, {}, p.a, tensor_d(shape_t{})); },
               bwd, {"grad_entropy", "[]"});
}

}  // namespace test_linear_logprobs
