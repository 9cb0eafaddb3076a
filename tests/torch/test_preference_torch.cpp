// Preference losses on LibTorch: values, metrics and analytic gradients vs the Eigen double
// reference (float32/64, half inputs), and LibTorch autograd through each forward vs the analytic
// backward. Inputs are random host data in double (support/data.hpp).
#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <vector>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/backends/torch.hpp"
#include "posttrain/posttrain.hpp"
#include "support/data.hpp"
#include "support/torch_data.hpp"

namespace test_preference_torch {  // one namespace per test file: the unity build compiles several in one TU

using namespace posttrain;
using namespace posttrain::test;

namespace {
constexpr std::int64_t pairs = 5;

/// A leaf's gradient, zeros when no path reached it (e.g. rejected_logps under the sft term alone).
std::vector<double> grad_of(const at::Tensor& leaf) {
  return ops::to_host(leaf.grad().defined() ? leaf.grad() : torch::zeros_like(leaf));
}

/// Sequence log-probs in [-40, -0.5] and lengths in [0, 20], from a seed.
struct preference_host {
  host_tensor chosen, rejected, ref_chosen, ref_rejected, len_chosen, len_rejected, w_chosen, w_rejected;
  explicit preference_host(std::uint64_t seed) {
    auto logps = [&](std::uint64_t s) {
      auto h = random_normal({pairs}, seed * 31 + s, 8.0, -15.0);
      for (auto& v : h.values) v = std::min(-0.5, std::max(-40.0, v));
      return h;
    };
    chosen = logps(1), rejected = logps(2), ref_chosen = logps(3), ref_rejected = logps(4);
    len_chosen = random_mask({pairs}, seed + 5, 0.9), len_rejected = random_mask({pairs}, seed + 6, 0.9);
    for (std::size_t i = 0; i < len_chosen.values.size(); ++i) {
      len_chosen.values[i] *= 3.0 + static_cast<double>(i) * 4;
      len_rejected.values[i] *= 20.0 - static_cast<double>(i) * 3;
    }
    w_chosen = random_mask({pairs}, seed + 7, 1.0), w_rejected = random_mask({pairs}, seed + 8, 1.0);
    w_chosen.values[0] = 0.25, w_rejected.values[1] = 0.5;
  }
};

template <class M>
auto make_batch(const M& m, const preference_host& h, bool wpo) {
  using T = decltype(m.values(h.chosen));
  preference_batch<T> b{m.values(h.chosen), m.values(h.rejected)};
  b.ref_chosen_logps = m.values(h.ref_chosen);
  b.ref_rejected_logps = m.values(h.ref_rejected);
  b.chosen_lengths = m.values(h.len_chosen);
  b.rejected_lengths = m.values(h.len_rejected);
  if (wpo) {
    b.chosen_weights = m.values(h.w_chosen);
    b.rejected_weights = m.values(h.w_rejected);
  }
  return b;
}

std::vector<std::pair<const char*, dpo_options>> dpo_configurations() {
  using L = dpo_loss;
  std::vector<std::pair<const char*, dpo_options>> c;
  for (L l : {L::sigmoid, L::hinge, L::ipo, L::nca_pair, L::bco_pair, L::sppo_hard, L::apo_zero, L::apo_down,
              L::discopop, L::sigmoid_norm, L::sft})
    c.push_back({dpo_loss_name(l), {.loss = l}});
  c.push_back({"exo_pair", {.loss = L::exo_pair, .label_smoothing = 1e-3}});
  c.push_back({"robust", {.loss = L::robust, .label_smoothing = 0.2}});
  c.push_back({"cdpo", {.label_smoothing = 0.1}});
  c.push_back({"ipo_sum", {.loss = L::ipo, .ipo_sum = true}});
  c.push_back({"mix", {.mix = {{L::sigmoid, 0.7}, {L::bco_pair, 0.3}, {L::sft, 1.0}}}});
  c.push_back({"forward_kl", {.divergence = f_divergence::forward_kl}});
  c.push_back({"js", {.divergence = f_divergence::js_divergence}});
  c.push_back({"alpha", {.divergence = f_divergence::alpha_divergence, .alpha = 0.3}});
  c.push_back({"reference_free", {.reference_free = true}});
  c.push_back({"aot", {.loss = L::aot, .label_smoothing = 0.1}});
  c.push_back({"aot_unpaired", {.loss = L::aot_unpaired}});
  return c;
}
}  // namespace

TEST_CASE("cross-backend: dpo and dpo_backward, every loss type and divergence", "[dpo][cross]") {
  for (std::uint64_t seed : {1u, 2u}) {
    const preference_host h(seed);
    for (const auto& [name, opt] : dpo_configurations()) {
      for (bool wpo : {false, true}) {
        if (wpo && (opt.loss == dpo_loss::sft || opt.loss == dpo_loss::aot || opt.loss == dpo_loss::aot_unpaired ||
                    !opt.mix.empty()))
          continue;  // WPO with sft or AOT is rejected
        INFO(name << (wpo ? " + WPO" : "") << ", seed " << seed);
        on_every_backend(
            [&](const auto& m) {
              const auto b = make_batch(m, h, wpo);
              const auto r = dpo(b, opt);
              const auto g = dpo_backward(b, opt);
              outputs o;
              o.add("loss", r.loss);
              o.add("per_pair_loss", r.per_pair_loss);
              o.add("rewards_chosen", r.rewards_chosen);
              o.add("reward_accuracy", r.reward_accuracy);
              o.add("reward_margin", r.reward_margin);
              o.add("grad chosen", g.chosen_logps);
              o.add("grad rejected", g.rejected_logps);
              return o;
            },
            false);
      }
    }
  }
}

TEST_CASE("autograd: dpo backward() equals dpo_backward, every loss type", "[dpo][grad]") {
  const preference_host h(3);
  for (const auto& [name, opt] : dpo_configurations()) {
    for (auto dt : {at::kFloat, at::kDouble}) {
      INFO(name << " " << dtype_name(dtype_of(dt)));
      const torch_maker m{dt};
      auto b = make_batch(m, h, false);
      b.chosen_logps.requires_grad_();
      b.rejected_logps.requires_grad_();
      dpo(b, opt).loss.backward();
      const auto g = dpo_backward(b, opt);
      require_agree("chosen", g.chosen_logps, grad_of(b.chosen_logps), tolerance_for(dtype_of(dt)));
      require_agree("rejected", g.rejected_logps, grad_of(b.rejected_logps), tolerance_for(dtype_of(dt)));
    }
  }
}

TEST_CASE("cross-backend + autograd: reward model, CPO family, ORPO, KTO, BCO", "[preference][cross][grad]") {
  const preference_host h(4);
  const host_tensor margin = random_normal({pairs}, 44, 0.5);
  const host_tensor desirable{{pairs}, {1, 0, 1, 0, 0}};
  const auto cpo_of = [&](const auto& m) {
    return cpo_batch<decltype(m.values(h.chosen))>{m.values(h.chosen), m.values(h.rejected), m.values(h.len_chosen),
                                                   m.values(h.len_rejected)};
  };
  const auto unpaired_of = [&](const auto& m) {
    using T = decltype(m.values(h.chosen));
    unpaired_batch<T> b{m.values(h.chosen), m.values(h.ref_chosen), m.values(desirable)};
    b.kl_logps = m.values(h.rejected);
    b.ref_kl_logps = m.values(h.ref_rejected);
    return b;
  };
  const cpo_options cpo_cases[] = {{},
                                   {.loss = cpo_loss::hinge},
                                   {.loss = cpo_loss::ipo},
                                   cpo_options::simpo(),
                                   {.beta = 2.0, .loss = cpo_loss::simpo, .label_smoothing = 0.1, .alpha = 0.5}};
  on_every_backend(
      [&](const auto& m) {
        outputs o;
        using T = decltype(m.values(h.chosen));
        const reward_model_options<T> rmo{.margin = m.values(margin), .center_rewards_coefficient = 0.01};
        const auto rm = reward_model_loss(m.values(h.chosen), m.values(h.rejected), rmo);
        const auto rmg = reward_model_loss_backward(m.values(h.chosen), m.values(h.rejected), rmo);
        o.add("rm loss", rm.loss);
        o.add("rm accuracy", rm.accuracy);
        o.add("rm grad chosen", rmg.rewards_chosen);
        o.add("rm grad rejected", rmg.rewards_rejected);
        for (const auto& c : cpo_cases) {
          const auto r = cpo(cpo_of(m), c);
          const auto g = cpo_backward(cpo_of(m), c);
          o.add("cpo loss", r.loss);
          o.add("cpo nll", r.nll_loss);
          o.add("cpo grad chosen", g.chosen_logps);
          o.add("cpo grad rejected", g.rejected_logps);
        }
        const auto orp = orpo(cpo_of(m));
        o.add("orpo loss", orp.loss);
        o.add("orpo log odds", orp.log_odds_chosen);
        o.add("orpo grad chosen", orpo_backward(cpo_of(m)).chosen_logps);
        o.add("orpo grad rejected", orpo_backward(cpo_of(m)).rejected_logps);
        for (const kto_options& k : {kto_options{}, kto_options{.loss = kto_loss::apo_zero_unpaired}}) {
          const auto r = kto(unpaired_of(m), k);
          o.add("kto loss", r.loss);
          o.add("kto kl", r.kl);
          o.add("kto rewards chosen", r.rewards_chosen);
          o.add("kto grad", kto_backward(unpaired_of(m), k));
        }
        {  // OpenRLHF VanillaKTOLoss: the two opposite-side baselines from the batch itself (no kl_logps)
          auto u = unpaired_of(m);
          u.kl_logps.reset();
          u.ref_kl_logps.reset();
          const auto k = kto_options::openrlhf_vanilla(0.1);
          const auto r = kto(u, k);
          o.add("vanilla kto loss", r.loss);
          o.add("vanilla kto z_D", r.kl);
          o.add("vanilla kto z_U", r.kl_rejected);
          o.add("vanilla kto grad", kto_backward(u, k));
        }
        o.add("bco loss", bco(unpaired_of(m), {.delta = 0.3}).loss);
        o.add("bco grad", bco_backward(unpaired_of(m), {.delta = 0.3}));
        return o;
      },
      false);

  for (auto dt : {at::kFloat, at::kDouble}) {
    INFO(dtype_name(dtype_of(dt)));
    const torch_maker m{dt};
    const auto tol = tolerance_for(dtype_of(dt));
    {
      auto rc = m.leaf(h.chosen), rr = m.leaf(h.rejected);
      const reward_model_options<at::Tensor> rmo{.margin = m.values(margin), .center_rewards_coefficient = 0.01};
      reward_model_loss(rc, rr, rmo).loss.backward();
      const auto g = reward_model_loss_backward(rc, rr, rmo);
      require_agree("rm chosen", g.rewards_chosen, ops::to_host(rc.grad()), tol);
      require_agree("rm rejected", g.rewards_rejected, ops::to_host(rr.grad()), tol);
    }
    for (const auto& c : cpo_cases) {
      auto b = cpo_of(m);
      b.chosen_logps.requires_grad_();
      b.rejected_logps.requires_grad_();
      cpo(b, c).loss.backward();
      const auto g = cpo_backward(b, c);
      require_agree("cpo chosen", g.chosen_logps, ops::to_host(b.chosen_logps.grad()), tol);
      require_agree("cpo rejected", g.rejected_logps, ops::to_host(b.rejected_logps.grad()), tol);
    }
    {
      auto b = cpo_of(m);
      b.chosen_logps.requires_grad_();
      b.rejected_logps.requires_grad_();
      orpo(b).loss.backward();
      const auto g = orpo_backward(b);
      require_agree("orpo chosen", g.chosen_logps, ops::to_host(b.chosen_logps.grad()), tol);
      require_agree("orpo rejected", g.rejected_logps, ops::to_host(b.rejected_logps.grad()), tol);
    }
    for (const kto_options& k : {kto_options{}, kto_options{.loss = kto_loss::apo_zero_unpaired}}) {
      auto b = unpaired_of(m);
      b.logps.requires_grad_();
      b.kl_logps->requires_grad_();  // the KL baseline must not receive a gradient (TRL detaches it)
      kto(b, k).loss.backward();
      require_agree("kto", kto_backward(b, k), ops::to_host(b.logps.grad()), tol);
      CHECK_FALSE(b.kl_logps->grad().defined());
    }
    {  // vanilla KTO: autograd reaches the logps through both (undetached) baselines too
      auto b = unpaired_of(m);
      b.kl_logps.reset();
      b.ref_kl_logps.reset();
      b.logps.requires_grad_();
      const auto k = kto_options::openrlhf_vanilla(0.1);
      kto(b, k).loss.backward();
      require_agree("vanilla kto", kto_backward(b, k), ops::to_host(b.logps.grad()), tol);
    }
    {
      auto b = unpaired_of(m);
      b.logps.requires_grad_();
      bco(b, {.delta = 0.3}).loss.backward();
      require_agree("bco", bco_backward(b, {.delta = 0.3}), ops::to_host(b.logps.grad()), tol);
    }
  }
}

TEST_CASE("cross-backend + autograd: sequence_logps sum and mean from logits", "[sequence_logps][cross][grad]") {
  const auto logits = random_normal({3, 6, 11}, 71, 2.0);
  const auto labels = random_labels({3, 6}, 11, 72, 0.3);
  const host_tensor upstream{{3}, {0.5, -1.0, 2.0}};
  for (auto red : {sequence_reduction::sum, sequence_reduction::mean}) {
    const sequence_logps_options opt{.reduction = red};
    on_every_backend([&](const auto& m) {
      const auto x = m.values(logits);
      const auto s = sequence_logps(x, m.labels(labels), opt);
      outputs o;
      o.add("logps", s.logps);
      o.add("lengths", s.lengths);
      o.add("grad", sequence_logps_backward(x, m.labels(labels), m.values(upstream), opt));
      return o;
    });
    for (auto dt : {at::kFloat, at::kDouble}) {
      const torch_maker m{dt};
      auto x = m.leaf(logits);
      const auto s = sequence_logps(x, m.labels(labels), opt);
      (s.logps * m.values(upstream)).sum().backward();
      require_agree("sequence_logps autograd", sequence_logps_backward(x, m.labels(labels), m.values(upstream), opt),
                    ops::to_host(x.grad()), tolerance_for(dtype_of(dt)));
    }
  }
}

TEST_CASE("cross-backend + autograd: LD-DPO log-probs and Plackett-Luce", "[sequence_logps][reward][cross][grad]") {
  const auto logits = random_normal({3, 6, 11}, 81, 2.0);
  const auto labels = random_labels({3, 6}, 11, 82, 0.3);
  const host_tensor shared{{3}, {2, 0, 4}};
  const host_tensor upstream{{3}, {0.5, -1.0, 2.0}};
  const auto rewards = random_normal({4, 5}, 83, 2.0);
  on_every_backend([&](const auto& m) {
    const auto x = m.values(logits);
    outputs o;
    o.add("ld logps", ld_sequence_logps(x, m.labels(labels), m.values(shared), 0.4).logps);
    o.add("ld grad", ld_sequence_logps_backward(x, m.labels(labels), m.values(shared), 0.4, m.values(upstream)));
    o.add("pl loss", plackett_luce_loss(m.values(rewards)));
    o.add("pl grad", plackett_luce_loss_backward(m.values(rewards)));
    return o;
  });
  for (auto dt : {at::kFloat, at::kDouble}) {
    const torch_maker m{dt};
    const auto tol = tolerance_for(dtype_of(dt));
    auto x = m.leaf(logits);
    (ld_sequence_logps(x, m.labels(labels), m.values(shared), 0.4).logps * m.values(upstream)).sum().backward();
    require_agree("ld autograd",
                  ld_sequence_logps_backward(x, m.labels(labels), m.values(shared), 0.4, m.values(upstream)),
                  ops::to_host(x.grad()), tol);
    auto r = m.leaf(rewards);
    plackett_luce_loss(r).backward();
    require_agree("pl autograd", plackett_luce_loss_backward(r), ops::to_host(r.grad()), tol);
  }
}

TEST_CASE("cross-backend + autograd: PRM loss, hard / soft / whole-vocabulary labels", "[prm][cross][grad]") {
  // [3, 6] positions over V = 11; placeholder 4 at seven positions; reward columns 9 and 2 (unsorted)
  const auto logits = random_normal({3, 6, 11}, 91, 2.0);
  const host_labels ids{{3, 6}, {4, 1, 4, 0, 4, 7, 3, 4, 2, 4, 8, 4, 4, 5, 6, 1, 0, 2}};
  const host_labels hard{{3, 6}, {9, 3, 2, -100, 2, 0, 7, 9, 1, -100, 5, 2, 9, 0, 0, 0, 3, 8}};
  const host_labels vocab{{3, 6}, {9, 3, 2, -100, 10, 0, 7, 1, 1, -100, 5, 6, 0, 0, 0, 0, 3, 8}};
  const host_tensor soft{
      {3, 6}, {0.9, -100, 0.5, -100, 0.0, -100, -100, 1.0, -100, 0.25, -100, 0.7, 0.4, -100, -100, -100, -100, -100}};
  const prm_options opt = prm_options::openrlhf(4, {9, 2});
  const prm_options whole{.placeholder_token_id = 4};
  on_every_backend([&](const auto& m) {
    const auto x = m.values(logits);
    const auto h = prm_loss(m.labels(ids), x, m.labels(hard), opt);
    const auto s = prm_loss_soft(m.labels(ids), x, m.values(soft), opt);
    const auto w = prm_loss(m.labels(ids), x, m.labels(vocab), whole);
    outputs o;
    o.add("hard loss", h.loss);
    o.add("hard per-step", h.per_step_loss);
    o.add("hard accuracy", h.accuracy);
    o.add("hard grad", prm_loss_backward(m.labels(ids), x, m.labels(hard), opt));
    o.add("soft loss", s.loss);
    o.add("soft accuracy", s.accuracy);
    o.add("soft grad", prm_loss_soft_backward(m.labels(ids), x, m.values(soft), opt));
    o.add("vocab loss", w.loss);
    o.add("vocab accuracy", w.accuracy);
    o.add("vocab grad", prm_loss_backward(m.labels(ids), x, m.labels(vocab), whole));
    return o;
  });
  for (auto dt : {at::kFloat, at::kDouble}) {
    const torch_maker m{dt};
    const auto tol = tolerance_for(dtype_of(dt));
    const auto x = m.values(logits);
    require_agree("prm hard autograd", prm_loss_backward(m.labels(ids), x, m.labels(hard), opt),
                  ops::to_host(autograd_grad(
                      x, [&](const at::Tensor& z) { return prm_loss(m.labels(ids), z, m.labels(hard), opt).loss; })),
                  tol);
    require_agree(
        "prm soft autograd", prm_loss_soft_backward(m.labels(ids), x, m.values(soft), opt),
        ops::to_host(autograd_grad(
            x, [&](const at::Tensor& z) { return prm_loss_soft(m.labels(ids), z, m.values(soft), opt).loss; })),
        tol);
    require_agree("prm vocab autograd", prm_loss_backward(m.labels(ids), x, m.labels(vocab), whole),
                  ops::to_host(autograd_grad(
                      x, [&](const at::Tensor& z) { return prm_loss(m.labels(ids), z, m.labels(vocab), whole).loss; })),
                  tol);
  }
}

TEST_CASE("cross-backend: WPO weights from logits (TRL use_weighting)", "[dpo][wpo][cross]") {
  const auto logits = random_normal({4, 6, 9}, 95, 2.0);
  const auto labels = random_labels({4, 6}, 9, 96, 0.3);
  on_every_backend([&](const auto& m) {
    outputs o;
    o.add("wpo weights", wpo_weights(m.values(logits), m.labels(labels)));
    return o;
  });
  // detached: no graph through the weights
  const auto x = torch_maker{at::kDouble}.leaf(logits);
  CHECK_FALSE(wpo_weights(x, torch_maker{at::kDouble}.labels(labels)).requires_grad());
}

TEST_CASE("torch: every DPO loss stays finite (values and autograd) at log-ratios of ±5000", "[dpo][extreme]") {
  for (auto dt : {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf}) {
    for (const auto& [name, opt] : dpo_configurations()) {
      INFO(name << " " << dtype_name(dtype_of(dt)));
      const auto v = [&](std::vector<double> x) { return torch::tensor(x, torch::kDouble).to(dt); };
      preference_batch<at::Tensor> b{v({-1, -5001, -3}).requires_grad_(), v({-5001, -1, -3}).requires_grad_()};
      b.ref_chosen_logps = v({0, 0, 0});
      b.ref_rejected_logps = v({0, 0, 0});
      b.chosen_lengths = v({3, 3, 3});
      b.rejected_lengths = v({2, 2, 2});
      const auto r = dpo(b, opt);
      r.loss.backward();
      CHECK(all_finite(r.per_pair_loss));
      CHECK(all_finite(grad_of(b.chosen_logps)));
      CHECK(all_finite(grad_of(b.rejected_logps)));
      const auto g = dpo_backward(b, opt);
      CHECK(all_finite(g.chosen_logps));
      CHECK(all_finite(g.rejected_logps));
    }
  }
}

}  // namespace test_preference_torch
