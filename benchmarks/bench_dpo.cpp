// posttrain benchmarks S5 (DPO from logits) and KD (forward-KL distillation), in the posttrain_bench
// binary beside bench_logits.cpp, every candidate beside its baselines:
//   S5  4 pairs x (512 chosen + 512 rejected) tokens: policy logits [8, 512, V] and reference logits
//       [8, 512, V], V = 128256, fp32 -> token log-probs (policy with gradient, reference without) ->
//       per-sequence sums -> sigmoid DPO (β = 0.1) -> gradient w.r.t. the policy logits.
//   KD  forward KL(teacher || student) from student and teacher logits [2048, 128256], fp32, token mean,
//       forward + backward w.r.t. the student logits.
// Cases per scenario:
//   floor      one streaming read of each input and one write of the gradient (stream), and an exp
//              loop over the elements read (exp); floor = max of the two (as bench_logits.cpp's S2)
//   naive      the LibTorch composition a trainer writes (log_softmax + gather + sum + logsigmoid,
//              log_softmax + kl_div(log_target)), autograd backward, same threads, mallopt as main()
//   generic    posttrain's unfused compositions on the Eigen backend at 16 rows (floor scaled to its rows)
//   API        posttrain's public entry points (S5: sequence_logps + dpo + loss.backward() on at::Tensor;
//              KD: distill_loss_masked + distill_loss_masked_backward on eigen_tensor, fused override)
//   fused      posttrain::kernels directly: S5 = logits_forward on the policy (row max and log-sum kept)
//              and on the reference, DPO on the 8 sums, then the analytic gradient g_b·(onehot - p)
//              written from the kept statistics (into a buffer, or in place over the policy logits);
//              KD = kernels::distill_forward_backward (buffer / in place)
// The exact DPO gradient needs every sequence's sum before any row's gradient, so the fused S5 reads
// the policy logits twice (forward, then gradient) and the reference once: 3 reads + 1 write against
// the floor's 2 reads + 1 write.
//
// This file has no main(): bench_logits.cpp owns it. The cases register themselves during static
// initialisation, reading --quick and --threads from /proc/self/cmdline (main() strips them before
// Google Benchmark sees them, and sets the thread counts before any case runs). Peak memory: after
// the timings a last case (S5_KD/summary_and_peak_memory) re-runs this binary once per case with
// --dpo-peak-memory=CASE; that
// child runs the case during static initialisation (before main), prints VmHWM minus the resident
// set just before the call (high-water mark reset after the inputs are built, as bench_logits.cpp),
// and exits. With --quick the fused results are also checked against LibTorch autograd (exit 1 on
// a mismatch), so the ctest smoke run checks the fused S5 and KD paths.
#include <benchmark/benchmark.h>
#include <malloc.h>
#include <torch/torch.h>
#include <unistd.h>

#include <Eigen/Core>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "peak_memory.hpp"
#include "posttrain/backends/eigen.hpp"
#include "posttrain/backends/torch.hpp"
#include "posttrain/kernels/distill_cpu.hpp"
#include "posttrain/kernels/logits_cpu.hpp"
#include "posttrain/losses/distill.hpp"
#include "posttrain/losses/dpo.hpp"
#include "posttrain/losses/sequence_logps.hpp"
#include "posttrain/numerics/logits.hpp"
#include "timing.hpp"

