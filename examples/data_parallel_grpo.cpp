// data_parallel_grpo: one GRPO optimizer step run data-parallel over c10d's Gloo process group, from one
// command. `posttrain_data_parallel_grpo --ranks 2` starts 2 copies of itself (posix_spawn; a FileStore in a
// temporary folder joins them), and each rank:
//   1. takes its slice of one batch (16 completions of 4 prompts; rows split unevenly, groups split across ranks),
//   2. computes GRPO's group advantages with the groups' members on other ranks (global_grpo_advantages: one
//      all-gather of the rewards and group ids),
//   3. splits its slice into two micro-batches, builds the step's global_batch once (one small all-reduce) and
//      runs grpo_loss(...).backward() on each micro-batch with the global token count as normaliser (DAPO), so
//      the gradients accumulate to the gradient of the whole batch's loss (gradient_sync::sum: the trainer
//      all-reduces the gradient with a sum),
//   4. prints its own numbers, and the global loss and gradient norm after two all-reduces.
// Rank 0 also computes the whole batch on one process and prints whether the two agree (exit status 1 if not).
// The launcher then times the same step on one process and over the ranks and prints the overhead: what the
// collectives cost on top of the arithmetic (on one machine's loopback, so it is Gloo's latency, not a network's).
//
// `--backend nccl` runs the same step over c10d's ProcessGroupNCCL with every rank's tensors on its own GPU (rank r
// on cuda:r; needs as many GPUs as ranks). That path is compiled only where LibTorch has CUDA and c10d's NCCL header
// is usable (USE_C10D_NCCL defined by examples/CMakeLists.txt, which also finds nccl.h); elsewhere `--backend nccl`
// prints "NCCL not available in this build" and exits with status 1. scripts/gpu_check.sh runs it with 2 ranks on a
// machine with 2 or more GPUs.
//
// Build: part of the examples when LibTorch and Gloo's headers (libgloo-dev) are found. ctest runs it with
// --ranks 2 --steps 3 (Gloo), and checks the NCCL error where NCCL is not compiled in.
#ifndef USE_C10D_GLOO
#define USE_C10D_GLOO 1
#endif
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <torch/torch.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <vector>

// The NCCL path (see the file comment): c10d's ProcessGroupNCCL.hpp declares its class only under USE_C10D_NCCL.
#if defined(USE_C10D_NCCL) && __has_include(<torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>)
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#define POSTTRAIN_EXAMPLE_NCCL 1
#endif

#include "posttrain/backends/torch.hpp"
#include "posttrain/backends/torch/distributed.hpp"
#include "posttrain/distributed/global.hpp"
#include "posttrain/posttrain.hpp"

extern char** environ;

