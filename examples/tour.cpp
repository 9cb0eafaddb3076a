// examples/tour.cpp — the post-training stack in miniature: one tiny causal transformer, trained in
// LibTorch on CPU, through every stage of post-training, with posttrain's torch backend computing
// every loss.
//
//   0 base      next-token pre-training on documents that are lists of questions
//   1 SFT       answers, loss on the answer tokens only                           (sft_loss)
//   2 RM        a Bradley-Terry reward model from ranked pairs                   (reward_model_loss)
//   3 PPO       RLHF against the RM with a KL leash, and with the leash off      (kl_shaped_rewards, gae,
//                                                                                 ppo_objective,
//                                                                                 adaptive_kl_controller)
//   4 DPO/IPO   the same pairs, no reward model, no rollouts                     (sequence_logps, dpo)
//   5 GRPO      RL from a verifiable reward (exact match)                        (grpo_advantages, grpo_loss)
//   6 agentic   a two-turn episode with a calculator tool whose tokens are masked (sft_loss, -100 labels)
//
// The task is written as text, one character per token: "Q:3+4? A:07\n". Everything is synthetic and
// generated here; the seed is fixed and the tour runs on one CPU thread, so it prints the same numbers
// on every run on a given machine (another LibTorch or BLAS may change low digits, and through them samples).
//
//   posttrain_tour            the full tour (1-3 minutes on a 2-core machine, one thread)
//   posttrain_tour --quick    every stage for a few steps: a smoke test of the invariants (ctest)
//   --out DIR                 where the pictures go (default tour-out): per stage a gnuplot data file and
//                             script, the PNG when gnuplot is on PATH, and index.md showing them in order
//                             (tour_plots.hpp); teaching pictures of the PPO surrogate, the KL estimators
//                             and DPO's sigma(-x) weight are computed with posttrain's functions
//
// Exit status 1 when an invariant fails (a loss is not finite, SFT does not lower its loss, a masked
// tool token gets a non-zero gradient); the full tour also states whether each stage's claim held.
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <map>
#include <posttrain/backends/torch.hpp>
#include <posttrain/posttrain.hpp>
#include <random>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tour_plots.hpp"

namespace {
namespace pt = posttrain;
using torch::Tensor;

// ---------------------------------------------------------------------------------------------
// Run configuration: the full tour, or the quick smoke test (same code, fewer steps).
struct config {
  bool quick = false;
  int base_steps = 150, sft_steps = 400, sft_early = 150, rm_steps = 150, ppo_iters = 30, dpo_steps = 60,
      grpo_iters = 30, agent_steps = 250;
};

bool g_failed = false;  // an invariant failed (exit status 1)
std::vector<std::pair<std::string, bool>> g_claims;
tour_plots::plotter* g_plots = nullptr;  // the pictures (tour_plots.hpp)
using tour_plots::figure, tour_plots::line;
std::vector<double> steps_1_to(std::size_t n) {  // 1, 2, ..., n
  std::vector<double> x;
  for (std::size_t i = 1; i <= n; ++i) x.push_back(double(i));
  return x;
}

void check(bool ok, const std::string& what) {
  if (!ok) {
    std::printf("  FAILED: %s\n", what.c_str());
    g_failed = true;
  }
}
void claim(bool ok, const std::string& what) {
  std::printf("  claim: %s ... %s\n", what.c_str(), ok ? "holds" : "NOT MET");
  g_claims.emplace_back(what, ok);
}
bool finite(double x) { return std::isfinite(x); }

struct timer {
  std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
  double seconds() const { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); }
};

// ---------------------------------------------------------------------------------------------
// Tokenizer: one character per token.
constexpr std::string_view kChars = "0123456789+QA:? \n_C=";
constexpr std::int64_t kVocab = static_cast<std::int64_t>(kChars.size());
constexpr std::int64_t kEos = 16;  // '\n' ends an answer
constexpr std::int64_t kCtx = 40;  // longest sequence the model sees

std::int64_t tok(char c) {
  const auto p = kChars.find(c);
  if (p == std::string_view::npos) throw std::runtime_error(std::string("tour: no token for '") + c + "'");
  return static_cast<std::int64_t>(p);
}
std::string show(const std::string& s) {  // newline printed as \n
  std::string out;
  for (char c : s) out += c == '\n' ? std::string("\\n") : std::string(1, c);
  return out;
}
std::string detok(const Tensor& row) {  // [L] int64 -> text
  std::string s;
  auto r = row.contiguous();
  for (std::int64_t i = 0; i < r.size(0); ++i) s += kChars[static_cast<std::size_t>(r[i].item<std::int64_t>())];
  return s;
}

// ---------------------------------------------------------------------------------------------
// The task: single-digit addition as Q:/A: text; the answer is always two digits.
struct question {
  int a = 0, b = 0;
  std::string prompt() const { return "Q:" + std::to_string(a) + "+" + std::to_string(b) + "?"; }
  std::string answer(int v) const { return std::string(" A:") + char('0' + v / 10) + char('0' + v % 10) + "\n"; }
  std::string gold() const { return answer(a + b); }
};
std::vector<question> all_questions() {
  std::vector<question> q;
  for (int a = 0; a < 10; ++a)
    for (int b = 0; b < 10; ++b) q.push_back({a, b});
  return q;
}
constexpr std::int64_t kPrompt = 6;  // "Q:3+4?"
constexpr double kRlLr = 2e-4;       // PPO's learning rate (SFT: 5e-3; RL moves in smaller steps)
constexpr double kGrpoLr = 1e-3;     // GRPO's: its batch (800 answers, every question) is less noisy
constexpr int kGrpoWarmup = 5;       // GRPO's learning rate rises linearly over its first 5 iterations
constexpr double kBeta0 = 1.0;       // PPO's initial KL coefficient
constexpr double kKlTarget = 0.5;    // PPO's KL target (nats per answer)

// A training example: text and, per character, who wrote it: 'p' prompt, 'a' the model (assistant),
// 't' a tool. Only the model's characters are labels; the rest are context (label -100).
struct example {
  std::string text, roles;
};

// The multi-turn mask with posttrain's batch helpers (posttrain/data/): per character, its token and
// who wrote it (0 prompt or padding, 1 the model, 2 a tool). role_mask keeps the model's characters as
// targets (the rest -100, ignored by sft_loss / sequence_logps), shift_labels turns them into next-token
// labels: inputs are text[0..n-2], labels[t] = text[t+1] when the model wrote it. Rows are right-padded
// with '\n' (label -100).
std::pair<Tensor, Tensor> batch_of(const std::vector<example>& xs) {
  std::size_t len = 0;
  for (const auto& x : xs) len = std::max(len, x.text.size());
  const auto B = static_cast<std::int64_t>(xs.size()), n = static_cast<std::int64_t>(len);
  Tensor tokens = torch::full({B, n}, kEos, torch::kLong), roles = torch::zeros({B, n}, torch::kLong);
  auto ta = tokens.accessor<std::int64_t, 2>();
  auto ra = roles.accessor<std::int64_t, 2>();
  for (std::int64_t b = 0; b < B; ++b) {
    const auto& x = xs[static_cast<std::size_t>(b)];
    for (std::size_t t = 0; t < x.text.size(); ++t) {
      ta[b][static_cast<std::int64_t>(t)] = tok(x.text[t]);
      ra[b][static_cast<std::int64_t>(t)] = x.roles[t] == 'a' ? 1 : x.roles[t] == 't' ? 2 : 0;
    }
  }
  const auto model_wrote = pt::role_mask(roles, 1, torch::zeros({1})).to(torch::kBool);
  const auto targets = torch::where(model_wrote, tokens, torch::full_like(tokens, pt::default_ignore_index));
  // The inputs: a row's last character predicts nothing, so it is padding there too.
  Tensor ids = tokens.clone();
  auto ia = ids.accessor<std::int64_t, 2>();
  for (std::int64_t b = 0; b < B; ++b)
    ia[b][static_cast<std::int64_t>(xs[static_cast<std::size_t>(b)].text.size()) - 1] = kEos;
  return {ids.slice(1, 0, n - 1), pt::shift_labels(targets).slice(1, 0, n - 1)};
}
example sft_example(const question& q, const std::string& answer) {
  return {q.prompt() + answer, std::string(kPrompt, 'p') + std::string(answer.size(), 'a')};
}

