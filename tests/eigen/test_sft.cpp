// SFT cross-entropy on the Eigen backend:
//  * PyTorch's documented cross_entropy (docs: torch.nn.functional.cross_entropy, "label_smoothing":
//    the target becomes (1 - ε)·onehot + ε/C, so ℓ = (1 - ε)·nll + ε·mean_v(-log p_v)), evaluated by
//    hand on a 2 × 2 × 3 case with an ignored position, plus PaLM's z-loss (z·lse², arXiv:2204.02311 §5)
//    and DFT (sg(p_y)·ℓ, arXiv:2508.05629 eq. 8), under every reduction; metrics by hand;
//  * a plain-loop reference of the same definition on random inputs, every option combination;
//  * sft_loss_backward against central finite differences for every option combination.
#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/kl/estimators.hpp"
#include "posttrain/kl/exact.hpp"
#include "posttrain/losses/sft.hpp"
#include "posttrain/numerics/aggregate.hpp"
#include "posttrain/numerics/logits.hpp"
#include "posttrain/numerics/masked.hpp"
#include "posttrain/numerics/stable.hpp"
#include "support/data.hpp"
#include "support/eigen_checks.hpp"
#include "support/finite_difference.hpp"

namespace test_sft {  // one namespace per test file: the unity build compiles several in one TU

using namespace posttrain;

namespace {
const double ln2 = std::log(2.0), ln3 = std::log(3.0), ln4 = std::log(4.0), ln6 = std::log(6.0);
constexpr aggregation all_modes[] = {aggregation::token_mean, aggregation::seq_mean_token_sum,
                                     aggregation::seq_mean_token_mean, aggregation::seq_mean_token_sum_norm,
                                     aggregation::sum};

/// PyTorch's cross_entropy definition (+ z-loss, DFT) per token, in plain loops over doubles: the
/// independent reference. With `dft_weight`, DFT multiplies by that fixed per-token value (the
/// stop-gradient p_y, evaluated at another point) instead of p_y at these logits.
eigen_tensor<double> reference_per_token(const eigen_tensor<double>& logits, const eigen_index& labels,
                                         const sft_options& o, const eigen_tensor<double>* dft_weight = nullptr) {
  const std::int64_t v = logits.shape().back();
  eigen_tensor<double> out(labels.shape());
  for (std::int64_t r = 0; r < labels.numel(); ++r) {
    const std::int64_t y = labels.values()(r);
    if (y == o.ignore_index) continue;
    double m = -std::numeric_limits<double>::infinity();
    for (std::int64_t k = 0; k < v; ++k) m = std::max(m, logits.values()(r * v + k));
    double z = 0;
    for (std::int64_t k = 0; k < v; ++k) z += std::exp(logits.values()(r * v + k) - m);
    const double lse = m + std::log(z);
    double mean_neg_logp = 0;  // mean_v(-log p_v)
    for (std::int64_t k = 0; k < v; ++k) mean_neg_logp += (lse - logits.values()(r * v + k)) / static_cast<double>(v);
    const double nll = lse - logits.values()(r * v + y);
    double l = (1 - o.label_smoothing) * nll + o.label_smoothing * mean_neg_logp;
    if (o.dft) l *= dft_weight ? dft_weight->values()(r) : std::exp(-nll);
    l += o.z_loss * lse * lse;
    out.values()(r) = l;
  }
  return out;
}

/// p[label] per token (0 where ignored), by the same plain loops.
eigen_tensor<double> reference_label_probability(const eigen_tensor<double>& logits, const eigen_index& labels,
                                                 std::int64_t ignore_index) {
  sft_options nll_only{.ignore_index = ignore_index};
  eigen_tensor<double> p = reference_per_token(logits, labels, nll_only);
  for (std::int64_t r = 0; r < labels.numel(); ++r)
    p.values()(r) = labels.values()(r) == ignore_index ? 0.0 : std::exp(-p.values()(r));
  return p;
}

eigen_tensor<double> valid_mask(const eigen_index& labels, std::int64_t ignore_index) {
  eigen_tensor<double> m(labels.shape());
  for (std::int64_t r = 0; r < labels.numel(); ++r) m.values()(r) = labels.values()(r) != ignore_index ? 1.0 : 0.0;
  return m;
}

/// The hand case: logits [2, 2, 3], labels [[2, 1], [0, -100]].
///   (0,0) [0, ln 2, ln 3]  Z = 6, p = [1/6, 1/3, 1/2], y = 2: nll = ln 2, p_y = 1/2, argmax 2 (hit)
///   (0,1) [ln 4, 0, 0]     Z = 6, p = [2/3, 1/6, 1/6], y = 1: nll = ln 6, p_y = 1/6, argmax 0 (miss)
///   (1,0) [ln 2, 0, 0]     Z = 4, p = [1/2, 1/4, 1/4], y = 0: nll = ln 2, p_y = 1/2, argmax 0 (hit)
///   (1,1) [5, -3, 100]     ignored (large logits that must not leak into anything)
template <class S>
eigen_tensor<S> hand_logits() {
  return test::make<S>({2, 2, 3}, {0, ln2, ln3, ln4, 0, 0, ln2, 0, 0, 5, -3, 100});
}
const eigen_index hand_labels({2, 2}, {2, 1, 0, -100});

struct token_terms {
  double nll, smooth, lse, p_y;
};
// smooth = mean_v(-log p_v): (0,0) -log p = [ln 6, ln 3, ln 2]; (0,1) [ln(3/2), ln 6, ln 6]; (1,0) [ln 2, ln 4, ln 4].
const token_terms hand_terms[3] = {
    {ln2, (ln6 + ln3 + ln2) / 3, ln6, 0.5},
    {ln6, (std::log(1.5) + 2 * ln6) / 3, ln6, 1.0 / 6},
    {ln2, (ln2 + 2 * ln4) / 3, ln4, 0.5},
};
}  // namespace

TEMPLATE_TEST_CASE("SFT loss and metrics by hand (PyTorch cross_entropy definition)", "[sft]", float, double) {
  const auto tol = test::tol_of<TestType>();
  const auto logits = hand_logits<TestType>();
  for (double eps : {0.0, 0.1})
    for (double z : {0.0, 1e-2})
      for (bool dft : {false, true}) {
        // ℓ = (1 - ε)·nll + ε·smooth, × p_y with DFT, + z·lse²
        double l[3];
        for (int t = 0; t < 3; ++t) {
          const auto& h = hand_terms[t];
          l[t] = ((1 - eps) * h.nll + eps * h.smooth) * (dft ? h.p_y : 1.0) + z * h.lse * h.lse;
        }
        const double total = l[0] + l[1] + l[2];
        struct mode_case {
          aggregation mode;
          std::optional<double> normalizer;
          double want;
        };
        const mode_case modes[] = {
            {aggregation::token_mean, {}, total / 3},          // PyTorch "mean": 3 counted tokens
            {aggregation::sum, {}, total},                     // PyTorch "sum"
            {aggregation::seq_mean_token_sum, {}, total / 2},  // 2 sequences
            {aggregation::seq_mean_token_mean, {}, ((l[0] + l[1]) / 2 + l[2]) / 2},
            {aggregation::seq_mean_token_sum_norm, {}, total / 4},  // B·T = 4
            {aggregation::token_mean, 6.0, total / 6},              // TRL num_items_in_batch = 6
        };
        for (const auto& m : modes) {
          INFO("eps " << eps << ", z " << z << ", dft " << dft << ", " << aggregation_name(m.mode)
                      << (m.normalizer ? " with normaliser" : ""));
          const sft_options o{
              .label_smoothing = eps, .z_loss = z, .reduction = m.mode, .normalizer = m.normalizer, .dft = dft};
          const auto r = sft_loss(logits, hand_labels, o);
          test::check_value("loss", r.loss, m.want, tol);
          test::check_values("per_token_loss", r.per_token_loss, {l[0], l[1], l[2], 0.0}, tol);
          // Metrics do not depend on the options: 3 tokens, 2 of 3 argmax hits, mean entropy of the
          // counted tokens: H(1/6, 1/3, 1/2) = ln6/6 + ln3/3 + ln2/2; H(2/3, 1/6, 1/6) = (2/3) ln(3/2) + ln6/3;
          // H(1/2, 1/4, 1/4) = (3/2) ln 2.
          test::check_value("num_tokens", r.num_tokens, 3.0, tol);
          test::check_value("token_accuracy", r.token_accuracy, 2.0 / 3, tol);
          test::check_value("entropy", r.entropy,
                            ((ln6 / 6 + ln3 / 3 + ln2 / 2) + (2.0 / 3 * std::log(1.5) + ln6 / 3) + 1.5 * ln2) / 3, tol);
        }
      }
  // The plain case written out: (ln 2 + ln 6 + ln 2) / 3 = 1.059351; with ε = 0.1: 1.076063.
  CHECK(test::rounds_to(ops::item(sft_loss(hand_logits<double>(), hand_labels).loss), 1.059351, 6));
  CHECK(test::rounds_to(ops::item(sft_loss(hand_logits<double>(), hand_labels, {.label_smoothing = 0.1}).loss),
                        1.076063, 6));
}

TEMPLATE_TEST_CASE("SFT gradient by hand", "[sft][grad]", float, double) {
  const auto tol = test::tol_of<TestType>();
  // d(mean ℓ)/dx = (softmax - (1 - ε)·onehot(y) - ε/V) / 3 per counted token, 0 at the ignored one.
  // ε = 0: (0,0) ([1/6, 1/3, 1/2] - [0, 0, 1]) / 3; (0,1) ([2/3, 1/6, 1/6] - [0, 1, 0]) / 3;
  //        (1,0) ([1/2, 1/4, 1/4] - [1, 0, 0]) / 3.
  const auto g = sft_loss_backward(hand_logits<TestType>(), hand_labels);
  test::check_values("grad", g,
                     {1. / 18, 1. / 9, -1. / 6, 2. / 9, -5. / 18, 1. / 18, -1. / 6, 1. / 12, 1. / 12, 0, 0, 0}, tol);
  // ε = 0.3, sum, grad_loss 2: 2·(p - 0.7·onehot - 0.1). Token (1,0): 2·([0.5, 0.25, 0.25] - [0.8, 0.1, 0.1]).
  const auto gs = sft_loss_backward(hand_logits<TestType>(), hand_labels,
                                    {.label_smoothing = 0.3, .reduction = aggregation::sum}, 2.0);
  CHECK(gs(1, 0, 0) == Approx(2 * (0.5 - 0.8)).margin(tol.atol));
  CHECK(gs(1, 0, 1) == Approx(2 * (0.25 - 0.1)).margin(tol.atol));
  CHECK(gs(1, 1, 2) == 0);
}

TEST_CASE("SFT matches the plain-loop reference on random inputs, every option", "[sft]") {
  for (std::uint64_t seed : {41u, 42u}) {
    const auto logits = test::to_eigen<double>(test::random_normal({3, 4, 6}, seed, 2.0));
    auto lh = test::random_labels({3, 4}, 6, seed + 1, 0.3);
    for (std::size_t t = 8; t < 12; ++t) lh.values[t] = -100;  // the last sequence has no token
    const auto labels = test::to_eigen(lh);
    const auto valid = valid_mask(labels, -100);
    for (double eps : {0.0, 0.2})
      for (double z : {0.0, 0.05})
        for (bool dft : {false, true})
          for (auto mode : all_modes) {
            const sft_options o{.label_smoothing = eps, .z_loss = z, .reduction = mode, .dft = dft};
            INFO("seed " << seed << ", eps " << eps << ", z " << z << ", dft " << dft << ", "
                         << aggregation_name(mode));
            const auto want = reference_per_token(logits, labels, o);
            const auto r = sft_loss(logits, labels, o);
            test::check_same("per_token_loss", r.per_token_loss, want, test::float64_tol);
            test::check_same("loss", r.loss, aggregate(want, valid, mode), test::float64_tol);
          }
  }
}

TEST_CASE("sft_loss_backward matches finite differences for every option combination", "[sft][grad]") {
  const auto logits = test::to_eigen<double>(test::random_normal({2, 3, 4}, 51, 1.5));
  const eigen_index labels({2, 3}, {3, -100, 0, 1, 2, -100});
  const auto valid = valid_mask(labels, -100);
  // DFT's weight is a stop-gradient: the derivative holds it at its value at `logits`.
  const auto p_y = reference_label_probability(logits, labels, -100);
  for (double eps : {0.0, 0.1})
    for (double z : {0.0, 0.05})
      for (bool dft : {false, true})
        for (auto mode : all_modes)
          for (std::optional<double> normalizer : {std::optional<double>{}, std::optional<double>{7.5}}) {
            const double grad_loss = normalizer ? -0.7 : 1.0;  // the upstream gradient scales the result
            const sft_options o{
                .label_smoothing = eps, .z_loss = z, .reduction = mode, .normalizer = normalizer, .dft = dft};
            INFO("eps " << eps << ", z " << z << ", dft " << dft << ", " << aggregation_name(mode)
                        << (normalizer ? " with normaliser" : "") << ", grad_loss " << grad_loss);
            const auto analytic = sft_loss_backward(logits, labels, o, grad_loss);
            if (!dft) {
              // Through posttrain's own forward: the pair is consistent.
              test::check_gradient(
                  "sft (forward)", analytic,
                  [&](const auto& x) { return grad_loss * ops::item(sft_loss(x, labels, o).loss); }, logits);
            } else {
              test::check_gradient(
                  "sft dft (reference with sg(p_y))", analytic,
                  [&](const auto& x) {
                    return grad_loss *
                           ops::item(aggregate(reference_per_token(x, labels, o, &p_y), valid, mode, normalizer));
                  },
                  logits);
            }
          }
  // A custom ignore_index and rank-2 logits [N, V].
  const auto flat = ops::reshape(logits, {6, 4});
  const eigen_index custom({6}, {3, 9, 0, 1, 9, 2});
  const sft_options o{.ignore_index = 9, .label_smoothing = 0.1};
  test::check_gradient(
      "sft ignore_index 9", sft_loss_backward(flat, custom, o),
      [&](const auto& x) { return ops::item(sft_loss(x, custom, o).loss); }, flat);
}

TEMPLATE_TEST_CASE("SFT with every token ignored is 0, with zero gradient and metrics", "[sft]", float, double) {
  const auto tol = test::tol_of<TestType>();
  const auto logits = hand_logits<TestType>();
  const eigen_index none({2, 2}, {-100, -100, -100, -100});
  for (auto mode : all_modes) {
    INFO(aggregation_name(mode));
    const sft_options o{.label_smoothing = 0.1, .z_loss = 1e-3, .reduction = mode, .dft = true};
    const auto r = sft_loss(logits, none, o);
    for (const auto* t : {&r.loss, &r.num_tokens, &r.token_accuracy, &r.entropy})
      test::check_value("zero", *t, 0.0, tol);
    test::check_values("per_token_loss", r.per_token_loss, {0, 0, 0, 0}, tol);
    test::check_values("grad", sft_loss_backward(logits, none, o), std::vector<double>(12, 0.0), tol);
  }
}

}  // namespace test_sft
