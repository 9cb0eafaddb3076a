// Fused linear cross-entropy on LibTorch (backends/torch/fused_linear_ce.hpp): loss.backward() through the
// autograd function against LibTorch's own autograd through the naive composition
// at::matmul(hidden, headᵀ) + at::cross_entropy_loss (plus z·lse² built from at::logsumexp), in
// float64 (float64_tol) and float32 (float32_tol); bfloat16 inputs against the float64 composition
// on the same bf16-rounded values (loss: float32_tol, bf16 gradients: bfloat16_output_tol);
// strided views; the chunked LibTorch-op path (the CUDA path, run here on CPU) at several chunk
// sizes; scaled grad_output; the raw _and_grad call; and every rejected input.
// Below them: the differentiable fused log-probs and entropy (backends/torch/fused_linear_logprobs.hpp).
#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "posttrain/backends/torch.hpp"
#include "posttrain/backends/torch/fused_linear_ce.hpp"
#include "posttrain/backends/torch/fused_linear_logprobs.hpp"
#include "posttrain/losses/grpo.hpp"
#include "posttrain/losses/ppo.hpp"
#include "posttrain/numerics/masked.hpp"
#include "support/data.hpp"
#include "support/tolerances.hpp"

namespace test_linear_ce_torch {  // one namespace per test file: the unity build compiles several in one TU

using namespace posttrain;
using Catch::Matchers::Contains;

namespace {

/// Every element of got within tol of want (want in double).
void require_close(const std::string& what, const at::Tensor& got, const at::Tensor& want, test::tolerance tol) {
  REQUIRE(got.sizes() == want.sizes());
  const at::Tensor g = got.detach().to(at::kDouble).contiguous().reshape({-1});
  const at::Tensor w = want.detach().to(at::kDouble).contiguous().reshape({-1});
  const double* gp = g.data_ptr<double>();
  const double* wp = w.data_ptr<double>();
  // One assertion per tensor (the 48 MiB gradients below have 12.6 M elements); the first
  // element outside the tolerance is reported.
  std::int64_t first_bad = -1;
  for (std::int64_t i = 0; i < g.numel() && first_bad < 0; ++i)
    if (!tol.accepts(gp[i], wp[i])) first_bad = i;
  INFO(what << " element " << first_bad << ": got " << (first_bad < 0 ? 0.0 : gp[first_bad]) << ", want "
            << (first_bad < 0 ? 0.0 : wp[first_bad]));
  REQUIRE(first_bad == -1);
}

struct naive_result {
  at::Tensor loss, grad_hidden, grad_head, logprobs, entropy;
};

/// LibTorch's own composition in float64 with autograd: logits = X·Wᵀ / τ (τ = o.temperature, the
/// division TRL and verl write), cross_entropy (+ z·lse²).
naive_result naive(const at::Tensor& hidden, const at::Tensor& head, const at::Tensor& labels,
                   const fused_linear_ce_options& o, double grad_out = 1.0) {
  const at::Tensor x = hidden.detach().to(at::kDouble).requires_grad_();
  const at::Tensor w = head.detach().to(at::kDouble).requires_grad_();
  const std::int64_t h = w.size(1);
  const at::Tensor y = labels.reshape({-1});
  const at::Tensor logits = at::matmul(x.reshape({-1, h}), w.t()) / o.temperature;  // [N, V]
  at::Tensor tok = at::cross_entropy_loss(logits, y, {}, at::Reduction::None, o.ignore_index, o.label_smoothing);
  const at::Tensor keep = y.ne(o.ignore_index).to(at::kDouble);
  if (o.z_loss > 0.0) tok = tok + o.z_loss * at::logsumexp(logits, {1}).pow(2) * keep;
  const double count = o.normalizer                      ? *o.normalizer
                       : o.reduction == aggregation::sum ? 1.0
                                                         : std::max(1.0, keep.sum().item<double>());
  const at::Tensor loss = tok.sum() / count;
  (loss * grad_out).backward();
  const at::Tensor logp = at::log_softmax(logits.detach(), 1);
  const at::Tensor safe = at::where(y.ne(o.ignore_index), y, at::zeros_like(y));
  const at::Tensor lp = logp.gather(1, safe.unsqueeze(1)).squeeze(1) * keep;
  const at::Tensor ent = -(logp.exp() * logp).sum(1);
  return {loss.detach(), x.grad(), w.grad(), lp.reshape(labels.sizes()), ent.reshape(labels.sizes())};
}

struct problem {
  at::Tensor hidden, head, labels;
};
problem make_problem(std::int64_t n, std::int64_t h, std::int64_t v, std::uint64_t seed, double ignore,
                     at::ScalarType dt) {
  const auto x = test::random_normal({n, h}, seed), w = test::random_normal({v, h}, seed + 1, 0.3);
  const auto y = test::random_labels({n}, v, seed + 2, ignore);
  return {torch::tensor(x.values, torch::kDouble).reshape({n, h}).to(dt),
          torch::tensor(w.values, torch::kDouble).reshape({v, h}).to(dt), torch::tensor(y.values, torch::kLong)};
}

/// The autograd loss and grads of the fused function against the naive composition.
void check_autograd(const problem& p, const fused_linear_ce_options& o, test::tolerance value_tol,
                    test::tolerance grad_tol, double grad_out = 1.0) {
  const at::Tensor x = p.hidden.detach().clone().requires_grad_();
  const at::Tensor w = p.head.detach().clone().requires_grad_();
  const auto r = fused_linear_cross_entropy(x, w, p.labels, o);
  CHECK_FALSE(r.entropy.requires_grad());
  CHECK_FALSE(r.logprobs.requires_grad());
  (r.loss * grad_out).backward();
  const naive_result want = naive(p.hidden, p.head, p.labels, o, grad_out);
  require_close("loss", r.loss, want.loss, value_tol);
  require_close("logprobs", r.logprobs, want.logprobs, value_tol);
  require_close("entropy", r.entropy, want.entropy, value_tol);
  REQUIRE(x.grad().scalar_type() == p.hidden.scalar_type());
  require_close("hidden.grad", x.grad(), want.grad_hidden, grad_tol);
  require_close("head.grad", w.grad(), want.grad_head, grad_tol);
}

}  // namespace

TEST_CASE("torch linear CE: loss.backward() equals autograd through matmul + cross_entropy (float32 and float64)",
          "[linear_ce]") {
  // V = 1031: several vocabulary tiles with a ragged last one; 30% of the labels ignored.
  fused_linear_ce_options o;
  double grad_out = 1.0;
  SECTION("token mean") {}
  SECTION("label smoothing 0.1, chunks of 3 rows") {
    o.label_smoothing = 0.1;
    o.chunk_rows = 3;
  }
  SECTION("z-loss 1e-3, chunks of 1 row") {
    o.z_loss = 1e-3;
    o.chunk_rows = 1;
  }
  SECTION("sum, grad_output 2.5") {
    o.reduction = aggregation::sum;
    grad_out = 2.5;
  }
  SECTION("normalizer 40, grad_output -0.5") {
    o.normalizer = 40.0;
    grad_out = -0.5;
  }
  SECTION("temperature 0.7, label smoothing 0.1, z-loss 1e-3, chunks of 3 rows") {
    o.temperature = 0.7;
    o.label_smoothing = 0.1;
    o.z_loss = 1e-3;
    o.chunk_rows = 3;
  }
  SECTION("temperature 1.3") { o.temperature = 1.3; }
  for (auto dt : {at::kDouble, at::kFloat}) {
    INFO("dtype " << dt);
    const auto tol = dt == at::kDouble ? test::float64_tol : test::float32_tol;
    check_autograd(make_problem(13, 24, 1031, 5, 0.3, dt), o, tol, tol, grad_out);
  }
}

TEST_CASE("torch linear CE: bfloat16 inputs are computed in float32, gradients returned in bfloat16", "[linear_ce]") {
  // The reference runs in float64 on the same bf16-rounded values: the loss is float32 work
  // (float32_tol); the gradients carry bf16's rounding on top (bfloat16_output_tol).
  const auto p = make_problem(11, 16, 600, 7, 0.2, at::kBFloat16);
  fused_linear_ce_options o;
  o.label_smoothing = 0.1;
  check_autograd(p, o, test::float32_tol, test::bfloat16_output_tol);
  // The chunked LibTorch-op path (the CUDA path) on the same bf16 inputs.
  const auto g = posttrain::detail::torch_linear_ce::chunked_ops(p.hidden, p.head, p.labels, o, true, true, 1.0);
  const naive_result want = naive(p.hidden, p.head, p.labels, o);
  REQUIRE(g[5].scalar_type() == at::kBFloat16);
  require_close("chunked ops loss", g[0], want.loss, test::float32_tol);
  require_close("chunked ops grad hidden", g[5], want.grad_hidden, test::bfloat16_output_tol);
  require_close("chunked ops grad head", g[6], want.grad_head, test::bfloat16_output_tol);
}

TEST_CASE("torch linear CE: strided views and [B, T, H] hidden states", "[linear_ce]") {
  // hidden: every other column of a [2, 5, 2H] tensor (non-contiguous, rank 3); head: the
  // transpose of a [H, V] tensor (column-major). Both are made contiguous before the kernel.
  const std::int64_t h = 12, v = 500;
  at::manual_seed(3);
  const at::Tensor base = at::randn({2, 5, 2 * h}, at::kDouble);
  const at::Tensor hidden = base.slice(2, 0, 2 * h, 2);
  const at::Tensor head = (0.3 * at::randn({h, v}, at::kDouble)).t();
  REQUIRE_FALSE(hidden.is_contiguous());
  REQUIRE_FALSE(head.is_contiguous());
  const at::Tensor labels = at::randint(0, v, {2, 5}, at::kLong);
  labels[1][2] = -100;
  const problem p{hidden, head, labels};
  check_autograd(p, {}, test::float64_tol, test::float64_tol);
  // The leaf's gradient has the leaf's shape.
  const at::Tensor x = hidden.detach().clone().requires_grad_();
  fused_linear_cross_entropy(x, head, labels).loss.backward();
  CHECK(x.grad().sizes() == x.sizes());
}

TEST_CASE("torch linear CE: the chunked LibTorch-op path (used off CPU) equals the naive composition", "[linear_ce]") {
  const auto p = make_problem(9, 10, 700, 9, 0.3, at::kDouble);
  fused_linear_ce_options o;
  o.z_loss = 1e-3;
  o.label_smoothing = 0.05;
  SECTION("temperature 1") {}
  SECTION("temperature 0.5") { o.temperature = 0.5; }
  const naive_result want = naive(p.hidden, p.head, p.labels, o);
  for (std::int64_t chunk : {1, 3, 9, 100}) {
    INFO("chunk_rows " << chunk);
    o.chunk_rows = chunk;
    const auto g = posttrain::detail::torch_linear_ce::chunked_ops(p.hidden, p.head, p.labels, o, true, true, 1.0);
    require_close("loss", g[0], want.loss, test::float64_tol);
    require_close("logprobs", g[2], want.logprobs, test::float64_tol);
    require_close("entropy", g[3], want.entropy, test::float64_tol);
    require_close("grad hidden", g[5], want.grad_hidden, test::float64_tol);
    require_close("grad head", g[6], want.grad_head, test::float64_tol);
  }
  if (torch::cuda::is_available()) {
    const at::Tensor x = p.hidden.to(at::kCUDA).requires_grad_(), w = p.head.to(at::kCUDA).requires_grad_();
    fused_linear_cross_entropy(x, w, p.labels.to(at::kCUDA), o).loss.backward();
    require_close("CUDA hidden.grad", x.grad().cpu(), want.grad_hidden, test::float64_tol);
    require_close("CUDA head.grad", w.grad().cpu(), want.grad_head, test::float64_tol);
  }
}

TEST_CASE("torch linear CE: the raw _and_grad call, no-grad forward, only one input requiring grad", "[linear_ce]") {
  const auto p = make_problem(8, 6, 300, 11, 0.25, at::kFloat);
  const naive_result want = naive(p.hidden, p.head, p.labels, {}, 0.3);
  const auto g = fused_linear_cross_entropy_and_grad(p.hidden, p.head, p.labels, {}, 0.3);
  require_close("raw grad hidden", g.grad_hidden, want.grad_hidden, test::float32_tol);
  require_close("raw grad head", g.grad_head, want.grad_head, test::float32_tol);
  {
    at::NoGradGuard no_grad;
    const auto r = fused_linear_cross_entropy(p.hidden.clone().requires_grad_(), p.head, p.labels);
    CHECK_FALSE(r.loss.requires_grad());
    require_close("no-grad loss", r.loss, want.loss, test::float32_tol);
  }
  // Only the head trains (a frozen trunk): head.grad matches, the hidden states get none.
  const at::Tensor w = p.head.clone().requires_grad_();
  fused_linear_cross_entropy(p.hidden, w, p.labels).loss.backward();
  require_close("head-only grad", w.grad() * 0.3, want.grad_head, test::float32_tol);
}

TEST_CASE("torch linear CE: gradients handed to autograd (retain_graph, accumulation, grad_output)", "[linear_ce]") {
  // backward drops its copy of the gradients unless the graph is retained: check every way the
  // hand-over can go wrong against the naive composition's gradients.
  const auto p = make_problem(9, 7, 257, 21, 0.2, at::kDouble);
  const naive_result want = naive(p.hidden, p.head, p.labels, {});
  const at::Tensor x = p.hidden.clone().requires_grad_(), w = p.head.clone().requires_grad_();
  SECTION("retain_graph: the second backward still has the gradients, .grad doubles") {
    const auto r = fused_linear_cross_entropy(x, w, p.labels);
    r.loss.backward({}, /*retain_graph=*/true);
    require_close("first head.grad", w.grad(), want.grad_head, test::float64_tol);
    r.loss.backward();
    require_close("second hidden.grad", x.grad(), want.grad_hidden * 2.0, test::float64_tol);
    require_close("second head.grad", w.grad(), want.grad_head * 2.0, test::float64_tol);
  }
  SECTION("retain_graph with grad_output 3 then 1: the kept gradients are not scaled in place") {
    const auto r = fused_linear_cross_entropy(x, w, p.labels);
    (r.loss * 3.0).backward({}, /*retain_graph=*/true);
    r.loss.backward();
    require_close("head.grad", w.grad(), want.grad_head * 4.0, test::float64_tol);
    require_close("hidden.grad", x.grad(), want.grad_hidden * 4.0, test::float64_tol);
  }
  SECTION("two steps into an existing .grad, the second with grad_output -2") {
    fused_linear_cross_entropy(x, w, p.labels).loss.backward();
    const at::Tensor kept = w.grad();
    (fused_linear_cross_entropy(x, w, p.labels).loss * -2.0).backward();
    require_close("head.grad", w.grad(), want.grad_head * -1.0, test::float64_tol);
    require_close("hidden.grad", x.grad(), want.grad_hidden * -1.0, test::float64_tol);
    CHECK(w.grad().is_same(kept));  // accumulated in place, as AccumulateGrad does
  }
  SECTION("torch::autograd::grad returns the gradients to the caller") {
    const auto r = fused_linear_cross_entropy(x, w, p.labels);
    const auto g = torch::autograd::grad({r.loss}, {x, w});
    require_close("grad hidden", g[0], want.grad_hidden, test::float64_tol);
    require_close("grad head", g[1], want.grad_head, test::float64_tol);
  }
}

TEST_CASE("torch linear CE: a head gradient above the huge-page threshold (48 MiB) is correct and usable",
          "[linear_ce]") {
  // V x H x 4 bytes = 48 MiB >= posttrain::detail::huge_page_min_bytes: the gradient comes from an mmap.
  const std::int64_t v = 6144, h = 2048;
  REQUIRE(v * h * 4 >= posttrain::detail::huge_page_min_bytes);
  const auto p = make_problem(3, h, v, 31, 0.0, at::kFloat);
  const naive_result want = naive(p.hidden, p.head, p.labels, {}, 1.0);
  for (int step = 0; step < 2; ++step) {  // a fresh mapping each step, the previous one freed
    const at::Tensor w = p.head.clone().requires_grad_();
    fused_linear_cross_entropy(p.hidden, w, p.labels).loss.backward();
    REQUIRE(w.grad().is_contiguous());
    require_close("head.grad", w.grad(), want.grad_head, test::float32_tol);
    w.mutable_grad().mul_(0.5).add_(w.grad());  // in-place ops work on the adopted buffer
    require_close("head.grad after in-place ops", w.grad(), want.grad_head, test::float32_tol);
  }
  const at::Tensor z = posttrain::detail::large_cpu_zeros({v, h}, at::TensorOptions().dtype(at::kFloat));
  CHECK(z.count_nonzero().item<std::int64_t>() == 0);
  const at::Tensor e = posttrain::detail::large_cpu_empty({v, h}, at::TensorOptions().dtype(at::kDouble));
  CHECK(e.sizes() == at::IntArrayRef({v, h}));
  CHECK(e.scalar_type() == at::kDouble);
  const at::Tensor small = posttrain::detail::large_cpu_zeros({4, 5}, at::TensorOptions().dtype(at::kFloat));
  CHECK(small.count_nonzero().item<std::int64_t>() == 0);
}

namespace {
void expect_error(const std::function<void()>& call, const std::vector<std::string>& parts) {
  CHECK_THROWS_AS(call(), posttrain::error);
  CHECK_THROWS_WITH(call(), Catch::Matchers::StartsWith("posttrain::fused_linear_cross_entropy: "));
  for (const auto& part : parts) CHECK_THROWS_WITH(call(), Contains(part));
}
}  // namespace

TEST_CASE("torch linear CE rejects invalid inputs, naming the argument", "[linear_ce][errors]") {
  const auto p = make_problem(4, 3, 7, 13, 0.0, at::kFloat);
  const auto call = [](at::Tensor x, at::Tensor w, at::Tensor y, fused_linear_ce_options o = {}) {
    return [=] { (void)fused_linear_cross_entropy(x, w, y, o); };
  };
  fused_linear_ce_options chunk0, smooth1;
  chunk0.chunk_rows = 0;
  smooth1.label_smoothing = 1.0;
  expect_error(call(p.hidden, p.head.to(at::kDouble), p.labels), {"head", "float64", "float32"});
  expect_error(call(p.hidden, p.head, p.labels.to(at::kFloat)), {"labels", "integer"});
  expect_error(call(p.hidden, p.head, p.labels.slice(0, 0, 3)), {"labels", "[3]", "[4]"});
  expect_error(call(p.hidden, p.head.slice(1, 0, 2), p.labels), {"head", "[7, 2]", "[V, 3]"});
  expect_error(call(p.hidden, p.head, torch::tensor({0, 1, 7, 2}, torch::kLong)), {"labels", "outside [0, 7)"});
  expect_error(call(p.hidden.to(at::kInt), p.head.to(at::kInt), p.labels), {"hidden", "floating"});
  expect_error(call(p.hidden[0], p.head, p.labels), {"hidden", "rank"});
  expect_error(call(p.hidden, p.head, p.labels, chunk0), {"options.chunk_rows"});
  expect_error(call(p.hidden, p.head, p.labels, smooth1), {"options.label_smoothing"});
}

// ---- Differentiable fused log-probs and entropy (backends/torch/fused_linear_logprobs.hpp) ----------
// Both outputs through autograd against LibTorch's own autograd through the naive composition
// logits = at::matmul(hidden, headᵀ)/τ, at::log_softmax, gather (0 at ignored labels) and
// -Σ exp(log p)·log p, in float64: f = Σ a·lp + b·H (either term alone too, the other output's
// gradient then undefined), on the kernel path and on the chunked LibTorch-op path (forced on CPU)
// at chunk sizes 1, 3 and 100; float32 (float32_tol) and bfloat16 (outputs float32_tol, gradients
// bfloat16_output_tol) on the same rounded values; retain_graph, one input requiring grad, a PPO
// loss on top, the raw backward call, and every rejected input.

namespace {

struct ops_path_guard {
  explicit ops_path_guard(bool on) { posttrain::detail::torch_linear_logprobs::force_chunked_ops() = on; }
  ~ops_path_guard() { posttrain::detail::torch_linear_logprobs::force_chunked_ops() = false; }
};

struct lp_reference {
  at::Tensor logprobs, entropy, grad_hidden, grad_head;
};

/// LibTorch autograd in float64 through matmul + log_softmax + gather and the entropy of log_softmax,
/// of f = Σ a·lp + Σ b·H (a or b undefined: that term left out).
lp_reference naive_logprobs(const at::Tensor& hidden, const at::Tensor& head, const at::Tensor& labels,
                            const fused_linear_logprobs_options& o, const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor x = hidden.detach().to(at::kDouble).requires_grad_();
  const at::Tensor w = head.detach().to(at::kDouble).requires_grad_();
  const at::Tensor y = labels.reshape({-1});
  const at::Tensor logits = at::matmul(x.reshape({-1, w.size(1)}), w.t()) / o.temperature;  // [N, V]
  const at::Tensor logp = at::log_softmax(logits, 1);
  const at::Tensor keep = y.ne(o.ignore_index);
  const at::Tensor safe = at::where(keep, y, at::zeros_like(y));
  const at::Tensor lp = logp.gather(1, safe.unsqueeze(1)).squeeze(1) * keep.to(at::kDouble);
  const at::Tensor ent = -(logp.exp() * logp).sum(1);
  at::Tensor f = at::zeros({}, at::kDouble);
  if (a.defined()) f = f + (a.reshape({-1}).to(at::kDouble) * lp).sum();
  if (b.defined()) f = f + (b.reshape({-1}).to(at::kDouble) * ent).sum();
  f.backward();
  return {lp.detach().reshape(labels.sizes()), ent.detach().reshape(labels.sizes()), x.grad(), w.grad()};
}

at::Tensor random_upstream(at::IntArrayRef shape, std::uint64_t seed) {
  at::manual_seed(seed);
  return at::randn(shape, at::kDouble);
}

/// fused_linear_logprobs under autograd, f = Σ a·lp + Σ b·H, against naive_logprobs.
void check_logprobs_autograd(const problem& p, const fused_linear_logprobs_options& o, const at::Tensor& a,
                             const at::Tensor& b, test::tolerance value_tol, test::tolerance grad_tol) {
  const at::Tensor x = p.hidden.detach().clone().requires_grad_();
  const at::Tensor w = p.head.detach().clone().requires_grad_();
  const auto r = fused_linear_logprobs(x, w, p.labels, o);
  CHECK(r.logprobs.requires_grad());
  CHECK(r.entropy.requires_grad());
  const auto cdt = p.hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  REQUIRE(r.logprobs.scalar_type() == cdt);
  at::Tensor f = at::zeros({}, r.logprobs.options());
  if (a.defined()) f = f + (a.to(cdt) * r.logprobs).sum();
  if (b.defined()) f = f + (b.to(cdt) * r.entropy).sum();
  f.backward();
  const lp_reference want = naive_logprobs(p.hidden, p.head, p.labels, o, a, b);
  require_close("logprobs", r.logprobs, want.logprobs, value_tol);
  require_close("entropy", r.entropy, want.entropy, value_tol);
  REQUIRE(x.grad().scalar_type() == p.hidden.scalar_type());
  REQUIRE(w.grad().scalar_type() == p.head.scalar_type());
  require_close("hidden.grad", x.grad(), want.grad_hidden, grad_tol);
  require_close("head.grad", w.grad(), want.grad_head, grad_tol);
}

}  // namespace

TEST_CASE("torch linear logprobs: both outputs differentiable, equal to autograd through matmul + log_softmax",
          "[linear_logprobs]") {
  // V = 1031: several vocabulary tiles with a ragged last one; 30% of the labels ignored.
  const std::int64_t n = 13;
  const at::Tensor a = random_upstream({n}, 101), b = random_upstream({n}, 102), none;
  fused_linear_logprobs_options o;
  bool ops_path = false;
  SECTION("kernel path, temperature 1") {}
  SECTION("kernel path, temperature 0.7, chunks of 3 rows") {
    o.temperature = 0.7;
    o.chunk_rows = 3;
  }
  SECTION("op path, chunks of 1 row") {
    ops_path = true;
    o.chunk_rows = 1;
  }
  SECTION("op path, temperature 1.3, chunks of 3 rows") {
    ops_path = true;
    o.temperature = 1.3;
    o.chunk_rows = 3;
  }
  SECTION("op path, temperature 0.6, chunks of 100 rows") {
    ops_path = true;
    o.temperature = 0.6;
    o.chunk_rows = 100;
  }
  const ops_path_guard guard(ops_path);
  for (auto dt : {at::kDouble, at::kFloat}) {
    INFO("dtype " << dt << (ops_path ? ", op path" : ", kernel path"));
    const auto tol = dt == at::kDouble ? test::float64_tol : test::float32_tol;
    const auto p = make_problem(n, 24, 1031, 5, 0.3, dt);
    check_logprobs_autograd(p, o, a, b, tol, tol);
    check_logprobs_autograd(p, o, a, none, tol, tol);  // entropy unused: its gradient undefined
    check_logprobs_autograd(p, o, none, b, tol, tol);  // logprobs unused
  }
}

TEST_CASE("torch linear logprobs: bfloat16 inputs give float32 outputs and bfloat16 gradients", "[linear_logprobs]") {
  // The reference runs in float64 on the same bf16-rounded values: outputs are float32 work
  // (float32_tol); the gradients carry bf16's rounding on top (bfloat16_output_tol).
  const auto p = make_problem(11, 16, 600, 7, 0.2, at::kBFloat16);
  const at::Tensor a = random_upstream({11}, 103), b = random_upstream({11}, 104);
  fused_linear_logprobs_options o;
  o.temperature = 0.8;
  for (bool ops_path : {false, true}) {
    INFO((ops_path ? "op path" : "kernel path"));
    const ops_path_guard guard(ops_path);
    o.chunk_rows = ops_path ? std::optional<std::int64_t>(4) : std::nullopt;
    check_logprobs_autograd(p, o, a, b, test::float32_tol, test::bfloat16_output_tol);
  }
}

TEST_CASE("torch linear logprobs: [B, T, H] strided hidden, retain_graph, one input requiring grad",
          "[linear_logprobs]") {
  // hidden: every other column of a [2, 5, 2H] tensor (non-contiguous, rank 3); head: the transpose
  // of a [H, V] tensor (column-major).
  const std::int64_t h = 12, v = 500;
  at::manual_seed(3);
  const at::Tensor base = at::randn({2, 5, 2 * h}, at::kDouble);
  const at::Tensor hidden = base.slice(2, 0, 2 * h, 2);
  const at::Tensor head = (0.3 * at::randn({h, v}, at::kDouble)).t();
  REQUIRE_FALSE(hidden.is_contiguous());
  const at::Tensor labels = at::randint(0, v, {2, 5}, at::kLong);
  labels[1][2] = -100;
  const at::Tensor a = random_upstream({2, 5}, 105), b = random_upstream({2, 5}, 106);
  fused_linear_logprobs_options o;
  o.temperature = 0.9;
  const lp_reference want = naive_logprobs(hidden, head, labels, o, a, b);
  const bool ops_path = GENERATE(false, true);
  INFO((ops_path ? "op path" : "kernel path"));
  const ops_path_guard guard(ops_path);
  check_logprobs_autograd({hidden, head, labels}, o, a, b, test::float64_tol, test::float64_tol);
  const at::Tensor x = hidden.detach().clone().requires_grad_(), w = head.detach().clone().requires_grad_();
  SECTION("retain_graph: a second backward doubles .grad") {
    const auto r = fused_linear_logprobs(x, w, labels, o);
    REQUIRE(r.logprobs.sizes() == at::IntArrayRef({2, 5}));
    const at::Tensor f = (a * r.logprobs).sum() + (b * r.entropy).sum();
    f.backward({}, /*retain_graph=*/true);
    require_close("first hidden.grad", x.grad(), want.grad_hidden.reshape({2, 5, h}), test::float64_tol);
    f.backward();
    require_close("second hidden.grad", x.grad(), want.grad_hidden.reshape({2, 5, h}) * 2.0, test::float64_tol);
    require_close("second head.grad", w.grad(), want.grad_head * 2.0, test::float64_tol);
  }
  SECTION("only hidden requires grad") {
    const auto r = fused_linear_logprobs(x, head, labels, o);
    ((a * r.logprobs).sum() + (b * r.entropy).sum()).backward();
    require_close("hidden.grad", x.grad(), want.grad_hidden.reshape({2, 5, h}), test::float64_tol);
  }
  SECTION("only head requires grad (a frozen trunk)") {
    const auto r = fused_linear_logprobs(hidden, w, labels, o);
    ((a * r.logprobs).sum() + (b * r.entropy).sum()).backward();
    require_close("head.grad", w.grad(), want.grad_head, test::float64_tol);
  }
  SECTION("no grad mode: plain outputs") {
    at::NoGradGuard no_grad;
    const auto r = fused_linear_logprobs(x, w, labels, o);
    CHECK_FALSE(r.logprobs.requires_grad());
    require_close("logprobs", r.logprobs, want.logprobs, test::float64_tol);
    require_close("entropy", r.entropy, want.entropy, test::float64_tol);
  }
}

TEST_CASE("torch linear logprobs under a PPO loss with an entropy bonus and under GRPO (the header's example)",
          "[linear_logprobs]") {
  // The same loss on the naive composition's log-probs (LibTorch autograd through matmul +
  // log_softmax) gives the reference gradients.
  const std::int64_t bsz = 3, t = 4, h = 8, v = 257;
  at::manual_seed(9);
  const at::Tensor hidden = at::randn({bsz, t, h}, at::kDouble), head = 0.5 * at::randn({v, h}, at::kDouble);
  const at::Tensor ids = at::randint(0, v, {bsz, t}, at::kLong);
  const at::Tensor old_lp = -at::rand({bsz, t}, at::kDouble) * 6.0, adv = at::randn({bsz, t}, at::kDouble);
  const at::Tensor mask = (at::rand({bsz, t}, at::kDouble) < 0.8).to(at::kDouble);
  const auto loss_of = [&](const at::Tensor& lp, const at::Tensor& ent) {
    return ppo_policy_loss(lp, old_lp, adv, mask).loss - 0.01 * masked_mean(ent, mask);
  };
  fused_linear_logprobs_options o;
  o.temperature = 0.7;
  const at::Tensor x = hidden.clone().requires_grad_(), w = head.clone().requires_grad_();
  auto [lp, ent] = fused_linear_logprobs(x, w, ids, o);
  loss_of(lp, ent).backward();
  const at::Tensor xr = hidden.clone().requires_grad_(), wr = head.clone().requires_grad_();
  const at::Tensor logp = at::log_softmax(at::matmul(xr, wr.t()) / 0.7, -1);
  loss_of(logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)).backward();
  require_close("hidden.grad", x.grad(), xr.grad(), test::float64_tol);
  require_close("head.grad", w.grad(), wr.grad(), test::float64_tol);
  // GRPO (on-policy, sequence advantages [B]) on the same log-probs.
  const at::Tensor seq_adv = at::randn({bsz}, at::kDouble);
  const auto grpo_of = [&](const at::Tensor& lp_) {
    return grpo_loss(grpo_batch<at::Tensor>{.logprobs = lp_, .advantages = seq_adv, .response_mask = mask}).loss;
  };
  x.mutable_grad().zero_();
  w.mutable_grad().zero_();
  xr.mutable_grad().zero_();
  wr.mutable_grad().zero_();
  grpo_of(fused_linear_logprobs(x, w, ids, o).logprobs).backward();
  const at::Tensor logp_r = at::log_softmax(at::matmul(xr, wr.t()) / 0.7, -1);
  grpo_of(logp_r.gather(-1, ids.unsqueeze(-1)).squeeze(-1)).backward();
  require_close("GRPO hidden.grad", x.grad(), xr.grad(), test::float64_tol);
  require_close("GRPO head.grad", w.grad(), wr.grad(), test::float64_tol);
}

