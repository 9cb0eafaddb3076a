// RL policy-loss variants on LibTorch: values, metrics and analytic gradients of every variant (GSPO, LUSPO,
// GMPO, CISPO both bounds, SAPO, VESPO, REINFORCE/GPG) with rollout IS, OPSM and the top-entropy mask, vs the
// Eigen double reference (torch float32/64, eigen float32); [4, 6] inputs with an empty row and a one-token row,
// log-ratios within and far outside the clip range (spread 0.35 and 2.0). LibTorch autograd through each
// forward equals the analytic backward (stop-gradient weights and GSPO's token form included), also with
// per-token advantages where GSPO's token form differs from the sequence form.
#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <vector>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/backends/torch.hpp"
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
      out.push_back({.variant = v, .clip_low = 0.2, .clip_high = 0.28, .agg = agg});
  out.push_back(policy_variant_options::trl_cispo());
  out.push_back({.variant = policy_variant::cispo, .cispo = cispo_bound::verl_two_sided});
  auto o = policy_variant_options::trl_sapo();
  o.sequence_ratio = true;
  o.rollout_is = rollout_is_options::verl();
  out.push_back(o);
  o = policy_variant_options{.variant = policy_variant::ppo, .clip_c = 3.0, .log_ratio_clamp = 1.0};
  o.rollout_is = rollout_is_options{};  // TRL sequence mask at 3
  o.opsm_delta = 0.1;
  o.top_entropy_quantile = 0.6;
  out.push_back(o);
  o = policy_variant_options::trl_vespo();
  o.rollout_is = rollout_is_options{.level = is_level::geometric, .mode = is_mode::mask, .cap = 2.0, .lower = 0.5};
  o.top_entropy_quantile = 0.5;
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
