// Distillation (posttrain/losses/distill.hpp) on LibTorch against the Eigen double reference:
//  * values, metrics and analytic gradients agree on every backend (torch float32/float64, eigen
//    float32, torch bfloat16/float16 inputs computed in float32), over shapes [N, V] and [B, T, V],
//    every divergence, temperatures 0.5/1/2 (with and without τ²), hard-label mixing, ignored labels,
//    explicit masks, the sequence aggregation modes and -inf vocabulary-padding columns;
//  * LibTorch autograd through the forward equals the analytic backward (float64), NaN-free with
//    -inf padding.
#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <cstdint>
#include <limits>
#include <vector>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/backends/torch.hpp"
#include "posttrain/losses/distill.hpp"
#include "support/data.hpp"
#include "support/torch_data.hpp"

using namespace posttrain;
using namespace posttrain::test;

namespace {
constexpr double inf = std::numeric_limits<double>::infinity();
constexpr kd_divergence all_divergences[] = {kd_divergence::forward_kl, kd_divergence::forward_cross_entropy,
                                             kd_divergence::reverse_kl, kd_divergence::symmetric_kl,
                                             kd_divergence::jsd};

/// Sets the last `pad` vocabulary columns of every row to -inf (vocabulary padding).
host_tensor with_padding(host_tensor h, std::int64_t pad) {
  const std::int64_t v = h.shape.back();
  for (std::size_t i = 0; i < h.values.size(); ++i)
    if (static_cast<std::int64_t>(i) % v >= v - pad) h.values[i] = -inf;
  return h;
}

/// Labels that never point at a padding column (their CE would be +inf).
host_labels labels_below(const shape_t& s, std::int64_t vocab, std::uint64_t seed) {
  return random_labels(s, vocab, seed, 0.25);
}
}  // namespace

TEST_CASE("distill cross-backend: values, metrics and gradients", "[distill][cross]") {
  const shape_t shapes[] = {{5, 7}, {2, 3, 11}};
  for (const auto& s : shapes) {
    const shape_t rows(s.begin(), s.end() - 1);
    const std::int64_t vocab = s.back();
    for (std::int64_t pad : {0, 2}) {
      const host_tensor x = with_padding(random_normal(s, 401, 2.0), pad);
      const host_tensor y = with_padding(random_normal(s, 402, 2.0), pad);
      const host_labels labels = labels_below(rows, vocab - pad, 403);
      const host_tensor mask = random_mask(rows, 404);
      const host_tensor w = random_normal(rows, 405);
      for (auto d : all_divergences) {
        for (double tau : {0.5, 1.0, 2.0}) {
          INFO(kd_divergence_name(d) << " shape " << posttrain::detail::shape_string(s) << " pad " << pad << " tau "
                                     << tau);
          const distill_options o{.divergence = d, .beta = 0.3, .symmetric_ratio = 0.7, .temperature = tau};
          distill_options mixed = o;
          mixed.alpha = 0.25;
          mixed.scale_by_temperature_squared = tau != 1.0;
          if (s.size() == 3) mixed.reduction = aggregation::seq_mean_token_mean;
          on_every_backend([&](const auto& mk) {
            const auto sx = mk.values(x), ty = mk.values(y);
            outputs out;
            out.add("kd_per_token", kd_per_token(sx, ty, o));
            out.add("kd_per_token_backward", kd_per_token_backward(sx, ty, mk.values(w), o));
            const auto r = distill_loss(sx, ty, mk.labels(labels), mixed);
            out.add("loss", r.loss);
            out.add("per_token_loss", r.per_token_loss);
            out.add("kd_loss", r.kd_loss);
            out.add("ce_loss", r.ce_loss);
            out.add("num_tokens", r.num_tokens);
            out.add("distill_loss_backward", distill_loss_backward(sx, ty, mk.labels(labels), mixed, 0.5));
            const auto m = distill_loss_masked(sx, ty, mk.values(mask), o);
            out.add("masked loss", m.loss);
            out.add("masked backward", distill_loss_masked_backward(sx, ty, mk.values(mask), o));
            return out;
          });
        }
      }
    }
  }
}

TEST_CASE("distill: LibTorch autograd through the forward equals the analytic backward", "[distill][autograd]") {
  const shape_t s{2, 4, 9};
  const shape_t rows{2, 4};
  for (std::int64_t pad : {0, 3}) {
    const at::Tensor x = to_torch(with_padding(random_normal(s, 411, 2.0), pad));
    const at::Tensor y = to_torch(with_padding(random_normal(s, 412, 2.0), pad));
    const at::Tensor labels = to_torch(labels_below(rows, 9 - pad, 413));
    const at::Tensor mask = to_torch(random_mask(rows, 414));
    const at::Tensor w = to_torch(random_normal(rows, 415));
    for (auto d : all_divergences) {
      for (double beta : {0.0, 0.4, 1.0}) {
        if (beta != 0.4 && d != kd_divergence::jsd) continue;
        for (double tau : {0.5, 1.0, 2.0}) {
          INFO(kd_divergence_name(d) << " beta " << beta << " tau " << tau << " pad " << pad);
          const distill_options o{.divergence = d, .beta = beta, .temperature = tau};
          const at::Tensor g1 =
              autograd_grad(x, [&](const at::Tensor& p) { return (kd_per_token(p, y, o) * w).sum(); });
          CHECK(all_finite(g1));
          require_agree("kd_per_token", kd_per_token_backward(x, y, w, o), ops::to_host(g1), float64_tol);

          distill_options mixed = o;
          mixed.alpha = 0.3;
          mixed.scale_by_temperature_squared = true;
          mixed.reduction = aggregation::seq_mean_token_sum;
          const at::Tensor g2 =
              autograd_grad(x, [&](const at::Tensor& p) { return distill_loss(p, y, labels, mixed).loss; });
          CHECK(all_finite(g2));
          require_agree("distill_loss", distill_loss_backward(x, y, labels, mixed), ops::to_host(g2), float64_tol);

          const at::Tensor g3 =
              autograd_grad(x, [&](const at::Tensor& p) { return distill_loss_masked(p, y, mask, o).loss; });
          CHECK(all_finite(g3));
          require_agree("distill_loss_masked", distill_loss_masked_backward(x, y, mask, o), ops::to_host(g3),
                        float64_tol);
        }
      }
    }
  }
}

TEST_CASE("distill torch: a float32 student with a bfloat16 teacher and a bool mask", "[distill][dtype]") {
  const shape_t s{3, 6};
  const host_tensor x = random_normal(s, 421, 2.0), y = round_through(random_normal(s, 422, 2.0), at::kBFloat16);
  const host_tensor mask = random_mask({3}, 423);
  const distill_options o{.divergence = kd_divergence::jsd, .temperature = 2.0};
  const auto r = distill_loss_masked(to_torch(x, at::kFloat), to_torch(y, at::kBFloat16),
                                     to_torch(mask, at::kFloat).to(at::kBool), o);
  const auto ref = distill_loss_masked(to_eigen<double>(round_through(x, at::kFloat)), to_eigen<double>(y),
                                       to_eigen<double>(mask), o);
  CHECK(r.loss.scalar_type() == at::kFloat);
  require_agree("loss", r.loss, ops::to_host(ref.loss), float32_tol);
}
