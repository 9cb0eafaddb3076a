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

namespace {
namespace pt = posttrain;
using torch::Tensor;

// ---------------------------------------------------------------------------------------------
// Run configuration: the full tour, or the quick smoke test (same code, fewer steps).
struct config {
  bool quick = false;
  int base_steps = 150, sft_steps = 400, sft_early = 150, rm_steps = 150, ppo_iters = 30, dpo_steps = 60,
      grpo_iters = 40, agent_steps = 250;
};

bool g_failed = false;  // an invariant failed (exit status 1)
std::vector<std::pair<std::string, bool>> g_claims;

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
constexpr double kRlLr = 2e-4;       // PPO and GRPO learning rate (SFT: 5e-3; RL moves in smaller steps)
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
    if (step == 1) first = l;
    last = l;
    if (step == 1 || step % 50 == 0 || step == cfg.base_steps)
      std::printf("  step %4d  loss %.3f  token_acc %.3f  (%.1fs)\n", step, l, sft.token_accuracy.item<double>(),
                  t.seconds());
  }
  check(last < first, "base loss falls");
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
  timer t;
  for (int step = 1; step <= cfg.sft_steps; ++step) {
    auto sft = pt::sft_loss(policy->logits(ids), labels);
    opt.zero_grad();
    sft.loss.backward();
    opt.step();
    const double l = sft.loss.item<double>();
    check(finite(l), "SFT loss is finite");
    if (step == 1) first = l;
    last = l;
    if (step == cfg.sft_early) early = copy_of(policy);
    if (step == 1 || step % 100 == 0 || step == cfg.sft_steps || step == cfg.sft_early)
      std::printf("  step %4d  loss %.3f  token_acc %.3f  entropy %.3f  exact-match %.2f  (%.1fs)\n", step, l,
                  sft.token_accuracy.item<double>(), sft.entropy.item<double>(), greedy_exact_match(policy, qs),
                  t.seconds());
  }
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
    if (step == 1 || step % 25 == 0 || step == cfg.rm_steps)
      std::printf("  step %4d  loss %.3f  train accuracy %.3f  margin %.2f  (%.1fs)\n", step, res.loss.item<double>(),
                  res.accuracy.item<double>(), res.margin.item<double>(), t.seconds());
  }
  auto h1 = heldout();
  std::printf("  after:  held-out accuracy %.3f  loss %.3f  margin %.2f\n", h1.accuracy.item<double>(),
              h1.loss.item<double>(), h1.margin.item<double>());
  if (!cfg.quick) claim(h1.accuracy.item<double>() >= 0.9, "RM held-out accuracy >= 0.9");
  return rm;
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
// Two samples (temperature 1) per question, all 100 questions: mean RM reward, exact-match, KL to ref.
ppo_eval evaluate_policy(TinyLM& policy, TinyLM& ref, TinyLM& rm) {
  torch::NoGradGuard ng;
  std::vector<question> qs;
  for (const auto& q : all_questions()) qs.push_back(q), qs.push_back(q);
  auto r = sample(policy, prompts_of(qs), 8, 1.0);
  auto lp = response_logprobs(policy, r, kPrompt).logprobs, ref_lp = response_logprobs(ref, r, kPrompt).logprobs;
  // KL(π || π_ref) per sequence, estimated by k1 summed over the response tokens (InstructGPT's KL term)
  auto kl = ((lp - ref_lp) * r.mask).sum(1).mean().item<double>();
  return {rm_scores(rm, qs, answers_of(r)).mean().item<double>(), exact_match(qs, r.response), kl};
}
struct ppo_summary {
  ppo_eval before, after;
  double beta = 0;
  std::string sample;
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
  std::printf("  before -> after, on 2 samples (temperature 1) of each of the 100 questions; KL = mean over samples\n");
  std::printf("  of sum_t log pi/pi_ref (nats); the RM's score of the gold \" A:07\\n\" for Q:3+4? is %.2f\n", [&] {
    torch::NoGradGuard ng;
    return rm_scores(rm, {question{3, 4}}, {question{3, 4}.gold()}).item<double>();
  }());
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
    claim(with.after.em >= with.before.em - 0.05, "with the leash, exact-match holds (within 0.05) or rises");
    claim(without.after.rm > with.after.rm && without.after.kl > 2 * with.after.kl &&
              without.after.em < with.after.em - 0.1,
          "without the leash: more RM reward, far larger KL, lower exact-match (reward hacking)");
  }
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

void run_dpo(TinyLM& sft, const config& cfg, std::mt19937& rng, const std::vector<pair_>& train,
             const std::vector<pair_>& held, pt::dpo_loss kind, const char* name, double beta) {
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
}