namespace {

using namespace posttrain;

struct bench_config {
  bool quick = false;
  int threads = 0;
  std::string peak_case;
  std::int64_t pairs = 4, len = 512, vocab = 128256;  // S5
  std::int64_t generic_pairs = 2, generic_len = 4;    // S5 generic: 4 sequences x 4 tokens = 16 rows
  std::int64_t kd_n = 2048, kd_vocab = 128256, kd_generic_n = 16;
  int iterations = 3;
  double beta = 0.1;
  std::int64_t rows() const { return 2 * pairs * len; }
  std::int64_t generic_rows() const { return 2 * generic_pairs * generic_len; }
};

bench_config read_command_line() {
  bench_config c;
  std::ifstream f("/proc/self/cmdline", std::ios::binary);
  std::string arg;
  while (std::getline(f, arg, '\0')) {
    if (arg == "--quick")
      c.quick = true;
    else if (arg.rfind("--threads=", 0) == 0)
      c.threads = std::atoi(arg.c_str() + 10);
    else if (arg.rfind("--dpo-peak-memory=", 0) == 0)
      c.peak_case = arg.substr(18);
  }
  if (c.quick) {
    c.pairs = 2, c.len = 8, c.vocab = 3001, c.generic_pairs = 1, c.generic_len = 4;
    c.kd_n = 16, c.kd_vocab = 3001, c.kd_generic_n = 4;
    c.iterations = 1;
  }
  return c;
}
bench_config& cfg() {
  static bench_config c = read_command_line();
  return c;
}

std::map<std::string, double>& timings() {
  static std::map<std::string, double> t;
  return t;
}

using posttrain_bench::timed;

// ---- floors --------------------------------------------------------------------------------------

/// Reads `a` (summing it) and copies 0.5·b into out, row by row over the kernels' threads: one read
/// of each input and one write of a gradient-sized output.
double read_read_write(const float* a, const float* b, float* out, std::int64_t rows, std::int64_t cols) {
  std::vector<double> part(static_cast<std::size_t>(rows));
  kernels::parallel_rows(rows, cols, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t r = begin; r < end; ++r) {
      part[static_cast<std::size_t>(r)] = Eigen::Map<const Eigen::ArrayXf>(a + r * cols, cols).sum();
      Eigen::Map<Eigen::ArrayXf>(out + r * cols, cols) = Eigen::Map<const Eigen::ArrayXf>(b + r * cols, cols) * 0.5f;
    }
  });
  double s = 0;
  for (double v : part) s += v;
  return s;
}
/// exp over rows·cols elements of an L1-resident block (the exp-throughput floor).
double exp_loop(std::int64_t rows, std::int64_t cols) {
  std::vector<double> part(static_cast<std::size_t>(rows));
  kernels::parallel_rows(rows, cols, [&](std::int64_t begin, std::int64_t end) {
    const Eigen::ArrayXf blk = Eigen::ArrayXf::LinSpaced(kernels::block_size, -8.0f, 0.0f);
    Eigen::ArrayXf out(kernels::block_size);
    for (std::int64_t r = begin; r < end; ++r) {
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

// ---- S5 inputs -----------------------------------------------------------------------------------

/// Policy and reference logits [2B, T, V] (sequences 0..B-1 chosen, B..2B-1 rejected), labels [2B, T]
/// (every position a completion token), a gradient buffer.
struct s5_inputs {
  at::Tensor policy, reference, labels, grad;
};
std::unique_ptr<s5_inputs>& s5_slot() {
  static std::unique_ptr<s5_inputs> p;
  return p;
}
s5_inputs& s5() {
  auto& p = s5_slot();
  if (!p) {
    p = std::make_unique<s5_inputs>();
    const auto& c = cfg();
    at::manual_seed(5);
    p->policy = at::randn({2 * c.pairs, c.len, c.vocab}, at::kFloat).mul_(3.0);
    p->reference = p->policy + at::randn({2 * c.pairs, c.len, c.vocab}, at::kFloat).mul_(0.5);
    p->labels = at::randint(0, c.vocab, {2 * c.pairs, c.len}, at::kLong);
    p->grad = at::zeros_like(p->policy);
  }
  return *p;
}

/// sigmoid DPO from the 2B per-sequence sums of policy and reference (host, double): loss and
/// d loss / d sums [2B] (posttrain::dpo / dpo_backward on the Eigen reference backend).
std::pair<double, std::vector<double>> dpo_on_sums(const std::vector<double>& pol, const std::vector<double>& ref,
                                                   std::int64_t pairs) {
  const auto part = [&](const std::vector<double>& v, std::int64_t from) {
    eigen_tensor<double> t({pairs});
    for (std::int64_t i = 0; i < pairs; ++i) t(i) = v[static_cast<std::size_t>(from + i)];
    return t;
  };
  preference_batch<eigen_tensor<double>> batch{part(pol, 0), part(pol, pairs)};
  batch.ref_chosen_logps = part(ref, 0);
  batch.ref_rejected_logps = part(ref, pairs);
  const dpo_options opt{.beta = cfg().beta};
  const double loss = ops::item(dpo(batch, opt).loss);
  const auto g = dpo_backward(batch, opt);
  std::vector<double> d(static_cast<std::size_t>(2 * pairs));
  for (std::int64_t i = 0; i < pairs; ++i) {
    d[static_cast<std::size_t>(i)] = g.chosen_logps(i);
    d[static_cast<std::size_t>(pairs + i)] = g.rejected_logps(i);
  }
  return {loss, d};
}

/// The fused S5 step on raw buffers: policy [2B·T, V] (read twice), reference (read once), gradient
/// written into `grad` (may be `policy`: in place). Returns the DPO loss.
double s5_fused_step(const float* policy, const float* reference, const std::int64_t* labels, float* grad) {
  const auto& c = cfg();
  const std::int64_t rows = c.rows(), v = c.vocab;
  std::vector<float> lp(static_cast<std::size_t>(rows)), ref_lp(lp.size()), row_max(lp.size());
  std::vector<double> row_log_s(lp.size());
  // Policy: token log-probs, keeping each row's max and log Σ e^{x-m} for the gradient pass.
  kernels::logits_forward<float>(policy, rows, v, labels, -100, nullptr, lp.data(), nullptr, row_max.data(),
                                 row_log_s.data());
  kernels::logits_forward<float>(reference, rows, v, labels, -100, nullptr, ref_lp.data(), nullptr);
  std::vector<double> pol(static_cast<std::size_t>(2 * c.pairs), 0.0), ref(pol.size(), 0.0);
  for (std::int64_t r = 0; r < rows; ++r) {
    pol[static_cast<std::size_t>(r / c.len)] += lp[static_cast<std::size_t>(r)];
    ref[static_cast<std::size_t>(r / c.len)] += ref_lp[static_cast<std::size_t>(r)];
  }
  const auto [loss, d] = dpo_on_sums(pol, ref, c.pairs);
  // d loss / d x[r, :] = g_b·(onehot(y_r) - p_r): the backward form p·α - b·[v = y] with α = b = -g_b.
  kernels::parallel_rows(rows, v, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t r = begin; r < end; ++r) {
      const double g = labels[r] == -100 ? 0.0 : d[static_cast<std::size_t>(r / c.len)];
      const kernels::row_stats<float> st{row_max[static_cast<std::size_t>(r)], row_log_s[static_cast<std::size_t>(r)],
                                         0.0};
      kernels::write_row_backward(policy + r * v, v, st, {-g, 0.0, -g, 0.0}, labels[r], grad + r * v);
    }
  });
  return loss;
}

/// The naive LibTorch composition (TRL's concatenated forward, written in C++): returns the loss;
/// the gradient lands in x.grad().
at::Tensor s5_naive_step(const at::Tensor& x, const at::Tensor& reference, const at::Tensor& labels) {
  const std::int64_t b = cfg().pairs;
  const auto seq_logps = [&](const at::Tensor& logits) {
    return at::log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1).sum(-1);  // [2B]
  };
  const at::Tensor pol = seq_logps(x);
  at::Tensor ref;
  {
    at::NoGradGuard no_grad;
    ref = seq_logps(reference);
  }
  const at::Tensor margin =
      (pol.slice(0, 0, b) - pol.slice(0, b, 2 * b)) - (ref.slice(0, 0, b) - ref.slice(0, b, 2 * b));
  const at::Tensor loss = -at::log_sigmoid(cfg().beta * margin).mean();
  loss.backward();
  return loss.detach();
}

/// posttrain's API on LibTorch tensors: sequence_logps (fused autograd node for CPU fp32) + dpo.
at::Tensor s5_api_step(const at::Tensor& x, const at::Tensor& reference, const at::Tensor& labels) {
  const std::int64_t b = cfg().pairs;
  const auto pol = sequence_logps(x, labels).logps;  // [2B]
  at::Tensor ref;
  {
    at::NoGradGuard no_grad;
    ref = sequence_logps(reference, labels).logps;
  }
  preference_batch<at::Tensor> batch{pol.slice(0, 0, b), pol.slice(0, b, 2 * b)};
  batch.ref_chosen_logps = ref.slice(0, 0, b);
  batch.ref_rejected_logps = ref.slice(0, b, 2 * b);
  const at::Tensor loss = dpo(batch, {.beta = cfg().beta}).loss;
  loss.backward();
  return loss.detach();
}

void s5_floor(benchmark::State& st) {
  auto& in = s5();
  const std::int64_t rows = cfg().rows(), v = cfg().vocab;
  timed(st, timings(), "S5 floor: read+read+write", [&] {
    benchmark::DoNotOptimize(read_read_write(in.reference.data_ptr<float>(), in.policy.data_ptr<float>(),
                                             in.grad.data_ptr<float>(), rows, v));
  });
  st.SetBytesProcessed(st.iterations() * rows * v * 12);
}
void s5_floor_exp(benchmark::State& st) {
  timed(st, timings(), "S5 floor: exp", [&] { benchmark::DoNotOptimize(exp_loop(2 * cfg().rows(), cfg().vocab)); });
  st.SetItemsProcessed(st.iterations() * 2 * cfg().rows() * cfg().vocab);
}
void s5_naive(benchmark::State& st) {
  auto& in = s5();
  at::Tensor x = in.policy.detach().requires_grad_();
  timed(st, timings(), "S5 naive LibTorch", [&] {
    x.mutable_grad() = at::Tensor();
    benchmark::DoNotOptimize(s5_naive_step(x, in.reference, in.labels).data_ptr());
    benchmark::DoNotOptimize(x.grad().data_ptr());
  });
  x.mutable_grad() = at::Tensor();
  st.SetItemsProcessed(st.iterations() * cfg().rows());
}
void s5_api_torch(benchmark::State& st) {
  auto& in = s5();
  at::Tensor x = in.policy.detach().requires_grad_();
  timed(st, timings(), "S5 posttrain API on torch + backward()", [&] {
    x.mutable_grad() = at::Tensor();
    benchmark::DoNotOptimize(s5_api_step(x, in.reference, in.labels).data_ptr());
    benchmark::DoNotOptimize(x.grad().data_ptr());
  });
  x.mutable_grad() = at::Tensor();
  st.SetItemsProcessed(st.iterations() * cfg().rows());
}
void s5_generic(benchmark::State& st) {
  auto& in = s5();
  const auto& c = cfg();
  const std::int64_t seqs = 2 * c.generic_pairs, t = c.generic_len, v = c.vocab, gp = c.generic_pairs;
  // The first t tokens of the first 2·gp sequences (chosen 0..gp-1 and rejected 0..gp-1).
  eigen_tensor<float> x({seqs, t, v}), ref({seqs, t, v});
  eigen_index y({seqs, t});
  for (std::int64_t s = 0; s < seqs; ++s) {
    const std::int64_t src = s < gp ? s : c.pairs + (s - gp);
    for (std::int64_t k = 0; k < t; ++k) {
      std::memcpy(x.data() + (s * t + k) * v, in.policy[src][k].data_ptr<float>(), static_cast<std::size_t>(v) * 4);
      std::memcpy(ref.data() + (s * t + k) * v, in.reference[src][k].data_ptr<float>(),
                  static_cast<std::size_t>(v) * 4);
      y.data()[s * t + k] = in.labels[src][k].item<std::int64_t>();
    }
  }
  timed(st, timings(), "S5 posttrain generic (Eigen, 16 rows)", [&] {
    const auto pol = ops::sum(generic::token_logprobs(x, y), 1);  // [2gp]
    const auto rf = ops::sum(generic::token_logprobs(ref, y), 1);
    preference_batch<eigen_tensor<float>> batch{ops::slice(pol, 0, 0, gp), ops::slice(pol, 0, gp, gp)};
    batch.ref_chosen_logps = ops::slice(rf, 0, 0, gp);
    batch.ref_rejected_logps = ops::slice(rf, 0, gp, gp);
    const auto loss = dpo(batch, {.beta = c.beta}).loss;
    const auto g = dpo_backward(batch, {.beta = c.beta});
    const auto grad = sequence_logps_backward(x, y, ops::concat(std::vector{g.chosen_logps, g.rejected_logps}, 0));
    benchmark::DoNotOptimize(loss.data());
    benchmark::DoNotOptimize(grad.data());
  });
  st.SetItemsProcessed(st.iterations() * c.generic_rows());
}
void s5_fused(benchmark::State& st, bool in_place) {
  auto& in = s5();
  float* out = in_place ? in.policy.data_ptr<float>() : in.grad.data_ptr<float>();
  timed(st, timings(), in_place ? "S5 fused kernels, in place" : "S5 fused kernels, into a buffer", [&] {
    // In place overwrites the policy logits: later iterations differentiate the previous gradient,
    // which costs the same (the kernels' work does not depend on the values).
    benchmark::DoNotOptimize(s5_fused_step(in.policy.data_ptr<float>(), in.reference.data_ptr<float>(),
                                           in.labels.data_ptr<std::int64_t>(), out));
  });
  st.SetItemsProcessed(st.iterations() * cfg().rows());
  if (in_place) s5_slot().reset();  // the last S5 case: give the ~6 GiB back before the next scenario
}

// ---- KD inputs -----------------------------------------------------------------------------------

struct kd_inputs {
  eigen_tensor<float> student, teacher, grad, mask;
};
std::unique_ptr<kd_inputs>& kd_slot() {
  static std::unique_ptr<kd_inputs> p;
  return p;
}
at::Tensor view(eigen_tensor<float>& t) {
  return at::from_blob(t.data(), std::vector<std::int64_t>(t.shape().begin(), t.shape().end()), at::kFloat);
}
kd_inputs& kd() {
  auto& p = kd_slot();
  if (!p) {
    const auto& c = cfg();
    p = std::make_unique<kd_inputs>();
    p->student = eigen_tensor<float>({c.kd_n, c.kd_vocab});
    p->teacher = eigen_tensor<float>({c.kd_n, c.kd_vocab});
    p->grad = eigen_tensor<float>({c.kd_n, c.kd_vocab});
    p->mask = eigen_tensor<float>({c.kd_n}, 1.0f);
    at::manual_seed(6);
    view(p->student).copy_(at::randn({c.kd_n, c.kd_vocab}) * 2.0);
    view(p->teacher).copy_(view(p->student) + at::randn({c.kd_n, c.kd_vocab}) * 1.5);
  }
  return *p;
}

at::Tensor kd_naive_step(const at::Tensor& x, const at::Tensor& teacher) {
  at::Tensor t;
  {
    at::NoGradGuard no_grad;
    t = at::log_softmax(teacher, -1);
  }
  // F.kl_div(log_softmax(student), log_softmax(teacher), log_target=True, reduction="batchmean")
  const at::Tensor loss = at::kl_div(at::log_softmax(x, -1), t, at::Reduction::Sum, true) / x.size(0);
  loss.backward();
  return loss.detach();
}

void kd_floor(benchmark::State& st) {
  auto& in = kd();
  const std::int64_t n = cfg().kd_n, v = cfg().kd_vocab;
  timed(st, timings(), "KD floor: read+read+write",
        [&] { benchmark::DoNotOptimize(read_read_write(in.teacher.data(), in.student.data(), in.grad.data(), n, v)); });
  st.SetBytesProcessed(st.iterations() * n * v * 12);
}
void kd_floor_exp(benchmark::State& st) {
  timed(st, timings(), "KD floor: exp", [&] { benchmark::DoNotOptimize(exp_loop(2 * cfg().kd_n, cfg().kd_vocab)); });
  st.SetItemsProcessed(st.iterations() * 2 * cfg().kd_n * cfg().kd_vocab);
}
void kd_naive(benchmark::State& st) {
  auto& in = kd();
  at::Tensor x = view(in.student).detach().requires_grad_();
  const at::Tensor t = view(in.teacher);
  timed(st, timings(), "KD naive LibTorch", [&] {
    x.mutable_grad() = at::Tensor();
    benchmark::DoNotOptimize(kd_naive_step(x, t).data_ptr());
    benchmark::DoNotOptimize(x.grad().data_ptr());
  });
  x.mutable_grad() = at::Tensor();
  st.SetItemsProcessed(st.iterations() * cfg().kd_n);
}
void kd_generic(benchmark::State& st) {
  auto& in = kd();
  const std::int64_t n = cfg().kd_generic_n, v = cfg().kd_vocab;
  eigen_tensor<float> x({n, v}), t({n, v}), mask({n}, 1.0f);
  std::memcpy(x.data(), in.student.data(), static_cast<std::size_t>(n * v) * 4);
  std::memcpy(t.data(), in.teacher.data(), static_cast<std::size_t>(n * v) * 4);
  timed(st, timings(), "KD posttrain generic (Eigen, 16 rows)", [&] {
    const auto r = generic::distill_loss_masked(x, t, mask);
    const auto g = generic::distill_loss_masked_backward(x, t, mask);
    benchmark::DoNotOptimize(r.loss.data());
    benchmark::DoNotOptimize(g.data());
  });
  st.SetItemsProcessed(st.iterations() * n);
}
void kd_api_eigen(benchmark::State& st) {
  auto& in = kd();
  timed(st, timings(), "KD posttrain API on Eigen (fused override)", [&] {
    const auto r = distill_loss_masked(in.student, in.teacher, in.mask);
    const auto g = distill_loss_masked_backward(in.student, in.teacher, in.mask);
    benchmark::DoNotOptimize(r.loss.data());
    benchmark::DoNotOptimize(g.data());
  });
  st.SetItemsProcessed(st.iterations() * cfg().kd_n);
}
double kd_fused_step(kd_inputs& in, float* grad, std::vector<float>& value, const std::vector<float>& weight) {
  kernels::distill_forward_backward<float>(in.student.data(), in.teacher.data(), cfg().kd_n, cfg().kd_vocab,
                                           fused_kd_spec{}, value.data(), weight.data(), grad);
  double loss = 0;
  for (float l : value) loss += l;
  return loss / static_cast<double>(cfg().kd_n);
}
void kd_fused(benchmark::State& st, bool in_place) {
  auto& in = kd();
  std::vector<float> value(static_cast<std::size_t>(cfg().kd_n)),
      weight(value.size(), 1.0f / static_cast<float>(cfg().kd_n));
  float* out = in_place ? in.student.data() : in.grad.data();
  timed(st, timings(), in_place ? "KD fused kernel, in place" : "KD fused kernel, into a buffer",
        [&] { benchmark::DoNotOptimize(kd_fused_step(in, out, value, weight)); });
  st.SetItemsProcessed(st.iterations() * cfg().kd_n);
  if (in_place) kd_slot().reset();
}

// ---- --quick: fused results against LibTorch autograd ----------------------------------------------

/// max |a - b| over two float buffers of n elements.
double max_abs_diff(const float* a, const float* b, std::int64_t n) {
  double m = 0;
  for (std::int64_t i = 0; i < n; ++i) m = std::max(m, std::abs(static_cast<double>(a[i]) - static_cast<double>(b[i])));
  return m;
}

/// Fused S5 and KD vs the naive LibTorch composition on the quick shapes; false on a mismatch. The
/// bounds are float32 round-off over these small rows (gradients here are ~1e-2 at most).
bool quick_check() {
  bool ok = true;
  {
    auto& in = s5();
    at::Tensor x = in.policy.detach().clone().requires_grad_();
    const double naive = s5_naive_step(x, in.reference, in.labels).item<double>();
    at::Tensor g = at::empty_like(in.policy);
    const double fused = s5_fused_step(in.policy.data_ptr<float>(), in.reference.data_ptr<float>(),
                                       in.labels.data_ptr<std::int64_t>(), g.data_ptr<float>());
    const double dg = max_abs_diff(g.data_ptr<float>(), x.grad().data_ptr<float>(), g.numel());
    std::printf("quick check S5: loss fused %.7f naive %.7f, max |grad diff| %.2e\n", fused, naive, dg);
    ok = ok && std::abs(fused - naive) < 1e-5 && dg < 1e-7;
  }
  {
    auto& in = kd();
    at::Tensor x = view(in.student).detach().clone().requires_grad_();
    const double naive = kd_naive_step(x, view(in.teacher)).item<double>();
    std::vector<float> value(static_cast<std::size_t>(cfg().kd_n)),
        weight(value.size(), 1.0f / static_cast<float>(cfg().kd_n));
    const double fused = kd_fused_step(in, in.grad.data(), value, weight);
    const double dg = max_abs_diff(in.grad.data(), x.grad().data_ptr<float>(), x.numel());
    std::printf("quick check KD: loss fused %.7f naive %.7f, max |grad diff| %.2e\n", fused, naive, dg);
    ok = ok && std::abs(fused - naive) < 1e-5 && dg < 1e-7;
  }
  return ok;
}

// ---- peak memory -----------------------------------------------------------------------------------

using posttrain_bench::peak_bytes;
using posttrain_bench::reset_peak;

const std::vector<std::string> memory_cases = {"S5 naive LibTorch",
                                               "S5 posttrain API on torch + backward()",
                                               "S5 fused kernels, into a buffer",
                                               "S5 fused kernels, in place",
                                               "KD naive LibTorch",
                                               "KD posttrain API on Eigen (fused override)",
                                               "KD fused kernel, into a buffer",
                                               "KD fused kernel, in place"};

/// Runs one case once in this (child) process and prints its peak extra bytes.
void run_peak_memory(const std::string& name) {
  long before = 0;
  if (name.rfind("S5", 0) == 0) {
    auto& in = s5();
    in.grad = at::Tensor();  // only the buffer case allocates its gradient, inside the measurement
    if (name == "S5 naive LibTorch" || name == "S5 posttrain API on torch + backward()") {
      at::Tensor x = in.policy.detach().requires_grad_();
      before = reset_peak();
      if (name == "S5 naive LibTorch")
        s5_naive_step(x, in.reference, in.labels);
      else
        s5_api_step(x, in.reference, in.labels);
    } else if (name == "S5 fused kernels, into a buffer") {
      before = reset_peak();
      at::Tensor g = at::empty_like(in.policy);  // the gradient is an output the caller needs
      s5_fused_step(in.policy.data_ptr<float>(), in.reference.data_ptr<float>(), in.labels.data_ptr<std::int64_t>(),
                    g.data_ptr<float>());
    } else {
      before = reset_peak();
      s5_fused_step(in.policy.data_ptr<float>(), in.reference.data_ptr<float>(), in.labels.data_ptr<std::int64_t>(),
                    in.policy.data_ptr<float>());
    }
  } else {
    auto& in = kd();
    in.grad = eigen_tensor<float>();
    std::vector<float> value(static_cast<std::size_t>(cfg().kd_n)),
        weight(value.size(), 1.0f / static_cast<float>(cfg().kd_n));
    if (name == "KD naive LibTorch") {
      at::Tensor x = view(in.student).detach().requires_grad_();
      before = reset_peak();
      kd_naive_step(x, view(in.teacher));
    } else if (name == "KD posttrain API on Eigen (fused override)") {
      before = reset_peak();
      const auto r = distill_loss_masked(in.student, in.teacher, in.mask);
      const auto g = distill_loss_masked_backward(in.student, in.teacher, in.mask);
      benchmark::DoNotOptimize(g.data());
    } else if (name == "KD fused kernel, into a buffer") {
      before = reset_peak();
      eigen_tensor<float> g({cfg().kd_n, cfg().kd_vocab});
      kd_fused_step(in, g.data(), value, weight);
    } else {
      before = reset_peak();
      kd_fused_step(in, in.student.data(), value, weight);
    }
  }
  std::printf("%ld\n", std::max(0L, peak_bytes() - before));
}

double mib(double bytes) { return bytes / (1024.0 * 1024.0); }

std::string self_path() {
  char buf[4096];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof buf - 1);
  return n > 0 ? std::string(buf, static_cast<std::size_t>(n)) : std::string("posttrain_bench");
}

