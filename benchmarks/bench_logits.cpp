// posttrain's logits hot-path benchmarks (Google Benchmark), every candidate beside its baselines in
// one process:
//   floor      a streaming read (or read + write) of the same bytes, and an exp-throughput loop over
//              the same element count; floor = max of the two (research/performance-anchors.md §5)
//   naive      the LibTorch composition a C++ trainer writes (log_softmax + gather, softmax·log_softmax,
//              cross_entropy + backward()), warm allocator (mallopt below), same thread count
//   generic    posttrain::generic on the Eigen backend (float32), at fewer rows (it materialises
//              several [N, V] temporaries with scalar broadcasting loops); its floor is scaled to its rows
//   fused      posttrain::kernels directly (one pass), and posttrain's public API on LibTorch tensors
// Scenarios: S1 log-prob + entropy (N=4096, V=151936; fp32, and bf16 on torch), S2 SFT cross-entropy
// forward + backward (N=2048, V=128256, fp32). Where torch::cuda::is_available() (checked at run
// time), the same scenarios also run on the GPU: naive LibTorch vs posttrain's chunked path, each
// call followed by torch::cuda::synchronize(), floor = a read (S2: read + write) of the same bytes by
// LibTorch's own kernels. After the timings, peak memory: each case runs once in
// a fresh child process (this binary with --peak-memory=CASE) that resets its resident high-water
// mark after building the inputs and reports VmHWM minus the resident set just before the call.
//
//   posttrain_bench [--quick] [--threads=N] [--iterations=N] [--s1-rows=N] [--no-peak-memory] [Google Benchmark flags]
// --quick: small shapes, one iteration each (a ctest smoke test, not a measurement).
// --no-peak-memory: skip the fresh-process memory runs (e.g. with --benchmark_filter=cuda).
// --s1-rows=N: S1 with N rows instead of 4096 (where the full size is too slow or too big for the machine).
// The bf16/fp16 cases run the rows path's 16-bit-native kernels and, beside them, the old widening
// buffer (torch_backend::set_widen_half_rows, a benchmark and test hook).
#include <benchmark/benchmark.h>
#include <malloc.h>
#include <torch/cuda.h>
#include <torch/torch.h>
#include <unistd.h>

#include <Eigen/Core>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "peak_memory.hpp"
#include "posttrain/backends/eigen.hpp"
#include "posttrain/backends/torch.hpp"
#include "posttrain/kernels/logits_cpu.hpp"
#include "posttrain/losses/sft.hpp"
#include "posttrain/numerics/logits.hpp"
#include "timing.hpp"

