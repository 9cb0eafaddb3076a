#include <catch2/catch.hpp>
#include <torch/torch.h>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/backends/torch.hpp"
#include "posttrain/posttrain.hpp"

using namespace posttrain;

TEST_CASE("smoke: sft on torch with autograd", "[smoke]") {
  auto logits = torch::zeros({1, 4}, torch::kDouble).requires_grad_();
  auto labels = torch::zeros({1}, torch::kLong);
  auto r = sft_loss(logits, labels);
  r.loss.backward();
  CHECK(r.loss.item<double>() == Approx(std::log(4.0)));
  auto g = sft_loss_backward(logits.detach(), labels);
  CHECK(torch::allclose(g, logits.grad()));
}
