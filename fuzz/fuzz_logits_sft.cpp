// fuzz/fuzz_logits_sft.cpp — the logits primitives and SFT on the Eigen backend, float and double:
// logsumexp, softmax_last, entropy, token_logprobs, token_logprobs_and_entropy (each with its
// backward), sft_loss / sft_loss_backward with every option, sequence_logps on [B, T, V].
// Invariants (fuzz_support.hpp): only posttrain::error; the fused one-pass kernels equal the
// generic compositions (posttrain::generic::); a finite value has a finite gradient (per row for
// the primitives); the analytic backward matches finite differences in double on moderate inputs.
#include <cstdint>
#include <string>

#include "fuzz_support.hpp"
#include "posttrain/losses/sequence_logps.hpp"
#include "posttrain/losses/sft.hpp"
#include "posttrain/numerics/logits.hpp"

using namespace posttrain;
using namespace posttrain::fuzz;

namespace {

/// Fused vs generic tolerance: float64_tol / float32_tol of tests/support/tolerances.hpp, with the
/// absolute part scaled by the logits' magnitude (the results are backward-stable in the inputs).
template <class S>
double rel_tol() {
  return std::is_same_v<S, double> ? 1e-10 : 1e-5;
}

/// For each row r with a finite value[r] and a finite weight[r], grad[r, :] must be finite. Rows
/// holding +inf or NaN logits are skipped: the fused kernel gives such a row the conventional
/// entropy 0 (a point mass) with no meaningful gradient. -inf (vocabulary padding) stays covered.
template <class S>
void require_rows_finite(const std::string& what, const tensor_t<S>& value, const tensor_t<S>& weight,
                         const tensor_t<S>& grad, const tensor_t<S>& x) {
  const std::int64_t rows = value.numel(), v = rows ? grad.numel() / rows : 0;
  for (std::int64_t r = 0; r < rows; ++r) {
    if (!std::isfinite(value.data()[r]) || !std::isfinite(weight.data()[r])) continue;
    bool garbage = false;
    for (std::int64_t k = 0; k < v; ++k) {
      const double e = static_cast<double>(x.data()[r * v + k]);
      garbage = garbage || std::isnan(e) || e == pos_inf;
    }
    if (garbage) continue;
    for (std::int64_t k = 0; k < v; ++k)
      if (!std::isfinite(grad.data()[r * v + k]))
        finding(what + ": row " + std::to_string(r) + " has a finite value " + std::to_string(value.data()[r]) +
                " but a non-finite gradient; logits " + describe(x) + "\n  gradient " + describe(grad));
  }
}

template <class S>
void run(decoder& d) {
  using T = tensor_t<S>;
  d.set_wide(d.flag());
  const shape_t s = d.shape(1, 3, 5);
  const double scale = d.scale();
  T x = d.values<S>(s, scale);
  // vocabulary padding: the last column -inf in every row
  if (d.byte() < 48 && s.back() > 1)
    for (std::int64_t i = s.back() - 1; i < x.numel(); i += s.back()) x.data()[i] = to_scalar<S>(-pos_inf);
  shape_t rows = s;
  rows.pop_back();
  const std::int64_t vocab = s.back();
  const std::int64_t ignore = d.pick<std::int64_t>({-100, -100, -1, 0});
  const index_t y = d.labels(rows, vocab, ignore);
  const T g = d.values<S>(rows, 2.0);
  const bool moderate = std::is_same_v<S, double> && !d.wide() && all_finite(x) && max_abs(x) <= 30;
  const double rtol = rel_tol<S>(), atol = rtol * (1 + std::min(max_abs(x), 1e4));
  const std::string inputs = "logits " + describe(x) + ", labels " + describe(y);
  // Issue 13 defect 2 (float32 at ±3e38, being fixed): x - max overflows to -inf in the generic
  // float32 compositions (entropy 0·(-inf) = NaN) where the fused kernel clamps the difference.
  bool float_overflow = known_defect(std::is_same_v<S, float> && max_abs(x) > 1.7e38);
  // A row holding +inf or NaN has no finite logsumexp: the fused kernel gives +inf (logsumexp) and
  // 0 (entropy, a point mass), the generic composition NaN (inf - inf). Either is accepted there.
  for (std::int64_t i = 0; i < x.numel(); ++i)
    if (std::isnan(x.data()[i]) || x.data()[i] == pos_inf) float_overflow = true;
  const double cmp_rtol = float_overflow ? pos_inf : rtol;

  // ---- primitives: fused (public) vs generic, finite values with finite gradients ------------
  T lse;
  if (call("logsumexp", [&] { lse = logsumexp(x); })) {
    require_close("logsumexp: fused vs generic\n  " + inputs, lse, generic::logsumexp_last(x), cmp_rtol, atol,
                  float_overflow);
    T gl;
    if (call("logsumexp_backward", [&] { gl = logsumexp_backward(x, g); }))
      require_rows_finite("logsumexp_backward", lse, g, gl, x);
    call("softmax_last", [&] { (void)softmax_last(x); });
  }
  T h;
  if (call("entropy", [&] { h = entropy(x); })) {
    require_close("entropy: fused vs generic\n  " + inputs, h, generic::entropy_last(x), cmp_rtol, atol,
                  float_overflow);
    T gh;
    if (call("entropy_backward", [&] { gh = entropy_backward(x, g); })) {
      require_rows_finite("entropy_backward", h, g, gh, x);
      if constexpr (std::is_same_v<S, double>) {
        if (moderate)
          check_finite_differences(
              "entropy_backward", [&](const T& p) { return (entropy(p).values() * g.values()).sum(); }, x, gh, d);
      }
    }
  }
  T lp;
  if (call("token_logprobs", [&] { lp = token_logprobs(x, y, ignore); })) {
    const auto want = generic::logits_stats(x, &y, {.logprob = true, .entropy = true, .ignore_index = ignore});
    require_close("token_logprobs: fused vs generic\n  " + inputs, lp, want.logprob, cmp_rtol, atol, float_overflow);
    const auto both = token_logprobs_and_entropy(x, y, ignore);
    require_close("token_logprobs_and_entropy logprobs vs token_logprobs", both.logprobs, lp, 0.0, 0.0);
    require_close("token_logprobs_and_entropy entropy: fused vs generic\n  " + inputs, both.entropy, want.entropy,
                  cmp_rtol, atol, float_overflow);
    T gt;
    if (call("token_logprobs_backward", [&] { gt = token_logprobs_backward(x, y, g, ignore); })) {
      require_rows_finite("token_logprobs_backward", lp, g, gt, x);
      if constexpr (std::is_same_v<S, double>) {
        if (moderate)
          check_finite_differences(
              "token_logprobs_backward",
              [&](const T& p) { return (token_logprobs(p, y, ignore).values() * g.values()).sum(); }, x, gt, d);
      }
    }
  } else {
    // rejected labels are rejected by every entry that takes them
    if (call("token_logprobs_and_entropy", [&] { (void)token_logprobs_and_entropy(x, y, ignore); }))
      finding("token_logprobs rejected labels " + describe(y) + " that token_logprobs_and_entropy accepted");
  }

  // ---- sft_loss and its backward --------------------------------------------------------------
  sft_options o;
  o.ignore_index = ignore;
  o.label_smoothing = d.pick({0.0, 0.0, 0.1, 0.5, 0.99, 1.0, -0.1, qnan});
  o.z_loss = d.pick({0.0, 0.0, 1e-4, 0.5, -1.0, pos_inf});
  o.reduction = d.pick({aggregation::token_mean, aggregation::sum, aggregation::seq_mean_token_sum,
                        aggregation::seq_mean_token_mean, aggregation::seq_mean_token_sum_norm});
  o.normalizer = d.normalizer();
  o.dft = d.byte() < 40;
  const double grad_loss = d.pick({1.0, 1.0, 0.5, -2.0, 0.0, qnan});
  const std::string sft_inputs = inputs + " label_smoothing " + std::to_string(o.label_smoothing) + " z_loss " +
                                 std::to_string(o.z_loss) + " reduction " + aggregation_name(o.reduction) +
                                 " normalizer " + std::to_string(o.normalizer.value_or(-1)) + " dft " +
                                 std::to_string(o.dft) + " grad_loss " + std::to_string(grad_loss);
  sft_result<T> r;
  if (call("sft_loss", [&] { r = sft_loss(x, y, o); })) {
    T gb;
    const bool backward_ok = call("sft_loss_backward", [&] { gb = sft_loss_backward(x, y, o, grad_loss); });
    if (backward_ok != std::isfinite(grad_loss))
      finding("sft_loss_backward: accepted/rejected inconsistently with sft_loss (grad_loss " +
              std::to_string(grad_loss) + ")");
    if (backward_ok) {
      const T gg = generic::sft_loss_backward(x, y, o, grad_loss);
      // Compared where the loss is finite: with z-loss and lse ~ 1e308 (lse² overflows, loss +inf) the
      // kernel's exp(max(x - m, -1000)) is Eigen's 5.6e-309, not 0, and 2z·lse·p is O(1) (reported).
      const bool z_overflow = known_defect(o.z_loss > 0 && !std::isfinite(item(r.loss)));
      if (!z_overflow)
        require_close("sft_loss_backward: fused vs generic\n  " + sft_inputs, gb, gg, cmp_rtol,
                      atol * (1 + std::abs(grad_loss)) * (o.normalizer ? 1.0 / *o.normalizer : 1.0) * 4,
                      float_overflow);
      require_finite_gradient("sft_loss_backward", r.loss, gb, sft_inputs);
      if (std::isfinite(item(r.loss)) && (!std::isfinite(item(r.entropy)) || !std::isfinite(item(r.token_accuracy))))
        finding("sft_loss: finite loss with a non-finite metric (entropy " + std::to_string(item(r.entropy)) +
                ", accuracy " + std::to_string(item(r.token_accuracy)) + ")\n  " + inputs);
      if constexpr (std::is_same_v<S, double>) {
        if (moderate && !o.dft)  // dft's weight sg(p) is a stop-gradient: its backward is not d(value)
          check_finite_differences(
              "sft_loss_backward", [&](const T& p) { return grad_loss * item(sft_loss(p, y, o).loss); }, x, gb, d);
      }
    }
  }

  // ---- sequence_logps on [B, T, V] ---------------------------------------------------------------
  if (s.size() == 3) {
    const sequence_logps_options so{.ignore_index = ignore,
                                    .reduction = d.flag() ? sequence_reduction::sum : sequence_reduction::mean};
    sequence_logps_result<T> sr;
    if (call("sequence_logps", [&] { sr = sequence_logps(x, y, so); })) {
      const T gs = d.values<S>({s[0]}, 2.0);
      T gx;
      if (call("sequence_logps_backward", [&] { gx = sequence_logps_backward(x, y, gs, so); })) {
        // rows of logits [B·T, V] against their sequence's value and upstream gradient
        T row_value({s[0] * s[1]}), row_weight({s[0] * s[1]});
        for (std::int64_t b = 0; b < s[0]; ++b)
          for (std::int64_t t = 0; t < s[1]; ++t) {
            row_value.data()[b * s[1] + t] = sr.logps.data()[b];
            row_weight.data()[b * s[1] + t] = gs.data()[b];
          }
        require_rows_finite("sequence_logps_backward", row_value, row_weight, gx, x);
        if constexpr (std::is_same_v<S, double>) {
          if (moderate)
            check_finite_differences(
                "sequence_logps_backward",
                [&](const T& p) { return (sequence_logps(p, y, so).logps.values() * gs.values()).sum(); }, x, gx, d);
        }
      }
    }
  }
}

}  // namespace

POSTTRAIN_FUZZ_ENTRY_POINT(run)
