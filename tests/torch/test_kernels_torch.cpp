// The torch backend's fused overrides on CPU float32/float64 tensors (posttrain::kernels behind an
// autograd node) against LibTorch's own composition (log_softmax + gather, logsumexp, softmax ·
// log_softmax) and its autograd gradients, and against the Eigen double reference; a strided view
// takes the fallback path and agrees; create_graph = true keeps the backward differentiable.
#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <vector>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/backends/torch.hpp"
#include "posttrain/numerics/logits.hpp"
#include "support/data.hpp"
#include "support/tolerances.hpp"
#include "support/torch_data.hpp"

using namespace posttrain;
using namespace posttrain::test;

namespace {
void require_close(const at::Tensor& got, const at::Tensor& want, tolerance tol) {
  REQUIRE(got.sizes() == want.sizes());
  const auto g = ops::to_host(got), w = ops::to_host(want);
  for (std::size_t i = 0; i < w.size(); ++i) {
    INFO("element " << i << ": got " << g[i] << ", want " << w[i]);
    REQUIRE(tol.accepts(g[i], w[i]));
  }
}

/// LibTorch's own composition in double, the way a C++ trainer writes it (the independent reference).
struct libtorch_reference {
  at::Tensor lse, logprob, entropy;
  explicit libtorch_reference(const at::Tensor& x, const at::Tensor& labels) {
    const at::Tensor xd = x.to(at::kDouble);
    const at::Tensor logp = at::log_softmax(xd, -1);
    lse = at::logsumexp(xd, {-1});
    logprob = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1);
    entropy = -(logp.exp() * at::where(xd.isneginf(), at::zeros_like(logp), logp)).sum(-1);
  }
};
}  // namespace

TEST_CASE("torch kernels: fused values equal LibTorch's composition in double (float32 and float64)") {
  auto h = random_normal({3, 4, 5000}, 7, 3.0);
  for (std::int64_t v = 0; v < 5000; v += 3)
    h.values[static_cast<std::size_t>(v)] = -std::numeric_limits<double>::infinity();
  const auto lab = random_labels({3, 4}, 5000, 8);
  const at::Tensor labels = to_torch(lab);
  for (auto dt : {at::kFloat, at::kDouble}) {
    INFO(dtype_name(dtype_of(dt)));
    const at::Tensor x = to_torch(h, dt);  // row 0 has -inf at every third entry (labels there give -inf)
    const libtorch_reference ref(x, labels);
    const tolerance tol = dt == at::kFloat ? float32_tol : float64_tol;
    require_close(logsumexp(x), ref.lse, tol);
    require_close(token_logprobs(x, labels), ref.logprob, tol);
    require_close(entropy(x), ref.entropy, tol);
    // The Eigen double reference agrees too (the same float-rounded inputs).
    const auto want = ops::to_host(generic::entropy_last(to_eigen<double>(to_host_tensor(x))));
    const auto got = ops::to_host(entropy(x));
    for (std::size_t i = 0; i < want.size(); ++i) REQUIRE(tol.accepts(got[i], want[i]));
  }
}

TEST_CASE("torch kernels: autograd gradients equal LibTorch autograd through log_softmax (float32 and float64)") {
  const auto h = random_normal({6, 3001}, 17, 2.0);
  const at::Tensor labels = to_torch(random_labels({6}, 3001, 18));
  const at::Tensor w = to_torch(random_normal({6}, 19));
  for (auto dt : {at::kFloat, at::kDouble}) {
    INFO(dtype_name(dtype_of(dt)));
    const tolerance tol = dt == at::kFloat ? float32_tol : float64_tol;
    at::Tensor x = to_torch(h, dt).requires_grad_();
    const auto objective = [&](const at::Tensor& lse, const at::Tensor& lp, const at::Tensor& ent) {
      return (w.to(dt) * (0.3 * lse + lp - 0.7 * ent)).sum();
    };
    objective(logsumexp(x), token_logprobs(x, labels), entropy(x)).backward();
    const at::Tensor got = x.grad().clone();

    at::Tensor xr = to_torch(h, at::kDouble).requires_grad_();
    const libtorch_reference ref(xr, labels);
    objective(ref.lse, ref.logprob, ref.entropy).backward();
    require_close(got, xr.grad(), tol);
  }
}

TEST_CASE(
    "torch kernels: a strided view takes LibTorch's path and agrees, create_graph keeps the backward differentiable") {
  const auto h = random_normal({4, 600}, 23, 2.0);
  const at::Tensor x = to_torch(h, at::kDouble);
  const at::Tensor view = x.t().contiguous().t();  // same values, column-major strides
  REQUIRE_FALSE(view.is_contiguous());
  require_close(entropy(view), entropy(x), float64_tol);
  require_close(logsumexp(view), logsumexp(x), float64_tol);

  // Second derivative of logsumexp along a direction u: u^T (diag p - p p^T) u, from autograd.
  at::Tensor xg = x.clone().requires_grad_();
  const at::Tensor u = to_torch(random_normal({4, 600}, 24), at::kDouble);
  const at::Tensor g = torch::autograd::grad({logsumexp(xg).sum()}, {xg}, {}, true, true)[0];
  const at::Tensor hvp = torch::autograd::grad({(g * u).sum()}, {xg})[0];
  const at::Tensor p = at::softmax(x, -1);
  const at::Tensor pu = (p * u).sum(-1, true);
  require_close(hvp, p * u - p * pu, float64_tol);
}
