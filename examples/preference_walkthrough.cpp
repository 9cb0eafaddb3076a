// examples/preference_walkthrough.cpp — preference learning on a handful of pairs: first a
// Bradley-Terry reward model, then DPO, which needs no reward model at all.
//
// Each number is computed three ways: the Eigen reference (double), LibTorch (float32, autograd
// for the gradients, when found) and by hand with plain loops from the published definitions
// (InstructGPT eq. 1; DPO eq. 7). The walkthrough shows why DPO's gradient pushes the chosen
// response up and the rejected one down, and by how much: each pair is weighted by σ(-x), so a pair
// the policy already ranks correctly (x large) barely moves while a mis-ranked one moves most.
// Exit status 1 on any disagreement; ctest runs it and checks the key number.
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

constexpr std::int64_t B = 4;
// Reward-model scores of the chosen and rejected answers of four prompts (pair 3 is mis-ranked).
const std::vector<double> r_chosen = {2.0, 0.5, 1.0, -0.5}, r_rejected = {-1.0, 0.0, 1.0, 1.5};
// Sequence log-probabilities (sums over completion tokens) under the policy and the frozen reference.
const std::vector<double> chosen = {-12.0, -30.0, -8.0, -20.0}, rejected = {-25.0, -31.0, -8.5, -14.0};
const std::vector<double> ref_chosen = {-14.0, -30.5, -8.0, -19.0}, ref_rejected = {-15.0, -30.0, -9.0, -16.0};
constexpr double beta = 0.1;

double log_sigmoid(double x) { return std::min(x, 0.0) - std::log1p(std::exp(-std::abs(x))); }
double sigmoid(double x) { return std::exp(log_sigmoid(x)); }

bool all_ok = true;
bool close(double got, double want, double tol) { return std::abs(got - want) <= tol + tol * std::abs(want); }
void row(const char* name, double eigen, double torch_value, bool has_torch, double hand) {
  const bool ok = close(eigen, hand, 1e-12) && (!has_torch || close(torch_value, eigen, 1e-5));
  all_ok = all_ok && ok;
  if (has_torch)
    std::printf("  %-30s %14.8f %14.8f %14.8f%s\n", name, eigen, torch_value, hand, ok ? "" : "   <-- DISAGREE");
  else
    std::printf("  %-30s %14.8f %14s %14.8f%s\n", name, eigen, "-", hand, ok ? "" : "   <-- DISAGREE");
}
E vec(const std::vector<double>& v) { return E({static_cast<std::int64_t>(v.size())}, v); }
}  // namespace

