// posttrain/backends/torch/memory.hpp — large CPU output buffers on transparent huge pages.
//
// A gradient the size of an LM head ([V, H] = 2 GiB at V = 128256, H = 4096 in float32) is fresh
// memory on every step of a trainer that sets .grad to None between steps. Through LibTorch's CPU
// allocator (glibc malloc → mmap for large blocks) every 4 KiB page of it faults on first touch:
// on the test machine at::zeros of 2 GiB took 3.9 s, as long as the three GEMMs of the fused
// linear cross-entropy that fill it. Asking the kernel for 2 MiB pages (madvise(MADV_HUGEPAGE);
// the usual Linux setting `transparent_hugepage/enabled = madvise` grants them only on request)
// cuts the faults 512-fold: the same 2 GiB took 80 ms after the first call (benchmarks/README.md).
// Only posttrain's own large CPU outputs use this (the fused linear cross-entropy's gradients);
// LibTorch's allocator is left alone. Measured on the test VM (benchmarks/README.md): the S4 API
// step went from ~2x to ~1.1x its GEMMs with the head gradient on huge pages, while the 1 GiB
// logits gradient of the S2 torch backward was no faster (slower in two of three runs), so that one
// stays on at::empty.
//
// The tensor owns its mapping (torch::from_blob with a deleter that unmaps it), so it behaves as
// any other CPU tensor (autograd can adopt it as .grad, in-place ops work), except that its
// storage cannot be resized. Elsewhere than Linux, below `huge_page_min_bytes`, or when mmap
// fails, the buffer comes from at::empty as usual.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace posttrain::detail {

/// Buffers at least this large (bytes) are mapped on huge pages: 32 MiB, sixteen 2 MiB pages.
inline constexpr std::int64_t huge_page_min_bytes = std::int64_t{32} << 20;

/// A fresh anonymous mapping of `sizes` x `options` (zero-filled by the kernel) advised onto huge
/// pages; an undefined tensor when not applicable (not Linux, not CPU, small, or mmap failed).
inline at::Tensor map_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__)
  std::int64_t numel = 1;
  for (const std::int64_t s : sizes) numel *= s;
  const std::int64_t bytes = numel * static_cast<std::int64_t>(c10::elementSize(options.dtype().toScalarType()));
  if (options.device().is_cpu() && options.layout() == at::kStrided && bytes >= huge_page_min_bytes) {
    const auto length = static_cast<std::size_t>(bytes);
    void* p = ::mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p != MAP_FAILED) {
      // Advice only: where THP is disabled the mapping still works on 4 KiB pages.
      (void)::madvise(p, length, MADV_HUGEPAGE);
      return at::from_blob(
          p, sizes, [length](void* q) { ::munmap(q, length); }, options);
    }
  }
#else
  (void)sizes;
  (void)options;
#endif
  return {};
}

/// An uninitialised CPU tensor of `sizes` and `options`, on huge pages when large.
inline at::Tensor large_cpu_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = map_huge_pages(sizes, options);
  return t.defined() ? t : at::empty(sizes, options);
}

/// As large_cpu_empty, filled with zeros (a fresh mapping is zero already: no second write).
inline at::Tensor large_cpu_zeros(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = map_huge_pages(sizes, options);
  return t.defined() ? t : at::zeros(sizes, options);
}

}  // namespace posttrain::detail
