// posttrain/losses/cpo.hpp — reference-free preference losses: CPO, SimPO and AlphaPO (TRL CPOTrainer).
//
// Inputs [B]: chosen_logps, rejected_logps (SUMS over completion tokens) and chosen_lengths,
// rejected_lengths. As TRL's CPOTrainer, ipo and simpo use length-averaged log-probs u = ℓ/|y|,
// sigmoid and hinge use the sums u = ℓ.
//   reward  r = u, or with AlphaPO's α != 0: r = (1 - e^{-α u}) / α   (AlphaPO, arXiv:2501.03884 eq. 6;
//           -α u capped as dpo.hpp's exponents: detail::exponent_cap)
//   d = r_c - r_r
//   sigmoid  -(1-ε) log σ(βd) - ε log σ(-βd)                         CPO eq. 3 (with cDPO smoothing)
//   hinge    relu(1 - βd)
//   ipo      (d - 1/(2β))²
//   simpo    -(1-ε) log σ(βd - γ) - ε log σ(-(βd - γ))               SimPO eq. 6 (TRL writes β(d - γ/β))
//   loss = mean_b L_b + cpo_alpha · NLL,  NLL = -Σ_b ℓ_c / Σ_b |c| (token-mean NLL of the chosen
//   completions, CPO's behaviour-cloning term; TRL cpo_alpha = 1; pure SimPO is cpo_alpha = 0).
// Example: one pair, u_c - u_r = 10, β = 0.1, cpo_alpha = 0 -> sigmoid loss 0.313262.
#pragma once

#include <cmath>
#include <limits>
#include <string_view>

#include "posttrain/detail/validate.hpp"
#include "posttrain/losses/dpo.hpp"
#include "posttrain/numerics/stable.hpp"
#include "posttrain/tensor.hpp"

namespace posttrain {

enum class cpo_loss { sigmoid, hinge, ipo, simpo };

struct cpo_options {
  double beta = 0.1;
  cpo_loss loss = cpo_loss::sigmoid;
  /// ε of the sigmoid and simpo forms (TRL label_smoothing), in [0, 0.5].
  double label_smoothing = 0.0;
  /// SimPO's target margin γ (TRL simpo_gamma 0.5).
  double simpo_gamma = 0.5;
  /// Weight of the behaviour-cloning NLL on the chosen completions (TRL cpo_alpha 1.0).
  double cpo_alpha = 1.0;
  /// AlphaPO's reward-shape α (TRL alpha 0: the plain log-probability reward).
  double alpha = 0.0;