TEST_CASE("torch linear logprobs: the raw backward call with absent upstream gradients", "[linear_logprobs]") {
  const auto p = make_problem(8, 6, 300, 11, 0.25, at::kFloat);
  const at::Tensor a = random_upstream({8}, 107), b = random_upstream({8}, 108), none;
  fused_linear_logprobs_options o;
  o.temperature = 1.5;
  for (bool ops_path : {false, true}) {
    INFO((ops_path ? "op path" : "kernel path"));
    const ops_path_guard guard(ops_path);
    const lp_reference both = naive_logprobs(p.hidden, p.head, p.labels, o, a, b);
    const auto g = fused_linear_logprobs_backward(p.hidden, p.head, p.labels, o, a.to(at::kFloat), b.to(at::kFloat));
    require_close("grad hidden", g.grad_hidden, both.grad_hidden, test::float32_tol);
    require_close("grad head", g.grad_head, both.grad_head, test::float32_tol);
    const lp_reference ent_only = naive_logprobs(p.hidden, p.head, p.labels, o, none, b);
    const auto ge = fused_linear_logprobs_backward(p.hidden, p.head, p.labels, o, std::nullopt, b);
    require_close("entropy-only grad hidden", ge.grad_hidden, ent_only.grad_hidden, test::float32_tol);
    require_close("entropy-only grad head", ge.grad_head, ent_only.grad_head, test::float32_tol);
    const auto g0 = fused_linear_logprobs_backward(p.hidden, p.head, p.labels, o, at::Tensor(), std::nullopt);
    CHECK(g0.grad_hidden.count_nonzero().item<std::int64_t>() == 0);
    CHECK(g0.grad_head.count_nonzero().item<std::int64_t>() == 0);
    CHECK(g0.grad_head.sizes() == p.head.sizes());
  }
  if (torch::cuda::is_available()) {
    const at::Tensor x = p.hidden.to(at::kCUDA).requires_grad_(), w = p.head.to(at::kCUDA).requires_grad_();
    const auto r = fused_linear_logprobs(x, w, p.labels.to(at::kCUDA), o);
    ((a.to(at::kCUDA).to(at::kFloat) * r.logprobs).sum() + (b.to(at::kCUDA).to(at::kFloat) * r.entropy).sum())
        .backward();
    const lp_reference want = naive_logprobs(p.hidden, p.head, p.labels, o, a, b);
    require_close("CUDA logprobs", r.logprobs.cpu(), want.logprobs, test::float32_tol);
    require_close("CUDA hidden.grad", x.grad().cpu(), want.grad_hidden, test::float32_tol);
    require_close("CUDA head.grad", w.grad().cpu(), want.grad_head, test::float32_tol);
  }
}

