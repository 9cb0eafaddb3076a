// RL core vs golden values from tests/reference/make_golden_rl.py, which re-types verl core_algos
// (compute_policy_loss with dual-clip, compute_value_loss, compute_gae_advantage_return, GRPO and RLOO loop
// forms) and TRL GRPOTrainer._compute_loss (clip-higher, delta, k3, the four loss types) with torch ops in
// float64; gradients there come from torch autograd.
#include <catch2/catch.hpp>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/posttrain.hpp"
#include "reference/golden_rl.hpp"
#include "support/eigen_checks.hpp"

namespace test_rl_golden {  // one namespace per test file: the unity build compiles several in one TU

using namespace posttrain;
namespace g = posttrain::golden_rl;

namespace {
using E = eigen_tensor<double>;
E bt(const std::vector<double>& v) { return test::make({g::B, g::T}, v); }
}  // namespace

TEST_CASE("PPO policy and value loss match verl compute_policy_loss / compute_value_loss", "[rl][golden]") {
  const auto tol = test::float64_tol;
  const ppo_options o{.clip = {.clip_low = 0.2, .clip_high = 0.28, .clip_c = 3.0, .log_ratio_clamp = 20.0}};
  const auto lp = bt(g::logprobs), old = bt(g::old_logprobs), A = bt(g::advantages), m = bt(g::mask);
  const auto r = ppo_policy_loss(lp, old, A, m, o);
  test::check_value("pg_loss", r.loss, g::verl_pg_loss, tol);
  test::check_value("pg_clipfrac", r.pg_clipfrac, g::verl_pg_clipfrac, tol);
  test::check_value("pg_clipfrac_lower", r.pg_clipfrac_lower, g::verl_pg_clipfrac_lower, tol);
  test::check_value("ppo_kl", r.approx_kl, g::verl_ppo_kl, tol);
  test::check_values("grad (torch autograd)", ppo_policy_loss_backward(lp, old, A, m, o), g::verl_pg_grad, tol);
  const auto v = value_loss(bt(g::values), bt(g::old_values), bt(g::returns), m, {.clip = 0.5});
  test::check_value("vf_loss", v.loss, g::verl_vf_loss, tol);
  test::check_value("vf_clipfrac", v.clipfrac, g::verl_vf_clipfrac, tol);
}

TEST_CASE("GAE and group advantages match verl's loop forms", "[rl][golden]") {
  const auto tol = test::float64_tol;
  const auto r = gae(bt(g::rewards), bt(g::values), bt(g::mask), {.gamma = 0.9, .lambda = 0.8, .whiten = false});
  test::check_values("gae advantages", r.advantages, g::verl_gae_advantages_raw, tol);
  test::check_values("gae returns", r.returns, g::verl_gae_returns, tol);
  const auto s = test::vec(g::scores);
  const eigen_index id({static_cast<std::int64_t>(g::index.size())},
                       std::vector<std::int64_t>(g::index.begin(), g::index.end()));
  test::check_values(
      "grpo (verl, singleton raw)",
      grpo_advantages(s, id, {.eps = 1e-6, .singleton = singleton_policy::raw, .all_equal = all_equal_policy::formula})
          .advantages,
      g::verl_grpo_advantages, tol);
  test::check_values("rloo (verl loop, singleton raw)", rloo_advantages(s, id, singleton_policy::raw),
                     g::verl_rloo_advantages, tol);
}

TEST_CASE("GRPO objective matches TRL GRPOTrainer for every loss type", "[rl][golden]") {
  const auto tol = test::float64_tol;
  const grpo_batch<E> b{.logprobs = bt(g::logprobs),
                        .advantages = test::vec(g::trl_seq_advantages),
                        .response_mask = bt(g::mask),
                        .old_logprobs = bt(g::old_logprobs),
                        .ref_logprobs = bt(g::ref_logprobs)};
  const grpo_options base{.beta = 0.04, .clip = {.clip_low = 0.2, .clip_high = 0.28, .delta = 1.5}};
  const struct {
    grpo_loss_type type;
    double loss;
    const std::vector<double>& grad;
  } cases[] = {{grpo_loss_type::grpo, g::trl_grpo_loss, g::trl_grpo_grad},
               {grpo_loss_type::bnpo, g::trl_bnpo_loss, g::trl_bnpo_grad},
               {grpo_loss_type::dr_grpo, g::trl_dr_grpo_loss, g::trl_dr_grpo_grad},
               {grpo_loss_type::dapo, g::trl_dapo_loss, g::trl_dapo_grad}};
  for (const auto& c : cases) {
    auto o = base;
    o.loss_type = c.type;
    if (c.type == grpo_loss_type::dr_grpo) o.max_completion_length = 8;
    if (c.type == grpo_loss_type::dapo) o.normalizer = 11.0;
    INFO(grpo_loss_type_name(c.type));
    const auto r = grpo_loss(b, o);
    test::check_value("loss", r.loss, c.loss, tol);
    test::check_value("kl", r.kl, g::trl_kl, tol);
    test::check_values("grad (torch autograd)", grpo_loss_backward(b, o), c.grad, tol);
  }
}

}  // namespace test_rl_golden
