// posttrain/numerics/stable.hpp — overflow-free scalar functions, element-wise on any tensor.
//
// Never write log(sigmoid(x)) or log(1 + exp(x)): for |x| of a few hundred they overflow or
// round to log(0). These forms are exact to rounding for every finite x.
#pragma once

#include <cmath>

#include "posttrain/tensor.hpp"

namespace posttrain {

/// softplus(x) = log(1 + e^x), computed as max(x, 0) + log1p(e^{-|x|}).
template <tensor T>
T softplus(const T& x) {
  return ops::add(ops::maximum(x, 0.0), ops::log1p(ops::exp(ops::neg(ops::abs(x)))));
}

/// log sigmoid(x) = -softplus(-x) = min(x, 0) - log1p(e^{-|x|}).
template <tensor T>
T log_sigmoid(const T& x) {
  return ops::sub(ops::minimum(x, 0.0), ops::log1p(ops::exp(ops::neg(ops::abs(x)))));
}

/// sigmoid(x) = exp(log sigmoid(x)): never exp(+large), so no overflow for any x.
template <tensor T>
T sigmoid(const T& x) {
  return ops::exp(log_sigmoid(x));
}

/// log(1 - e^x) for x <= 0 (Mächler 2012, "Accurately computing log(1 - exp(-|a|))"):
/// log(-expm1(x)) for x > -ln 2, log1p(-e^x) otherwise; both branches are evaluated on inputs
/// clamped to their own side so neither produces NaN/Inf that could leak into a gradient.
template <tensor T>
T log1mexp(const T& x) {
  const double ln2 = std::log(2.0);
  const T near_zero = ops::gt(x, -ln2);
  // Each branch sees an input from its own domain, so an unselected branch stays finite.
  const T a = ops::clamp(x, -ln2, 0.0);
  const T b = ops::minimum(x, -ln2);
  return ops::where(near_zero, ops::log(ops::neg(ops::expm1(a))), ops::log1p(ops::neg(ops::exp(b))));
}

}  // namespace posttrain
