// posttrain/kl/controller.hpp — the KL coefficient β as a small value type with update(current_kl, n_steps).
//
// fixed_kl_controller: β never changes (TRL PPO, verl kl_ctrl.type "fixed").
// adaptive_kl_controller (Ziegler et al. 2019, "Fine-tuning language models from human preferences",
// §2.2; verl AdaptiveKLController, OpenRLHF, legacy TRL):
//   e = clip(KL / KL_target - 1, -0.2, 0.2),   β ← β · (1 + e · n_steps / horizon)
// n_steps is the number of samples in the batch that produced KL (verl passes the batch size).
// β is clamped at 0: with KL below target and n_steps > 5·horizon the factor 1 + e·n/horizon is
// negative, and TRL's (and verl's) formula then makes β negative, which would reward divergence from
// the reference. posttrain keeps β = max(0, β·factor); a β of 0 stays 0 (the update is multiplicative).
// Example: β = 0.1, target 1, KL = 2, n = 1000, horizon 10000 -> e = 0.2, β = 0.1 · 1.02 = 0.102.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string_view>

#include "posttrain/error.hpp"

namespace posttrain {

struct fixed_kl_controller {
  /// β (verl kl_ctrl.kl_coef 0.001).
  double value = 0.001;
  void update(double current_kl, std::int64_t n_steps) {
    detail::require_finite("fixed_kl_controller::update", "current_kl", current_kl);
    if (n_steps < 0) detail::fail("fixed_kl_controller::update", "n_steps must be >= 0, got ", n_steps);
  }
};

struct adaptive_kl_controller {
  /// β's initial value (verl 0.001; legacy TRL init_kl_coef 0.2).
  double value = 0.001;
  /// KL_target (verl target_kl 0.1; legacy TRL target 6).
  double target = 0.1;
  /// horizon (verl 10000; legacy TRL 10000).
  double horizon = 10000;

  void update(double current_kl, std::int64_t n_steps) {
    constexpr std::string_view fn = "adaptive_kl_controller::update";
    detail::require_finite(fn, "current_kl", current_kl);
    detail::require_finite(fn, "target", target);
    detail::require_finite(fn, "horizon", horizon);
    if (target <= 0) detail::fail(fn, "target must be > 0, got ", target);
    if (horizon <= 0) detail::fail(fn, "horizon must be > 0, got ", horizon);
    if (n_steps < 0) detail::fail(fn, "n_steps must be >= 0, got ", n_steps);
    // e = clip(KL/target - 1, ±0.2); β *= 1 + e·n/horizon   (Ziegler et al. 2019 §2.2)
    const double e = std::clamp(current_kl / target - 1.0, -0.2, 0.2);
    value = std::max(0.0, value * (1.0 + e * static_cast<double>(n_steps) / horizon));  // clamped at 0
  }
};

}  // namespace posttrain
