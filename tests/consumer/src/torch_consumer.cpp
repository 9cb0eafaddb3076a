// A program a posttrain user would write against the LibTorch backend, linking only posttrain::torch
// and built with the user's strict warnings (-Wall -Wextra -Werror at -O2 and -O3, see
// ../installed/CMakeLists.txt): SFT, DPO, GRPO, a KL penalty and the fused LM-head loss, each
// checked against a closed form. Exits non-zero on a wrong value.
#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <posttrain/backends/torch.hpp>
#include <posttrain/posttrain.hpp>

// Linking posttrain::torch alone must bring the fused CPU kernels (Eigen on the include path).
static_assert(posttrain::torch_backend::has_cpu_kernels, "posttrain::torch was built without its fused CPU kernels");

namespace {
bool near(double got, double want, double tol, const char* what) {
  const bool ok = std::abs(got - want) <= tol;
  std::printf("  %-34s %.7f (want %.7f)%s\n", what, got, want, ok ? "" : "  WRONG");
  return ok;
}
}  // namespace

int main() {
  bool ok = true;
  const float l1 = std::log(1.0f), l2 = std::log(2.0f), l3 = std::log(3.0f), l4 = std::log(4.0f);
  auto logits = torch::tensor({0.f, 0.f, 0.f, 0.f, l1, l2, l3, l4, 5.f, 6.f, 7.f, 8.f}).reshape({3, 4});
  logits.requires_grad_(true);
  const auto labels = torch::tensor({0, 3, -100}, torch::kLong);
  // SFT: row 0 uniform (-log 1/4), row 1 softmax (1,2,3,4)/10 at label 3 (-log 4/10); row 2 ignored.
  const auto sft = posttrain::sft_loss(logits, labels);
  sft.loss.backward();
  ok &= near(sft.loss.item<double>(), std::log(10.0) / 2, 1e-5, "sft loss");
  ok &= near(logits.grad()[0][0].item<double>(), (0.25 - 1) / 2, 1e-6, "autograd dlogits[0,0]");

  // DPO sigmoid, beta 0.1: margin 0.1 * ((-1 - -2) - (-3 - -3)) = 0.1; loss -log sigmoid(0.1).
  // Double tensors, so the 1e-9 check is a double-precision one (torch::tensor({-1.0}) is float32,
  // LibTorch's default dtype, whose rounding differs between CPUs' vector log1p).
  const auto f64 = torch::TensorOptions().dtype(torch::kDouble);
  posttrain::preference_batch<at::Tensor> pairs{torch::tensor({-1.0}, f64), torch::tensor({-3.0}, f64)};
  pairs.ref_chosen_logps = torch::tensor({-2.0}, f64);
  pairs.ref_rejected_logps = torch::tensor({-3.0}, f64);
  const auto dpo = posttrain::dpo(pairs);
  ok &= near(dpo.loss.item<double>(), std::log1p(std::exp(-0.1)), 1e-9, "dpo loss");

  // GRPO on-policy, beta 0: the ratio is 1, so the loss is -(mean advantage over kept tokens).
  posttrain::grpo_batch<at::Tensor> rl{torch::tensor({-0.5, -1.0, -0.2, -0.7}, f64).reshape({2, 2}),
                                       torch::tensor({1.0, -0.5}, f64),
                                       torch::tensor({1.0, 1.0, 1.0, 0.0}, f64).reshape({2, 2})};
  posttrain::grpo_options grpo_opt;
  grpo_opt.beta = 0.0;
  const auto grpo = posttrain::grpo_loss(rl, grpo_opt);
  ok &= near(grpo.loss.item<double>(), -(1.0 + 1.0 - 0.5) / 3, 1e-9, "grpo loss (dapo token mean)");

  // k3 between log 0.5 and log 0.25: r = 0.5, (r - 1) - log r = log 2 - 0.5.
  const auto k3 = posttrain::kl_penalty(torch::tensor({std::log(0.5f)}), torch::tensor({std::log(0.25f)}));
  ok &= near(k3.item<double>(), std::log(2.0) - 0.5, 1e-6, "kl_penalty k3");

  // The fused LM head + CE: a zero head makes every logit 0, so the loss is log V.
  const auto hidden = torch::randn({3, 5});
  const auto head = torch::zeros({4, 5});
  const auto fused = posttrain::fused_linear_cross_entropy(hidden, head, torch::tensor({1, 2, 3}, torch::kLong));
  ok &= near(fused.loss.item<double>(), std::log(4.0), 1e-6, "fused linear ce (zero head)");

  std::printf("torch consumer: %s\n", ok ? "ok" : "WRONG");
  return ok ? 0 : 1;
}