namespace {

using namespace posttrain;

struct config {
  bool quick = false;
  bool peak_memory = true;
  int threads = 0;
  std::int64_t s1_n = 4096, s1_v = 151936, s1_generic_n = 16;
  std::int64_t s2_n = 2048, s2_v = 128256, s2_generic_n = 16;
  int iterations = 3;
};
config cfg;

/// Mean seconds per iteration of every case, for the summary table.
std::map<std::string, double>& timings() {
  static std::map<std::string, double> t;
  return t;
}

using posttrain_bench::timed;

// ---- inputs (built once per shape, reused across cases) ----------------------------------------

at::Tensor logits_f32(std::int64_t n, std::int64_t v, std::uint64_t seed) {
  at::manual_seed(seed);
  return at::randn({n, v}, at::kFloat) * 3.0;
}
at::Tensor labels_for(std::int64_t n, std::int64_t v) { return at::randint(0, v, {n}, at::kLong); }

struct s1_inputs {
  at::Tensor x, x_bf16, y;
  static s1_inputs& get() {
    static s1_inputs in{[] {
      s1_inputs s;
      s.x = logits_f32(cfg.s1_n, cfg.s1_v, 1);
      s.x_bf16 = s.x.to(at::kBFloat16);
      s.y = labels_for(cfg.s1_n, cfg.s1_v);
      return s;
    }()};
    return in;
  }
};

struct s2_inputs {
  at::Tensor x, y, grad;
  static s2_inputs& get() {
    static s2_inputs in{[] {
      s2_inputs s;
      s.x = logits_f32(cfg.s2_n, cfg.s2_v, 2);
      s.y = labels_for(cfg.s2_n, cfg.s2_v);
      s.grad = at::zeros_like(s.x);
      return s;
    }()};
    return in;
  }
};

// ---- floors ------------------------------------------------------------------------------------

/// Sums `bytes` of a buffer, rows split over the kernels' threads (the one-read floor).
double stream_read(const float* p, std::int64_t rows, std::int64_t cols) {
  std::vector<double> part(static_cast<std::size_t>(rows));
  kernels::parallel_rows(rows, cols, [&](std::int64_t b, std::int64_t e) {
    for (std::int64_t r = b; r < e; ++r)
      part[static_cast<std::size_t>(r)] = Eigen::Map<const Eigen::ArrayXf>(p + r * cols, cols).sum();
  });
  double s = 0;
  for (double v : part) s += v;
  return s;
}
/// Reads one buffer and writes another of the same size (the one-read-one-write floor).
void stream_copy(const float* src, float* dst, std::int64_t rows, std::int64_t cols) {
  kernels::parallel_rows(rows, cols, [&](std::int64_t b, std::int64_t e) {
    for (std::int64_t r = b; r < e; ++r)
      Eigen::Map<Eigen::ArrayXf>(dst + r * cols, cols) = Eigen::Map<const Eigen::ArrayXf>(src + r * cols, cols) * 0.5f;
  });
}
/// exp over rows·cols elements held in an L1-resident block: the exp-throughput floor.
double exp_throughput(std::int64_t rows, std::int64_t cols) {
  std::vector<double> part(static_cast<std::size_t>(rows));
  kernels::parallel_rows(rows, cols, [&](std::int64_t b, std::int64_t e) {
    Eigen::ArrayXf blk = Eigen::ArrayXf::LinSpaced(kernels::block_size, -8.0f, 0.0f);
    Eigen::ArrayXf out(kernels::block_size);
    for (std::int64_t r = b; r < e; ++r) {
      double acc = 0;
      for (std::int64_t c = 0; c < cols; c += kernels::block_size) {
        const Eigen::Index n = static_cast<Eigen::Index>(std::min<std::int64_t>(kernels::block_size, cols - c));
        out.head(n) = (blk.head(n) - static_cast<float>(c & 7)).exp();
        acc += out.head(n).sum();
      }
      part[static_cast<std::size_t>(r)] = acc;
    }
  });
  double s = 0;
  for (double v : part) s += v;
  return s;
}

// ---- S1: log-prob + entropy --------------------------------------------------------------------

void s1_floor_read(benchmark::State& st, bool bf16) {
  auto& in = s1_inputs::get();
  if (bf16) {
    // bf16 bytes: half the fp32 read, as int16 pairs summed as floats (bandwidth, not values).
    const auto* p = reinterpret_cast<const float*>(in.x_bf16.data_ptr<at::BFloat16>());
    timed(st, timings(), bf16 ? "S1 bf16 floor: read" : "S1 floor: read",
          [&] { benchmark::DoNotOptimize(stream_read(p, cfg.s1_n, cfg.s1_v / 2)); });
  } else {
    timed(st, timings(), "S1 floor: read",
          [&] { benchmark::DoNotOptimize(stream_read(in.x.data_ptr<float>(), cfg.s1_n, cfg.s1_v)); });
  }
  st.SetBytesProcessed(st.iterations() * cfg.s1_n * cfg.s1_v * (bf16 ? 2 : 4));
}
void s1_floor_exp(benchmark::State& st) {
  timed(st, timings(), "S1 floor: exp", [&] { benchmark::DoNotOptimize(exp_throughput(cfg.s1_n, cfg.s1_v)); });
  st.SetItemsProcessed(st.iterations() * cfg.s1_n * cfg.s1_v);
}
void s1_naive(benchmark::State& st, bool bf16) {
  auto& in = s1_inputs::get();
  const at::Tensor& x = bf16 ? in.x_bf16 : in.x;
  timed(st, timings(), bf16 ? "S1 bf16 naive LibTorch" : "S1 naive LibTorch", [&] {
    const at::Tensor logp = at::log_softmax(x, -1, at::kFloat);
    const at::Tensor lp = logp.gather(-1, in.y.unsqueeze(-1)).squeeze(-1);
    const at::Tensor ent = -(logp.exp() * logp).sum(-1);
    benchmark::DoNotOptimize(lp.data_ptr());
    benchmark::DoNotOptimize(ent.data_ptr());
  });
  st.SetItemsProcessed(st.iterations() * cfg.s1_n);
}
void s1_posttrain_torch(benchmark::State& st, bool bf16) {
  auto& in = s1_inputs::get();
  const at::Tensor& x = bf16 ? in.x_bf16 : in.x;
  timed(st, timings(), bf16 ? "S1 bf16 posttrain API on torch" : "S1 posttrain API on torch", [&] {
    const at::Tensor lp = posttrain::token_logprobs(x, in.y);
    const at::Tensor ent = posttrain::entropy(x);
    benchmark::DoNotOptimize(lp.data_ptr());
    benchmark::DoNotOptimize(ent.data_ptr());
  });
  st.SetItemsProcessed(st.iterations() * cfg.s1_n);
}
void s1_posttrain_one_call(benchmark::State& st, bool bf16) {
  auto& in = s1_inputs::get();
  const at::Tensor& x = bf16 ? in.x_bf16 : in.x;
  timed(st, timings(),
        bf16 ? "S1 bf16 posttrain token_logprobs_and_entropy" : "S1 posttrain token_logprobs_and_entropy", [&] {
          const auto r = posttrain::token_logprobs_and_entropy(x, in.y);  // one read of the logits
          benchmark::DoNotOptimize(r.logprobs.data_ptr());
          benchmark::DoNotOptimize(r.entropy.data_ptr());
        });
  st.SetItemsProcessed(st.iterations() * cfg.s1_n);
}
/// The bf16/fp16 rows path as it was before the 16-bit-native kernels (each row widened into a
/// float32 buffer first: torch_backend::set_widen_half_rows), beside the native one.
struct widen_scope {
  explicit widen_scope(bool on) { torch_backend::set_widen_half_rows(on); }
  ~widen_scope() { torch_backend::set_widen_half_rows(false); }
};
/// S1's logits in bf16, or in fp16 (made from the float32 logits on first use).
const at::Tensor& s1_half(bool fp16) {
  auto& in = s1_inputs::get();
  if (!fp16) return in.x_bf16;
  static const at::Tensor x_f16 = in.x.to(at::kHalf);
  return x_f16;
}
std::string half_case(bool fp16, bool widened, const char* what) {
  return std::string("S1 ") + (fp16 ? "fp16 " : "bf16 ") + what + (widened ? ", old widening buffer" : " (native)");
}
void s1_half_one_call(benchmark::State& st, bool fp16, bool widened) {
  auto& in = s1_inputs::get();
  const at::Tensor& x = s1_half(fp16);
  const widen_scope old(widened);
  timed(st, timings(), half_case(fp16, widened, "token_logprobs_and_entropy"), [&] {
    const auto r = posttrain::token_logprobs_and_entropy(x, in.y);
    benchmark::DoNotOptimize(r.logprobs.data_ptr());
    benchmark::DoNotOptimize(r.entropy.data_ptr());
  });
  st.SetItemsProcessed(st.iterations() * cfg.s1_n);
}
/// sft_loss_backward's fused gradient on S1's bf16/fp16 logits (a 16-bit [N, V] gradient per call):
/// the statistics pass plus one read + write of the row, native or through the old widening buffer.
void s1_half_ce_backward(benchmark::State& st, bool fp16, bool widened) {
  auto& in = s1_inputs::get();
  const at::Tensor& x = s1_half(fp16);
  const widen_scope old(widened);
  // One untimed call first: the first [N, V] gradient's page faults would otherwise land in whichever
  // of the two cases runs first (the second reuses the freed heap block).
  benchmark::DoNotOptimize(posttrain::sft_loss_backward(x, in.y).data_ptr());
  timed(st, timings(), half_case(fp16, widened, "sft_loss_backward"), [&] {
    const at::Tensor g = posttrain::sft_loss_backward(x, in.y);
    benchmark::DoNotOptimize(g.data_ptr());
  });
  st.SetItemsProcessed(st.iterations() * cfg.s1_n);
}
// ---- small batch: sft_loss forward + backward on [64, 12, 64] logits (issue 14 item 5) ----------------

/// A new user's shape: 64 sequences of 12 tokens over a 64-token vocabulary; 100 steps per iteration,
/// posttrain's sft_loss(...).loss.backward() beside at::cross_entropy_loss + backward on the same tensors.
/// composition: sft_loss without its one-node form (torch_backend::set_sft_node(false)), the path before it.
void small_sft(benchmark::State& st, bool posttrain_path, bool composition = false) {
  static const at::Tensor x0 = logits_f32(64 * 12, 64, 11).reshape({64, 12, 64});
  static const at::Tensor y = labels_for(64 * 12, 64).reshape({64, 12});
  at::Tensor x = x0.detach().clone().requires_grad_();
  const char* name = !posttrain_path ? "small cross_entropy + backward x100"
                     : composition   ? "small sft_loss (composition) + backward x100"
                                     : "small sft_loss + backward x100";
  posttrain::torch_backend::set_sft_node(!composition);
  timed(st, timings(), name, [&] {
    for (int i = 0; i < 100; ++i) {
      x.mutable_grad() = at::Tensor();
      if (posttrain_path)
        posttrain::sft_loss(x, y).loss.backward();
      else
        at::cross_entropy_loss(x.reshape({-1, 64}), y.reshape({-1})).backward();
      benchmark::DoNotOptimize(x.grad().data_ptr());
    }
  });
  posttrain::torch_backend::set_sft_node(true);
}

// ---- threads: LibTorch's intra-op pool (the default in a torch program) vs a std::thread per call --

/// Runs body with the kernels on the built-in runner (a std::thread per range, started per call: the
/// threading before the kernels moved onto LibTorch's pool), the same thread count, then restores it.
template <class F>
void on_thread_per_call(F&& body) {
  const int threads = kernels::num_threads();
  kernels::set_num_threads(threads);
  kernels::set_parallel_runner(&kernels::builtin_parallel_runner());
  body();
  kernels::set_parallel_runner(nullptr);
  kernels::set_num_threads(cfg.threads);
}
/// S1's one call at a small shape (64 x 4096: 4 ranges of work), 100 calls per iteration.
void threads_small(benchmark::State& st, bool pool) {
  static const at::Tensor x = logits_f32(64, 4096, 7), y = labels_for(64, 4096);
  const auto body = [&] {
    timed(st, timings(), pool ? "T small x100, LibTorch pool" : "T small x100, std::thread per call", [&] {
      for (int i = 0; i < 100; ++i) {
        const auto r = posttrain::token_logprobs_and_entropy(x, y);
        benchmark::DoNotOptimize(r.entropy.data_ptr());
      }
    });
  };
  if (pool)
    body();
  else
    on_thread_per_call(body);
}
void threads_large(benchmark::State& st) {
  auto& in = s1_inputs::get();
  on_thread_per_call([&] {
    timed(st, timings(), "S1 posttrain token_logprobs_and_entropy, std::thread per call", [&] {
      const auto r = posttrain::token_logprobs_and_entropy(in.x, in.y);
      benchmark::DoNotOptimize(r.entropy.data_ptr());
    });
  });
}

/// sft_loss's forward (loss and every metric: token accuracy, entropy) on S1's logits and labels: its
/// floor is S1's one read.
void s1_sft_forward(benchmark::State& st) {
  auto& in = s1_inputs::get();
  timed(st, timings(), "S1 posttrain sft_loss forward on torch", [&] {
    const auto r = posttrain::sft_loss(in.x, in.y);
    benchmark::DoNotOptimize(r.loss.data_ptr());
    benchmark::DoNotOptimize(r.entropy.data_ptr());
  });
  st.SetItemsProcessed(st.iterations() * cfg.s1_n);
}
void s1_fused(benchmark::State& st) {
  auto& in = s1_inputs::get();
  std::vector<float> lp(static_cast<std::size_t>(cfg.s1_n)), ent(lp.size());
  timed(st, timings(), "S1 fused kernel (one pass)", [&] {
    kernels::logits_forward<float>(in.x.data_ptr<float>(), cfg.s1_n, cfg.s1_v, in.y.data_ptr<std::int64_t>(), -100,
                                   nullptr, lp.data(), ent.data());
    benchmark::DoNotOptimize(lp.data());
  });
  st.SetBytesProcessed(st.iterations() * cfg.s1_n * cfg.s1_v * 4);
}
void s1_generic(benchmark::State& st) {
  auto& in = s1_inputs::get();
  const std::int64_t n = cfg.s1_generic_n, v = cfg.s1_v;
  eigen_tensor<float> x({n, v});
  std::memcpy(x.data(), in.x.data_ptr<float>(), static_cast<std::size_t>(n * v) * sizeof(float));
  eigen_index y({n});
  std::memcpy(y.data(), in.y.data_ptr<std::int64_t>(), static_cast<std::size_t>(n) * sizeof(std::int64_t));
  timed(st, timings(), "S1 posttrain generic (Eigen, few rows)", [&] {
    const auto lp = generic::token_logprobs(x, y);
    const auto ent = generic::entropy_last(x);
    benchmark::DoNotOptimize(lp.data());
    benchmark::DoNotOptimize(ent.data());
  });
  st.SetItemsProcessed(st.iterations() * n);
}

// ---- S2: SFT cross-entropy forward + backward --------------------------------------------------

void s2_floor_copy(benchmark::State& st) {
  auto& in = s2_inputs::get();
  timed(st, timings(), "S2 floor: read+write",
        [&] { stream_copy(in.x.data_ptr<float>(), in.grad.data_ptr<float>(), cfg.s2_n, cfg.s2_v); });
  st.SetBytesProcessed(st.iterations() * cfg.s2_n * cfg.s2_v * 8);
}
void s2_floor_exp(benchmark::State& st) {
  timed(st, timings(), "S2 floor: exp", [&] { benchmark::DoNotOptimize(exp_throughput(cfg.s2_n, cfg.s2_v)); });
  st.SetItemsProcessed(st.iterations() * cfg.s2_n * cfg.s2_v);
}
void s2_naive(benchmark::State& st) {
  auto& in = s2_inputs::get();
  at::Tensor x = in.x.detach().clone().requires_grad_();
  timed(st, timings(), "S2 naive LibTorch", [&] {
    x.mutable_grad() = at::Tensor();
    at::cross_entropy_loss(x, in.y).backward();
    benchmark::DoNotOptimize(x.grad().data_ptr());
  });
  st.SetItemsProcessed(st.iterations() * cfg.s2_n);
}
/// composition: without sft_loss's one-node form (torch_backend::set_sft_node(false)), the path before it.
void s2_posttrain_torch(benchmark::State& st, bool composition = false) {
  auto& in = s2_inputs::get();
  at::Tensor x = in.x.detach().clone().requires_grad_();
  posttrain::torch_backend::set_sft_node(!composition);
  timed(st, timings(),
        composition ? "S2 posttrain sft_loss (composition) on torch + backward()"
                    : "S2 posttrain sft_loss on torch + backward()",
        [&] {
          x.mutable_grad() = at::Tensor();
          posttrain::sft_loss(x, in.y).loss.backward();
          benchmark::DoNotOptimize(x.grad().data_ptr());
        });
  posttrain::torch_backend::set_sft_node(true);
  st.SetItemsProcessed(st.iterations() * cfg.s2_n);
}
/// The same call with sft_options::in_place_gradient: the gradient is written over the logits in the
/// backward and handed to autograd (no fresh [N, V] gradient per step). The logits then hold the
/// gradient, and the next step runs on those values: the cost does not depend on them (one stats
/// read in the forward, one read + write in the backward), and a trainer recomputes its logits anyway.
void s2_posttrain_torch_in_place(benchmark::State& st) {
  auto& in = s2_inputs::get();
  at::Tensor x = in.x.detach().clone().requires_grad_();
  timed(st, timings(), "S2 posttrain sft_loss on torch + backward(), in place", [&] {
    x.mutable_grad() = at::Tensor();
    posttrain::sft_loss(x, in.y, {.in_place_gradient = true}).loss.backward();
    benchmark::DoNotOptimize(x.grad().data_ptr());
  });
  st.SetItemsProcessed(st.iterations() * cfg.s2_n);
}
void s2_posttrain_torch_fused_backward(benchmark::State& st) {
  auto& in = s2_inputs::get();
  timed(st, timings(), "S2 posttrain sft_loss + sft_loss_backward on torch", [&] {
    const at::Tensor loss = posttrain::sft_loss(in.x, in.y).loss;
    const at::Tensor g = posttrain::sft_loss_backward(in.x, in.y);  // fused_ce_backward: one pass per row
    benchmark::DoNotOptimize(loss.data_ptr());
    benchmark::DoNotOptimize(g.data_ptr());
  });
  st.SetItemsProcessed(st.iterations() * cfg.s2_n);
}
void s2_fused(benchmark::State& st, bool in_place) {
  auto& in = s2_inputs::get();
  std::vector<float> loss(static_cast<std::size_t>(cfg.s2_n));
  at::Tensor work = in.x.clone();
  float* out = in_place ? work.data_ptr<float>() : in.grad.data_ptr<float>();
  timed(st, timings(), in_place ? "S2 fused kernel, in place" : "S2 fused kernel, into a buffer", [&] {
    // In place overwrites the logits: the next iteration differentiates the previous gradient,
    // which costs the same (the kernel's work does not depend on the values).
    kernels::cross_entropy_forward_backward<float>(in_place ? work.data_ptr<float>() : in.x.data_ptr<float>(), cfg.s2_n,
                                                   cfg.s2_v, in.y.data_ptr<std::int64_t>(), {}, loss.data(), out,
                                                   1.0 / static_cast<double>(cfg.s2_n));
    benchmark::DoNotOptimize(loss.data());
  });
  st.SetBytesProcessed(st.iterations() * cfg.s2_n * cfg.s2_v * 8);
}
void s2_generic(benchmark::State& st) {
  auto& in = s2_inputs::get();
  const std::int64_t n = cfg.s2_generic_n, v = cfg.s2_v;
  eigen_tensor<float> x({n, v});
  std::memcpy(x.data(), in.x.data_ptr<float>(), static_cast<std::size_t>(n * v) * sizeof(float));
  eigen_index y({n});
  std::memcpy(y.data(), in.y.data_ptr<std::int64_t>(), static_cast<std::size_t>(n) * sizeof(std::int64_t));
  timed(st, timings(), "S2 posttrain generic (Eigen, few rows)", [&] {
    const auto r = sft_loss(x, y);
    const auto g = sft_loss_backward(x, y);
    benchmark::DoNotOptimize(r.loss.data());
    benchmark::DoNotOptimize(g.data());
  });
  st.SetItemsProcessed(st.iterations() * n);
}

// ---- CUDA (runs only where torch::cuda::is_available(); NOT verified in this repository's CI) -----

struct cuda_inputs {
  at::Tensor x1, x1_bf16, y1, x2, y2, buf2;
  static cuda_inputs& get() {
    static cuda_inputs in{[] {
      cuda_inputs c;
      auto& s1 = s1_inputs::get();
      auto& s2 = s2_inputs::get();
      c.x1 = s1.x.to(at::kCUDA);
      c.x1_bf16 = s1.x_bf16.to(at::kCUDA);
      c.y1 = s1.y.to(at::kCUDA);
      c.x2 = s2.x.to(at::kCUDA);
      c.y2 = s2.y.to(at::kCUDA);
      c.buf2 = at::empty_like(c.x2);
      torch::cuda::synchronize();
      return c;
    }()};
    return in;
  }
};
template <class F>
void timed_cuda(benchmark::State& st, const std::string& name, F&& body) {
  body();  // warm-up: the caching allocator and kernel loads
  torch::cuda::synchronize();
  timed(st, timings(), name, [&] {
    body();
    torch::cuda::synchronize();
  });
}
void cuda_s1_floor(benchmark::State& st, bool bf16) {
  auto& in = cuda_inputs::get();
  const at::Tensor& x = bf16 ? in.x1_bf16 : in.x1;
  timed_cuda(st, bf16 ? "S1 CUDA bf16 floor: read" : "S1 CUDA floor: read",
             [&] { benchmark::DoNotOptimize(x.sum().data_ptr()); });
  st.SetBytesProcessed(st.iterations() * cfg.s1_n * cfg.s1_v * (bf16 ? 2 : 4));
}
void cuda_s1_naive(benchmark::State& st, bool bf16) {
  auto& in = cuda_inputs::get();
  const at::Tensor& x = bf16 ? in.x1_bf16 : in.x1;
  timed_cuda(st, bf16 ? "S1 CUDA bf16 naive LibTorch" : "S1 CUDA naive LibTorch", [&] {
    const at::Tensor logp = at::log_softmax(x, -1, at::kFloat);
    const at::Tensor lp = logp.gather(-1, in.y1.unsqueeze(-1)).squeeze(-1);
    const at::Tensor ent = -(logp.exp() * logp).sum(-1);
    benchmark::DoNotOptimize(lp.data_ptr());
    benchmark::DoNotOptimize(ent.data_ptr());
  });
  st.SetItemsProcessed(st.iterations() * cfg.s1_n);
}
void cuda_s1_posttrain(benchmark::State& st, bool bf16) {
  auto& in = cuda_inputs::get();
  const at::Tensor& x = bf16 ? in.x1_bf16 : in.x1;
  timed_cuda(st, bf16 ? "S1 CUDA bf16 posttrain chunked" : "S1 CUDA posttrain chunked", [&] {
    const at::Tensor lp = posttrain::token_logprobs(x, in.y1);
    const at::Tensor ent = posttrain::entropy(x);
    benchmark::DoNotOptimize(lp.data_ptr());
    benchmark::DoNotOptimize(ent.data_ptr());
  });
  st.SetItemsProcessed(st.iterations() * cfg.s1_n);
}
void cuda_s2_floor(benchmark::State& st) {
  auto& in = cuda_inputs::get();
  timed_cuda(st, "S2 CUDA floor: read+write", [&] { at::mul_out(in.buf2, in.x2, 0.5); });
  st.SetBytesProcessed(st.iterations() * cfg.s2_n * cfg.s2_v * 8);
}
void cuda_s2_naive(benchmark::State& st) {
  auto& in = cuda_inputs::get();
  at::Tensor x = in.x2.detach().clone().requires_grad_();
  timed_cuda(st, "S2 CUDA naive LibTorch", [&] {
    x.mutable_grad() = at::Tensor();
    at::cross_entropy_loss(x, in.y2).backward();
    benchmark::DoNotOptimize(x.grad().data_ptr());
  });
  st.SetItemsProcessed(st.iterations() * cfg.s2_n);
}
void cuda_s2_posttrain(benchmark::State& st, bool autograd) {
  auto& in = cuda_inputs::get();
  at::Tensor x = in.x2.detach().clone().requires_grad_(autograd);
  timed_cuda(
      st, autograd ? "S2 CUDA posttrain sft_loss + backward()" : "S2 CUDA posttrain sft_loss + sft_loss_backward", [&] {
        if (autograd) {
          x.mutable_grad() = at::Tensor();
          posttrain::sft_loss(x, in.y2).loss.backward();
          benchmark::DoNotOptimize(x.grad().data_ptr());
        } else {
          const at::Tensor loss = posttrain::sft_loss(x, in.y2).loss;
          const at::Tensor g = posttrain::sft_loss_backward(x, in.y2);
          benchmark::DoNotOptimize(loss.data_ptr());
          benchmark::DoNotOptimize(g.data_ptr());
        }
      });
  st.SetItemsProcessed(st.iterations() * cfg.s2_n);
}

// ---- peak memory in a fresh child ----------------------------------------------------------------

using posttrain_bench::peak_bytes;
using posttrain_bench::reset_peak;

const std::vector<std::string> memory_cases = {"S2 naive LibTorch",
                                               "S2 posttrain sft_loss on torch + backward()",
                                               "S2 posttrain sft_loss on torch + backward(), in place",
                                               "S2 fused kernel, into a buffer",
                                               "S2 fused kernel, in place",
                                               "S1 naive LibTorch",
                                               "S1 fused kernel (one pass)",
                                               "S1 bf16 posttrain API on torch"};

/// Runs one case once (inputs built and touched first) and prints the peak extra bytes.
int run_peak_memory(const std::string& name) {
  long before = 0;
  if (name.rfind("S2", 0) == 0) {
    auto& in = s2_inputs::get();
    std::vector<float> loss(static_cast<std::size_t>(cfg.s2_n));
    if (name == "S2 naive LibTorch" || name.rfind("S2 posttrain sft_loss on torch + backward()", 0) == 0) {
      at::Tensor x = in.x.detach().requires_grad_();
      in.grad = at::Tensor();  // not part of this case
      before = reset_peak();
      if (name == "S2 naive LibTorch")
        at::cross_entropy_loss(x, in.y).backward();
      else if (name == "S2 posttrain sft_loss on torch + backward(), in place")
        posttrain::sft_loss(x, in.y, {.in_place_gradient = true}).loss.backward();
      else
        posttrain::sft_loss(x, in.y).loss.backward();
    } else if (name == "S2 fused kernel, into a buffer") {
      in.grad = at::Tensor();
      before = reset_peak();
      at::Tensor grad = at::empty_like(in.x);  // the gradient is an output the caller needs
      std::memset(grad.data_ptr<float>(), 0, static_cast<std::size_t>(grad.numel()) * sizeof(float));
      kernels::cross_entropy_forward_backward<float>(in.x.data_ptr<float>(), cfg.s2_n, cfg.s2_v,
                                                     in.y.data_ptr<std::int64_t>(), {}, loss.data(),
                                                     grad.data_ptr<float>(), 1.0 / static_cast<double>(cfg.s2_n));
    } else {
      in.grad = at::Tensor();
      before = reset_peak();
      kernels::cross_entropy_forward_backward<float>(in.x.data_ptr<float>(), cfg.s2_n, cfg.s2_v,
                                                     in.y.data_ptr<std::int64_t>(), {}, loss.data(),
                                                     in.x.data_ptr<float>(), 1.0 / static_cast<double>(cfg.s2_n));
    }
  } else {
    auto& in = s1_inputs::get();
    if (name == "S1 bf16 posttrain API on torch")
      in.x = at::Tensor();  // only the bf16 logits are this case's input
    else
      in.x_bf16 = at::Tensor();
    before = reset_peak();
    if (name == "S1 bf16 posttrain API on torch") {
      const at::Tensor lp = posttrain::token_logprobs(in.x_bf16, in.y);
      const at::Tensor ent = posttrain::entropy(in.x_bf16);
      benchmark::DoNotOptimize(ent.data_ptr());
    } else if (name == "S1 naive LibTorch") {
      const at::Tensor logp = at::log_softmax(in.x, -1);
      const at::Tensor lp = logp.gather(-1, in.y.unsqueeze(-1)).squeeze(-1);
      const at::Tensor ent = -(logp.exp() * logp).sum(-1);
      benchmark::DoNotOptimize(ent.data_ptr());
    } else {
      std::vector<float> lp(static_cast<std::size_t>(cfg.s1_n)), ent(lp.size());
      kernels::logits_forward<float>(in.x.data_ptr<float>(), cfg.s1_n, cfg.s1_v, in.y.data_ptr<std::int64_t>(), -100,
                                     nullptr, lp.data(), ent.data());
    }
  }
  std::printf("%ld\n", std::max(0L, peak_bytes() - before));
  return 0;
}

double mib(double bytes) { return bytes / (1024.0 * 1024.0); }

void print_summary(const char* self) {
  auto& t = timings();
  const auto get = [&](const std::string& k) { return t.count(k) ? t[k] : 0.0; };
  std::printf("\n=== summary (mean ms per call; threads = %d; floor = max(stream, exp)) ===\n", kernels::num_threads());
  struct row {
    std::string scenario, name;
    double scale;  // rows of this case / rows of the scenario
  };
  const double g1 = static_cast<double>(cfg.s1_generic_n) / static_cast<double>(cfg.s1_n);
  const double g2 = static_cast<double>(cfg.s2_generic_n) / static_cast<double>(cfg.s2_n);
  const std::vector<row> rows = {{"S1", "S1 naive LibTorch", 1},
                                 {"S1", "S1 posttrain generic (Eigen, few rows)", g1},
                                 {"S1", "S1 posttrain API on torch", 1},
                                 {"S1", "S1 posttrain token_logprobs_and_entropy", 1},
                                 {"S1", "S1 posttrain token_logprobs_and_entropy, std::thread per call", 1},
                                 {"S1", "S1 posttrain sft_loss forward on torch", 1},
                                 {"S1", "S1 fused kernel (one pass)", 1},
                                 {"S1bf", "S1 bf16 naive LibTorch", 1},
                                 {"S1bf", "S1 bf16 posttrain API on torch", 1},
                                 {"S1bf", "S1 bf16 posttrain token_logprobs_and_entropy", 1},
                                 {"S1bf", "S1 bf16 token_logprobs_and_entropy, old widening buffer", 1},
                                 {"S1bf", "S1 fp16 token_logprobs_and_entropy (native)", 1},
                                 {"S1bf", "S1 fp16 token_logprobs_and_entropy, old widening buffer", 1},
                                 {"S1bfw", "S1 bf16 sft_loss_backward (native)", 1},
                                 {"S1bfw", "S1 bf16 sft_loss_backward, old widening buffer", 1},
                                 {"S1bfw", "S1 fp16 sft_loss_backward (native)", 1},
                                 {"S1bfw", "S1 fp16 sft_loss_backward, old widening buffer", 1},
                                 {"S2", "S2 naive LibTorch", 1},
                                 {"S2", "S2 posttrain generic (Eigen, few rows)", g2},
                                 {"S2", "S2 posttrain sft_loss on torch + backward()", 1},
                                 {"S2", "S2 posttrain sft_loss on torch + backward(), in place", 1},
                                 {"S2", "S2 posttrain sft_loss + sft_loss_backward on torch", 1},
                                 {"S2", "S2 fused kernel, into a buffer", 1},
                                 {"S2", "S2 fused kernel, in place", 1}};
  const double f1 = std::max(get("S1 floor: read"), get("S1 floor: exp"));
  const double f1b = std::max(get("S1 bf16 floor: read"), get("S1 floor: exp"));
  const double f2 = std::max(get("S2 floor: read+write"), get("S2 floor: exp"));
  std::printf("S1 floor: read %.1f ms, exp %.1f ms -> %.1f ms | S1 bf16 floor: read %.1f ms -> %.1f ms\n",
              1e3 * get("S1 floor: read"), 1e3 * get("S1 floor: exp"), 1e3 * f1, 1e3 * get("S1 bf16 floor: read"),
              1e3 * f1b);
  std::printf("S2 floor: read+write %.1f ms, exp %.1f ms -> %.1f ms\n", 1e3 * get("S2 floor: read+write"),
              1e3 * get("S2 floor: exp"), 1e3 * f2);
  std::printf("%-46s %12s %10s %14s\n", "case", "ms", "x floor", "speed-up vs naive");
  for (const auto& r : rows) {
    if (!t.count(r.name)) continue;
    // S1bfw (a bf16 gradient): its floor is the bf16 read floor too (a lower bound: the write is not in it).
    const double floor = (r.scenario == "S1" ? f1 : r.scenario == "S1bf" || r.scenario == "S1bfw" ? f1b : f2) * r.scale;
    const std::string naive = r.scenario == "S1"                              ? "S1 naive LibTorch"
                              : r.scenario == "S1bf" || r.scenario == "S1bfw" ? "S1 bf16 naive LibTorch"
                                                                              : "S2 naive LibTorch";
    // Per-row time, so the few-row generic path compares with the full-size naive one.
    const double speedup = get(naive) / (get(r.name) / r.scale);
    std::printf("%-46s %12.1f %10.2f %14.2f\n", r.name.c_str(), 1e3 * get(r.name), get(r.name) / floor, speedup);
  }
  if (t.count("T small x100, LibTorch pool") && t.count("T small x100, std::thread per call")) {
    std::printf("\nthreads (kernels on LibTorch's intra-op pool vs a std::thread per call, same count %d):\n",
                kernels::num_threads());
    std::printf("  small 64 x 4096, 100 calls: pool %.2f ms, thread per call %.2f ms -> pool / old %.2f\n",
                1e3 * get("T small x100, LibTorch pool"), 1e3 * get("T small x100, std::thread per call"),
                get("T small x100, LibTorch pool") / get("T small x100, std::thread per call"));
    if (t.count("S1 posttrain token_logprobs_and_entropy, std::thread per call"))
      std::printf("  S1 one call: pool %.1f ms, thread per call %.1f ms -> pool / old %.2f\n",
                  1e3 * get("S1 posttrain token_logprobs_and_entropy"),
                  1e3 * get("S1 posttrain token_logprobs_and_entropy, std::thread per call"),
                  get("S1 posttrain token_logprobs_and_entropy") /
                      get("S1 posttrain token_logprobs_and_entropy, std::thread per call"));
  }
  if (t.count("small sft_loss + backward x100") && t.count("small cross_entropy + backward x100"))
    std::printf(
        "\nsmall batch [64, 12, 64], 100 steps: sft_loss + backward %.2f ms, LibTorch cross_entropy + backward "
        "%.2f ms -> %.2fx\n",
        1e3 * get("small sft_loss + backward x100"), 1e3 * get("small cross_entropy + backward x100"),
        get("small sft_loss + backward x100") / get("small cross_entropy + backward x100"));
  if (t.count("S1 CUDA floor: read")) {
    std::printf("\n=== CUDA (mean ms per call incl. synchronize; floor = LibTorch's read / read+write) ===\n");
    struct cuda_row {
      const char *name, *floor, *naive;
    };
    const std::vector<cuda_row> cuda_rows = {
        {"S1 CUDA naive LibTorch", "S1 CUDA floor: read", "S1 CUDA naive LibTorch"},
        {"S1 CUDA posttrain chunked", "S1 CUDA floor: read", "S1 CUDA naive LibTorch"},
        {"S1 CUDA bf16 naive LibTorch", "S1 CUDA bf16 floor: read", "S1 CUDA bf16 naive LibTorch"},
        {"S1 CUDA bf16 posttrain chunked", "S1 CUDA bf16 floor: read", "S1 CUDA bf16 naive LibTorch"},
        {"S2 CUDA naive LibTorch", "S2 CUDA floor: read+write", "S2 CUDA naive LibTorch"},
        {"S2 CUDA posttrain sft_loss + backward()", "S2 CUDA floor: read+write", "S2 CUDA naive LibTorch"},
        {"S2 CUDA posttrain sft_loss + sft_loss_backward", "S2 CUDA floor: read+write", "S2 CUDA naive LibTorch"}};
    std::printf("floors: S1 read %.3f ms, S1 bf16 read %.3f ms, S2 read+write %.3f ms\n",
                1e3 * get("S1 CUDA floor: read"), 1e3 * get("S1 CUDA bf16 floor: read"),
                1e3 * get("S2 CUDA floor: read+write"));
    std::printf("%-46s %12s %10s %14s\n", "case", "ms", "x floor", "speed-up vs naive");
    for (const auto& r : cuda_rows) {
      if (!t.count(r.name)) continue;
      std::printf("%-46s %12.3f %10.2f %14.2f\n", r.name, 1e3 * get(r.name), get(r.name) / get(r.floor),
                  get(r.naive) / get(r.name));
    }
  }
  // Peak memory: each case in a fresh process.
  if (!cfg.peak_memory) return;
  std::printf("\n=== peak extra memory (VmHWM - RSS before the call, HWM reset first, fresh process per case) ===\n");
  const double grad_bytes = static_cast<double>(cfg.s2_n * cfg.s2_v) * 4.0;
  std::printf("S2 lower bound (the gradient buffer, in place: 0): %.1f MiB\n", mib(grad_bytes));
  for (const auto& name : memory_cases) {
    std::string cmd = std::string(self) + " --threads=" + std::to_string(kernels::num_threads()) +
                      (cfg.quick ? " --quick" : "") + " '--peak-memory=" + name + "'";
    double bytes = -1;
    if (FILE* p = popen(cmd.c_str(), "r")) {
      if (std::fscanf(p, "%lf", &bytes) != 1) bytes = -1;
      pclose(p);
    }
    std::printf("%-46s %10.1f MiB\n", name.c_str(), mib(bytes));
  }
}

}  // namespace

