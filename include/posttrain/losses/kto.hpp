// posttrain/losses/kto.hpp — unpaired preference losses: KTO (Ethayarajh et al. 2024,
// arXiv:2402.01306; TRL KTOTrainer) and unpaired BCO (Jung et al. 2024, arXiv:2404.04656; TRL BCOTrainer).
//
// Inputs [N], one row per (prompt, completion) example: logps, ref_logps (sums over completion
// tokens) and desirable (1 = a desirable/"chosen" example, 0 = undesirable). l = logps - ref_logps.
// KTO (eq. 8, as TRL):
//   z  = max(0, mean_m(kl_logps - ref_kl_logps)), detached: the KL baseline estimated from
//        mismatched (prompt, completion) pairs (TRL all-gathers it; pass the gathered tensors)
//   L_D = 1 - σ(β(l - z)),  L_U = 1 - σ(β(z - l))
//   loss = mean over all N of (λ_D L_D for desirable, λ_U L_U for undesirable)  (TRL nanmean(cat(...)))
// baseline = opposite_side (OpenRLHF VanillaKTOLoss, models/loss.py at 0489850, removed in 3c3be62; from HALOs'
// KTO for even sampling): two baselines from the batch itself, not detached, each side's loss using the other's:
//   z_D = max(0, mean_D l), z_U = max(0, mean_U l)   (means over desirable / undesirable examples; 0 when empty)
//   L_D = 1 - σ(β(l - z_U)),  L_U = 1 - σ(β(z_D - l)),  loss = mean over all N (OpenRLHF cat(...).mean())
//   so the gradient also reaches l through z_U (undesirable rows) and z_D (desirable rows), clamp passing at ≥ 0.
// apo_zero_unpaired (APO, TRL KTO loss_type): L_D = 1 - σ(βl), L_U = σ(βl), no KL baseline.
// Unpaired BCO (eq. 9):  r = βl, δ = running mean of the batch reward means (TRL RunningMoments),
//   L_D = -log σ(r - δ),  L_U = -log σ(-(r - δ)),  loss = mean over N.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

#include "posttrain/detail/validate.hpp"
#include "posttrain/losses/dpo.hpp"
#include "posttrain/numerics/stable.hpp"
#include "posttrain/tensor.hpp"

namespace posttrain {

template <tensor T>
struct unpaired_batch {
  T logps;                                       ///< [N] policy, summed over completion tokens
  T ref_logps;                                   ///< [N] reference
  T desirable;                                   ///< [N] 1 desirable, 0 undesirable
  std::optional<T> kl_logps = std::nullopt;      ///< [M] policy on mismatched pairs (KTO's KL baseline)
  std::optional<T> ref_kl_logps = std::nullopt;  ///< [M] reference on the same mismatched pairs
};

enum class kto_loss { kto, apo_zero_unpaired };
/// KTO's KL baseline: one detached z from mismatched pairs (TRL KTOTrainer, OpenRLHF KTOLoss), or the two
/// in-batch, differentiable side baselines of OpenRLHF VanillaKTOLoss (the undesirable side's in the desirable
/// loss and vice versa).
enum class kto_baseline { mismatched, opposite_side };

struct kto_options {
  double beta = 0.1;
  kto_loss loss = kto_loss::kto;
  double desirable_weight = 1.0;    ///< λ_D (TRL 1.0)
  double undesirable_weight = 1.0;  ///< λ_U (TRL 1.0)
  /// mismatched (TRL; z from batch.kl_logps, 0 without them) or opposite_side (OpenRLHF VanillaKTOLoss, which
  /// has no weights: keep λ_D = λ_U = 1 to match it; batch.kl_logps must be empty).
  kto_baseline baseline = kto_baseline::mismatched;

