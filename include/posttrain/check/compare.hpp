// posttrain/check/compare.hpp — comparing a result with a reference, across backends.
//
// For users verifying numerics: run the same loss on their backend and on the Eigen reference in
// double, then `compare(got, reference, {atol, rtol})` reports the largest disagreement and where.
#pragma once

#include <cmath>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "posttrain/error.hpp"
#include "posttrain/tensor.hpp"

namespace posttrain::check {

struct report {
  bool ok = true;                 ///< every element within atol + rtol * |reference|
  double max_abs_error = 0.0;     ///< largest |got - reference|
  std::int64_t worst_index = -1;  ///< flat row-major index of the largest violation (or error)
  double got_at_worst = 0.0, reference_at_worst = 0.0;
  std::int64_t mismatches = 0;  ///< elements outside tolerance (NaN/Inf must match exactly)

  std::string str() const {
    std::ostringstream out;
    out << (ok ? "agree" : "DISAGREE") << ": max |error| " << max_abs_error << ", " << mismatches << " mismatch(es)";
    if (worst_index >= 0) out << "; worst at " << worst_index << ": " << got_at_worst << " vs " << reference_at_worst;
    return out.str();
  }
};

/// Compares two flat vectors of values element-wise.
inline report compare_values(const std::vector<double>& got, const std::vector<double>& reference, double atol,
                             double rtol) {
  if (got.size() != reference.size())
    detail::fail("check::compare", "got has ", got.size(), " elements but reference has ", reference.size());
  report r;
  double worst_excess = -1.0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double g = got[i], w = reference[i];
    bool good;
    double err;
    if (std::isnan(g) || std::isnan(w) || std::isinf(g) || std::isinf(w)) {
      good = (std::isnan(g) && std::isnan(w)) || g == w;
      err = good ? 0.0 : INFINITY;
    } else {
      err = std::abs(g - w);
      good = err <= atol + rtol * std::abs(w);
    }
    if (err > r.max_abs_error || (!good && r.worst_index < 0)) r.max_abs_error = std::max(r.max_abs_error, err);
    const double excess = good ? -1.0 : err - (atol + rtol * std::abs(w));
    if (!good) {
      ++r.mismatches;
      r.ok = false;
      if (excess > worst_excess || std::isnan(excess)) {
        worst_excess = excess;
        r.worst_index = static_cast<std::int64_t>(i);
        r.got_at_worst = g;
        r.reference_at_worst = w;
      }
    }
  }
  return r;
}

/// Compares tensors from any two backends (shapes must match) with |got - ref| <= atol + rtol |ref|.
template <tensor A, tensor B>
report compare(const A& got, const B& reference, double atol, double rtol) {
  if (ops::shape(got) != ops::shape(reference))
    detail::fail("check::compare", "got has shape ", detail::shape_string(ops::shape(got)), " but reference has ",
                 detail::shape_string(ops::shape(reference)));
  return compare_values(ops::to_host(got), ops::to_host(reference), atol, rtol);
}

}  // namespace posttrain::check
