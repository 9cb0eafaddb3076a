// posttrain/losses/dpo.hpp — direct preference optimisation and its pairwise family (TRL DPOTrainer).
//
// Inputs (TRL names), all [B]: chosen_logps, rejected_logps (policy sequence log-probabilities,
// sums over completion tokens), ref_chosen_logps, ref_rejected_logps (reference model; ignored in
// reference_free mode), and where a loss type needs them the completion lengths and WPO weights.
//
//   log-ratios    l_c = chosen_logps - ref_chosen_logps,  l_r likewise
//   scores        s = f(l): reverse_kl s = l (standard DPO); forward_kl s = -e^{-l};
//                 js_divergence s = log σ(l); alpha_divergence s = e^{(α-1) l}/(α-1)
//                 (Wang et al. 2023, arXiv:2309.16240 §4). Exponents are capped (detail::exponent_cap:
//                 11 for float16 inputs as TRL, 40 for float32 where TRL uses 80, 80 for float64) so
//                 that no finite input overflows, squared losses included: TRL caps alpha_divergence
//                 only; we also cap forward_kl's -l, with no gradient past the cap (as torch.clamp).
//   Δ = s_c - s_r,  x = β Δ
// Per-pair losses (TRL dpo_loss; each line names its paper):
//   sigmoid       -(1-ε) log σ(x) - ε log σ(-x)      DPO eq. 7; ε > 0 is cDPO (old TRL, OpenRLHF, torchtune)
//   hinge         relu(1 - x)                         SLiC / RSO (RSO's γ plays β's role)
//   ipo           (s_c/|c| - s_r/|r| - 1/(2β))²       IPO eq. 17, length-normalised as TRL; ipo_sum: OpenRLHF's sums
//   exo_pair      σ(x)(log σ(x) - log(1-ε)) + σ(-x)(log σ(-x) - log ε)   EXO eq. 16 (ε > 0 required)
//   nca_pair      -log σ(βs_c) - ½ log σ(-βs_c) - ½ log σ(-βs_r)         NCA
//   robust        (-(1-ε) log σ(x) + ε log σ(-x)) / (1 - 2ε)              rDPO (can be negative)
//   bco_pair      -log σ(βs_c) - log σ(-βs_r)                             BCO (no running shift, as new TRL)
//   sppo_hard     (s_c - 1/(2β))² + (s_r + 1/(2β))²                       SPPO, hard probabilities
//   apo_zero      1 - σ(βl_c) + σ(βl_r)                                   APO eq. 7
//   apo_down      σ(βl_c) + 1 - σ(x)                                      APO eq. 8
//   discopop      -log σ(x)(1 - m) + e^{-x} m,  m = σ(x/τ)               DiscoPOP eq. 5
//                 (e^{-x} m is evaluated as exp(-x + log σ(x/τ)): finite for every finite x)
//   aot           cDPO form on x_i = β(sort(ℓ_c - ℓ_r)_i - sort(ℓ_c^ref - ℓ_r^ref)_i)   AOT (paired)
//   aot_unpaired  cDPO form on x_i = β(sort(l_c)_i - sort(l_r)_i)             AOT (unpaired)
//                 (sorted over the batch, so each pair's loss depends on the whole batch)
//   sigmoid_norm  -log σ(β(s_c/|c| - s_r/|r|))                            length-normalised DPO (Tulu 3)
//   sft           -Σ_b chosen_logps / Σ_b |c|: token-mean NLL of the chosen completions (RPO = sigmoid + sft)
// loss = Σ_k weight_k · mean_b(L_k · w_c · w_r), w the optional (detached) WPO weights (TRL use_weighting:
// compute them from the policy's logits with wpo_weights, sequence_logps.hpp).
// Gradient of standard DPO: ∂L/∂chosen_logps = -β σ(-x) / B, ∂L/∂rejected_logps = +β σ(-x) / B:
// the pair the model already ranks correctly (x large) gets almost no push; a mis-ranked one the most.
// Example (torchtune test vector): l_c - l_r = 10 (x = 1, β = 0.1) -> sigmoid loss 0.313262.
#pragma once

