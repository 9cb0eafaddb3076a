// posttrain's fused linear cross-entropy benchmarks (Google Benchmark, in posttrain_bench beside
// bench_logits.cpp), every candidate beside its baselines in one process:
//   gemm alone   the same three GEMMs at full size with Eigen on the same threads: Z = X·Wᵀ,
//                ∂X = G·W, ∂W = Gᵀ·X (6·N·H·V flops; each split over the threads along a non-reduced
//                dimension) — the floor the fused call is held to (target <= 1.3x)
//   fused        kernels::linear_cross_entropy into preallocated gradients, and the public API on
//                LibTorch tensors (posttrain::fused_linear_cross_entropy(...).loss.backward())
//   logprobs     posttrain::fused_linear_logprobs(...) with L = -mean(lp) - 0.01·mean(H) + backward(), beside
//                its unfused LibTorch composition (matmul, log_softmax, gather, entropy) at naive_n rows
//   naive        at::matmul + at::cross_entropy_loss + backward() at the same threads. This LibTorch's
//                float32 GEMM is netlib reference BLAS (~5 GFLOPS, anchors §7), so the naive case runs
//                at `naive_n` rows only and is compared per token
// Scenarios: S3 N=2048, H=896, V=151936 (Qwen2.5-0.5B head); S4 N=256, H=4096, V=128256 (Llama-3-8B
// head); float32. After main's own summary, this file's summary (at exit) and the peak extra
// memory of each case, each in a fresh child process (this binary with --flce-peak-memory=CASE,
// handled before main runs) that builds its inputs, resets the resident high-water mark
// (/proc/self/clear_refs "5", as bench_logits.cpp) and reports VmHWM minus the resident set just
// before the call, against the lower bound (N·H + V·H)·4 bytes (the two gradients).
//
// This file does not touch main(): it reads the command line (--quick, --threads=N,
// --flce-peak-memory=CASE) from /proc/self/cmdline when its benchmarks are registered at start-up.
#include <benchmark/benchmark.h>
#include <torch/cuda.h>
#include <torch/torch.h>
#include <unistd.h>

#include <Eigen/Core>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "peak_memory.hpp"
#include "posttrain/backends/torch.hpp"
#include "posttrain/backends/torch/fused_linear_ce.hpp"
#include "posttrain/backends/torch/fused_linear_logprobs.hpp"
#include "posttrain/kernels/linear_ce_cpu.hpp"
#include "posttrain/losses/fused_linear_ce.hpp"
#include "timing.hpp"