  /// SimPO as its paper defines it: the simpo loss and no NLL term.
  static cpo_options simpo() { return {.loss = cpo_loss::simpo, .cpo_alpha = 0.0}; }
};

template <tensor T>
struct cpo_batch {
  T chosen_logps;      ///< [B] sums over completion tokens
  T rejected_logps;    ///< [B]
  T chosen_lengths;    ///< [B] completion token counts
  T rejected_lengths;  ///< [B]
};

template <tensor T>
struct cpo_result {
  T loss;              ///< 0-d
  T per_pair_loss;     ///< [B] L_b (without the NLL term)
  T nll_loss;          ///< 0-d NLL of the chosen completions
  T rewards_chosen;    ///< 0-d mean β r_c (TRL rewards/chosen)
  T rewards_rejected;  ///< 0-d mean β r_r
  T reward_accuracy;   ///< 0-d fraction with r_c > r_r
  T reward_margin;     ///< 0-d mean β (r_c - r_r)
  T logps_chosen;      ///< 0-d mean u_c (TRL logps/chosen: the log-probs the loss used)
  T logps_rejected;    ///< 0-d mean u_r
};

namespace detail {
template <tensor T>
void check_cpo(std::string_view fn, const cpo_batch<T>& b, const cpo_options& o) {
  for (auto [name, v] : {std::pair{"options.beta", o.beta}, std::pair{"options.label_smoothing", o.label_smoothing},
                         std::pair{"options.simpo_gamma", o.simpo_gamma}, std::pair{"options.cpo_alpha", o.cpo_alpha},
                         std::pair{"options.alpha", o.alpha}})
    require_finite(fn, name, v);
  if (o.beta <= 0) fail(fn, "options.beta must be > 0, got ", o.beta);
  if (o.label_smoothing < 0 || o.label_smoothing > 0.5)
    fail(fn, "options.label_smoothing must be in [0, 0.5], got ", o.label_smoothing);
  require_values(fn, "chosen_logps", b.chosen_logps);
  require_rank(fn, "chosen_logps", b.chosen_logps, 1, 1);
  require_like(fn, "chosen_logps", b.chosen_logps, "rejected_logps", b.rejected_logps);
  require_like(fn, "chosen_logps", b.chosen_logps, "chosen_lengths", b.chosen_lengths);
  require_like(fn, "chosen_logps", b.chosen_logps, "rejected_lengths", b.rejected_lengths);
}

template <tensor T>
struct cpo_state {
  T uc, ur, rc, rr, drc_dc, drr_dr;  // used log-probs, rewards, and d reward / d summed log-prob
};

template <tensor T>
cpo_state<T> cpo_prepare(const cpo_batch<T>& b, const cpo_options& o) {
  const bool averaged = o.loss == cpo_loss::ipo || o.loss == cpo_loss::simpo;
  const T nc =
      averaged ? ops::maximum(ops::upcast(b.chosen_lengths), 1.0) : ops::full_like(ops::upcast(b.chosen_logps), 1.0);
  const T nr =
      averaged ? ops::maximum(ops::upcast(b.rejected_lengths), 1.0) : ops::full_like(ops::upcast(b.chosen_logps), 1.0);
  cpo_state<T> s;
  s.uc = ops::div(ops::upcast(b.chosen_logps), nc);
  s.ur = ops::div(ops::upcast(b.rejected_logps), nr);
  if (o.alpha == 0.0) {
    s.rc = s.uc;
    s.rr = s.ur;
    s.drc_dc = ops::div(1.0, nc);
    s.drr_dr = ops::div(1.0, nr);
  } else {
    // AlphaPO: r = (1 - e^{-α u}) / α = -expm1(-α u) / α;  dr/du = e^{-α u}.
    // The exponent -α u is capped (detail::exponent_cap) so no finite input overflows; no slope past the cap.
    const double cap = exponent_cap(ops::dtype_of(b.chosen_logps));
    const double inf = std::numeric_limits<double>::infinity();
    const T tc = ops::mul(s.uc, -o.alpha), tr = ops::mul(s.ur, -o.alpha);
    const T tc_capped = ops::clamp(tc, -inf, cap), tr_capped = ops::clamp(tr, -inf, cap);
    s.rc = ops::div(ops::neg(ops::expm1(tc_capped)), o.alpha);
    s.rr = ops::div(ops::neg(ops::expm1(tr_capped)), o.alpha);
    s.drc_dc = ops::div(ops::mul(ops::exp(tc_capped), ops::le(tc, cap)), nc);
    s.drr_dr = ops::div(ops::mul(ops::exp(tr_capped), ops::le(tr, cap)), nr);
  }
  return s;
}

/// Per-pair loss L(d) and dL/dd.
template <tensor T>
std::pair<T, T> cpo_pair(const T& d, const cpo_options& o) {
  const double beta = o.beta, eps = o.label_smoothing;
  switch (o.loss) {
    case cpo_loss::sigmoid:
    case cpo_loss::simpo: {
      // y = βd (- γ for simpo): -(1-ε) log σ(y) - ε log σ(-y);  dL/dy = -(1-ε) σ(-y) + ε σ(y)
      const T y = o.loss == cpo_loss::simpo ? ops::sub(ops::mul(d, beta), o.simpo_gamma) : ops::mul(d, beta);
      const T loss = ops::sub(ops::mul(log_sigmoid(y), -(1 - eps)), ops::mul(log_sigmoid(ops::neg(y)), eps));
      const T dy = ops::add(ops::mul(sigmoid(ops::neg(y)), -(1 - eps)), ops::mul(sigmoid(y), eps));
      return {loss, ops::mul(dy, beta)};
    }
    case cpo_loss::hinge: {
      const T u = ops::sub(1.0, ops::mul(d, beta));
      return {ops::maximum(u, 0.0), ops::mul(ops::gt(u, 0.0), -beta)};
    }
    case cpo_loss::ipo: {
      const T u = ops::sub(d, 0.5 / beta);
      return {ops::square(u), ops::mul(u, 2.0)};
    }
  }
  return {d, d};
}
}  // namespace detail

/// CPO / SimPO / AlphaPO loss and TRL's metrics. See the file comment.
template <tensor T>
cpo_result<T> cpo(const cpo_batch<T>& batch, const cpo_options& opt = {}) {
  detail::check_cpo("cpo", batch, opt);
  const auto s = detail::cpo_prepare(batch, opt);
  const double n = static_cast<double>(ops::numel(s.uc));
  const T pair = detail::cpo_pair(ops::sub(s.rc, s.rr), opt).first;
  cpo_result<T> r;
  r.per_pair_loss = pair;
  // CPO's behaviour-cloning term: token-mean NLL over every chosen completion token
  r.nll_loss = ops::div(ops::neg(ops::sum_all(ops::upcast(batch.chosen_logps))),
                        ops::maximum(ops::sum_all(ops::upcast(batch.chosen_lengths)), 1.0));
  r.loss = ops::add(ops::div(ops::sum_all(pair), n), ops::mul(r.nll_loss, opt.cpo_alpha));
  r.nll_loss = ops::detach(r.nll_loss);
  const T rc = ops::detach(ops::mul(s.rc, opt.beta)), rr = ops::detach(ops::mul(s.rr, opt.beta));
  r.rewards_chosen = ops::div(ops::sum_all(rc), n);
  r.rewards_rejected = ops::div(ops::sum_all(rr), n);
  r.reward_accuracy = ops::div(ops::sum_all(ops::gt(rc, rr)), n);
  r.reward_margin = ops::div(ops::sum_all(ops::sub(rc, rr)), n);
  r.logps_chosen = ops::div(ops::sum_all(ops::detach(s.uc)), n);
  r.logps_rejected = ops::div(ops::sum_all(ops::detach(s.ur)), n);
  return r;
}

/// Gradient of cpo(...).loss with respect to chosen_logps and rejected_logps (the sums).
template <tensor T>
dpo_gradients<T> cpo_backward(const cpo_batch<T>& batch, const cpo_options& opt = {}, double grad_loss = 1.0) {
  detail::check_cpo("cpo_backward", batch, opt);
  detail::require_finite("cpo_backward", "grad_loss", grad_loss);
  const auto s = detail::cpo_prepare(batch, opt);
  const double n = static_cast<double>(ops::numel(s.uc));
  const T slope = detail::cpo_pair(ops::sub(s.rc, s.rr), opt).second;  // dL/dd
  const T tokens = ops::maximum(ops::sum_all(ops::upcast(batch.chosen_lengths)), 1.0);
  // ∂/∂ℓ_c = dL/dd · dr_c/dℓ_c / B - cpo_alpha / Σ|c|;  ∂/∂ℓ_r = -dL/dd · dr_r/dℓ_r / B
  const T gc =
      ops::sub(ops::div(ops::mul(slope, s.drc_dc), n), ops::div(ops::scalar_like(s.uc, opt.cpo_alpha), tokens));
  const T gr = ops::div(ops::neg(ops::mul(slope, s.drr_dr)), n);
  const dtype d = ops::dtype_of(batch.chosen_logps);
  return {ops::to_dtype(ops::mul(gc, grad_loss), d), ops::to_dtype(ops::mul(gr, grad_loss), d)};
}

}  // namespace posttrain
