// posttrain/backends/torch/knobs.hpp — process-wide settings of the LibTorch backend's logits paths.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace posttrain {

/// Knobs of the torch backend's logits paths (process-wide, like kernels::set_num_threads).
///
/// The fused hooks (the one-pass logits statistics and their backward, sft_loss_backward's gradient)
/// take one of three paths, chosen per call from the logits tensor:
///   kernel   contiguous CPU float32/float64: posttrain::kernels read the tensor in place.
///   rows     other CPU tensors (bfloat16/float16, strided views): bfloat16/float16 rows with unit
///            column stride are read natively by the kernels (kernels/logits_cpu.hpp: no buffer); any
///            other row is upcast one at a time into the thread's own float32 (float64 for double) row
///            buffer and runs the same kernels, so the extra memory is threads x V elements. Needs
///            Eigen on the include path.
///   chunked  CUDA (any device), and CPU without Eigen: LibTorch ops on chunks of rows; each chunk
///            is upcast to float32 (float64 stays float64), reduced, and written into the [N]
///            result (or the [N, V] gradient, in the logits' dtype). Peak extra memory is a few
///            chunk-sized float32 temporaries, never an N x V float32 copy.
/// The chunk knobs below size the chunked path only (the rows path holds one row per thread).
/// Half inputs give float32 results (the gradient is in the logits' dtype), as the generic path's
/// upcast does; a backward recorded with create_graph = true uses whole-tensor LibTorch ops (one
/// float32 copy for half logits). The chunked path is device-agnostic LibTorch code, not yet run on a
/// GPU here: tested on
/// CPU (forced with force_logits_path) and by CUDA tests that skip when no device is present.
namespace torch_backend {

namespace detail {
inline std::atomic<std::int64_t>& chunk_bytes_setting() {
  static std::atomic<std::int64_t> b{0};
  return b;
}
inline std::atomic<std::int64_t>& chunk_rows_setting() {
  static std::atomic<std::int64_t> r{0};
  return r;
}
}  // namespace detail

/// Float32 bytes of one chunk of the chunked path when never set: 128 MiB.
inline constexpr std::int64_t default_chunk_bytes = std::int64_t{128} << 20;

/// Bytes of one float32 chunk of the chunked path; bytes <= 0 restores default_chunk_bytes.
inline void set_chunk_bytes(std::int64_t bytes) {
  detail::chunk_bytes_setting().store(bytes < 0 ? 0 : bytes, std::memory_order_relaxed);
}
inline std::int64_t chunk_bytes() {
  const std::int64_t b = detail::chunk_bytes_setting().load(std::memory_order_relaxed);
  return b > 0 ? b : default_chunk_bytes;
}
/// Fixes the rows of a chunk (rows > 0), overriding chunk_bytes; rows <= 0 goes back to bytes.
inline void set_chunk_rows(std::int64_t rows) {
  detail::chunk_rows_setting().store(rows < 0 ? 0 : rows, std::memory_order_relaxed);
}
/// Rows of one chunk for a vocabulary of `vocab`: the fixed count, or chunk_bytes / (4·V), >= 1.
inline std::int64_t chunk_rows(std::int64_t vocab) {
  const std::int64_t r = detail::chunk_rows_setting().load(std::memory_order_relaxed);
  if (r > 0) return r;
  return std::max<std::int64_t>(1, chunk_bytes() / (4 * std::max<std::int64_t>(vocab, 1)));
}

enum class logits_path { automatic, kernel, rows, chunked };
namespace detail {
inline std::atomic<logits_path>& forced_path() {
  static std::atomic<logits_path> p{logits_path::automatic};
  return p;
}
}  // namespace detail
/// Test hook: on CPU, take `rows` or `chunked` even where another path would run (automatic
/// restores the choice above). CUDA tensors always take the chunked path.
inline void force_logits_path(logits_path p) { detail::forced_path().store(p, std::memory_order_relaxed); }
inline logits_path forced_logits_path() { return detail::forced_path().load(std::memory_order_relaxed); }

namespace detail {
inline std::atomic<bool>& widen_half_flag() {
  static std::atomic<bool> on{false};
  return on;
}
}  // namespace detail
/// Benchmark and test hook: the rows path widens bfloat16/float16 rows into a per-thread float32 row
/// buffer first (the path before the 16-bit-native kernels), to measure and check the native path against.
inline void set_widen_half_rows(bool on) { detail::widen_half_flag().store(on, std::memory_order_relaxed); }
inline bool widen_half_rows() { return detail::widen_half_flag().load(std::memory_order_relaxed); }

namespace detail {
inline std::atomic<bool>& sft_node_flag() {
  static std::atomic<bool> on{true};
  return on;
}
}  // namespace detail
/// Benchmark and test hook: false makes sft_loss decline its one-node form (backends/torch/sft_node.hpp)
/// and run the generic composition around the statistics node, to measure and check the node against.
inline void set_sft_node(bool on) { detail::sft_node_flag().store(on, std::memory_order_relaxed); }
inline bool sft_node() { return detail::sft_node_flag().load(std::memory_order_relaxed); }

}  // namespace torch_backend

}  // namespace posttrain
