// posttrain benchmark DP (issue 18): the communication a data-parallel GRPO step adds, in the posttrain_bench binary
// beside bench_logits.cpp. One optimizer step's global statistics, as distributed/global.hpp computes them:
//   global_grpo_advantages   the group advantages, every group's samples on both ranks (3 all-gathers)
//   global_batch             the step's counts from this rank's two micro-batch masks (1 all-gather, 2 all-reduces)
//   global_metrics::reduce   four token-weighted means and one max over the micro-batches (1 all-gather,
//                            2 all-reduces)
// on a batch of DP_ROWS = 64 completions (8 prompts x 8 samples; ids row mod 8) of DP_TOKENS = 1024 tokens, float32:
//   single_process_whole_batch   posttrain::single_process, every row: what one process computes
//   single_process_rank0_rows    posttrain::single_process on rank 0's 32 rows: the same local work as a rank
//   gloo_2_ranks                 rank 0 of a real 2-process c10d ProcessGroupGloo (FileStore in a temporary
//                                folder, 127.0.0.1): rank 1 is this binary started with posix_spawn and
//                                --dp-gloo-rank1=STORE, which runs the same step in a loop on its 32 rows (every
//                                collective is matched, so the two ranks run in lock-step) until rank 0 closes
//                                the group
//   grpo_loss_fwd_bwd_rank0_rows for scale: grpo_loss (DAPO, β = 0.04) forward + backward on rank 0's rows, the
//                                loss's own arithmetic (a real step adds the model's forward and backward)
// The last case (DP/summary) closes the group, waits for rank 1 and prints the number of collectives a step makes
// and the ratio gloo_2_ranks / single_process_rank0_rows: the communication's cost on top of the same local work
// (loopback TCP on one machine, so it is Gloo's latency, not a network's). With --benchmark_repetitions the summary
// uses each case's last repetition (Google Benchmark prints the aggregates).
//
// Without Gloo's headers (libgloo-dev) at configure time the Gloo case is not built (POSTTRAIN_BENCH_GLOO unset)
// and the summary says so. This file has no main(): bench_logits.cpp owns it; the cases register themselves during
// static initialisation, reading --quick from /proc/self/cmdline (small shapes, one iteration: the ctest smoke run
// also starts the Gloo pair); a --dp-gloo-rank1 child runs rank 1 during static initialisation and exits.
#include <benchmark/benchmark.h>
#include <torch/torch.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "posttrain/backends/torch.hpp"
#include "posttrain/distributed/global.hpp"
#include "posttrain/posttrain.hpp"
#include "timing.hpp"

#if defined(POSTTRAIN_BENCH_GLOO)
#ifndef USE_C10D_GLOO
#define USE_C10D_GLOO 1
#endif
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>

#include <filesystem>
#include <thread>
#include <torch/csrc/distributed/c10d/FileStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>

#include "posttrain/backends/torch/distributed.hpp"

extern char** environ;
#endif

