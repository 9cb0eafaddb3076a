// A program a posttrain user would write against the Eigen backend. Exits non-zero when a value
// differs from its closed form, so the consumer-project tests check linking *and* numbers.
#include <cmath>
#include <cstdio>
#include <posttrain/backends/eigen.hpp>
#include <posttrain/posttrain.hpp>

int main() {
  using posttrain::eigen_index;
  using T = posttrain::eigen_tensor<double>;
  // Row 0: uniform logits, label 0 -> -log(1/4) = log 4.
  // Row 1: logits log(1..4), so p = (0.1, 0.2, 0.3, 0.4); label 3 -> -log 0.4.
  // Row 2: ignored (-100). Token mean: (log 4 - log 0.4) / 2 = log(10) / 2.
  const T logits({3, 4}, {0, 0, 0, 0, std::log(1.0), std::log(2.0), std::log(3.0), std::log(4.0), 5, 6, 7, 8});
  const eigen_index labels({3}, {0, 3, -100});
  const auto sft = posttrain::sft_loss(logits, labels);
  const double loss = posttrain::ops::item(sft.loss), want = std::log(10.0) / 2;
  // d loss / d logits[0, 0] = (softmax_0 - 1) / num_tokens = (0.25 - 1) / 2.
  const T grad = posttrain::sft_loss_backward(logits, labels);
  // k3 at logp = log 0.5, ref = log 0.25: e^{-ln 2} + ln 2 - 1 = ln 2 - 0.5.
  const T k3 = posttrain::kl_penalty(T({1}, {std::log(0.5)}), T({1}, {std::log(0.25)}));
  const bool ok = std::abs(loss - want) < 1e-12 && std::abs(grad(0, 0) + 0.375) < 1e-12 &&
                  std::abs(k3(0) - (std::log(2.0) - 0.5)) < 1e-12 && posttrain::ops::item(sft.num_tokens) == 2.0;
  std::printf("eigen consumer: sft loss %.12f (want log(10)/2 = %.12f), dlogits[0,0] %.6f, k3 %.6f: %s\n", loss, want,
              grad(0, 0), k3(0), ok ? "ok" : "WRONG");
  return ok ? 0 : 1;
}
