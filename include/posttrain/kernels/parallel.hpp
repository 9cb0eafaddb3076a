// posttrain/kernels/parallel.hpp — how the CPU kernels spread rows (and vocabulary tiles) over threads.
//
// The kernels never decide *where* their work runs; they cut it into a fixed number of ranges and
// hand the ranges to a `parallel_runner`:
//   * inside a LibTorch program, LibTorch's intra-op pool (at::parallel_for, sized by
//     at::set_num_threads): backends/torch/intra_op.hpp installs that runner as the default when the
//     torch backend is included, so posttrain shares the cores torch already uses instead of
//     oversubscribing them, and pays no thread start per call;
//   * otherwise (the Eigen backend alone) one std::thread per extra range (the calling thread takes
//     the first range), started per call;
//   * or a runner of the caller's (set_parallel_runner), e.g. a trainer's own pool.
// How many ranges: num_threads() — set_num_threads(n) when the caller set it, else the runner's
// thread count — capped by the rows and by min_elements_per_thread. The cut depends only on that
// count and each row is reduced by one thread in one order, so results are bitwise independent of
// the runner and of the thread count.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <type_traits>
#include <vector>

#include "posttrain/error.hpp"

namespace posttrain::kernels {

/// Where the kernels' ranges run. `run(n, ctx, task)` calls task(ctx, i) exactly once for every i in
/// [0, n), possibly concurrently, and returns when all have returned; `threads()` is how many threads
/// it can run at once (>= 1). Both must be safe to call from any thread.
struct parallel_runner {
  int (*threads)();
  void (*run)(std::int64_t n, void* ctx, void (*task)(void* ctx, std::int64_t i));
};

namespace detail {
inline int hardware_threads() {
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

// One std::thread per range past the first, which the calling thread runs.
inline void thread_per_call_run(std::int64_t n, void* ctx, void (*task)(void*, std::int64_t)) {
  std::vector<std::thread> pool;
  pool.reserve(static_cast<std::size_t>(n > 1 ? n - 1 : 0));
  for (std::int64_t i = 1; i < n; ++i) pool.emplace_back([ctx, task, i] { task(ctx, i); });
  if (n > 0) task(ctx, 0);
  for (auto& t : pool) t.join();
}

inline std::atomic<int>& thread_setting() {
  static std::atomic<int> n{0};
  return n;
}
inline std::atomic<const parallel_runner*>& default_runner_slot() {
  static std::atomic<const parallel_runner*> r{nullptr};
  return r;
}
inline std::atomic<const parallel_runner*>& user_runner_slot() {
  static std::atomic<const parallel_runner*> r{nullptr};
  return r;
}
}  // namespace detail

/// The runner used when nothing else is installed: a std::thread per range past the first, started
/// per call, as many as the hardware has cores. (Deliberately not OpenMP even under -fopenmp: an
/// inline function must mean the same in every translation unit of a program.)
inline const parallel_runner& builtin_parallel_runner() {
  static const parallel_runner r{&detail::hardware_threads, &detail::thread_per_call_run};
  return r;
}

/// Installs the runner a backend brings (the torch backend: LibTorch's intra-op pool); nullptr
/// removes it. The caller's own runner (set_parallel_runner) still takes precedence.
inline void set_default_parallel_runner(const parallel_runner* r) {
  if (r && (!r->threads || !r->run))
    posttrain::detail::fail("kernels::set_default_parallel_runner", "runner has a null threads or run function");
  detail::default_runner_slot().store(r, std::memory_order_release);
}
/// Installs the caller's runner for the whole process (it must outlive its use); nullptr restores
/// the backend's default.
inline void set_parallel_runner(const parallel_runner* r) {
  if (r && (!r->threads || !r->run))
    posttrain::detail::fail("kernels::set_parallel_runner", "runner has a null threads or run function");
  detail::user_runner_slot().store(r, std::memory_order_release);
}
/// The runner in use: the caller's, else the backend's default, else the built-in one.
inline const parallel_runner& current_parallel_runner() {
  if (const auto* r = detail::user_runner_slot().load(std::memory_order_acquire)) return *r;
  if (const auto* r = detail::default_runner_slot().load(std::memory_order_acquire)) return *r;
  return builtin_parallel_runner();
}

/// Threads the kernels use: set_num_threads(n) when set, else the runner's thread count (LibTorch's
/// at::get_num_threads() in a torch program, the hardware's cores otherwise).
inline int num_threads() {
  const int n = detail::thread_setting().load(std::memory_order_relaxed);
  if (n > 0) return n;
  const int t = current_parallel_runner().threads();
  return t < 1 ? 1 : t;
}
/// Sets the kernels' thread count for the whole process; n <= 0 means "the runner's count".
inline void set_num_threads(int n) { detail::thread_setting().store(n < 0 ? 0 : n, std::memory_order_relaxed); }

/// A range is only split off for at least this many logits: below it the hand-off costs more.
inline constexpr std::int64_t min_elements_per_thread = std::int64_t{1} << 16;

/// Runs task(i) for i in [0, n) on the current runner (inline when n <= 1).
template <class F>
void run_parallel(std::int64_t n, F&& task) {
  if (n <= 0) return;
  if (n == 1) {
    task(std::int64_t{0});
    return;
  }
  using fn = std::remove_reference_t<F>;
  current_parallel_runner().run(n, static_cast<void*>(&task),
                                [](void* ctx, std::int64_t i) { (*static_cast<fn*>(ctx))(i); });
}

/// The number of ranges parallel_rows cuts [0, rows) x cols into.
inline std::int64_t parallel_row_ranges(std::int64_t rows, std::int64_t cols) {
  if (rows <= 0) return 0;
  const std::int64_t by_work =
      std::max<std::int64_t>(1, rows * std::max<std::int64_t>(cols, 1) / min_elements_per_thread);
  return std::min<std::int64_t>({static_cast<std::int64_t>(num_threads()), rows, by_work});
}

/// Calls f(begin, end) over [0, rows) split into parallel_row_ranges(rows, cols) contiguous ranges
/// (the first `rows % ranges` one row longer), each on the runner.
template <class F>
void parallel_rows(std::int64_t rows, std::int64_t cols, F&& f) {
  const std::int64_t ranges = parallel_row_ranges(rows, cols);
  if (ranges <= 0) return;
  const std::int64_t per = rows / ranges, extra = rows % ranges;
  run_parallel(ranges, [&f, per, extra](std::int64_t w) {
    const std::int64_t begin = w * per + std::min(w, extra);
    const std::int64_t end = begin + per + (w < extra ? 1 : 0);
    f(begin, end);
  });
}

}  // namespace posttrain::kernels