namespace {

constexpr std::int64_t rows = 16, prompts = 4, tokens = 24;

/// The whole batch, the same on every rank: deterministic formulas (no random stream to keep in step).
struct batch {
  at::Tensor logprobs, old_logprobs, ref_logprobs, mask, scores, group_ids;
};
batch make_batch(const at::Device& device) {
  const auto i = at::arange(rows, at::kDouble).unsqueeze(1), j = at::arange(tokens, at::kDouble).unsqueeze(0);
  const at::Tensor lp = -1.0 + 0.3 * at::sin(0.7 * i + 1.3 * j);
  // completion b has 8 + (5b mod 17) tokens: lengths from 8 to 24
  const at::Tensor mask = (j < (8 + at::remainder(5 * i, 17))).to(at::kDouble);
  const auto on = [&](const at::Tensor& t) { return t.to(device); };  // NCCL: this rank's GPU
  return {on(lp),
          on(lp + 0.05 * at::cos(1.1 * i - 0.4 * j)),
          on(lp + 0.08 * at::sin(0.3 * i * j)),
          on(mask),
          on(at::remainder(at::arange(rows, at::kDouble) * 7, 5) / 4.0),  // rewards in {0, .25, .5, .75, 1}
          on(at::floor_divide(at::arange(rows, at::kLong), rows / prompts))};
}

/// Rank r's rows: uneven on purpose (2 ranks: 7 and 9 rows; groups 1 and 2 straddle the cut).
std::pair<std::int64_t, std::int64_t> slice_of(int rank, int world) {
  const auto cut = [&](int r) { return r == world ? rows : (rows * r) / world - (r % 2 == 1 ? 1 : 0); };
  return {cut(rank), cut(rank + 1) - cut(rank)};
}

struct step_result {
  double loss = 0, grad_sq = 0, local_loss = 0;
  std::int64_t local_rows = 0, local_tokens = 0;
};

/// One optimizer step's loss and gradient on this rank's slice (the whole batch when world = 1).
step_result grpo_step(const batch& whole, const posttrain::communicator<at::Tensor>& comm) {
  using namespace posttrain;
  const auto [first, n] = slice_of(comm.rank(), comm.world_size());
  const auto mine = [&, first = first, n = n](const at::Tensor& t) { return t.narrow(0, first, n); };
  const at::Tensor adv = global_grpo_advantages(mine(whole.scores), mine(whole.group_ids), comm).advantages;
  const at::Tensor lp = mine(whole.logprobs).clone().requires_grad_(true);  // the "model output" of this rank
  const std::vector<std::int64_t> micro{n - n / 2, n / 2};
  std::vector<at::Tensor> masks;
  for (std::int64_t row = 0, k = 0; k < 2; row += micro[static_cast<std::size_t>(k)], ++k)
    masks.push_back(mine(whole.mask).narrow(0, row, micro[static_cast<std::size_t>(k)]));
  const global_batch gb(masks, comm);  // once per optimizer step
  grpo_options opt{.loss_type = grpo_loss_type::dapo, .beta = 0.04, .clip = {.clip_low = 0.2, .clip_high = 0.28}};
  opt.normalizer = gb.normalizer(opt.loss_type);
  at::Tensor loss_sum = at::zeros({}, whole.logprobs.options());
  for (std::int64_t row = 0, k = 0; k < 2; row += micro[static_cast<std::size_t>(k)], ++k) {
    const std::int64_t m = micro[static_cast<std::size_t>(k)];
    if (m == 0) continue;
    const auto r = grpo_loss(grpo_batch<at::Tensor>{.logprobs = lp.narrow(0, row, m),
                                                    .advantages = adv.narrow(0, row, m),
                                                    .response_mask = masks[static_cast<std::size_t>(k)],
                                                    .old_logprobs = mine(whole.old_logprobs).narrow(0, row, m),
                                                    .ref_logprobs = mine(whole.ref_logprobs).narrow(0, row, m)},
                             opt);
    r.loss.backward();  // gradient accumulation over the micro-batches
    loss_sum = loss_sum + r.loss.detach();
  }
  const at::Tensor grad_sq = lp.grad().defined() ? lp.grad().square().sum() : at::zeros({}, lp.options());
  return {comm.all_reduce(loss_sum, reduce_op::sum).item<double>(),
          comm.all_reduce(grad_sq, reduce_op::sum).item<double>(), loss_sum.item<double>(), n,
          static_cast<std::int64_t>(mine(whole.mask).sum().item<double>())};
}

double ms_per_step(const batch& whole, const posttrain::communicator<at::Tensor>& comm, int steps) {
  const auto t0 = std::chrono::steady_clock::now();
  for (int s = 0; s < steps; ++s) (void)grpo_step(whole, comm);
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / steps;
}

bool nccl_built() {
#if defined(POSTTRAIN_EXAMPLE_NCCL)
  return true;
#else
  return false;
#endif
}

/// The device of a rank's tensors: the CPU for Gloo, cuda:rank for NCCL.
at::Device device_of(const std::string& backend, int rank) {
  return backend == "nccl" ? at::Device(at::kCUDA, static_cast<at::DeviceIndex>(rank)) : at::Device(at::kCPU);
}

/// The rank's process group, handed to `body`: Gloo over 127.0.0.1, or NCCL (this rank's GPU); 30 s timeouts.
/// (A generic callback: ProcessGroupGloo and ProcessGroupNCCL share the base c10d::ProcessGroup on LibTorch 1.x
/// but c10d::Backend on 2.x; process_group_communicator takes either.)
template <class F>
int with_group(const std::string& backend, const std::string& store_path, int rank, int world, F&& body) {
  auto store = c10::make_intrusive<c10d::FileStore>(store_path, world);
  store->setTimeout(std::chrono::seconds(30));
  if (backend == "nccl") {
#if defined(POSTTRAIN_EXAMPLE_NCCL)  // untested: no machine with 2 GPUs has run it yet
    auto options = c10d::ProcessGroupNCCL::Options::create();
    options->timeout = std::chrono::seconds(30);
    return body(c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, options));
#else
    throw std::runtime_error("NCCL not available in this build");
#endif
  }
  auto options = c10d::ProcessGroupGloo::Options::create(std::chrono::seconds(30));
  options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
  return body(c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, options));
}

