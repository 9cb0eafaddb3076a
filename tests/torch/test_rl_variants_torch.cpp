// RL policy-loss variants on LibTorch: values, metrics and analytic gradients of every variant (GSPO, LUSPO,
// GMPO, CISPO both bounds, SAPO, VESPO, REINFORCE/GPG) with rollout IS, OPSM and the top-entropy mask, vs the
// Eigen double reference (torch float32/64, eigen float32); [4, 6] inputs with an empty row and a one-token row,
// log-ratios within and far outside the clip range (spread 0.35 and 2.0). LibTorch autograd through each
// forward equals the analytic backward (stop-gradient weights and GSPO's token form included), also with
// per-token advantages where GSPO's token form differs from the sequence form. Clip-Cov / KL-Cov (both selection
// rules), VESPO with a token-level rollout ratio, OpenRLHF's GSPO (gradient through the sequence mean) and
// seq-mask-tis join the list. The GRPO presets (cispo, sapo, luspo, vespo,
// grpo with importance_sampling_level sequence; β·KL, rollout IS, OPSM) likewise: LibTorch vs Eigen on values,
// TRL's metrics and gradients, and autograd vs the analytic backward.
#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <vector>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/backends/torch.hpp"
#include "posttrain/losses/grpo.hpp"
#include "posttrain/losses/policy_variants.hpp"
#include "support/data.hpp"
#include "support/torch_data.hpp"

using namespace posttrain;
using namespace posttrain::test;

namespace {
struct variant_host {
  host_tensor lp, old, roll, A, At, m, H;
  variant_host(std::int64_t B, std::int64_t T, std::uint64_t seed, double spread) {
    lp = random_normal({B, T}, seed, 0.5, -1.5);
    auto d = random_normal({B, T}, seed + 1, spread), rd = random_normal({B, T}, seed + 2, 0.3);
    old = lp, roll = lp;
    for (std::size_t i = 0; i < d.values.size(); ++i) {
      old.values[i] -= d.values[i];
      roll.values[i] = old.values[i] - rd.values[i];
    }
    A = random_normal({B}, seed + 3);
    At = random_normal({B, T}, seed + 4);
    m = random_mask({B, T}, seed + 5, 0.8);
    H = random_normal({B, T}, seed + 6, 1.0, 2.0);
    for (std::int64_t t = 0; t < T; ++t) {
      m.values[static_cast<std::size_t>(T + t)] = 0.0;                 // row 1 empty
      m.values[static_cast<std::size_t>(2 * T + t)] = t == 0 ? 1 : 0;  // row 2 one token
    }
  }
};

std::vector<policy_variant_options> cases() {
  std::vector<policy_variant_options> out;
  for (auto v :
       {policy_variant::ppo, policy_variant::gspo, policy_variant::luspo, policy_variant::gmpo, policy_variant::cispo,
        policy_variant::sapo, policy_variant::vespo, policy_variant::reinforce, policy_variant::gpg})
    for (auto agg : {aggregation::token_mean, aggregation::seq_mean_token_mean})
      out.push_back({.variant = v, .clip = {.clip_low = 0.2, .clip_high = 0.28}, .reduction = agg});
  out.push_back(policy_variant_options::trl_cispo());
  out.push_back({.variant = policy_variant::cispo, .cispo = cispo_bound::verl_two_sided});
  auto o = policy_variant_options::trl_sapo();
  o.sequence_ratio = true;
  o.rollout_is = rollout_is_options::verl();
  out.push_back(o);
  o = policy_variant_options{.variant = policy_variant::ppo, .clip = {.clip_c = 3.0, .log_ratio_clamp = 1.0}};
  o.rollout_is = rollout_is_options{};  // TRL sequence mask at 3
  o.opsm_delta = 0.1;
  o.top_entropy_quantile = 0.6;
  out.push_back(o);
  o = policy_variant_options::trl_vespo();
  o.rollout_is = rollout_is_options{.level = is_level::token, .mode = is_mode::mask, .cap = 2.0, .lower = 0.5};
  o.top_entropy_quantile = 0.5;
  out.push_back(o);
  o = policy_variant_options::trl_vespo();  // the rollout ratio inside φ (TRL), truncated from both sides
  o.rollout_is = rollout_is_options{.level = is_level::token, .mode = is_mode::truncate, .cap = 1.2, .lower = 0.8};
  out.push_back(o);
  for (auto v : {policy_variant::clip_cov, policy_variant::kl_cov})
    for (auto rule : {cov_rule::random, cov_rule::top}) {
      o = policy_variant_options{.variant = v, .clip = {.clip_low = 0.2, .clip_high = 0.28}};
      o.clip_cov_ratio = 0.3, o.clip_cov_lb = -0.3, o.clip_cov_ub = 1.0;
      o.kl_cov_ratio = 0.2, o.kl_cov_coef = 0.5;
      o.cov_selection = rule, o.cov_seed = 3;
      out.push_back(o);
    }
  // OpenRLHF conventions (issue 17): GSPO's gradient through the sequence-mean ratio (differs from the token
  // form under the per-token advantages of the autograd test), and seq-mask-tis rollout correction.
  out.push_back(policy_variant_options::openrlhf_gspo());
  o = policy_variant_options{.variant = policy_variant::ppo, .clip = {.clip_low = 0.2, .clip_high = 0.28}};
  o.rollout_is = rollout_is_options::openrlhf_seq_mask_tis();
  out.push_back(o);
  return out;
}
}  // namespace