  /// OpenRLHF VanillaKTOLoss(beta) (0489850): opposite-side baselines, unit weights.
  static kto_options openrlhf_vanilla(double beta) {
    kto_options o{.beta = beta};
    o.baseline = kto_baseline::opposite_side;
    return o;
  }
};

template <tensor T>
struct unpaired_result {
  T loss;              ///< 0-d
  T per_example_loss;  ///< [N] (weighted)
  T kl;                ///< 0-d the KL baseline z (KTO; 0 when not estimated; opposite_side: z_D) or the shift δ (BCO)
  T rewards_chosen;    ///< 0-d mean β l over desirable examples (0 if none)
  T rewards_rejected;  ///< 0-d mean β l over undesirable examples (0 if none)
  T reward_margin;     ///< 0-d rewards_chosen - rewards_rejected
  T logps_chosen;      ///< 0-d mean logps over desirable examples
  T logps_rejected;    ///< 0-d mean logps over undesirable examples
  T reward_mean;       ///< 0-d mean β l over all examples (feeds BCO's running shift)
  T kl_rejected;       ///< 0-d KTO opposite_side: z_U, the undesirable side's baseline; otherwise = kl
};

namespace detail {
template <tensor T>
void check_unpaired(std::string_view fn, const unpaired_batch<T>& b, double beta) {
  require_finite(fn, "options.beta", beta);
  if (beta <= 0) fail(fn, "options.beta must be > 0, got ", beta);
  require_values(fn, "logps", b.logps);
  require_rank(fn, "logps", b.logps, 1, 1);
  require_like(fn, "logps", b.logps, "ref_logps", b.ref_logps);
  require_like(fn, "logps", b.logps, "desirable", b.desirable);
  if (b.kl_logps.has_value() != b.ref_kl_logps.has_value())
    fail(fn, "kl_logps and ref_kl_logps must be given together");
  if (b.kl_logps) {
    require_values(fn, "kl_logps", *b.kl_logps);
    require_like(fn, "kl_logps", *b.kl_logps, "ref_kl_logps", *b.ref_kl_logps);
    require_same_device(fn, "logps", b.logps, "kl_logps", *b.kl_logps);
  }
}

template <tensor T>
void check_kto(std::string_view fn, const unpaired_batch<T>& b, const kto_options& o) {
  check_unpaired(fn, b, o.beta);
  for (auto [name, v] : {std::pair{"options.desirable_weight", o.desirable_weight},
                         std::pair{"options.undesirable_weight", o.undesirable_weight}}) {
    require_finite(fn, name, v);
    if (v < 0) fail(fn, name, " must be >= 0, got ", v);
  }
  if (o.baseline != kto_baseline::mismatched && o.baseline != kto_baseline::opposite_side)
    fail(fn, "options.baseline must be kto_baseline::mismatched or opposite_side, got ", static_cast<int>(o.baseline));
  if (o.baseline == kto_baseline::opposite_side) {
    if (o.loss != kto_loss::kto) fail(fn, "options.baseline = opposite_side needs options.loss = kto_loss::kto");
    if (b.kl_logps)
      fail(fn, "kl_logps must be empty when options.baseline = opposite_side (the baselines come from logps itself)");
  }
}

/// Mean of x over the examples where m is set (0 when none), 0-d.
template <tensor T>
T mean_where(const T& x, const T& m) {
  return ops::div(ops::sum_all(ops::where(m, x, 0.0)), ops::maximum(ops::sum_all(m), 1.0));
}

/// The KL baseline z = max(0, mean(kl_logps - ref_kl_logps)), detached (0 without inputs).
template <tensor T>
T kto_baseline(const unpaired_batch<T>& b, const T& like) {
  if (!b.kl_logps) return ops::scalar_like(like, 0.0);
  const T d = ops::sub(ops::upcast(*b.kl_logps), ops::upcast(*b.ref_kl_logps));
  return ops::detach(ops::maximum(ops::div(ops::sum_all(d), static_cast<double>(ops::numel(d))), 0.0));
}

template <tensor T>
void unpaired_metrics(unpaired_result<T>& r, const T& l, const T& logps, const T& d, double beta) {
  const double n = static_cast<double>(ops::numel(l));
  const T u = ops::sub(1.0, d);
  const T rew = ops::detach(ops::mul(l, beta)), lp = ops::detach(logps);
  // selected, not multiplied: a -inf log-probability on one side is not 0·inf = NaN on the other
  const auto mean_over = [](const T& x, const T& m) { return mean_where(x, m); };
  r.rewards_chosen = mean_over(rew, d);
  r.rewards_rejected = mean_over(rew, u);
  r.reward_margin = ops::sub(r.rewards_chosen, r.rewards_rejected);
  r.logps_chosen = mean_over(lp, d);
  r.logps_rejected = mean_over(lp, u);
  r.reward_mean = ops::div(ops::sum_all(rew), n);
}
}  // namespace detail

/// KTO (or apo_zero_unpaired) loss and TRL's metrics. See the file comment.
template <tensor T>
unpaired_result<T> kto(const unpaired_batch<T>& batch, const kto_options& opt = {}) {
  detail::check_kto("kto", batch, opt);
  const T lp = ops::upcast(batch.logps);
  const T l = ops::sub(lp, ops::upcast(batch.ref_logps));
  const T d = ops::ne(ops::upcast(batch.desirable), 0.0);
  const double n = static_cast<double>(ops::numel(l));
  unpaired_result<T> r;
  T ld, lu;
  if (opt.loss == kto_loss::kto && opt.baseline == kto_baseline::opposite_side) {
    // OpenRLHF VanillaKTOLoss: z_D, z_U from this batch, with their gradient
    const T zd = ops::maximum(detail::mean_where(l, d), 0.0),
            zu = ops::maximum(detail::mean_where(l, ops::sub(1.0, d)), 0.0);
    ld = ops::sub(1.0, sigmoid(ops::mul(ops::sub(l, zu), opt.beta)));  // 1 - σ(β(l - z_U))
    lu = ops::sub(1.0, sigmoid(ops::mul(ops::sub(zd, l), opt.beta)));  // 1 - σ(β(z_D - l))
    r.kl = ops::detach(zd);
    r.kl_rejected = ops::detach(zu);
  } else if (opt.loss == kto_loss::kto) {
    r.kl = detail::kto_baseline(batch, l);
    ld = ops::sub(1.0, sigmoid(ops::mul(ops::sub(l, r.kl), opt.beta)));  // 1 - σ(β(l - z))
    lu = ops::sub(1.0, sigmoid(ops::mul(ops::sub(r.kl, l), opt.beta)));  // 1 - σ(β(z - l))
  } else {
    r.kl = ops::scalar_like(l, 0.0);
    ld = ops::sub(1.0, sigmoid(ops::mul(l, opt.beta)));  // 1 - σ(βl)
    lu = sigmoid(ops::mul(l, opt.beta));                 // σ(βl)
  }
  if (opt.baseline != kto_baseline::opposite_side) r.kl_rejected = r.kl;
  r.per_example_loss = ops::where(d, ops::mul(ld, opt.desirable_weight), ops::mul(lu, opt.undesirable_weight));
  r.loss = ops::div(ops::sum_all(r.per_example_loss), n);
  detail::unpaired_metrics(r, l, lp, d, opt.beta);
  return r;
}

/// Gradient of kto(...).loss with respect to logps [N] (z is a constant, as in TRL).
template <tensor T>
T kto_backward(const unpaired_batch<T>& batch, const kto_options& opt = {}, double grad_loss = 1.0) {
  detail::check_kto("kto_backward", batch, opt);
  detail::require_finite("kto_backward", "grad_loss", grad_loss);
  const T l = ops::sub(ops::upcast(batch.logps), ops::upcast(batch.ref_logps));
  const T d = ops::ne(ops::upcast(batch.desirable), 0.0);
  const double n = static_cast<double>(ops::numel(l));
  if (opt.baseline == kto_baseline::opposite_side) {
    // own terms: -βλ_D σ'(β(l - z_U)) desirable, +βλ_U σ'(β(z_D - l)) undesirable; through the baselines
    // (∂z/∂l_j = [mean ≥ 0]/n_side on that side): undesirable rows get Σ_D βλ_D σ'_i · [mean_U ≥ 0]/n_U,
    // desirable rows get -Σ_U βλ_U σ'_k · [mean_D ≥ 0]/n_D
    const T u = ops::sub(1.0, d);
    const T md = detail::mean_where(l, d), mu = detail::mean_where(l, u);
    const T zd = ops::maximum(md, 0.0), zu = ops::maximum(mu, 0.0);
    const T sd = ops::where(d, detail::sigmoid_slope(ops::mul(ops::sub(l, zu), opt.beta)), 0.0);  // [N]
    const T su = ops::where(u, detail::sigmoid_slope(ops::mul(ops::sub(zd, l), opt.beta)), 0.0);  // [N]
    const T nd = ops::maximum(ops::sum_all(d), 1.0), nu = ops::maximum(ops::sum_all(u), 1.0);
    const T to_u =
        ops::div(ops::mul(ops::mul(ops::sum_all(sd), opt.beta * opt.desirable_weight), ops::ge(mu, 0.0)), nu);
    const T to_d =
        ops::div(ops::mul(ops::mul(ops::sum_all(su), -opt.beta * opt.undesirable_weight), ops::ge(md, 0.0)), nd);
    const T own =
        ops::add(ops::mul(sd, -opt.beta * opt.desirable_weight), ops::mul(su, opt.beta * opt.undesirable_weight));
    const T cross = ops::where(d, ops::mul(to_d, ops::full_like(l, 1.0)), ops::mul(to_u, ops::full_like(l, 1.0)));
    return ops::to_dtype(ops::mul(ops::add(own, cross), grad_loss / n), ops::dtype_of(batch.logps));
  }
  const T z = opt.loss == kto_loss::kto ? detail::kto_baseline(batch, l) : ops::scalar_like(l, 0.0);
  // both forms: ∂L_D/∂l = -β σ'(β(l - z)), ∂L_U/∂l = +β σ'(β(l - z)) (σ' is even)
  const T s = detail::sigmoid_slope(ops::mul(ops::sub(l, z), opt.beta));
  const T g =
      ops::where(d, ops::mul(s, -opt.beta * opt.desirable_weight), ops::mul(s, opt.beta * opt.undesirable_weight));
  return ops::to_dtype(ops::mul(g, grad_loss / n), ops::dtype_of(batch.logps));
}

/// TRL's RunningMoments for BCO's reward shift δ: the running mean of the per-batch reward means.
struct bco_running_mean {
  double mean = 0.0;
  double count = 1e-24;  // TRL starts the count at 1e-24, so the first update sets mean = the batch mean
  /// Folds in one batch's mean reward (unpaired_result::reward_mean) and returns the new δ.
  double update(double batch_mean) {
    detail::require_finite("bco_running_mean::update", "batch_mean", batch_mean);
    const double total = count + 1.0;
    mean += (batch_mean - mean) / total;
    count = total;
    return mean;
  }
};

struct bco_options {
  double beta = 0.1;
  /// δ, the reward shift (bco_running_mean::mean after folding in this batch, as TRL).
  double delta = 0.0;
};

/// Unpaired BCO loss: mean over examples of -log σ(±(βl - δ)). See the file comment.
template <tensor T>
unpaired_result<T> bco(const unpaired_batch<T>& batch, const bco_options& opt = {}) {
  detail::check_unpaired("bco", batch, opt.beta);
  detail::require_finite("bco", "options.delta", opt.delta);
  const T lp = ops::upcast(batch.logps);
  const T l = ops::sub(lp, ops::upcast(batch.ref_logps));
  const T d = ops::ne(ops::upcast(batch.desirable), 0.0);
  const T shifted = ops::sub(ops::mul(l, opt.beta), opt.delta);  // r - δ
  unpaired_result<T> r;
  r.kl = ops::scalar_like(l, opt.delta);
  r.kl_rejected = r.kl;
  r.per_example_loss = ops::neg(ops::where(d, log_sigmoid(shifted), log_sigmoid(ops::neg(shifted))));
  r.loss = ops::div(ops::sum_all(r.per_example_loss), static_cast<double>(ops::numel(l)));
  detail::unpaired_metrics(r, l, lp, d, opt.beta);
  return r;
}

/// Gradient of bco(...).loss with respect to logps [N]: -β σ(-(r-δ)) desirable, β σ(r-δ) undesirable.
template <tensor T>
T bco_backward(const unpaired_batch<T>& batch, const bco_options& opt = {}, double grad_loss = 1.0) {
  detail::check_unpaired("bco_backward", batch, opt.beta);
  detail::require_finite("bco_backward", "options.delta", opt.delta);
  detail::require_finite("bco_backward", "grad_loss", grad_loss);
  const T l = ops::sub(ops::upcast(batch.logps), ops::upcast(batch.ref_logps));
  const T d = ops::ne(ops::upcast(batch.desirable), 0.0);
  const T shifted = ops::sub(ops::mul(l, opt.beta), opt.delta);
  const T g = ops::where(d, ops::mul(sigmoid(ops::neg(shifted)), -opt.beta), ops::mul(sigmoid(shifted), opt.beta));
  return ops::to_dtype(ops::mul(g, grad_loss / static_cast<double>(ops::numel(l))), ops::dtype_of(batch.logps));
}

}  // namespace posttrain