// ---------------------------------------------------------------------------------------------
// The model: a GPT-style causal transformer (pre-LayerNorm blocks, learned positions), with a
// scalar head used as the value function (PPO) or the reward (RM).
struct BlockImpl : torch::nn::Module {
  torch::nn::LayerNorm ln1{nullptr}, ln2{nullptr};
  torch::nn::Linear qkv{nullptr}, proj{nullptr}, fc1{nullptr}, fc2{nullptr};
  std::int64_t heads;
  BlockImpl(std::int64_t d, std::int64_t h) : heads(h) {
    ln1 = register_module("ln1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({d})));
    ln2 = register_module("ln2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({d})));
    qkv = register_module("qkv", torch::nn::Linear(d, 3 * d));
    proj = register_module("proj", torch::nn::Linear(d, d));
    fc1 = register_module("fc1", torch::nn::Linear(d, 4 * d));
    fc2 = register_module("fc2", torch::nn::Linear(4 * d, d));
  }
  Tensor forward(Tensor x) {
    const auto B = x.size(0), T = x.size(1), D = x.size(2), hd = D / heads;
    auto qkv_ = qkv(ln1(x)).view({B, T, 3, heads, hd}).permute({2, 0, 3, 1, 4});           // [3, B, H, T, hd]
    auto att = torch::matmul(qkv_[0], qkv_[1].transpose(-2, -1)) / std::sqrt(double(hd));  // [B, H, T, T]
    auto future = torch::ones({T, T}, torch::kBool).triu(1);
    att = torch::softmax(att.masked_fill(future, -std::numeric_limits<float>::infinity()), -1);
    x = x + proj(torch::matmul(att, qkv_[2]).transpose(1, 2).reshape({B, T, D}));  // [B, T, D]
    return x + fc2(torch::gelu(fc1(ln2(x))));
  }
};
TORCH_MODULE(Block);

struct TinyLMImpl : torch::nn::Module {
  static constexpr std::int64_t d = 32, heads = 4, layers = 2;
  torch::nn::Embedding wte{nullptr}, wpe{nullptr};
  std::vector<Block> blocks;
  torch::nn::LayerNorm lnf{nullptr};
  torch::nn::Linear lm_head{nullptr}, scalar_head{nullptr};
  TinyLMImpl() {
    wte = register_module("wte", torch::nn::Embedding(kVocab, d));
    wpe = register_module("wpe", torch::nn::Embedding(kCtx, d));
    for (std::int64_t i = 0; i < layers; ++i)
      blocks.push_back(register_module("block" + std::to_string(i), Block(d, heads)));
    lnf = register_module("lnf", torch::nn::LayerNorm(torch::nn::LayerNormOptions({d})));
    lm_head = register_module("lm_head", torch::nn::Linear(d, kVocab));
    scalar_head = register_module("scalar_head", torch::nn::Linear(d, 1));
  }
  Tensor hidden(const Tensor& ids) {  // [B, T] -> [B, T, d]
    auto x = wte(ids) + wpe(torch::arange(ids.size(1), torch::kLong));
    for (auto& b : blocks) x = b(x);
    return lnf(x);
  }
  Tensor logits(const Tensor& ids) { return lm_head(hidden(ids)); }  // [B, T, V]
};
TORCH_MODULE(TinyLM);

TinyLM copy_of(const TinyLM& src) {
  TinyLM dst;
  torch::NoGradGuard ng;
  auto d = dst->named_parameters();
  for (const auto& kv : src->named_parameters()) d[kv.key()].copy_(kv.value());
  return dst;
}
torch::optim::AdamW adamw(TinyLM& m, double lr) {
  return torch::optim::AdamW(m->parameters(), torch::optim::AdamWOptions(lr).weight_decay(0.0));
}
void clip_grads(TinyLM& m) { torch::nn::utils::clip_grad_norm_(m->parameters(), 1.0); }

// ---------------------------------------------------------------------------------------------
// Sampling: prompts [B, P] -> the response [B, L] (tokens after the first '\n' replaced by '\n') and
// its mask [B, L] (1 up to and including the first '\n').
struct rollout {
  Tensor seq;       // [B, P + L]
  Tensor response;  // [B, L]
  Tensor mask;      // [B, L] float 0/1
};
rollout sample(TinyLM& m, const Tensor& prompts, std::int64_t L, double temperature) {
  torch::NoGradGuard ng;
  Tensor seq = prompts;
  for (std::int64_t i = 0; i < L; ++i) {
    auto last = m->logits(seq).select(1, -1);  // [B, V]
    auto next =
        temperature == 0.0 ? last.argmax(-1) : torch::multinomial(torch::softmax(last / temperature, -1), 1).squeeze(1);
    seq = torch::cat({seq, next.unsqueeze(1)}, 1);
  }
  auto resp = seq.slice(1, prompts.size(1));
  auto is_eos = resp.eq(kEos).to(torch::kLong);
  auto eos_before = is_eos.cumsum(1) - is_eos;  // count of '\n' strictly before t
  auto mask = eos_before.eq(0);
  resp = torch::where(mask, resp, torch::full_like(resp, kEos));
  return {torch::cat({prompts, resp}, 1), resp, mask.to(torch::kFloat)};
}
Tensor prompts_of(const std::vector<question>& qs) {
  std::vector<example> xs;
  for (const auto& q : qs) xs.push_back({q.prompt() + " ", std::string(kPrompt + 1, 'p')});
  return batch_of(xs).first;  // [B, 6]: the prompt without the trailing space
}
// Per-token log-probabilities (and entropies) of the response under m: [B, L] each.
pt::logprobs_and_entropy<Tensor> response_logprobs(TinyLM& m, const rollout& r, std::int64_t P) {
  auto logits = m->logits(r.seq.slice(1, 0, -1)).slice(1, P - 1);  // [B, L, V]: position t predicts token t+1
  return pt::token_logprobs_and_entropy(logits, r.response);
}
double exact_match(const std::vector<question>& qs, const Tensor& response) {
  double hit = 0;
  for (std::size_t i = 0; i < qs.size(); ++i) {
    auto s = detok(response[static_cast<std::int64_t>(i)]);
    hit += s.substr(0, 6) == qs[i].gold();
  }
  return hit / double(qs.size());
}
std::vector<double> exact_match_each(const std::vector<question>& qs, const Tensor& response) {
  std::vector<double> out;
  for (std::size_t i = 0; i < qs.size(); ++i)
    out.push_back(detok(response[static_cast<std::int64_t>(i)]).substr(0, 6) == qs[i].gold() ? 1.0 : 0.0);
  return out;
}
// Exact-match of n samples (temperature 1) of each of the 100 questions: the GRPO reward, averaged.
double sampled_exact_match(TinyLM& m, int n) {
  std::vector<question> qs;
  for (const auto& q : all_questions())
    for (int i = 0; i < n; ++i) qs.push_back(q);
  return exact_match(qs, sample(m, prompts_of(qs), 6, 1.0).response);
}
// The expected exact-match reward at temperature 1, computed exactly rather than sampled:
// E[r] = (1/100) sum_q pi(gold answer | q) = (1/100) sum_q exp(sum_t log p(y_t | q, y_<t)).
double expected_reward(TinyLM& m) {
  torch::NoGradGuard ng;
  std::vector<example> xs;
  for (const auto& q : all_questions()) xs.push_back(sft_example(q, q.gold()));
  auto [ids, labels] = batch_of(xs);
  return pt::sequence_logps(m->logits(ids), labels).logps.exp().mean().item<double>();
}
double greedy_exact_match(TinyLM& m, const std::vector<question>& qs) {
  return exact_match(qs, sample(m, prompts_of(qs), 6, 0.0).response);
}
std::string greedy_text(TinyLM& m, const std::string& prompt, std::int64_t L) {
  std::vector<example> xs{{prompt + " ", std::string(prompt.size() + 1, 'p')}};
  return detok(sample(m, batch_of(xs).first, L, 0.0).response[0]);
}

// ---------------------------------------------------------------------------------------------
// Stage 0: base model.
void stage_base(TinyLM& base, const config& cfg, std::mt19937& rng) {
  std::printf("\n== Stage 0: base model — next-token prediction on documents that are lists of questions\n");
  std::printf("  L = -(1/N) sum_t log p(x_{t+1} | x_<=t)     (sft_loss with every token a label)\n");
  auto qs = all_questions();
  std::uniform_int_distribution<std::size_t> pick(0, qs.size() - 1);
  auto doc = [&] {
    std::string s;
    for (int i = 0; i < 3; ++i) {
      if (i > 0) s += ' ';
      s += qs[pick(rng)].prompt();
    }
    return example{s, std::string(s.size(), 'a')};
  };
  auto opt = adamw(base, 3e-3);
  double first = 0, last = 0;
  std::vector<double> losses;
  timer t;
  for (int step = 1; step <= cfg.base_steps; ++step) {
    std::vector<example> xs;
    for (int i = 0; i < 16; ++i) xs.push_back(doc());
    auto [ids, labels] = batch_of(xs);
    auto sft = pt::sft_loss(base->logits(ids), labels);
    opt.zero_grad();
    sft.loss.backward();
    opt.step();
    const double l = sft.loss.item<double>();
    check(finite(l), "base loss is finite");
    losses.push_back(l);
    if (step == 1) first = l;
    last = l;
    if (step == 1 || step % 50 == 0 || step == cfg.base_steps)
      std::printf("  step %4d  loss %.3f  token_acc %.3f  (%.1fs)\n", step, l, sft.token_accuracy.item<double>(),
                  t.seconds());
  }
  check(last < first, "base loss falls");
  g_plots->add(
      {.name = "01-base",
       .title = "Stage 0, base model: next-token loss on documents of questions",
       .xlabel = "step",
       .ylabel = "loss (nats per token)",
       .lines = {{.title = "training loss (16 documents per step)", .x = steps_1_to(losses.size()), .y = losses}},
       .caption = "Pre-training on documents that are lists of questions: the model learns the format "
                  "\"Q:a+b?\" and, asked a question, continues with another question."});
  auto sample_text = greedy_text(base, "Q:3+4?", 8);
  std::printf("  sample: \"Q:3+4?\" -> \"%s\"\n", show(sample_text).c_str());
  claim(sample_text.rfind(" Q:", 0) == 0, "asked a question, the base model continues with another question");
}

// Stage 1: SFT. Returns the early checkpoint (for GRPO) through `early`.
void stage_sft(TinyLM& policy, TinyLM& early, const config& cfg) {
  std::printf("\n== Stage 1: supervised fine-tuning — loss on the answer tokens only\n");
  std::printf("  L = -(1/N) sum_{t in answer} log p(y_t | x, y_<t)     (sft_loss; prompt labels -100)\n");
  auto qs = all_questions();
  std::vector<example> xs;
  for (const auto& q : qs) xs.push_back(sft_example(q, q.gold()));
  auto [ids, labels] = batch_of(xs);  // all 100 questions, one batch
  const double em0 = greedy_exact_match(policy, qs);
  std::printf("  before: exact-match %.2f   \"Q:3+4?\" -> \"%s\"\n", em0,
              show(greedy_text(policy, "Q:3+4?", 6)).c_str());
  auto opt = adamw(policy, 5e-3);
  double first = 0, last = 0;
  std::vector<double> losses, em_x, em_y;
  timer t;
  for (int step = 1; step <= cfg.sft_steps; ++step) {
    auto sft = pt::sft_loss(policy->logits(ids), labels);
    opt.zero_grad();
    sft.loss.backward();
    opt.step();
    const double l = sft.loss.item<double>();
    check(finite(l), "SFT loss is finite");
    losses.push_back(l);
    if (step == 1) first = l;
    last = l;
    if (step == cfg.sft_early) early = copy_of(policy);
    if (step == 1 || step % 25 == 0 || step == cfg.sft_steps || step == cfg.sft_early) {
      em_x.push_back(step), em_y.push_back(greedy_exact_match(policy, qs));
      if (step == 1 || step % 50 == 0 || step == cfg.sft_steps || step == cfg.sft_early)
        std::printf("  step %4d  loss %.3f  token_acc %.3f  entropy %.3f  exact-match %.2f  (%.1fs)\n", step, l,
                    sft.token_accuracy.item<double>(), sft.entropy.item<double>(), em_y.back(), t.seconds());
    }
  }
  g_plots->add(
      {.name = "02-sft",
       .title = "Stage 1, SFT: loss on the answer tokens, and greedy exact-match",
       .xlabel = "step",
       .ylabel = "loss (nats per answer token)",
       .y2label = "exact-match (100 questions, greedy)",
       .lines = {{.title = "SFT loss", .x = steps_1_to(losses.size()), .y = losses},
                 {.title = "exact-match", .x = em_x, .y = em_y, .y2 = true, .points = true}},
       .caption = std::string("Supervised fine-tuning on the 100 questions (one batch): the loss counts only the "
                              "answer's tokens (prompt labels -100). The checkpoint at step ") +
                  std::to_string(cfg.sft_early) + " is where PPO and GRPO start.",
       .logy = true});
  check(last < first, "SFT loss falls");
  const double em1 = greedy_exact_match(policy, qs);
  std::printf("  after:  exact-match %.2f   \"Q:3+4?\" -> \"%s\"\n", em1,
              show(greedy_text(policy, "Q:3+4?", 6)).c_str());
  if (!cfg.quick) claim(em1 >= 0.9, "SFT exact-match >= 0.9 (greedy, all 100 questions)");
}

// ---------------------------------------------------------------------------------------------
// Preference pairs ranked by a rule: a correct answer beats a wrong one; among correct answers the
// short one beats one padded with '_'.
struct pair_ {
  question q;
  std::string chosen, rejected;
};
std::vector<pair_> make_pairs(const std::vector<question>& qs, int per_question, std::mt19937& rng) {
  std::vector<pair_> out;
  std::uniform_int_distribution<int> val(0, 18), pad(1, 2), kind(0, 2);
  for (const auto& q : qs)
    for (int i = 0; i < per_question; ++i) {
      const int k = kind(rng);
      if (k < 2) {  // correct vs wrong
        int v = val(rng);
        while (v == q.a + q.b) v = val(rng);
        out.push_back({q, q.gold(), k == 0 ? q.answer(v) : q.answer(v).insert(5, std::string(pad(rng), '_'))});
      } else {  // correct vs correct-but-padded
        out.push_back({q, q.gold(), q.gold().insert(5, std::string(pad(rng), '_'))});
      }
    }
  return out;
}

// Reward model: the SFT transformer with a scalar head read at the last token.
Tensor rm_scores(TinyLM& rm, const std::vector<question>& qs, const std::vector<std::string>& answers) {
  std::vector<example> xs;
  std::vector<std::int64_t> last;
  for (std::size_t i = 0; i < qs.size(); ++i) {
    xs.push_back(sft_example(qs[i], answers[i] + "\n"));  // one extra char: batch_of drops the last input
    last.push_back(static_cast<std::int64_t>(qs[i].prompt().size() + answers[i].size()) - 1);
  }
  auto ids = batch_of(xs).first;
  auto h = rm->scalar_head(rm->hidden(ids)).squeeze(-1);                          // [B, T]
  return h.gather(1, torch::tensor(last, torch::kLong).unsqueeze(1)).squeeze(1);  // [B]
}
std::pair<Tensor, Tensor> rm_pair_scores(TinyLM& rm, const std::vector<pair_>& ps) {
  std::vector<question> qs;
  std::vector<std::string> c, r;
  for (const auto& p : ps) qs.push_back(p.q), c.push_back(p.chosen), r.push_back(p.rejected);
  return {rm_scores(rm, qs, c), rm_scores(rm, qs, r)};
}

TinyLM stage_rm(TinyLM& sft, const config& cfg, std::mt19937& rng, std::vector<pair_>& train_pairs,
                std::vector<pair_>& heldout_pairs) {
  std::printf("\n== Stage 2: reward model — Bradley-Terry on ranked pairs\n");
  std::printf("  L = -mean log sigma(r(x, y_c) - r(x, y_r))     (reward_model_loss; InstructGPT eq. 1)\n");
  std::printf("  rule: correct beats wrong; among correct, \" A:07\\n\" beats padded \" A:07__\\n\"\n");
  auto qs = all_questions();
  std::shuffle(qs.begin(), qs.end(), rng);
  std::vector<question> train(qs.begin(), qs.begin() + 70), held(qs.begin() + 70, qs.end());
  train_pairs = make_pairs(train, 6, rng);
  heldout_pairs = make_pairs(held, 4, rng);
  std::printf("  %zu training pairs on 70 questions, %zu held-out pairs on the other 30, e.g. \"%s\" > \"%s\"\n",
              train_pairs.size(), heldout_pairs.size(), show(train_pairs[0].chosen).c_str(),
              show(train_pairs[0].rejected).c_str());
  TinyLM rm = copy_of(sft);
  auto heldout = [&] {
    torch::NoGradGuard ng;
    auto [c, r] = rm_pair_scores(rm, heldout_pairs);
    return pt::reward_model_loss(c, r);
  };
  auto h0 = heldout();
  std::printf("  before: held-out accuracy %.3f  loss %.3f\n", h0.accuracy.item<double>(), h0.loss.item<double>());
  auto opt = adamw(rm, 1e-3);
  std::uniform_int_distribution<std::size_t> pick(0, train_pairs.size() - 1);
  std::vector<double> losses, accs;
  timer t;
  for (int step = 1; step <= cfg.rm_steps; ++step) {
    std::vector<pair_> mb;
    for (int i = 0; i < 32; ++i) mb.push_back(train_pairs[pick(rng)]);
    auto [c, r] = rm_pair_scores(rm, mb);
    auto res = pt::reward_model_loss(c, r);
    opt.zero_grad();
    res.loss.backward();
    opt.step();
    check(finite(res.loss.item<double>()), "RM loss is finite");
    losses.push_back(res.loss.item<double>()), accs.push_back(res.accuracy.item<double>());
    if (step == 1 || step % 25 == 0 || step == cfg.rm_steps)
      std::printf("  step %4d  loss %.3f  train accuracy %.3f  margin %.2f  (%.1fs)\n", step, res.loss.item<double>(),
                  res.accuracy.item<double>(), res.margin.item<double>(), t.seconds());
  }
  auto h1 = heldout();
  char held_acc[64];
  std::snprintf(held_acc, sizeof held_acc, "%.3f before, %.3f after.", h0.accuracy.item<double>(),
                h1.accuracy.item<double>());
  g_plots->add(
      {.name = "03-reward-model",
       .title = "Stage 2, reward model: Bradley-Terry loss and pair accuracy",
       .xlabel = "step",
       .ylabel = "loss -log sigma(r_c - r_r)",
       .y2label = "accuracy (r_c > r_r)",
       .lines = {{.title = "training loss (32 pairs)", .x = steps_1_to(losses.size()), .y = losses},
                 {.title = "training batch accuracy", .x = steps_1_to(accs.size()), .y = accs, .y2 = true}},
       .caption =
           std::string("The reward model (the SFT transformer with a scalar head) learns the rule: correct beats "
                       "wrong, and among correct answers the unpadded one wins. Held-out accuracy: ") +
           held_acc});
  std::printf("  after:  held-out accuracy %.3f  loss %.3f  margin %.2f\n", h1.accuracy.item<double>(),
              h1.loss.item<double>(), h1.margin.item<double>());
  if (!cfg.quick) claim(h1.accuracy.item<double>() >= 0.9, "RM held-out accuracy >= 0.9");
  return rm;
}

// ---------------------------------------------------------------------------------------------
// Teaching pictures, computed with posttrain's functions on made-up inputs (no model).

// PPO's clipped surrogate min(rho A, clip(rho, 1-eps, 1+eps) A) against the ratio rho, for A = +1 and
// A = -1: ppo_policy_loss's per-token loss is its negative.
void teach_ppo_surrogate() {
  std::vector<double> rho;
  for (int i = 1; i <= 200; ++i) rho.push_back(0.01 * i);  // 0.01 .. 2
  const auto n = static_cast<std::int64_t>(rho.size());
  const auto logp = torch::tensor(rho, torch::kDouble).log(), old = torch::zeros({n}, torch::kDouble);
  const auto mask = torch::ones({n}, torch::kDouble);
  auto surrogate = [&](double a) {
    const auto res = pt::ppo_policy_loss(logp, old, torch::full({n}, a, torch::kDouble), mask);
    const auto v = (-res.per_token_loss).contiguous();
    return std::vector<double>(v.data_ptr<double>(), v.data_ptr<double>() + n);
  };
  std::vector<double> up, down;
  for (double r : rho) up.push_back(r), down.push_back(-r);
  g_plots->add({.name = "06-ppo-surrogate",
                .title = "PPO's clipped surrogate min(rho A, clip(rho, 0.8, 1.2) A) against the ratio rho",
                .xlabel = "rho = pi(y|x) / pi_old(y|x)",
                .ylabel = "objective (to maximise)",
                .lines = {{.title = "A = +1 (ppo_policy_loss)", .x = rho, .y = surrogate(1.0)},
                          {.title = "A = -1 (ppo_policy_loss)", .x = rho, .y = surrogate(-1.0)},
                          {.title = "rho A, A = +1 (unclipped)", .x = rho, .y = up, .dashed = true},
                          {.title = "rho A, A = -1 (unclipped)", .x = rho, .y = down, .dashed = true}},
                .caption = "The objective goes flat (zero gradient) once the ratio has moved past 1.2 for a good "
                           "action (A > 0) or below 0.8 for a bad one (A < 0): one batch cannot push the policy "
                           "far. In the other direction it is not clipped, so a mistake can always be undone."});
}

// The KL estimators (Schulman 2020) with samples from the policy q = N(0, 1) against p = N(1, 1):
// KL(q || p) = 1/2 exactly. k1 = r, k2 = r^2/2, k3 = e^{-r} - 1 + r with r = log q(x) - log p(x) (kl_penalty).
// For each sample count n: the mean and the spread (std over 400 repeats) of the n-sample average.
void teach_kl_estimators(bool print) {
  constexpr int repeats = 400;
  constexpr double mu = 1.0, exact = mu * mu / 2;
  std::mt19937 gen(7);  // its own stream: the training stages' random numbers do not change
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<double> ns;
  std::vector<std::vector<double>> mean(3), sd(3);
  const pt::kl_estimator est[3] = {pt::kl_estimator::k1, pt::kl_estimator::k2, pt::kl_estimator::k3};
  if (print) std::printf("  aside, the KL estimators (q = N(0,1) samples, p = N(1,1), exact KL 0.5): mean ± std\n");
  for (std::int64_t n = 1; n <= 1024; n *= 4) {
    std::vector<double> xs;
    for (std::int64_t i = 0; i < repeats * n; ++i) xs.push_back(normal(gen));
    const auto x = torch::tensor(xs, torch::kDouble).view({repeats, n});
    const auto logq = -0.5 * x * x, logp = -0.5 * (x - mu) * (x - mu);  // the 1/sqrt(2 pi) cancels
    ns.push_back(double(n));
    std::string row;
    for (int k = 0; k < 3; ++k) {
      const auto avg = pt::kl_penalty(logq, logp, {.estimator = est[k]}).mean(1);  // [repeats]
      mean[static_cast<std::size_t>(k)].push_back(avg.mean().item<double>());
      sd[static_cast<std::size_t>(k)].push_back(avg.std().item<double>());
      char buf[64];
      std::snprintf(buf, sizeof buf, "  %s %.3f ± %.3f", pt::kl_estimator_name(est[k]),
                    mean[static_cast<std::size_t>(k)].back(), sd[static_cast<std::size_t>(k)].back());
      row += buf;
    }
    if (print) std::printf("    n = %4lld:%s\n", static_cast<long long>(n), row.c_str());
  }
  auto shifted = [&](double f) {
    std::vector<double> v;
    for (double n : ns) v.push_back(n * f);
    return v;
  };
  g_plots->add({.name = "07-kl-estimators",
                .title = "KL estimators: mean ± std of an n-sample average vs the exact KL(q||p) = 0.5",
                .xlabel = "samples n (drawn from q = N(0,1); p = N(1,1))",
                .ylabel = "estimate of KL(q || p)",
                .lines = {{.title = "k1 = r", .x = shifted(0.9), .y = mean[0], .err = sd[0]},
                          {.title = "k2 = r^2/2", .x = shifted(1.0), .y = mean[1], .err = sd[1]},
                          {.title = "k3 = exp(-r) - 1 + r", .x = shifted(1.1), .y = mean[2], .err = sd[2]},
                          {.title = "exact KL = 0.5", .x = {0.7, 1500.0}, .y = {exact, exact}, .dashed = true}},
                .caption = "r = log q(x) - log p(x) per sample, from posttrain's kl_penalty; 400 repeats per n. "
                           "k1 is unbiased but its spread is the largest (and single samples go negative); k2 has "
                           "a small spread but is biased (here 0.625, not 0.5); k3 is unbiased with a small spread, "
                           "which is why GRPO and verl use it.",
                .logx = true});
}

// DPO's gradient weight: with x = beta * margin, dL/dx = -sigma(-x) for L = -log sigma(x), read from
// autograd through posttrain's dpo: wrong-way pairs (x < 0) get weight ~1, learned pairs (x >> 0) ~0.
void teach_dpo_weight() {
  std::vector<double> xs;
  for (int i = -60; i <= 60; ++i) xs.push_back(0.1 * i);
  const auto n = static_cast<std::int64_t>(xs.size());
  auto x = torch::tensor(xs, torch::kDouble).requires_grad_(true);
  const auto zero = torch::zeros({n}, torch::kDouble);
  pt::preference_batch<Tensor> b{x, zero};
  b.ref_chosen_logps = zero, b.ref_rejected_logps = zero;
  const auto res = pt::dpo(b, {.beta = 1.0});
  res.loss.backward();  // loss = mean over the n pairs
  const auto w = (-x.grad() * double(n)).contiguous();
  const auto l = res.per_pair_loss.detach().contiguous();
  g_plots->add({.name = "09-dpo-weight",
                .title = "DPO: loss -log sigma(x) and its gradient weight sigma(-x), x = beta * margin",
                .xlabel = "x = beta[(log pi - log pi_ref)(y_c) - (log pi - log pi_ref)(y_r)]",
                .ylabel = "",
                .lines = {{.title = "loss -log sigma(x) (dpo per_pair_loss)",
                           .x = xs,
                           .y = std::vector<double>(l.data_ptr<double>(), l.data_ptr<double>() + n)},
                          {.title = "-dL/dx = sigma(-x) (autograd through dpo)",
                           .x = xs,
                           .y = std::vector<double>(w.data_ptr<double>(), w.data_ptr<double>() + n)}},
                .caption = "Every pair's gradient is scaled by sigma(-x): pairs the policy ranks the wrong way "
                           "(x < 0) get weight near 1, pairs already ranked right by a wide margin get almost none, "
                           "so DPO stops pushing once the margin is large."});
}

// ---------------------------------------------------------------------------------------------
// Stage 3: PPO against the RM.
std::vector<std::string> answers_of(const rollout& r) {  // the response up to and including its '\n'
  std::vector<std::string> out;
  for (std::int64_t i = 0; i < r.response.size(0); ++i)
    out.push_back(detok(r.response[i]).substr(0, static_cast<std::size_t>(r.mask[i].sum().item<double>())));
  return out;
}
struct ppo_eval {
  double rm = 0, em = 0, kl = 0;
};
// Two samples (temperature 1) per question, all 100 questions: mean RM reward and KL to ref; exact-match
// is the exact expected one, (1/100) sum_q pi(gold | q), not the sampled one: two samples of 100
// questions estimate it with a standard error near 0.035, too coarse for a before/after difference.
ppo_eval evaluate_policy(TinyLM& policy, TinyLM& ref, TinyLM& rm) {
  torch::NoGradGuard ng;
  std::vector<question> qs;
  for (const auto& q : all_questions()) qs.push_back(q), qs.push_back(q);
  auto r = sample(policy, prompts_of(qs), 8, 1.0);
  auto lp = response_logprobs(policy, r, kPrompt).logprobs, ref_lp = response_logprobs(ref, r, kPrompt).logprobs;
  // KL(π || π_ref) per sequence, estimated by k1 summed over the response tokens (InstructGPT's KL term)
  auto kl = ((lp - ref_lp) * r.mask).sum(1).mean().item<double>();
  return {rm_scores(rm, qs, answers_of(r)).mean().item<double>(), expected_reward(policy), kl};
}
struct ppo_summary {
  ppo_eval before, after;
  double beta = 0;
  std::string sample;
  std::vector<double> reward, kl, em;  // per iteration (the training batch)
};
ppo_summary run_ppo(TinyLM& sft, TinyLM& rm, const config& cfg, std::mt19937& rng, bool leash, double kl_target) {
  TinyLM policy = copy_of(sft), ref = copy_of(sft);
  {
    torch::NoGradGuard ng;
    policy->scalar_head->weight.zero_();  // the value head starts at V = 0
    policy->scalar_head->bias.zero_();
  }
  auto opt = adamw(policy, kRlLr);
  // Ziegler et al. 2019 §2.2: β adapts to keep the KL near its target; leash off is β = 0. The horizon is
  // short (the run is 40 updates of 32 rollouts, not thousands).
  pt::adaptive_kl_controller ctl{.value = leash ? kBeta0 : 0.0, .target = kl_target, .horizon = 500};
  const auto all = all_questions();
  std::uniform_int_distribution<std::size_t> pick(0, all.size() - 1);
  constexpr std::int64_t B = 64, L = 8;
  ppo_summary s;
  s.before = evaluate_policy(policy, ref, rm);
  timer t;
  for (int it = 1; it <= cfg.ppo_iters; ++it) {
    std::vector<question> qs;
    for (std::int64_t i = 0; i < B; ++i) qs.push_back(all[pick(rng)]);
    auto r = sample(policy, prompts_of(qs), L, 1.0);
    Tensor scores, old_lp, ref_lp, old_v;
    {
      torch::NoGradGuard ng;
      scores = rm_scores(rm, qs, answers_of(r));  // [B]
      old_lp = response_logprobs(policy, r, kPrompt).logprobs;
      ref_lp = response_logprobs(ref, r, kPrompt).logprobs;
      old_v = policy->scalar_head(policy->hidden(r.seq.slice(1, 0, -1)).slice(1, kPrompt - 1)).squeeze(-1);  // [B, L]
    }
    // r_t = -β·(log π - log π_ref)_t + [t = last] RM(x, y)    (InstructGPT eq. 2; k1 estimator)
    auto shaped = pt::kl_shaped_rewards(scores, old_lp, ref_lp, r.mask, {.beta = ctl.value});
    // Â_t = Σ_l (γλ)^l δ_{t+l},  δ_t = r_t + γV_{t+1} - V_t     (GAE, Schulman et al. 2016 eq. 16)
    auto adv = pt::gae(shaped.rewards, old_v, r.mask, {.gamma = 1.0, .lambda = 0.95});
    pt::ppo_objective_result<Tensor> res;
    for (int epoch = 0; epoch < 2; ++epoch) {
      auto h = policy->hidden(r.seq.slice(1, 0, -1)).slice(1, kPrompt - 1);  // [B, L, d]: one trunk, two heads
      auto lp = pt::token_logprobs(policy->lm_head(h), r.response);          // [B, L]
      auto v = policy->scalar_head(h).squeeze(-1);                           // [B, L]
      // L = -min(ρÂ, clip(ρ, 1-ε, 1+ε)Â) + c_v·½max((V-R)², (V_clip-R)²)     (PPO eq. 7; value clip as TRL)
      res = pt::ppo_objective(lp, old_lp, adv.advantages, v, old_v, adv.returns, r.mask, {.vf_coef = 0.1});
      opt.zero_grad();
      res.loss.backward();
      clip_grads(policy);
      opt.step();
      check(finite(res.loss.item<double>()), "PPO loss is finite");
    }
    const double kl = shaped.mean_kl.item<double>();
    s.reward.push_back(scores.mean().item<double>()), s.kl.push_back(kl), s.em.push_back(exact_match(qs, r.response));
    if (leash) ctl.update(kl, B);
    if (it == 1 || it % 10 == 0 || it == cfg.ppo_iters)
      std::printf("  [%s] iter %3d  RM reward %6.2f  exact-match %.2f  KL %.3f  beta %.3f  clipfrac %.3f  (%.1fs)\n",
                  leash ? "leash" : "no leash", it, scores.mean().item<double>(), exact_match(qs, r.response), kl,
                  ctl.value, res.policy.pg_clipfrac.item<double>(), t.seconds());
  }
  s.after = evaluate_policy(policy, ref, rm);
  s.beta = ctl.value;
  s.sample = show(greedy_text(policy, "Q:3+4?", 8));
  return s;
}

void stage_ppo(TinyLM& sft, TinyLM& rm, const config& cfg, std::mt19937& rng) {
  std::printf("\n== Stage 3: PPO against the reward model, with the KL leash and without\n");
  std::printf("  r_t = -beta (log pi - log pi_ref)_t + [t = last] RM(x, y);  A = GAE(r, V);\n");
  std::printf("  L = -min(rho A, clip(rho, 0.8, 1.2) A) + 0.1 L_V;  beta adapted toward the KL target\n");
  std::printf("  start (policy and reference): the SFT checkpoint after %d steps, which still has something to learn\n",
              cfg.sft_early);
  auto with = run_ppo(sft, rm, cfg, rng, true, kKlTarget);
  auto without = run_ppo(sft, rm, cfg, rng, false, kKlTarget);
  std::printf(
      "  before -> after: RM reward and KL on 2 samples (temperature 1) of each of the 100 questions, KL = mean\n");
  std::printf(
      "  of sum_t log pi/pi_ref (nats); exact-match = (1/100) sum_q pi(gold | q), exact; the RM's score of the gold \" "
      "A:07\\n\" for Q:3+4? is %.2f\n",
      [&] {
        torch::NoGradGuard ng;
        return rm_scores(rm, {question{3, 4}}, {question{3, 4}.gold()}).item<double>();
      }());
  const auto iters = steps_1_to(with.reward.size());
  g_plots->add({.name = "04-ppo-reward",
                .title = "Stage 3, PPO: reward-model score of the sampled answers, with and without the KL leash",
                .xlabel = "PPO iteration (64 rollouts, 2 epochs)",
                .ylabel = "mean RM reward (training batch)",
                .lines = {{.title = "with the leash (adaptive beta)", .x = iters, .y = with.reward},
                          {.title = "without (beta = 0)", .x = iters, .y = without.reward}},
                .caption = "Both runs raise the reward model's score; the unleashed one raises it by moving "
                           "further from the reference (next picture)."});
  g_plots->add(
      {.name = "05-ppo-kl",
       .title = "Stage 3, PPO: KL to the reference (nats per answer) and exact-match",
       .xlabel = "PPO iteration",
       .ylabel = "KL(pi || pi_ref), k1 summed over the answer",
       .y2label = "exact-match of the batch",
       .lines = {{.title = "KL with the leash", .x = iters, .y = with.kl},
                 {.title = "KL without", .x = iters, .y = without.kl},
                 {.title = "KL target", .x = {1.0, double(iters.size())}, .y = {kKlTarget, kKlTarget}, .dashed = true},
                 {.title = "exact-match with the leash", .x = iters, .y = with.em, .y2 = true},
                 {.title = "exact-match without", .x = iters, .y = without.em, .y2 = true}},
       .caption = "The adaptive controller keeps the leashed policy's KL near its target; without the "
                  "leash the KL grows while exact-match (the thing the reward model was meant to "
                  "measure) falls: reward hacking of an imperfect reward model."});
  std::printf("                        RM reward          exact-match      KL               greedy Q:3+4?\n");
  std::printf("    leash (target %.1f)  %6.2f -> %6.2f   %.2f -> %.2f     %.3f -> %6.3f   \"%s\"  (beta ends %.3f)\n",
              kKlTarget, with.before.rm, with.after.rm, with.before.em, with.after.em, with.before.kl, with.after.kl,
              with.sample.c_str(), with.beta);
  std::printf("    no leash (beta 0)   %6.2f -> %6.2f   %.2f -> %.2f     %.3f -> %6.3f   \"%s\"\n", without.before.rm,
              without.after.rm, without.before.em, without.after.em, without.before.kl, without.after.kl,
              without.sample.c_str());
  if (!cfg.quick) {
    claim(with.after.rm > with.before.rm && with.after.kl < kKlTarget,
          "with the leash, RM reward rises and the KL stays below its target");
    // This reward model scores some wrong answers above the gold one (see the RM score of the gold answer
    // above), so any optimisation against it costs exact-match; the leash limits that cost, it does not
    // remove it (a 0.2 target still lost exact-match in our runs).
    claim(with.before.em - with.after.em < 0.5 * (without.before.em - without.after.em),
          "with the leash, exact-match loses less than half of what it loses without (exact expected values)");
    claim(without.after.rm > with.after.rm && without.after.kl > 2 * with.after.kl &&
              without.after.em < with.after.em - 0.1,
          "without the leash: more RM reward, far larger KL, lower exact-match (reward hacking)");
  }
  teach_ppo_surrogate();
  teach_kl_estimators(true);
}

// ---------------------------------------------------------------------------------------------
// Stage 4: DPO and IPO on the same pairs.
struct pair_batch {
  Tensor c_ids, c_labels, r_ids, r_labels;
};
pair_batch pair_batch_of(const std::vector<pair_>& ps) {
  std::vector<example> c, r;
  for (const auto& p : ps) c.push_back(sft_example(p.q, p.chosen)), r.push_back(sft_example(p.q, p.rejected));
  auto [ci, cl] = batch_of(c);
  auto [ri, rl] = batch_of(r);
  return {ci, cl, ri, rl};
}
pt::preference_batch<Tensor> pref_batch(TinyLM& policy, const pair_batch& pb, const Tensor& ref_c,
                                        const Tensor& ref_r) {
  // log π(y|x) = Σ_t log p(y_t | x, y_<t) over the answer tokens (TRL's concatenated_forward, sums)
  auto c = pt::sequence_logps(policy->logits(pb.c_ids), pb.c_labels);
  auto r = pt::sequence_logps(policy->logits(pb.r_ids), pb.r_labels);
  pt::preference_batch<Tensor> b{c.logps, r.logps};
  b.ref_chosen_logps = ref_c;
  b.ref_rejected_logps = ref_r;
  b.chosen_lengths = c.lengths;
  b.rejected_lengths = r.lengths;
  return b;
}
std::pair<Tensor, Tensor> ref_logps(TinyLM& ref, const pair_batch& pb) {
  torch::NoGradGuard ng;
  return {pt::sequence_logps(ref->logits(pb.c_ids), pb.c_labels).logps,
          pt::sequence_logps(ref->logits(pb.r_ids), pb.r_labels).logps};
}

std::vector<double> run_dpo(TinyLM& sft, const config& cfg, std::mt19937& rng, const std::vector<pair_>& train,
                            const std::vector<pair_>& held, pt::dpo_loss kind, const char* name, double beta) {
  std::vector<double> accs;  // held-out implicit-reward accuracy every 5 steps
  TinyLM policy = copy_of(sft), ref = copy_of(sft);
  auto opt = adamw(policy, 5e-4);
  const pt::dpo_options o{.beta = beta, .loss = kind};
  auto hb = pair_batch_of(held);
  auto [hrc, hrr] = ref_logps(ref, hb);
  auto evaluate = [&] {
    torch::NoGradGuard ng;
    return pt::dpo(pref_batch(policy, hb, hrc, hrr), o);
  };
  auto e0 = evaluate();
  std::printf("  [%s] before: held-out reward accuracy %.3f  margin %.3f\n", name, e0.reward_accuracy.item<double>(),
              e0.reward_margin.item<double>());
  std::uniform_int_distribution<std::size_t> pick(0, train.size() - 1);
  timer t;
  for (int step = 1; step <= cfg.dpo_steps; ++step) {
    std::vector<pair_> mb;
    for (int i = 0; i < 32; ++i) mb.push_back(train[pick(rng)]);
    auto pb = pair_batch_of(mb);
    auto [rc, rr] = ref_logps(ref, pb);
    auto res = pt::dpo(pref_batch(policy, pb, rc, rr), o);
    opt.zero_grad();
    res.loss.backward();
    opt.step();
    check(finite(res.loss.item<double>()), std::string(name) + " loss is finite");
    if (step % 5 == 0 || step == cfg.dpo_steps) accs.push_back(evaluate().reward_accuracy.item<double>());
    if (step == 1 || step % 20 == 0 || step == cfg.dpo_steps)
      std::printf("  [%s] step %4d  loss %.4f  train accuracy %.3f  margin %.3f  (%.1fs)\n", name, step,
                  res.loss.item<double>(), res.reward_accuracy.item<double>(), res.reward_margin.item<double>(),
                  t.seconds());
  }
  auto e1 = evaluate();
  const double em = greedy_exact_match(policy, all_questions());
  std::printf("  [%s] after:  held-out reward accuracy %.3f  margin %.3f   greedy exact-match %.2f\n", name,
              e1.reward_accuracy.item<double>(), e1.reward_margin.item<double>(), em);
  if (!cfg.quick && kind == pt::dpo_loss::sigmoid)
    claim(e1.reward_accuracy.item<double>() >= 0.9, "DPO held-out implicit-reward accuracy >= 0.9");
  accs.insert(accs.begin(), e0.reward_accuracy.item<double>());
  return accs;
}

void stage_dpo(TinyLM& sft, const config& cfg, std::mt19937& rng, const std::vector<pair_>& train,
               const std::vector<pair_>& held) {
  std::printf("\n== Stage 4: DPO and IPO on the same pairs — no reward model, no rollouts\n");
  std::printf("  x = beta[(log pi - log pi_ref)(y_c) - (log pi - log pi_ref)(y_r)]\n");
  std::printf(
      "  DPO: L = -log sigma(x)  (Rafailov et al. 2023 eq. 7);  IPO: L = (x/beta - 1/(2 tau))^2 on per-token\n");
  std::printf("  means (Azar et al. 2023 eq. 17, TRL's form).  implicit reward = beta (log pi - log pi_ref)(y)\n");
  const auto dpo_acc = run_dpo(sft, cfg, rng, train, held, pt::dpo_loss::sigmoid, "DPO beta 0.1", 0.1);
  const auto ipo_acc = run_dpo(sft, cfg, rng, train, held, pt::dpo_loss::ipo, "IPO beta 0.1", 0.1);
  std::vector<double> x;
  for (std::size_t i = 0; i < dpo_acc.size(); ++i) x.push_back(std::min(5.0 * double(i), double(cfg.dpo_steps)));
  g_plots->add({.name = "08-dpo",
                .title = "Stage 4, DPO and IPO: held-out implicit-reward accuracy",
                .xlabel = "step (32 pairs)",
                .ylabel = "fraction of held-out pairs with beta(l_c - l_r) > 0",
                .lines = {{.title = "DPO beta 0.1", .x = x, .y = dpo_acc, .points = true},
                          {.title = "IPO beta 0.1", .x = x, .y = ipo_acc, .points = true}},
                .caption = "The same preference pairs as the reward model, on 30 held-out questions: the policy's "
                           "own log-ratio to the reference ranks the pairs, with no reward model and no rollouts."});
  teach_dpo_weight();
}

// ---------------------------------------------------------------------------------------------
// Stage 5: GRPO with an exact-match reward, from the early SFT checkpoint (room to improve).
void stage_grpo(TinyLM& early, const config& cfg) {
  std::printf("\n== Stage 5: RL from a verifiable reward — GRPO (DAPO loss), reward = exact match\n");
  std::printf(
      "  A_i = (r_i - mean_g r) / (std_g r + eps) per group of G samples   (grpo_advantages; DeepSeekMath eq. 3)\n");
  std::printf("  L = -sum_{i,t} min(rho A_i, clip(rho, 0.8, 1.28) A_i) / sum_i |y_i|   (DAPO eq. 8, clip-higher)\n");
  TinyLM policy = copy_of(early);  // DAPO drops the KL term (beta = 0): no reference needed
  auto opt = adamw(policy, kGrpoLr);
  const auto all = all_questions();
  constexpr std::int64_t G = 8, L = 6;
  const auto Q = static_cast<std::int64_t>(all.size());
  // The fixed evaluation: the exact expected reward (no sampling noise), a sampled one, greedy exact-match.
  const double x0 = expected_reward(policy), s0 = sampled_exact_match(policy, 4), em0 = greedy_exact_match(policy, all);
  std::printf(
      "  start: the SFT checkpoint after %d steps (room to improve): expected reward %.3f, greedy exact-match %.2f\n",
      cfg.sft_early, x0, em0);
  std::printf("  each iteration: %lld answers (temperature 1) to each of the %lld questions, 2 AdamW steps, lr %g\n",
              static_cast<long long>(G), static_cast<long long>(Q), kGrpoLr);
  std::printf("  (warmed up over %d iterations);  expected reward = (1/100) sum_q pi(gold answer | q), exact\n",
              kGrpoWarmup);
  std::vector<double> rewards_seen, ex_x{0.0}, ex_y{x0};
  timer t;
  for (int it = 1; it <= cfg.grpo_iters; ++it) {
    // a fresh AdamW's first steps move every weight by ~lr whatever its gradient: warm the rate up
    static_cast<torch::optim::AdamWOptions&>(opt.param_groups()[0].options())
        .lr(kGrpoLr * std::min(1.0, double(it) / kGrpoWarmup));
    std::vector<question> qs;
    std::vector<std::int64_t> gi;
    for (std::int64_t q = 0; q < Q; ++q)
      for (std::int64_t g = 0; g < G; ++g) qs.push_back(all[static_cast<std::size_t>(q)]), gi.push_back(q);
    auto r = sample(policy, prompts_of(qs), L, 1.0);
    auto reward_v = exact_match_each(qs, r.response);
    auto scores = torch::tensor(reward_v, torch::kFloat);  // [Q·G]
    auto adv = pt::grpo_advantages(scores, torch::tensor(gi, torch::kLong));
    Tensor old_lp;
    {
      torch::NoGradGuard ng;
      old_lp = response_logprobs(policy, r, kPrompt).logprobs;
    }
    pt::grpo_result<Tensor> res;
    Tensor entropy;
    for (int mu = 0; mu < 2; ++mu) {  // two updates per batch: the second is off-policy, so clipping can act
      auto le = response_logprobs(policy, r, kPrompt);
      entropy = pt::masked_mean(le.entropy.detach(), r.mask);
      pt::grpo_batch<Tensor> b{le.logprobs, adv.advantages, r.mask, old_lp};
      res = pt::grpo_loss(b, {.loss_type = pt::grpo_loss_type::dapo, .clip = {.clip_low = 0.2, .clip_high = 0.28}});
      opt.zero_grad();
      res.loss.backward();
      clip_grads(policy);
      opt.step();
      check(finite(res.loss.item<double>()), "GRPO loss is finite");
    }
    int pass = 0;
    for (std::int64_t q = 0; q < Q; ++q) {
      bool any = false;
      for (std::int64_t g = 0; g < G; ++g) any = any || reward_v[static_cast<std::size_t>(q * G + g)] > 0;
      pass += any;
    }
    const double mean_r = scores.mean().item<double>();
    rewards_seen.push_back(mean_r);
    if (it % 5 == 0 || it == cfg.grpo_iters) ex_x.push_back(it), ex_y.push_back(expected_reward(policy));
    if (it == 1 || it % 5 == 0 || it == cfg.grpo_iters)
      std::printf(
          "  iter %3d  batch reward %.3f  pass@%lld %.2f  entropy %.3f  clip low/high %.3f/%.3f  zero-std groups "
          "%.2f  expected reward %.3f  (%.1fs)\n",
          it, mean_r, static_cast<long long>(G), double(pass) / double(Q), entropy.item<double>(),
          res.clip_ratio_low.item<double>(), res.clip_ratio_high.item<double>(),
          adv.frac_reward_zero_std.item<double>(), ex_x.back() == it ? ex_y.back() : expected_reward(policy),
          t.seconds());
  }
  const double x1 = expected_reward(policy), s1 = sampled_exact_match(policy, 4), em1 = greedy_exact_match(policy, all);
  std::printf(
      "  expected reward %.3f -> %.3f;  sampled (4 x 100, temperature 1) %.3f -> %.3f;  greedy exact-match "
      "%.2f -> %.2f\n",
      x0, x1, s0, s1, em0, em1);
  std::printf("  sample: \"Q:3+4?\" -> \"%s\"\n", show(greedy_text(policy, "Q:3+4?", 6)).c_str());
  g_plots->add({.name = "10-grpo",
                .title = "Stage 5, GRPO: exact-match reward",
                .xlabel = "GRPO iteration (8 samples x 100 questions, 2 updates)",
                .ylabel = "mean reward",
                .lines = {{.title = "sampled batch", .x = steps_1_to(rewards_seen.size()), .y = rewards_seen},
                          {.title = "expected reward, 100 questions (exact)", .x = ex_x, .y = ex_y, .points = true}},
                .caption = "The reward is 1 when the sampled answer is exactly right. The points are the "
                           "policy's exact expected reward at temperature 1, the mean over the 100 questions of "
                           "pi(gold answer | question), computed from the model's probabilities, not sampled."});
  if (!cfg.quick) {
    claim(x1 >= x0 + 0.05, "GRPO raises the mean reward (exact expected reward, by 0.05 or more)");
    claim(em1 >= em0, "GRPO does not lower greedy exact-match");
  }
}

// ---------------------------------------------------------------------------------------------
// Stage 6: a two-turn episode with a calculator. The model writes a call, the environment appends
// the result, the model answers:  "Q:37+45? C:37+45=082 A:082\n"  with "082" after '=' from the tool.
struct tool_q {
  int a = 0, b = 0;
  std::string prompt() const { return "Q:" + two(a) + "+" + two(b) + "?"; }
  std::string call() const { return " C:" + two(a) + "+" + two(b) + "="; }
  static std::string two(int v) { return std::string(1, char('0' + v / 10)) + char('0' + v % 10); }
  static std::string three(int v) { return std::to_string(v / 100) + two(v % 100); }
  std::string result() const { return three(a + b); }
  std::string answer() const { return " A:" + result() + "\n"; }
};
example tool_example(const tool_q& q) {
  const auto p = q.prompt(), c = q.call(), r = q.result(), a = q.answer();
  return {p + c + r + a, std::string(p.size(), 'p') + std::string(c.size(), 'a') + std::string(r.size(), 't') +
                             std::string(a.size(), 'a')};
}
// The environment: run the episode greedily; the tool evaluates the call the model wrote.
double tool_episode_exact_match(TinyLM& m, const std::vector<tool_q>& qs, std::string* sample_out) {
  std::vector<example> xs;
  for (const auto& q : qs) xs.push_back({q.prompt() + " ", std::string(q.prompt().size() + 1, 'p')});
  auto prompts = batch_of(xs).first;                               // [B, 8]
  auto turn1 = sample(m, prompts, 9, 0.0).seq.slice(1, 0, 8 + 9);  // the call: " C:37+45="
  std::vector<std::vector<std::int64_t>> results;
  for (std::int64_t i = 0; i < turn1.size(0); ++i) {
    auto call = detok(turn1[i].slice(0, 8, 17));
    int a = 0, b = 0;
    std::string res = "___";  // a malformed call gets "___"
    if (std::sscanf(call.c_str(), " C:%2d+%2d=", &a, &b) == 2 && call.size() == 9 && call[8] == '=')
      res = tool_q::three(a + b);
    std::vector<std::int64_t> ids;
    for (char c : res) ids.push_back(tok(c));
    results.push_back(ids);
  }
  std::vector<Tensor> rows;
  for (auto& r : results) rows.push_back(torch::tensor(r, torch::kLong));
  auto with_tool = torch::cat({turn1, torch::stack(rows)}, 1);  // [B, 20]
  auto turn2 = sample(m, with_tool, 7, 0.0);
  double hit = 0;
  for (std::size_t i = 0; i < qs.size(); ++i) {
    auto text = detok(turn2.seq[static_cast<std::int64_t>(i)]);
    hit += text.substr(8) == qs[i].call() + qs[i].result() + qs[i].answer();
    if (i == 0 && sample_out) *sample_out = show(text);
  }
  return hit / double(qs.size());
}
// Without the tool: the model must answer the two-digit sum itself.
double direct_exact_match(TinyLM& m, const std::vector<tool_q>& qs) {
  std::vector<example> xs;
  for (const auto& q : qs) xs.push_back({q.prompt() + " A: ", std::string(q.prompt().size() + 4, 'p')});
  auto prompts = batch_of(xs).first;  // "Q:37+45? A:"
  auto out = sample(m, prompts, 4, 0.0).response;
  double hit = 0;
  for (std::size_t i = 0; i < qs.size(); ++i) hit += detok(out[static_cast<std::int64_t>(i)]) == qs[i].result() + "\n";
  return hit / double(qs.size());
}

void stage_agent(TinyLM& sft, const config& cfg, std::mt19937& rng) {
  std::printf("\n== Stage 6: agentic — a two-turn episode with a calculator whose tokens are masked out\n");
  std::printf(
      "  L = -(1/N) sum_{t : model wrote y_t} log p(y_t | context)   (tool tokens: label -100, no loss, no grad)\n");
  TinyLM policy = copy_of(sft);
  std::uniform_int_distribution<int> d(0, 99);
  auto draw = [&](int n) {
    std::vector<tool_q> qs;
    for (int i = 0; i < n; ++i) qs.push_back({d(rng), d(rng)});
    return qs;
  };
  const auto eval_qs = draw(100);
  const auto ex = tool_example(eval_qs[0]);
  std::printf("  episode: \"%s\"\n", show(ex.text).c_str());
  std::string mask_line;
  for (std::size_t t = 0; t < ex.text.size(); ++t) mask_line += ex.roles[t] == 'a' ? '1' : '0';
  std::printf("  in loss: \"%s\"   (1 = written by the model; the tool's \"%s\" is 0)\n", mask_line.c_str(),
              eval_qs[0].result().c_str());

  // The check: the gradient of the loss with respect to the logits that predict tool tokens is exactly 0.
  {
    auto [ids, labels] = batch_of({ex});
    auto logits = policy->logits(ids).detach().requires_grad_(true);  // [1, T, V]
    auto loss = pt::sft_loss(logits, labels).loss;
    loss.backward();
    auto tool_rows = labels.eq(pt::default_ignore_index);  // positions predicting a prompt or tool token
    auto g_masked = logits.grad().index({tool_rows}).abs().max().item<double>();
    auto g_kept = logits.grad().index({tool_rows.logical_not()}).abs().max().item<double>();
    std::printf("  max |dL/dlogits| at positions that predict tool/prompt tokens: %g;  at the model's tokens: %.3g\n",
                g_masked, g_kept);
    check(g_masked == 0.0 && g_kept > 0.0, "masked tool tokens get exactly zero gradient");
    if (!cfg.quick) claim(g_masked == 0.0, "the tool's tokens get exactly zero gradient (checked)");
  }
  std::string s0, s1;
  const double tool0 = tool_episode_exact_match(policy, eval_qs, &s0), direct0 = direct_exact_match(policy, eval_qs);
  std::printf("  before: with the tool exact-match %.2f, answering directly %.2f;  \"%s\"\n", tool0, direct0,
              s0.c_str());
  auto opt = adamw(policy, 2e-3);
  std::vector<double> losses;
  timer t;
  for (int step = 1; step <= cfg.agent_steps; ++step) {
    std::vector<example> xs;
    for (const auto& q : draw(32)) xs.push_back(tool_example(q));
    auto [ids, labels] = batch_of(xs);
    auto sft = pt::sft_loss(policy->logits(ids), labels);
    opt.zero_grad();
    sft.loss.backward();
    opt.step();
    check(finite(sft.loss.item<double>()), "agentic loss is finite");
    losses.push_back(sft.loss.item<double>());
    if (step == 1 || step % 50 == 0 || step == cfg.agent_steps)
      std::printf("  step %4d  loss %.3f  token_acc %.3f  (%.1fs)\n", step, sft.loss.item<double>(),
                  sft.token_accuracy.item<double>(), t.seconds());
  }
  const double tool1 = tool_episode_exact_match(policy, eval_qs, &s1), direct1 = direct_exact_match(policy, eval_qs);
  std::printf("  after:  with the tool exact-match %.2f, answering directly %.2f;  \"%s\"\n", tool1, direct1,
              s1.c_str());
  g_plots->add(
      {.name = "11-agent",
       .title = "Stage 6, agentic: loss on the model's tokens of two-turn tool episodes",
       .xlabel = "step (32 episodes)",
       .ylabel = "loss (nats per model-written token)",
       .lines = {{.title = "SFT loss, tool tokens masked (-100)", .x = steps_1_to(losses.size()), .y = losses}},
       .caption = "Episodes \"Q:37+45? C:37+45=082 A:082\\n\": the model writes the call and the answer, "
                  "the calculator writes \"082\". Those tool tokens are in the input but get label -100, "
                  "so they add nothing to the loss and get exactly zero gradient (checked).",
       .logy = true});
  if (!cfg.quick) claim(tool1 >= 0.9, "with the tool, two-digit sums are answered (exact-match >= 0.9)");
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // progress lines appear as they are printed
  config cfg;
  std::string out_dir = "tour-out";
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) {
      cfg = {.quick = true,
             .base_steps = 10,
             .sft_steps = 10,
             .sft_early = 5,
             .rm_steps = 3,
             .ppo_iters = 2,
             .dpo_steps = 3,
             .grpo_iters = 2,
             .agent_steps = 3};
    } else if (std::strcmp(argv[i], "--out") == 0 && i + 1 < argc) {
      out_dir = argv[++i];
      if (out_dir.find('\'') != std::string::npos) {  // tour_plots.hpp quotes it in a shell command
        std::printf("tour: --out %s contains a single quote; choose another folder name\n", out_dir.c_str());
        return 2;
      }
    } else {
      std::printf("usage: %s [--quick] [--out DIR]   (pictures and index.md into DIR, default tour-out)\n", argv[0]);
      return 2;
    }
  }
  torch::manual_seed(20261201);
  torch::set_num_threads(1);  // one thread: the same numbers on every machine
  std::mt19937 rng(20261201);
  timer total;
  std::printf("posttrain tour%s: a %lld-layer, d=%lld causal transformer over %lld characters, trained on CPU\n",
              cfg.quick ? " (--quick: a few steps per stage, checking invariants only)" : "",
              static_cast<long long>(TinyLMImpl::layers), static_cast<long long>(TinyLMImpl::d),
              static_cast<long long>(kVocab));
  std::printf(
      "task: \"Q:3+4?\" -> \" A:07\\n\" (single-digit sums, 100 questions); stage 6: two-digit sums with a tool\n");

