// tests/support/thread_communicator.hpp — R data-parallel "ranks" as std::threads of one process, sharing
// memory: a posttrain::communicator<eigen_tensor<S>> per rank whose collectives exchange host copies through
// a std::barrier. Test-only (no timeouts: every rank must make the same collectives; a rank that throws
// before a collective the others make would leave them waiting, so tests throw only where every rank does).
//
//   auto results = posttrain::test::run_ranks<double>(3, [&](int rank, const communicator<eigen_tensor<double>>& c) {
//     return ...;  // computed on this rank; assertions belong in the calling thread (Catch2 is not thread-safe)
//   });
#pragma once

#include <algorithm>
#include <barrier>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/distributed/communicator.hpp"

namespace posttrain::test {

/// The state R ranks share, and the per-rank count of each collective (the communication a step costs).
template <class S>
class thread_group {
 public:
  using T = eigen_tensor<S>;
  explicit thread_group(int world)
      : world_(world),
        barrier_(world),
        slots_(static_cast<std::size_t>(world)),
        index_slots_(slots_.size()),
        reduces_(slots_.size(), 0),
        gathers_(slots_.size(), 0) {}

  communicator<T> comm(int rank) {
    return {.rank = [rank] { return rank; },
            .world_size = [this] { return world_; },
            .all_reduce = [this, rank](const T& x, reduce_op op) { return all_reduce(rank, x, op); },
            .all_gather = [this, rank](const T& x) { return all_gather(rank, x); },
            .all_gather_index = [this, rank](const eigen_index& i) { return all_gather_index(rank, i); }};
  }
  int all_reduces(int rank) const { return reduces_[static_cast<std::size_t>(rank)]; }
  int all_gathers(int rank) const { return gathers_[static_cast<std::size_t>(rank)]; }

 private:
  /// Every rank's deposit, once all have made it (two barrier phases: deposit, read; so a fast rank's next
  /// deposit never overwrites a slot another rank is still reading).
  template <class V>
  std::vector<V> exchange(std::vector<V>& slots, int rank, V mine) {
    slots[static_cast<std::size_t>(rank)] = std::move(mine);
    barrier_.arrive_and_wait();
    std::vector<V> all = slots;
    barrier_.arrive_and_wait();
    return all;
  }
  T all_reduce(int rank, const T& x, reduce_op op) {
    ++reduces_[static_cast<std::size_t>(rank)];
    const auto all = exchange(slots_, rank, std::vector<double>(x.values().data(), x.values().data() + x.numel()));
    std::vector<S> out(all[0].begin(), all[0].end());
    for (std::size_t r = 1; r < all.size(); ++r) {
      if (all[r].size() != out.size())
        detail::fail("thread_group::all_reduce", "rank ", r, " sent ", all[r].size(), " values, rank 0 ", out.size());
      for (std::size_t k = 0; k < out.size(); ++k) {
        const S v = static_cast<S>(all[r][k]);
        out[k] = op == reduce_op::sum   ? static_cast<S>(out[k] + v)
                 : op == reduce_op::max ? std::max(out[k], v)
                                        : std::min(out[k], v);
      }
    }
    return T(x.shape(), out);
  }
  T all_gather(int rank, const T& x) {
    ++gathers_[static_cast<std::size_t>(rank)];
    if (x.rank() != 1)
      detail::fail("thread_group::all_gather", "needs a 1-D tensor, got ", detail::shape_string(x.shape()));
    const auto all = exchange(slots_, rank, std::vector<double>(x.values().data(), x.values().data() + x.numel()));
    std::vector<S> out;
    for (const auto& a : all) out.insert(out.end(), a.begin(), a.end());
    return T({static_cast<std::int64_t>(out.size())}, out);
  }
  eigen_index all_gather_index(int rank, const eigen_index& i) {
    ++gathers_[static_cast<std::size_t>(rank)];
    const auto all =
        exchange(index_slots_, rank, std::vector<std::int64_t>(i.values().data(), i.values().data() + i.numel()));
    std::vector<std::int64_t> out;
    for (const auto& a : all) out.insert(out.end(), a.begin(), a.end());
    return eigen_index({static_cast<std::int64_t>(out.size())}, out);
  }

  int world_;
  std::barrier<> barrier_;
  std::vector<std::vector<double>> slots_;
  std::vector<std::vector<std::int64_t>> index_slots_;
  std::vector<int> reduces_, gathers_;
};

/// Runs f(rank, comm) on `world` threads and returns each rank's result in rank order; an exception in any rank
/// is rethrown here (the first by rank) after every thread has joined.
template <class S, class F>
auto run_ranks(int world, F f, thread_group<S>* group = nullptr) {
  using R = decltype(f(0, std::declval<const communicator<eigen_tensor<S>>&>()));
  std::unique_ptr<thread_group<S>> own;
  if (!group) own = std::make_unique<thread_group<S>>(world), group = own.get();
  std::vector<std::optional<R>> results(static_cast<std::size_t>(world));
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(world));
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r)
    threads.emplace_back([&, r] {
      try {
        const auto c = group->comm(r);
        results[static_cast<std::size_t>(r)].emplace(f(r, c));
      } catch (...) {
        errors[static_cast<std::size_t>(r)] = std::current_exception();
      }
    });
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
  std::vector<R> out;
  for (auto& r : results) out.push_back(std::move(*r));
  return out;
}

}  // namespace posttrain::test
