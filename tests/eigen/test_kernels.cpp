// posttrain::kernels (the fused CPU kernels behind both backends' fused overrides) against the
// generic compositions on the Eigen double reference: logsumexp, token log-probs and entropy in
// double (float64_tol) and float32 (float32_tol against the double run on the same float-rounded
// inputs), at V = 256000, logits of ±1e4 and -inf padding; closed forms for uniform rows; results
// independent of the thread count; the fused cross-entropy forward + backward (into a buffer and in
// place over the logits) and the general backward against posttrain's analytic backward functions.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/kernels/logits_cpu.hpp"
#include "posttrain/losses/sft.hpp"
#include "posttrain/numerics/logits.hpp"
#include "support/data.hpp"
#include "support/tolerances.hpp"

namespace test_kernels {  // one namespace per test file: the unity build compiles several in one TU

using namespace posttrain;

namespace {
constexpr double inf = std::numeric_limits<double>::infinity();

/// Restores the process-wide kernel thread count when a test ends.
struct thread_guard {
  ~thread_guard() { kernels::set_num_threads(0); }
};

template <class S>
void require_close(const eigen_tensor<S>& got, const eigen_tensor<double>& want, test::tolerance tol) {
  REQUIRE(got.shape() == want.shape());
  for (std::int64_t i = 0; i < want.numel(); ++i) {
    INFO("element " << i << ": got " << got.values()(i) << ", want " << want.values()(i));
    REQUIRE(tol.accepts(static_cast<double>(got.values()(i)), want.values()(i)));
  }
}

/// Random logits N(0, scale) with rows of ±1e4 (+ noise) and every 5th entry of row 2 at -inf.
test::host_tensor hard_logits(std::int64_t rows, std::int64_t vocab, std::uint64_t seed, double scale = 3.0) {
  auto h = test::random_normal({rows, vocab}, seed, scale);
  for (std::int64_t v = 0; v < vocab; ++v) {
    if (rows > 0) h.values[static_cast<std::size_t>(v)] += (v % 2 == 0 ? 1e4 : -1e4);
    if (rows > 1) h.values[static_cast<std::size_t>(vocab + v)] += 1e4;
    if (rows > 2 && v % 5 == 0) h.values[static_cast<std::size_t>(2 * vocab + v)] = -inf;
  }
  return h;
}

/// The same values rounded to float, as a host tensor in double.
test::host_tensor rounded_to_float(test::host_tensor h) {
  for (auto& v : h.values) v = static_cast<double>(static_cast<float>(v));
  return h;
}

/// Labels in [0, V) that avoid -inf logits (their log-prob is -inf on both paths).
test::host_labels finite_labels(const test::host_tensor& x, std::uint64_t seed) {
  const std::int64_t vocab = x.shape.back();
  auto l = test::random_labels({x.shape.front()}, vocab, seed);
  for (std::size_t r = 0; r < l.values.size(); ++r)
    while (std::isinf(x.values[r * static_cast<std::size_t>(vocab) + static_cast<std::size_t>(l.values[r])]))
      l.values[r] = (l.values[r] + 1) % vocab;
  return l;
}

template <class S>
using tr = tensor_traits<eigen_tensor<S>>;

/// The Eigen backend's one-pass hook (fused.hpp's logits_stats), one output at a time.
template <class S>
struct fk {
  using E = eigen_tensor<S>;
  static E stats(const E& x, const eigen_index* labels, const logits_stats_request& q) {
    const logits_row_stats<E> r = *fused_ops<E>::logits_stats(x, labels, q);
    return q.logsumexp ? r.logsumexp : q.entropy ? r.entropy : q.logprob ? r.logprob : r.argmax_hit;
  }
  static E fused_logsumexp_last(const E& x) { return stats(x, nullptr, {.logsumexp = true}); }
  static E fused_entropy_last(const E& x) { return stats(x, nullptr, {.entropy = true}); }
  static E fused_token_logprobs(const E& x, const eigen_index& labels) {
    return stats(x, &labels, {.logprob = true, .ignore_index = std::numeric_limits<std::int64_t>::min()});
  }
  static E argmax_hit(const E& x, const eigen_index& labels, std::int64_t ignore_index) {
    return stats(x, &labels, {.argmax_hit = true, .ignore_index = ignore_index});
  }
};
}  // namespace

TEST_CASE("kernels: fused logsumexp, token log-probs and entropy equal the generic compositions in double") {
  // Vocabulary sizes around the block size (2048) so the running max rises in later blocks.
  for (std::int64_t vocab : {1, 7, 2047, 2048, 2049, 5000}) {
    INFO("V = " << vocab);
    auto h = test::random_normal({4, 3, vocab}, 11 + static_cast<std::uint64_t>(vocab), 2.0);
    // The largest logit in the last block of row 0 forces a rescale of (s, t).
    h.values[static_cast<std::size_t>(vocab - 1)] = 9.0;
    const auto x = test::to_eigen<double>(h);
    const auto labels = test::to_eigen(test::random_labels({4, 3}, vocab, 5));
    require_close(fk<double>::fused_logsumexp_last(x), generic::logsumexp_last(x), test::float64_tol);
    require_close(fk<double>::fused_token_logprobs(x, labels), generic::token_logprobs(x, labels), test::float64_tol);
    require_close(fk<double>::fused_entropy_last(x), generic::entropy_last(x), test::float64_tol);
  }
}

TEST_CASE("kernels: the one-pass argmax hit is the first maximum, as the generic argmax (ties, -inf, ignore)") {
  for (std::int64_t vocab : {1, 5, 2049}) {
    INFO("V = " << vocab);
    // Small integers: many ties between the label and earlier or later entries.
    auto h = test::random_normal({6, vocab}, 31 + static_cast<std::uint64_t>(vocab), 1.0);
    for (auto& v : h.values) v = std::round(v);
    const auto x = test::to_eigen<double>(h);
    std::vector<std::int64_t> lab(6);
    for (std::int64_t r = 0; r < 6; ++r) {  // label at the row's first max, last max, or elsewhere
      std::int64_t first = 0, last = 0;
      for (std::int64_t v = 0; v < vocab; ++v) {
        if (x(r, v) > x(r, first)) first = v;
        if (x(r, v) >= x(r, last)) last = v;
      }
      lab[static_cast<std::size_t>(r)] = r % 3 == 0 ? first : r % 3 == 1 ? last : (first + 1) % vocab;
    }
    lab[5] = -100;  // ignored: hit 0
    const eigen_index labels({6}, lab);
    const auto hit = fk<double>::argmax_hit(x, labels, -100);
    const auto ref = generic::logits_stats(x, &labels, {.argmax_hit = true, .ignore_index = -100}).argmax_hit;
    require_close(hit, ref, test::float64_tol);
    CHECK(hit(0) == 1.0);  // the first maximum is a hit by construction
    CHECK(hit(5) == 0.0);
  }
  // A row of only -inf: torch.argmax gives 0, so label 0 is a hit and label 1 is not.
  const eigen_tensor<double> ninf({2, 3}, -std::numeric_limits<double>::infinity());
  const auto hit = fk<double>::argmax_hit(ninf, eigen_index({2}, {0, 1}), -100);
  CHECK(hit(0) == 1.0);
  CHECK(hit(1) == 0.0);
}

TEST_CASE("kernels: float32 at V = 256000 with logits of +-1e4 and -inf padding is within float32_tol of double") {
  const std::int64_t vocab = 256000;
  const auto h = rounded_to_float(hard_logits(4, vocab, 3));
  const auto xf = test::to_eigen<float>(h);
  const auto xd = test::to_eigen<double>(h);
  const auto labels = test::to_eigen(finite_labels(h, 9));
  require_close(fk<float>::fused_logsumexp_last(xf), generic::logsumexp_last(xd), test::float32_tol);
  require_close(fk<float>::fused_token_logprobs(xf, labels), generic::token_logprobs(xd, labels), test::float32_tol);
  require_close(fk<float>::fused_entropy_last(xf), generic::entropy_last(xd), test::float32_tol);
  // The public dispatchers take the fused path: same values.
  require_close(token_logprobs(xf, labels), generic::token_logprobs(xd, labels), test::float32_tol);
  require_close(entropy(xf), generic::entropy_last(xd), test::float32_tol);
}

TEST_CASE("kernels: uniform float32 rows at V = 256000 give the closed forms log V and -log V") {
  // logsumexp(c·1_V) = c + log V, entropy = log V, log p = -log V; c = 1e4 tests the shift.
  const std::int64_t vocab = 256000;
  const double log_v = std::log(static_cast<double>(vocab));
  for (double c : {0.0, 1e4, -1e4}) {
    INFO("c = " << c);
    const eigen_tensor<float> x({1, vocab}, static_cast<float>(c));
    const eigen_index labels({1}, {vocab - 1});
    CHECK(test::float32_tol.accepts(fk<float>::fused_logsumexp_last(x).values()(0), c + log_v));
    CHECK(test::float32_tol.accepts(fk<float>::fused_entropy_last(x).values()(0), log_v));
    CHECK(test::float32_tol.accepts(fk<float>::fused_token_logprobs(x, labels).values()(0), -log_v));
  }
}

TEST_CASE("kernels: rows of only -inf give logsumexp -inf and entropy 0, -inf padding gives no NaN") {
  for (std::int64_t vocab : {3, 3000}) {
    eigen_tensor<float> x({2, vocab}, -std::numeric_limits<float>::infinity());
    x(1, 0) = 0.0f;
    x(1, 1) = 0.0f;  // two finite entries among -inf: log 2 and entropy log 2
    const auto lse = fk<float>::fused_logsumexp_last(x);
    const auto h = fk<float>::fused_entropy_last(x);
    CHECK(lse(0) == -std::numeric_limits<float>::infinity());
    CHECK(h(0) == 0.0f);
    CHECK(test::float32_tol.accepts(lse(1), std::log(2.0)));
    CHECK(test::float32_tol.accepts(h(1), std::log(2.0)));
    const auto lp = fk<float>::fused_token_logprobs(x, eigen_index({2}, {0, 1}));
    CHECK(test::float32_tol.accepts(lp(1), -std::log(2.0)));
  }
}

TEST_CASE("kernels: results do not depend on the thread count (1 and 3 threads, bitwise)") {
  thread_guard guard;
  const std::int64_t rows = 6, vocab = 70000;  // every row is above the per-thread minimum
  const auto h = hard_logits(rows, vocab, 21);
  const auto x = test::to_eigen<float>(h);
  const auto labels = test::to_eigen(finite_labels(h, 4));
  std::vector<std::vector<float>> runs;
  for (int threads : {1, 3}) {
    kernels::set_num_threads(threads);
    REQUIRE(kernels::num_threads() == threads);
    std::vector<float> lse(rows), lp(rows), ent(rows), grad(static_cast<std::size_t>(rows * vocab));
    kernels::logits_forward<float>(x.data(), rows, vocab, labels.data(), -100, lse.data(), lp.data(), ent.data());
    kernels::cross_entropy_forward_backward<float>(x.data(), rows, vocab, labels.data(), {}, nullptr, grad.data(), 1.0);
    std::vector<float> all = lse;
    all.insert(all.end(), lp.begin(), lp.end());
    all.insert(all.end(), ent.begin(), ent.end());
    all.insert(all.end(), grad.begin(), grad.end());
    runs.push_back(all);
  }
  REQUIRE(runs[0] == runs[1]);
  kernels::set_num_threads(0);
  CHECK(kernels::num_threads() >= 1);
}

namespace {
/// A runner of the caller's: runs the ranges serially in reverse order, counting calls and ranges.
struct reverse_runner {
  static inline std::int64_t calls = 0, ranges = 0;
  static int threads() { return 4; }
  static void run(std::int64_t n, void* ctx, void (*task)(void*, std::int64_t)) {
    ++calls;
    ranges += n;
    for (std::int64_t i = n - 1; i >= 0; --i) task(ctx, i);
  }
};
}  // namespace

TEST_CASE("kernels: a caller's parallel_runner is used, the cut covers every row once, results are unchanged") {
  thread_guard guard;
  // Without a backend's runner (an Eigen-only program) the built-in one runs: the hardware's cores.
  REQUIRE(&kernels::current_parallel_runner() == &kernels::builtin_parallel_runner());
  CHECK(kernels::num_threads() >= 1);

  // parallel_row_ranges: the thread count, capped by the rows and by min_elements_per_thread.
  kernels::set_num_threads(4);
  CHECK(kernels::parallel_row_ranges(0, 10) == 0);
  CHECK(kernels::parallel_row_ranges(3, 1 << 20) == 3);
  CHECK(kernels::parallel_row_ranges(10, 1) == 1);
  CHECK(kernels::parallel_row_ranges(8, kernels::min_elements_per_thread / 4) == 2);  // 2 ranges of work
  CHECK(kernels::parallel_row_ranges(100, 1 << 20) == 4);
  for (const std::int64_t rows : {1, 7, 10, 13}) {
    std::vector<int> seen(static_cast<std::size_t>(rows), 0);
    kernels::parallel_rows(rows, 1 << 20, [&](std::int64_t b, std::int64_t e) {
      REQUIRE(b < e);
      for (std::int64_t r = b; r < e; ++r) ++seen[static_cast<std::size_t>(r)];
    });
    CHECK(std::all_of(seen.begin(), seen.end(), [](int c) { return c == 1; }));
  }

  // The same kernel on the built-in runner and on a serial runner that runs the ranges backwards.
  const std::int64_t rows = 6, vocab = 70000;
  const auto x = test::to_eigen<float>(hard_logits(rows, vocab, 22));
  const auto run_kernel = [&] {
    std::vector<float> lse(rows), lp(rows), ent(rows);
    const auto labels = test::to_eigen(finite_labels(hard_logits(rows, vocab, 22), 5));
    kernels::logits_forward<float>(x.data(), rows, vocab, labels.data(), -100, lse.data(), lp.data(), ent.data());
    lse.insert(lse.end(), lp.begin(), lp.end());
    lse.insert(lse.end(), ent.begin(), ent.end());
    return lse;
  };
  kernels::set_num_threads(0);
  const auto builtin = run_kernel();
  static const kernels::parallel_runner reverse{&reverse_runner::threads, &reverse_runner::run};
  kernels::set_parallel_runner(&reverse);
  REQUIRE(&kernels::current_parallel_runner() == &reverse);
  CHECK(kernels::num_threads() == 4);  // the runner's count, as set_num_threads is 0
  const auto reversed = run_kernel();
  kernels::set_parallel_runner(nullptr);
  CHECK(reverse_runner::calls >= 1);
  CHECK(reverse_runner::ranges >= 4);
  CHECK(reversed == builtin);
  CHECK(&kernels::current_parallel_runner() == &kernels::builtin_parallel_runner());

  // A runner without its functions is rejected by name (and the current one stays).
  static const kernels::parallel_runner broken{&reverse_runner::threads, nullptr};
  CHECK_THROWS_AS(kernels::set_parallel_runner(&broken), posttrain::error);
  CHECK_THROWS_WITH(kernels::set_parallel_runner(&broken),
                    Catch::Matchers::Contains("kernels::set_parallel_runner") &&
                        Catch::Matchers::Contains("null threads or run function"));
  CHECK_THROWS_AS(kernels::set_default_parallel_runner(&broken), posttrain::error);
  CHECK(&kernels::current_parallel_runner() == &kernels::builtin_parallel_runner());
}

TEST_CASE("kernels: fused cross-entropy forward and backward equal sft_loss and sft_loss_backward") {
  const std::int64_t rows = 5;
  for (std::int64_t vocab : {9, 3001}) {
    for (double eps : {0.0, 0.1}) {
      for (double z : {0.0, 1e-4}) {
        INFO("V = " << vocab << ", label_smoothing = " << eps << ", z_loss = " << z);
        auto h = test::random_normal({rows, vocab}, 31, 2.0);
        auto lab = test::random_labels({rows}, vocab, 8);
        lab.values[1] = -100;  // an ignored row: loss 0, gradient 0
        const auto x = test::to_eigen<double>(h);
        const auto labels = test::to_eigen(lab);
        const sft_options opt{.label_smoothing = eps, .z_loss = z};
        const auto want = sft_loss(x, labels, opt);
        const auto want_grad = generic::sft_loss_backward(x, labels, opt, 1.0);  // the unfused composition

        const kernels::cross_entropy_options kopt{.ignore_index = -100, .label_smoothing = eps, .z_loss = z};
        eigen_tensor<double> loss({rows}), grad({rows, vocab});
        const std::int64_t n = 4;  // valid rows: the token mean divides by them
        REQUIRE(kernels::cross_entropy_forward_backward<double>(x.data(), rows, vocab, labels.data(), kopt, loss.data(),
                                                                grad.data(), 1.0 / n) == n);
        require_close(loss, want.per_token_loss, test::float64_tol);
        require_close(grad, want_grad, test::float64_tol);

        // In place: the gradient overwrites the logits, same numbers.
        eigen_tensor<double> inplace = x;
        eigen_tensor<double> loss2({rows});
        kernels::cross_entropy_forward_backward<double>(inplace.data(), rows, vocab, labels.data(), kopt, loss2.data(),
                                                        inplace.data(), 1.0 / n);
        require_close(inplace, want_grad, test::float64_tol);
        require_close(loss2, want.per_token_loss, test::float64_tol);
      }
    }
  }
}

TEST_CASE("kernels: float32 fused cross-entropy gradient at +-1e4 logits is within float32_tol of double") {
  const std::int64_t rows = 3, vocab = 40000;
  const auto h = rounded_to_float(hard_logits(rows, vocab, 17));
  const auto labels = test::to_eigen(finite_labels(h, 2));
  const auto xd = test::to_eigen<double>(h);
  const auto want = generic::sft_loss_backward(xd, labels, {}, 1.0);
  eigen_tensor<float> xf = test::to_eigen<float>(h);
  kernels::cross_entropy_forward_backward<float>(xf.data(), rows, vocab, labels.data(), {}, nullptr, xf.data(),
                                                 1.0 / rows);
  require_close(xf, want, test::float32_tol);
}

TEST_CASE("kernels: the general backward gives token_logprobs_backward, entropy_backward and logsumexp_backward") {
  const std::int64_t rows = 4, vocab = 2500;
  auto h = test::random_normal({rows, vocab}, 41, 2.0);
  for (std::int64_t v = 0; v < vocab; v += 7) h.values[static_cast<std::size_t>(2 * vocab + v)] = -inf;
  const auto x = test::to_eigen<double>(h);
  const auto labels = test::to_eigen(finite_labels(h, 6));
  const auto g = test::to_eigen<double>(test::random_normal({rows}, 42));
  eigen_tensor<double> out({rows, vocab});

  // d log p_y / dx = onehot - p: alpha = -g, b = -g.
  kernels::logits_backward<double>(
      x.data(), rows, vocab, labels.data(),
      [&](std::int64_t r, const kernels::row_stats<double>&) {
        return kernels::backward_coefficients{-g(r), 0.0, -g(r), 0.0};
      },
      out.data());
  require_close(out, token_logprobs_backward(x, labels, g), test::float64_tol);

  // dH/dx = -p (log p + H): alpha = -g·H, beta = -g.
  kernels::logits_backward<double>(
      x.data(), rows, vocab, nullptr,
      [&](std::int64_t r, const kernels::row_stats<double>& st) {
        return kernels::backward_coefficients{-g(r) * st.entropy(), -g(r), 0.0, 0.0};
      },
      out.data());
  require_close(out, entropy_backward(x, g), test::float64_tol);

  // d lse / dx = p: alpha = g.
  kernels::logits_backward<double>(
      x.data(), rows, vocab, nullptr,
      [&](std::int64_t r, const kernels::row_stats<double>&) { return kernels::backward_coefficients{g(r)}; },
      out.data());
  require_close(out, logsumexp_backward(x, g), test::float64_tol);
}

namespace {
/// Rows that stress the kept-exponential gradient: row 0's first 4100 logits are -inf (two whole
/// blocks before any finite one), row 1 rises steadily (every block raises the running max, so
/// every block is rescaled), row 2 has its max in the first block, row 3 is -inf but for its
/// last entry.
test::host_tensor block_edge_logits(std::int64_t vocab, std::uint64_t seed) {
  auto h = test::random_normal({4, vocab}, seed, 2.0);
  for (std::int64_t v = 0; v < vocab; ++v) {
    auto at = [&](std::int64_t r) -> double& { return h.values[static_cast<std::size_t>(r * vocab + v)]; };
    if (v < 4100) at(0) = -inf;
    at(1) += 30.0 * static_cast<double>(v) / static_cast<double>(vocab);
    if (v == 5) at(2) += 40.0;
    if (v + 1 < vocab) at(3) = -inf;
  }
  return h;
}
}  // namespace

TEST_CASE("kernels: gradients from kept exponentials across -inf blocks and rising maxima equal the generic path") {
  const std::int64_t vocab = 9000;  // 5 blocks, the last one ragged
  const auto h = rounded_to_float(block_edge_logits(vocab, 61));
  auto lab = finite_labels(h, 3);
  const auto labels = test::to_eigen(lab);
  const auto xd = test::to_eigen<double>(h);
  const sft_options opt{.label_smoothing = 0.1, .z_loss = 1e-4};
  const auto want_loss = sft_loss(xd, labels, opt).per_token_loss;
  const auto want_grad = generic::sft_loss_backward(xd, labels, opt, 1.0);
  const kernels::cross_entropy_options kopt{.ignore_index = -100, .label_smoothing = 0.1, .z_loss = 1e-4};
  const auto g = test::to_eigen<double>(test::random_normal({4}, 62));
  const auto want_lp_grad = token_logprobs_backward(xd, labels, g);
  const auto run = [&](auto tag, test::tolerance tol) {
    using S = decltype(tag);
    INFO((sizeof(S) == 4 ? "float32" : "float64"));
    const eigen_tensor<S> x = test::to_eigen<S>(h);
    eigen_tensor<S> loss({4}), grad({4, vocab});
    kernels::cross_entropy_forward_backward<S>(x.data(), 4, vocab, labels.data(), kopt, loss.data(), grad.data(), 0.25);
    require_close(loss, want_loss, tol);
    require_close(grad, want_grad, tol);
    eigen_tensor<S> inplace = x;
    kernels::cross_entropy_forward_backward<S>(inplace.data(), 4, vocab, labels.data(), kopt, loss.data(),
                                               inplace.data(), 0.25);
    require_close(inplace, want_grad, tol);
    require_close(loss, want_loss, tol);
    // The general backward into a buffer (kept exponentials) with a β = 0 form.
    kernels::logits_backward<S>(
        x.data(), 4, vocab, labels.data(),
        [&](std::int64_t r, const kernels::row_stats<S>&) {
          return kernels::backward_coefficients{-g(r), 0.0, -g(r), 0.0};
        },
        grad.data());
    require_close(grad, want_lp_grad, tol);
  };
  run(double{}, test::float64_tol);
  run(float{}, test::float32_tol);
}

TEST_CASE("kernels: a NaN logit makes its row's outputs NaN (among finite, -inf and +inf logits)") {
  const float nan = std::numeric_limits<float>::quiet_NaN(), finf = std::numeric_limits<float>::infinity();
  for (std::int64_t vocab : {5, 3000, 5000}) {
    for (std::int64_t where : {std::int64_t{0}, vocab / 2, vocab - 1}) {
      INFO("V = " << vocab << ", NaN at " << where);
      eigen_tensor<float> x({3, vocab}, 0.5f);
      for (std::int64_t v = 0; v < vocab; ++v) x(1, v) = -finf;  // row 1: -inf but the NaN
      x(2, vocab / 3) = finf;                                    // row 2: +inf and the NaN
      for (std::int64_t r = 0; r < 3; ++r) x(r, where) = nan;
      const std::vector<std::int64_t> labels = {(where + 1) % vocab, (where + 1) % vocab, (where + 1) % vocab};
      std::vector<float> lse(3), lp(3), ent(3), grad(static_cast<std::size_t>(3 * vocab));
      kernels::logits_forward<float>(x.data(), 3, vocab, labels.data(), -100, lse.data(), lp.data(), ent.data());
      kernels::cross_entropy_forward_backward<float>(x.data(), 3, vocab, labels.data(), {}, nullptr, grad.data(), 1.0);
      for (std::size_t r = 0; r < 3; ++r) {
        INFO("row " << r);
        CHECK(std::isnan(lse[r]));
        CHECK(std::isnan(ent[r]));
        CHECK(std::isnan(lp[r]));
        CHECK(std::isnan(grad[r * static_cast<std::size_t>(vocab)]));
      }
    }
  }
}

namespace {
/// Rows of 16-bit logits (H: Eigen::bfloat16 or Eigen::half) and their widened float32 values: row 0 N(0, 3), row 1
/// +-1e4 with -inf at every 5th entry, row 2 rising across blocks (the running max is raised block after block), row 3
/// only -inf, row 4 with a NaN (V > 1).
template <class H>
struct narrow_rows {
  std::int64_t rows = 5, v;
  std::vector<H> h;
  std::vector<float> w;
  explicit narrow_rows(std::int64_t vocab) : v(vocab) {
    const auto r = test::random_normal({rows, v}, 1000 + static_cast<std::uint64_t>(v), 3.0);
    const float finf = std::numeric_limits<float>::infinity();
    for (std::int64_t i = 0; i < rows * v; ++i) {
      const std::int64_t row = i / v, j = i % v;
      float x = static_cast<float>(r.values[static_cast<std::size_t>(i)]);
      if (row == 1) x = j % 5 == 4 ? -finf : (j % 2 ? 1e4f : -1e4f) + x;
      if (row == 2) x += 0.01f * static_cast<float>(j);
      if (row == 3) x = -finf;
      if (row == 4 && j == v / 2 && v > 1) x = std::numeric_limits<float>::quiet_NaN();
      h.push_back(H(x));
      w.push_back(static_cast<float>(h.back()));
    }
  }
};
bool same_bits(double a, double b) { return (std::isnan(a) && std::isnan(b)) || a == b; }
}  // namespace

TEST_CASE("kernels: bfloat16 and float16 logits read natively equal the float32 kernels on their widened values") {
  const thread_guard guard;
  const auto check = [](auto tag, const test::tolerance bf16_tol) {
    using H = decltype(tag);
    INFO((std::is_same_v<H, Eigen::half> ? "float16" : "bfloat16"));
    for (const std::int64_t v :
         {std::int64_t{1}, std::int64_t{7}, std::int64_t{17}, std::int64_t{1003}, kernels::block_size * 2 + 5}) {
      const narrow_rows<H> x(v);
      for (const double inv_t : {1.0, 1.0 / 0.7}) {
        INFO("V = " << v << ", 1/T = " << inv_t);
        // The statistics: the same packets in the same order, bit for bit.
        for (std::int64_t r = 0; r < x.rows; ++r) {
          const auto a = kernels::reduce_row(x.h.data() + r * v, v, inv_t);
          const auto b = kernels::reduce_row(x.w.data() + r * v, v, inv_t);
          INFO("row " << r);
          CHECK(same_bits(a.m, b.m));
          CHECK(same_bits(a.log_s, b.log_s));
          CHECK(same_bits(a.t_over_s, b.t_over_s));
        }
        // The forward over rows, with an ignored label, on 1 and 3 threads: bitwise equal.
        std::vector<std::int64_t> labels{0, v / 2, v - 1, 0, -100};
        for (const int threads : {1, 3}) {
          kernels::set_num_threads(threads);
          std::vector<float> lse[2], lp[2], ent[2], hit[2];
          for (auto* o : {lse, lp, ent, hit})
            for (int u = 0; u < 2; ++u) o[u].assign(static_cast<std::size_t>(x.rows), -1.0f);
          kernels::logits_forward(x.h.data(), x.rows, v, labels.data(), -100, lse[0].data(), lp[0].data(),
                                  ent[0].data(), nullptr, nullptr, hit[0].data(), inv_t);
          kernels::logits_forward(x.w.data(), x.rows, v, labels.data(), -100, lse[1].data(), lp[1].data(),
                                  ent[1].data(), nullptr, nullptr, hit[1].data(), inv_t);
          for (std::int64_t r = 0; r < x.rows; ++r) {
            const auto i = static_cast<std::size_t>(r);
            INFO(threads << " threads, row " << r);
            CHECK(same_bits(lse[0][i], lse[1][i]));
            CHECK(same_bits(lp[0][i], lp[1][i]));
            CHECK(same_bits(ent[0][i], ent[1][i]));
            CHECK(same_bits(hit[0][i], hit[1][i]));
          }
        }
        // The backward written in bf16 (float16) equals the float32 gradient of the widened row rounded
        // to bf16 (float16), within one rounding (the float32 gradients agree within float32 rounding).
        for (const kernels::backward_coefficients& k : {kernels::backward_coefficients{0.3, -0.2, 0.0, 0.0, 0.5},
                                                        kernels::backward_coefficients{0.8, 0.0, 0.7, 1e-3, 0.0}}) {
          std::vector<float> want(static_cast<std::size_t>(v));
          std::vector<H> got(static_cast<std::size_t>(v));
          for (std::int64_t r = 0; r < x.rows; ++r) {
            const std::int64_t label = r == 4 ? -1 : labels[static_cast<std::size_t>(r)];
            const auto st = kernels::reduce_row(x.h.data() + r * v, v, inv_t);
            kernels::write_row_backward_16(x.h.data() + r * v, v, st, k, label, got.data());
            kernels::write_row_backward(x.w.data() + r * v, v, kernels::reduce_row(x.w.data() + r * v, v, inv_t), k,
                                        label, want.data());
            for (std::int64_t j = 0; j < v; ++j) {
              const double g = static_cast<float>(got[static_cast<std::size_t>(j)]);
              const double e = static_cast<float>(H(want[static_cast<std::size_t>(j)]));
              INFO("row " << r << ", column " << j << ": got " << g << ", want " << e);
              REQUIRE((same_bits(g, e) || bf16_tol.accepts(g, e)));
            }
          }
        }
      }
    }
  };
  check(Eigen::bfloat16{}, {1e-6, 0x1p-7});
  check(Eigen::half{}, {1e-6, 0x1p-10});
}

TEST_CASE("kernels: float32 -> bfloat16/float16 narrowing rounds to nearest even as Eigen::bfloat16/half") {
  const float finf = std::numeric_limits<float>::infinity();
  std::vector<float> f{0.0f,
                       -0.0f,
                       1.0f,
                       1.0f + 0x1p-8f,
                       1.0f + 0x1p-7f + 0x1p-8f,
                       1.0f + 0x1p-9f,
                       -3.3e38f,
                       3.4e38f,
                       1e-40f,
                       -1e-45f,
                       finf,
                       -finf,
                       std::numeric_limits<float>::quiet_NaN(),
                       -7.123f};
  const auto r = test::random_normal({61}, 7, 100.0);
  for (const double u : r.values) f.push_back(static_cast<float>(u));
  std::vector<Eigen::bfloat16> got(f.size());
  kernels::detail::narrow_block(f.data(), static_cast<std::int64_t>(f.size()), got.data());
  for (std::size_t i = 0; i < f.size(); ++i) {
    INFO("element " << i << ": " << f[i]);
    const Eigen::bfloat16 want(f[i]);
    CHECK(Eigen::numext::bit_cast<std::uint16_t>(got[i]) ==
          (std::isnan(f[i]) ? std::uint16_t{0x7FC0} : Eigen::numext::bit_cast<std::uint16_t>(want)));
    CHECK(same_bits(kernels::detail::widen(got[i]), static_cast<float>(got[i])));
  }
  // float16: vcvtps2ph (or the scalar fallback) against Eigen::half's round to nearest even.
  using P = Eigen::internal::packet_traits<float>::type;
  constexpr std::size_t L = Eigen::internal::packet_traits<float>::size;
  std::vector<std::uint16_t> h(f.size());
  std::size_t i = 0;
  for (; i + L <= f.size(); i += L) kernels::detail::store_narrow_f16(h.data() + i, Eigen::internal::ploadu<P>(&f[i]));
  for (; i < f.size(); ++i) h[i] = kernels::detail::narrow_bits_f16(f[i]);
  for (std::size_t j = 0; j < f.size(); ++j) {
    INFO("float16, element " << j << ": " << f[j]);
    const float got_h = kernels::detail::widen(Eigen::numext::bit_cast<Eigen::half>(h[j]));
    CHECK(same_bits(got_h, static_cast<float>(Eigen::half(f[j]))));
  }
}

}  // namespace test_kernels
