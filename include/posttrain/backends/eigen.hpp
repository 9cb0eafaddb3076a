// posttrain/backends/eigen.hpp — the Eigen CPU backend, as users include it.
//
//   backends/eigen/tensor.hpp                 eigen_tensor<float|double> and its plain reference traits
//   backends/eigen/fused.hpp                  the fused hooks over the one-pass CPU kernels
//   backends/eigen/fused_linear_ce.hpp        fused_linear_cross_entropy(_and_grad) without [N, V] logits
//   backends/eigen/fused_linear_logprobs.hpp  fused_linear_logprobs(_backward)
//   backends/eigen/index_ops.hpp              id-tensor structure for the batch helpers of posttrain/data/
// A test that wants the plain reference alone includes backends/eigen/tensor.hpp only (in a
// program of its own: the fused hooks are part of a type's definition, one per program).
#pragma once

#include "posttrain/backends/eigen/fused.hpp"
#include "posttrain/backends/eigen/fused_linear_ce.hpp"
#include "posttrain/backends/eigen/fused_linear_logprobs.hpp"
#include "posttrain/backends/eigen/index_ops.hpp"
#include "posttrain/backends/eigen/tensor.hpp"