TEST_CASE("Policy variants: LibTorch vs Eigen reference (values, metrics, gradients)", "[rl][variants][torch]") {
  const auto all = cases();
  for (double spread : {0.35, 2.0}) {
    const variant_host h(4, 6, 300, spread);
    for (std::size_t k = 0; k < all.size(); ++k) {
      const auto& o = all[k];
      INFO("case " << k << " spread " << spread);
      on_every_backend(
          [&](const auto& mk) {
            using Tn = std::decay_t<decltype(mk.values(h.lp))>;
            const policy_batch<Tn> b{mk.values(h.lp),  mk.values(h.A),    mk.values(h.m),
                                     mk.values(h.old), mk.values(h.roll), mk.values(h.H)};
            const auto r = policy_variant_loss(b, o);
            outputs out;
            out.add("loss", r.loss);
            out.add("per_token_loss", r.per_token_loss);
            out.add("ratio", r.ratio);
            out.add("clip_ratio_region", r.clip_ratio_region);
            out.add("cispo_clip_ratio", r.cispo_clip_ratio);
            out.add("phi_mean", r.phi_mean);
            out.add("is_weight", r.is_weight);
            out.add("is_ratio_mean", r.is_ratio_mean);
            out.add("is_ratio_max", r.is_ratio_max);
            out.add("token_keep", r.token_keep);
            out.add("cov_selected", r.cov_selected);
            out.add("cov_selected_frac", r.cov_selected_frac);
            out.add("grad", policy_variant_loss_backward(b, o, 0.5));
            return out;
          },
          false);
    }
  }
}

TEST_CASE("Policy variants: LibTorch autograd through the forward equals the analytic backward",
          "[rl][variants][torch][autograd]") {
  const auto all = cases();
  for (double spread : {0.35, 2.0}) {
    const variant_host h(4, 6, 400, spread);
    const auto old = to_torch(h.old), roll = to_torch(h.roll), m = to_torch(h.m), H = to_torch(h.H);
    const auto lp = to_torch(h.lp);
    for (std::size_t k = 0; k < all.size(); ++k) {
      for (const auto& A : {to_torch(h.A), to_torch(h.At)}) {  // per-sequence and per-token advantages
        INFO("case " << k << " spread " << spread << " A rank " << A.dim());
        const auto& o = all[k];
        const auto g = autograd_grad(lp, [&](const at::Tensor& x) {
          return policy_variant_loss(policy_batch<at::Tensor>{x, A, m, old, roll, H}, o).loss;
        });
        require_agree("autograd", policy_variant_loss_backward(policy_batch<at::Tensor>{lp, A, m, old, roll, H}, o),
                      ops::to_host(g), float64_tol);
      }
    }
    // on-policy (old = sg(logprobs)): CISPO/VESPO reduce to REINFORCE, gradients still agree
    for (auto v : {policy_variant::cispo, policy_variant::vespo, policy_variant::gspo}) {
      const policy_variant_options o{.variant = v};
      const auto A = to_torch(h.A);
      const auto g = autograd_grad(lp, [&](const at::Tensor& x) {
        return policy_variant_loss(policy_batch<at::Tensor>{x, A, m}, o).loss;
      });
      require_agree("on-policy autograd", policy_variant_loss_backward(policy_batch<at::Tensor>{lp, A, m}, o),
                    ops::to_host(g), float64_tol);
    }
  }
}

