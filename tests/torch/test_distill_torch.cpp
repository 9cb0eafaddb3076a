// Distillation (posttrain/losses/distill.hpp) on LibTorch against the Eigen double reference:
//  * values, metrics and analytic gradients agree on every backend (torch float32/float64, eigen
//    float32, torch bfloat16/float16 inputs computed in float32), over shapes [N, V] and [B, T, V],
//    every divergence, temperatures 0.5/1/2 (with and without τ²), hard-label mixing, ignored labels,
//    explicit masks, the sequence aggregation modes and -inf vocabulary-padding columns;
//  * LibTorch autograd through the forward equals the analytic backward (float64), NaN-free with
//    -inf padding;
//  * the fused kernel path (backends/torch/distill.hpp, float32/float64 contiguous CPU) against
//    posttrain::generic:: on Eigen double for every fused divergence (jsd at β = 0 and 1), τ and τ²,
//    masks and padding, its autograd node (checked by name, so the test fails if the override is not
//    dispatched) against LibTorch autograd through the generic composition; strided views, a teacher
//    requiring grad, create_graph = true and bfloat16 logits keep the generic results.
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

namespace test_distill_torch {  // one namespace per test file: the unity build compiles several in one TU

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

namespace {
/// The fused divergences (jsd only at β = 0 and 1): every option set the torch kernel path takes.
struct fused_case {
  kd_divergence d;
  double beta;
};
constexpr fused_case fused_cases[] = {{kd_divergence::forward_kl, 0.5}, {kd_divergence::forward_cross_entropy, 0.5},
                                      {kd_divergence::reverse_kl, 0.5}, {kd_divergence::symmetric_kl, 0.5},
                                      {kd_divergence::jsd, 0.0},        {kd_divergence::jsd, 1.0}};

/// Whether t was produced by backends/torch/distill.hpp's autograd node (the kernel path).
bool from_kd_kernel(const at::Tensor& t) {
  return t.grad_fn() && t.grad_fn()->name().find("kd_function") != std::string::npos;
}
}  // namespace

TEST_CASE("distill torch: the fused kernel path against the generic reference", "[distill][fused]") {
  const shape_t s{2, 3, 13};
  const shape_t rows{2, 3};
  for (auto st : {at::kFloat, at::kDouble}) {
    const tolerance tol = st == at::kFloat ? float32_tol : float64_tol;
    for (std::int64_t pad : {0, 3}) {
      const host_tensor x = round_through(with_padding(random_normal(s, 431, 2.0), pad), st);
      const host_tensor y = round_through(with_padding(random_normal(s, 432, 2.0), pad), st);
      const host_tensor w = round_through(random_normal(rows, 433), st);
      const host_tensor mask = random_mask(rows, 434);
      const at::Tensor tx = to_torch(x, st), ty = to_torch(y, st), tw = to_torch(w, st), tm = to_torch(mask, st);
      const auto ex = to_eigen<double>(x), ey = to_eigen<double>(y), ew = to_eigen<double>(w),
                 em = to_eigen<double>(mask);
      for (const auto& c : fused_cases) {
        for (double tau : {0.5, 1.0, 2.0}) {
          for (bool tau2 : {false, true}) {
            INFO(kd_divergence_name(c.d) << " beta " << c.beta << " tau " << tau << " tau2 " << tau2 << " pad " << pad
                                         << " dtype " << c10::toString(st));
            const distill_options o{.divergence = c.d,
                                    .beta = c.beta,
                                    .symmetric_ratio = 0.3,
                                    .temperature = tau,
                                    .scale_by_temperature_squared = tau2};
            require_agree("kd_per_token", kd_per_token(tx, ty, o), ops::to_host(generic::kd_per_token(ex, ey, o)), tol);
            require_agree("kd_per_token_backward", kd_per_token_backward(tx, ty, tw, o),
                          ops::to_host(generic::kd_per_token_backward(ex, ey, ew, o)), tol);
            const auto r = distill_loss_masked(tx, ty, tm, o);
            const auto ref = generic::distill_loss_masked(ex, ey, em, o);
            require_agree("masked loss", r.loss, ops::to_host(ref.loss), tol);
            require_agree("masked per_token_loss", r.per_token_loss, ops::to_host(ref.per_token_loss), tol);
            require_agree("masked backward", distill_loss_masked_backward(tx, ty, tm, o, 0.5),
                          ops::to_host(generic::distill_loss_masked_backward(ex, ey, em, o, 0.5)), tol);

            // Autograd: the kernel's node (a test that fails when the override is not dispatched)
            // against LibTorch autograd through the generic composition, same dtype.
            at::Tensor leaf = tx.detach().clone().requires_grad_();
            const at::Tensor v = kd_per_token(leaf, ty, o);
            CHECK(from_kd_kernel(v));
            (v * tw).sum().backward();
            const at::Tensor gen =
                autograd_grad(tx, [&](const at::Tensor& p) { return (generic::kd_per_token(p, ty, o) * tw).sum(); });
            CHECK(leaf.grad().scalar_type() == st);
            CHECK(all_finite(leaf.grad()));
            require_agree("autograd kd_per_token", leaf.grad(), ops::to_host(gen), tol);
            const at::Tensor gl =
                autograd_grad(tx, [&](const at::Tensor& p) { return distill_loss_masked(p, ty, tm, o).loss; });
            const at::Tensor gl_ref =
                autograd_grad(tx, [&](const at::Tensor& p) { return generic::distill_loss_masked(p, ty, tm, o).loss; });
            require_agree("autograd distill_loss_masked", gl, ops::to_host(gl_ref), tol);
          }
        }
      }
    }
  }
}

TEST_CASE("distill torch: tensors the kernel does not take keep the generic path", "[distill][fused]") {
  const shape_t s{4, 10};
  const host_tensor x = random_normal(s, 441, 2.0), y = random_normal(s, 442, 2.0), w = random_normal({4}, 443);
  const at::Tensor tx = to_torch(x), ty = to_torch(y), tw = to_torch(w);
  const distill_options o{.divergence = kd_divergence::symmetric_kl, .symmetric_ratio = 0.6, .temperature = 2.0};
  const std::vector<double> ref_grad =
      ops::to_host(generic::kd_per_token_backward(to_eigen<double>(x), to_eigen<double>(y), to_eigen<double>(w), o));

  SECTION("a strided view") {
    // The transpose of a [V, N] tensor holds the same values as [N, V] but is not contiguous.
    const at::Tensor xt = tx.t().contiguous().t();
    REQUIRE_FALSE(xt.is_contiguous());
    at::Tensor leaf = xt.detach().clone().t().contiguous().t().requires_grad_();
    const at::Tensor v = kd_per_token(leaf, ty, o);
    CHECK_FALSE(from_kd_kernel(v));
    (v * tw).sum().backward();
    require_agree("strided autograd", leaf.grad(), ref_grad, float64_tol);
  }
  SECTION("a teacher that requires grad gets the generic path's gradient") {
    at::Tensor sl = tx.detach().clone().requires_grad_(), tl = ty.detach().clone().requires_grad_();
    const at::Tensor v = kd_per_token(sl, tl, o);
    CHECK_FALSE(from_kd_kernel(v));
    (v * tw).sum().backward();
    require_agree("student grad", sl.grad(), ref_grad, float64_tol);
    REQUIRE(tl.grad().defined());
    at::Tensor sr = tx.detach().clone().requires_grad_(), tr = ty.detach().clone().requires_grad_();
    (generic::kd_per_token(sr, tr, o) * tw).sum().backward();
    require_agree("teacher grad", tl.grad(), ops::to_host(tr.grad()), float64_tol);
  }
  SECTION("create_graph = true: second derivatives equal the generic composition's") {
    const auto second = [&](bool fused) {
      at::Tensor leaf = tx.detach().clone().requires_grad_();
      const at::Tensor v = fused ? kd_per_token(leaf, ty, o) : generic::kd_per_token(leaf, ty, o);
      CHECK(from_kd_kernel(v) == fused);
      const at::Tensor g = torch::autograd::grad({(v * tw).sum()}, {leaf}, {}, true, true)[0];
      require_agree("first derivative", g, ref_grad, float64_tol);
      return torch::autograd::grad({(g * g).sum()}, {leaf})[0];
    };
    const at::Tensor h = second(true);
    CHECK(all_finite(h));
    require_agree("second derivative", h, ops::to_host(second(false)), float64_tol);
  }
  SECTION("bfloat16 logits") {
    const host_tensor xb = round_through(x, at::kBFloat16), yb = round_through(y, at::kBFloat16);
    at::Tensor leaf = to_torch(xb, at::kBFloat16).requires_grad_();
    const at::Tensor v = kd_per_token(leaf, to_torch(yb, at::kBFloat16), o);
    CHECK(v.scalar_type() == at::kFloat);
    require_agree("bf16 values", v, ops::to_host(generic::kd_per_token(to_eigen<double>(xb), to_eigen<double>(yb), o)),
                  float32_tol);
    (v * tw.to(at::kFloat)).sum().backward();
    CHECK(leaf.grad().scalar_type() == at::kBFloat16);
    const std::vector<double> ref = ops::to_host(
        generic::kd_per_token_backward(to_eigen<double>(xb), to_eigen<double>(yb), to_eigen<double>(w), o));
    require_agree("bf16 grad", leaf.grad(), ref, output_tolerance(dtype::bfloat16));
  }
}

}  // namespace test_distill_torch