TEST_CASE("torch linear logprobs reject invalid inputs, naming the argument", "[linear_logprobs][errors]") {
  const auto p = make_problem(4, 3, 7, 13, 0.0, at::kFloat);
  const auto expect = [](const std::function<void()>& call, const std::string& fn,
                         const std::vector<std::string>& parts) {
    CHECK_THROWS_AS(call(), posttrain::error);
    CHECK_THROWS_WITH(call(), Catch::Matchers::StartsWith("posttrain::" + fn + ": "));
    for (const auto& part : parts) CHECK_THROWS_WITH(call(), Contains(part));
  };
  const auto call = [](at::Tensor x, at::Tensor w, at::Tensor y, fused_linear_logprobs_options o = {}) {
    return [=] { (void)fused_linear_logprobs(x, w, y, o); };
  };
  const std::string fwd = "fused_linear_logprobs", bwd = "fused_linear_logprobs_backward";
  fused_linear_logprobs_options chunk0, temp0, temp_nan;
  chunk0.chunk_rows = 0;
  temp0.temperature = 0.0;
  temp_nan.temperature = std::nan("");
  expect(call(p.hidden, p.head.to(at::kDouble), p.labels), fwd, {"head", "float64", "float32"});
  expect(call(p.hidden, p.head, p.labels.to(at::kFloat)), fwd, {"labels", "integer"});
  expect(call(p.hidden, p.head, p.labels.slice(0, 0, 3)), fwd, {"labels", "[3]", "[4]"});
  expect(call(p.hidden, p.head.slice(1, 0, 2), p.labels), fwd, {"head", "[7, 2]", "[V, 3]"});
  expect(call(p.hidden, p.head, torch::tensor({0, 1, 7, 2}, torch::kLong)), fwd, {"labels", "outside [0, 7)"});
  expect(call(p.hidden.to(at::kInt), p.head.to(at::kInt), p.labels), fwd, {"hidden", "floating"});
  expect(call(p.hidden[0], p.head, p.labels), fwd, {"hidden", "rank"});
  expect(call(p.hidden, p.head, p.labels, chunk0), fwd, {"options.chunk_rows", "> 0"});
  expect(call(p.hidden, p.head, p.labels, temp0), fwd, {"options.temperature", "> 0"});
  expect(call(p.hidden, p.head, p.labels, temp_nan), fwd, {"options.temperature", "finite"});
  const at::Tensor g = at::ones({4}, at::kFloat);
  expect([&] { (void)fused_linear_logprobs_backward(p.hidden, p.head, p.labels, {}, at::ones({5}), std::nullopt); },
         bwd, {"grad_logprobs", "[5]", "expected grad_logprobs of shape [4]"});
  expect(
      [&] {
        (void)fused_linear_logprobs_backward(p.hidden, p.head, p.labels, {}, g, at::ones({4, 1}));
      },
      bwd, {"grad_entropy", "[4, 1]"});
  expect([&] { (void)fused_linear_logprobs_backward(p.hidden, p.head, p.labels, {}, g.to(at::kInt), std::nullopt); },
         bwd, {"grad_logprobs", "floating"});
  expect([&] { (void)fused_linear_logprobs_backward(p.hidden, p.head, p.labels, temp0, g, std::nullopt); }, bwd,
         {"options.temperature"});
}

}  // namespace test_linear_ce_torch
