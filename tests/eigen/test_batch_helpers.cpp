// The batch helpers of posttrain/data/ on the Eigen backend (issue 15, item 6): every expected value
// is written out by hand from the convention the helper's header cites (Hugging Face's label shift,
// TRL's completion mask and concatenated_inputs, verl's multi-turn response mask).
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/data/multi_turn.hpp"
#include "posttrain/data/next_token.hpp"
#include "posttrain/data/pairs.hpp"
#include "posttrain/losses/grpo.hpp"
#include "posttrain/losses/sft.hpp"

namespace test_batch_helpers {  // one namespace per test file: the unity build compiles several in one TU

using namespace posttrain;
using Catch::Matchers::Contains;

namespace {
using E = eigen_tensor<double>;
std::vector<std::int64_t> ids_of(const eigen_index& i) { return {i.data(), i.data() + i.numel()}; }
std::vector<double> values_of(const E& x) { return {x.data(), x.data() + x.numel()}; }
}  // namespace

TEST_CASE("shift_labels: out[t] = labels[t + 1], the last position ignored (HF ForCausalLMLoss)", "[helpers]") {
  const eigen_index labels({2, 4}, {-100, 7, 8, 9, 1, 2, -100, -100});
  const eigen_index shifted = shift_labels(labels);
  CHECK(shifted.shape() == shape_t{2, 4});
  CHECK(ids_of(shifted) == std::vector<std::int64_t>{7, 8, 9, -100, 2, -100, -100, -100});
  CHECK(ids_of(shift_labels(labels, -1)) == std::vector<std::int64_t>{7, 8, 9, -1, 2, -100, -100, -1});
  // Rank 1 and a single step: all ignored; an empty sequence stays empty.
  CHECK(ids_of(shift_labels(eigen_index({1}, {5}))) == std::vector<std::int64_t>{-100});
  CHECK(shift_labels(eigen_index(shape_t{3, 0})).shape() == shape_t{3, 0});
  CHECK_THROWS_WITH(shift_labels(eigen_index(shape_t{})), Contains("shift_labels") && Contains("rank >= 1"));
}

TEST_CASE("shift_labels + sft_loss = the shifted cross-entropy written by hand", "[helpers]") {
  // Logits [1, 3, 2]: position t predicts token t + 1. Tokens 0, 1, 1: the loss averages
  // -log softmax(logits[0])[1] and -log softmax(logits[1])[1]; position 2 has no next token.
  const E logits({1, 3, 2}, {0.0, 1.0, 2.0, 0.0, 5.0, 5.0});
  const eigen_index tokens({1, 3}, {0, 1, 1});
  const double want = (std::log(1.0 + std::exp(-1.0)) + std::log(1.0 + std::exp(2.0))) / 2;
  CHECK(sft_loss(logits, shift_labels(tokens)).loss.data()[0] == Approx(want).epsilon(1e-14));
}

TEST_CASE("completion_mask: 1 through the first EOS, 0 after; no EOS keeps the row (TRL GRPOTrainer)", "[helpers]") {
  const E like({1}, {0.0});
  const eigen_index ids({3, 5}, {4, 2, 9, 2, 0,    // EOS (2) at 1: keep 0..1
                                 4, 4, 4, 4, 4,    // no EOS: keep all
                                 2, 0, 0, 0, 0});  // EOS first
  const E mask = completion_mask(ids, 2, like);
  CHECK(mask.shape() == shape_t{3, 5});
  CHECK(values_of(mask) == std::vector<double>{1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0});
  CHECK_THROWS_WITH(completion_mask(eigen_index(shape_t{}), 2, like), Contains("completion_mask") && Contains("rank"));
}

TEST_CASE("concat_pairs pads to the longer side and stacks chosen over rejected (TRL concatenated_inputs)",
          "[helpers]") {
  const eigen_index chosen({2, 3}, {1, 2, 3, 4, 5, 6});
  const eigen_index rejected({2, 2}, {7, 8, 9, 10});
  const eigen_index both = concat_pairs(chosen, rejected, 0.0);
  CHECK(both.shape() == shape_t{4, 3});
  CHECK(ids_of(both) == std::vector<std::int64_t>{1, 2, 3, 4, 5, 6, 7, 8, 0, 9, 10, 0});
  // The longer side may be the rejected one, and masks are value tensors.
  const E mask_c({1, 1}, {1.0}), mask_r({1, 3}, {1.0, 1.0, 1.0});
  CHECK(values_of(concat_pairs(mask_c, mask_r)) == std::vector<double>{1, 0, 0, 1, 1, 1});
  // Rank 1 ([B] lengths, rewards): stacked.
  CHECK(values_of(concat_pairs(E({2}, {1.0, 2.0}), E({2}, {3.0, 4.0}))) == std::vector<double>{1, 2, 3, 4});
  // Rank 3 ([B, T, V] logits): padded along dimension 1.
  const E padded = concat_pairs(E({1, 1, 2}, {1.0, 2.0}), E({1, 2, 2}, {3.0, 4.0, 5.0, 6.0}), -1.0);
  CHECK(padded.shape() == shape_t{2, 2, 2});
  CHECK(values_of(padded) == std::vector<double>{1, 2, -1, -1, 3, 4, 5, 6});

  const auto halves = split_pairs(both);
  CHECK(ids_of(halves.chosen) == std::vector<std::int64_t>{1, 2, 3, 4, 5, 6});
  CHECK(ids_of(halves.rejected) == std::vector<std::int64_t>{7, 8, 0, 9, 10, 0});
  const auto logps = split_pairs(E({4}, {-1.0, -2.0, -3.0, -4.0}));
  CHECK(values_of(logps.chosen) == std::vector<double>{-1, -2});
  CHECK(values_of(logps.rejected) == std::vector<double>{-3, -4});

  CHECK_THROWS_WITH(concat_pairs(eigen_index({2, 3}), eigen_index({3, 3})), Contains("concat_pairs"));
  CHECK_THROWS_WITH(concat_pairs(E({2}), E({3})), Contains("concat_pairs"));
  CHECK_THROWS_WITH(concat_pairs(E({2, 2}), E({2})), Contains("same rank"));
  CHECK_THROWS_WITH(split_pairs(E({3})), Contains("split_pairs") && Contains("even"));
  CHECK_THROWS_WITH(split_pairs(E(shape_t{})), Contains("split_pairs"));
}

TEST_CASE("multi_turn_mask: 1 on the policy's turns, 0 on tool replies and padding (verl response_mask)", "[helpers]") {
  const E like({1}, {0.0});
  // Sample 0: assistant 2, tool 3, assistant 1 (6 of 8 tokens); sample 1: assistant 4 then padding.
  const std::vector<std::vector<turn_segment>> samples = {{{2, true}, {3, false}, {1, true}}, {{4, true}}};
  const E mask = multi_turn_mask(like, samples, 8);
  CHECK(mask.shape() == shape_t{2, 8});
  CHECK(values_of(mask) == std::vector<double>{1, 1, 0, 0, 0, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0});
  CHECK(multi_turn_mask(like, {}, 5).shape() == shape_t{0, 5});
  CHECK(values_of(multi_turn_mask(like, {{}}, 2)) == std::vector<double>{0, 0});
  CHECK_THROWS_WITH(multi_turn_mask(like, {{{9, true}}}, 8), Contains("multi_turn_mask") && Contains("length = 8"));
  CHECK_THROWS_WITH(multi_turn_mask(like, {{{-1, true}}}, 8), Contains("must be >= 0"));
  CHECK_THROWS_WITH(multi_turn_mask(like, {{}}, -1), Contains("length must be >= 0"));

  const eigen_index roles({1, 5}, {0, 1, 1, 2, 1});
  CHECK(values_of(role_mask(roles, 1, like)) == std::vector<double>{0, 1, 1, 0, 1});
}

TEST_CASE("multi-turn: the tool's tokens get exactly zero gradient in GRPO, the policy's do not", "[helpers]") {
  const E like({1}, {0.0});
  const std::vector<std::vector<turn_segment>> samples = {{{2, true}, {2, false}, {1, true}},
                                                          {{1, true}, {3, false}, {1, true}}};
  grpo_batch<E> batch{E({2, 5}, {-0.5, -1.0, -0.2, -0.7, -0.3, -0.4, -0.9, -1.1, -0.6, -0.8}), E({2}, {1.0, -0.5}),
                      multi_turn_mask(like, samples, 5)};
  // Non-finite log-probs on the tool's tokens (never sampled by the policy) must not leak either.
  batch.logprobs.data()[2] = std::numeric_limits<double>::quiet_NaN();
  batch.logprobs.data()[7] = -std::numeric_limits<double>::infinity();
  batch.old_logprobs = E({2, 5}, {-0.6, -1.0, 0.0, 0.0, -0.2, -0.4, 0.0, 0.0, 0.0, -0.7});
  const E grad = grpo_loss_backward(batch);
  const auto g = values_of(grad);
  const std::vector<bool> tool = {false, false, true, true, false, false, true, true, true, false};
  for (std::size_t k = 0; k < g.size(); ++k) {
    INFO("position " << k);
    if (tool[k])
      CHECK(g[k] == 0.0);
    else
      CHECK(g[k] != 0.0);
  }
  CHECK(std::isfinite(grpo_loss(batch).loss.data()[0]));
}

}  // namespace test_batch_helpers