/// One rank's step over its group: its numbers, and on rank 0 the check against one process; then the timing.
template <class Group>
int run_rank(const c10::intrusive_ptr<Group>& pg, int steps, const std::string& backend) {
  const auto comm = posttrain::process_group_communicator(pg);
  const int rank = comm.rank(), world = comm.world_size();
  const batch whole = make_batch(device_of(backend, rank));
  const step_result r = grpo_step(whole, comm);
  std::printf("rank %d of %d: rows %lld, tokens %lld, its micro-batch losses sum to %+.12f\n", rank, world,
              static_cast<long long>(r.local_rows), static_cast<long long>(r.local_tokens), r.local_loss);
  int status = 0;
  if (rank == 0) {
    std::printf("global: loss %+.15f, gradient norm %.15f (summed over the %d ranks)\n", r.loss, std::sqrt(r.grad_sq),
                world);
    const step_result one = grpo_step(whole, posttrain::single_process<at::Tensor>());
    std::printf("one process, whole batch: loss %+.15f, gradient norm %.15f\n", one.loss, std::sqrt(one.grad_sq));
    const bool agree = std::abs(r.loss - one.loss) <= 1e-12 * std::max(1.0, std::abs(one.loss)) &&
                       std::abs(r.grad_sq - one.grad_sq) <= 1e-12 * std::max(1.0, one.grad_sq);
    std::printf("%s\n", agree ? "the ranks agree with one process (1e-12 relative)" : "DISAGREE");
    status = agree ? 0 : 1;
  }
  const double ms = ms_per_step(whole, comm, steps);
  if (rank == 0) std::printf("step_ms %.6f\n", ms);
  return status;
}

int worker(int rank, int world, const std::string& store_path, int steps, const std::string& backend) {
  at::set_num_threads(1);
  return with_group(backend, store_path, rank, world, [&](auto pg) { return run_rank(pg, steps, backend); });
}

