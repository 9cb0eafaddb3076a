// posttrain/backends/torch/index_ops.hpp — index_ops<at::Tensor> (data/index_ops.hpp): the batch
// helpers' structural operations on LibTorch id tensors, each one LibTorch op on the tensor's device.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "posttrain/data/index_ops.hpp"

namespace posttrain {

template <>
struct index_ops<at::Tensor> {
  static shape_t shape(const at::Tensor& i) { return shape_t(i.sizes().begin(), i.sizes().end()); }
  static at::Tensor slice(const at::Tensor& i, std::int64_t dim, std::int64_t start, std::int64_t length) {
    return i.narrow(dim, start, length);
  }
  static at::Tensor concat(const std::vector<at::Tensor>& parts, std::int64_t dim) { return at::cat(parts, dim); }
  static at::Tensor full(const at::Tensor& like, const shape_t& s, std::int64_t value) {
    return at::full(s, value, like.options().requires_grad(false));
  }
};

}  // namespace posttrain
