// examples/grpo_walkthrough.cpp — GRPO step by step: four sampled answers to one prompt with
// verifiable 0/1 rewards -> group-relative advantages -> the clipped objective with a KL leash.
//
// Each number is computed three ways: the Eigen reference (double), LibTorch (float32, when found),
// and by hand with plain loops from the published definitions (DeepSeekMath §4.1.2; PPO eq. 7;
// Schulman's k3). The walkthrough also shows what clipping does to a ratio that ran too far: its
// token's gradient is exactly zero. Exit status 1 on any disagreement; ctest runs it.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <posttrain/backends/eigen.hpp>
#include <posttrain/posttrain.hpp>
#include <vector>
#ifdef POSTTRAIN_EXAMPLE_TORCH
#include <torch/torch.h>

#include <posttrain/backends/torch.hpp>
#endif

namespace {
namespace pt = posttrain;
using E = pt::eigen_tensor<double>;

constexpr std::int64_t B = 4, T = 3;
const std::vector<double> rewards = {1, 0, 0, 1};  // answers 0 and 3 were verified correct
const std::vector<std::int64_t> group = {0, 0, 0, 0};
// log-probabilities of the sampled tokens: under the sampler (old), the current policy and the reference
const std::vector<double> old_lp = {-1.2, -0.7, -2.0, -0.9, -1.5, -0.4, -1.1, -1.0, -0.8, -0.6, -1.3, -0.5};
const std::vector<double> delta = {0.05,  0.60,  -0.10,  // answer 0, token 1: ratio e^0.6 = 1.82 ran too far
                                   0.10,  -0.05, 0.02,   // answer 1
                                   -0.30, 0.00,  0.04,   // answer 2, token 0: ratio e^-0.3 = 0.74 (A < 0)
                                   0.02,  0.01,  0.0};   // answer 3 (last token is padding)
const std::vector<double> mask = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0};
constexpr double beta = 0.04, eps = 0.2, std_eps = 1e-4;

bool close(double got, double want, double tol) { return std::abs(got - want) <= tol + tol * std::abs(want); }
bool all_ok = true;
void row(const char* name, double eigen, double hand, double torch_value, bool has_torch) {
  const bool ok = close(eigen, hand, 1e-12) && (!has_torch || close(torch_value, eigen, 1e-5));
  all_ok = all_ok && ok;
  if (has_torch)
    std::printf("  %-34s %14.8f %14.8f %14.8f%s\n", name, eigen, torch_value, hand, ok ? "" : "   <-- DISAGREE");
  else
    std::printf("  %-34s %14.8f %14s %14.8f%s\n", name, eigen, "-", hand, ok ? "" : "   <-- DISAGREE");
}
}  // namespace

int main() {
  std::vector<double> new_lp(old_lp.size()), ref_lp(old_lp.size());
  for (std::size_t i = 0; i < old_lp.size(); ++i) new_lp[i] = old_lp[i] + delta[i], ref_lp[i] = old_lp[i] - 0.1;

  // ---- by hand ----
  double mean = 0, var = 0;
  for (double r : rewards) mean += r / B;
  for (double r : rewards) var += (r - mean) * (r - mean) / (B - 1);  // unbiased, as TRL/verl
  std::vector<double> adv(B);
  for (std::int64_t b = 0; b < B; ++b) adv[b] = (rewards[b] - mean) / (std::sqrt(var) + std_eps);
  double loss_sum = 0, tokens = 0, kl_sum = 0;
  std::vector<double> grad_hand(old_lp.size(), 0.0);
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t t = 0; t < T; ++t) {
      const std::size_t i = static_cast<std::size_t>(b * T + t);
      if (mask[i] == 0) continue;
      const double rho = std::exp(new_lp[i] - old_lp[i]), A = adv[b];
      const double clipped = std::clamp(rho, 1 - eps, 1 + eps);
      const double surrogate = std::max(-A * rho, -A * clipped);  // PPO eq. 7, as a loss
      const double r = new_lp[i] - ref_lp[i];
      const double k3 = std::exp(-r) + r - 1;  // Schulman's k3
      loss_sum += surrogate + beta * k3, kl_sum += k3, tokens += 1;
      const bool clip_active = -A * clipped > -A * rho;
      grad_hand[i] = (clip_active ? 0.0 : -A * rho) + beta * (1 - std::exp(-r));
    }
  const double loss_hand = loss_sum / tokens;
  for (auto& g : grad_hand) g /= tokens;

  // ---- Eigen reference ----
  const auto rw = E({B}, rewards);
  const auto a = pt::grpo_advantages(rw, pt::eigen_index({B}, group), {.eps = std_eps});
  const pt::grpo_batch<E> batch{.logprobs = E({B, T}, new_lp),
                                .advantages = a.advantages,
                                .response_mask = E({B, T}, mask),
                                .old_logprobs = E({B, T}, old_lp),
                                .ref_logprobs = E({B, T}, ref_lp)};
  // clip_options::trl(epsilon) sets clip.clip_low from TRL's epsilon
  const pt::grpo_options opt{.loss_type = pt::grpo_loss_type::dapo, .beta = beta, .clip = pt::clip_options::trl(eps)};
  const auto res = pt::grpo_loss(batch, opt);
  const auto grad = pt::ops::to_host(pt::grpo_loss_backward(batch, opt));
  const auto adv_e = pt::ops::to_host(a.advantages);

  bool has_torch = false;
  std::vector<double> adv_t(B, 0.0), grad_t(old_lp.size(), 0.0);
  double loss_t = 0, kl_t = 0, clip_t = 0;
