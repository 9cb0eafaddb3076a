// tests/support/data.hpp — building the same inputs on every backend from host data in double.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/tensor.hpp"

namespace posttrain::test {

/// A host-side tensor in double: the single source every backend's inputs are made from.
struct host_tensor {
  shape_t shape;
  std::vector<double> values;
};

struct host_labels {
  shape_t shape;
  std::vector<std::int64_t> values;
};

inline std::int64_t count(const shape_t& s) {
  std::int64_t n = 1;
  for (auto d : s) n *= d;
  return n;
}

/// Normal(mean, stddev) values, deterministic per seed.
inline host_tensor random_normal(const shape_t& s, std::uint64_t seed, double stddev = 1.0, double mean = 0.0) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> dist(mean, stddev);
  host_tensor t{s, std::vector<double>(static_cast<std::size_t>(count(s)))};
  for (auto& v : t.values) v = dist(gen);
  return t;
}

/// Labels uniform in [0, vocab), with probability `ignore_fraction` set to ignore_index.
inline host_labels random_labels(const shape_t& s, std::int64_t vocab, std::uint64_t seed, double ignore_fraction = 0.0,
                                 std::int64_t ignore_index = -100) {
  std::mt19937_64 gen(seed);
  std::uniform_int_distribution<std::int64_t> label(0, vocab - 1);
  std::bernoulli_distribution ignore(ignore_fraction);
  host_labels l{s, std::vector<std::int64_t>(static_cast<std::size_t>(count(s)))};
  for (auto& v : l.values) v = ignore(gen) ? ignore_index : label(gen);
  return l;
}

/// A 0/1 mask with probability `keep` of 1, deterministic per seed.
inline host_tensor random_mask(const shape_t& s, std::uint64_t seed, double keep = 0.7) {
  std::mt19937_64 gen(seed);
  std::bernoulli_distribution b(keep);
  host_tensor t{s, std::vector<double>(static_cast<std::size_t>(count(s)))};
  for (auto& v : t.values) v = b(gen) ? 1.0 : 0.0;
  return t;
}

template <class S>
eigen_tensor<S> to_eigen(const host_tensor& h) {
  eigen_tensor<S> t(h.shape);
  for (std::size_t i = 0; i < h.values.size(); ++i)
    t.values()(static_cast<Eigen::Index>(i)) = static_cast<S>(h.values[i]);
  return t;
}

inline eigen_index to_eigen(const host_labels& h) { return eigen_index(h.shape, h.values); }

}  // namespace posttrain::test