namespace {

using namespace posttrain;

struct config {
  bool quick = false;
  std::string rank1_store;  // --dp-gloo-rank1=STORE: this process is rank 1
  std::int64_t rows = 64, tokens = 1024, groups = 8;
};

const config& cfg() {
  static const config c = [] {
    config c;
    std::ifstream f("/proc/self/cmdline", std::ios::binary);
    for (std::string arg; std::getline(f, arg, '\0');) {
      if (arg == "--quick")
        c.quick = true;
      else if (arg.rfind("--dp-gloo-rank1=", 0) == 0)
        c.rank1_store = arg.substr(16);
    }
    if (c.quick) c.rows = 16, c.tokens = 32, c.groups = 4;
    return c;
  }();
  return c;
}

std::map<std::string, double>& timings() {
  static std::map<std::string, double> t;
  return t;
}

/// Rows [first, first + n) of the step's batch, the same formulas on every rank (no random stream to keep in step),
/// in two micro-batches.
struct slice {
  std::vector<at::Tensor> masks;        // [B_i, T] per micro-batch
  at::Tensor scores, ids;               // [n]
  std::vector<at::Tensor> metric_vals;  // per micro-batch: kl, clip_ratio, approx_kl, entropy, ratio_max (0-d)
  at::Tensor lp, old, ref, mask;        // [n, T], for the loss case
};

slice make_slice(std::int64_t first, std::int64_t n) {
  const auto& c = cfg();
  const auto i = at::arange(first, first + n, at::kDouble).unsqueeze(1);
  const auto j = at::arange(c.tokens, at::kDouble).unsqueeze(0);
  // completion b has T/8 + (37 b mod 7T/8) tokens
  const at::Tensor mask = (j < (c.tokens / 8 + at::remainder(37 * i, 7 * c.tokens / 8))).to(at::kFloat);  // [n, T]
  slice s;
  s.mask = mask;
  s.masks = {mask.narrow(0, 0, n - n / 2), mask.narrow(0, n - n / 2, n / 2)};
  const at::Tensor r = at::arange(first, first + n, at::kDouble);
  s.scores = (at::remainder(r * 7, 5) / 4.0).to(at::kFloat);  // rewards in {0, .25, .5, .75, 1}
  s.ids = at::remainder(at::arange(first, first + n, at::kLong), c.groups);
  for (int k = 0; k < 2; ++k)
    for (int m = 0; m < 5; ++m) s.metric_vals.push_back(at::full({}, 0.01 * (m + 1) + 0.001 * k, at::kFloat));
  s.lp = (-1.0 + 0.3 * at::sin(0.7 * i + 1.3 * j)).to(at::kFloat);
  s.old = s.lp + (0.05 * at::cos(1.1 * i - 0.4 * j)).to(at::kFloat);
  s.ref = s.lp + (0.08 * at::sin(0.3 * i * j)).to(at::kFloat);
  return s;
}

/// One optimizer step's global statistics (the work of a trainer's step outside the model and the loss).
double step_statistics(const slice& s, const communicator<at::Tensor>& comm) {
  const at::Tensor adv = global_grpo_advantages(s.scores, s.ids, comm).advantages;
  const global_batch gb(s.masks, comm);
  global_metrics<at::Tensor> metrics;
  for (std::size_t k = 0; k < s.masks.size(); ++k) {
    const double w = gb.micro_batch_tokens()[k];
    metrics.add_mean("kl", s.metric_vals[5 * k], w);
    metrics.add_mean("clip_ratio", s.metric_vals[5 * k + 1], w);
    metrics.add_mean("approx_kl", s.metric_vals[5 * k + 2], w);
    metrics.add_mean("entropy", s.metric_vals[5 * k + 3], w);
    metrics.add_max("ratio_max", s.metric_vals[5 * k + 4]);
  }
  const auto logged = metrics.reduce(comm);
  return adv.numel() + gb.normalizer(grpo_loss_type::dapo) + logged.at("kl");
}

/// The communicator's calls in one step (single_process wrapped in counters): {all_reduce, all_gather (ids too)}.
std::pair<int, int> collectives_per_step() {
  int reduces = 0, gathers = 0;
  auto comm = single_process<at::Tensor>();
  const auto reduce = comm.all_reduce;
  const auto gather = comm.all_gather;
  const auto gather_index = comm.all_gather_index;
  comm.all_reduce = [&](const at::Tensor& x, reduce_op op) { return ++reduces, reduce(x, op); };
  comm.all_gather = [&](const at::Tensor& x) { return ++gathers, gather(x); };
  comm.all_gather_index = [&](const at::Tensor& x) { return ++gathers, gather_index(x); };
  (void)step_statistics(make_slice(0, cfg().rows / 2), comm);
  return {reduces, gathers};
}

void single_process_case(benchmark::State& st, bool whole) {
  const auto& c = cfg();
  const slice s = make_slice(0, whole ? c.rows : c.rows / 2);
  const auto comm = single_process<at::Tensor>();
  posttrain_bench::timed(st, timings(), whole ? "single_process_whole_batch" : "single_process_rank0_rows",
                         [&] { benchmark::DoNotOptimize(step_statistics(s, comm)); });
}

void loss_case(benchmark::State& st) {
  const slice s = make_slice(0, cfg().rows / 2);
  const at::Tensor adv = grpo_advantages(s.scores, s.ids).advantages;
  const grpo_options opt{.loss_type = grpo_loss_type::dapo, .beta = 0.04};
  posttrain_bench::timed(st, timings(), "grpo_loss_fwd_bwd_rank0_rows", [&] {
    const at::Tensor lp = s.lp.detach().requires_grad_(true);
    auto r = grpo_loss(
        grpo_batch<at::Tensor>{
            .logprobs = lp, .advantages = adv, .response_mask = s.mask, .old_logprobs = s.old, .ref_logprobs = s.ref},
        opt);
    r.loss.backward();
    benchmark::DoNotOptimize(lp.grad().data_ptr());
  });
}

#if defined(POSTTRAIN_BENCH_GLOO)

c10::intrusive_ptr<c10d::ProcessGroupGloo> make_group(const std::string& store_path, int rank) {
  auto store = c10::make_intrusive<c10d::FileStore>(store_path, 2);
  store->setTimeout(std::chrono::seconds(60));  // joining: a rank that never comes fails within 60 s
  // a collective waits at most 60 s (rank 1 sits in its next step's first collective while rank 0 runs other cases;
  // it then times out and exits, or sees the group closed by DP/summary)
  auto options = c10d::ProcessGroupGloo::Options::create(std::chrono::seconds(60));
  options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
  return c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, 2, options);
}

