// RL core on LibTorch: values, metrics and analytic gradients of the PPO policy loss, value loss and GRPO
// objective, and every advantage estimator, vs the Eigen double reference (torch float32/64, eigen float32,
// half inputs where the loss upcasts); shapes [3, 5] and [4, 7] with an empty row, interleaved groups, singleton
// groups and all-equal groups; LibTorch autograd through each forward vs its analytic backward, down to logits
// through token_logprobs. Inputs are random host data in double (support/data.hpp).
#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <vector>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/backends/torch.hpp"
#include "posttrain/posttrain.hpp"
#include "support/data.hpp"
#include "support/torch_data.hpp"

namespace test_rl_torch {  // one namespace per test file: the unity build compiles several in one TU

using namespace posttrain;
using namespace posttrain::test;

namespace {
constexpr aggregation all_modes[] = {aggregation::token_mean, aggregation::seq_mean_token_sum,
                                     aggregation::seq_mean_token_mean, aggregation::seq_mean_token_sum_norm,
                                     aggregation::sum};

struct rl_host {
  host_tensor logprobs, old_logprobs, ref_logprobs, advantages, mask, values, old_values, returns, seq_adv;
  rl_host(std::int64_t B, std::int64_t T, std::uint64_t seed) {
    logprobs = random_normal({B, T}, seed, 0.5, -1.5);
    auto d = random_normal({B, T}, seed + 1, 0.35), rd = random_normal({B, T}, seed + 2, 0.4);
    old_logprobs = logprobs, ref_logprobs = logprobs;
    for (std::size_t i = 0; i < d.values.size(); ++i) {
      old_logprobs.values[i] -= d.values[i];
      ref_logprobs.values[i] -= rd.values[i];
    }
    advantages = random_normal({B, T}, seed + 3);
    mask = random_mask({B, T}, seed + 4, 0.75);
    for (std::int64_t t = 0; t < T; ++t) mask.values[static_cast<std::size_t>(T + t)] = 0.0;  // row 1 empty
    values = random_normal({B, T}, seed + 5), old_values = random_normal({B, T}, seed + 6, 0.2);
    for (std::size_t i = 0; i < values.values.size(); ++i) old_values.values[i] += values.values[i];
    returns = random_normal({B, T}, seed + 7);
    seq_adv = random_normal({B}, seed + 8);
  }
};

const std::vector<ppo_options> ppo_variants = {
    {},
    {.clip = {.clip_high = 0.28}, .reduction = aggregation::seq_mean_token_mean},
    {.clip = {.clip_c = 3.0}, .reduction = aggregation::seq_mean_token_sum},
    {.clip = {.delta = 1.3}, .reduction = aggregation::seq_mean_token_sum_norm},
    {.clip = {.clip_low = 0.1, .log_ratio_clamp = 0.3}, .reduction = aggregation::sum},
    ppo_options::verl()};

const std::vector<grpo_options> grpo_variants = {
    {.loss_type = grpo_loss_type::grpo, .beta = 0.04},
    {.loss_type = grpo_loss_type::bnpo, .beta = 0.1, .kl = {.estimator = kl_estimator::k2}},
    {.loss_type = grpo_loss_type::dr_grpo, .beta = 0.04, .max_completion_length = 9},
    {.loss_type = grpo_loss_type::dapo, .beta = 0.04, .clip = {.clip_high = 0.28}, .bias_corrected_kl = true},
    {.loss_type = grpo_loss_type::dapo,
     .beta = 0.02,
     .clip = {.clip_c = 3.0, .delta = 1.4, .log_ratio_clamp = 0.4},
     .kl = kl_options::verl_low_var_kl(),
     .bias_corrected_kl = true,
     .normalizer = 7.0}};
}  // namespace

TEST_CASE("PPO policy loss: LibTorch vs Eigen reference (values, metrics, gradients)", "[rl][torch]") {
  for (auto [B, T] : {std::pair<std::int64_t, std::int64_t>{3, 5}, {4, 7}})
    for (const auto& o : ppo_variants) {
      const rl_host h(B, T, 100 + static_cast<std::uint64_t>(B));
      on_every_backend(
          [&](const auto& m) {
            const auto lp = m.values(h.logprobs), old = m.values(h.old_logprobs), A = m.values(h.advantages),
                       mk = m.values(h.mask);
            const auto r = ppo_policy_loss(lp, old, A, mk, o);
            outputs out;
            out.add("loss", r.loss);
            out.add("per_token_loss", r.per_token_loss);
            out.add("clip_ratio_low", r.clip_ratio_low);
            out.add("clip_ratio_high", r.clip_ratio_high);
            out.add("clip_ratio_region", r.clip_ratio_region);
            out.add("pg_clipfrac", r.pg_clipfrac);
            out.add("pg_clipfrac_lower", r.pg_clipfrac_lower);
            out.add("approx_kl", r.approx_kl);
            out.add("approx_kl_sq", r.approx_kl_sq);
            out.add("ratio_mean", r.ratio_mean);
            out.add("ratio_min", r.ratio_min);
            out.add("ratio_max", r.ratio_max);
            out.add("grad", ppo_policy_loss_backward(lp, old, A, mk, o, 0.5));
            return out;
          },
          false);
    }
}

TEST_CASE("Value loss and GRPO objective: LibTorch vs Eigen reference", "[rl][torch]") {
  const rl_host h(4, 6, 7);
  for (auto mode : all_modes)
    on_every_backend(
        [&](const auto& m) {
          const value_options o{.reduction = mode};
          const auto V = m.values(h.values), Vo = m.values(h.old_values), R = m.values(h.returns),
                     mk = m.values(h.mask);
          const auto r = value_loss(V, Vo, R, mk, o);
          outputs out;
          out.add("loss", r.loss);
          out.add("per_token_loss", r.per_token_loss);
          out.add("clipfrac", r.clipfrac);
          out.add("vpred_mean", r.vpred_mean);
          out.add("grad", value_loss_backward(V, Vo, R, mk, o));
          return out;
        },
        false);
  for (const auto& o : grpo_variants)
    for (bool seq_adv : {false, true})
      on_every_backend(
          [&](const auto& m) {
            using T = decltype(m.values(h.logprobs));
            grpo_batch<T> b{.logprobs = m.values(h.logprobs),
                            .advantages = m.values(seq_adv ? h.seq_adv : h.advantages),
                            .response_mask = m.values(h.mask),
                            .old_logprobs = m.values(h.old_logprobs),
                            .ref_logprobs = m.values(h.ref_logprobs)};
            if (seq_adv) b.advantages = ops::slice(b.advantages, 0, 0, 4);
            const auto r = grpo_loss(b, o);
            outputs out;
            out.add("loss", r.loss);
            out.add("per_token_loss", r.per_token_loss);
            out.add("kl", r.kl);
            out.add("clip_ratio_region", r.clip_ratio_region);
            out.add("ratio_mean", r.ratio_mean);
            out.add("grad", grpo_loss_backward(b, o));
            return out;
          },
          false);
}

TEST_CASE("Advantage estimators: LibTorch vs Eigen reference (interleaved, singleton, all-equal groups)",
          "[rl][torch]") {
  const std::int64_t B = 7, T = 5;
  const rl_host h(B, T, 31);
  auto scores = random_normal({B}, 41);
  scores.values[2] = scores.values[5] = 0.25;            // group 2 = rows {2, 5}: all equal
  const host_labels groups{{B}, {0, 1, 2, 0, 1, 2, 7}};  // interleaved; group 7 is a singleton
  auto tlr = random_normal({B, T}, 43);
  for (const auto sp : {singleton_policy::zero, singleton_policy::raw})
    for (const auto sc : {group_scale::group, group_scale::batch, group_scale::none})
      on_every_backend([&](const auto& m) {
        const auto s = m.values(scores);
        const auto id = m.labels(groups);
        const auto mk = m.values(h.mask);
        const auto r = grpo_advantages(s, id, {.scale = sc, .eps = 1e-6, .singleton = sp});
        outputs out;
        out.add("grpo", r.advantages);
        out.add("group_std", r.group_std);
        out.add("frac_zero_std", r.frac_reward_zero_std);
        out.add("rloo", rloo_advantages(s, id, sp));
        out.add("opo", opo_advantages(s, mk, id, sp));
        out.add("gpg", gpg_advantages(s, id, 1.0, sp));
        out.add("rf++ baseline", reinforce_pp_baseline_advantages(m.values(tlr), mk, id, sp));
        out.add("tokens", broadcast_to_tokens(r.advantages, mk));
        return out;
      });
  on_every_backend(
      [&](const auto& m) {
        const auto r = m.values(tlr), v = m.values(h.values), mk = m.values(h.mask);
        outputs out;
        for (bool skip : {true, false}) {
          const auto g = gae(r, v, mk, {.gamma = 0.9, .lambda = 0.8, .skip_masked = skip});
          out.add("gae advantages", g.advantages);
          out.add("gae returns", g.returns);
        }
        out.add("discounted", discounted_returns(r, mk, 0.7));
        out.add("reinforce++", reinforce_pp_advantages(r, mk, 0.9));
        const auto rm = remax_advantages(r, m.values(scores), mk);
        out.add("remax", rm.advantages);
        const auto kr = kl_shaped_rewards(
            m.values(scores), m.values(h.logprobs), m.values(h.ref_logprobs), mk,
            {.beta = 0.1, .kl = {.estimator = kl_estimator::k3}, .position = score_position::first_pad});
        out.add("kl rewards", kr.rewards);
        out.add("kl", kr.kl);
        out.add("rloo scores",
                kl_penalized_scores(m.values(scores), m.values(h.logprobs), m.values(h.ref_logprobs), mk, 0.05));
        return out;
      },
      false);
  // pass@k needs groups of two or more
  const host_labels pairs{{6}, {0, 1, 2, 0, 1, 2}};
  const host_tensor ps{{6}, {0.1, 0.9, 0.3, 0.7, 0.2, 0.3}};
  on_every_backend(
      [&](const auto& m) {
        outputs out;
        out.add("passk", grpo_passk_advantages(m.values(ps), m.labels(pairs)));
        return out;
      },
      false);
}

TEST_CASE("RL losses: LibTorch autograd through the forward equals the analytic backward", "[rl][torch][autograd]") {
  const rl_host h(4, 6, 77);
  const auto lp = to_torch(h.logprobs), old = to_torch(h.old_logprobs), A = to_torch(h.advantages),
             mk = to_torch(h.mask), ref = to_torch(h.ref_logprobs);
  for (const auto& o : ppo_variants) {
    const auto g = autograd_grad(lp, [&](const at::Tensor& x) { return ppo_policy_loss(x, old, A, mk, o).loss; });
    require_agree("ppo autograd", ppo_policy_loss_backward(lp, old, A, mk, o), ops::to_host(g), float64_tol);
  }
  for (auto mode : all_modes) {
    const value_options o{.reduction = mode};
    const auto V = to_torch(h.values), Vo = to_torch(h.old_values), R = to_torch(h.returns);
    const auto g = autograd_grad(V, [&](const at::Tensor& x) { return value_loss(x, Vo, R, mk, o).loss; });
    require_agree("value autograd", value_loss_backward(V, Vo, R, mk, o), ops::to_host(g), float64_tol);
  }
  for (const auto& o : grpo_variants)
    for (bool on_policy : {false, true}) {
      grpo_batch<at::Tensor> b{.logprobs = lp, .advantages = A, .response_mask = mk, .ref_logprobs = ref};
      if (!on_policy) b.old_logprobs = old;
      const auto g = autograd_grad(lp, [&](const at::Tensor& x) {
        auto bx = b;
        bx.logprobs = x;
        return grpo_loss(bx, o).loss;
      });
      require_agree("grpo autograd", grpo_loss_backward(b, o), ops::to_host(g), float64_tol);
    }
  // through token_logprobs down to logits, and the entropy bonus
  const auto logits = to_torch(random_normal({4, 6, 11}, 90));
  const auto labels = to_torch(random_labels({4, 6}, 11, 91));
  const grpo_options o{.loss_type = grpo_loss_type::grpo, .beta = 0.04};
  const auto g = autograd_grad(logits, [&](const at::Tensor& z) {
    grpo_batch<at::Tensor> b{.logprobs = token_logprobs(z, labels),
                             .advantages = A,
                             .response_mask = mk,
                             .old_logprobs = old,
                             .ref_logprobs = ref};
    return grpo_loss(b, o).loss;
  });
  const grpo_batch<at::Tensor> b{.logprobs = token_logprobs(logits, labels),
                                 .advantages = A,
                                 .response_mask = mk,
                                 .old_logprobs = old,
                                 .ref_logprobs = ref};
  require_agree("grpo to logits", token_logprobs_backward(logits, labels, grpo_loss_backward(b, o)), ops::to_host(g),
                float64_tol);
  const auto ge = autograd_grad(logits, [&](const at::Tensor& z) { return entropy_bonus(z, mk); });
  require_agree("entropy bonus", entropy_bonus_backward(logits, mk), ops::to_host(ge), float64_tol);
}

TEST_CASE("PPO family at a log-ratio of +100 (past float32's exp): finite autograd and backward gradients",
          "[rl][torch][issue13]") {
  // Issue 13 defect 1. In float32 exp(100) = +inf; before the fix a clipped token (A > 0) or an A = 0 token
  // gave 0·inf = NaN in both the analytic backward and autograd. The Eigen double reference has exp(100)
  // finite, so every output below must agree with it and be finite.
  host_tensor lp = random_normal({2, 4}, 1301), old = lp;
  const std::vector<double> lr{0.1, 100, 100, -0.05, 100, 0.2, -0.1, 100};
  for (std::size_t i = 0; i < lp.values.size(); ++i) {
    lp.values[i] = -std::abs(lp.values[i]) - 0.5;
    old.values[i] = lp.values[i] - lr[i];
  }
  const host_tensor adv{{2, 4}, {1, 1, 0, -1, 0, -0.5, 0.7, 2}};
  // kl_cov has no clip, so -A·ρ is finite at +100 only where A = 0
  const host_tensor adv_zero_at_overflow{{2, 4}, {1, 0, 0, -1, 0, -0.5, 0.7, 0}};
  const host_tensor mask{{2, 4}, std::vector<double>(8, 1.0)};
  std::vector<std::pair<std::string, grpo_options>> grpo_cases;
  for (auto t : {grpo_loss_type::grpo, grpo_loss_type::dapo, grpo_loss_type::dr_grpo, grpo_loss_type::sapo})
    grpo_cases.push_back({grpo_loss_type_name(t), grpo_options{.loss_type = t}});
  grpo_cases.push_back({"dual-clip", grpo_options{.clip = {.clip_c = 3.0}}});
  const std::pair<std::string, policy_variant_options> variant_cases[] = {
      {"clip_cov", {.variant = policy_variant::clip_cov, .clip_cov_ratio = 0.5}},
      {"kl_cov", {.variant = policy_variant::kl_cov, .kl_cov_ratio = 0.5}}};
  for (auto dt : {at::kFloat, at::kDouble})
    run_and_compare(
        torch_maker{dt}, dt,
        [&](const auto& mk) {
          using T = decltype(mk.values(lp));
          const auto grad_of = [&](auto loss_of, auto backward_of) {
            if constexpr (std::is_same_v<T, at::Tensor>)
              return autograd_grad(mk.values(lp), loss_of);
            else
              return backward_of(mk.values(lp));
          };
          const T old_t = mk.values(old), A = mk.values(adv), m = mk.values(mask);
          outputs o;
          for (const auto& [name, opt] : grpo_cases) {
            const auto batch = [&](const T& x) {
              return grpo_batch<T>{.logprobs = x, .advantages = A, .response_mask = m, .old_logprobs = old_t};
            };
            o.add(name + " loss", grpo_loss(batch(mk.values(lp)), opt).loss);
            o.add(name + " grad", grad_of([&](const T& x) { return grpo_loss(batch(x), opt).loss; },
                                          [&](const T& x) { return grpo_loss_backward(batch(x), opt); }));
            o.add(name + " backward", grpo_loss_backward(batch(mk.values(lp)), opt));
          }
          o.add("ppo loss", ppo_policy_loss(mk.values(lp), old_t, A, m).loss);
          o.add("ppo grad", grad_of([&](const T& x) { return ppo_policy_loss(x, old_t, A, m).loss; },
                                    [&](const T& x) { return ppo_policy_loss_backward(x, old_t, A, m); }));
          for (const auto& [name, opt] : variant_cases) {
            const T Av = mk.values(name == "kl_cov" ? adv_zero_at_overflow : adv);
            const auto batch = [&](const T& x) {
              return policy_batch<T>{.logprobs = x, .advantages = Av, .response_mask = m, .old_logprobs = old_t};
            };
            o.add(name + " loss", policy_variant_loss(batch(mk.values(lp)), opt).loss);
            o.add(name + " grad", grad_of([&](const T& x) { return policy_variant_loss(batch(x), opt).loss; },
                                          [&](const T& x) { return policy_variant_loss_backward(batch(x), opt); }));
          }
          return o;
        },
        /*expect_finite=*/true);
}

}  // namespace test_rl_torch