int launch(const std::string& self, int world, int steps, const std::string& backend) {
  const auto dir = std::filesystem::temp_directory_path() / ("posttrain-dp-" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  std::vector<pid_t> pids(static_cast<std::size_t>(world));
  std::vector<std::string> logs;
  for (int r = 0; r < world; ++r) {
    logs.push_back((dir / ("rank" + std::to_string(r) + ".log")).string());
    std::vector<std::string> own{"POSTTRAIN_DP_RANK=" + std::to_string(r),
                                 "POSTTRAIN_DP_WORLD=" + std::to_string(world),
                                 "POSTTRAIN_DP_STORE=" + (dir / "store").string(),
                                 "POSTTRAIN_DP_STEPS=" + std::to_string(steps),
                                 "POSTTRAIN_DP_BACKEND=" + backend,
                                 "OMP_NUM_THREADS=1"};
    std::vector<char*> envp;
    for (char** e = environ; *e; ++e)
      if (std::string(*e).rfind("POSTTRAIN_DP_", 0) != 0) envp.push_back(*e);
    for (auto& s : own) envp.push_back(s.data());
    envp.push_back(nullptr);
    std::string arg0 = self;
    char* argv[] = {arg0.data(), nullptr};
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 1, logs.back().c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    posix_spawn_file_actions_adddup2(&actions, 1, 2);
    const int rc = posix_spawn(&pids[static_cast<std::size_t>(r)], self.c_str(), &actions, nullptr, argv, envp.data());
    posix_spawn_file_actions_destroy(&actions);
    if (rc != 0) {
      std::fprintf(stderr, "FAILED: cannot start rank %d (posix_spawn: %d)\n", r, rc);
      return 1;
    }
  }
  // wait at most 120 s for every rank (a hung rank is killed and reported)
  std::vector<int> status(static_cast<std::size_t>(world), -2);
  const auto stop = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  for (int left = world; left > 0 && std::chrono::steady_clock::now() < stop;) {
    for (int r = 0; r < world; ++r) {
      int st = 0;
      if (status[static_cast<std::size_t>(r)] == -2 && ::waitpid(pids[static_cast<std::size_t>(r)], &st, WNOHANG) > 0)
        status[static_cast<std::size_t>(r)] = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st), --left;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  int failed = 0;
  double gloo_ms = -1;
  for (int r = 0; r < world; ++r) {
    if (status[static_cast<std::size_t>(r)] == -2) {
      ::kill(pids[static_cast<std::size_t>(r)], SIGKILL), ::waitpid(pids[static_cast<std::size_t>(r)], nullptr, 0);
      status[static_cast<std::size_t>(r)] = -1;
    }
    std::ifstream in(logs[static_cast<std::size_t>(r)]);
    for (std::string line; std::getline(in, line);) {
      if (line.rfind("step_ms ", 0) == 0) {
        gloo_ms = std::stod(line.substr(8));
        continue;
      }
      std::cout << line << '\n';
    }
    if (status[static_cast<std::size_t>(r)] != 0) {
      std::cout << "FAILED: rank " << r << " exit status " << status[static_cast<std::size_t>(r)]
                << (status[static_cast<std::size_t>(r)] == -1 ? " (killed after 120 s)" : "") << '\n';
      ++failed;
    }
  }
  std::filesystem::remove_all(dir);
  if (failed) return 1;
  at::set_num_threads(1);
  const double one_ms = ms_per_step(make_batch(device_of(backend, 0)), posttrain::single_process<at::Tensor>(), steps);
  std::printf(
      "time per step (%d steps, 1 thread per process): one process %.3f ms, %d ranks over %s %.3f ms "
      "(%.2fx: the collectives' latency on top of 1/%d of the arithmetic each)\n",
      steps, one_ms, world, backend == "nccl" ? "NCCL" : "Gloo", gloo_ms, gloo_ms / one_ms, world);
  std::printf("OK: data-parallel step ran on %d ranks\n", world);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (const char* rank = std::getenv("POSTTRAIN_DP_RANK"))
      return worker(std::stoi(rank), std::stoi(std::getenv("POSTTRAIN_DP_WORLD")), std::getenv("POSTTRAIN_DP_STORE"),
                    std::stoi(std::getenv("POSTTRAIN_DP_STEPS")), std::getenv("POSTTRAIN_DP_BACKEND"));
    int world = 2, steps = 20;
    std::string backend = "gloo";
    for (int a = 1; a < argc; ++a) {
      const std::string arg = argv[a];
      if (arg == "--ranks" && a + 1 < argc)
        world = std::stoi(argv[++a]);
      else if (arg == "--steps" && a + 1 < argc)
        steps = std::stoi(argv[++a]);
      else if (arg == "--backend" && a + 1 < argc)
        backend = argv[++a];
      else {
        std::fprintf(stderr,
                     "usage: %s [--ranks N (1..8, default 2)] [--steps S (default 20)] [--backend gloo|nccl "
                     "(default gloo)]\n",
                     argv[0]);
        return 2;
      }
    }
    if (world < 1 || world > 8 || steps < 1 || (backend != "gloo" && backend != "nccl")) {
      std::fprintf(stderr, "--ranks must be 1..8, --steps >= 1 and --backend gloo or nccl (got %d, %d, %s)\n", world,
                   steps, backend.c_str());
      return 2;
    }
    if (backend == "nccl" && !nccl_built()) {
      std::fprintf(stderr,
                   "FAILED: NCCL not available in this build (--backend nccl needs LibTorch with CUDA, c10d's "
                   "ProcessGroupNCCL.hpp and nccl.h, all found at configure time). Use --backend gloo.\n");
      return 1;
    }
    if (backend == "nccl" && static_cast<int>(torch::cuda::device_count()) < world) {
      std::fprintf(stderr, "FAILED: --backend nccl with %d ranks needs %d GPUs, this machine has %d\n", world, world,
                   static_cast<int>(torch::cuda::device_count()));
      return 1;
    }
    return launch(std::filesystem::read_symlink("/proc/self/exe").string(), world, steps, backend);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "FAILED: %s\n", e.what());
    return 1;
  }
}
