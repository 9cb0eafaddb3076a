// tests/support/recording.hpp — a recording backend (stdexec's recording fakes): recording_traits<W>
// forwards each of the tensor concept's operations to the Eigen double backend for a wrapper W
// { eigen_tensor<double> value; } and counts the calls by name, so a test can show which operations
// (and how many host transfers, `to_host`) an algorithm asked for. A test specialises
// posttrain::tensor_traits<W> as recording_traits<W> (tests/eigen/test_archetype.cpp, test_metrics_map.cpp).
#pragma once

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "posttrain/backends/eigen.hpp"

namespace recording {

/// How many times each traits operation was called since the last reset().
inline std::map<std::string, int>& calls() {
  static std::map<std::string, int> log;
  return log;
}
inline void reset() { calls().clear(); }
inline int count(const std::string& name) {
  const auto it = calls().find(name);
  return it == calls().end() ? 0 : it->second;
}
inline int count_prefix(const std::string& prefix) {
  int n = 0;
  for (const auto& [name, k] : calls())
    if (name.rfind(prefix, 0) == 0) n += k;
  return n;
}

}  // namespace recording

namespace posttrain {

/// Forwards each of the concept's operations to the Eigen double backend, recording its name.
template <class W>
struct recording_traits {
  using E = eigen_tensor<double>;
  using base = tensor_traits<E>;
  using index_tensor = eigen_index;

  static void note(const char* name) { ++recording::calls()[name]; }
  static W wrap(E e) { return W{std::move(e)}; }

  static shape_t shape(const W& x) { return note("shape"), base::shape(x.value); }
  static dtype dtype_of(const W& x) { return note("dtype_of"), base::dtype_of(x.value); }
  static std::string device(const W& x) { return note("device"), base::device(x.value); }
  static shape_t index_shape(const index_tensor& i) { return note("index_shape"), base::index_shape(i); }
  static dtype index_dtype(const index_tensor& i) { return note("index_dtype"), base::index_dtype(i); }
  static std::string index_device(const index_tensor& i) { return note("index_device"), base::index_device(i); }
  static W full(const W& like, const shape_t& s, double v) { return note("full"), wrap(base::full(like.value, s, v)); }
  static W one_hot(const index_tensor& i, std::int64_t n, const W& like) {
    return note("one_hot"), wrap(base::one_hot(i, n, like.value));
  }
  static W unary(unary_op op, const W& x) { return note("unary"), wrap(base::unary(op, x.value)); }
  static W binary(binary_op op, const W& a, const W& b) {
    return note("binary"), wrap(base::binary(op, a.value, b.value));
  }
  static W compare(compare_op op, const W& a, const W& b) {
    return note("compare"), wrap(base::compare(op, a.value, b.value));
  }
  static W where(const W& c, const W& a, const W& b) {
    return note("where"), wrap(base::where(c.value, a.value, b.value));
  }
  static W clamp(const W& x, double lo, double hi) { return note("clamp"), wrap(base::clamp(x.value, lo, hi)); }
  static W reduce(reduce_op op, const W& x, std::int64_t dim, bool keep) {
    return note("reduce"), wrap(base::reduce(op, x.value, dim, keep));
  }
  static index_tensor argmax_last(const W& x) { return note("argmax_last"), base::argmax_last(x.value); }
  static W gather_last(const W& x, const index_tensor& i) {
    return note("gather_last"), wrap(base::gather_last(x.value, i));
  }
  static W reshape(const W& x, const shape_t& s) { return note("reshape"), wrap(base::reshape(x.value, s)); }
  static W detach(const W& x) { return note("detach"), wrap(base::detach(x.value)); }
  static W to_dtype(const W& x, dtype d) { return note("to_dtype"), wrap(base::to_dtype(x.value, d)); }
  static std::vector<double> to_host(const W& x) { return note("to_host"), base::to_host(x.value); }
  static W index_not_equal(const index_tensor& i, std::int64_t v, const W& like) {
    return note("index_not_equal"), wrap(base::index_not_equal(i, v, like.value));
  }
  static W index_equal(const index_tensor& a, const index_tensor& b, const W& like) {
    return note("index_equal"), wrap(base::index_equal(a, b, like.value));
  }
  static index_tensor index_replace(const index_tensor& i, std::int64_t from, std::int64_t to) {
    return note("index_replace"), base::index_replace(i, from, to);
  }
  static std::int64_t index_count_outside(const index_tensor& i, std::int64_t lo, std::int64_t hi, std::int64_t ex) {
    return note("index_count_outside"), base::index_count_outside(i, lo, hi, ex);
  }
  static std::vector<std::int64_t> index_to_host(const index_tensor& i) {
    return note("index_to_host"), base::index_to_host(i);
  }
  static index_tensor argsort_last(const W& x) { return note("argsort_last"), base::argsort_last(x.value); }
  static W slice(const W& x, std::int64_t dim, std::int64_t start, std::int64_t length) {
    return note("slice"), wrap(base::slice(x.value, dim, start, length));
  }
  static W concat(const std::vector<W>& parts, std::int64_t dim) {
    std::vector<E> values;
    for (const auto& p : parts) values.push_back(p.value);
    return note("concat"), wrap(base::concat(values, dim));
  }
  static W cumsum(const W& x, std::int64_t dim) { return note("cumsum"), wrap(base::cumsum(x.value, dim)); }
};

}  // namespace posttrain
