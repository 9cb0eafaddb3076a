// The fused distillation kernel (posttrain/kernels/distill_cpu.hpp, used by the Eigen backend's
// fused_kd_per_token / fused_kd_backward overrides) against the generic compositions of
// losses/distill.hpp (posttrain::generic::), which are themselves checked against hand closed forms,
// golden values and finite differences in test_distill.cpp:
//  * double: every fused divergence (forward KL, cross-entropy form, reverse KL, symmetric KL at
//    r = 0.3, 0 and 1, JSD at β = 0 and 1), temperatures 0.5/1/2 (and 0.7), τ² scaling, vocabularies
//    around the block size (the running maxima rise in later blocks), values and gradients;
//  * -inf padding on both sides, one-sided -inf (the true +inf divergence), rows of only -inf under
//    a mask, masked rows, hard-label mixing (α) with every aggregation mode, through the full losses;
//  * float32 at V = 256000 with logits of ±1e4 against the double run on the same rounded inputs;
//  * results identical for 1 and 3 threads; the in-place gradient equals the buffer one;
//  * the fused backward against central finite differences of the fused forward (double).
#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/kernels/distill_cpu.hpp"
#include "posttrain/losses/distill.hpp"
#include "support/data.hpp"
#include "support/finite_difference.hpp"
#include "support/tolerances.hpp"

