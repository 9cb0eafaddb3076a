#include <catch2/catch.hpp>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/posttrain.hpp"
#include "support/data.hpp"

using namespace posttrain;

TEST_CASE("smoke: sft and kl on eigen", "[smoke]") {
  eigen_tensor<double> logits({1, 4}, {0, 0, 0, 0});
  eigen_index labels({1}, {0});
  auto r = sft_loss(logits, labels);
  CHECK(ops::item(r.loss) == Approx(std::log(4.0)));
  auto g = sft_loss_backward(logits, labels);
  CHECK(g(0, 0) == Approx(0.25 - 1.0));
  eigen_tensor<double> lp({1}, {std::log(0.5)}), ref({1}, {std::log(0.25)});
  CHECK(ops::item(kl_penalty(lp, ref)) == Approx(0.5 + std::log(2.0) - 1));
  eigen_tensor<double> a({2}, {0, 0}), b({2}, {0, std::log(3.0)});
  CHECK(ops::item(kl_exact(a, b)) == Approx(0.143841).epsilon(1e-5));
  auto w = masked_whiten(eigen_tensor<double>({4}, {1, 2, 3, 4}), eigen_tensor<double>({4}, {0, 1, 1, 0}));
  CHECK(w(1) == Approx(-0.707107).epsilon(1e-5));
}
