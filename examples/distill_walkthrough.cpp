// distill_walkthrough: distil a bimodal toy teacher into a unimodal toy student and watch the divergence
// decide what the student learns.
//
// Teacher: a fixed distribution over V = 11 tokens with two modes (tokens 2 and 8, weights 0.55/0.45).
// Student: it can only say "one bump": logits x_v = -(v - μ)² / (2σ²), two parameters (μ, log σ).
// We minimise the per-token divergence with posttrain's analytic backward (kd_per_token_backward gives
// dD/dx; the chain rule to the parameters is dx_v/dμ = (v - μ)/σ², dx_v/dlog σ = (v - μ)²/σ²) by
// plain gradient descent, once per divergence:
//   forward KL(T || S) = Σ p_T log(p_T / p_S) punishes p_S ≈ 0 wherever the teacher has mass: the
//     student spreads out to cover both modes (mode-covering), putting mass in the valley between them;
//   reverse KL(S || T) = Σ p_S log(p_S / p_T) punishes p_S > 0 wherever the teacher has none: the
//     student collapses onto one mode (mode-seeking) and ignores the other;
//   JSD(β = ½) is bounded by log 2 and, for this teacher, mode-seeking too: it lands on the same
//     student as reverse KL (same μ, σ), at a smaller divergence value.
// Exit status 1 (and "FAILED") if the analytic gradient disagrees with finite differences or the
// students do not behave as described.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/losses/distill.hpp"

using namespace posttrain;

namespace {
constexpr int V = 11;

eigen_tensor<double> student_logits(double mu, double log_sigma) {
  const double s2 = std::exp(2.0 * log_sigma);
  eigen_tensor<double> x({1, V});
  for (int v = 0; v < V; ++v) x(0, v) = -(v - mu) * (v - mu) / (2.0 * s2);
  return x;
}

eigen_tensor<double> teacher_logits() {
  // log of 0.55·N(2, 0.8) + 0.45·N(8, 0.8), unnormalised: softmax normalises
  eigen_tensor<double> y({1, V});
  for (int v = 0; v < V; ++v)
    y(0, v) = std::log(0.55 * std::exp(-(v - 2.0) * (v - 2.0) / 1.28) + 0.45 * std::exp(-(v - 8.0) * (v - 8.0) / 1.28));
  return y;
}

std::vector<double> probs(const eigen_tensor<double>& x) { return ops::to_host(softmax_last(x)); }

struct fit {
  double mu, log_sigma, divergence;
};

/// d D / d(μ, log σ) through the analytic d D / d x.
void param_grad(double mu, double log_sigma, const eigen_tensor<double>& y, const distill_options& o, double& g_mu,
                double& g_ls) {
  const double s2 = std::exp(2.0 * log_sigma);
  const auto gx = kd_per_token_backward(student_logits(mu, log_sigma), y, eigen_tensor<double>({1}, {1.0}), o);
  g_mu = g_ls = 0.0;
  for (int v = 0; v < V; ++v) {
    g_mu += gx(0, v) * (v - mu) / s2;
    g_ls += gx(0, v) * (v - mu) * (v - mu) / s2;
  }
}

fit distil(const eigen_tensor<double>& y, const distill_options& o) {
  double mu = 3.5, ls = 0.0;  // start off-centre (sigma = 1), between the modes but nearer token 2
  for (int step = 0; step < 20000; ++step) {
    double g_mu = 0, g_ls = 0;
    param_grad(mu, ls, y, o, g_mu, g_ls);
    mu -= 0.2 * g_mu;
    ls -= 0.05 * g_ls;
  }
  return {mu, ls, ops::item(kd_per_token(student_logits(mu, ls), y, o))};
}
}  // namespace