int main() {
  bool has_torch = false;
#ifdef POSTTRAIN_EXAMPLE_TORCH
  has_torch = true;
  const auto tvec = [](const std::vector<double>& v) { return torch::tensor(v, torch::kDouble).to(torch::kFloat); };
#endif
  std::printf("columns: Eigen (double), LibTorch (float32)%s, by hand (plain loops)\n\n",
              has_torch ? "" : " [not built: LibTorch not found]");

  // ---- 1. Bradley-Terry reward model ----
  std::printf("1. Reward model: loss = mean_b -log sigmoid(r_chosen - r_rejected)   (InstructGPT eq. 1)\n");
  double rm_hand = 0, acc_hand = 0;
  for (std::int64_t b = 0; b < B; ++b) {
    rm_hand += -log_sigmoid(r_chosen[b] - r_rejected[b]) / B;
    acc_hand += (r_chosen[b] > r_rejected[b] ? 1.0 : 0.0) / B;
  }
  const auto rm = pt::reward_model_loss(vec(r_chosen), vec(r_rejected));
  double rm_torch = 0, acc_torch = 0;
#ifdef POSTTRAIN_EXAMPLE_TORCH
  const auto rm_t = pt::reward_model_loss(tvec(r_chosen), tvec(r_rejected));
  rm_torch = rm_t.loss.item<double>(), acc_torch = rm_t.accuracy.item<double>();
#endif
  row("loss", pt::ops::item(rm.loss), rm_torch, has_torch, rm_hand);
  row("accuracy (r_c > r_r)", pt::ops::item(rm.accuracy), acc_torch, has_torch, acc_hand);
  std::printf("  The tie (pair 2) costs log 2 = 0.693; the mis-ranked pair 3 costs log(1 + e^2) = 2.127.\n\n");

  // ---- 2. DPO ----
  std::printf(
      "2. DPO: x = beta * [(logp_c - ref_c) - (logp_r - ref_r)],  loss = mean_b -log sigmoid(x)  (DPO eq. 7)\n");
  std::printf("   implicit reward of a response: beta * (logp - ref); beta = %.2f\n", beta);
  std::vector<double> x(B), grad_hand(B);
  double dpo_hand = 0;
  for (std::int64_t b = 0; b < B; ++b) {
    x[b] = beta * ((chosen[b] - ref_chosen[b]) - (rejected[b] - ref_rejected[b]));
    dpo_hand += -log_sigmoid(x[b]) / B;
    grad_hand[b] = -beta * sigmoid(-x[b]) / B;  // d loss / d chosen_logps
  }
  pt::preference_batch<E> batch{vec(chosen), vec(rejected)};
  batch.ref_chosen_logps = vec(ref_chosen);
  batch.ref_rejected_logps = vec(ref_rejected);
  const auto r = pt::dpo(batch, {.beta = beta});
  const auto g = pt::dpo_backward(batch, {.beta = beta});
  double dpo_torch = 0, margin_torch = 0;
  std::vector<double> grad_torch(B, 0.0), grad_torch_rejected(B, 0.0);
#ifdef POSTTRAIN_EXAMPLE_TORCH
  pt::preference_batch<torch::Tensor> tb{tvec(chosen).requires_grad_(), tvec(rejected).requires_grad_()};
  tb.ref_chosen_logps = tvec(ref_chosen);
  tb.ref_rejected_logps = tvec(ref_rejected);
  const auto rt = pt::dpo(tb, {.beta = beta});
  rt.loss.backward();  // LibTorch autograd through the forward, checked against the analytic backward below
  dpo_torch = rt.loss.item<double>(), margin_torch = rt.reward_margin.item<double>();
  grad_torch = pt::ops::to_host(tb.chosen_logps.grad());
  grad_torch_rejected = pt::ops::to_host(tb.rejected_logps.grad());
#endif
  double margin_hand = 0;
  for (std::int64_t b = 0; b < B; ++b) margin_hand += x[b] / B;
  row("loss", pt::ops::item(r.loss), dpo_torch, has_torch, dpo_hand);
  row("rewards/margins (mean x)", pt::ops::item(r.reward_margin), margin_torch, has_torch, margin_hand);

  std::printf("\n   Why the gradient moves chosen up and rejected down: d loss/d logp_c = -beta sigmoid(-x) / B\n");
  std::printf("   and d loss/d logp_r = +beta sigmoid(-x) / B. Gradient descent raises logp_c, lowers logp_r,\n");
  std::printf("   and the weight sigmoid(-x) is largest for the pair the policy gets most wrong:\n\n");
  std::printf("  pair          x   sigmoid(-x)   d/d chosen (Eigen)   (LibTorch)   (by hand)   d/d rejected\n");
  for (std::int64_t b = 0; b < B; ++b) {
    const double ge = g.chosen_logps(b), gr = g.rejected_logps(b);
    const bool ok = close(ge, grad_hand[b], 1e-12) && close(gr, -grad_hand[b], 1e-12) &&
                    (!has_torch || (close(grad_torch[b], ge, 1e-5) && close(grad_torch_rejected[b], gr, 1e-5)));
    all_ok = all_ok && ok;
    char torch_col[32] = "           -";  // "-" where LibTorch was not built, as in the rows above
    if (has_torch) std::snprintf(torch_col, sizeof torch_col, "%12.8f", grad_torch[b]);
    std::printf("  %4lld %10.4f %12.6f %20.8f %s %11.8f %14.8f%s\n", static_cast<long long>(b), x[b], sigmoid(-x[b]),
                ge, torch_col, grad_hand[b], gr, ok ? "" : "   <-- DISAGREE");
  }
  std::printf(
      "\n  Pair 0 (x = %.1f, already ranked right) gets %.0f%% of the push pair 3 (x = %.1f, mis-ranked) gets.\n", x[0],
      100 * sigmoid(-x[0]) / sigmoid(-x[3]), x[3]);
  std::printf("  With beta * (logp - ref) as a reward, sigmoid DPO is exactly the reward-model loss above.\n\n");
  std::printf("key number: DPO loss = %.6f  (%s)\n", pt::ops::item(r.loss),
              all_ok ? "all routes agree" : "FAILED: a route disagrees");
  return all_ok ? 0 : 1;
}
