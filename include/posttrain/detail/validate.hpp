// posttrain/detail/validate.hpp — input checks shared by every public entry point.
//
// Each check throws posttrain::error naming the function, the argument, and the shapes/values.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "posttrain/error.hpp"
#include "posttrain/label_checks.hpp"
#include "posttrain/tensor.hpp"

namespace posttrain::detail {

/// A tensor with data: not undefined (LibTorch's default-constructed at::Tensor) and not on LibTorch's meta
/// device (shapes only), where reading a value would raise a foreign exception.
inline void require_data(std::string_view fn, std::string_view name, dtype d, const std::string& device) {
  if (d == dtype::undefined) fail(fn, name, " is an undefined tensor (default-constructed, no data)");
  if (device == "meta") fail(fn, name, " is on the meta device (a shape without data); pass a CPU or CUDA tensor");
}

template <tensor T>
void require_floating(std::string_view fn, std::string_view name, const T& x) {
  const dtype d = ops::dtype_of(x);
  require_data(fn, name, d, ops::device(x));
  if (!is_floating(d)) fail(fn, name, " must be a floating-point tensor, got dtype ", dtype_name(d));
}

/// An index tensor (labels, group ids) with data and an integer dtype (any width: uint8 to int64).
template <tensor T>
void require_index(std::string_view fn, std::string_view name, const index_tensor_t<T>& i) {
  using tr = tensor_traits<T>;
  const dtype d = tr::index_dtype(i);
  require_data(fn, name, d, tr::index_device(i));
  if (!is_integer(d))
    fail(fn, name, " must have an integer dtype (int64, int32, int16, int8 or uint8), got ", dtype_name(d));
}

template <tensor T>
void require_nonempty(std::string_view fn, std::string_view name, const T& x) {
  if (ops::numel(x) == 0) fail(fn, name, " is empty (shape ", shape_string(ops::shape(x)), ")");
}

template <tensor T>
void require_rank(std::string_view fn, std::string_view name, const T& x, std::int64_t lo, std::int64_t hi) {
  const auto r = ops::rank(x);
  if (r < lo || r > hi) {
    if (lo == hi) fail(fn, name, " must have rank ", lo, ", got shape ", shape_string(ops::shape(x)));
    fail(fn, name, " must have rank ", lo, " to ", hi, ", got shape ", shape_string(ops::shape(x)));
  }
}

/// A floating, non-empty tensor: the usual requirement on a value input.
template <tensor T>
void require_values(std::string_view fn, std::string_view name, const T& x) {
  require_floating(fn, name, x);
  require_nonempty(fn, name, x);
}

template <tensor T>
void require_same_shape(std::string_view fn, std::string_view a_name, const T& a, std::string_view b_name, const T& b) {
  if (ops::shape(a) != ops::shape(b))
    fail(fn, b_name, " has shape ", shape_string(ops::shape(b)), " but ", a_name, " has shape ",
         shape_string(ops::shape(a)), "; they must match");
}

template <tensor T>
void require_same_device(std::string_view fn, std::string_view a_name, const T& a, std::string_view b_name,
                         const T& b) {
  if (ops::device(a) != ops::device(b))
    fail(fn, b_name, " is on device ", ops::device(b), " but ", a_name, " is on ", ops::device(a));
}

template <tensor T>
void require_same_dtype(std::string_view fn, std::string_view a_name, const T& a, std::string_view b_name, const T& b) {
  if (ops::dtype_of(a) != ops::dtype_of(b))
    fail(fn, b_name, " has dtype ", dtype_name(ops::dtype_of(b)), " but ", a_name, " has dtype ",
         dtype_name(ops::dtype_of(a)), "; they must match");
}

/// A second value tensor paired with the first: same shape, dtype and device.
template <tensor T>
void require_like(std::string_view fn, std::string_view a_name, const T& a, std::string_view b_name, const T& b) {
  require_floating(fn, b_name, b);
  require_same_device(fn, a_name, a, b_name, b);
  require_same_dtype(fn, a_name, a, b_name, b);
  require_same_shape(fn, a_name, a, b_name, b);
}

/// A mask paired with `values`: same shape and device; floating (0/1) or bool dtype. Returns it
/// in values' compute dtype.
template <tensor T>
T checked_mask(std::string_view fn, std::string_view values_name, const T& values, std::string_view mask_name,
               const T& mask) {
  const dtype d = ops::dtype_of(mask);
  require_data(fn, mask_name, d, ops::device(mask));
  if (!is_floating(d) && d != dtype::boolean && !is_integer(d))
    fail(fn, mask_name, " must be a 0/1 mask of a floating, integer or bool dtype, got ", dtype_name(d));
  require_same_device(fn, values_name, values, mask_name, mask);
  require_same_shape(fn, values_name, values, mask_name, mask);
  const dtype want = ops::dtype_of(values);
  return d == want ? mask : ops::to_dtype(mask, want);
}

/// labels[...] for logits[..., V]: integer dtype, same device, shape = logits' without the last
/// dimension, every value in [0, V) or equal to ignore_index (values read as label_checks.hpp says).
template <tensor T>
void require_labels(std::string_view fn, const T& logits, const index_tensor_t<T>& labels, std::int64_t ignore_index,
                    std::string_view logits_name = "logits", std::string_view labels_name = "labels") {
  using tr = tensor_traits<T>;
  require_index<T>(fn, labels_name, labels);
  if (tr::index_device(labels) != ops::device(logits))
    fail(fn, labels_name, " is on device ", tr::index_device(labels), " but ", logits_name, " is on ",
         ops::device(logits));
  shape_t expected = ops::shape(logits);
  expected.pop_back();
  if (tr::index_shape(labels) != expected)
    fail(fn, labels_name, " has shape ", shape_string(tr::index_shape(labels)), " but ", logits_name, " has shape ",
         shape_string(ops::shape(logits)), "; expected ", labels_name, " of shape ", shape_string(expected));
  const std::int64_t vocab = ops::shape(logits).back();
  if (!read_label_values(tr::index_device(labels))) return;  // label_checks.hpp: no host transfer
  const std::int64_t bad = tr::index_count_outside(labels, 0, vocab, ignore_index);
  if (bad > 0)
    fail(fn, labels_name, " has ", bad, " value(s) outside [0, ", vocab, ") that are not ignore_index (", ignore_index,
         ")");
}

/// grad[...] for logits[..., V] (a backward's upstream gradient): floating, same device, one value per
/// row, i.e. logits' shape without the last dimension (any other shape would broadcast silently).
template <tensor T>
void require_row_grad(std::string_view fn, const T& logits, const T& grad, std::string_view grad_name = "grad",
                      std::string_view logits_name = "logits") {
  require_floating(fn, grad_name, grad);
  require_same_device(fn, logits_name, logits, grad_name, grad);
  shape_t expected = ops::shape(logits);
  if (!expected.empty()) expected.pop_back();
  if (ops::shape(grad) != expected)
    fail(fn, grad_name, " has shape ", shape_string(ops::shape(grad)), " but ", logits_name, " has shape ",
         shape_string(ops::shape(logits)), "; expected ", grad_name, " of shape ", shape_string(expected));
}

/// logits[..., V]: floating, rank >= 1, V >= 1, non-empty.
template <tensor T>
void require_logits(std::string_view fn, std::string_view name, const T& logits) {
  require_floating(fn, name, logits);
  if (ops::rank(logits) < 1) fail(fn, name, " must have rank >= 1 ([..., V]), got a 0-d tensor");
  require_nonempty(fn, name, logits);
}

}  // namespace posttrain::detail
