// posttrain/distributed/communicator.hpp — the seam between posttrain's global statistics and a
// data-parallel job's collectives: a struct of five callbacks over one tensor type.
//
//   rank()                    this process's rank, 0 <= rank < world_size()
//   world_size()              the number of ranks, >= 1
//   all_reduce(x, op)         the element-wise sum / max / min of x over every rank (same shape on every
//                             rank), returned as a new tensor; x is not modified
//   all_gather(x)             x [n_r] (1-D, any length per rank, 0 included) of every rank, concatenated
//                             in rank order: [Σ_r n_r]
//   all_gather_index(i)       the same for an index tensor (group ids: int64 ids stay exact, which a
//                             float32 tensor cannot promise beyond 2^24)
//
// single_process<T>() is the identity communicator of a one-rank job (rank 0, world 1): every global form
// then computes exactly what its single-process function computes. backends/torch/distributed.hpp builds one
// over a c10d ProcessGroup (Gloo on CPU, NCCL on CUDA); tests/support/thread_communicator.hpp runs R ranks as
// threads of one process. Any other transport (MPI, a trainer's own) is five lambdas.
//
// Contract for implementers: every rank calls the collectives in the same order with the same shapes
// (all_reduce) or the same rank-1-ness (all_gather); a collective that cannot complete (a dead rank, a timeout)
// throws rather than hangs. The results are constants: global statistics are not differentiated through the
// communication (the frameworks all-reduce counts and rewards under torch.no_grad as well).
#pragma once

#include <functional>
#include <string_view>
#include <utility>

#include "posttrain/error.hpp"
#include "posttrain/tensor.hpp"

namespace posttrain {

constexpr const char* reduce_op_name(reduce_op op) {
  switch (op) {
    case reduce_op::sum: return "sum";
    case reduce_op::max: return "max";
    case reduce_op::min: return "min";
  }
  return "?";
}

/// The collectives a data-parallel job provides (see the file comment for each callback's contract).
template <tensor T>
struct communicator {
  std::function<int()> rank;
  std::function<int()> world_size;
  std::function<T(const T&, reduce_op)> all_reduce;
  std::function<T(const T&)> all_gather;
  std::function<index_tensor_t<T>(const index_tensor_t<T>&)> all_gather_index;
};

/// The communicator of a one-process job: rank 0 of 1, every collective the identity (a copy of its input
/// where the backend copies on assignment).
template <tensor T>
communicator<T> single_process() {
  return {.rank = [] { return 0; },
          .world_size = [] { return 1; },
          .all_reduce = [](const T& x, reduce_op) { return x; },
          .all_gather = [](const T& x) { return x; },
          .all_gather_index = [](const index_tensor_t<T>& i) { return i; }};
}

namespace detail {

/// Every callback set, world_size() >= 1 and 0 <= rank() < world_size(); returns {rank, world}.
template <tensor T>
std::pair<int, int> check_communicator(std::string_view fn, const communicator<T>& c) {
  if (!c.rank) fail(fn, "comm.rank is empty (a communicator needs all five callbacks; single_process<T>() is one)");
  if (!c.world_size) fail(fn, "comm.world_size is empty (a communicator needs all five callbacks)");
  if (!c.all_reduce) fail(fn, "comm.all_reduce is empty (a communicator needs all five callbacks)");
  if (!c.all_gather) fail(fn, "comm.all_gather is empty (a communicator needs all five callbacks)");
  if (!c.all_gather_index) fail(fn, "comm.all_gather_index is empty (a communicator needs all five callbacks)");
  const int world = c.world_size();
  if (world < 1) fail(fn, "comm.world_size() must be >= 1, got ", world);
  const int rank = c.rank();
  if (rank < 0 || rank >= world) fail(fn, "comm.rank() must be in [0, ", world, "), got ", rank);
  return {rank, world};
}

}  // namespace detail
}  // namespace posttrain
