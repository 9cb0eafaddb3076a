// A program a posttrain user would write against the LibTorch backend: the SFT loss of the eigen
// consumer in float32, back-propagated with autograd. Exits non-zero on a wrong value.
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <posttrain/backends/torch.hpp>
#include <posttrain/posttrain.hpp>

int main() {
  const float l1 = std::log(1.0f), l2 = std::log(2.0f), l3 = std::log(3.0f), l4 = std::log(4.0f);
  auto logits = torch::tensor({0.f, 0.f, 0.f, 0.f, l1, l2, l3, l4, 5.f, 6.f, 7.f, 8.f}).reshape({3, 4});
  logits.requires_grad_(true);
  const auto labels = torch::tensor({0, 3, -100}, torch::kLong);
  const auto sft = posttrain::sft_loss(logits, labels);
  sft.loss.backward();
  const double loss = sft.loss.item<double>(), want = std::log(10.0) / 2;
  const double g00 = logits.grad()[0][0].item<double>();  // (0.25 - 1) / 2
  const auto k3 = posttrain::kl_penalty(torch::tensor({std::log(0.5f)}), torch::tensor({std::log(0.25f)}));
  const bool ok = std::abs(loss - want) < 1e-5 && std::abs(g00 + 0.375) < 1e-6 &&
                  std::abs(k3.item<double>() - (std::log(2.0) - 0.5)) < 1e-6;
  std::printf("torch consumer: sft loss %.7f (want %.7f), autograd dlogits[0,0] %.6f, k3 %.6f: %s\n", loss, want, g00,
              k3.item<double>(), ok ? "ok" : "WRONG");
  return ok ? 0 : 1;
}
