// tests/support/tolerances.hpp — the one place test tolerances are stated.
//
// A value `got` agrees with a reference `want` when |got - want| <= atol + rtol * |want|.
// Reasoning, not tuning: float32 has eps = 1.19e-7; a log-sum over V = 50k terms with max-shift
// loses a few eps relative, so rtol = atol = 1e-5 (~ 84 eps) for float32. float64 results are
// compared with 1e-10 (~ 450k eps, room for different summation orders over 50k terms).
// Central finite differences in double with step h = 1e-6 have truncation error O(h^2 f''') and
// rounding error O(eps / h) ~ 1e-10 relative to |f|: compared with 1e-6.
#pragma once

#include <cmath>

#include "posttrain/tensor.hpp"

namespace posttrain::test {

struct tolerance {
  double atol;
  double rtol;
  bool accepts(double got, double want) const {
    if (std::isnan(want) || std::isnan(got)) return std::isnan(want) && std::isnan(got);
    if (std::isinf(want) || std::isinf(got)) return got == want;
    return std::abs(got - want) <= atol + rtol * std::abs(want);
  }
};

inline constexpr tolerance float32_tol{1e-5, 1e-5};
inline constexpr tolerance float64_tol{1e-10, 1e-10};
/// A framework's convention re-typed in float64 (tests/reference/make_golden_conventions.py) vs posttrain's
/// option for it (issue 17's promise: 1e-12 relative). The inputs are small (<= 15 terms a sum), so only a few
/// ulps of summation order separate the two; atol covers results that are differences of O(1) numbers.
inline constexpr tolerance conventions_tol{1e-12, 1e-12};
/// Central finite differences (double, h = fd_step) vs an analytic gradient.
inline constexpr tolerance finite_difference_tol{1e-6, 1e-6};
inline constexpr double fd_step = 1e-6;
/// bfloat16/float16 inputs are rounded to 8/11 mantissa bits before posttrain sees them; results
/// are compared against the double reference run on the same rounded inputs, so the float32
/// tolerance applies to the computation itself.

/// A float32-computed result that is returned in a half dtype (e.g. a gradient in the logits'
/// dtype) also carries that dtype's rounding: unit roundoff 2^-8 (bfloat16, 8 significant bits)
/// or 2^-11 (float16, 11 bits), added to float32's rtol. float16's subnormal spacing (6e-8) is
/// inside float32's atol.
inline constexpr tolerance bfloat16_output_tol{1e-5, 1e-5 + 0x1p-8};
inline constexpr tolerance float16_output_tol{1e-5, 1e-5 + 0x1p-11};

/// LibTorch's own at::logsumexp (torch's fused token_logprobs = gather - logsumexp, and autograd
/// through it, whose backward is exp(x - lse)) rounds lse = m + log Σ e^{x-m} to float32 before
/// subtracting it: at logits of magnitude L that loses up to u·L absolute (u = 2^-24; 6e-4 at
/// L = 1e4), within the inputs' own rounding (backward-stable) but not within float32_tol of the
/// exact result. Used only for those torch float32 outputs at large L: 4·u·L covers lse's and the
/// subtraction's roundings and the z-loss gradient 2z·lse·p (z·L <= 1). posttrain's own analytic
/// paths shift by the row max first and are held to float32_tol.
constexpr tolerance float32_fused_logsumexp_tol(double logit_scale) {
  return {float32_tol.atol + 4 * 0x1p-24 * logit_scale, float32_tol.rtol};
}

inline constexpr tolerance tolerance_for(dtype d) { return d == dtype::float64 ? float64_tol : float32_tol; }

}  // namespace posttrain::test