int main() {
  bool ok = true;
  const auto y = teacher_logits();
  const auto pt = probs(y);
  std::printf("teacher p_T over tokens 0..10:");
  for (double p : pt) std::printf(" %.3f", p);
  std::printf("\nstudent: x_v = -(v - mu)^2 / (2 sigma^2); the gradients are checked at mu = 4.5, sigma = 1.5,\n");
  std::printf("the fits start from mu = 3.5, sigma = 1\n\n");

  // 1. the analytic chain rule against central differences of the forward, at the start
  for (auto d : {kd_divergence::forward_kl, kd_divergence::reverse_kl, kd_divergence::jsd}) {
    const distill_options o{.divergence = d};
    double g_mu = 0, g_ls = 0;
    param_grad(4.5, std::log(1.5), y, o, g_mu, g_ls);
    const double h = 1e-6;
    const auto f = [&](double mu, double ls) { return ops::item(kd_per_token(student_logits(mu, ls), y, o)); };
    const double fd_mu = (f(4.5 + h, std::log(1.5)) - f(4.5 - h, std::log(1.5))) / (2 * h);
    const double fd_ls = (f(4.5, std::log(1.5) + h) - f(4.5, std::log(1.5) - h)) / (2 * h);
    const bool agree = std::abs(g_mu - fd_mu) < 1e-6 && std::abs(g_ls - fd_ls) < 1e-6;
    std::printf("%-10s dD/dmu = %+.6f (finite diff. %+.6f), dD/dlog sigma = %+.6f (%+.6f)  %s\n", kd_divergence_name(d),
                g_mu, fd_mu, g_ls, fd_ls, agree ? "agree" : "DISAGREE");
    ok = ok && agree;
  }

  // 2. distil with each divergence
  std::printf("\n%-12s %7s %7s %10s %12s %12s %12s\n", "divergence", "mu", "sigma", "D(final)", "mass@mode2",
              "mass@valley", "mass@mode8");
  fit fits[3];
  const kd_divergence ds[] = {kd_divergence::forward_kl, kd_divergence::jsd, kd_divergence::reverse_kl};
  for (int i = 0; i < 3; ++i) {
    const distill_options o{.divergence = ds[i]};
    fits[i] = distil(y, o);
    const auto ps = probs(student_logits(fits[i].mu, fits[i].log_sigma));
    const double mode2 = ps[1] + ps[2] + ps[3], valley = ps[4] + ps[5] + ps[6], mode8 = ps[7] + ps[8] + ps[9];
    std::printf("%-12s %7.3f %7.3f %10.5f %12.3f %12.3f %12.3f\n", kd_divergence_name(ds[i]), fits[i].mu,
                std::exp(fits[i].log_sigma), fits[i].divergence, mode2, valley, mode8);
  }
  const auto mass = [](const fit& f, int centre) {  // student mass on tokens centre-1..centre+1
    const auto ps = probs(student_logits(f.mu, f.log_sigma));
    return ps[centre - 1] + ps[centre] + ps[centre + 1];
  };
  const fit& fwd = fits[0];
  const fit& rev = fits[2];
  const double fwd2 = mass(fwd, 2), fwd8 = mass(fwd, 8), fwd_valley = mass(fwd, 5);
  const double rev2 = mass(rev, 2), rev8 = mass(rev, 8);
  std::printf("\nforward KL covers both modes (sigma = %.2f): %.1f%% near token 2, %.1f%% near token 8, and %.1f%%\n",
              std::exp(fwd.log_sigma), 100 * fwd2, 100 * fwd8, 100 * fwd_valley);
  std::printf("  in the valley where the teacher has %.1f%%: missing a teacher mode would cost far more.\n",
              100 * (pt[4] + pt[5] + pt[6]));
  std::printf("reverse KL seeks one mode (mu = %.3f, sigma = %.3f): %.1f%% near token 2, %.1f%% near token 8;\n",
              rev.mu, std::exp(rev.log_sigma), 100 * rev2, 100 * rev8);
  std::printf("  mass where the teacher has none is what it punishes, so it drops the second mode.\n");
  std::printf("JSD(1/2) lands on the same student as reverse KL here (mode-seeking too); its value is smaller\n");
  std::printf("  because JSD is bounded by log 2.\n");
  const bool covering = fwd2 > 0.2 && fwd8 > 0.2;
  const bool seeking = std::max(rev2, rev8) > 0.9 && std::min(rev2, rev8) < 0.05;
  if (!covering || !seeking) {
    std::printf("FAILED: expected a mode-covering forward-KL student and a mode-seeking reverse-KL student\n");
    ok = false;
  }
  std::printf("key number: reverse-KL student mass on its mode = %.3f, forward-KL mass on the smaller mode = %.3f%s\n",
              std::max(rev2, rev8), fwd8, ok ? "  (as expected)" : "");
  return ok ? 0 : 1;
}
