// Process reward model loss (issue 17): OpenRLHF's PRMLoss (3c3be62, openrlhf/models/loss.py) reproduced to
// 1e-12 in float64. Golden values from tests/reference/make_golden_prm.py (python3-torch, float64, gradients by
// torch autograd); the analytic backwards are also checked against central differences.
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/posttrain.hpp"
#include "reference/golden_prm.hpp"
#include "support/eigen_checks.hpp"
#include "support/finite_difference.hpp"

namespace test_prm {  // one namespace per test file: the unity build compiles several in one TU

using namespace posttrain;
namespace g = posttrain::golden_prm;
using Catch::Matchers::Contains;

namespace {
using E = eigen_tensor<double>;
constexpr auto tol = test::conventions_tol;

eigen_index ids_of(const std::vector<std::int64_t>& v) { return eigen_index({g::B, g::T}, v); }
E logits() { return test::make({g::B, g::T, g::V}, g::logits); }
E soft() { return test::make({g::B, g::T}, g::soft_labels); }
prm_options hard_opts() { return {.placeholder_token_id = g::placeholder, .reward_token_ids = g::reward_ids}; }

void expect_rejected(const std::function<void()>& call, const std::string& function, const std::string& argument) {
  INFO("expected posttrain::" << function << " to reject " << argument);
  CHECK_THROWS_AS(call(), posttrain::error);
  CHECK_THROWS_WITH(call(), Catch::Matchers::StartsWith("posttrain::" + function + ": "));
  CHECK_THROWS_WITH(call(), Contains(argument));
}
}  // namespace

TEST_CASE("PRM loss, hard labels over reward columns: OpenRLHF PRMLoss", "[prm]") {
  const auto ids = ids_of(g::input_ids), labels = ids_of(g::labels);
  const E x = logits();
  const auto r = prm_loss(ids, x, labels, hard_opts());
  test::check_value("loss", r.loss, g::hard_loss, tol);
  test::check_values("per-step loss", r.per_step_loss, g::hard_per_step, tol);
  test::check_value("accuracy (counted placeholders)", r.accuracy, g::hard_acc_counted, tol);
  test::check_value("num_steps", r.num_steps, 4.0, tol);  // 5 placeholders, one with an ignored label
  // OpenRLHF's accuracy divides by every placeholder: the ignored one is a miss
  const auto o = prm_loss(ids, x, labels, prm_options::openrlhf(g::placeholder, g::reward_ids));
  test::check_value("accuracy (OpenRLHF)", o.accuracy, g::hard_acc_openrlhf, tol);
  CHECK(g::hard_acc_openrlhf != g::hard_acc_counted);
  test::check_value("same loss", o.loss, g::hard_loss, tol);

  const E grad = prm_loss_backward(ids, x, labels, hard_opts());
  test::check_values("d loss / d logits", grad, g::hard_grad, tol);
  test::check_values(
      "grad_loss scales", prm_loss_backward(ids, x, labels, hard_opts(), -2.5),
      [] {
        auto v = g::hard_grad;
        for (auto& e : v) e *= -2.5;
        return v;
      }(),
      tol);
  test::check_gradient(
      "finite differences", grad, [&](const E& z) { return ops::item(prm_loss(ids, z, labels, hard_opts()).loss); }, x);
}

TEST_CASE("PRM loss, soft labels (probability of the first reward token): OpenRLHF PRMLoss", "[prm]") {
  const auto ids = ids_of(g::input_ids);
  const E x = logits(), q = soft();  // -100 away from placeholders: never read
  const auto r = prm_loss_soft(ids, x, q, hard_opts());
  test::check_value("loss", r.loss, g::soft_loss, tol);
  test::check_values("per-step loss", r.per_step_loss, g::soft_per_step, tol);
  test::check_value("accuracy", r.accuracy, g::soft_acc_counted, tol);
  test::check_value("num_steps (every placeholder)", r.num_steps, 5.0, tol);
  test::check_value("accuracy (OpenRLHF)",
                    prm_loss_soft(ids, x, q, prm_options::openrlhf(g::placeholder, g::reward_ids)).accuracy,
                    g::soft_acc_openrlhf, tol);
  const E grad = prm_loss_soft_backward(ids, x, q, hard_opts());
  test::check_values("d loss / d logits", grad, g::soft_grad, tol);
  test::check_gradient(
      "finite differences", grad, [&](const E& z) { return ops::item(prm_loss_soft(ids, z, q, hard_opts()).loss); }, x);
  // hard labels are soft labels of 0 and 1: the same loss at the placeholders both count
  const auto hard_ids = ids_of({9, 9, 4, 9, 9, 9, 4, 9, 9, 9, 9, 9});
  const auto hard = prm_loss(hard_ids, x, ids_of({0, 0, 5, 0, 0, 0, 1, 0, 0, 0, 0, 0}), hard_opts());
  const auto as_soft =
      prm_loss_soft(hard_ids, x, test::make({g::B, g::T}, {0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0}), hard_opts());
  test::check_same("hard = soft at 0/1", as_soft.loss, hard.loss, tol);
  // a NaN soft label away from the placeholders changes nothing
  auto qn = g::soft_labels;
  qn[0] = std::numeric_limits<double>::quiet_NaN();
  test::check_value("NaN away from placeholders", prm_loss_soft(ids, x, test::make({g::B, g::T}, qn), hard_opts()).loss,
                    g::soft_loss, tol);
  test::check_values("NaN away from placeholders: gradient",
                     prm_loss_soft_backward(ids, x, test::make({g::B, g::T}, qn), hard_opts()), g::soft_grad, tol);
}

TEST_CASE("PRM loss over the whole vocabulary (no reward_token_ids): OpenRLHF PRMLoss", "[prm]") {
  const auto ids = ids_of(g::input_ids), labels = ids_of(g::labels_vocab);
  const E x = logits();
  const prm_options opt{.placeholder_token_id = g::placeholder};
  const auto r = prm_loss(ids, x, labels, opt);
  test::check_value("loss", r.loss, g::vocab_loss, tol);
  test::check_values("per-step loss", r.per_step_loss, g::vocab_per_step, tol);
  test::check_value("accuracy", r.accuracy, g::vocab_acc_counted, tol);
  test::check_value("accuracy (OpenRLHF)", prm_loss(ids, x, labels, prm_options::openrlhf(g::placeholder, {})).accuracy,
                    g::vocab_acc_openrlhf, tol);
  const E grad = prm_loss_backward(ids, x, labels, opt);
  test::check_values("d loss / d logits", grad, g::vocab_grad, tol);
  test::check_gradient(
      "finite differences", grad, [&](const E& z) { return ops::item(prm_loss(ids, z, labels, opt).loss); }, x);
}

TEST_CASE("PRM loss: the header's example, float32, and nothing selected", "[prm]") {
  // one placeholder, logits [0, 0] at the reward columns, label the first: log 2, a tie -> column 0 -> hit
  const eigen_index one_id({1, 1}, std::vector<std::int64_t>{7});
  const prm_options opt{.placeholder_token_id = 7, .reward_token_ids = {2, 0}};
  const auto ex = prm_loss(one_id, test::make({1, 1, 3}, {0.0, 5.0, 0.0}), eigen_index({1, 1}, {2}), opt);
  test::check_value("log 2", ex.loss, std::log(2.0), tol);
  test::check_value("tie -> first column", ex.accuracy, 1.0, tol);

  // float32 against the float64 golden values
  const auto x32 = test::make<float>({g::B, g::T, g::V}, g::logits);
  const auto r32 = prm_loss(ids_of(g::input_ids), x32, ids_of(g::labels), hard_opts());
  CHECK(ops::dtype_of(r32.loss) == dtype::float32);
  test::check_value("float32 loss", r32.loss, g::hard_loss, test::float32_tol);
  test::check_values("float32 gradient", prm_loss_backward(ids_of(g::input_ids), x32, ids_of(g::labels), hard_opts()),
                     g::hard_grad, test::float32_tol);

  // no placeholder, or only ignored labels: 0, not NaN (torch's mean over nothing)
  const E x = logits();
  const auto none = ids_of(std::vector<std::int64_t>(12, 0));
  for (const auto& o : {hard_opts(), prm_options{.placeholder_token_id = g::placeholder}}) {
    const auto r = prm_loss(none, x, ids_of(g::labels_vocab), o);
    test::check_value("loss", r.loss, 0.0, tol);
    test::check_value("accuracy", r.accuracy, 0.0, tol);
    test::check_values("gradient", prm_loss_backward(none, x, ids_of(g::labels_vocab), o),
                       std::vector<double>(g::logits.size(), 0.0), tol);
  }
  const auto ignored = ids_of(std::vector<std::int64_t>(12, -100));
  const auto r = prm_loss(ids_of(g::input_ids), x, ignored, prm_options::openrlhf(g::placeholder, g::reward_ids));
  test::check_value("all ignored: loss", r.loss, 0.0, tol);
  test::check_value("all ignored: accuracy (every placeholder a miss)", r.accuracy, 0.0, tol);
  test::check_value("all ignored: num_steps", r.num_steps, 0.0, tol);
}

TEST_CASE("PRM loss rejects bad inputs by name", "[prm][errors]") {
  const auto ids = ids_of(g::input_ids), labels = ids_of(g::labels);
  const E x = logits(), q = soft();
  const auto hard = [&](const prm_options& o) { return [&, o] { (void)prm_loss(ids, x, labels, o); }; };
  const auto softc = [&](const prm_options& o) { return [&, o] { (void)prm_loss_soft(ids, x, q, o); }; };
  expect_rejected(hard({.reward_token_ids = g::reward_ids}), "prm_loss", "options.placeholder_token_id");
  expect_rejected(hard({.placeholder_token_id = 4, .reward_token_ids = {5, 7}}), "prm_loss",
                  "options.reward_token_ids[1] = 7");
  expect_rejected(hard({.placeholder_token_id = 4, .reward_token_ids = {-1, 5}}), "prm_loss",
                  "options.reward_token_ids[0] = -1");
  expect_rejected(hard({.placeholder_token_id = 4, .reward_token_ids = {5, 1, 5}}), "prm_loss", "5 twice");
  expect_rejected(hard({.placeholder_token_id = 4, .reward_token_ids = {5, 1}, .ignore_index = 1}), "prm_loss",
                  "equals options.ignore_index");
  expect_rejected(softc({.placeholder_token_id = 4, .reward_token_ids = {5, 1, 2}}), "prm_loss_soft",
                  "2 token ids for soft labels");
  expect_rejected(softc({.placeholder_token_id = 4}), "prm_loss_soft", "2 token ids for soft labels");
  // a label at a placeholder that is no reward id (6 at [0, 2]); the same value elsewhere is fine
  auto bad = g::labels;
  bad[2] = 6;
  expect_rejected([&] { (void)prm_loss(ids, x, ids_of(bad), hard_opts()); }, "prm_loss",
                  "neither options.ignore_index (-100) nor one of options.reward_token_ids (the first: 6)");
  expect_rejected([&] { (void)prm_loss_backward(ids, x, ids_of(bad), hard_opts()); }, "prm_loss_backward", "labels");
  // whole vocabulary: every label in [0, V) or ignore_index
  auto out = g::labels_vocab;
  out[1] = 7;
  expect_rejected([&] { (void)prm_loss(ids, x, ids_of(out), {.placeholder_token_id = 4}); }, "prm_loss",
                  "outside [0, 7)");
  // soft labels outside [0, 1] (or NaN) at a placeholder
  for (const double v : {-100.0, 1.5, std::numeric_limits<double>::quiet_NaN()}) {
    auto s = g::soft_labels;
    s[4] = v;
    expect_rejected(
        [&] {
          (void)prm_loss_soft(ids, x, test::make({g::B, g::T}, s), hard_opts());
        },
        "prm_loss_soft", "outside [0, 1]");
  }
  // shapes and dtypes
  expect_rejected(
      [&] {
        (void)prm_loss(eigen_index({g::B, g::T - 1}, std::vector<std::int64_t>(10, 0)), x, labels, hard_opts());
      },
      "prm_loss", "input_ids has shape [2, 5]");
  expect_rejected([&] { (void)prm_loss(ids, x, eigen_index({g::B * g::T}, g::labels), hard_opts()); }, "prm_loss",
                  "labels has shape [12]");
  expect_rejected(
      [&] {
        (void)prm_loss_soft(ids, x, test::make({g::T, g::B}, g::soft_labels), hard_opts());
      },
      "prm_loss_soft", "labels has shape [6, 2]");
  expect_rejected(
      [&] {
        (void)prm_loss(eigen_index(shape_t{}, {4}), test::make({g::V}, std::vector<double>(7, 0.0)),
                       eigen_index(shape_t{}, {5}), hard_opts());
      },
      "prm_loss", "rank >= 2");
  expect_rejected([&] { (void)prm_loss_backward(ids, x, labels, hard_opts(), std::nan("")); }, "prm_loss_backward",
                  "grad_loss");
  expect_rejected([&] { (void)prm_loss_soft_backward(ids, x, q, hard_opts(), INFINITY); }, "prm_loss_soft_backward",
                  "grad_loss");
}

}  // namespace test_prm
