// posttrain/backends/torch.hpp — the LibTorch backend, as users include it: `torch::Tensor` on any
// device and dtype; autograd flows through every loss.
//
//   backends/torch/tensor.hpp         the traits (every concept operation is a LibTorch op)
//   backends/torch/fused.hpp          the fused hooks: one read of the logits per call, half logits
//                                     read as they are, analytic backward inside one autograd node
//   backends/torch/knobs.hpp          the logits paths (kernel, rows, chunked) and their chunk sizes
//   backends/torch/logits_engine.hpp  those paths over raw tensors; backends/torch/autograd.hpp the node
//   backends/torch/distill.hpp        the distillation kernel behind the kd hooks
//   backends/torch/index_ops.hpp      id-tensor structure for the batch helpers of posttrain/data/
//   backends/torch/eigen_convert.hpp  to_eigen / to_torch: LibTorch tensors to the Eigen reference and back
//   backends/torch/fused_linear_ce.hpp, backends/torch/fused_linear_logprobs.hpp
//                                     LM head + loss without [N, V] logits (need Eigen, which
//                                     CMake's posttrain::torch carries whenever Eigen is found;
//                                     included here when <Eigen/Core> is, as is eigen_convert.hpp)
#pragma once

#include "posttrain/backends/torch/fused.hpp"
#include "posttrain/backends/torch/index_ops.hpp"
#include "posttrain/backends/torch/tensor.hpp"

#if __has_include(<Eigen/Core>)
#include "posttrain/backends/torch/eigen_convert.hpp"
#include "posttrain/backends/torch/fused_linear_ce.hpp"
#include "posttrain/backends/torch/fused_linear_logprobs.hpp"
#endif