void stage_dpo(TinyLM& sft, const config& cfg, std::mt19937& rng, const std::vector<pair_>& train,
               const std::vector<pair_>& held) {
  std::printf("\n== Stage 4: DPO and IPO on the same pairs — no reward model, no rollouts\n");
  std::printf("  x = beta[(log pi - log pi_ref)(y_c) - (log pi - log pi_ref)(y_r)]\n");
  std::printf(
      "  DPO: L = -log sigma(x)  (Rafailov et al. 2023 eq. 7);  IPO: L = (x/beta - 1/(2 tau))^2 on per-token\n");
  std::printf("  means (Azar et al. 2023 eq. 17, TRL's form).  implicit reward = beta (log pi - log pi_ref)(y)\n");
  run_dpo(sft, cfg, rng, train, held, pt::dpo_loss::sigmoid, "DPO beta 0.1", 0.1);
  run_dpo(sft, cfg, rng, train, held, pt::dpo_loss::ipo, "IPO beta 0.1", 0.1);
}

// ---------------------------------------------------------------------------------------------
// Stage 5: GRPO with an exact-match reward, from the early SFT checkpoint (room to improve).
void stage_grpo(TinyLM& early, const config& cfg, std::mt19937& rng) {
  std::printf("\n== Stage 5: RL from a verifiable reward — GRPO (DAPO loss), reward = exact match\n");
  std::printf(
      "  A_i = (r_i - mean_g r) / (std_g r + eps) per group of G samples   (grpo_advantages; DeepSeekMath eq. 3)\n");
  std::printf("  L = -sum_{i,t} min(rho A_i, clip(rho, 0.8, 1.28) A_i) / sum_i |y_i|   (DAPO eq. 8, clip-higher)\n");
  TinyLM policy = copy_of(early);  // DAPO drops the KL term (beta = 0): no reference needed
  auto opt = adamw(policy, kRlLr);
  const auto all = all_questions();
  std::uniform_int_distribution<std::size_t> pick(0, all.size() - 1);
  constexpr std::int64_t Q = 16, G = 8, L = 6;
  const double em0 = greedy_exact_match(policy, all), s0 = sampled_exact_match(policy, 4);
  std::printf("  start: the SFT checkpoint after %d steps: greedy exact-match %.2f, sampled %.3f\n", cfg.sft_early, em0,
              s0);
  std::vector<double> rewards_seen;
  timer t;
  for (int it = 1; it <= cfg.grpo_iters; ++it) {
    std::vector<question> qs;
    std::vector<std::int64_t> gi;
    for (std::int64_t q = 0; q < Q; ++q) {
      const auto& x = all[pick(rng)];
      for (std::int64_t g = 0; g < G; ++g) qs.push_back(x), gi.push_back(q);
    }
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
    if (it == 1 || it % 10 == 0 || it == cfg.grpo_iters)
      std::printf(
          "  iter %3d  mean reward %.3f  pass@%lld %.2f  entropy %.3f  clip low/high %.3f/%.3f  zero-std groups "
          "%.2f  (%.1fs)\n",
          it, mean_r, static_cast<long long>(G), double(pass) / double(Q), entropy.item<double>(),
          res.clip_ratio_low.item<double>(), res.clip_ratio_high.item<double>(),
          adv.frac_reward_zero_std.item<double>(), t.seconds());
  }
  const double em1 = greedy_exact_match(policy, all), s1 = sampled_exact_match(policy, 4);
  // Compare the mean reward of the first and last fifth of iterations (one batch is noisy).
  const std::size_t k = std::max<std::size_t>(1, rewards_seen.size() / 5);
  double head = 0, tail = 0;
  for (std::size_t i = 0; i < k; ++i) head += rewards_seen[i], tail += rewards_seen[rewards_seen.size() - 1 - i];
  head /= double(k), tail /= double(k);
  std::printf("  mean reward, first %zu iters %.3f -> last %zu iters %.3f;  greedy exact-match %.2f -> %.2f\n", k, head,
              k, tail, em0, em1);
  std::printf("  reward on 4 samples of each of the 100 questions (temperature 1): %.3f -> %.3f\n", s0, s1);
  if (!cfg.quick) {
    claim(s1 > s0 + 0.02, "GRPO raises the mean reward (4 samples x 100 questions)");
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
    if (step == 1 || step % 50 == 0 || step == cfg.agent_steps)
      std::printf("  step %4d  loss %.3f  token_acc %.3f  (%.1fs)\n", step, sft.loss.item<double>(),
                  sft.token_accuracy.item<double>(), t.seconds());
  }
  const double tool1 = tool_episode_exact_match(policy, eval_qs, &s1), direct1 = direct_exact_match(policy, eval_qs);
  std::printf("  after:  with the tool exact-match %.2f, answering directly %.2f;  \"%s\"\n", tool1, direct1,
              s1.c_str());
  if (!cfg.quick) claim(tool1 >= 0.9, "with the tool, two-digit sums are answered (exact-match >= 0.9)");
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // progress lines appear as they are printed
  config cfg;
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
    } else {
      std::printf("usage: %s [--quick]\n", argv[0]);
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

  TinyLM base;
  stage_base(base, cfg, rng);
  TinyLM sft = copy_of(base), early;
  stage_sft(sft, early, cfg);
  std::vector<pair_> train_pairs, held_pairs;
  TinyLM rm = stage_rm(sft, cfg, rng, train_pairs, held_pairs);
  stage_ppo(early, rm, cfg, rng);
  stage_dpo(sft, cfg, rng, train_pairs, held_pairs);
  stage_grpo(early, cfg, rng);
  stage_agent(sft, cfg, rng);

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
