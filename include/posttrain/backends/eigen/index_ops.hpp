// posttrain/backends/eigen/index_ops.hpp — index_ops<eigen_index> (data/index_ops.hpp): the batch
// helpers' structural operations on the Eigen backend's int64 id tensors (row-major copies).
#pragma once

#include <cstdint>
#include <vector>

#include "posttrain/backends/eigen/tensor.hpp"
#include "posttrain/data/index_ops.hpp"

namespace posttrain {

template <>
struct index_ops<eigen_index> {
  static shape_t shape(const eigen_index& i) { return i.shape(); }

  static eigen_index slice(const eigen_index& i, std::int64_t dim, std::int64_t start, std::int64_t length) {
    const auto [outer, n, inner] = split(i.shape(), dim);
    if (start < 0 || length < 0 || start + length > n)
      detail::fail("index_ops<eigen_index>::slice", "range [", start, ", ", start + length, ") outside dimension ", dim,
                   " of size ", n);
    shape_t s = i.shape();
    s[static_cast<std::size_t>(dim)] = length;
    eigen_index out(s);
    for (std::int64_t o = 0; o < outer; ++o)
      for (std::int64_t k = 0; k < length * inner; ++k)
        out.values()(o * length * inner + k) = i.values()((o * n + start) * inner + k);
    return out;
  }

  static eigen_index concat(const std::vector<eigen_index>& parts, std::int64_t dim) {
    if (parts.empty()) detail::fail("index_ops<eigen_index>::concat", "no parts");
    shape_t s = parts.front().shape();
    std::int64_t total = 0;
    for (const auto& p : parts) {
      shape_t a = p.shape(), b = s;
      if (a.size() != b.size()) detail::fail("index_ops<eigen_index>::concat", "parts differ in rank");
      a[static_cast<std::size_t>(dim)] = b[static_cast<std::size_t>(dim)] = 0;
      if (a != b)
        detail::fail("index_ops<eigen_index>::concat", "parts ", detail::shape_string(p.shape()), " and ",
                     detail::shape_string(s), " differ outside dimension ", dim);
      total += p.shape()[static_cast<std::size_t>(dim)];
    }
    s[static_cast<std::size_t>(dim)] = total;
    eigen_index out(s);
    const auto [outer, n_out, inner] = split(s, dim);
    std::int64_t at = 0;
    for (const auto& p : parts) {
      const std::int64_t n = p.shape()[static_cast<std::size_t>(dim)];
      for (std::int64_t o = 0; o < outer; ++o)
        for (std::int64_t k = 0; k < n * inner; ++k)
          out.values()((o * n_out + at) * inner + k) = p.values()(o * n * inner + k);
      at += n;
    }
    return out;
  }

  static eigen_index full(const eigen_index&, const shape_t& s, std::int64_t value) { return eigen_index(s, value); }

 private:
  struct extents {
    std::int64_t outer, n, inner;
  };
  static extents split(const shape_t& s, std::int64_t dim) {
    if (dim < 0 || dim >= static_cast<std::int64_t>(s.size()))
      detail::fail("index_ops<eigen_index>", "dimension ", dim, " outside a tensor of shape ", detail::shape_string(s));
    extents e{1, s[static_cast<std::size_t>(dim)], 1};
    for (std::int64_t d = 0; d < dim; ++d) e.outer *= s[static_cast<std::size_t>(d)];
    for (std::size_t d = static_cast<std::size_t>(dim) + 1; d < s.size(); ++d) e.inner *= s[d];
    return e;
  }
};

}  // namespace posttrain
