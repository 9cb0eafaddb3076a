// examples/quickstart.cpp — posttrain's demo: the SFT loss and the KL estimators on a tiny batch,
// computed by the Eigen reference (double) and by LibTorch (float32), side by side.
//
// Every number is also recomputed "by hand" from its textbook definition with plain loops over
// std::vector (no posttrain), so the table shows three independent routes to the same value.
// The program exits with status 1 if the backends disagree beyond float32's tolerance or the
// Eigen reference differs from the hand computation; ctest runs it as a test.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <posttrain/backends/eigen.hpp>
#include <posttrain/posttrain.hpp>
#include <random>
#include <vector>
#ifdef POSTTRAIN_QUICKSTART_TORCH
#include <torch/torch.h>

#include <posttrain/backends/torch.hpp>
#endif

namespace {

namespace pt = posttrain;
using E = pt::eigen_tensor<double>;

// ---- the batch: 2 sequences x 3 positions over a vocabulary of 4 tokens --------------------------
constexpr std::int64_t B = 2, T = 3, V = 4;
constexpr std::int64_t ignore = pt::default_ignore_index;  // -100, as PyTorch and Hugging Face
const std::vector<double> policy_logits = {
    2.0,  0.5, -1.0, 0.0,   // b0 t0
    0.0,  1.0, 0.0,  -1.0,  // b0 t1
    1.0,  1.0, 1.0,  1.0,   // b0 t2: uniform
    -1.0, 0.0, 3.0,  0.5,   // b1 t0
    0.5,  0.5, -0.5, 2.0,   // b1 t1
    0.0,  0.0, 0.0,  0.0,   // b1 t2: padding
};
const std::vector<double> ref_logits = {
    1.0,  1.0, -1.0, 0.0,   // b0 t0
    0.0,  0.5, 0.5,  -1.0,  // b0 t1
    1.0,  1.0, 1.0,  1.0,   // b0 t2: the same as the policy, so every KL is 0 here
    -1.0, 0.0, 2.0,  0.5,   // b1 t0
    1.5,  0.5, -0.5, 1.0,   // b1 t1
    0.0,  0.0, 0.0,  0.0,   // b1 t2: padding
};
const std::vector<std::int64_t> labels = {0, 1, 2, 2, 0, ignore};

// ---- the same quantities by hand, from their definitions (no posttrain) ----------------------
struct by_hand {
  std::vector<double> logp, ref_logp, exact_kl, entropy;  // per counted token
  std::vector<bool> hit;
};

double logsumexp(const double* x) {
  const double m = *std::max_element(x, x + V);
  double s = 0;
  for (int v = 0; v < V; ++v) s += std::exp(x[v] - m);
  return m + std::log(s);
}

by_hand compute_by_hand() {
  by_hand h;
  for (std::int64_t n = 0; n < B * T; ++n) {
    if (labels[n] == ignore) continue;
    const double* x = &policy_logits[n * V];
    const double* y = &ref_logits[n * V];
    const double lse_x = logsumexp(x), lse_y = logsumexp(y);
    h.logp.push_back(x[labels[n]] - lse_x);  // log softmax(x)[label]
    h.ref_logp.push_back(y[labels[n]] - lse_y);
    double kl = 0, ent = 0;
    for (int v = 0; v < V; ++v) {
      const double lp = x[v] - lse_x, lq = y[v] - lse_y;
      kl += std::exp(lp) * (lp - lq);  // Σ p (log p - log q)
      ent -= std::exp(lp) * lp;        // -Σ p log p
    }
    h.exact_kl.push_back(kl);
    h.entropy.push_back(ent);
    h.hit.push_back(std::max_element(x, x + V) - x == labels[n]);  // argmax (first on ties) == label
  }
  return h;
}

template <class F>
double mean_of(const std::vector<double>& a, const std::vector<double>& b, F f) {
  double s = 0;
  for (std::size_t i = 0; i < a.size(); ++i) s += f(a[i], b[i]);
  return s / static_cast<double>(a.size());
}

// ---- printing and checking --------------------------------------------------------------------
bool all_ok = true;
bool with_torch = false;

// float32 against the double reference: |a - b| <= 1e-5 + 1e-5 |b| (tests/support/tolerances.hpp).
bool close_f32(double got, double ref) { return std::abs(got - ref) <= 1e-5 + 1e-5 * std::abs(ref); }
// The Eigen reference in double against the hand computation: only rounding may differ.
bool close_f64(double got, double ref) { return std::abs(got - ref) <= 1e-12 + 1e-12 * std::abs(ref); }

void header() {
  if (with_torch)
    std::printf("  %-26s %16s %18s %10s %16s\n", "", "Eigen (double)", "LibTorch (float32)", "|diff|", "by hand");
  else
    std::printf("  %-26s %16s %16s\n", "", "Eigen (double)", "by hand");
}

// One table row: Eigen, LibTorch (if built), their |diff|, and the hand value (NAN: none).
void row(const char* name, double eigen, double torch, double hand) {
  const bool backends_ok = !with_torch || close_f32(torch, eigen);
  const bool hand_ok = std::isnan(hand) || close_f64(eigen, hand);
  all_ok = all_ok && backends_ok && hand_ok;
  char hand_s[32] = "-";
  if (!std::isnan(hand)) std::snprintf(hand_s, sizeof hand_s, "%.10f", hand);
  if (with_torch)
    std::printf("  %-26s %16.10f %18.7f %10.1e %16s%s\n", name, eigen, torch, std::abs(torch - eigen), hand_s,
                backends_ok && hand_ok ? "" : "   <-- DISAGREE");
  else
    std::printf("  %-26s %16.10f %16s%s\n", name, eigen, hand_s, hand_ok ? "" : "   <-- DISAGREE");
}

// A gradient row: the largest |diff| between two routes to the same gradient.
void grad_row(const char* name, const std::vector<double>& eigen, const std::vector<double>& torch) {
  double worst = 0;
  bool ok = true;
  for (std::size_t i = 0; i < eigen.size(); ++i) {
    worst = std::max(worst, std::abs(torch[i] - eigen[i]));
    ok = ok && close_f32(torch[i], eigen[i]);
  }
  all_ok = all_ok && ok;
  std::printf("  %-52s max |diff| %.1e over %zu entries%s\n", name, worst, eigen.size(), ok ? "" : "   <-- DISAGREE");
}

struct kl_row {
  const char* name;
  pt::kl_options options;
  double (*formula)(double r);  // the estimator from its definition, r = logp - ref_logp
};

const std::vector<kl_row> kl_rows = {
    {"k1 = r", {.estimator = pt::kl_estimator::k1}, [](double r) { return r; }},
    {"abs = |r|", {.estimator = pt::kl_estimator::abs}, [](double r) { return std::abs(r); }},
    {"k2 = r^2 / 2", {.estimator = pt::kl_estimator::k2}, [](double r) { return r * r / 2; }},
    {"k3 = e^-r + r - 1", {.estimator = pt::kl_estimator::k3}, [](double r) { return std::exp(-r) + r - 1; }},
    {"k3 straight-through (k3+)",
     {.estimator = pt::kl_estimator::k3, .straight_through = true},
     [](double r) { return std::exp(-r) + r - 1; }},
};

// ---- LibTorch: the production backend, float32, gradients by autograd -------------------------
struct torch_numbers {
  double loss = NAN, num_tokens = NAN, token_accuracy = NAN, entropy = NAN, exact_kl = NAN;
  std::vector<double> kl = std::vector<double>(kl_rows.size(), NAN);
  std::vector<double> sft_grad, k3_grad, k3_st_grad;  // empty without LibTorch
};

torch_numbers run_torch(const std::vector<double>& mask_values) {
  torch_numbers out;
#ifdef POSTTRAIN_QUICKSTART_TORCH
  const auto f32 = torch::TensorOptions().dtype(torch::kFloat32);
  const auto logits = torch::tensor(policy_logits).reshape({B, T, V}).to(f32).requires_grad_(true);
  const auto ref = torch::tensor(ref_logits).reshape({B, T, V}).to(f32);
  const auto y = torch::tensor(labels).reshape({B, T});
  const auto mask = torch::tensor(mask_values).reshape({B, T}).to(f32);
  auto host = [](const torch::Tensor& x) { return pt::ops::to_host(x); };

  const pt::sft_result<torch::Tensor> sft = pt::sft_loss(logits, y);
  sft.loss.backward();  // autograd through posttrain's forward
  out.loss = sft.loss.item<double>();
  out.num_tokens = sft.num_tokens.item<double>();
  out.token_accuracy = sft.token_accuracy.item<double>();
  out.entropy = sft.entropy.item<double>();
  out.sft_grad = host(logits.grad());

  const auto lp = pt::token_logprobs(logits, y).detach();
  const auto ref_lp = pt::token_logprobs(ref, y);
  for (std::size_t k = 0; k < kl_rows.size(); ++k) {
    const auto leaf = lp.clone().requires_grad_(true);
    const auto mean_kl = pt::masked_mean(pt::kl_penalty(leaf, ref_lp, kl_rows[k].options), mask);
    mean_kl.backward();
    out.kl[k] = mean_kl.item<double>();
    if (k == 3) out.k3_grad = host(leaf.grad());
    if (k == 4) out.k3_st_grad = host(leaf.grad());
  }
  out.exact_kl = pt::masked_mean(pt::kl_exact(logits.detach(), ref), mask).item<double>();
#else
  (void)mask_values;
#endif
  return out;
}

}  // namespace

