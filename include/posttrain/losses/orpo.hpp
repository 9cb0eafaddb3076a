// posttrain/losses/orpo.hpp — ORPO: odds-ratio preference optimisation (Hong et al. 2024,
// arXiv:2403.07691; TRL ORPOTrainer), reference-free, with the SFT term built in.
//
// Inputs [B]: chosen_logps, rejected_logps (SUMS over completion tokens), chosen_lengths,
// rejected_lengths. ORPO works on average log-probs ū = ℓ/|y| (a probability-like quantity ≤ 0):
//   log odds(y)  = ū - log(1 - e^{ū})                          (eq. 4)
//   z            = log odds(y_c) - log odds(y_r)
//   L_OR         = -log σ(z)                                   (eq. 7)
//   loss         = NLL - β · mean_b log σ(z),  NLL = -Σ_b ℓ_c / Σ_b |c|   (eq. 6, λ = β = 0.1 in TRL)
// log(1 - e^{ū}) is computed with log1mexp (log(-expm1) above -ln 2, log1p(-exp) below), as TRL
// does; Liger's naive log1p(-exp(ū)) loses precision as ū -> 0.
// Gradient: dz/dū = 1 / (1 - e^{ū}) = -1 / expm1(ū).
// Near ū = 0 the loss grows only like -log(-ū) (about 745 at the smallest double denormal) while
// 1/(1 - e^{ū}) ≈ -1/ū exceeds the dtype's range once |ū| is a denormal (1/4.9e-324 = 2e323). The
// backward bounds each 1 - e^{ū} denominator below by the dtype's smallest normal number t (so its
// reciprocal, at most 1/t = 4.5e307 in double and 8.5e37 in float32, is finite): a denormal ū gets the
// derivative at ū = -t, a finite stand-in of the right sign for a value the dtype cannot hold; every
// |ū| >= t gets the exact formula. The loss is not changed.
#pragma once

#include <limits>
#include <string_view>

#include "posttrain/detail/validate.hpp"
#include "posttrain/losses/cpo.hpp"
#include "posttrain/numerics/stable.hpp"
#include "posttrain/tensor.hpp"

