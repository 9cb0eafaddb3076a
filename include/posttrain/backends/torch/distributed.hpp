// posttrain/backends/torch/distributed.hpp — a posttrain::communicator (distributed/communicator.hpp) over
// LibTorch's c10d ProcessGroup: the process group a data-parallel trainer already has (Gloo on CPU, NCCL on
// CUDA; torch.distributed's engine), so that posttrain's global statistics (distributed/global.hpp) travel
// over it.
//
//   auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, options);  // or NCCL, MPI ...
//   const auto comm = posttrain::process_group_communicator(pg);
//   posttrain::global_batch gb(masks, comm);
//
// `pg` may be any c10d group type (the c10d_group concept below): on LibTorch 1.x a ProcessGroup (ProcessGroupGloo,
// ProcessGroupNCCL ...), on LibTorch 2.x also the Backend those became (ProcessGroupNCCL is then a c10d::Backend that
// a ProcessGroup wraps; pass it directly).
//
// This header needs only c10d's ProcessGroup.hpp, which Debian's libtorch-dev ships; creating a Gloo group needs
// <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>, compiled only with USE_C10D_GLOO defined and Gloo's headers
// (libgloo-dev) installed: the caller's concern, not this header's.
//
// Tensors stay on their device: all_reduce runs on a detached copy of x where x lives (an NCCL group needs
// CUDA tensors, a Gloo group CPU tensors, as c10d itself); all_gather brings to the host only the ranks'
// lengths (one int64 each: the output's shape needs them), then gathers the values padded to the longest and
// trims them on the device. A collective that fails or times out (a dead rank: the group's timeout, or
// `timeout` here when set) throws posttrain::error naming the collective, the shape and the rank, with c10d's
// message; nothing waits forever when the group has a timeout (Gloo's default: 30 minutes; set a shorter one in
// its Options).
#pragma once

#include <algorithm>
#include <chrono>
#include <concepts>
#include <cstdint>
#include <exception>
#include <string>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <vector>

#include "posttrain/backends/torch/tensor.hpp"
#include "posttrain/distributed/communicator.hpp"
#include "posttrain/error.hpp"

namespace posttrain {

namespace detail {

inline c10d::ReduceOp to_c10d(reduce_op op) {
  switch (op) {
    case reduce_op::sum: return c10d::ReduceOp::SUM;
    case reduce_op::max: return c10d::ReduceOp::MAX;
    case reduce_op::min: return c10d::ReduceOp::MIN;
  }
  fail("process_group_communicator", "unknown reduce_op ", static_cast<int>(op));
}

/// Waits for a c10d work item; any exception (a timeout, a closed connection) becomes posttrain::error.
inline void wait_for(const c10::intrusive_ptr<c10d::Work>& work, std::chrono::milliseconds timeout,
                     const std::string& what, int rank) {
  try {
    if (timeout.count() > 0)
      work->wait(timeout);
    else
      work->wait();
  } catch (const std::exception& e) {
    fail("process_group_communicator", what, " failed on rank ", rank, ": ", e.what());
  }
}

/// Every rank's 1-D x concatenated in rank order, lengths may differ: lengths first (int64, to the host), then
/// the values padded to the longest, trimmed and joined on x's device.
template <class Group>
at::Tensor gather_1d(Group& pg, const at::Tensor& x, std::chrono::milliseconds timeout, const char* name) {
  const int rank = pg.getRank(), world = pg.getSize();
  if (x.dim() != 1)
    fail("process_group_communicator", name, " needs a 1-D tensor, got shape ", shape_string(x.sizes().vec()));
  const auto len_opts = at::TensorOptions().dtype(at::kLong).device(x.device());
  std::vector<at::Tensor> mine{at::full({1}, x.size(0), len_opts)};
  std::vector<std::vector<at::Tensor>> lens(1);
  for (int r = 0; r < world; ++r) lens[0].push_back(at::empty({1}, len_opts));
  wait_for(pg.allgather(lens, mine), timeout, std::string(name) + " (lengths)", rank);
  const at::Tensor host_lens = at::cat(lens[0]).cpu();
  const auto* n = host_lens.data_ptr<std::int64_t>();
  std::int64_t longest = 0;
  for (int r = 0; r < world; ++r) longest = std::max(longest, n[r]);
  if (longest == 0) return x.detach().clone();
  at::Tensor padded = at::zeros({longest}, x.options());
  padded.narrow(0, 0, x.size(0)).copy_(x.detach());
  std::vector<at::Tensor> in{padded};
  std::vector<std::vector<at::Tensor>> out(1);
  for (int r = 0; r < world; ++r) out[0].push_back(at::empty({longest}, x.options()));
  wait_for(pg.allgather(out, in), timeout, std::string(name) + " of shape " + shape_string(x.sizes().vec()), rank);
  std::vector<at::Tensor> parts;
  for (int r = 0; r < world; ++r) parts.push_back(out[0][static_cast<std::size_t>(r)].narrow(0, 0, n[r]));
  return at::cat(parts);
}

}  // namespace detail

/// A c10d group with the collectives the communicator uses: c10d::ProcessGroup and its Gloo / NCCL / MPI
/// subclasses (LibTorch 1.x), or c10d::Backend and its ProcessGroupGloo / ProcessGroupNCCL (LibTorch 2.x, where
/// those are Backends that a ProcessGroup wraps). The same calls on either.
template <class Group>
concept c10d_group = requires(Group& g, std::vector<at::Tensor>& t, std::vector<std::vector<at::Tensor>>& tt) {
  { g.getRank() } -> std::convertible_to<int>;
  { g.getSize() } -> std::convertible_to<int>;
  g.allreduce(t, c10d::AllreduceOptions{});
  g.allgather(tt, t);
};

/// A communicator over a c10d process group (Gloo, NCCL, MPI ...): rank and world size from the group;
/// all_reduce and all_gather as its allreduce and allgather (see the file comment). `timeout` > 0 bounds each
/// collective's wait; 0 (default) leaves it to the group's own timeout. The group must outlive the communicator's
/// use (the callbacks hold a reference to it). `pg`: an intrusive_ptr to any c10d_group (ProcessGroup,
/// ProcessGroupGloo, ProcessGroupNCCL; on LibTorch 2.x also a Backend).
template <c10d_group Group>
communicator<at::Tensor> process_group_communicator(c10::intrusive_ptr<Group> pg,
                                                    std::chrono::milliseconds timeout = std::chrono::milliseconds{0}) {
  if (!pg) detail::fail("process_group_communicator", "pg is null");
  if (timeout.count() < 0) detail::fail("process_group_communicator", "timeout must be >= 0 ms, got ", timeout.count());
  return {.rank = [pg] { return pg->getRank(); },
          .world_size = [pg] { return pg->getSize(); },
          .all_reduce =
              [pg, timeout](const at::Tensor& x, reduce_op op) {
                std::vector<at::Tensor> t{x.detach().reshape({-1}).clone()};
                c10d::AllreduceOptions o;
                o.reduceOp = detail::to_c10d(op);
                detail::wait_for(pg->allreduce(t, o), timeout,
                                 std::string("all_reduce(") + reduce_op_name(op) + ") of shape " +
                                     detail::shape_string(x.sizes().vec()),
                                 pg->getRank());
                return t[0].reshape(x.sizes());
              },
          .all_gather = [pg, timeout](const at::Tensor& x) { return detail::gather_1d(*pg, x, timeout, "all_gather"); },
          .all_gather_index =
              [pg, timeout](const at::Tensor& i) { return detail::gather_1d(*pg, i, timeout, "all_gather_index"); }};
}

}  // namespace posttrain