int main() {
#ifdef POSTTRAIN_QUICKSTART_TORCH
  with_torch = true;
#endif
  std::printf("posttrain quickstart: SFT cross-entropy and KL estimators on a tiny batch\n\n");
  if (!with_torch)
    std::printf(
        "NOTE: built without LibTorch, so only the Eigen reference runs. Install libtorch-dev and\n"
        "      reconfigure to see the LibTorch column beside it.\n\n");
  std::printf("Batch: %lld sequences x %lld positions, vocabulary of %lld tokens. Policy logits and labels:\n",
              static_cast<long long>(B), static_cast<long long>(T), static_cast<long long>(V));
  for (std::int64_t n = 0; n < B * T; ++n) {
    std::printf("  b%lld t%lld  [", static_cast<long long>(n / T), static_cast<long long>(n % T));
    for (std::int64_t v = 0; v < V; ++v) std::printf("%s%5.1f", v ? ", " : "", policy_logits[n * V + v]);
    if (labels[n] == ignore)
      std::printf("]  label -100 (padding: ignored)\n");
    else
      std::printf("]  label %lld\n", static_cast<long long>(labels[n]));
  }
  const by_hand hand = compute_by_hand();
  std::vector<double> mask_values;
  for (auto l : labels) mask_values.push_back(l == ignore ? 0.0 : 1.0);
  const torch_numbers tn = run_torch(mask_values);

  // ---- Eigen: the reference backend, double precision, analytic gradients ----
  const E logits({B, T, V}, policy_logits), ref({B, T, V}, ref_logits);
  const pt::eigen_index y({B, T}, labels);
  const E mask({B, T}, mask_values);
  const double count = pt::ops::item(pt::ops::sum_all(mask));
  const pt::sft_result<E> sft = pt::sft_loss(logits, y);
  const E sft_grad = pt::sft_loss_backward(logits, y);  // d loss / d logits
  const E lp = pt::token_logprobs(logits, y);           // log pi(label), 0 at padding
  const E ref_lp = pt::token_logprobs(ref, y);          // log pi_ref(label)

  // ---- 1. SFT ----
  std::printf("\n1. SFT loss: next-token cross-entropy (PyTorch F.cross_entropy, ignore_index=-100, mean)\n");
  header();
  auto mean = [](const std::vector<double>& a) { return mean_of(a, a, [](double x, double) { return x; }); };
  row("loss", pt::ops::item(sft.loss), tn.loss, -mean(hand.logp));
  row("num_tokens", pt::ops::item(sft.num_tokens), tn.num_tokens, static_cast<double>(hand.logp.size()));
  row("token_accuracy", pt::ops::item(sft.token_accuracy), tn.token_accuracy,
      static_cast<double>(std::count(hand.hit.begin(), hand.hit.end(), true)) / count);
  row("entropy (nats)", pt::ops::item(sft.entropy), tn.entropy, mean(hand.entropy));
  if (with_torch)
    grad_row("d loss/d logits: Eigen analytic vs LibTorch autograd", pt::ops::to_host(sft_grad), tn.sft_grad);
  std::printf(
      "  loss           = mean over the %g counted tokens of -log softmax(logits)[label]. A uniform guess\n"
      "                   over 4 tokens scores log 4 = 1.386; lower means more probability on the label.\n"
      "  num_tokens     = labels that are not -100 (the padding position contributes nothing).\n"
      "  token_accuracy = share of counted tokens whose largest logit is the label (b0 t2 ties: argmax 0).\n"
      "  entropy        = mean of -sum_v p_v log p_v: how unsure the model is (at most log 4).\n"
      "  gradient       = (softmax(logits) - onehot(label)) / num_tokens, 0 at padding: posttrain's\n"
      "                   analytic backward (sft_loss_backward)%s.\n",
      count, with_torch ? ";\n                   LibTorch autograd through the forward reproduces it" : "");

  // ---- 2. KL ----
  std::printf(
      "\n2. KL(policy || reference) per token, r = log pi(y) - log pi_ref(y) at the label tokens y\n"
      "   (as if the policy had sampled them), averaged over the %g counted tokens\n",
      count);
  header();
  for (std::size_t k = 0; k < kl_rows.size(); ++k) {
    const E value = pt::masked_mean(pt::kl_penalty(lp, ref_lp, kl_rows[k].options), mask);
    const auto formula = kl_rows[k].formula;
    row(kl_rows[k].name, pt::ops::item(value), tn.kl[k],
        mean_of(hand.logp, hand.ref_logp, [&](double a, double b) { return formula(a - b); }));
  }
  row("exact KL over the vocab", pt::ops::item(pt::masked_mean(pt::kl_exact(logits, ref), mask)), tn.exact_kl,
      mean(hand.exact_kl));
  // d mean / d logp: k3's slope is 1 - e^{-r}; the straight-through k3+ has k2's, r.
  const E d_mean = pt::ops::div(mask, count);
  const auto g_k3 = pt::ops::to_host(pt::kl_penalty_backward(lp, ref_lp, d_mean, kl_rows[3].options));
  const auto g_st = pt::ops::to_host(pt::kl_penalty_backward(lp, ref_lp, d_mean, kl_rows[4].options));
  if (with_torch) {
    grad_row("d k3/d logp: Eigen analytic vs LibTorch autograd", g_k3, tn.k3_grad);
    grad_row("d k3+/d logp: Eigen analytic vs LibTorch autograd", g_st, tn.k3_st_grad);
  }
  const auto lp_h = pt::ops::to_host(lp), ref_h = pt::ops::to_host(ref_lp);
  auto per_token = [&](const char* name, auto f) {
    std::printf("  %-25s", name);
    for (std::size_t n = 0; n < labels.size(); ++n)
      if (labels[n] != ignore) std::printf("%9.4f", f(n));
    std::printf("\n");
  };
  std::printf("  per token (Eigen)             b0 t0    b0 t1    b0 t2    b1 t0    b1 t1\n");
  per_token("r = logp - ref_logp", [&](std::size_t n) { return lp_h[n] - ref_h[n]; });
  per_token("d k3/d logp = 1 - e^-r", [&](std::size_t n) { return g_k3[n] * count; });
  per_token("d k3+/d logp = r", [&](std::size_t n) { return g_st[n] * count; });
  std::printf(
      "  k1 = r               an unbiased estimate of the KL, noisy, can be negative (TRL PPO's default).\n"
      "  abs, k2 = r^2/2      biased but low-variance; k2's gradient, r, is the reverse-KL gradient.\n"
      "  k3 = e^-r + r - 1    unbiased and never negative (Schulman 2020; verl low_var_kl, TRL GRPO).\n"
      "  k3+                  k3's value with k2's gradient (verl \"k3+\"): same number, gradient r.\n"
      "  exact KL             sum_v pi(v) (log pi(v) - log pi_ref(v)), what k1..k3 estimate from one\n"
      "                       sampled token each; it needs both full logits. With 5 tokens the estimates\n"
      "                       scatter around it. b0 t2 has identical logits: every KL is 0 there.\n"
      "  Clamps: verl's low_var_kl also clamps r to +-20 and k3 to +-10 (kl_options::verl_low_var_kl());\n"
      "  posttrain leaves them off by default, as TRL does.\n");

  // ---- Monte-Carlo: with fixed labels one cannot see that k1 and k3 are unbiased; sampling can ----
  {
    // Position b0 t0: sample y ~ pi, estimate KL(pi || pi_ref) by the mean of k(r), r = log pi(y) - log pi_ref(y).
    const std::vector<double> x(policy_logits.begin(), policy_logits.begin() + V),
        xr(ref_logits.begin(), ref_logits.begin() + V);
    auto log_softmax = [](const std::vector<double>& z) {
      const double m = *std::max_element(z.begin(), z.end());
      double s = 0;
      for (double v : z) s += std::exp(v - m);
      std::vector<double> out;
      for (double v : z) out.push_back(v - m - std::log(s));
      return out;
    };
    const auto lp_v = log_softmax(x), ref_v = log_softmax(xr);
    const double exact = pt::ops::item(pt::kl_exact(E({1, V}, x), E({1, V}, xr)));
    std::vector<double> p(V);
    for (std::int64_t v = 0; v < V; ++v) p[static_cast<std::size_t>(v)] = std::exp(lp_v[static_cast<std::size_t>(v)]);
    std::mt19937 rng(2020);  // fixed seed: the same table every run
    std::discrete_distribution<int> pick(p.begin(), p.end());
    std::printf(
        "\n3. Monte-Carlo: KL(pi || pi_ref) at b0 t0 estimated from n tokens sampled from pi (posttrain's kl_penalty\n"
        "   on each sample, then the mean; +- is the standard error). Exact KL over the vocab: %.6f\n",
        exact);
    std::printf("  %8s %22s %22s %22s\n", "n", "k1 = r", "k2 = r^2/2", "k3 = e^-r + r - 1");
    bool unbiased = true;
    for (int n : {10, 100, 1000, 10000, 100000}) {
      std::vector<double> l(static_cast<std::size_t>(n)), rl(static_cast<std::size_t>(n));
      for (int i = 0; i < n; ++i) {
        const auto y = static_cast<std::size_t>(pick(rng));
        l[static_cast<std::size_t>(i)] = lp_v[y], rl[static_cast<std::size_t>(i)] = ref_v[y];
      }
      const E lp_s({n}, l), ref_s({n}, rl);
      std::printf("  %8d", n);
      for (auto est : {pt::kl_estimator::k1, pt::kl_estimator::k2, pt::kl_estimator::k3}) {
        const auto k = pt::ops::to_host(pt::kl_penalty(lp_s, ref_s, {.estimator = est}));
        double mean = 0, sq = 0;
        for (double v : k) mean += v / n;
        for (double v : k) sq += (v - mean) * (v - mean) / (n - 1);
        const double se = std::sqrt(sq / n);
        std::printf("   %9.5f +- %-8.5f", mean, se);
        // k1 and k3 are unbiased: their means must fall within 5 standard errors of the exact KL.
        if (n == 100000 && est != pt::kl_estimator::k2) unbiased = unbiased && std::abs(mean - exact) < 5 * se;
      }
      std::printf("\n");
    }
    std::printf(
        "  k1 and k3 converge to the exact KL (unbiased); k3's spread is smaller (low variance) and it is never\n"
        "  negative. k2 converges to E[r^2]/2, a different number (biased); its gradient, r, is the KL's in "
        "expectation.\n");
    if (!unbiased) {
      std::printf("  DISAGREE: a k1 or k3 mean is more than 5 standard errors from the exact KL\n");
      all_ok = false;
    }
  }

  std::printf("\n%s\n", !all_ok      ? "FAILED: see the rows marked DISAGREE."
                        : with_torch ? "OK: Eigen (double), LibTorch (float32) and the hand computation agree."
                                     : "OK: the Eigen reference agrees with the hand computation.");
  return all_ok ? 0 : 1;
}