namespace posttrain {

struct orpo_options {
  /// λ, the weight of the odds-ratio term (TRL beta 0.1).
  double beta = 0.1;
};

template <tensor T>
struct orpo_result {
  T loss;              ///< 0-d
  T nll_loss;          ///< 0-d (TRL nll_loss)
  T log_odds_ratio;    ///< 0-d mean log σ(z) (TRL log_odds_ratio)
  T log_odds_chosen;   ///< 0-d mean z (TRL log_odds_chosen)
  T rewards_chosen;    ///< 0-d mean β ū_c (TRL rewards/chosen)
  T rewards_rejected;  ///< 0-d mean β ū_r
  T reward_accuracy;   ///< 0-d fraction with ū_c > ū_r
  T reward_margin;     ///< 0-d mean β(ū_c - ū_r)
};

namespace detail {
template <tensor T>
void check_orpo(std::string_view fn, const cpo_batch<T>& b, const orpo_options& o) {
  require_finite(fn, "options.beta", o.beta);
  if (o.beta < 0) fail(fn, "options.beta must be >= 0, got ", o.beta);
  check_cpo(fn, b, cpo_options{});
  // log-probabilities are <= 0; log(1 - e^ū) is undefined above 0 (one host read of the maximum)
  for (auto [name, x] : {std::pair{"chosen_logps", &b.chosen_logps}, std::pair{"rejected_logps", &b.rejected_logps}}) {
    const double top = ops::item(ops::max_all(ops::detach(*x)));
    if (!(top <= 0.0)) fail(fn, name, " must be <= 0 (log-probabilities), got a maximum of ", top);
  }
}
/// The smallest positive normal number of x's (floating) dtype: the bound of orpo_backward's denominators.
template <tensor T>
double orpo_smallest_normal(const T& x) {
  return ops::dtype_of(x) == dtype::float64 ? std::numeric_limits<double>::min()
                                            : static_cast<double>(std::numeric_limits<float>::min());
}
template <tensor T>
std::pair<T, T> orpo_average(const cpo_batch<T>& b) {
  return {ops::div(ops::upcast(b.chosen_logps), ops::maximum(ops::upcast(b.chosen_lengths), 1.0)),
          ops::div(ops::upcast(b.rejected_logps), ops::maximum(ops::upcast(b.rejected_lengths), 1.0))};
}
}  // namespace detail

/// ORPO loss and TRL's metrics. See the file comment.
template <tensor T>
orpo_result<T> orpo(const cpo_batch<T>& batch, const orpo_options& opt = {}) {
  detail::check_orpo("orpo", batch, opt);
  const auto [uc, ur] = detail::orpo_average(batch);
  const double n = static_cast<double>(ops::numel(uc));
  // z = (ū_c - ū_r) - (log(1 - e^{ū_c}) - log(1 - e^{ū_r}))
  const T z = ops::sub(ops::sub(uc, ur), ops::sub(log1mexp(uc), log1mexp(ur)));
  const T ratio = log_sigmoid(z);
  orpo_result<T> r;
  const T nll = ops::div(ops::neg(ops::sum_all(ops::upcast(batch.chosen_logps))),
                         ops::maximum(ops::sum_all(ops::upcast(batch.chosen_lengths)), 1.0));
  r.loss = ops::sub(nll, ops::mul(ops::div(ops::sum_all(ratio), n), opt.beta));
  r.nll_loss = ops::detach(nll);
  r.log_odds_ratio = ops::detach(ops::div(ops::sum_all(ratio), n));
  r.log_odds_chosen = ops::detach(ops::div(ops::sum_all(z), n));
  const T rc = ops::detach(ops::mul(uc, opt.beta)), rr = ops::detach(ops::mul(ur, opt.beta));
  r.rewards_chosen = ops::div(ops::sum_all(rc), n);
  r.rewards_rejected = ops::div(ops::sum_all(rr), n);
  r.reward_accuracy = ops::div(ops::sum_all(ops::gt(rc, rr)), n);
  r.reward_margin = ops::div(ops::sum_all(ops::sub(rc, rr)), n);
  return r;
}

/// Gradient of orpo(...).loss with respect to chosen_logps and rejected_logps (the sums).
template <tensor T>
dpo_gradients<T> orpo_backward(const cpo_batch<T>& batch, const orpo_options& opt = {}, double grad_loss = 1.0) {
  detail::check_orpo("orpo_backward", batch, opt);
  detail::require_finite("orpo_backward", "grad_loss", grad_loss);
  const auto [uc, ur] = detail::orpo_average(batch);
  const double n = static_cast<double>(ops::numel(uc));
  const T z = ops::sub(ops::sub(uc, ur), ops::sub(log1mexp(uc), log1mexp(ur)));
  // d(-β mean log σ(z))/dz = -β σ(-z) / B;  dz/dū_c = -1/expm1(ū_c), dz/dū_r = 1/expm1(ū_r)
  const T dz = ops::mul(sigmoid(ops::neg(z)), -opt.beta / n);
  const T nc = ops::maximum(ops::upcast(batch.chosen_lengths), 1.0);
  const T nr = ops::maximum(ops::upcast(batch.rejected_lengths), 1.0);
  const T tokens = ops::maximum(ops::sum_all(ops::upcast(batch.chosen_lengths)), 1.0);
  // -dz/expm1(ū_c) = -β/B · σ(-z)/(1 - e^{ū_c}) = -β/B / ((1 - e^{ū_c}) + e^{ū_c - ū_r}(1 - e^{ū_r})) (σ(-z) written
  // out): finite at ū_c = 0 (a chosen log-prob of exactly 0), where σ(-z) = 0 and expm1(ū_c) = 0 gave 0/0 = NaN.
  // Both denominators are bounded below by the smallest normal t (file comment): a denormal ū_r (fuzz_preference:
  // ū_r = -4.9e-324, loss 73.89) gave dz/expm1(ū_r) = +inf, and ū_c, ū_r both denormal overflowed d_or_c.
  const double t = detail::orpo_smallest_normal(uc);
  const T one_minus_c = ops::neg(ops::expm1(uc)), one_minus_r = ops::neg(ops::expm1(ur));
  const T d_or_c = ops::div(ops::scalar_like(uc, -opt.beta / n),
                            ops::maximum(ops::add(one_minus_c, ops::mul(ops::exp(ops::sub(uc, ur)), one_minus_r)), t));
  const T gc = ops::sub(ops::div(d_or_c, nc), ops::div(ops::scalar_like(uc, 1.0), tokens));
  // dz/expm1(ū_r) = -dz / (1 - e^{ū_r})
  const T gr = ops::div(ops::div(ops::neg(dz), ops::maximum(one_minus_r, t)), nr);
  const dtype d = ops::dtype_of(batch.chosen_logps);
  return {ops::to_dtype(ops::mul(gc, grad_loss), d), ops::to_dtype(ops::mul(gr, grad_loss), d)};
}

}  // namespace posttrain
