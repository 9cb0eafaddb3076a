// posttrain/detail/kd_fused.hpp — what a backend's fused distillation override is asked to compute.
//
// losses/distill.hpp hands this to tensor_traits<T>::fused_kd_per_token / fused_kd_backward when a
// backend has them (the Eigen backend, through kernels/distill_cpu.hpp). It has no dependency, so
// distill.hpp and the kernels can both include it.
#pragma once

namespace posttrain {

/// The per-token divergences the fused path covers (JSD with 0 < β < 1 stays on the generic path:
/// its log-mixture log(β p + (1-β) q) needs p and q normalised, i.e. a second read of both rows).
enum class fused_kd_kind {
  forward_kl,             ///< KL(p_teacher || q_student)
  forward_cross_entropy,  ///< -Σ p log q
  reverse_kl,             ///< KL(q || p)
  symmetric_kl,           ///< r·KL(p || q) + (1 - r)·KL(q || p)
};

/// Divergence, symmetric ratio r, temperature τ (both logits divided by τ) and a factor on the
/// result (τ² or 1). The backward is d(scale·D)/d student_logits = scale/τ · dD/ds.
struct fused_kd_spec {
  fused_kd_kind kind = fused_kd_kind::forward_kl;
  double symmetric_ratio = 0.5;
  double temperature = 1.0;
  double scale = 1.0;
};

}  // namespace posttrain