namespace {

using namespace posttrain;
using row_matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using const_map = Eigen::Map<const row_matrix, 0, Eigen::OuterStride<>>;
using map = Eigen::Map<row_matrix, 0, Eigen::OuterStride<>>;

struct shape {
  std::int64_t n, h, v, naive_n;
};
struct config {
  bool quick = false;
  bool peak_memory = true;  // --no-peak-memory (bench_logits.cpp's flag) skips the fresh-process runs
  int threads = 0;
  std::string peak_case;
  shape s3{2048, 896, 151936, 16};
  shape s4{256, 4096, 128256, 8};
  int iterations = 2;
};

/// The command line as main will see it, read before main runs.
config read_config() {
  config c;
  std::ifstream f("/proc/self/cmdline", std::ios::binary);
  std::string arg;
  while (std::getline(f, arg, '\0')) {
    if (arg == "--quick")
      c.quick = true;
    else if (arg.rfind("--threads=", 0) == 0)
      c.threads = std::atoi(arg.c_str() + 10);
    else if (arg == "--no-peak-memory")
      c.peak_memory = false;
    else if (arg.rfind("--flce-peak-memory=", 0) == 0)
      c.peak_case = arg.substr(19);
  }
  if (c.quick) {
    c.s3 = {8, 16, 1001, 4};
    c.s4 = {4, 32, 777, 2};
    c.iterations = 1;
  }
  return c;
}
config& cfg() {
  static config c = read_config();
  return c;
}
const shape& shape_of(const std::string& scenario) { return scenario == "S3" ? cfg().s3 : cfg().s4; }

std::map<std::string, double>& timings() {
  static std::map<std::string, double> t;
  return t;
}

using posttrain_bench::timed;

// ---- inputs (built once per scenario) -----------------------------------------------------------

struct inputs {
  at::Tensor x, w, y;  // hidden [N, H] ~ N(0, 1), head [V, H] ~ N(0, 3/√H) (logits of spread ~3), labels [N]
  static inputs& get(const std::string& scenario) {
    static std::map<std::string, inputs> all;
    auto it = all.find(scenario);
    if (it != all.end()) return it->second;
    const shape& s = shape_of(scenario);
    at::manual_seed(scenario == "S3" ? 3 : 4);
    inputs in;
    in.x = at::randn({s.n, s.h}, at::kFloat);
    in.w = at::randn({s.v, s.h}, at::kFloat) * (3.0 / std::sqrt(static_cast<double>(s.h)));
    in.y = at::randint(0, s.v, {s.n}, at::kLong);
    return all.emplace(scenario, std::move(in)).first->second;
  }
};

/// Calls f(part) for part in [0, parts) on `parts` threads.
template <class F>
void on_threads(int parts, F&& f) {
  std::vector<std::thread> pool;
  for (int p = 1; p < parts; ++p) pool.emplace_back([&f, p] { f(p); });
  f(0);
  for (auto& t : pool) t.join();
}
std::pair<std::int64_t, std::int64_t> split(std::int64_t n, int parts, int p) {
  return {n * p / parts, n * (p + 1) / parts};
}

/// The three GEMMs of the fused call at full size, each split over the threads along a dimension
/// it does not reduce: Z = X·Wᵀ by vocabulary columns; ∂X = G·W by rows of X when N >= H (each
/// part then reads W once), by columns of H otherwise (each part reads G once); ∂W = Gᵀ·X by
/// vocabulary rows. G is Z itself (the values do not change the work).
void gemm_alone(const float* x, const float* w, float* z, float* dx, float* dw, const shape& s) {
  const std::int64_t N = s.n, H = s.h, V = s.v;
  const int T = kernels::num_threads();
  on_threads(T, [&](int p) {
    const auto [v0, v1] = split(V, T, p);
    map(z + v0, N, v1 - v0, Eigen::OuterStride<>(V)).noalias() =
        const_map(x, N, H, Eigen::OuterStride<>(H)) *
        const_map(w + v0 * H, v1 - v0, H, Eigen::OuterStride<>(H)).transpose();
  });
  on_threads(T, [&](int p) {
    if (N >= H) {
      const auto [r0, r1] = split(N, T, p);
      map(dx + r0 * H, r1 - r0, H, Eigen::OuterStride<>(H)).noalias() =
          const_map(z + r0 * V, r1 - r0, V, Eigen::OuterStride<>(V)) * const_map(w, V, H, Eigen::OuterStride<>(H));
    } else {
      const auto [h0, h1] = split(H, T, p);
      map(dx + h0, N, h1 - h0, Eigen::OuterStride<>(H)).noalias() =
          const_map(z, N, V, Eigen::OuterStride<>(V)) * const_map(w + h0, V, h1 - h0, Eigen::OuterStride<>(H));
    }
  });
  on_threads(T, [&](int p) {
    const auto [v0, v1] = split(V, T, p);
    map(dw + v0 * H, v1 - v0, H, Eigen::OuterStride<>(H)).noalias() =
        const_map(z + v0, N, v1 - v0, Eigen::OuterStride<>(V)).transpose() *
        const_map(x, N, H, Eigen::OuterStride<>(H));
  });
}

double flops(const shape& s, std::int64_t rows) {
  return 6.0 * static_cast<double>(rows) * static_cast<double>(s.h) * static_cast<double>(s.v);
}

void bench_gemm(benchmark::State& st, const std::string& sc) {
  auto& in = inputs::get(sc);
  const shape& s = shape_of(sc);
  std::vector<float> z(static_cast<std::size_t>(s.n * s.v), 0.001f), dx(static_cast<std::size_t>(s.n * s.h)),
      dw(static_cast<std::size_t>(s.v * s.h));
  timed(st, timings(), sc + " gemm alone (Eigen, 3 GEMMs)",
        [&] { gemm_alone(in.x.data_ptr<float>(), in.w.data_ptr<float>(), z.data(), dx.data(), dw.data(), s); });
  st.counters["GFLOPS"] =
      benchmark::Counter(flops(s, s.n) * static_cast<double>(st.iterations()) / 1e9, benchmark::Counter::kIsRate);
}

void bench_fused(benchmark::State& st, const std::string& sc) {
  auto& in = inputs::get(sc);
  const shape& s = shape_of(sc);
  std::vector<float> dx(static_cast<std::size_t>(s.n * s.h)), dw(static_cast<std::size_t>(s.v * s.h), 0.0f),
      loss(static_cast<std::size_t>(s.n)), lp(loss.size()), ent(loss.size());
  timed(st, timings(), sc + " fused kernel", [&] {
    // ∂W accumulates across iterations: the same work as into a zeroed buffer.
    const auto t = kernels::linear_cross_entropy<float>(
        in.x.data_ptr<float>(), in.w.data_ptr<float>(), s.n, s.h, s.v, in.y.data_ptr<std::int64_t>(), {},
        1.0 / static_cast<double>(s.n), {loss.data(), lp.data(), ent.data(), dx.data(), dw.data()});
    benchmark::DoNotOptimize(t.loss_sum);
  });
  st.counters["GFLOPS"] =
      benchmark::Counter(flops(s, s.n) * static_cast<double>(st.iterations()) / 1e9, benchmark::Counter::kIsRate);
}

void bench_torch_api(benchmark::State& st, const std::string& sc) {
  auto& in = inputs::get(sc);
  const at::Tensor x = in.x.detach().requires_grad_(), w = in.w.detach().requires_grad_();
  const auto step = [&] {
    x.mutable_grad() = at::Tensor();  // a trainer that sets .grad to None: a fresh gradient per step
    w.mutable_grad() = at::Tensor();
    posttrain::fused_linear_cross_entropy(x, w, in.y).loss.backward();
    benchmark::DoNotOptimize(w.grad().data_ptr());
  };
  // One untimed step first (a trainer's steady state): on the test VM the first touch of memory
  // the process has not used recently costs ~2 s per GiB (the host backs it on demand), which the
  // first step of any trainer pays once; the cases above write into buffers already touched.
  step();
  timed(st, timings(), sc + " posttrain API on torch + backward()", step);
}

/// matmul + cross_entropy + backward() on the first naive_n rows (see the file comment).
void naive_step(const at::Tensor& x, const at::Tensor& w, const at::Tensor& y) {
  at::cross_entropy_loss(at::matmul(x, w.t()), y).backward();
}
void bench_naive(benchmark::State& st, const std::string& sc) {
  auto& in = inputs::get(sc);
  const shape& s = shape_of(sc);
  const at::Tensor x = in.x.slice(0, 0, s.naive_n).detach().clone().requires_grad_();
  const at::Tensor w = in.w.detach().requires_grad_();
  const at::Tensor y = in.y.slice(0, 0, s.naive_n).clone();
  timed(st, timings(), sc + " naive LibTorch (naive_n rows)", [&] {
    x.mutable_grad() = at::Tensor();
    w.mutable_grad() = at::Tensor();
    naive_step(x, w, y);
    benchmark::DoNotOptimize(w.grad().data_ptr());
  });
}

// ---- fused_linear_logprobs (the RL losses' input): the public call vs the unfused composition ---------
// The objective reads both outputs, as a policy loss with an entropy bonus does: L = -mean(lp) - 0.01·mean(H).

/// L from log-probs and entropy [N].
at::Tensor logprobs_objective(const at::Tensor& lp, const at::Tensor& ent) { return -lp.mean() - 0.01 * ent.mean(); }

void bench_logprobs_api(benchmark::State& st, const std::string& sc) {
  auto& in = inputs::get(sc);
  const at::Tensor x = in.x.detach().requires_grad_(), w = in.w.detach().requires_grad_();
  const auto step = [&] {
    x.mutable_grad() = at::Tensor();
    w.mutable_grad() = at::Tensor();
    const auto r = posttrain::fused_linear_logprobs(x, w, in.y);
    logprobs_objective(r.logprobs, r.entropy).backward();
    benchmark::DoNotOptimize(w.grad().data_ptr());
  };
  step();  // untimed first step (first touch of the gradients' memory; see bench_torch_api)
  timed(st, timings(), sc + " posttrain fused_linear_logprobs + backward()", step);
}

/// matmul, log_softmax, gather and the entropy from the same log_softmax, + backward(), on naive_n rows.
void naive_logprobs_step(const at::Tensor& x, const at::Tensor& w, const at::Tensor& y) {
  const at::Tensor logp = at::log_softmax(at::matmul(x, w.t()), -1);
  const at::Tensor lp = logp.gather(-1, y.unsqueeze(-1)).squeeze(-1);
  const at::Tensor ent = -(logp.exp() * logp).sum(-1);
  logprobs_objective(lp, ent).backward();
}
void bench_logprobs_naive(benchmark::State& st, const std::string& sc) {
  auto& in = inputs::get(sc);
  const shape& s = shape_of(sc);
  const at::Tensor x = in.x.slice(0, 0, s.naive_n).detach().clone().requires_grad_();
  const at::Tensor w = in.w.detach().requires_grad_();
  const at::Tensor y = in.y.slice(0, 0, s.naive_n).clone();
  timed(st, timings(), sc + " naive LibTorch logprobs (naive_n rows)", [&] {
    x.mutable_grad() = at::Tensor();
    w.mutable_grad() = at::Tensor();
    naive_logprobs_step(x, w, y);
    benchmark::DoNotOptimize(w.grad().data_ptr());
  });
}

// ---- peak memory in a fresh child ----------------------------------------------------------------

using posttrain_bench::peak_bytes;
using posttrain_bench::reset_peak;

const std::vector<std::string> memory_cases = {"S3 fused kernel",
                                               "S3 posttrain API on torch + backward()",
                                               "S3 naive LibTorch (naive_n rows)",
                                               "S4 fused kernel",
                                               "S4 posttrain API on torch + backward()",
                                               "S4 naive LibTorch (naive_n rows)",
                                               "S3 posttrain fused_linear_logprobs + backward()",
                                               "S3 naive LibTorch logprobs (naive_n rows)",
                                               "S4 posttrain fused_linear_logprobs + backward()",
                                               "S4 naive LibTorch logprobs (naive_n rows)"};

/// Runs one case once in this (fresh) process and prints its peak extra bytes.
int run_peak_memory(const std::string& name) {
  kernels::set_num_threads(cfg().threads);
  at::set_num_threads(kernels::num_threads());
  const std::string sc = name.substr(0, 2);
  auto& in = inputs::get(sc);
  const shape& s = shape_of(sc);
  long before = 0;
  if (name == sc + " fused kernel") {
    before = reset_peak();
    // The gradients are outputs the caller needs: allocated and zeroed inside the measurement.
    std::vector<float> dx(static_cast<std::size_t>(s.n * s.h)), dw(static_cast<std::size_t>(s.v * s.h), 0.0f),
        loss(static_cast<std::size_t>(s.n));
    const auto t = kernels::linear_cross_entropy<float>(
        in.x.data_ptr<float>(), in.w.data_ptr<float>(), s.n, s.h, s.v, in.y.data_ptr<std::int64_t>(), {},
        1.0 / static_cast<double>(s.n), {loss.data(), nullptr, nullptr, dx.data(), dw.data()});
    benchmark::DoNotOptimize(t.loss_sum);
  } else if (name == sc + " posttrain API on torch + backward()") {
    const at::Tensor x = in.x.detach().requires_grad_(), w = in.w.detach().requires_grad_();
    before = reset_peak();
    posttrain::fused_linear_cross_entropy(x, w, in.y).loss.backward();
  } else if (name == sc + " posttrain fused_linear_logprobs + backward()") {
    const at::Tensor x = in.x.detach().requires_grad_(), w = in.w.detach().requires_grad_();
    before = reset_peak();
    const auto r = posttrain::fused_linear_logprobs(x, w, in.y);
    logprobs_objective(r.logprobs, r.entropy).backward();
  } else {
    const at::Tensor x = in.x.slice(0, 0, s.naive_n).detach().clone().requires_grad_();
    const at::Tensor w = in.w.detach().requires_grad_();
    const at::Tensor y = in.y.slice(0, 0, s.naive_n).clone();
    before = reset_peak();
    if (name == sc + " naive LibTorch logprobs (naive_n rows)")
      naive_logprobs_step(x, w, y);
    else
      naive_step(x, w, y);
  }
  std::printf("%ld\n", std::max(0L, peak_bytes() - before));
  std::fflush(stdout);
  return 0;
}

// ---- CUDA (runs only where torch::cuda::is_available(); NOT verified in this repository's CI) -----
// The same scenarios on the GPU in float32 and bfloat16: cuBLAS's three GEMMs alone (the floor),
// the naive at::matmul + at::cross_entropy_loss + backward() at full N, and posttrain's API, whose
// CUDA path is the chunked LibTorch-op algorithm (backends/torch/fused_linear_ce.hpp). Each call is
// followed by torch::cuda::synchronize(); one untimed call first warms the caching allocator.

struct cuda_inputs {
  at::Tensor x, w, y;
  static cuda_inputs& get(const std::string& scenario, bool bf16) {
    static std::map<std::string, cuda_inputs> all;
    const std::string key = scenario + (bf16 ? "bf16" : "fp32");
    auto it = all.find(key);
    if (it != all.end()) return it->second;
    const inputs& in = inputs::get(scenario);
    const at::ScalarType dt = bf16 ? at::kBFloat16 : at::kFloat;
    cuda_inputs c{in.x.to(at::kCUDA, dt), in.w.to(at::kCUDA, dt), in.y.to(at::kCUDA)};
    torch::cuda::synchronize();
    return all.emplace(key, std::move(c)).first->second;
  }
};
std::string cuda_name(const std::string& sc, bool bf16, const std::string& what) {
  return sc + " CUDA " + (bf16 ? "bf16 " : "fp32 ") + what;
}
template <class F>
void timed_cuda(benchmark::State& st, const std::string& name, F&& body) {
  body();
  torch::cuda::synchronize();
  timed(st, timings(), name, [&] {
    body();
    torch::cuda::synchronize();
  });
}
void cuda_gemm(benchmark::State& st, const std::string& sc, bool bf16) {
  auto& in = cuda_inputs::get(sc, bf16);
  timed_cuda(st, cuda_name(sc, bf16, "3 GEMMs (cuBLAS)"), [&] {
    const at::Tensor z = at::matmul(in.x, in.w.t());  // [N, V], stands in for G below
    const at::Tensor gx = at::matmul(z, in.w);        // [N, H]
    const at::Tensor gw = at::matmul(z.t(), in.x);    // [V, H]
    benchmark::DoNotOptimize(gx.data_ptr());
    benchmark::DoNotOptimize(gw.data_ptr());
  });
}
void cuda_naive(benchmark::State& st, const std::string& sc, bool bf16) {
  auto& in = cuda_inputs::get(sc, bf16);
  const at::Tensor x = in.x.detach().requires_grad_(), w = in.w.detach().requires_grad_();
  timed_cuda(st, cuda_name(sc, bf16, "naive LibTorch"), [&] {
    x.mutable_grad() = at::Tensor();
    w.mutable_grad() = at::Tensor();
    at::cross_entropy_loss(at::matmul(x, w.t()), in.y).backward();
    benchmark::DoNotOptimize(w.grad().data_ptr());
  });
}
void cuda_api(benchmark::State& st, const std::string& sc, bool bf16) {
  auto& in = cuda_inputs::get(sc, bf16);
  const at::Tensor x = in.x.detach().requires_grad_(), w = in.w.detach().requires_grad_();
  timed_cuda(st, cuda_name(sc, bf16, "posttrain API + backward()"), [&] {
    x.mutable_grad() = at::Tensor();
    w.mutable_grad() = at::Tensor();
    posttrain::fused_linear_cross_entropy(x, w, in.y).loss.backward();
    benchmark::DoNotOptimize(w.grad().data_ptr());
  });
}

/// The CUDA cases' summary (only where they ran): ms per call, ratio to the GEMMs, speed-up over naive.
void print_cuda_summary() {
  auto& t = timings();
  bool header = false;
  for (const std::string sc : {"S3", "S4"}) {
    for (const bool bf16 : {false, true}) {
      const std::string g = cuda_name(sc, bf16, "3 GEMMs (cuBLAS)");
      if (!t.count(g)) continue;
      if (!header) {
        std::printf("\n=== CUDA fused linear cross-entropy (mean ms per call, synchronised) ===\n");
        header = true;
      }
      const std::string naive = cuda_name(sc, bf16, "naive LibTorch");
      for (const std::string c : {"3 GEMMs (cuBLAS)", "naive LibTorch", "posttrain API + backward()"}) {
        const std::string name = cuda_name(sc, bf16, c);
        if (!t.count(name)) continue;
        std::printf("  %-52s %10.2f ms %8.2fx gemm %8.2fx faster than naive\n", name.c_str(), t[name] * 1e3,
                    t[name] / t[g], t.count(naive) ? t[naive] / t[name] : 0.0);
      }
    }
  }
}

double mib(double bytes) { return bytes / (1024.0 * 1024.0); }

/// This file's summary, printed at exit after main's (only when its cases ran).
void print_summary() {
  auto& t = timings();
  if (t.empty()) return;
  print_cuda_summary();
  const auto get = [&](const std::string& k) { return t.count(k) ? t[k] : 0.0; };
  std::printf("\n=== fused linear cross-entropy (S3/S4, float32, threads = %d; mean s per call) ===\n",
              kernels::num_threads());
  for (const std::string sc : {"S3", "S4"}) {
    const shape& s = shape_of(sc);
    const double gemm = get(sc + " gemm alone (Eigen, 3 GEMMs)");
    if (gemm <= 0) continue;
    std::printf("%s: N=%lld H=%lld V=%lld, 6NHV = %.3g flop; gemm alone %.3f s (%.1f GFLOPS)\n", sc.c_str(),
                static_cast<long long>(s.n), static_cast<long long>(s.h), static_cast<long long>(s.v), flops(s, s.n),
                gemm, flops(s, s.n) / gemm / 1e9);
    const double naive_per_row = get(sc + " naive LibTorch (naive_n rows)") / static_cast<double>(s.naive_n);
    std::printf("  %-44s %10s %10s %10s %18s\n", "case", "s", "x gemm", "GFLOPS", "speed-up vs naive");
    const double naive_lp_per_row =
        get(sc + " naive LibTorch logprobs (naive_n rows)") / static_cast<double>(s.naive_n);
    for (const std::string c :
         {" fused kernel", " posttrain API on torch + backward()", " naive LibTorch (naive_n rows)",
          " posttrain fused_linear_logprobs + backward()", " naive LibTorch logprobs (naive_n rows)"}) {
      const std::string name = sc + c;
      if (!t.count(name)) continue;
      const bool naive = c.find("naive") != std::string::npos;
      const bool logprobs = c.find("logprobs") != std::string::npos;  // its own naive baseline
      const double rows = naive ? static_cast<double>(s.naive_n) : static_cast<double>(s.n);
      const double per_row = t[name] / rows;
      const std::string label = naive ? sc + (logprobs ? " naive LibTorch logprobs (" : " naive LibTorch (") +
                                            std::to_string(s.naive_n) + " rows)"
                                      : name;
      std::printf("  %-44s %10.3f %10.2f %10.1f %18.1f\n", label.c_str(), t[name],
                  per_row * static_cast<double>(s.n) / gemm, flops(s, 1) * rows / t[name] / 1e9,
                  (logprobs ? naive_lp_per_row : naive_per_row) / per_row);
    }
  }
  if (!cfg().peak_memory) return;
  // This binary's own path (a "/proc/self/exe" inside popen's shell would name the shell).
  char buf[4096] = {};
  const ssize_t len = readlink("/proc/self/exe", buf, sizeof buf - 1);
  const std::string self = len > 0 ? std::string(buf, static_cast<std::size_t>(len)) : std::string("posttrain_bench");
  std::printf(
      "\n=== S3/S4 peak extra memory (VmHWM - RSS before the call, HWM reset first, fresh process per case) ===\n");
  for (const auto& name : memory_cases) {
    const std::string sc = name.substr(0, 2);
    const shape& s = shape_of(sc);
    if (get(sc + " gemm alone (Eigen, 3 GEMMs)") <= 0) continue;
    const double bound = static_cast<double>(s.n * s.h + s.v * s.h) * 4.0;
    const std::string cmd = self + " --threads=" + std::to_string(kernels::num_threads()) +
                            (cfg().quick ? " --quick" : "") + " '--flce-peak-memory=" + name + "'";
    double bytes = -1;
    if (FILE* p = popen(cmd.c_str(), "r")) {
      if (std::fscanf(p, "%lf", &bytes) != 1) bytes = -1;
      pclose(p);
    }
    const bool naive = name.find("naive") != std::string::npos;
    std::printf(
        "%-44s %10.1f MiB   lower bound (N·H + V·H)·4 = %.1f MiB -> %.2fx%s\n", name.c_str(), mib(bytes), mib(bound),
        bytes / bound,
        naive ? (" (at N=" + std::to_string(s.naive_n) + "; its [N, V] logits and their gradient grow with N)").c_str()
              : "");
  }
}

/// Registers the S3/S4 cases at start-up (or, in a --flce-peak-memory child, runs that case and exits).
const bool registered = [] {
  const config& c = cfg();
  if (!c.peak_case.empty()) std::_Exit(run_peak_memory(c.peak_case));
  const auto reg = [&](const std::string& name, void (*fn)(benchmark::State&, const std::string&),
                       const std::string& sc, int iterations) {
    benchmark::RegisterBenchmark(name.c_str(), fn, sc)
        ->Iterations(iterations)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
  };
  for (const std::string sc : {"S3", "S4"}) {
    reg(sc + "/gemm_alone_eigen_fp32", bench_gemm, sc, c.iterations);
    reg(sc + "/fused_kernel_fp32", bench_fused, sc, c.iterations);
    reg(sc + "/posttrain_api_torch_fwd_bwd", bench_torch_api, sc, c.iterations);
    reg(sc + "/naive_libtorch_matmul_ce_fwd_bwd_few_rows", bench_naive, sc, 1);
    reg(sc + "/posttrain_fused_linear_logprobs_torch_fwd_bwd", bench_logprobs_api, sc, c.iterations);
    reg(sc + "/naive_libtorch_matmul_logprobs_entropy_fwd_bwd_few_rows", bench_logprobs_naive, sc, 1);
  }
  if (torch::cuda::is_available()) {
    for (const std::string sc : {"S3", "S4"}) {
      for (const bool bf16 : {false, true}) {
        const std::string dt = bf16 ? "_bf16" : "_fp32";
        const auto add = [&](const std::string& name, void (*fn)(benchmark::State&, const std::string&, bool)) {
          benchmark::RegisterBenchmark(name.c_str(), fn, sc, bf16)
              ->Iterations(c.quick ? 1 : 5)
              ->Unit(benchmark::kMillisecond)
              ->UseRealTime();
        };
        add(sc + "/cuda_gemm_alone" + dt, cuda_gemm);
        add(sc + "/cuda_naive_libtorch" + dt, cuda_naive);
        add(sc + "/cuda_posttrain_api" + dt, cuda_api);
      }
    }
  }
  timings();  // constructed before the handler is registered, so still alive when it runs
  std::atexit(print_summary);
  return true;
}();

}  // namespace