#include <cmath>
#include <limits>
#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

#include "posttrain/detail/validate.hpp"
#include "posttrain/numerics/logits.hpp"
#include "posttrain/numerics/stable.hpp"
#include "posttrain/tensor.hpp"

namespace posttrain {

enum class dpo_loss {
  sigmoid,
  hinge,
  ipo,
  exo_pair,
  nca_pair,
  robust,
  bco_pair,
  sppo_hard,
  apo_zero,
  apo_down,
  discopop,
  sigmoid_norm,
  sft,
  aot,
  aot_unpaired
};

constexpr const char* dpo_loss_name(dpo_loss l) {
  switch (l) {
    case dpo_loss::sigmoid: return "sigmoid";
    case dpo_loss::hinge: return "hinge";
    case dpo_loss::ipo: return "ipo";
    case dpo_loss::exo_pair: return "exo_pair";
    case dpo_loss::nca_pair: return "nca_pair";
    case dpo_loss::robust: return "robust";
    case dpo_loss::bco_pair: return "bco_pair";
    case dpo_loss::sppo_hard: return "sppo_hard";
    case dpo_loss::apo_zero: return "apo_zero";
    case dpo_loss::apo_down: return "apo_down";
    case dpo_loss::discopop: return "discopop";
    case dpo_loss::sigmoid_norm: return "sigmoid_norm";
    case dpo_loss::sft: return "sft";
    case dpo_loss::aot: return "aot";
    case dpo_loss::aot_unpaired: return "aot_unpaired";
  }
  return "?";
}

/// TRL's f_divergence_type: which f-divergence regularises the implicit reward.
enum class f_divergence { reverse_kl, forward_kl, js_divergence, alpha_divergence };

/// One entry of a weighted mixture of loss types (TRL loss_type list + loss_weights, e.g. MPO).
struct dpo_term {
  dpo_loss loss;
  double weight = 1.0;
};

struct dpo_options {
  /// β: the strength of the KL leash to the reference (TRL 0.1).
  double beta = 0.1;
  /// The loss type when `mix` is empty.
  dpo_loss loss = dpo_loss::sigmoid;
  /// A weighted sum of loss types; overrides `loss` when non-empty (e.g. RPO: {{sigmoid, 1}, {sft, 1}}).
  std::vector<dpo_term> mix = {};
  /// ε: cDPO label smoothing for sigmoid (new TRL has none: 0), rDPO's ε for robust (in [0, 0.5)),
  /// EXO's ε for exo_pair (must be > 0; TRL recommends 1e-3).
  double label_smoothing = 0.0;
  /// IPO on summed log-ratios (OpenRLHF) instead of TRL's per-token averages.
  bool ipo_sum = false;
  /// DiscoPOP's temperature τ (TRL 0.05).
  double discopop_tau = 0.05;
  f_divergence divergence = f_divergence::reverse_kl;
  /// α of the alpha divergence (TRL f_alpha_divergence_coef).
  double alpha = 0.5;
  /// Treat the reference log-probs as 0 (old TRL reference_free, Liger use_ref_model=False).
  bool reference_free = false;
};

template <tensor T>
struct preference_batch {
  T chosen_logps;                                      ///< [B] policy, summed over completion tokens
  T rejected_logps;                                    ///< [B]
  std::optional<T> ref_chosen_logps = std::nullopt;    ///< [B] reference (unless reference_free)
  std::optional<T> ref_rejected_logps = std::nullopt;  ///< [B]
  std::optional<T> chosen_lengths = std::nullopt;      ///< [B] completion token counts (ipo, sigmoid_norm, sft)
  std::optional<T> rejected_lengths = std::nullopt;    ///< [B]
  std::optional<T> chosen_weights = std::nullopt;      ///< [B] WPO weights (constants; wpo_weights computes TRL's)
  std::optional<T> rejected_weights = std::nullopt;    ///< [B]
};

template <tensor T>
struct dpo_result {
  T loss;              ///< 0-d
  T per_pair_loss;     ///< [B]: Σ_k weight_k L_k (× WPO weights)
  T rewards_chosen;    ///< 0-d: mean β·l_c (TRL rewards/chosen)
  T rewards_rejected;  ///< 0-d: mean β·l_r (TRL rewards/rejected)
  T reward_accuracy;   ///< 0-d: fraction with β·l_c > β·l_r (TRL rewards/accuracies)
  T reward_margin;     ///< 0-d: mean β(l_c - l_r) (TRL rewards/margins)
  T logps_chosen;      ///< 0-d: mean chosen_logps (TRL logps/chosen)
  T logps_rejected;    ///< 0-d: mean rejected_logps (TRL logps/rejected)
};

template <tensor T>
struct dpo_gradients {
  T chosen_logps;    ///< [B] ∂loss/∂chosen_logps
  T rejected_logps;  ///< [B] ∂loss/∂rejected_logps
};

namespace detail {

/// A per-pair loss with its partial derivatives: with respect to the scores s_c, s_r and to the
/// raw log-ratios l_c, l_r (apo and sft read those directly).
template <tensor T>
struct dpo_pair_terms {
  T loss, d_sc, d_sr, d_lc, d_lr;
};

inline std::vector<dpo_term> dpo_terms_of(const dpo_options& o) {
  return o.mix.empty() ? std::vector<dpo_term>{{o.loss, 1.0}} : o.mix;
}

inline bool dpo_needs_lengths(dpo_loss l, const dpo_options& o) {
  return (l == dpo_loss::ipo && !o.ipo_sum) || l == dpo_loss::sigmoid_norm || l == dpo_loss::sft;
}

template <tensor T>
void check_dpo(std::string_view fn, const preference_batch<T>& b, const dpo_options& o) {
  require_finite(fn, "options.beta", o.beta);
  if (o.beta <= 0) fail(fn, "options.beta must be > 0, got ", o.beta);
  require_finite(fn, "options.label_smoothing", o.label_smoothing);
  require_finite(fn, "options.discopop_tau", o.discopop_tau);
  require_finite(fn, "options.alpha", o.alpha);
  if (o.discopop_tau <= 0) fail(fn, "options.discopop_tau must be > 0, got ", o.discopop_tau);
  require_values(fn, "chosen_logps", b.chosen_logps);
  require_rank(fn, "chosen_logps", b.chosen_logps, 1, 1);
  require_like(fn, "chosen_logps", b.chosen_logps, "rejected_logps", b.rejected_logps);
  if (!o.reference_free) {
    if (!b.ref_chosen_logps || !b.ref_rejected_logps)
      fail(fn, "ref_chosen_logps and ref_rejected_logps are required unless options.reference_free");
    require_like(fn, "chosen_logps", b.chosen_logps, "ref_chosen_logps", *b.ref_chosen_logps);
    require_like(fn, "chosen_logps", b.chosen_logps, "ref_rejected_logps", *b.ref_rejected_logps);
  }
  const auto optional_like = [&](std::string_view name, const std::optional<T>& t) {
    if (t) require_like(fn, "chosen_logps", b.chosen_logps, name, *t);
  };
  optional_like("chosen_lengths", b.chosen_lengths);
  optional_like("rejected_lengths", b.rejected_lengths);
  optional_like("chosen_weights", b.chosen_weights);
  optional_like("rejected_weights", b.rejected_weights);
  if (b.chosen_weights.has_value() != b.rejected_weights.has_value())
    fail(fn, "chosen_weights and rejected_weights (WPO) must be given together");
  const auto has_sft = [&] {
    for (const auto& t : dpo_terms_of(o))
      if (t.loss == dpo_loss::sft) return true;
    return false;
  };
  if (b.chosen_weights && has_sft())
    fail(fn, "WPO weights (chosen_weights) with the sft term are not supported: weight the pairwise terms only");
  for (const auto& t : dpo_terms_of(o))
    if (b.chosen_weights && (t.loss == dpo_loss::aot || t.loss == dpo_loss::aot_unpaired))
      fail(fn, "WPO weights (chosen_weights) with loss ", dpo_loss_name(t.loss),
           " are not supported: AOT sorts over the batch, so per-pair weights have no pair to attach to (TRL)");
  const auto terms = dpo_terms_of(o);
  if (terms.empty()) fail(fn, "options.mix is empty");
  for (const auto& t : terms) {
    require_finite(fn, "options.mix weight", t.weight);
    if (t.loss == dpo_loss::robust && (o.label_smoothing < 0 || o.label_smoothing >= 0.5))
      fail(fn, "options.label_smoothing must be in [0, 0.5) for loss robust, got ", o.label_smoothing);
    if (t.loss == dpo_loss::exo_pair && (o.label_smoothing <= 0 || o.label_smoothing >= 1))
      fail(fn, "options.label_smoothing must be in (0, 1) for loss exo_pair (TRL recommends 1e-3), got ",
           o.label_smoothing);
    if ((t.loss == dpo_loss::sigmoid || t.loss == dpo_loss::aot || t.loss == dpo_loss::aot_unpaired) &&
        (o.label_smoothing < 0 || o.label_smoothing > 0.5))
      fail(fn, "options.label_smoothing must be in [0, 0.5] for loss sigmoid, got ", o.label_smoothing);
    if (dpo_needs_lengths(t.loss, o)) {
      if (!b.chosen_lengths || (t.loss != dpo_loss::sft && !b.rejected_lengths))
        fail(fn, "loss ", dpo_loss_name(t.loss), " needs chosen_lengths",
             t.loss == dpo_loss::sft ? "" : " and rejected_lengths");
    }
  }
}

/// σ'(z) = σ(z) σ(-z)
template <tensor T>
T sigmoid_slope(const T& z) {
  return ops::mul(sigmoid(z), sigmoid(ops::neg(z)));
}

/// The exponent cap that keeps e^t, and the square of e^t (ipo, sppo_hard), finite: 11 for float16
/// inputs (TRL), 40 for float32 and bfloat16 (TRL uses 80, whose square overflows float32), 80 for
/// float64 (TRL has no float64 entry).
inline double exponent_cap(dtype input) {
  switch (input) {
    case dtype::float16: return 11.0;
    case dtype::float64: return 80.0;
    default: return 40.0;
  }
}

/// cDPO on x: -(1-ε) log σ(x) - ε log σ(-x) and its slope -(1-ε) σ(-x) + ε σ(x).
template <tensor T>
std::pair<T, T> cdpo_on(const T& x, double eps) {
  const T loss = ops::sub(ops::mul(log_sigmoid(x), -(1 - eps)), ops::mul(log_sigmoid(ops::neg(x)), eps));
  return {loss, ops::add(ops::mul(sigmoid(ops::neg(x)), -(1 - eps)), ops::mul(sigmoid(x), eps))};
}

/// Values sorted ascending over a [B] tensor, and the gradient map back: for g over the sorted
/// positions, unsort(g)[j] = Σ_i g_i [order_i = j] (one_hot over the batch: B x B, B is small).
template <tensor T>
struct sorted_view {
  T values;
  T permutation;  // [B, B]: row i is onehot(order_i)
  T unsort(const T& g) const { return ops::sum(ops::mul(ops::unsqueeze(g, -1), permutation), 0); }
};
template <tensor T>
sorted_view<T> sort_batch(const T& x) {
  // sorted_i = Σ_j P_ij x_j with P_ij = [order_i = j]: a differentiable sort in the concept's vocabulary
  const T p = ops::one_hot(ops::argsort_last(x), ops::size(x, 0), x);  // [B, B]
  return {ops::sum(ops::mul(p, ops::unsqueeze(x, 0)), 1), p};
}

/// The per-pair loss of one type and its partials (see the file comment for each formula).
template <tensor T>
dpo_pair_terms<T> dpo_pair(dpo_loss type, const T& sc, const T& sr, const T& lc, const T& lr,
                           const preference_batch<T>& b, const dpo_options& o) {
  const double beta = o.beta, eps = o.label_smoothing;
  const T zero = ops::full_like(sc, 0.0);
  const T x = ops::mul(ops::sub(sc, sr), beta);  // β Δ
  // Losses that depend on x = βΔ only: L(x), dL/dx -> d_sc = β dL/dx, d_sr = -β dL/dx.
  const auto of_x = [&](const T& loss, const T& dx) {
    return dpo_pair_terms<T>{loss, ops::mul(dx, beta), ops::mul(dx, -beta), zero, zero};
  };
  switch (type) {
    case dpo_loss::sigmoid: {
      // cDPO: -(1-ε) log σ(x) - ε log σ(-x);  dL/dx = -(1-ε) σ(-x) + ε σ(x)
      const auto [loss, dx] = cdpo_on(x, eps);
      return of_x(loss, dx);
    }
    case dpo_loss::aot:
    case dpo_loss::aot_unpaired: {
      // AOT: sort over the batch, then cDPO on β(sorted difference); gradients are unsorted back.
      if (type == dpo_loss::aot) {
        // policy log-ratio ℓ_c - ℓ_r = l_c - l_r + (ℓ_c^ref - ℓ_r^ref): sort it and the reference's separately
        const T ref_diff = o.reference_free
                               ? ops::full_like(lc, 0.0)
                               : ops::sub(ops::upcast(*b.ref_chosen_logps), ops::upcast(*b.ref_rejected_logps));
        const auto pol = sort_batch(ops::add(ops::sub(lc, lr), ref_diff));
        const auto ref = sort_batch(ref_diff);
        const auto [loss, dx] = cdpo_on(ops::mul(ops::sub(pol.values, ref.values), beta), eps);
        const T g = pol.unsort(ops::mul(dx, beta));  // ∂/∂(ℓ_c - ℓ_r) per original pair
        return {loss, zero, zero, g, ops::neg(g)};
      }
      const auto c = sort_batch(lc), r = sort_batch(lr);
      const auto [loss, dx] = cdpo_on(ops::mul(ops::sub(c.values, r.values), beta), eps);
      return {loss, zero, zero, c.unsort(ops::mul(dx, beta)), r.unsort(ops::mul(dx, -beta))};
    }
    case dpo_loss::hinge: {
      // relu(1 - x); dL/dx = -1 where 1 - x > 0 (torch.relu's gradient is 0 at 0)
      const T u = ops::sub(1.0, x);
      return of_x(ops::maximum(u, 0.0), ops::neg(ops::gt(u, 0.0)));
    }
    case dpo_loss::robust: {
      // (-(1-ε) log σ(x) + ε log σ(-x)) / (1 - 2ε)
      const double k = 1.0 / (1.0 - 2.0 * eps);
      const T loss =
          ops::mul(ops::add(ops::mul(log_sigmoid(x), -(1 - eps)), ops::mul(log_sigmoid(ops::neg(x)), eps)), k);
      const T dx = ops::mul(ops::sub(ops::mul(sigmoid(ops::neg(x)), -(1 - eps)), ops::mul(sigmoid(x), eps)), k);
      return of_x(loss, dx);
    }
    case dpo_loss::exo_pair: {
      // q = σ(x): L = q(log q - log(1-ε)) + (1-q)(log(1-q) - log ε);  dL/dx = q(1-q)(x - log(1-ε) + log ε)
      const double a = std::log1p(-eps), c = std::log(eps);
      const T q = sigmoid(x), ql = sigmoid(ops::neg(x));
      const T loss =
          ops::add(ops::mul(q, ops::sub(log_sigmoid(x), a)), ops::mul(ql, ops::sub(log_sigmoid(ops::neg(x)), c)));
      return of_x(loss, ops::mul(ops::mul(q, ql), ops::add(x, c - a)));
    }
    case dpo_loss::discopop: {
      // m = σ(x/τ): L = -log σ(x)(1-m) + e^{-x} m;  dL/dx = -σ(-x)(1-m) + (e^{-x} + log σ(x)) m' - e^{-x} m.
      // Products with e^{-x} are taken in log space: e^{-x} m = exp(-x + log σ(x/τ)),
      // e^{-x} m' = exp(-x + log σ(x/τ) + log σ(-x/τ)) / τ, so a very negative x gives 0, not inf * 0.
      const double tau = o.discopop_tau;
      const T xt = ops::div(x, tau);
      const T m = sigmoid(xt);
      const T dm = ops::div(sigmoid_slope(xt), tau);
      const T logistic = ops::neg(log_sigmoid(x));
      const T expo_m = ops::exp(ops::add(ops::neg(x), log_sigmoid(xt)));
      const T expo_dm = ops::div(ops::exp(ops::add(ops::sub(log_sigmoid(xt), x), log_sigmoid(ops::neg(xt)))), tau);
      const T loss = ops::add(ops::mul(logistic, ops::sub(1.0, m)), expo_m);
      const T dx = ops::sub(
          ops::sub(ops::sub(expo_dm, ops::mul(sigmoid(ops::neg(x)), ops::sub(1.0, m))), ops::mul(logistic, dm)),
          expo_m);
      return of_x(loss, dx);
    }
    case dpo_loss::ipo:
    case dpo_loss::sigmoid_norm: {
      // length-normalised scores: s/|y| (|y| clamped at 1 as TRL)
      const bool sums = type == dpo_loss::ipo && o.ipo_sum;
      const T nc = sums ? ops::full_like(sc, 1.0) : ops::maximum(*b.chosen_lengths, 1.0);
      const T nr = sums ? ops::full_like(sr, 1.0) : ops::maximum(*b.rejected_lengths, 1.0);
      const T d = ops::sub(ops::div(sc, nc), ops::div(sr, nr));
      if (type == dpo_loss::ipo) {
        // (d - 1/(2β))²
        const T u = ops::sub(d, 0.5 / beta);
        const T du = ops::mul(u, 2.0);
        return {ops::square(u), ops::div(du, nc), ops::neg(ops::div(du, nr)), zero, zero};
      }
      // -log σ(β d);  dL/dd = -β σ(-β d)
      const T y = ops::mul(d, beta);
      const T dd = ops::mul(sigmoid(ops::neg(y)), -beta);
      return {ops::neg(log_sigmoid(y)), ops::div(dd, nc), ops::neg(ops::div(dd, nr)), zero, zero};
    }
    case dpo_loss::nca_pair: {
      // -log σ(βs_c) - ½ log σ(-βs_c) - ½ log σ(-βs_r)
      const T rc = ops::mul(sc, beta), rr = ops::mul(sr, beta);
      const T loss = ops::sub(ops::sub(ops::neg(log_sigmoid(rc)), ops::mul(log_sigmoid(ops::neg(rc)), 0.5)),
                              ops::mul(log_sigmoid(ops::neg(rr)), 0.5));
      const T dsc = ops::mul(ops::add(ops::neg(sigmoid(ops::neg(rc))), ops::mul(sigmoid(rc), 0.5)), beta);
      const T dsr = ops::mul(sigmoid(rr), 0.5 * beta);
      return {loss, dsc, dsr, zero, zero};
    }
    case dpo_loss::bco_pair: {
      // -log σ(βs_c) - log σ(-βs_r)
      const T rc = ops::mul(sc, beta), rr = ops::mul(sr, beta);
      const T loss = ops::sub(ops::neg(log_sigmoid(rc)), log_sigmoid(ops::neg(rr)));
      return {loss, ops::mul(sigmoid(ops::neg(rc)), -beta), ops::mul(sigmoid(rr), beta), zero, zero};
    }
    case dpo_loss::sppo_hard: {
      // (s_c - 1/(2β))² + (s_r + 1/(2β))²
      const T a = ops::sub(sc, 0.5 / beta), c = ops::add(sr, 0.5 / beta);
      return {ops::add(ops::square(a), ops::square(c)), ops::mul(a, 2.0), ops::mul(c, 2.0), zero, zero};
    }
    case dpo_loss::apo_zero: {
      // 1 - σ(βl_c) + σ(βl_r)
      const T yc = ops::mul(lc, beta), yr = ops::mul(lr, beta);
      const T loss = ops::add(ops::sub(1.0, sigmoid(yc)), sigmoid(yr));
      return {loss, zero, zero, ops::mul(sigmoid_slope(yc), -beta), ops::mul(sigmoid_slope(yr), beta)};
    }
    case dpo_loss::apo_down: {
      // σ(βl_c) + 1 - σ(x)
      const T yc = ops::mul(lc, beta);
      const T loss = ops::add(sigmoid(yc), ops::sub(1.0, sigmoid(x)));
      const T dx = ops::neg(sigmoid_slope(x));
      return {loss, ops::mul(dx, beta), ops::mul(dx, -beta), ops::mul(sigmoid_slope(yc), beta), zero};
    }
    case dpo_loss::sft: {
      // token-mean NLL over every chosen completion token: -Σ_b chosen_logps / Σ_b |c|, spread evenly
      // over the pairs so that mean_b gives it back (TRL expands the scalar the same way).
      const T tokens = ops::maximum(ops::sum_all(*b.chosen_lengths), 1.0);
      const double n = static_cast<double>(ops::numel(sc));
      const T nll = ops::div(ops::neg(ops::sum_all(b.chosen_logps)), tokens);
      const T loss = ops::add(zero, nll);
      const T dlc = ops::add(zero, ops::div(ops::scalar_like(sc, -n), tokens));
      return {loss, zero, zero, dlc, zero};
    }
  }
  return {zero, zero, zero, zero, zero};
}

/// f-divergence score s = f(l) and its slope ds/dl.
template <tensor T>
std::pair<T, T> dpo_score(const T& l, const dpo_options& o, dtype input_dtype) {
  switch (o.divergence) {
    case f_divergence::reverse_kl: return {l, ops::full_like(l, 1.0)};
    case f_divergence::forward_kl: {
      // f'(t) = 1 - 1/t -> -e^{-l};  slope e^{-l}; -l capped (see the file comment)
      const double cap = exponent_cap(input_dtype);
      const T t = ops::neg(l);
      const T e = ops::exp(ops::clamp(t, -std::numeric_limits<double>::infinity(), cap));
      return {ops::neg(e), ops::mul(e, ops::le(t, cap))};
    }
    case f_divergence::js_divergence:
      // f'(t) = log(2t / (t + 1)) -> log σ(l);  slope σ(-l)
      return {log_sigmoid(l), sigmoid(ops::neg(l))};
    case f_divergence::alpha_divergence: {
      if (std::abs(o.alpha - 1.0) < 1e-6) return {l, ops::full_like(l, 1.0)};  // the α -> 1 limit is reverse KL
      // e^{(α-1) l} / (α-1), the exponent clamped at 80 (11 in float16) as TRL; no slope past the clamp
      const double cap = exponent_cap(input_dtype);
      const T t = ops::mul(l, o.alpha - 1.0);
      const T e = ops::exp(ops::clamp(t, -std::numeric_limits<double>::infinity(), cap));
      return {ops::div(e, o.alpha - 1.0), ops::mul(e, ops::le(t, cap))};
    }
  }
  return {l, l};
}

template <tensor T>
struct dpo_forward_state {
  T lc, lr, sc, sr, dsc_dlc, dsr_dlr, wpo;
  bool has_wpo = false;
};

template <tensor T>
dpo_forward_state<T> dpo_prepare(const preference_batch<T>& b, const dpo_options& o) {
  dpo_forward_state<T> s;
  const T c = ops::upcast(b.chosen_logps), r = ops::upcast(b.rejected_logps);
  s.lc = o.reference_free ? c : ops::sub(c, ops::upcast(*b.ref_chosen_logps));
  s.lr = o.reference_free ? r : ops::sub(r, ops::upcast(*b.ref_rejected_logps));
  const dtype d = ops::dtype_of(b.chosen_logps);
  std::tie(s.sc, s.dsc_dlc) = dpo_score(s.lc, o, d);
  std::tie(s.sr, s.dsr_dlr) = dpo_score(s.lr, o, d);
  if (b.chosen_weights) {
    s.has_wpo = true;
    s.wpo = ops::detach(ops::mul(ops::upcast(*b.chosen_weights), ops::upcast(*b.rejected_weights)));
  }
  return s;
}

template <tensor T>
preference_batch<T> upcast_batch(const preference_batch<T>& b) {
  preference_batch<T> u = b;
  u.chosen_logps = ops::upcast(b.chosen_logps);
  if (b.chosen_lengths) u.chosen_lengths = ops::upcast(*b.chosen_lengths);
  if (b.rejected_lengths) u.rejected_lengths = ops::upcast(*b.rejected_lengths);
  return u;
}

}  // namespace detail

/// The DPO-family loss and TRL's logged metrics. See the file comment for every formula.
template <tensor T>
dpo_result<T> dpo(const preference_batch<T>& batch, const dpo_options& opt = {}) {
  detail::check_dpo("dpo", batch, opt);
  const auto b = detail::upcast_batch(batch);
  const auto s = detail::dpo_prepare(batch, opt);
  const double n = static_cast<double>(ops::numel(s.lc));
  T per_pair = ops::full_like(s.lc, 0.0);
  for (const auto& term : detail::dpo_terms_of(opt)) {
    const auto p = detail::dpo_pair(term.loss, s.sc, s.sr, s.lc, s.lr, b, opt);
    per_pair = ops::add(per_pair, ops::mul(p.loss, term.weight));
  }
  if (s.has_wpo) per_pair = ops::mul(per_pair, s.wpo);
  dpo_result<T> r;
  r.per_pair_loss = per_pair;
  r.loss = ops::div(ops::sum_all(per_pair), n);
  const T rc = ops::detach(ops::mul(s.lc, opt.beta)), rr = ops::detach(ops::mul(s.lr, opt.beta));
  r.rewards_chosen = ops::div(ops::sum_all(rc), n);
  r.rewards_rejected = ops::div(ops::sum_all(rr), n);
  r.reward_accuracy = ops::div(ops::sum_all(ops::gt(rc, rr)), n);
  r.reward_margin = ops::div(ops::sum_all(ops::sub(rc, rr)), n);
  r.logps_chosen = ops::div(ops::sum_all(ops::detach(b.chosen_logps)), n);
  r.logps_rejected = ops::div(ops::sum_all(ops::detach(ops::upcast(batch.rejected_logps))), n);
  return r;
}

/// Analytic gradient of dpo(...).loss with respect to chosen_logps and rejected_logps, times grad_loss.
template <tensor T>
dpo_gradients<T> dpo_backward(const preference_batch<T>& batch, const dpo_options& opt = {}, double grad_loss = 1.0) {
  detail::check_dpo("dpo_backward", batch, opt);
  detail::require_finite("dpo_backward", "grad_loss", grad_loss);
  const auto b = detail::upcast_batch(batch);
  const auto s = detail::dpo_prepare(batch, opt);
  const double n = static_cast<double>(ops::numel(s.lc));
  T gc = ops::full_like(s.lc, 0.0), gr = ops::full_like(s.lc, 0.0);
  for (const auto& term : detail::dpo_terms_of(opt)) {
    const auto p = detail::dpo_pair(term.loss, s.sc, s.sr, s.lc, s.lr, b, opt);
    // chain rule through the scores: ∂L/∂l_c = ∂L/∂s_c · ds_c/dl_c + ∂L/∂l_c (direct). A term that does not
    // read a score (∂L/∂s = 0: sft reads no rejected side) contributes an exact 0, selected rather than
    // multiplied, so a slope that is NaN or inf at a log-prob the loss never reads cannot make the gradient NaN.
    const auto through = [](const T& upstream, const T& slope) {
      return ops::where(ops::eq(upstream, 0.0), 0.0, ops::mul(upstream, slope));
    };
    gc = ops::add(gc, ops::mul(ops::add(through(p.d_sc, s.dsc_dlc), p.d_lc), term.weight));
    gr = ops::add(gr, ops::mul(ops::add(through(p.d_sr, s.dsr_dlr), p.d_lr), term.weight));
  }
  if (s.has_wpo) {
    gc = ops::mul(gc, s.wpo);
    gr = ops::mul(gr, s.wpo);
  }
  const dtype d = ops::dtype_of(batch.chosen_logps);
  return {ops::to_dtype(ops::mul(gc, grad_loss / n), d), ops::to_dtype(ops::mul(gr, grad_loss / n), d)};
}

}  // namespace posttrain
