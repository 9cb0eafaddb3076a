// The plain Eigen reference alone: this program includes backends/eigen/tensor.hpp (the traits) and
// not backends/eigen/fused.hpp, so eigen_tensor has no fused hook here and every algorithm runs its
// generic composition. (It is a program of its own: the hooks are part of a type's definition, and
// the main Eigen suite sees them.) Values are checked against closed forms.
#include <catch2/catch.hpp>
#include <cmath>
#include <limits>

#include "posttrain/backends/eigen/tensor.hpp"
#include "posttrain/fused.hpp"
#include "posttrain/losses/distill.hpp"
#include "posttrain/losses/sequence_logps.hpp"
#include "posttrain/losses/sft.hpp"
#include "posttrain/numerics/logits.hpp"

using namespace posttrain;
using T = eigen_tensor<double>;

static_assert(tensor<T>);
static_assert(!has_fused_logits_stats<T> && !has_fused_ce_backward<T> && !has_fused_kd<T> && !fused_reads_half<T>,
              "backends/eigen/tensor.hpp alone is the plain reference: no fused hook");

namespace {
constexpr double tol = 1e-12;
}

TEST_CASE("reference alone: logits primitives give their closed forms through the generic compositions",
          "[reference]") {
  // Row 0 uniform over 4: lse = log 4, log p = -log 4, H = log 4. Row 1: [0, log 3, -inf, -inf] ->
  // p = [1/4, 3/4, 0, 0]: lse = log 4, log p[1] = log 3/4, H = -(1/4 log 1/4 + 3/4 log 3/4).
  const double inf = std::numeric_limits<double>::infinity();
  const T x({2, 4}, {0, 0, 0, 0, 0, std::log(3.0), -inf, -inf});
  const eigen_index y({2}, {2, 1});
  const auto lse = logsumexp(x);
  CHECK(std::abs(lse(0) - std::log(4.0)) < tol);
  CHECK(std::abs(lse(1) - std::log(4.0)) < tol);
  const auto [lp, h] = token_logprobs_and_entropy(x, y);
  CHECK(std::abs(lp(0) + std::log(4.0)) < tol);
  CHECK(std::abs(lp(1) - std::log(0.75)) < tol);
  CHECK(std::abs(h(0) - std::log(4.0)) < tol);
  CHECK(std::abs(h(1) + (0.25 * std::log(0.25) + 0.75 * std::log(0.75))) < tol);
  // An ignored label gives log-prob 0; its entropy is still computed (verl: masking is the loss's job).
  const auto ignored = token_logprobs_and_entropy(x, eigen_index({2}, {-100, 1}));
  CHECK(ignored.logprobs(0) == 0.0);
  CHECK(std::abs(ignored.entropy(0) - std::log(4.0)) < tol);
}

TEST_CASE("reference alone: sft_loss, its metrics and its backward", "[reference]") {
  // Row 0: [0, 0, 0, 0], label 0 (argmax is index 0: a hit) -> NLL log 4. Row 1: [1, 2, 3, 4],
  // label 3 (the argmax: a hit) -> NLL = log(e + e² + e³ + e⁴) - 4. Row 2 ignored.
  const T x({3, 4}, {0, 0, 0, 0, 1, 2, 3, 4, 9, 9, 9, 9});
  const eigen_index y({3}, {0, 3, -100});
  const double z = std::exp(1.0) + std::exp(2.0) + std::exp(3.0) + std::exp(4.0);
  const double nll1 = std::log(z) - 4.0;
  const auto r = sft_loss(x, y);
  CHECK(std::abs(ops::item(r.loss) - 0.5 * (std::log(4.0) + nll1)) < tol);
  CHECK(ops::item(r.num_tokens) == 2.0);
  CHECK(ops::item(r.token_accuracy) == 1.0);
  double h1 = 0;
  for (int v = 1; v <= 4; ++v) h1 -= std::exp(v) / z * (v - std::log(z));
  CHECK(std::abs(ops::item(r.entropy) - 0.5 * (std::log(4.0) + h1)) < tol);
  // d loss/d x = (softmax - onehot) / 2 on counted rows, 0 on the ignored one.
  const auto g = sft_loss_backward(x, y);
  CHECK(std::abs(g(0, 0) - (0.25 - 1.0) / 2) < tol);
  CHECK(std::abs(g(1, 3) - (std::exp(4.0) / z - 1.0) / 2) < tol);
  CHECK(std::abs(g(1, 0) - std::exp(1.0) / z / 2) < tol);
  CHECK(g(2, 1) == 0.0);
}

TEST_CASE("reference alone: sequence log-probs and the distillation divergence", "[reference]") {
  const T x({1, 2, 2}, {0, 0, 0, std::log(3.0)});
  const auto s = sequence_logps(x, eigen_index({1, 2}, {0, 1}));
  CHECK(std::abs(ops::item(s.logps) - (std::log(0.5) + std::log(0.75))) < tol);
  // Student [0, 0], teacher [0, ln 3]: KL(p || q) = ¼ln(½) + ¾ln(3/2) (numerics/divergences.hpp's example).
  const T student({1, 2}, {0, 0}), teacher({1, 2}, {0, std::log(3.0)});
  const auto kl = kd_per_token(student, teacher);
  CHECK(std::abs(kl(0) - (0.25 * std::log(0.5) + 0.75 * std::log(1.5))) < tol);
  const auto d = distill_loss(student, teacher, eigen_index({1}, {0}), {.alpha = 0.5});
  CHECK(std::abs(ops::item(d.loss) - (0.5 * std::log(2.0) + 0.5 * kl(0))) < tol);
}