int main(int argc, char** argv) {
  // A warm allocator for every case: freed blocks stay in the heap instead of going back to the
  // kernel, so repeated N x V temporaries do not pay fresh page faults (anchors §7).
  mallopt(M_MMAP_THRESHOLD, 1 << 30);
  mallopt(M_TRIM_THRESHOLD, -1);
  mallopt(M_TOP_PAD, 64 << 20);

  std::vector<char*> rest;
  std::string peak_case;
  std::int64_t s1_rows = 0;
  for (int i = 0; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick")
      cfg.quick = true;
    else if (a == "--no-peak-memory")
      cfg.peak_memory = false;
    else if (a.rfind("--threads=", 0) == 0)
      cfg.threads = std::atoi(a.c_str() + 10);
    else if (a.rfind("--iterations=", 0) == 0)
      cfg.iterations = std::max(1, std::atoi(a.c_str() + 13));
    else if (a.rfind("--s1-rows=", 0) == 0)
      s1_rows = std::max<std::int64_t>(1, std::atoll(a.c_str() + 10));
    else if (a.rfind("--peak-memory=", 0) == 0)
      peak_case = a.substr(14);
    else
      rest.push_back(argv[i]);
  }
  if (cfg.quick) {
    cfg.s1_n = 16, cfg.s1_v = 4099, cfg.s1_generic_n = 4;
    cfg.s2_n = 16, cfg.s2_v = 3001, cfg.s2_generic_n = 4;
    cfg.iterations = 1;
  }
  if (s1_rows > 0) cfg.s1_n = s1_rows;  // --s1-rows=N: a reduced S1 (N x V) where the full size is too slow
  kernels::set_num_threads(cfg.threads);
  at::set_num_threads(kernels::num_threads());
  if (!peak_case.empty()) return run_peak_memory(peak_case);

  const auto reg = [](const std::string& name, auto fn) {
    benchmark::RegisterBenchmark(name.c_str(), fn)
        ->Iterations(cfg.iterations)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
  };
  reg("S1/floor_read", [](benchmark::State& s) { s1_floor_read(s, false); });
  reg("S1/floor_read_bf16", [](benchmark::State& s) { s1_floor_read(s, true); });
  reg("S1/floor_exp", s1_floor_exp);
  reg("S1/naive_libtorch_fp32", [](benchmark::State& s) { s1_naive(s, false); });
  reg("S1/posttrain_generic_eigen_fp32", s1_generic);
  reg("S1/posttrain_api_torch_fp32", [](benchmark::State& s) { s1_posttrain_torch(s, false); });
  reg("S1/posttrain_one_call_torch_fp32", [](benchmark::State& s) { s1_posttrain_one_call(s, false); });
  reg("S1/posttrain_one_call_torch_fp32_thread_per_call", threads_large);
  reg("T/small_one_call_pool", [](benchmark::State& s) { threads_small(s, true); });
  reg("small/sft_loss_fwd_bwd_x100", [](benchmark::State& s) { small_sft(s, true); });
  reg("small/cross_entropy_fwd_bwd_x100", [](benchmark::State& s) { small_sft(s, false); });
  reg("small/sft_loss_composition_fwd_bwd_x100", [](benchmark::State& s) { small_sft(s, true, true); });
  reg("T/small_one_call_thread_per_call", [](benchmark::State& s) { threads_small(s, false); });
  reg("S1/posttrain_sft_loss_forward_torch_fp32", s1_sft_forward);
  reg("S1/fused_kernel_fp32", s1_fused);
  reg("S1/naive_libtorch_bf16", [](benchmark::State& s) { s1_naive(s, true); });
  reg("S1/posttrain_api_torch_bf16", [](benchmark::State& s) { s1_posttrain_torch(s, true); });
  reg("S1/posttrain_one_call_torch_bf16", [](benchmark::State& s) { s1_posttrain_one_call(s, true); });
  reg("S1/posttrain_one_call_torch_bf16_old_widening", [](benchmark::State& s) { s1_half_one_call(s, false, true); });
  reg("S1/posttrain_one_call_torch_fp16", [](benchmark::State& s) { s1_half_one_call(s, true, false); });
  reg("S1/posttrain_one_call_torch_fp16_old_widening", [](benchmark::State& s) { s1_half_one_call(s, true, true); });
  reg("S1/sft_loss_backward_torch_bf16", [](benchmark::State& s) { s1_half_ce_backward(s, false, false); });
  reg("S1/sft_loss_backward_torch_bf16_old_widening", [](benchmark::State& s) { s1_half_ce_backward(s, false, true); });
  reg("S1/sft_loss_backward_torch_fp16", [](benchmark::State& s) { s1_half_ce_backward(s, true, false); });
  reg("S1/sft_loss_backward_torch_fp16_old_widening", [](benchmark::State& s) { s1_half_ce_backward(s, true, true); });
  reg("S2/floor_read_write", s2_floor_copy);
  reg("S2/floor_exp", s2_floor_exp);
  reg("S2/naive_libtorch_ce_fwd_bwd", s2_naive);
  reg("S2/posttrain_generic_eigen", s2_generic);
  reg("S2/posttrain_sft_loss_torch_fwd_bwd", [](benchmark::State& s) { s2_posttrain_torch(s); });
  reg("S2/posttrain_sft_loss_torch_fwd_bwd_composition", [](benchmark::State& s) { s2_posttrain_torch(s, true); });
  reg("S2/posttrain_sft_loss_torch_fwd_bwd_in_place", s2_posttrain_torch_in_place);
  reg("S2/fused_kernel_buffer", [](benchmark::State& s) { s2_fused(s, false); });
  reg("S2/fused_kernel_in_place", [](benchmark::State& s) { s2_fused(s, true); });
  reg("S2/posttrain_sft_loss_fused_backward_torch", s2_posttrain_torch_fused_backward);
  if (torch::cuda::is_available()) {
    reg("S1/cuda_floor_read_fp32", [](benchmark::State& s) { cuda_s1_floor(s, false); });
    reg("S1/cuda_floor_read_bf16", [](benchmark::State& s) { cuda_s1_floor(s, true); });
    reg("S1/cuda_naive_libtorch_fp32", [](benchmark::State& s) { cuda_s1_naive(s, false); });
    reg("S1/cuda_posttrain_chunked_fp32", [](benchmark::State& s) { cuda_s1_posttrain(s, false); });
    reg("S1/cuda_naive_libtorch_bf16", [](benchmark::State& s) { cuda_s1_naive(s, true); });
    reg("S1/cuda_posttrain_chunked_bf16", [](benchmark::State& s) { cuda_s1_posttrain(s, true); });
    reg("S2/cuda_floor_read_write", cuda_s2_floor);
    reg("S2/cuda_naive_libtorch_ce_fwd_bwd", cuda_s2_naive);
    reg("S2/cuda_posttrain_sft_loss_autograd", [](benchmark::State& s) { cuda_s2_posttrain(s, true); });
    reg("S2/cuda_posttrain_sft_loss_fused_backward", [](benchmark::State& s) { cuda_s2_posttrain(s, false); });
  } else {
    std::printf("CUDA cases skipped: torch::cuda::is_available() is false\n");
  }

  int n = static_cast<int>(rest.size());
  benchmark::Initialize(&n, rest.data());
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  print_summary(argv[0]);
  return 0;
}
