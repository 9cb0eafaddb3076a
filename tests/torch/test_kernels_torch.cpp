// The torch backend's fused overrides (posttrain::kernels behind an autograd node) against LibTorch's
// own composition in double (log_softmax + gather, logsumexp, softmax · log_softmax) and its
// autograd gradients, and against the Eigen double reference, on every path of torch.hpp: kernel
// (contiguous CPU float32/float64), rows (bfloat16/float16 and strided views, per-row upcast) and
// bfloat16 read natively by the kernels against the float32 kernels on the widened values;
// chunked (LibTorch ops on row chunks: the CUDA path, forced on CPU here with several chunk sizes);
// sft_loss_backward's fused override against generic::sft_loss_backward; a sampling temperature T on
// every path against LibTorch's composition on x / T (TRL's `logits /= temperature`). The CUDA test cases run
// the same checks on a GPU and are skipped (with a warning) where none is present.
#include <torch/torch.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/backends/torch.hpp"
#include "posttrain/losses/sft.hpp"
#include "posttrain/numerics/logits.hpp"
#include "support/data.hpp"
#include "support/tolerances.hpp"
#include "support/torch_data.hpp"

namespace test_kernels_torch {  // one namespace per test file: the unity build compiles several in one TU

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
    "torch kernels: a strided view takes the rows path and agrees, create_graph keeps the backward differentiable") {
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

TEST_CASE("torch kernels: token_logprobs_and_entropy is twice differentiable (create_graph records LibTorch ops)") {
  const at::Tensor x = to_torch(random_normal({3, 40}, 25), at::kDouble);
  const at::Tensor y = to_torch(random_labels({3}, 40, 26));
  const at::Tensor u = to_torch(random_normal({3, 40}, 27), at::kDouble);
  const auto hvp_of = [&](auto&& f) {
    at::Tensor xg = x.clone().requires_grad_();
    const at::Tensor g = torch::autograd::grad({f(xg)}, {xg}, {}, true, true)[0];
    return torch::autograd::grad({(g * u).sum()}, {xg})[0];
  };
  const at::Tensor got = hvp_of([&](const at::Tensor& xg) {
    const auto r = token_logprobs_and_entropy(xg, y);
    return (0.3 * r.logprobs + 0.7 * r.entropy).sum();
  });
  const at::Tensor want = hvp_of([&](const at::Tensor& xg) {
    const libtorch_reference ref(xg, y);
    return (0.3 * ref.logprob + 0.7 * ref.entropy).sum();
  });
  require_close(got, want, float64_tol);
  // The same at temperature 0.7 (the recorded backward divides by T inside the graph).
  const at::Tensor got_t = hvp_of([&](const at::Tensor& xg) {
    const auto r = token_logprobs_and_entropy(xg, y, {.temperature = 0.7});
    return (0.3 * r.logprobs + 0.7 * r.entropy).sum();
  });
  const at::Tensor want_t = hvp_of([&](const at::Tensor& xg) {
    const libtorch_reference ref(xg / 0.7, y);
    return (0.3 * ref.logprob + 0.7 * ref.entropy).sum();
  });
  require_close(got_t, want_t, float64_tol);
}

// ---- chunked and rows paths ----------------------------------------------------------------------

namespace {
using torch_backend::logits_path;

/// Sets the path and chunk rows for one scope (process-wide knobs), restoring the defaults after.
struct path_scope {
  path_scope(logits_path p, std::int64_t rows) {
    torch_backend::force_logits_path(p);
    torch_backend::set_chunk_rows(rows);
  }
  ~path_scope() {
    torch_backend::force_logits_path(logits_path::automatic);
    torch_backend::set_chunk_rows(0);
  }
  path_scope(const path_scope&) = delete;
  path_scope& operator=(const path_scope&) = delete;
};

struct path_case {
  logits_path path;
  std::int64_t chunk_rows;
  std::string name() const {
    return path == logits_path::automatic ? "automatic"
           : path == logits_path::rows    ? "rows"
                                          : "chunked, " + std::to_string(chunk_rows) + " rows per chunk";
  }
};
/// Every path with chunks of one row, an odd count, and more rows than the inputs have.
const std::vector<path_case> all_paths = {{logits_path::automatic, 0},
                                          {logits_path::rows, 0},
                                          {logits_path::chunked, 1},
                                          {logits_path::chunked, 3},
                                          {logits_path::chunked, 1000}};

/// Logits [2, 5, v] scaled by 3: row 0 has -inf at every third entry (padding), row 1 holds
/// +-1e4, row 2 a -inf everywhere except two entries; labels never point at -inf.
host_tensor hard_logits(std::int64_t v, std::uint64_t seed) {
  auto h = random_normal({2, 5, v}, seed, 3.0);
  const double inf = std::numeric_limits<double>::infinity();
  for (std::int64_t j = 1; j < v; j += 3) h.values[static_cast<std::size_t>(j)] = -inf;
  for (std::int64_t j = 0; j < v; ++j) h.values[static_cast<std::size_t>(v + j)] = j % 2 ? 1e4 : -1e4 + 3.0 * j / v;
  for (std::int64_t j = 2; j < v; ++j) h.values[static_cast<std::size_t>(2 * v + j)] = -inf;
  return h;
}
at::Tensor labels_avoiding_inf(std::int64_t v, std::uint64_t seed) {
  at::Tensor y = to_torch(random_labels({2, 5}, v, seed));
  y[0][0] = 0;  // row 0: index 0 is finite (the -inf are at 1, 4, 7, ...)
  y[0][2] = 1;  // row 2: only 0 and 1 are finite
  return y;
}

/// logsumexp, token_logprobs and entropy of x (any dtype, device, strides) against LibTorch's
/// composition in double on the same (rounded) values; results are float32 for half inputs.
void check_values(const at::Tensor& x, const at::Tensor& labels, const std::string& what) {
  INFO(what);
  const libtorch_reference ref(x.detach(), labels);
  const at::ScalarType want_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const tolerance tol = want_type == at::kDouble ? float64_tol : float32_tol;
  const at::Tensor lse = logsumexp(x), lp = token_logprobs(x, labels), ent = entropy(x);
  CHECK(lse.scalar_type() == want_type);
  CHECK(lp.scalar_type() == want_type);
  CHECK(ent.scalar_type() == want_type);
  CHECK(lse.device() == x.device());
  require_close(lse, ref.lse, tol);
  require_close(lp, ref.logprob, tol);
  require_close(ent, ref.entropy, tol);
  // The one-call form (one read), with an ignored label: log-prob 0 there, entropy still computed.
  const auto both = token_logprobs_and_entropy(x, labels);
  require_close(both.logprobs, ref.logprob, tol);
  require_close(both.entropy, ref.entropy, tol);
  at::Tensor ignored = labels.clone();
  ignored.view({-1})[3] = -100;
  const at::Tensor valid = ignored.ne(-100);
  const auto with_ignored = token_logprobs_and_entropy(x, ignored);
  require_close(with_ignored.logprobs, at::where(valid, ref.logprob, at::zeros_like(ref.logprob)), tol);
  require_close(with_ignored.entropy, ref.entropy, tol);
  // sft_loss's metrics from the same read: token accuracy is the share of counted rows whose first
  // argmax (LibTorch's, on the same values in double) is the label; entropy the counted rows' mean.
  const auto sft = sft_loss(x, ignored);
  const at::Tensor xd = x.detach().to(at::kDouble);
  const at::Tensor hits = xd.argmax(-1).eq(ignored).logical_and(valid).to(at::kDouble);
  const at::Tensor n = valid.to(at::kDouble).sum();
  require_close(sft.token_accuracy, hits.sum() / n, tol);
  require_close(sft.entropy, (ref.entropy * valid).sum() / n, tol);
  require_close(sft.loss, -(at::where(valid, ref.logprob, at::zeros_like(ref.logprob))).sum() / n, tol);
}

/// The gradients of w·lse, w·lp and w·H through posttrain (analytic backward), one backward each,
/// against LibTorch autograd in double on the same values; the gradient is in x's dtype. (One at a
/// time: autograd sums the gradients of several uses of a half leaf in the half dtype, which adds a
/// rounding per use, a property of that sum and not of the backward under test.)
void check_grads(const at::Tensor& x_in, const at::Tensor& labels, const std::string& what) {
  const at::Tensor w = to_torch(random_normal(labels.sizes().vec(), 31)).to(x_in.device());
  const at::Tensor w2 = to_torch(random_normal(labels.sizes().vec(), 32)).to(x_in.device());
  {
    // Log-probs and entropy from the one-call form: one autograd node, one backward through both.
    INFO(what << ", gradient of token_logprobs_and_entropy (w·lp + w2·H)");
    at::Tensor x = x_in.detach().requires_grad_();
    const auto both = token_logprobs_and_entropy(x, labels);
    (w * both.logprobs.to(at::kDouble) + w2 * both.entropy.to(at::kDouble)).sum().backward();
    CHECK(x.grad().scalar_type() == x_in.scalar_type());
    at::Tensor xr = x_in.detach().to(at::kDouble).requires_grad_();
    const libtorch_reference ref(xr, labels);
    (w * ref.logprob + w2 * ref.entropy).sum().backward();
    require_close(x.grad(), xr.grad(), output_tolerance(dtype_of(x_in.scalar_type())));
  }
  for (int which = 0; which < 3; ++which) {
    INFO(what << ", gradient of " << (which == 0 ? "logsumexp" : which == 1 ? "token_logprobs" : "entropy"));
    const auto objective = [&](const at::Tensor& lse, const at::Tensor& lp, const at::Tensor& ent) {
      return (w * (which == 0 ? lse : which == 1 ? lp : ent).to(at::kDouble)).sum();
    };
    at::Tensor x = x_in.detach().requires_grad_();  // the same view (strides kept)
    objective(logsumexp(x), token_logprobs(x, labels), entropy(x)).backward();
    const at::Tensor got = x.grad();
    CHECK(got.scalar_type() == x_in.scalar_type());
    at::Tensor xr = x_in.detach().to(at::kDouble).requires_grad_();
    const libtorch_reference ref(xr, labels);
    objective(ref.lse, ref.logprob, ref.entropy).backward();
    require_close(got, xr.grad(), output_tolerance(dtype_of(x_in.scalar_type())));
  }
}

/// sft_loss_backward through the fused override against generic::sft_loss_backward in double on the
/// same values, for ignore_index, label smoothing, z-loss, DFT and aggregation modes.
void check_sft_backward(const at::Tensor& x, const at::Tensor& labels_in, const std::string& what) {
  at::Tensor labels = labels_in.clone();
  labels.view({-1})[1] = -100;
  labels.view({-1})[4] = -100;
  const at::Tensor xd = x.detach().to(at::kDouble);
  struct option_case {
    const char* name;
    sft_options o;
  };
  const std::vector<option_case> cases = {
      {"plain", {}},
      {"smoothing 0.1 + z 1e-3, sum", {.label_smoothing = 0.1, .z_loss = 1e-3, .reduction = aggregation::sum}},
      {"dft", {.dft = true}},
      {"dft + smoothing + z, seq_mean_token_mean",
       {.label_smoothing = 0.2, .z_loss = 1e-4, .reduction = aggregation::seq_mean_token_mean, .dft = true}},
      {"token_mean over a normalizer 37", {.normalizer = 37.0}},
  };
  for (const auto& c : cases) {
    INFO(what << ", " << c.name);
    const at::Tensor got = sft_loss_backward(x, labels, c.o, 0.7);
    CHECK(got.scalar_type() == x.scalar_type());
    const at::Tensor want = generic::sft_loss_backward(xd, labels, c.o, 0.7);
    require_close(got, want, output_tolerance(dtype_of(x.scalar_type())));
  }
}

/// Temperature T in {0.5, 0.7, 1.3}: token_logprobs_and_entropy and entropy of x at T against LibTorch's
/// composition in double on x / T (values and autograd gradients, which carry 1/T), and
/// sft_loss_backward's fused hook at T against generic::sft_loss_backward in double.
void check_temperature(const at::Tensor& x_in, const at::Tensor& labels, const std::string& what) {
  const at::Tensor w = to_torch(random_normal(labels.sizes().vec(), 33)).to(x_in.device());
  const at::Tensor w2 = to_torch(random_normal(labels.sizes().vec(), 34)).to(x_in.device());
  const tolerance tol = x_in.scalar_type() == at::kDouble ? float64_tol : float32_tol;
  const tolerance grad_tol = output_tolerance(dtype_of(x_in.scalar_type()));
  const at::Tensor xd = x_in.detach().to(at::kDouble);
  for (const double t : {0.5, 0.7, 1.3}) {
    INFO(what << ", temperature " << t);
    at::Tensor x = x_in.detach().requires_grad_();  // the same view (strides kept)
    const auto both = token_logprobs_and_entropy(x, labels, {.temperature = t});
    at::Tensor xr = xd.clone().requires_grad_();
    const libtorch_reference ref(xr / t, labels);
    require_close(both.logprobs.detach(), ref.logprob.detach(), tol);
    require_close(both.entropy.detach(), ref.entropy.detach(), tol);
    require_close(entropy(x_in, {.temperature = t}), ref.entropy.detach(), tol);
    (w * both.logprobs.to(at::kDouble) + w2 * both.entropy.to(at::kDouble)).sum().backward();
    (w * ref.logprob + w2 * ref.entropy).sum().backward();
    CHECK(x.grad().scalar_type() == x_in.scalar_type());
    require_close(x.grad(), xr.grad(), grad_tol);
    const sft_options o{.label_smoothing = 0.1, .z_loss = 1e-3, .temperature = t};
    require_close(sft_loss_backward(x_in, labels, o, 0.7), generic::sft_loss_backward(xd, labels, o, 0.7), grad_tol);
  }
}

/// Every check on `device`: half dtypes, float32/float64, strided views, every path.
void check_all_paths(const at::Device& device) {
  const std::int64_t v = 257;
  const host_tensor h = hard_logits(v, 41);
  const at::Tensor labels = labels_avoiding_inf(v, 42).to(device);
  for (auto dt : {at::kBFloat16, at::kHalf, at::kFloat, at::kDouble}) {
    const at::Tensor x = to_torch(h, dt).to(device);
    // Views: rows inside a wider buffer (leading dims merge), a transposed batch (they do not),
    // and a column-major copy (element stride != 1).
    const at::Tensor wide = to_torch(random_normal({2, 5, v + 6}, 43), dt).to(device);
    wide.narrow(-1, 0, v).copy_(x);
    const at::Tensor row_strided = wide.narrow(-1, 0, v);
    const at::Tensor transposed = x.transpose(0, 1).contiguous().transpose(0, 1);
    const at::Tensor col_major = x.reshape({10, v}).t().contiguous().t().reshape({2, 5, v});
    REQUIRE_FALSE(row_strided.is_contiguous());
    REQUIRE_FALSE(transposed.is_contiguous());
    for (const auto& pc : all_paths) {
      const path_scope scope(pc.path, pc.chunk_rows);
      const std::string name = std::string(c10::toString(dt)) + " on " + device.str() + ", " + pc.name();
      check_values(x, labels, name + ", contiguous");
      check_values(row_strided, labels, name + ", rows inside a wider buffer");
      check_values(transposed, labels, name + ", transposed batch");
      check_values(col_major.is_contiguous() ? x : col_major, labels.reshape({2, 5}), name + ", column-major");
      check_grads(x, labels, name + ", contiguous");
      check_grads(transposed, labels, name + ", transposed batch");
      check_sft_backward(x, labels, name);
      check_sft_backward(row_strided, labels, name + ", rows inside a wider buffer");
      check_temperature(x, labels, name + ", contiguous");
      check_temperature(transposed, labels, name + ", transposed batch");
    }
  }
}
}  // namespace

TEST_CASE(
    "torch kernels: every path (rows, chunked with 1, 3, 1000 rows per chunk) on CPU, half and full dtypes, "
    "strided views, -inf padding and +-1e4 logits equal LibTorch in double") {
  check_all_paths(at::Device(at::kCPU));
}

TEST_CASE("torch kernels: the chunked and rows paths forced on contiguous float32 equal the kernel path") {
  const std::int64_t v = 1999;
  const at::Tensor x = to_torch(hard_logits(v, 51), at::kFloat);
  const at::Tensor labels = labels_avoiding_inf(v, 52);
  const at::Tensor lse = logsumexp(x), lp = token_logprobs(x, labels), ent = entropy(x);
  const at::Tensor g = sft_loss_backward(x, labels, {.label_smoothing = 0.1, .z_loss = 1e-3});
  for (const auto& pc : all_paths) {
    INFO(pc.name());
    const path_scope scope(pc.path, pc.chunk_rows);
    if (pc.path == logits_path::chunked) {
      require_close(logsumexp(x), lse, float32_tol);
      require_close(token_logprobs(x, labels), lp, float32_tol);
      require_close(entropy(x), ent, float32_tol);
      require_close(sft_loss_backward(x, labels, {.label_smoothing = 0.1, .z_loss = 1e-3}), g, float32_tol);
    } else {
      // The rows path runs the same kernel on the same row: bitwise equal.
      CHECK(at::equal(logsumexp(x), lse));
      CHECK(at::equal(token_logprobs(x, labels), lp));
      CHECK(at::equal(entropy(x), ent));
      CHECK(at::equal(sft_loss_backward(x, labels, {.label_smoothing = 0.1, .z_loss = 1e-3}), g));
    }
  }
}

TEST_CASE("torch kernels: bfloat16 rows of V = 70000 with padding and +-1e4 through the rows and chunked paths") {
  const std::int64_t v = 70000;
  const at::Tensor x = to_torch(hard_logits(v, 61), at::kBFloat16).narrow(0, 0, 1);  // [1, 5, v]
  const at::Tensor labels = labels_avoiding_inf(v, 62).narrow(0, 0, 1);
  for (const auto& pc : std::vector<path_case>{{logits_path::rows, 0}, {logits_path::chunked, 2}}) {
    const path_scope scope(pc.path, pc.chunk_rows);
    check_values(x, labels, pc.name());
    check_grads(x, labels, pc.name());
  }
}

TEST_CASE("torch kernels: sft_loss on bfloat16 logits equals sft_loss on their float64 values") {
  const std::int64_t v = 300;
  const at::Tensor x = to_torch(hard_logits(v, 71), at::kBFloat16);
  const at::Tensor labels = labels_avoiding_inf(v, 72);
  for (const sft_options& o : {sft_options{}, sft_options{.label_smoothing = 0.1, .z_loss = 1e-3, .dft = true}}) {
    const auto got = sft_loss(x, labels, o);
    const auto want = sft_loss(x.to(at::kDouble), labels, o);
    CHECK(got.loss.scalar_type() == at::kFloat);
    require_close(got.loss, want.loss, float32_tol);
    require_close(got.per_token_loss, want.per_token_loss, float32_tol);
    require_close(got.token_accuracy, want.token_accuracy, float32_tol);
    require_close(got.entropy, want.entropy, float32_tol);
  }
}

TEST_CASE(
    "torch kernels: bfloat16 and float16 read natively equal the float32 kernels on the widened values (and the old "
    "buffer)") {
  // The rows path reads unit-stride bf16/fp16 rows natively (kernels/logits_cpu.hpp): its statistics are
  // the float32 statistics of the widened values bit for bit, so every forward output equals the float32
  // kernel's on x.to(float) and the old widening path's (torch_backend::set_widen_half_rows); gradients,
  // written in the logits' dtype, are the float32 gradients within that dtype's output rounding.
  struct widen_scope {
    explicit widen_scope(bool on) { torch_backend::set_widen_half_rows(on); }
    ~widen_scope() { torch_backend::set_widen_half_rows(false); }
  };
  for (const auto dt : {at::kBFloat16, at::kHalf})
    for (const std::int64_t v :
         {std::int64_t{1}, std::int64_t{7}, std::int64_t{17}, std::int64_t{1003}, std::int64_t{4101}}) {
      const tolerance grad_tol = output_tolerance(dtype_of(dt));
      const at::Tensor xc = to_torch(hard_logits(v, 101), dt);
      const at::Tensor wide = to_torch(random_normal({2, 5, v + 3}, 102), dt);
      wide.narrow(-1, 0, v).copy_(xc);
      at::Tensor labels = v > 2 ? labels_avoiding_inf(v, 103) : at::zeros({2, 5}, at::kLong);
      labels[1][3] = -100;  // ignored
      labels[0][4] = -100;
      for (const at::Tensor& xb : {xc, wide.narrow(-1, 0, v)}) {
        const at::Tensor xf = xb.to(at::kFloat).contiguous();  // the kernel path on the widened values
        for (const double t : {1.0, 0.7}) {
          INFO(c10::toString(dt) << ", V = " << v
                                 << (xb.is_contiguous() ? ", contiguous" : ", rows inside a wider buffer")
                                 << ", T = " << t);
          const logprob_options o{.temperature = t};
          const auto nat = token_logprobs_and_entropy(xb, labels, o);
          const auto f32 = token_logprobs_and_entropy(xf, labels, o);
          CHECK(at::equal(nat.logprobs, f32.logprobs));
          CHECK(at::equal(nat.entropy, f32.entropy));
          CHECK(at::equal(logsumexp(xb), logsumexp(xf)));
          CHECK(at::equal(entropy(xb, {.temperature = t}), entropy(xf, {.temperature = t})));
          {
            const widen_scope old(true);
            const auto buffered = token_logprobs_and_entropy(xb, labels, o);
            CHECK(at::equal(nat.logprobs, buffered.logprobs));
            CHECK(at::equal(nat.entropy, buffered.entropy));
          }
          // Backward through autograd (log-prob, entropy: beta != 0, the label column with d) ...
          const at::Tensor w1 = to_torch(random_normal({2, 5}, 104)), w2 = to_torch(random_normal({2, 5}, 105));
          const auto grad_of = [&](const at::Tensor& x_in) {
            at::Tensor x = x_in.detach().requires_grad_();
            const auto both = token_logprobs_and_entropy(x, labels, o);
            (w1 * both.logprobs.to(at::kFloat) + w2 * both.entropy.to(at::kFloat)).sum().backward();
            return x.grad();
          };
          const at::Tensor g_nat = grad_of(xb);
          CHECK(g_nat.scalar_type() == dt);
          require_close(g_nat, grad_of(xf), grad_tol);
          // ... and sft_loss_backward's fused gradient (beta = 0, label smoothing, z-loss, ignored rows 0).
          const sft_options so{.label_smoothing = 0.1, .z_loss = 1e-3, .temperature = t};
          const at::Tensor ce_nat = sft_loss_backward(xb, labels, so, 0.7);
          require_close(ce_nat, sft_loss_backward(xf, labels, so, 0.7), grad_tol);
          CHECK(ce_nat[1][3].abs().max().item<float>() == 0.0f);
          const widen_scope old(true);
          require_close(g_nat, grad_of(xb), grad_tol);
          require_close(ce_nat, sft_loss_backward(xb, labels, so, 0.7), grad_tol);
        }
      }
    }
  // Independent of the thread count: 1 and 3 ranges of 64 rows, bitwise.
  for (const auto dt : {at::kBFloat16, at::kHalf}) {
    const at::Tensor x = to_torch(random_normal({64, 4096}, 106, 3.0), dt);
    const at::Tensor y = to_torch(random_labels({64}, 4096, 107));
    kernels::set_num_threads(1);
    const auto one = token_logprobs_and_entropy(x, y);
    const at::Tensor g_one = sft_loss_backward(x, y, {.temperature = 0.7});
    kernels::set_num_threads(3);
    const auto three = token_logprobs_and_entropy(x, y);
    const at::Tensor g_three = sft_loss_backward(x, y, {.temperature = 0.7});
    kernels::set_num_threads(0);
    CHECK(at::equal(one.logprobs, three.logprobs));
    CHECK(at::equal(one.entropy, three.entropy));
    CHECK(at::equal(g_one, g_three));
  }
}

TEST_CASE("torch kernels: the chunk-size knobs (rows override bytes, bytes set the rows, defaults restore)") {
  CHECK(torch_backend::chunk_bytes() == torch_backend::default_chunk_bytes);
  CHECK(torch_backend::chunk_rows(1024) == torch_backend::default_chunk_bytes / 4096);
  torch_backend::set_chunk_bytes(4 * 1000 * 10);
  CHECK(torch_backend::chunk_rows(1000) == 10);
  CHECK(torch_backend::chunk_rows(1 << 30) == 1);  // never 0
  torch_backend::set_chunk_rows(7);
  CHECK(torch_backend::chunk_rows(1000) == 7);
  torch_backend::set_chunk_rows(0);
  torch_backend::set_chunk_bytes(0);
  CHECK(torch_backend::chunk_bytes() == torch_backend::default_chunk_bytes);
}

// Catch2 v2 has no SKIP: without a CUDA device these cases WARN "SKIPPED" and return.
namespace {
/// A kernels::parallel_runner that hands every call on to the torch backend's runner and records how
/// many ranges it was given and which threads ran them.
struct recording_runner {
  static inline std::mutex m;
  static inline std::int64_t calls = 0, max_ranges = 0;
  static inline std::set<std::thread::id> threads;
  struct forwarded {
    void* ctx;
    void (*task)(void*, std::int64_t);
  };
  static void reset() {
    const std::lock_guard<std::mutex> lock(m);
    calls = max_ranges = 0;
    threads.clear();
  }
  static int count() { return torch_backend::intra_op_runner().threads(); }
  static void run(std::int64_t n, void* ctx, void (*task)(void*, std::int64_t)) {
    {
      const std::lock_guard<std::mutex> lock(m);
      ++calls;
      max_ranges = std::max(max_ranges, n);
    }
    forwarded f{ctx, task};
    torch_backend::intra_op_runner().run(n, &f, [](void* c, std::int64_t i) {
      const auto* fw = static_cast<const forwarded*>(c);
      {
        const std::lock_guard<std::mutex> lock(m);
        threads.insert(std::this_thread::get_id());
      }
      fw->task(fw->ctx, i);
    });
  }
};
}  // namespace

TEST_CASE("torch kernels: the CPU kernels run on LibTorch's intra-op pool and follow at::set_num_threads") {
  const int torch_threads_before = at::get_num_threads();
  // Including the torch backend installed its runner; this target gets OpenMP from posttrain::torch,
  // so at::parallel_for is LibTorch's real pool here.
  REQUIRE(&kernels::current_parallel_runner() == &torch_backend::intra_op_runner());
  CHECK(torch_backend::kernels_on_intra_op_pool);
  static const kernels::parallel_runner recorder{&recording_runner::count, &recording_runner::run};
  kernels::set_parallel_runner(&recorder);

  // 64 x 4096 logits: 4 ranges' worth of work (min_elements_per_thread = 65536).
  const at::Tensor x = to_torch(random_normal({64, 4096}, 91), at::kFloat);
  const at::Tensor y = to_torch(random_labels({64}, 4096, 92));

  at::set_num_threads(1);
  CHECK(kernels::num_threads() == 1);
  CHECK(kernels::parallel_row_ranges(64, 4096) == 1);
  recording_runner::reset();
  const auto one = token_logprobs_and_entropy(x, y);
  CHECK(recording_runner::calls == 0);  // one range runs inline on the caller: single-threaded

  at::set_num_threads(2);
  CHECK(kernels::num_threads() == 2);
  CHECK(kernels::parallel_row_ranges(64, 4096) == 2);
  recording_runner::reset();
  for (int call = 0; call < 3; ++call) {
    const auto two = token_logprobs_and_entropy(x, y);
    CHECK(torch::equal(two.logprobs, one.logprobs));  // bitwise: the thread count changes nothing
    CHECK(torch::equal(two.entropy, one.entropy));
  }
  CHECK(recording_runner::calls >= 3);
  CHECK(recording_runner::max_ranges == 2);
  CHECK(recording_runner::threads.size() <= 2);  // the pool's two threads, over all three calls

  // kernels::set_num_threads still overrides LibTorch's count (and 0 gives it back).
  kernels::set_num_threads(3);
  CHECK(kernels::num_threads() == 3);
  kernels::set_num_threads(0);
  CHECK(kernels::num_threads() == 2);

  kernels::set_parallel_runner(nullptr);
  at::set_num_threads(torch_threads_before);
  CHECK(&kernels::current_parallel_runner() == &torch_backend::intra_op_runner());
}

TEST_CASE("torch kernels CUDA: every path check on a CUDA device (SKIPPED without CUDA)") {
  if (!torch::cuda::is_available()) {
    WARN("SKIPPED: no CUDA device (torch::cuda::is_available() is false); the chunked path ran on CPU above");
    return;
  }
  check_all_paths(at::Device(at::kCUDA));
}

TEST_CASE("torch kernels CUDA: bfloat16 V = 151936 rows, chunked, vs double (SKIPPED without CUDA)") {
  if (!torch::cuda::is_available()) {
    WARN("SKIPPED: no CUDA device (torch::cuda::is_available() is false)");
    return;
  }
  const std::int64_t v = 151936;
  const at::Tensor x = to_torch(hard_logits(v, 81), at::kBFloat16).to(at::kCUDA);
  const at::Tensor labels = labels_avoiding_inf(v, 82).to(at::kCUDA);
  for (std::int64_t rows : {0, 3}) {
    const path_scope scope(logits_path::automatic, rows);
    check_values(x, labels, "chunk rows " + std::to_string(rows));
    check_grads(x, labels, "chunk rows " + std::to_string(rows));
    check_sft_backward(x, labels, "chunk rows " + std::to_string(rows));
  }
}

}  // namespace test_kernels_torch
