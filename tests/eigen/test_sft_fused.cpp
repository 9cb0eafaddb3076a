// sft_loss_backward through the Eigen backend's fused ce_backward hook (kernels: one statistics
// pass and one gradient pass per row) against generic::sft_loss_backward, the unfused composition
// (softmax, one-hot, several [N, V] temporaries), in double for every option (ignore_index, label
// smoothing, z-loss, DFT, each aggregation mode, a normaliser, grad_loss), with -inf padding and
// +-1e4 logits; float32 against the double composition; a hand closed form.
#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/losses/sft.hpp"
#include "support/data.hpp"
#include "support/tolerances.hpp"

namespace test_sft_fused {  // one namespace per test file: the unity build compiles several in one TU

using namespace posttrain;

namespace {

static_assert(has_fused_ce_backward<eigen_tensor<double>> && has_fused_ce_backward<eigen_tensor<float>>);

template <class S>
void require_close(const eigen_tensor<S>& got, const eigen_tensor<double>& want, test::tolerance tol) {
  REQUIRE(got.shape() == want.shape());
  for (std::int64_t i = 0; i < want.numel(); ++i) {
    INFO("element " << i << ": got " << got.data()[i] << ", want " << want.data()[i]);
    REQUIRE(tol.accepts(static_cast<double>(got.data()[i]), want.data()[i]));
  }
}

/// [2, 3, v] logits: row 0 padded with -inf at every fourth entry, row 1 at +-1e4, the rest normal.
test::host_tensor logits_for(std::int64_t v, std::uint64_t seed) {
  auto h = test::random_normal({2, 3, v}, seed, 2.5);
  for (std::int64_t j = 1; j < v; j += 4)
    h.values[static_cast<std::size_t>(j)] = -std::numeric_limits<double>::infinity();
  for (std::int64_t j = 0; j < v; ++j) h.values[static_cast<std::size_t>(v + j)] = j % 3 ? 1e4 - j : -1e4 + j;
  return h;
}
/// Labels on finite logits; position [0, 2] ignored (ignore_index), and [1, 1] too.
test::host_labels labels_for(std::int64_t v, std::int64_t ignore_index) {
  test::host_labels l{{2, 3}, {0, 2, ignore_index, 5 % v, ignore_index, v - 1}};
  return l;
}

struct option_case {
  std::string name;
  sft_options o;
};
std::vector<option_case> option_cases(std::int64_t ignore_index) {
  std::vector<option_case> out;
  for (auto mode : {aggregation::token_mean, aggregation::sum, aggregation::seq_mean_token_sum,
                    aggregation::seq_mean_token_mean, aggregation::seq_mean_token_sum_norm}) {
    for (int variant = 0; variant < 4; ++variant) {
      sft_options o{.ignore_index = ignore_index, .reduction = mode};
      if (variant >= 1) o.label_smoothing = 0.15;
      if (variant >= 2) o.z_loss = 1e-3;
      if (variant == 3) o.dft = true;
      if (mode == aggregation::seq_mean_token_sum_norm || variant == 2) o.normalizer = 11.0;
      out.push_back({std::string(aggregation_name(mode)) + " variant " + std::to_string(variant), o});
    }
  }
  out.push_back({"dft alone", {.ignore_index = ignore_index, .dft = true}});
  return out;
}

}  // namespace

TEST_CASE("sft fused backward: equals generic::sft_loss_backward in double for every option and aggregation",
          "[sft][fused]") {
  for (std::int64_t v : {7, 3001}) {
    for (std::int64_t ignore : {std::int64_t{-100}, std::int64_t{4}}) {
      const auto x = test::to_eigen<double>(logits_for(v, 5));
      const auto y = test::to_eigen(labels_for(v, ignore));
      for (const auto& c : option_cases(ignore)) {
        INFO("V = " << v << ", ignore_index = " << ignore << ", " << c.name);
        for (double grad_loss : {1.0, -0.35}) {
          const auto got = sft_loss_backward(x, y, c.o, grad_loss);
          const auto want = generic::sft_loss_backward(x, y, c.o, grad_loss);
          require_close(got, want, test::float64_tol);
        }
      }
    }
  }
}

TEST_CASE("sft fused backward: float32 (V = 40000, +-1e4, -inf padding) within float32_tol of the double composition",
          "[sft][fused]") {
  const std::int64_t v = 40000;
  auto h = logits_for(v, 9);
  for (auto& e : h.values) e = static_cast<double>(static_cast<float>(e));  // what the float32 run sees
  const auto xf = test::to_eigen<float>(h);
  const auto xd = test::to_eigen<double>(h);
  const auto y = test::to_eigen(labels_for(v, -100));
  for (const auto& c : option_cases(-100)) {
    INFO(c.name);
    require_close(sft_loss_backward(xf, y, c.o), generic::sft_loss_backward(xd, y, c.o), test::float32_tol);
  }
}

TEST_CASE("sft fused backward: hand closed form and an all-ignored batch", "[sft][fused]") {
  // logits [[0, 0, 0, 0]], label 0, token mean over one token: softmax - onehot = [-3/4, 1/4, 1/4, 1/4].
  const eigen_tensor<double> x({1, 4}, {0, 0, 0, 0});
  const auto g = sft_loss_backward(x, eigen_index({1}, {0}));
  require_close(g, eigen_tensor<double>({1, 4}, {-0.75, 0.25, 0.25, 0.25}), test::float64_tol);
  // DFT weights the row by sg(p_y) = 1/4: [-3/16, 1/16, 1/16, 1/16].
  const auto gd = sft_loss_backward(x, eigen_index({1}, {0}), {.dft = true});
  require_close(gd, eigen_tensor<double>({1, 4}, {-0.1875, 0.0625, 0.0625, 0.0625}), test::float64_tol);
  // Every label ignored: the gradient is 0 everywhere (no NaN from rows of NaN logits either).
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const eigen_tensor<double> xn({2, 3}, {nan, 1, 2, 3, 4, 5});
  require_close(sft_loss_backward(xn, eigen_index({2}, {-100, -100})), eigen_tensor<double>({2, 3}), test::float64_tol);
}

}  // namespace test_sft_fused
