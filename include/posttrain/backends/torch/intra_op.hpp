// posttrain/backends/torch/intra_op.hpp — posttrain's CPU kernels on LibTorch's intra-op pool.
//
// Inside a LibTorch trainer the cores belong to LibTorch: at::set_num_threads sizes its intra-op pool
// and every ATen op runs there. Including the torch backend installs a kernels::parallel_runner
// (kernels/parallel.hpp) that runs posttrain's row ranges through at::parallel_for, so
//   * kernels::num_threads() is at::get_num_threads() unless kernels::set_num_threads(n) was called
//     (at::set_num_threads(1) makes posttrain single-threaded too);
//   * no thread is started per call: the ranges run on the pool's persistent threads;
//   * called from inside an at::parallel_for region, posttrain runs serially (no nested pools).
// Where LibTorch's pool is OpenMP (Debian's libtorch-dev, PyTorch's wheels), at::parallel_for is an
// inline OpenMP region: it is parallel only in a translation unit compiled with -fopenmp, which the
// posttrain::torch CMake target adds. A translation unit without it (INTRA_OP_PARALLEL undefined)
// installs a runner that still takes its size from at::get_num_threads() but starts std::threads per
// call. The two runners have different names (inline namespaces), so a program mixing such
// translation units stays within the one-definition rule; whichever is installed last is used, and
// results are bitwise the same with either (kernels/parallel.hpp).
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>

#include "posttrain/kernels/parallel.hpp"

namespace posttrain::torch_backend {

namespace detail {
inline int intra_op_threads() { return at::get_num_threads(); }
}  // namespace detail

#if defined(INTRA_OP_PARALLEL)
inline namespace intra_op_pool {
/// The runner over at::parallel_for (grain 1: each of the n <= at::get_num_threads() ranges is one
/// task of the pool; more ranges than threads are shared out in contiguous blocks).
inline const kernels::parallel_runner& intra_op_runner() {
  static const kernels::parallel_runner r{&detail::intra_op_threads,
                                          [](std::int64_t n, void* ctx, void (*task)(void*, std::int64_t)) {
                                            at::parallel_for(0, n, 1, [&](std::int64_t begin, std::int64_t end) {
                                              for (std::int64_t i = begin; i < end; ++i) task(ctx, i);
                                            });
                                          }};
  return r;
}
/// True: this translation unit runs the kernels on LibTorch's pool.
inline constexpr bool kernels_on_intra_op_pool = true;
/// Installs intra_op_runner() as the kernels' default before main (dynamic initialisation).
inline const bool intra_op_runner_installed = (kernels::set_default_parallel_runner(&intra_op_runner()), true);
}  // namespace intra_op_pool
#else
inline namespace intra_op_threads {
/// LibTorch's pool is not reachable from this translation unit (OpenMP pool, compiled without
/// -fopenmp): std::threads per call, as many as at::get_num_threads().
inline const kernels::parallel_runner& intra_op_runner() {
  static const kernels::parallel_runner r{&detail::intra_op_threads, &kernels::detail::thread_per_call_run};
  return r;
}
inline constexpr bool kernels_on_intra_op_pool = false;
/// Installs intra_op_runner() as the kernels' default before main (dynamic initialisation).
inline const bool intra_op_runner_installed = (kernels::set_default_parallel_runner(&intra_op_runner()), true);
}  // namespace intra_op_threads
#endif

}  // namespace posttrain::torch_backend