  tour_plots::plotter plots(out_dir);
  g_plots = &plots;
  if (plots.rendering())
    std::printf("pictures: gnuplot found; writing PNGs to %s\n", plots.folder().c_str());
  else
    std::printf("pictures: gnuplot not found, so plots are skipped (data and gnuplot scripts still go to %s)\n",
                plots.folder().c_str());

  TinyLM base;
  stage_base(base, cfg, rng);
  TinyLM sft = copy_of(base), early;
  stage_sft(sft, early, cfg);
  std::vector<pair_> train_pairs, held_pairs;
  TinyLM rm = stage_rm(sft, cfg, rng, train_pairs, held_pairs);
  stage_ppo(early, rm, cfg, rng);
  stage_dpo(sft, cfg, rng, train_pairs, held_pairs);
  stage_grpo(early, cfg);
  stage_agent(sft, cfg, rng);

  const auto pngs = plots.finish("The posttrain tour, stage by stage");
  std::printf("\n== Pictures: %zu written to %s, in order in index.md%s\n", pngs.size(), plots.folder().c_str(),
              plots.rendering() ? "" : " (plots skipped: gnuplot not found)");
  for (const auto& f : pngs) std::printf("  %s\n", f.c_str());
  std::printf("\n== Summary (%.1fs)\n", total.seconds());
  for (const auto& [what, ok] : g_claims) std::printf("  %-8s %s\n", ok ? "holds" : "NOT MET", what.c_str());
  if (g_failed) {
    std::printf("FAILED: an invariant does not hold (see above)\n");
    return 1;
  }
  std::printf("OK: every stage ran; losses finite%s\n",
              cfg.quick ? ", SFT loss falls, masked tool tokens get zero gradient" : "");
  return 0;
}