void print_summary() {
  auto& t = timings();
  if (t.empty()) return;
  const auto get = [&](const std::string& k) { return t.count(k) ? t[k] : 0.0; };
  const auto& c = cfg();
  std::printf("\n=== S5 DPO from logits / KD forward KL: summary (mean ms per call; threads = %d) ===\n",
              kernels::num_threads());
  const double f5 = std::max(get("S5 floor: read+read+write"), get("S5 floor: exp"));
  const double fk = std::max(get("KD floor: read+read+write"), get("KD floor: exp"));
  std::printf("S5 floor: read+read+write %.1f ms, exp %.1f ms -> %.1f ms\n", 1e3 * get("S5 floor: read+read+write"),
              1e3 * get("S5 floor: exp"), 1e3 * f5);
  std::printf("KD floor: read+read+write %.1f ms, exp %.1f ms -> %.1f ms\n", 1e3 * get("KD floor: read+read+write"),
              1e3 * get("KD floor: exp"), 1e3 * fk);
  struct row {
    std::string name;
    bool s5;
    double scale;  // rows of this case / rows of the scenario
  };
  const double g5 = static_cast<double>(c.generic_rows()) / static_cast<double>(c.rows());
  const double gk = static_cast<double>(c.kd_generic_n) / static_cast<double>(c.kd_n);
  const std::vector<row> rows = {{"S5 naive LibTorch", true, 1},
                                 {"S5 posttrain generic (Eigen, 16 rows)", true, g5},
                                 {"S5 posttrain API on torch + backward()", true, 1},
                                 {"S5 fused kernels, into a buffer", true, 1},
                                 {"S5 fused kernels, in place", true, 1},
                                 {"KD naive LibTorch", false, 1},
                                 {"KD posttrain generic (Eigen, 16 rows)", false, gk},
                                 {"KD posttrain API on Eigen (fused override)", false, 1},
                                 {"KD fused kernel, into a buffer", false, 1},
                                 {"KD fused kernel, in place", false, 1}};
  std::printf("%-46s %12s %10s %14s\n", "case", "ms", "x floor", "speed-up vs naive");
  for (const auto& r : rows) {
    if (!t.count(r.name)) continue;
    const double floor = (r.s5 ? f5 : fk) * r.scale;
    const double naive = get(r.s5 ? "S5 naive LibTorch" : "KD naive LibTorch");
    std::printf("%-46s %12.1f %10.2f %14.2f\n", r.name.c_str(), 1e3 * get(r.name), get(r.name) / floor,
                naive / (get(r.name) / r.scale));
  }
  std::printf("\n=== S5 / KD peak extra memory (VmHWM - RSS before the call, HWM reset first, fresh process) ===\n");
  std::printf("lower bounds: S5 gradient %.1f MiB, KD gradient %.1f MiB (in place: 0)\n",
              mib(static_cast<double>(c.rows() * c.vocab) * 4.0), mib(static_cast<double>(c.kd_n * c.kd_vocab) * 4.0));
  const std::string self = self_path();
  for (const auto& name : memory_cases) {
    if (!t.count(name)) continue;
    const std::string cmd = self + " --threads=" + std::to_string(kernels::num_threads()) +
                            (c.quick ? " --quick" : "") + " '--dpo-peak-memory=" + name + "'";
    double bytes = -1;
    if (FILE* p = popen(cmd.c_str(), "r")) {
      if (std::fscanf(p, "%lf", &bytes) != 1) bytes = -1;
      pclose(p);
    }
    std::printf("%-46s %10.1f MiB\n", name.c_str(), mib(bytes));
  }
  std::fflush(stdout);
}