/// Rank 0's side of the pair: the group and rank 1's process, started on first use, closed by DP/summary.
struct gloo_pair {
  std::filesystem::path dir;
  pid_t child = -1;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg;
};
gloo_pair*& pair_ptr() {
  static gloo_pair* p = nullptr;  // never destroyed at exit (a group's teardown there may wait on its peer)
  return p;
}

gloo_pair& start_pair() {
  if (pair_ptr()) {
    if (!pair_ptr()->pg) throw std::runtime_error("an earlier start of the pair failed");
    return *pair_ptr();
  }
  auto* p = new gloo_pair;
  p->dir = std::filesystem::temp_directory_path() / ("posttrain-bench-dp-" + std::to_string(::getpid()));
  std::filesystem::remove_all(p->dir);
  std::filesystem::create_directories(p->dir);
  const std::string exe = std::filesystem::read_symlink("/proc/self/exe").string(), store = (p->dir / "store").string(),
                    log = (p->dir / "rank1.log").string();
  std::string arg0 = exe, arg1 = "--dp-gloo-rank1=" + store, arg2 = "--quick";
  std::vector<char*> argv{arg0.data(), arg1.data()};
  if (cfg().quick) argv.push_back(arg2.data());
  argv.push_back(nullptr);
  std::string omp = "OMP_NUM_THREADS=1";
  std::vector<char*> envp;
  for (char** e = environ; *e; ++e)
    if (std::string(*e).rfind("OMP_NUM_THREADS=", 0) != 0) envp.push_back(*e);
  envp.push_back(omp.data());
  envp.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 1, log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_adddup2(&actions, 1, 2);
  const int rc = posix_spawn(&p->child, exe.c_str(), &actions, nullptr, argv.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) throw std::runtime_error("DP: cannot start rank 1 (posix_spawn " + std::to_string(rc) + ")");
  pair_ptr() = p;  // before joining: stop_pair reaps rank 1 even if the group fails to form
  p->pg = make_group(store, 0);
  return *p;
}