#ifdef POSTTRAIN_EXAMPLE_TORCH
  has_torch = true;
  {
    auto f = [](const std::vector<double>& v, std::vector<std::int64_t> s) {
      return torch::tensor(v, torch::kDouble).reshape(s).to(torch::kFloat);
    };
    const auto at = pt::grpo_advantages(f(rewards, {B}), torch::tensor(group, torch::kLong), {.eps = std_eps});
    auto lp = f(new_lp, {B, T}).requires_grad_();
    const pt::grpo_batch<torch::Tensor> tb{.logprobs = lp,
                                           .advantages = at.advantages,
                                           .response_mask = f(mask, {B, T}),
                                           .old_logprobs = f(old_lp, {B, T}),
                                           .ref_logprobs = f(ref_lp, {B, T})};
    const auto tr = pt::grpo_loss(tb, opt);
    tr.loss.backward();  // LibTorch autograd, not the analytic backward
    adv_t = pt::ops::to_host(at.advantages), grad_t = pt::ops::to_host(lp.grad());
    loss_t = pt::ops::item(tr.loss), kl_t = pt::ops::item(tr.kl), clip_t = pt::ops::item(tr.clip_ratio_region);
  }
#endif

  std::printf("GRPO walkthrough: 4 answers to one prompt, rewards [1, 0, 0, 1]\n\n");
  std::printf("step 1  group-relative advantages  A_i = (r_i - mean) / (std + 1e-4), std unbiased\n");
  std::printf("        mean = %.2f, std = sqrt(1/3) = %.6f\n", mean, std::sqrt(var));
  std::printf("  %-34s %14s %14s %14s\n", "", "eigen f64", has_torch ? "torch f32" : "", "by hand");
  for (std::int64_t b = 0; b < B; ++b) {
    char name[32];
    std::snprintf(name, sizeof name, "A_%lld", static_cast<long long>(b));
    row(name, adv_e[b], adv[b], adv_t[b], has_torch);
  }
  std::printf("\nstep 2  clipped surrogate + beta * k3 KL, token mean (TRL loss_type dapo), eps = 0.2, beta = 0.04\n");
  row("loss", pt::ops::item(res.loss), loss_hand, loss_t, has_torch);
  row("kl (mean k3)", pt::ops::item(res.kl), kl_sum / tokens, kl_t, has_torch);
  row("clip_ratio/region_mean", pt::ops::item(res.clip_ratio_region), 2.0 / 11.0, clip_t, has_torch);
  {
    // Why the loss is positive: split it into its policy term and its KL term.
    const double loss = pt::ops::item(res.loss), kl_term = beta * pt::ops::item(res.kl);
    std::printf("  Why positive: loss = policy term %.8f + beta * kl %.8f. The advantages sum to 0 in the group,\n",
                loss - kl_term, kl_term);
    std::printf("  so at ratio 1 with equal lengths the policy term -mean_t min(rho A, clip(rho) A) would be 0.\n");
    std::printf("  Here lengths and ratios differ (either sign), and min() only raises it: it keeps the\n");
    std::printf("  pessimistic term. A policy-gradient loss is not a score (unlike cross-entropy): its sign and\n");
    std::printf("  size say nothing about the policy; only its gradient matters.\n");
  }
  std::printf("\nstep 3  gradients d loss / d logprob (eigen: analytic backward; torch: autograd)\n");
  for (std::size_t i : {std::size_t{1}, std::size_t{6}, std::size_t{0}}) {
    char name[48];
    std::snprintf(name, sizeof name, "answer %zu token %zu  ratio %.3f", i / T, i % T, std::exp(delta[i]));
    row(name, grad[i], grad_hand[i], grad_t[i], has_torch);
  }
  std::printf(
      "\n  answer 0 token 1 ran too far (ratio 1.822 > 1 + eps with A > 0): the surrogate is flat\n"
      "  there, so only the KL leash pulls on it (gradient = beta * (1 - e^-r) / 11 = %.8f).\n"
      "  Answer 2 token 0 (ratio 0.741 < 1 - eps, A < 0) is clipped the same way.\n",
      beta * (1 - std::exp(-(new_lp[1] - ref_lp[1]))) / tokens);
  std::printf("\nkey number: loss = %.8f  %s\n", pt::ops::item(res.loss), all_ok ? "(all routes agree)" : "FAILED");
  return all_ok ? 0 : 1;
}