/// The last registered case: prints the summary and the peak memory (and, with --quick, checks the
/// fused results). It runs inside main, where LibTorch is still alive (at exit its generator mutex
/// and thread pool are already gone).
void summary_case(benchmark::State& st) {
  for (auto _ : st) {
    print_summary();
    if (cfg().quick && !timings().empty()) {
      const bool ok = quick_check();
      std::fflush(stdout);
      if (!ok) {
        std::fprintf(stderr, "bench_dpo: fused S5/KD results disagree with LibTorch autograd\n");
        std::_Exit(1);
      }
    }
  }
}

/// Static-initialisation hook: a peak-memory child runs its case and exits; otherwise the cases are
/// registered (they run inside bench_logits.cpp's main, after its flags and thread counts are set).
[[maybe_unused]] const bool registered = [] {
  const auto& c = cfg();
  if (!c.peak_case.empty()) {
    mallopt(M_MMAP_THRESHOLD, 1 << 30);  // as bench_logits.cpp's main
    mallopt(M_TRIM_THRESHOLD, -1);
    mallopt(M_TOP_PAD, 64 << 20);
    kernels::set_num_threads(c.threads);
    at::set_num_threads(kernels::num_threads());
    run_peak_memory(c.peak_case);
    std::fflush(stdout);
    std::_Exit(0);
  }
  const auto reg = [&](const std::string& name, auto fn) {
    benchmark::RegisterBenchmark(name.c_str(), fn)
        ->Iterations(c.iterations)
        ->Unit(benchmark::kMillisecond)
        ->UseRealTime();
  };
  reg("S5/floor_read_read_write", s5_floor);
  reg("S5/floor_exp", s5_floor_exp);
  reg("S5/naive_libtorch_dpo_fwd_bwd", s5_naive);
  reg("S5/posttrain_generic_eigen", s5_generic);
  reg("S5/posttrain_api_torch_fwd_bwd", s5_api_torch);
  reg("S5/fused_kernels_buffer", [](benchmark::State& s) { s5_fused(s, false); });
  reg("S5/fused_kernels_in_place", [](benchmark::State& s) { s5_fused(s, true); });
  reg("KD/floor_read_read_write", kd_floor);
  reg("KD/floor_exp", kd_floor_exp);
  reg("KD/naive_libtorch_kl_fwd_bwd", kd_naive);
  reg("KD/posttrain_generic_eigen", kd_generic);
  reg("KD/posttrain_api_eigen_fwd_bwd", kd_api_eigen);
  reg("KD/fused_kernel_buffer", [](benchmark::State& s) { kd_fused(s, false); });
  reg("KD/fused_kernel_in_place", [](benchmark::State& s) { kd_fused(s, true); });
  benchmark::RegisterBenchmark("S5_KD/summary_and_peak_memory", summary_case)->Iterations(1);
  return true;
}();

}  // namespace
