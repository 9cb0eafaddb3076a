// posttrain/backends/linear_kernel_options.hpp — the fused linear losses' options as the CPU
// kernels take them (shared by the Eigen and LibTorch backends' fused linear entry points).
#pragma once

#include "posttrain/kernels/linear_ce_cpu.hpp"
#include "posttrain/kernels/linear_logprobs_cpu.hpp"
#include "posttrain/losses/fused_linear_ce.hpp"
#include "posttrain/losses/fused_linear_logprobs.hpp"

namespace posttrain::detail {

inline kernels::linear_ce_options kernel_options(const fused_linear_ce_options& o) {
  return {o.ignore_index, o.label_smoothing, o.z_loss, o.chunk_rows.value_or(0), o.temperature};
}

inline kernels::linear_logprobs_options kernel_options(const fused_linear_logprobs_options& o) {
  return {o.ignore_index, o.temperature, o.chunk_rows.value_or(0)};
}

}  // namespace posttrain::detail