namespace test_distill_kernels {  // one namespace per test file: the unity build compiles several in one TU

using namespace posttrain;

namespace {
constexpr double inf = std::numeric_limits<double>::infinity();

static_assert(has_fused_kd<eigen_tensor<double>> && has_fused_kd<eigen_tensor<float>>,
              "the Eigen backend provides the fused distillation hooks");

struct thread_guard {
  ~thread_guard() { kernels::set_num_threads(0); }
};

/// Every divergence the fused path covers (JSD only at its KL endpoints).
std::vector<std::pair<std::string, distill_options>> fused_modes() {
  return {
      {"forward_kl", {.divergence = kd_divergence::forward_kl}},
      {"forward_cross_entropy", {.divergence = kd_divergence::forward_cross_entropy}},
      {"reverse_kl", {.divergence = kd_divergence::reverse_kl}},
      {"symmetric_kl r=0.3", {.divergence = kd_divergence::symmetric_kl, .symmetric_ratio = 0.3}},
      {"symmetric_kl r=0", {.divergence = kd_divergence::symmetric_kl, .symmetric_ratio = 0.0}},
      {"symmetric_kl r=1", {.divergence = kd_divergence::symmetric_kl, .symmetric_ratio = 1.0}},
      {"jsd beta=0", {.divergence = kd_divergence::jsd, .beta = 0.0}},
      {"jsd beta=1", {.divergence = kd_divergence::jsd, .beta = 1.0}},
  };
}

/// Element-wise agreement (equal infinities and NaNs required exactly), worst element reported.
template <class S>
void require_close(const std::string& what, const eigen_tensor<S>& got, const eigen_tensor<double>& want,
                   test::tolerance tol) {
  REQUIRE(got.shape() == want.shape());
  for (std::int64_t i = 0; i < want.numel(); ++i) {
    const double g = static_cast<double>(got.values()(i)), w = want.values()(i);
    if (!tol.accepts(g, w)) {
      INFO(what << ": element " << i << ": got " << g << ", want " << w);
      REQUIRE(tol.accepts(g, w));
    }
  }
}

template <class S>
bool bitwise_equal(const eigen_tensor<S>& a, const eigen_tensor<S>& b) {
  return a.shape() == b.shape() &&
         std::memcmp(a.data(), b.data(), static_cast<std::size_t>(a.numel()) * sizeof(S)) == 0;
}

/// Student and teacher logits [rows, V]: N(0, 2) and N(0, 3) with a large logit late in row 0 of each
/// side at different columns, so both running maxima rise in a later block.
std::pair<test::host_tensor, test::host_tensor> pair_logits(std::int64_t rows, std::int64_t vocab, std::uint64_t seed) {
  auto s = test::random_normal({rows, vocab}, seed, 2.0);
  auto t = test::random_normal({rows, vocab}, seed + 1000, 3.0);
  s.values[static_cast<std::size_t>(vocab - 1)] = 11.0;
  t.values[static_cast<std::size_t>(vocab / 2)] = 13.0;
  return {s, t};
}

test::host_tensor rounded_to_float(test::host_tensor h) {
  for (auto& v : h.values) v = static_cast<double>(static_cast<float>(v));
  return h;
}
}  // namespace

TEST_CASE("distill kernels: fused divergence and gradient equal the generic composition in double",
          "[distill][kernels]") {
  for (std::int64_t vocab : {1, 7, 2047, 2049, 5000}) {
    const auto [hs, ht] = pair_logits(3, vocab, 40 + static_cast<std::uint64_t>(vocab));
    const auto s = test::to_eigen<double>(hs), t = test::to_eigen<double>(ht);
    const auto g = test::to_eigen<double>(test::random_normal({3}, 9));
    for (double tau : {0.5, 1.0, 2.0, 0.7})
      for (bool squared : {false, true})
        for (auto [name, opt] : fused_modes()) {
          opt.temperature = tau;
          opt.scale_by_temperature_squared = squared;
          INFO(name << ", V = " << vocab << ", tau = " << tau << (squared ? ", x tau^2" : ""));
          require_close("value", kd_per_token(s, t, opt), generic::kd_per_token(s, t, opt), test::float64_tol);
          require_close("gradient", kd_per_token_backward(s, t, g, opt), generic::kd_per_token_backward(s, t, g, opt),
                        test::float64_tol);
        }
  }
}

TEST_CASE("distill kernels: -inf padding and one-sided mass give the generic path's values and gradients",
          "[distill][kernels]") {
  // 5 rows, V = 4100 (blocks 0..2048, 2048..4096, 4096..4100):
  //   row 0: both sides -inf at every 7th column and in the whole last block (shared padding)
  //   row 1: the student is -inf where the teacher is not (column 3000): KL(p||q) = +inf
  //   row 2: the teacher is -inf where the student is not (column 10): KL(q||p) = +inf
  //   row 3: both one-sided cases, in the first block
  //   row 4: finite everywhere (vector path only)
  const std::int64_t vocab = 4100;
  auto [hs, ht] = pair_logits(5, vocab, 7);
  const auto at = [&](std::int64_t r, std::int64_t v) { return static_cast<std::size_t>(r * vocab + v); };
  for (std::int64_t v = 0; v < vocab; ++v)
    if (v % 7 == 0 || v >= 4096) hs.values[at(0, v)] = ht.values[at(0, v)] = -inf;
  hs.values[at(1, 3000)] = -inf;
  ht.values[at(2, 10)] = -inf;
  hs.values[at(3, 5)] = -inf;
  ht.values[at(3, 6)] = -inf;
  const auto s = test::to_eigen<double>(hs), t = test::to_eigen<double>(ht);
  const auto g = test::to_eigen<double>(test::random_normal({5}, 3));
  for (double tau : {0.5, 1.0, 2.0})
    for (auto [name, opt] : fused_modes()) {
      opt.temperature = tau;
      INFO(name << ", tau = " << tau);
      const auto want = generic::kd_per_token(s, t, opt);
      require_close("value", kd_per_token(s, t, opt), want, test::float64_tol);
      require_close("gradient", kd_per_token_backward(s, t, g, opt), generic::kd_per_token_backward(s, t, g, opt),
                    test::float64_tol);
      // The true values of the one-sided rows, independent of either implementation.
      const bool fwd = opt.divergence == kd_divergence::forward_kl ||
                       opt.divergence == kd_divergence::forward_cross_entropy ||
                       (opt.divergence == kd_divergence::jsd && opt.beta == 0.0);
      const bool rev =
          opt.divergence == kd_divergence::reverse_kl || (opt.divergence == kd_divergence::jsd && opt.beta == 1.0);
      if (fwd) CHECK(want(1) == inf);
      if (rev) CHECK(want(2) == inf);
      CHECK(std::isfinite(want(0)));
      CHECK(std::isfinite(want(4)));
    }
}

TEST_CASE("distill kernels: full losses with masks, rows of only -inf, mixing and every aggregation agree",
          "[distill][kernels]") {
  const std::int64_t b = 2, tlen = 4, vocab = 300;
  auto hs = test::random_normal({b, tlen, vocab}, 21, 2.0), ht = test::random_normal({b, tlen, vocab}, 22, 2.5);
  // Token (0, 1): every logit -inf on both sides (a padded position); it is masked below.
  for (std::int64_t v = 0; v < vocab; ++v)
    hs.values[static_cast<std::size_t>(vocab + v)] = ht.values[static_cast<std::size_t>(vocab + v)] = -inf;
  // Shared padding columns everywhere.
  for (std::size_t i = 0; i < hs.values.size(); i += 13) hs.values[i] = ht.values[i] = -inf;
  auto hl = test::random_labels({b, tlen}, vocab, 23);
  hl.values[1] = -100;  // the all -inf position
  hl.values[6] = -100;
  for (std::size_t r = 0; r < hl.values.size(); ++r)  // labels on finite student logits
    while (hl.values[r] != -100 && std::isinf(hs.values[r * vocab + static_cast<std::size_t>(hl.values[r])]))
      hl.values[r] = (hl.values[r] + 1) % vocab;
  const auto s = test::to_eigen<double>(hs), t = test::to_eigen<double>(ht);
  const auto labels = test::to_eigen(hl);
  auto hm = test::host_tensor{{b, tlen}, std::vector<double>(static_cast<std::size_t>(b * tlen), 1.0)};
  hm.values[1] = 0.0;
  hm.values[5] = 0.0;
  const auto mask = test::to_eigen<double>(hm);
  const auto all_masked = test::to_eigen<double>(test::host_tensor{{b, tlen}, std::vector<double>(b * tlen, 0.0)});

  for (aggregation red : {aggregation::token_mean, aggregation::seq_mean_token_sum, aggregation::seq_mean_token_mean,
                          aggregation::seq_mean_token_sum_norm, aggregation::sum})
    for (double alpha : {0.0, 0.3, 1.0})
      for (auto [name, opt] : fused_modes()) {
        opt.reduction = red;
        opt.alpha = alpha;
        opt.temperature = 1.5;
        if (red == aggregation::seq_mean_token_sum_norm) opt.normalizer = 3.0;
        INFO(name << ", reduction " << aggregation_name(red) << ", alpha = " << alpha);
        const auto got = distill_loss(s, t, labels, opt), want = generic::distill_loss(s, t, labels, opt);
        require_close("loss", got.loss, want.loss, test::float64_tol);
        require_close("per-token loss", got.per_token_loss, want.per_token_loss, test::float64_tol);
        require_close("kd loss", got.kd_loss, want.kd_loss, test::float64_tol);
        require_close("ce loss", got.ce_loss, want.ce_loss, test::float64_tol);
        require_close("gradient", distill_loss_backward(s, t, labels, opt, 0.7),
                      generic::distill_loss_backward(s, t, labels, opt, 0.7), test::float64_tol);
        if (alpha == 0.0) {
          require_close("masked loss", distill_loss_masked(s, t, mask, opt).loss,
                        generic::distill_loss_masked(s, t, mask, opt).loss, test::float64_tol);
          const auto gm = distill_loss_masked_backward(s, t, mask, opt);
          require_close("masked gradient", gm, generic::distill_loss_masked_backward(s, t, mask, opt),
                        test::float64_tol);
          // The masked position of only -inf logits gets an exact 0 gradient (no NaN).
          for (std::int64_t v = 0; v < vocab; ++v) REQUIRE(gm.values()(vocab + v) == 0.0);
          require_close("all-masked loss", distill_loss_masked(s, t, all_masked, opt).loss,
                        generic::distill_loss_masked(s, t, all_masked, opt).loss, test::float64_tol);
          require_close("all-masked gradient", distill_loss_masked_backward(s, t, all_masked, opt),
                        generic::distill_loss_masked_backward(s, t, all_masked, opt), test::float64_tol);
        }
      }
}

TEST_CASE("distill kernels: float32 at V = 256000 with logits of +-1e4 agrees with the double reference",
          "[distill][kernels][extreme]") {
  const std::int64_t vocab = 256000;
  auto hs = test::random_normal({3, vocab}, 31, 3.0), ht = test::random_normal({3, vocab}, 32, 3.0);
  for (std::int64_t v = 0; v < vocab; ++v) {
    const auto i = static_cast<std::size_t>(v);
    // Row 0: the same ±1e4 pattern on both sides (the divergence is set by the noise).
    hs.values[i] += (v % 2 == 0 ? 1e4 : -1e4);
    ht.values[i] += (v % 2 == 0 ? 1e4 : -1e4);
    // Row 1: the teacher shifted by +1e4 (softmax is shift-invariant: only the precision changes).
    ht.values[static_cast<std::size_t>(vocab) + i] += 1e4;
    // Row 2: shared -inf padding at every 5th column and the last 1000 columns.
    if (v % 5 == 0 || v >= vocab - 1000)
      hs.values[2 * static_cast<std::size_t>(vocab) + i] = ht.values[2 * static_cast<std::size_t>(vocab) + i] = -inf;
  }
  hs = rounded_to_float(hs);
  ht = rounded_to_float(ht);
  const auto s32 = test::to_eigen<float>(hs), t32 = test::to_eigen<float>(ht);
  const auto s64 = test::to_eigen<double>(hs), t64 = test::to_eigen<double>(ht);
  const auto g32 = test::to_eigen<float>(test::host_tensor{{3}, {1.0, -0.5, 2.0}});
  const auto g64 = test::to_eigen<double>(test::host_tensor{{3}, {1.0, -0.5, 2.0}});
  for (double tau : {1.0, 2.0})
    for (auto [name, opt] : fused_modes()) {
      opt.temperature = tau;
      INFO(name << ", tau = " << tau);
      require_close("value", kd_per_token(s32, t32, opt), generic::kd_per_token(s64, t64, opt), test::float32_tol);
      require_close("gradient", kd_per_token_backward(s32, t32, g32, opt),
                    generic::kd_per_token_backward(s64, t64, g64, opt), test::float32_tol);
    }
}

TEST_CASE("distill kernels: results do not depend on the thread count, in place equals into a buffer",
          "[distill][kernels]") {
  thread_guard guard;
  // 7 rows x 70000 logits: enough work for 3 threads to start (kernels::min_elements_per_thread).
  const std::int64_t rows = 7, vocab = 70000;
  auto [hs, ht] = pair_logits(rows, vocab, 61);
  const auto s = test::to_eigen<float>(hs), t = test::to_eigen<float>(ht);
  const auto w = test::to_eigen<float>(test::random_normal({rows}, 62));
  for (auto [name, opt] : fused_modes()) {
    opt.temperature = 0.8;
    INFO(name);
    kernels::set_num_threads(1);
    const auto v1 = kd_per_token(s, t, opt);
    const auto g1 = kd_per_token_backward(s, t, w, opt);
    kernels::set_num_threads(3);
    const auto v3 = kd_per_token(s, t, opt);
    const auto g3 = kd_per_token_backward(s, t, w, opt);
    CHECK(bitwise_equal(v1, v3));
    CHECK(bitwise_equal(g1, g3));
    // The kernel with grad == student overwrites the student logits with the same gradient.
    const auto spec = *detail::fused_kd_spec_for(opt);
    eigen_tensor<float> work = s;
    eigen_tensor<float> value({rows});
    kernels::distill_forward_backward<float>(work.data(), t.data(), rows, vocab, spec, value.data(), w.data(),
                                             work.data());
    CHECK(bitwise_equal(work, g3));
    CHECK(bitwise_equal(value, v3));
  }
}

TEST_CASE("distill kernels: the fused backward matches finite differences of the fused forward",
          "[distill][kernels][grad]") {
  const auto [hs, ht] = pair_logits(2, 6, 71);
  auto hs2 = hs, ht2 = ht;
  hs2.values[2] = ht2.values[2] = -inf;  // a shared padding column in row 0
  const auto t = test::to_eigen<double>(ht2);
  const auto x = test::to_eigen<double>(hs2);
  const auto w = test::to_eigen<double>(test::host_tensor{{2}, {0.8, -1.3}});
  for (auto [name, opt] : fused_modes()) {
    opt.temperature = 0.7;
    opt.scale_by_temperature_squared = true;
    INFO(name);
    const auto f = [&](const eigen_tensor<double>& probe) { return test::contract(w, kd_per_token(probe, t, opt)); };
    // Finite differences only where the student logit is finite (a -inf logit stays -inf).
    auto analytic = kd_per_token_backward(x, t, w, opt);
    auto numeric = test::fd_gradient(f, x);
    for (std::int64_t i = 0; i < x.numel(); ++i)
      if (std::isinf(x.values()(i))) analytic.values()(i) = numeric.values()(i) = 0.0;
    const auto r =
        check::compare(analytic, numeric, test::finite_difference_tol.atol, test::finite_difference_tol.rtol);
    INFO(r.str());
    CHECK(r.ok);
  }
}

}  // namespace test_distill_kernels
