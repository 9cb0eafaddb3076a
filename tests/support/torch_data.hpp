// tests/support/torch_data.hpp — the torch side of the cross-backend tests.
//
// Every input starts as host data in double (support/data.hpp). A backend "maker" turns it into
// that backend's tensors; `run_and_compare` runs one test body on a backend and on the Eigen double
// reference fed the SAME values (the host data rounded through the backend's input dtype first), so
// the comparison measures the computation, not the rounding of the inputs.
#pragma once

#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/backends/torch.hpp"
#include "posttrain/check/compare.hpp"
#include "support/data.hpp"
#include "support/tolerances.hpp"

namespace posttrain::test {

inline at::Tensor to_torch(const host_tensor& h, at::ScalarType dt = at::kDouble) {
  return torch::tensor(h.values, torch::kDouble).reshape(h.shape).to(dt);
}
inline at::Tensor to_torch(const host_labels& h, at::ScalarType dt = at::kLong) {
  return torch::tensor(h.values, torch::kLong).reshape(h.shape).to(dt);
}
inline host_tensor to_host_tensor(const at::Tensor& t) { return {t.sizes().vec(), ops::to_host(t)}; }

/// The host data as a tensor of dtype `dt` would hold it (round to nearest through `dt`).
inline host_tensor round_through(const host_tensor& h, at::ScalarType dt) { return to_host_tensor(to_torch(h, dt)); }

inline dtype dtype_of(at::ScalarType t) { return tensor_traits<at::Tensor>::from_scalar_type(t); }

/// Makes torch tensors whose input dtype is `input` (float32/64, bfloat16, float16).
struct torch_maker {
  at::ScalarType input = at::kFloat;
  at::Tensor values(const host_tensor& h) const { return to_torch(h, input); }
  /// A differentiable leaf (for autograd checks).
  at::Tensor leaf(const host_tensor& h) const { return to_torch(h, input).requires_grad_(); }
  at::Tensor labels(const host_labels& h) const { return to_torch(h); }
  std::string name() const { return std::string("torch ") + dtype_name(dtype_of(input)); }
};

/// Makes eigen tensors of scalar S from host data first rounded through `round_as` (so the double
/// reference sees exactly what a float32 or half backend saw).
template <class S>
struct eigen_maker {
  at::ScalarType round_as = at::kDouble;
  eigen_tensor<S> values(const host_tensor& h) const { return to_eigen<S>(round_through(h, round_as)); }
  eigen_index labels(const host_labels& h) const { return to_eigen(h); }
  std::string name() const { return std::string("eigen ") + (std::is_same_v<S, float> ? "float32" : "float64"); }
};

/// The named outputs of one test body on one backend, flattened to host doubles.
struct outputs {
  struct item {
    std::string name;
    shape_t shape;
    std::vector<double> values;
    dtype type;
    std::optional<tolerance> tol;  ///< set only where a stated exception applies (tolerances.hpp)
  };
  std::vector<item> items;
  template <tensor T>
  void add(std::string name, const T& t, std::optional<tolerance> tol = std::nullopt) {
    items.push_back({std::move(name), ops::shape(t), ops::to_host(t), ops::dtype_of(t), tol});
  }
};

/// The tolerance for a result of dtype `result`. A float32-computed result of half inputs is held
/// to float32_tol; a result returned in a half dtype (a gradient in the logits' dtype) adds that
/// dtype's rounding of the output.
inline tolerance output_tolerance(dtype result) {
  if (result == dtype::bfloat16) return bfloat16_output_tol;
  if (result == dtype::float16) return float16_output_tol;
  return tolerance_for(result);
}

/// Checks one flattened result against the reference, printing check::report::str() on failure.
inline void require_agree(const std::string& what, const std::vector<double>& got, const std::vector<double>& ref,
                          tolerance tol) {
  const auto r = check::compare_values(got, ref, tol.atol, tol.rtol);
  INFO(what << ": " << r.str() << " (atol " << tol.atol << ", rtol " << tol.rtol << ")");
  CHECK(r.ok);
}

template <tensor A>
void require_agree(const std::string& what, const A& got, const std::vector<double>& ref, tolerance tol) {
  require_agree(what, ops::to_host(got), ref, tol);
}

/// No NaN or Inf anywhere in `values`.
inline bool all_finite(const std::vector<double>& values) {
  for (double v : values)
    if (!std::isfinite(v)) return false;
  return true;
}
inline bool all_finite(const at::Tensor& t) { return all_finite(ops::to_host(t)); }

/// d f(x) / dx by LibTorch autograd, for a scalar-valued f, at a fresh leaf holding x's values.
template <class F>
at::Tensor autograd_grad(const at::Tensor& x, F f) {
  at::Tensor leaf = x.detach().clone().requires_grad_();
  f(leaf).backward();
  return leaf.grad();
}

/// Runs `body(maker)` on `maker` and on the Eigen double reference fed the same rounded inputs,
/// and compares every output (shape, then values) with the tolerance of the output's dtype.
/// With `expect_finite`, every output of both runs must also be free of NaN and Inf.
template <class Maker, class Body>
void run_and_compare(const Maker& maker, at::ScalarType input, Body&& body, bool expect_finite = false) {
  const outputs got = body(maker);
  const outputs ref = body(eigen_maker<double>{input});
  REQUIRE(got.items.size() == ref.items.size());
  for (std::size_t i = 0; i < got.items.size(); ++i) {
    const auto& g = got.items[i];
    const auto& w = ref.items[i];
    INFO(maker.name() << ": " << g.name);
    REQUIRE(detail::shape_string(g.shape) == detail::shape_string(w.shape));
    if (expect_finite) {
      CHECK(all_finite(g.values));
      CHECK(all_finite(w.values));
    }
    require_agree(maker.name() + " " + g.name, g.values, w.values, g.tol ? *g.tol : output_tolerance(g.type));
  }
}

/// The backends every cross-check runs on: torch float32 and float64, eigen float32 and, where
/// `with_half`, torch bfloat16 and float16 inputs (for primitives that compute them in float32).
template <class Body>
void on_every_backend(Body&& body, bool with_half = true) {
  run_and_compare(torch_maker{at::kFloat}, at::kFloat, body);
  run_and_compare(torch_maker{at::kDouble}, at::kDouble, body);
  run_and_compare(eigen_maker<float>{at::kFloat}, at::kFloat, body);
  if (with_half) {
    run_and_compare(torch_maker{at::kBFloat16}, at::kBFloat16, body);
    run_and_compare(torch_maker{at::kHalf}, at::kHalf, body);
  }
}

}  // namespace posttrain::test