namespace {
std::vector<grpo_options> grpo_cases() {
  std::vector<grpo_options> out;
  for (auto t : {grpo_loss_type::cispo, grpo_loss_type::sapo, grpo_loss_type::luspo, grpo_loss_type::vespo,
                 grpo_loss_type::grpo, grpo_loss_type::dapo})
    for (auto level : {grpo_is_level::token, grpo_is_level::sequence})
      for (int extras = 0; extras < 2; ++extras) {
        grpo_options o{.loss_type = t, .beta = 0.04, .clip = {.clip_high = t == grpo_loss_type::cispo ? 1.5 : 0.28}};
        o.importance_sampling_level = level;
        if (extras == 1) {
          o.rollout_is = rollout_is_options{.level = is_level::token, .mode = is_mode::truncate, .cap = 1.3};
          if (t != grpo_loss_type::vespo && level == grpo_is_level::sequence) o.rollout_is = rollout_is_options{};
          o.opsm_delta = 0.1;
        }
        out.push_back(o);
      }
  return out;
}
}  // namespace

TEST_CASE("GRPO presets: LibTorch vs Eigen reference (values, TRL metrics, gradients)", "[rl][grpo][presets][torch]") {
  const auto all = grpo_cases();
  for (double spread : {0.35, 2.0}) {
    const variant_host h(4, 6, 500, spread);
    const auto ref = random_normal({4, 6}, 510, 0.5, -1.5);
    for (std::size_t k = 0; k < all.size(); ++k) {
      const auto& o = all[k];
      INFO("case " << k << " (" << grpo_loss_type_name(o.loss_type) << ") spread " << spread);
      on_every_backend(
          [&](const auto& mk) {
            using Tn = std::decay_t<decltype(mk.values(h.lp))>;
            const grpo_batch<Tn> b{mk.values(h.lp), mk.values(h.A),    mk.values(h.m), mk.values(h.old),
                                   mk.values(ref),  mk.values(h.roll), mk.values(h.H)};
            const auto r = grpo_loss(b, o);
            outputs out;
            out.add("loss", r.loss);
            out.add("per_token_loss", r.per_token_loss);
            out.add("kl", r.kl);
            out.add("clip_ratio_region", r.clip_ratio_region);
            out.add("clip_ratio_low_min", r.clip_ratio_low_min);
            out.add("clip_ratio_high_max", r.clip_ratio_high_max);
            out.add("cispo_clip_ratio", r.cispo_clip_ratio);
            out.add("vespo_phi_seq_mean", r.vespo_phi_seq_mean);
            out.add("is_ratio_min", r.is_ratio_min);
            out.add("is_ratio_mean", r.is_ratio_mean);
            out.add("is_ratio_max", r.is_ratio_max);
            out.add("grad", grpo_loss_backward(b, o, 0.5));
            return out;
          },
          false);
    }
  }
}

TEST_CASE("GRPO presets: LibTorch autograd through the forward equals the analytic backward",
          "[rl][grpo][presets][torch][autograd]") {
  const auto all = grpo_cases();
  for (double spread : {0.35, 2.0}) {
    const variant_host h(4, 6, 600, spread);
    const auto old = to_torch(h.old), roll = to_torch(h.roll), m = to_torch(h.m), H = to_torch(h.H);
    const auto lp = to_torch(h.lp), ref = to_torch(random_normal({4, 6}, 610, 0.5, -1.5));
    for (std::size_t k = 0; k < all.size(); ++k)
      for (const auto& A : {to_torch(h.A), to_torch(h.At)}) {
        const auto& o = all[k];
        INFO("case " << k << " (" << grpo_loss_type_name(o.loss_type) << ") spread " << spread << " A rank "
                     << A.dim());
        const auto g = autograd_grad(lp, [&](const at::Tensor& x) {
          return grpo_loss(grpo_batch<at::Tensor>{x, A, m, old, ref, roll, H}, o).loss;
        });
        require_agree("autograd", grpo_loss_backward(grpo_batch<at::Tensor>{lp, A, m, old, ref, roll, H}, o),
                      ops::to_host(g), float64_tol);
      }
  }
}

TEST_CASE("ppo_policy_loss row clip metrics and entropy: LibTorch vs Eigen", "[rl][ppo][metrics][torch]") {
  for (double spread : {0.35, 2.0}) {
    const variant_host h(4, 6, 700, spread);
    INFO("spread " << spread);
    on_every_backend(
        [&](const auto& mk) {
          using Tn = std::decay_t<decltype(mk.values(h.lp))>;
          const auto r = ppo_policy_loss(mk.values(h.lp), mk.values(h.old), mk.values(h.At), mk.values(h.m),
                                         ppo_options{.clip = {.clip_high = 0.28}}, std::optional<Tn>(mk.values(h.H)));
          outputs out;
          out.add("clip_ratio_low_min", r.clip_ratio_low_min);
          out.add("clip_ratio_high_max", r.clip_ratio_high_max);
          out.add("entropy", r.entropy);
          return out;
        },
        false);
  }
}
