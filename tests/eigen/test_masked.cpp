// Masked reductions, whitening and loss aggregation on the Eigen backend:
//  * published test vectors from torchtune, verl, TRL and OpenRLHF (tests named in each comment;
//    values quoted to 6 decimals are compared at that precision, the rest exactly by formula),
//  * each aggregation mode by hand, with and without a global normaliser,
//  * the normaliser's promise: the sum over micro-batches (or the mean over data-parallel ranks)
//    equals the whole-batch loss,
//  * gradients: d aggregate / d loss = aggregation_weights, and masked mean/variance, by finite differences.
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

namespace test_masked {  // one namespace per test file: the unity build compiles several in one TU

using namespace posttrain;

namespace {
constexpr double qnan = std::numeric_limits<double>::quiet_NaN();
constexpr aggregation all_modes[] = {aggregation::token_mean, aggregation::seq_mean_token_sum,
                                     aggregation::seq_mean_token_mean, aggregation::seq_mean_token_sum_norm,
                                     aggregation::sum};

/// Rows [begin, end) of a [B, T] tensor.
template <class S>
eigen_tensor<S> rows(const eigen_tensor<S>& x, std::int64_t begin, std::int64_t end) {
  const std::int64_t t = x.shape()[1];
  return eigen_tensor<S>({end - begin, t},
                         typename eigen_tensor<S>::storage_type(x.values().segment(begin * t, (end - begin) * t)));
}
}  // namespace

TEMPLATE_TEST_CASE("masked sum, mean and variance by hand", "[numerics][masked]", float, double) {
  const auto tol = test::tol_of<TestType>();
  // torchtune tests/torchtune/rlhf/test_rewards.py: masked_mean([1..5], [1,1,1,0,0]) = 2, masked_var = 1
  // (kept 1, 2, 3: sum 6, mean 2, Σ(x - 2)² = 2, unbiased 2 / (3 - 1) = 1, biased 2/3).
  const auto x = test::vec<TestType>({1, 2, 3, 4, 5});
  const auto m = test::vec<TestType>({1, 1, 1, 0, 0});
  test::check_value("masked_sum", masked_sum(x, m), 6.0, tol);
  test::check_value("masked_mean", masked_mean(x, m), 2.0, tol);
  test::check_value("masked_var", masked_var(x, m), 1.0, tol);
  test::check_value("masked_var biased", masked_var(x, m, false), 2.0 / 3.0, tol);

  // verl tests/utils/test_torch_functional.py: masked_mean([1,2,3,4], [1,0,0,1]) = 2.5; a NaN at a
  // masked-out position still gives 2.5; a NaN at a kept position gives NaN.
  test::check_value("verl masked_mean",
                    masked_mean(test::vec<TestType>({1, 2, 3, 4}), test::vec<TestType>({1, 0, 0, 1})), 2.5, tol);
  test::check_value("verl masked_mean, NaN masked out",
                    masked_mean(test::vec<TestType>({1, qnan, 3, 4}), test::vec<TestType>({1, 0, 0, 1})), 2.5, tol);
  CHECK(std::isnan(ops::item(masked_mean(test::vec<TestType>({qnan, 2, 3, 4}), test::vec<TestType>({1, 0, 0, 1})))));

  // TRL tests/experimental/test_ppo_trainer.py: x = [1,2,3,4], mask [0,1,1,0]: mean 2.5, var 0.5
  // (kept 2, 3: Σ(x - 2.5)² = 0.5, over n - 1 = 1).
  const auto xt = test::vec<TestType>({1, 2, 3, 4});
  const auto mt = test::vec<TestType>({0, 1, 1, 0});
  test::check_value("TRL masked_mean", masked_mean(xt, mt), 2.5, tol);
  test::check_value("TRL masked_var", masked_var(xt, mt), 0.5, tol);

  // Along a dimension. Rows [1..5] with mask [1,1,1,0,0] and [2..6] with [0,0,1,1,1]:
  // sums 1+2+3 = 6 and 4+5+6 = 15, means 2 and 5, unbiased variances 1 and 1.
  const auto x2 = test::make<TestType>({2, 5}, {1, 2, 3, 4, 5, 2, 3, 4, 5, 6});
  const auto m2 = test::make<TestType>({2, 5}, {1, 1, 1, 0, 0, 0, 0, 1, 1, 1});
  test::check_values("masked_sum dim 1", masked_sum(x2, m2, 1), {6, 15}, tol);
  test::check_values("masked_mean dim 1", masked_mean(x2, m2, 1), {2, 5}, tol);
  test::check_values("masked_var dim 1", masked_var(x2, m2, true, 1), {1, 1}, tol);
  test::check_values("masked_var dim -1", masked_var(x2, m2, true, -1), {1, 1}, tol);
  // Columns: [1], [2], [3, 4], [5], [6] -> sums 1, 2, 7, 5, 6; means 1, 2, 3.5, 5, 6;
  // variances: single elements 0, column 2 (3 - 3.5)² + (4 - 3.5)² = 0.5 over 1.
  test::check_values("masked_sum dim 0", masked_sum(x2, m2, 0), {1, 2, 7, 5, 6}, tol);
  test::check_values("masked_mean dim 0", masked_mean(x2, m2, 0), {1, 2, 3.5, 5, 6}, tol);
  test::check_values("masked_var dim 0", masked_var(x2, m2, true, 0), {0, 0, 0.5, 0, 0}, tol);

  // An empty selection is defined as 0 (never NaN), also for a row of a per-row reduction.
  const auto none = test::vec<TestType>({0, 0, 0, 0, 0});
  test::check_value("masked_sum of nothing", masked_sum(x, none), 0.0, tol);
  test::check_value("masked_mean of nothing", masked_mean(x, none), 0.0, tol);
  test::check_value("masked_var of nothing", masked_var(x, none), 0.0, tol);
  const auto m_row = test::make<TestType>({2, 5}, {1, 1, 1, 0, 0, 0, 0, 0, 0, 0});
  test::check_values("masked_mean with an empty row", masked_mean(x2, m_row, 1), {2, 0}, tol);
  test::check_values("masked_var with an empty row", masked_var(x2, m_row, true, 1), {1, 0}, tol);
  // One kept element: unbiased variance 0 by the header's convention (TRL raises, verl divides by n).
  test::check_value("masked_var of one", masked_var(x, test::vec<TestType>({0, 0, 1, 0, 0})), 0.0, tol);
}

TEMPLATE_TEST_CASE("masked whitening reproduces TRL's and torchtune's vectors", "[numerics][masked][whiten]", float,
                   double) {
  const auto tol = test::tol_of<TestType>();
  // TRL tests/experimental/test_ppo_trainer.py: x = [1,2,3,4], mask [0,1,1,0] -> ±0.707107:
  // (x - 2.5) / sqrt(0.5 + 1e-8) at the kept positions, 0 elsewhere.
  const double s = 0.5 / std::sqrt(0.5 + 1e-8);
  const auto w = masked_whiten(test::vec<TestType>({1, 2, 3, 4}), test::vec<TestType>({0, 1, 1, 0}));
  test::check_values("TRL whiten", w, {0, -s, s, 0}, tol);
  CHECK(test::rounds_to(ops::to_host(w)[2], 0.707107, 6));

  // torchtune tests/torchtune/rlhf/test_rewards.py, GAE with V = R = [[0,0,0,1]], γ = 0.9, λ = 0.95:
  // advantages [γ³λ², γ²λ, γ, 0] = [0.6579225, 0.7695, 0.9, 0]; whitened (unbiased var, eps 1e-8)
  //   zero-mean  [0.190015, 0.468736, 0.794725, -1.453476]
  //   mean kept  [0.771871, 1.050592, 1.376581, -0.871620]   (torchtune's expected value)
  // and with mask [1,1,1,0]: zero-mean [-0.972954, -0.052058, 1.025012], mean kept
  // [-0.197146, 0.723749, 1.800820] (feature-anchors.md D.3, computed in float64 from the test's inputs).
  const double g = 0.9, l = 0.95;
  const auto adv = test::vec<TestType>({g * g * g * l * l, g * g * l, g, 0});
  struct quoted_case {
    const char* name;
    std::vector<double> mask;
    bool keep_mean;
    std::vector<double> want;
  };
  const quoted_case cases[] = {
      {"zero-mean", {1, 1, 1, 1}, false, {0.190015, 0.468736, 0.794725, -1.453476}},
      {"mean kept", {1, 1, 1, 1}, true, {0.771871, 1.050592, 1.376581, -0.871620}},
      {"masked zero-mean", {1, 1, 1, 0}, false, {-0.972954, -0.052058, 1.025012, 0}},
      {"masked mean kept", {1, 1, 1, 0}, true, {-0.197146, 0.723749, 1.800820, 0}},
  };
  for (const auto& c : cases) {
    INFO(c.name);
    const auto got = ops::to_host(masked_whiten(adv, test::vec<TestType>(c.mask), {.keep_mean = c.keep_mean}));
    if constexpr (std::is_same_v<TestType, double>) {
      for (std::size_t i = 0; i < 4; ++i) CHECK(test::rounds_to(got[i], c.want[i], 6));
    } else {
      // float32 carries ~1e-7 relative error: the quotation's half-unit (5e-7) is within float32_tol.
      test::check_values("whiten", masked_whiten(adv, test::vec<TestType>(c.mask), {.keep_mean = c.keep_mean}), c.want,
                         tol);
    }
  }

  // OpenRLHF's biased variance: x = [1,2,3,4], var = Σ(x - 2.5)² / 4 = 1.25; eps = 1e-300 (eps must be
  // > 0; 1.25 + 1e-300 rounds to 1.25) gives exactly (x - 2.5)/sqrt(1.25).
  const double b = 1.0 / std::sqrt(1.25);
  test::check_values("biased, eps 1e-300",
                     masked_whiten(test::vec<TestType>({1, 2, 3, 4}), test::vec<TestType>({1, 1, 1, 1}),
                                   {.eps = 1e-300, .unbiased = false}),
                     {-1.5 * b, -0.5 * b, 0.5 * b, 1.5 * b}, tol);
  // Nothing kept: all zeros, no NaN.
  test::check_values("whiten nothing", masked_whiten(test::vec<TestType>({1, 2, 3}), test::vec<TestType>({0, 0, 0})),
                     {0, 0, 0}, tol);
}

TEST_CASE("whitened values have mean 0 and unit variance over the mask", "[numerics][masked][whiten]") {
  for (std::uint64_t seed : {5u, 6u, 7u}) {
    const auto x = test::to_eigen<double>(test::random_normal({4, 6}, seed, 3.0, 1.5));
    const auto m = test::to_eigen<double>(test::random_mask({4, 6}, seed + 1));
    const auto w = masked_whiten(x, m, {.eps = 1e-300});
    INFO("seed " << seed);
    // Definitions: mean_m(w) = 0 and Σ m (w - 0)² / (n - 1) = 1 when eps adds nothing to var (1e-300).
    test::check_value("mean", masked_mean(w, m), 0.0, test::float64_tol);
    test::check_value("var", masked_var(w, m), 1.0, test::float64_tol);
  }
}

TEMPLATE_TEST_CASE("each aggregation mode by hand", "[numerics][aggregate]", float, double) {
  const auto tol = test::tol_of<TestType>();
  // L = [[1,2,3],[4,5,6],[7,8,9]], M = [[1,1,0],[1,0,0],[0,0,0]] (the last row has no token).
  // Kept: row 0 {1, 2} (sum 3, mean 1.5), row 1 {4} (sum 4, mean 4); 3 tokens, 2 non-empty rows, B·T = 9.
  const auto loss = test::make<TestType>({3, 3}, {1, 2, 3, 4, 5, 6, 7, 8, 9});
  const auto mask = test::make<TestType>({3, 3}, {1, 1, 0, 1, 0, 0, 0, 0, 0});
  struct hand_case {
    aggregation mode;
    std::optional<double> normalizer;
    double want;
  };
  const hand_case cases[] = {
      {aggregation::token_mean, {}, 7.0 / 3},               // (1 + 2 + 4) / 3 tokens
      {aggregation::seq_mean_token_sum, {}, 7.0 / 2},       // (3 + 4) / 2 rows
      {aggregation::seq_mean_token_mean, {}, 5.5 / 2},      // (1.5 + 4) / 2 rows
      {aggregation::seq_mean_token_sum_norm, {}, 7.0 / 9},  // 7 / (B·T = 3·3)
      {aggregation::sum, {}, 7.0},                          // 1 + 2 + 4
      {aggregation::token_mean, 10.0, 0.7},                 // 7 / 10
      {aggregation::seq_mean_token_sum, 4.0, 7.0 / 4},      // (3 + 4) / 4
      {aggregation::seq_mean_token_mean, 4.0, 5.5 / 4},     // (1.5 + 4) / 4
      {aggregation::seq_mean_token_sum_norm, 14.0, 0.5},    // 7 / 14
      {aggregation::sum, 2.0, 3.5},                         // 7 / 2
  };
  for (const auto& c : cases) {
    INFO(aggregation_name(c.mode) << ", normalizer " << (c.normalizer ? *c.normalizer : -1.0));
    test::check_value("aggregate", aggregate(loss, mask, c.mode, c.normalizer), c.want, tol);
  }
  // The weights themselves (token_mean: m / 3; seq_mean_token_mean: m / (2 rows · tokens in row)).
  test::check_values("token_mean weights", aggregation_weights(mask, aggregation::token_mean),
                     {1. / 3, 1. / 3, 0, 1. / 3, 0, 0, 0, 0, 0}, tol);
  test::check_values("seq_mean_token_mean weights", aggregation_weights(mask, aggregation::seq_mean_token_mean),
                     {0.25, 0.25, 0, 0.5, 0, 0, 0, 0, 0}, tol);
  // token_mean and sum also take a flat [N] layout.
  test::check_value(
      "token_mean [N]",
      aggregate(test::vec<TestType>({1, 2, 3, 4}), test::vec<TestType>({1, 0, 1, 1}), aggregation::token_mean), 8.0 / 3,
      tol);
  test::check_value("sum [N]",
                    aggregate(test::vec<TestType>({1, 2, 3, 4}), test::vec<TestType>({1, 0, 1, 1}), aggregation::sum),
                    8.0, tol);
  // Masked-out losses are never read: NaN or Inf there changes nothing.
  auto poisoned = loss;
  poisoned(2, 2) = std::numeric_limits<TestType>::quiet_NaN();
  poisoned(0, 2) = std::numeric_limits<TestType>::infinity();
  for (auto mode : all_modes) {
    INFO(aggregation_name(mode));
    test::check_same("poisoned", aggregate(poisoned, mask, mode), aggregate(loss, mask, mode), tol);
  }
  // An all-masked batch: loss 0 in every mode, weights all 0.
  const eigen_tensor<TestType> empty({3, 3}, TestType(0));
  for (auto mode : all_modes) {
    INFO(aggregation_name(mode));
    test::check_value("all masked", aggregate(loss, empty, mode), 0.0, tol);
    CHECK(test::finite_everywhere(aggregation_weights(empty, mode)));
  }
}

TEMPLATE_TEST_CASE("OpenRLHF's aggregation vectors", "[numerics][aggregate]", float, double) {
  const auto tol = test::tol_of<TestType>();
  // OpenRLHF tests/test_loss_aggregation.py.
  // token-mean: L = [[1,2,0],[3,4,5],[7,0,0]], M = [[1,1,0],[1,1,1],[1,0,0]] -> (1+2+3+4+5+7)/6 = 22/6 = 3.666667.
  const auto l1 = test::make<TestType>({3, 3}, {1, 2, 0, 3, 4, 5, 7, 0, 0});
  const auto m1 = test::make<TestType>({3, 3}, {1, 1, 0, 1, 1, 1, 1, 0, 0});
  const auto tm = aggregate(l1, m1, aggregation::token_mean);
  test::check_value("token-mean", tm, 22.0 / 6, tol);
  CHECK(test::rounds_to(ops::item(tm), 3.666667, 6));
  // ... and equals (rank0 + rank1) / 2 with dp_size 2 when each rank divides by global tokens / dp_size = 6 / 2.
  // rank0 holds row 0 (1 + 2 = 3), rank1 rows 1-2 (3+4+5+7 = 19): (3/3 + 19/3) / 2 = 22/6.
  const auto r0 = aggregate(rows(l1, 0, 1), rows(m1, 0, 1), aggregation::token_mean, 6.0 / 2);
  const auto r1 = aggregate(rows(l1, 1, 3), rows(m1, 1, 3), aggregation::token_mean, 6.0 / 2);
  test::check_value("dp mean of ranks", ops::mul(ops::add(r0, r1), 0.5), 22.0 / 6, tol);

  // seq-mean-token-mean: L = [[1,3,9],[2,4,0],[8,0,0]], M = [[1,1,0],[1,1,0],[1,0,0]]:
  // row means 2, 3, 8 -> 13/3 = 4.333333.
  const auto l2 = test::make<TestType>({3, 3}, {1, 3, 9, 2, 4, 0, 8, 0, 0});
  const auto m2 = test::make<TestType>({3, 3}, {1, 1, 0, 1, 1, 0, 1, 0, 0});
  const auto smtm = aggregate(l2, m2, aggregation::seq_mean_token_mean);
  test::check_value("seq-mean-token-mean", smtm, 13.0 / 3, tol);
  CHECK(test::rounds_to(ops::item(smtm), 4.333333, 6));

  // A fully masked row is excluded: [[1,3],[5,7]], M = [[1,1],[0,0]] -> mean of row 0 only = 2.0.
  test::check_value("fully masked row excluded",
                    aggregate(test::make<TestType>({2, 2}, {1, 3, 5, 7}), test::make<TestType>({2, 2}, {1, 1, 0, 0}),
                              aggregation::seq_mean_token_mean),
                    2.0, tol);

  // Gradient accumulation: micro-batches of 2 tokens [1, 2] and 5 tokens [3, 4, 5, 6, 7]. The whole
  // batch's token mean is 28/7 = 4.0; the mean of per-micro-batch means is (1.5 + 5) / 2 = 3.25.
  // With the global token count 7 as normaliser, the micro-batch losses sum to 4.0.
  const auto a = test::vec<TestType>({1, 2}), b = test::vec<TestType>({3, 4, 5, 6, 7});
  const auto ma = test::vec<TestType>({1, 1}), mb = test::vec<TestType>({1, 1, 1, 1, 1});
  const double naive = 0.5 * (ops::item(aggregate(a, ma, aggregation::token_mean)) +
                              ops::item(aggregate(b, mb, aggregation::token_mean)));
  CHECK(naive == Approx(3.25));
  test::check_value(
      "grad-accum with normaliser",
      ops::add(aggregate(a, ma, aggregation::token_mean, 7.0), aggregate(b, mb, aggregation::token_mean, 7.0)),
      28.0 / 7, tol);
}

TEMPLATE_TEST_CASE("with a global normaliser, micro-batch losses sum to the whole-batch loss", "[numerics][aggregate]",
                   float, double) {
  const auto tol = test::tol_of<TestType>();
  for (std::uint64_t seed : {21u, 22u, 23u}) {
    const auto loss = test::to_eigen<TestType>(test::random_normal({6, 5}, seed));
    auto mh = test::random_mask({6, 5}, seed + 1, 0.6);
    for (std::size_t t = 0; t < 5; ++t) mh.values[2 * 5 + t] = 0.0;  // row 2 has no token
    const auto mask = test::to_eigen<TestType>(mh);
    double tokens = 0, sequences = 0;
    for (std::int64_t r = 0; r < 6; ++r) {
      double n = 0;
      for (std::int64_t t = 0; t < 5; ++t) n += mask(r, t);
      tokens += n;
      sequences += n > 0 ? 1 : 0;
    }
    for (auto mode : all_modes) {
      // The global count each mode divides by (see `aggregation`): tokens, non-empty sequences, B·T, none.
      std::optional<double> global;
      if (mode == aggregation::token_mean) global = tokens;
      if (mode == aggregation::seq_mean_token_sum || mode == aggregation::seq_mean_token_mean) global = sequences;
      if (mode == aggregation::seq_mean_token_sum_norm) global = 6.0 * 5.0;
      INFO("seed " << seed << ", " << aggregation_name(mode));
      const auto whole = aggregate(loss, mask, mode);
      // Three uneven micro-batches: rows [0, 1), [1, 4), [4, 6).
      const auto parts = ops::add(ops::add(aggregate(rows(loss, 0, 1), rows(mask, 0, 1), mode, global),
                                           aggregate(rows(loss, 1, 4), rows(mask, 1, 4), mode, global)),
                                  aggregate(rows(loss, 4, 6), rows(mask, 4, 6), mode, global));
      test::check_same("sum of micro-batches", parts, whole, tol);
      // Two data-parallel ranks whose gradients are averaged: each passes global / 2 (the header's rule).
      if (global) {
        const auto ranks = ops::mul(ops::add(aggregate(rows(loss, 0, 3), rows(mask, 0, 3), mode, *global / 2),
                                             aggregate(rows(loss, 3, 6), rows(mask, 3, 6), mode, *global / 2)),
                                    0.5);
        test::check_same("mean over ranks", ranks, whole, tol);
      }
    }
  }
}

TEST_CASE("aggregate's gradient is aggregation_weights, and masked mean and variance by finite differences",
          "[numerics][aggregate][masked][grad]") {
  const auto loss = test::to_eigen<double>(test::random_normal({4, 5}, 31));
  auto mh = test::random_mask({4, 5}, 32);
  for (std::size_t t = 0; t < 5; ++t) mh.values[5 + t] = 0.0;  // an empty row
  const auto mask = test::to_eigen<double>(mh);
  for (auto mode : all_modes)
    for (std::optional<double> normalizer : {std::optional<double>{}, std::optional<double>{3.5}}) {
      INFO(aggregation_name(mode) << (normalizer ? " with normaliser" : ""));
      // aggregate is linear in the loss, so the weights are the gradient and masked positions get 0.
      test::check_gradient(
          "aggregate", aggregation_weights(mask, mode, normalizer),
          [&](const auto& l) { return ops::item(aggregate(l, mask, mode, normalizer)); }, loss);
    }

  // d mean / dx_i = m_i / n;  d var / dx_i = 2 m_i (x_i - mean) / (n - 1)  (unbiased) or / n (biased).
  const auto x = loss;
  double n = 0, s = 0;
  for (Eigen::Index i = 0; i < x.numel(); ++i) n += mask.values()(i), s += mask.values()(i) * x.values()(i);
  const double mean = s / n;
  eigen_tensor<double> d_mean(x.shape()), d_var(x.shape()), d_var_biased(x.shape());
  for (Eigen::Index i = 0; i < x.numel(); ++i) {
    d_mean.values()(i) = mask.values()(i) / n;
    d_var.values()(i) = 2 * mask.values()(i) * (x.values()(i) - mean) / (n - 1);
    d_var_biased.values()(i) = 2 * mask.values()(i) * (x.values()(i) - mean) / n;
  }
  test::check_gradient(
      "masked_mean", d_mean, [&](const auto& p) { return ops::item(masked_mean(p, mask)); }, x);
  test::check_gradient(
      "masked_var", d_var, [&](const auto& p) { return ops::item(masked_var(p, mask)); }, x);
  test::check_gradient(
      "masked_var biased", d_var_biased, [&](const auto& p) { return ops::item(masked_var(p, mask, false)); }, x);
}

}  // namespace test_masked