/// Closes rank 0's group (rank 1's pending collective then fails and it exits), waits for rank 1 at most 10 s
/// (then kills it) and removes the store's folder. Returns rank 1's exit status (-1: killed).
int stop_pair() {
  gloo_pair* p = pair_ptr();
  if (!p) return 0;
  p->pg.reset();
  int status = -1;
  const auto stop = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  for (int st = 0;;) {
    if (::waitpid(p->child, &st, WNOHANG) > 0) {
      status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
      break;
    }
    if (std::chrono::steady_clock::now() > stop) {
      ::kill(p->child, SIGKILL), ::waitpid(p->child, nullptr, 0);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  std::filesystem::remove_all(p->dir);
  pair_ptr() = nullptr;  // the pair itself is leaked on purpose (see pair_ptr)
  return status;
}

void gloo_case(benchmark::State& st) {
  gloo_pair* p = nullptr;
  try {
    p = &start_pair();
  } catch (const std::exception& e) {  // no group (rank 1 never joined within 60 s ...): say so, time nothing
    st.SkipWithError((std::string("the Gloo pair did not start: ") + e.what()).c_str());
    return;
  }
  const auto comm = process_group_communicator(p->pg);
  const slice s = make_slice(0, cfg().rows / 2);
  posttrain_bench::timed(st, timings(), "gloo_2_ranks", [&] { benchmark::DoNotOptimize(step_statistics(s, comm)); });
}

/// Rank 1: the same step on rows [rows/2, rows) for as long as rank 0 keeps calling (every collective matched),
/// until the group is closed or a collective times out.
[[noreturn]] void run_rank1(const std::string& store) {
  at::set_num_threads(1);
  int code = 0;
  try {
    auto pg = make_group(store, 1);
    const auto comm = process_group_communicator(pg);
    const slice s = make_slice(cfg().rows / 2, cfg().rows - cfg().rows / 2);
    std::int64_t steps = 0;
    try {
      for (;; ++steps) benchmark::DoNotOptimize(step_statistics(s, comm));
    } catch (const std::exception& e) {
      std::printf("rank 1: %lld steps, then the group closed: %s\n", static_cast<long long>(steps), e.what());
    }
  } catch (const std::exception& e) {
    std::printf("rank 1 FAILED before its first step: %s\n", e.what());
    code = 1;
  }
  std::fflush(stdout);
  std::_Exit(code);  // skip the group's teardown (its peer is gone)
}

#else

int stop_pair() { return 0; }

#endif  // POSTTRAIN_BENCH_GLOO

void summary_case(benchmark::State& st) {
  for (auto _ : st) {
    const int rank1 = stop_pair();
    auto& t = timings();
    const auto get = [&](const char* name) { return t.count(name) ? t.at(name) * 1e6 : -1.0; };
    const auto& c = cfg();
    std::printf(
        "\n=== DP: global statistics of one GRPO step (global_grpo_advantages + global_batch + global_metrics), "
        "%lld rows x %lld tokens, float32 ===\n",
        static_cast<long long>(c.rows), static_cast<long long>(c.tokens));
    const double whole = get("single_process_whole_batch"), half = get("single_process_rank0_rows"),
                 gloo = get("gloo_2_ranks"), loss = get("grpo_loss_fwd_bwd_rank0_rows");
    const auto [reduces, gathers] = collectives_per_step();
    std::printf(
        "  collectives per step: %d all_reduce + %d all_gather (process_group_communicator: each all_gather is 2 "
        "c10d allgathers, lengths then values: %d c10d collectives)\n",
        reduces, gathers, reduces + 2 * gathers);
    if (whole > 0)
      std::printf("  single_process, whole batch (%lld rows)    %10.1f us\n", static_cast<long long>(c.rows), whole);
    if (half > 0)
      std::printf("  single_process, rank 0's rows (%lld)        %10.1f us\n", static_cast<long long>(c.rows / 2),
                  half);
#if defined(POSTTRAIN_BENCH_GLOO)
    if (gloo > 0 && half > 0)
      std::printf(
          "  2 ranks over Gloo (rank 0's time)          %10.1f us   = %.1fx the same local work: +%.1f us of "
          "communication per step (rank 1 exit status %d)\n",
          gloo, gloo / half, gloo - half, rank1);
#else
    (void)gloo, (void)rank1;
    std::printf("  2 ranks over Gloo: not built (Gloo's headers, libgloo-dev, were not found at configure time)\n");
#endif
    if (loss > 0)
      std::printf(
          "  for scale: grpo_loss fwd+bwd on rank 0's rows %7.1f us (the loss alone; the model's passes add "
          "far more)\n",
          loss);
    std::fflush(stdout);
  }
}

/// Static-initialisation hook: a --dp-gloo-rank1 child runs rank 1 and exits; otherwise the cases are registered
/// (they run inside bench_logits.cpp's main).
[[maybe_unused]] const bool registered = [] {
  const auto& c = cfg();
#if defined(POSTTRAIN_BENCH_GLOO)
  if (!c.rank1_store.empty()) run_rank1(c.rank1_store);
#endif
  const auto reg = [&](const std::string& name, auto fn) {
    auto* b = benchmark::RegisterBenchmark(name.c_str(), fn)->Unit(benchmark::kMicrosecond)->UseRealTime();
    if (c.quick) b->Iterations(1);
  };
  reg("DP/single_process_whole_batch", [](benchmark::State& s) { single_process_case(s, true); });
  reg("DP/single_process_rank0_rows", [](benchmark::State& s) { single_process_case(s, false); });
#if defined(POSTTRAIN_BENCH_GLOO)
  reg("DP/gloo_2_ranks", gloo_case);
#endif
  reg("DP/grpo_loss_fwd_bwd_rank0_rows", loss_case);
  benchmark::RegisterBenchmark("DP/summary", summary_case)->Iterations(1)->Repetitions(1);
  return true;
}();

}  // namespace
