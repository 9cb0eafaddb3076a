// DPO family and Bradley-Terry reward model on the Eigen reference (float64):
//  * values and gradients vs TRL's formulas evaluated with PyTorch autograd
//    (tests/reference/make_golden.py -> golden.hpp),
//  * torchtune's published DPO test vectors (tests/torchtune/rlhf/loss/test_dpo_loss.py),
//  * closed forms, and the input checks.
#include <catch2/catch.hpp>
#include <cmath>
#include <vector>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/losses/dpo.hpp"
#include "posttrain/losses/reward_model.hpp"
#include "posttrain/posttrain.hpp"
#include "reference/golden.hpp"
#include "support/tolerances.hpp"

using namespace posttrain;
namespace g = posttrain::golden;
using tensor_d = eigen_tensor<double>;

namespace {
void check_all(const std::vector<double>& got, const std::vector<double>& want,
               test::tolerance tol = test::float64_tol) {
  const auto r = check::compare_values(got, want, tol.atol, tol.rtol);
  INFO(r.str());
  CHECK(r.ok);
}
tensor_d vec(const std::vector<double>& v) { return tensor_d({static_cast<std::int64_t>(v.size())}, v); }

preference_batch<tensor_d> golden_batch(bool wpo) {
  preference_batch<tensor_d> b{vec(g::dpo_chosen), vec(g::dpo_rejected)};
  b.ref_chosen_logps = vec(g::dpo_ref_chosen);
  b.ref_rejected_logps = vec(g::dpo_ref_rejected);
  b.chosen_lengths = vec(g::dpo_len_chosen);
  b.rejected_lengths = vec(g::dpo_len_rejected);
  if (wpo) {
    b.chosen_weights = vec(g::dpo_w_chosen);
    b.rejected_weights = vec(g::dpo_w_rejected);
  }
  return b;
}

struct dpo_case {
  const char* name;
  dpo_options options;
  bool wpo;
  double loss;
  const std::vector<double>* grad_chosen;
  const std::vector<double>* grad_rejected;
};
}  // namespace

TEST_CASE("DPO family matches TRL's formulas (golden, float64)", "[reference][dpo]") {
  using L = dpo_loss;
  const dpo_case cases[] = {
      {"sigmoid", {}, false, g::dpo_sigmoid_loss, &g::dpo_sigmoid_grad_chosen, &g::dpo_sigmoid_grad_rejected},
      {"cdpo", {.label_smoothing = 0.1}, false, g::dpo_cdpo_loss, &g::dpo_cdpo_grad_chosen, &g::dpo_cdpo_grad_rejected},
      {"hinge", {.beta = 0.05, .loss = L::hinge}, false, g::dpo_hinge_loss, &g::dpo_hinge_grad_chosen,
       &g::dpo_hinge_grad_rejected},
      {"ipo", {.loss = L::ipo}, false, g::dpo_ipo_loss, &g::dpo_ipo_grad_chosen, &g::dpo_ipo_grad_rejected},
      {"ipo_sum", {.loss = L::ipo, .ipo_sum = true}, false, g::dpo_ipo_sum_loss, &g::dpo_ipo_sum_grad_chosen,
       &g::dpo_ipo_sum_grad_rejected},
      {"exo_pair", {.loss = L::exo_pair, .label_smoothing = 1e-3}, false, g::dpo_exo_pair_loss,
       &g::dpo_exo_pair_grad_chosen, &g::dpo_exo_pair_grad_rejected},
      {"nca_pair", {.loss = L::nca_pair}, false, g::dpo_nca_pair_loss, &g::dpo_nca_pair_grad_chosen,
       &g::dpo_nca_pair_grad_rejected},
      {"robust", {.loss = L::robust, .label_smoothing = 0.1}, false, g::dpo_robust_loss, &g::dpo_robust_grad_chosen,
       &g::dpo_robust_grad_rejected},
      {"bco_pair", {.loss = L::bco_pair}, false, g::dpo_bco_pair_loss, &g::dpo_bco_pair_grad_chosen,
       &g::dpo_bco_pair_grad_rejected},
      {"sppo_hard", {.loss = L::sppo_hard}, false, g::dpo_sppo_hard_loss, &g::dpo_sppo_hard_grad_chosen,
       &g::dpo_sppo_hard_grad_rejected},
      {"apo_zero", {.loss = L::apo_zero}, false, g::dpo_apo_zero_loss, &g::dpo_apo_zero_grad_chosen,
       &g::dpo_apo_zero_grad_rejected},
      {"apo_down", {.loss = L::apo_down}, false, g::dpo_apo_down_loss, &g::dpo_apo_down_grad_chosen,
       &g::dpo_apo_down_grad_rejected},
      {"discopop", {.loss = L::discopop}, false, g::dpo_discopop_loss, &g::dpo_discopop_grad_chosen,
       &g::dpo_discopop_grad_rejected},
      {"sigmoid_norm", {.loss = L::sigmoid_norm}, false, g::dpo_sigmoid_norm_loss, &g::dpo_sigmoid_norm_grad_chosen,
       &g::dpo_sigmoid_norm_grad_rejected},
      {"rpo", {.mix = {{L::sigmoid, 1.0}, {L::sft, 0.5}}}, false, g::dpo_rpo_loss, &g::dpo_rpo_grad_chosen,
       &g::dpo_rpo_grad_rejected},
      {"mpo", {.mix = {{L::sigmoid, 0.8}, {L::bco_pair, 0.2}, {L::sft, 1.0}}}, false, g::dpo_mpo_loss,
       &g::dpo_mpo_grad_chosen, &g::dpo_mpo_grad_rejected},
      {"forward_kl", {.divergence = f_divergence::forward_kl}, false, g::dpo_forward_kl_loss,
       &g::dpo_forward_kl_grad_chosen, &g::dpo_forward_kl_grad_rejected},
      {"js", {.divergence = f_divergence::js_divergence}, false, g::dpo_js_loss, &g::dpo_js_grad_chosen,
       &g::dpo_js_grad_rejected},
      {"alpha", {.divergence = f_divergence::alpha_divergence}, false, g::dpo_alpha_loss, &g::dpo_alpha_grad_chosen,
       &g::dpo_alpha_grad_rejected},
      {"wpo", {}, true, g::dpo_wpo_loss, &g::dpo_wpo_grad_chosen, &g::dpo_wpo_grad_rejected},
      {"reference_free", {.reference_free = true}, false, g::dpo_reference_free_loss,
       &g::dpo_reference_free_grad_chosen, &g::dpo_reference_free_grad_rejected},
  };
  for (const auto& c : cases) {
    SECTION(c.name) {
      const auto batch = golden_batch(c.wpo);
      const auto r = dpo(batch, c.options);
      check_all({ops::item(r.loss)}, {c.loss});
      const auto grad = dpo_backward(batch, c.options);
      check_all(ops::to_host(grad.chosen_logps), *c.grad_chosen);
      check_all(ops::to_host(grad.rejected_logps), *c.grad_rejected);
    }
  }
}

TEST_CASE("DPO reproduces torchtune's published test vectors", "[dpo]") {
  // tests/torchtune/rlhf/loss/test_dpo_loss.py: β = 0.1, Δ = [0, 10, 20] so x = βΔ = [0, 1, 2].
  preference_batch<tensor_d> b{vec({-0.5, -10, -1}), vec({-0.1, -30, -21})};
  b.ref_chosen_logps = vec({-0.5, -10.1, -0.1});
  b.ref_rejected_logps = vec({-0.1, -20.1, -0.1});
  const test::tolerance tt{1e-6, 1e-6};  // torchtune prints six decimals
  // -log σ(x) for x = 0, 1, 2
  check_all(ops::to_host(dpo(b).per_pair_loss), {0.693147, 0.313262, 0.126928}, tt);
  // RSO hinge with γ = 0.1: relu(1 - x) = [1, 0, 0]
  check_all(ops::to_host(dpo(b, {.loss = dpo_loss::hinge}).per_pair_loss), {1, 0, 0}, tt);
  // IPO on sums (OpenRLHF form): (Δ - 1/(2β))² = (Δ - 5)² = [25, 25, 225]
  check_all(ops::to_host(dpo(b, {.loss = dpo_loss::ipo, .ipo_sum = true}).per_pair_loss), {25, 25, 225}, tt);
  // cDPO ε = 0.1: -(0.9) log σ(x) - 0.1 log σ(-x)
  check_all(ops::to_host(dpo(b, {.label_smoothing = 0.1}).per_pair_loss), {0.693147, 0.413262, 0.326928}, tt);
  // robust ε = 0.1
  check_all(ops::to_host(dpo(b, {.loss = dpo_loss::robust, .label_smoothing = 0.1}).per_pair_loss),
            {0.693147, 0.188262, -0.123072}, tt);
  // rewards β l: chosen [0, 0.01, -0.09], rejected [0, -0.99, -2.09]
  const auto r = dpo(b);
  check_all({ops::item(r.rewards_chosen)}, {(0 + 0.01 - 0.09) / 3});
  check_all({ops::item(r.rewards_rejected)}, {(0 - 0.99 - 2.09) / 3});
  check_all({ops::item(r.reward_accuracy)}, {2.0 / 3});  // pair 0 is a tie: not counted as correct
  check_all({ops::item(r.reward_margin)}, {(0 + 1 + 2) / 3.0});
  check_all({ops::item(r.logps_chosen)}, {(-0.5 - 10 - 1) / 3});
  check_all({ops::item(r.logps_rejected)}, {(-0.1 - 30 - 21) / 3});
}

TEST_CASE("DPO gradient is -β σ(-x) / B on the chosen side", "[dpo][grad]") {
  // One pair, l_c - l_r = 10, β = 0.1: x = 1, ∂/∂chosen = -0.1 σ(-1) = -0.0268941, ∂/∂rejected = +0.0268941.
  preference_batch<tensor_d> b{vec({-10}), vec({-30})};
  b.ref_chosen_logps = vec({-10.1});
  b.ref_rejected_logps = vec({-20.1});
  const auto grad = dpo_backward(b);
  const double s = 0.1 / (1 + std::exp(1.0));
  check_all(ops::to_host(grad.chosen_logps), {-s}, {1e-12, 1e-9});
  check_all(ops::to_host(grad.rejected_logps), {s}, {1e-12, 1e-9});
}

TEST_CASE("DPO rejects bad input with a named argument", "[dpo][errors]") {
  using Catch::Matchers::Contains;
  preference_batch<tensor_d> b{vec({-1, -2}), vec({-3, -4})};
  CHECK_THROWS_WITH(dpo(b), Contains("dpo") && Contains("ref_chosen_logps"));
  b.ref_chosen_logps = vec({-1, -2});
  b.ref_rejected_logps = vec({-1, -2, -3});
  CHECK_THROWS_AS(dpo(b), posttrain::error);
  CHECK_THROWS_WITH(dpo(b), Contains("ref_rejected_logps") && Contains("[3]"));
  b.ref_rejected_logps = vec({-1, -2});
  CHECK_THROWS_WITH(dpo(b, {.beta = 0}), Contains("options.beta"));
  CHECK_THROWS_WITH(dpo(b, {.beta = std::nan("")}), Contains("options.beta"));
  CHECK_THROWS_WITH(dpo(b, {.loss = dpo_loss::ipo}), Contains("chosen_lengths"));
  CHECK_THROWS_WITH(dpo(b, {.loss = dpo_loss::exo_pair}), Contains("options.label_smoothing"));
  CHECK_THROWS_WITH(dpo(b, {.loss = dpo_loss::robust, .label_smoothing = 0.5}), Contains("options.label_smoothing"));
  CHECK_THROWS_WITH(dpo(b, {.discopop_tau = -1}), Contains("options.discopop_tau"));
  CHECK_THROWS_WITH(dpo(b, {.mix = {{dpo_loss::sigmoid, std::nan("")}}}), Contains("options.mix"));
  b.chosen_weights = vec({1, 1});
  CHECK_THROWS_WITH(dpo(b), Contains("rejected_weights"));
  preference_batch<tensor_d> empty{tensor_d({0}), tensor_d({0})};
  CHECK_THROWS_WITH(dpo(empty, {.reference_free = true}), Contains("chosen_logps") && Contains("empty"));
  preference_batch<tensor_d> matrix{tensor_d({2, 2}), tensor_d({2, 2})};
  CHECK_THROWS_WITH(dpo(matrix, {.reference_free = true}), Contains("rank 1"));
}

TEST_CASE("Bradley-Terry reward model matches TRL (golden, float64)", "[reference][reward]") {
  const reward_model_options<tensor_d> opt{.margin = vec(g::rm_margin), .center_rewards_coefficient = 0.01};
  const auto r = reward_model_loss(vec(g::rm_chosen), vec(g::rm_rejected), opt);
  check_all({ops::item(r.loss)}, {g::rm_loss});
  const auto grad = reward_model_loss_backward(vec(g::rm_chosen), vec(g::rm_rejected), opt);
  check_all(ops::to_host(grad.rewards_chosen), g::rm_grad_chosen);
  check_all(ops::to_host(grad.rewards_rejected), g::rm_grad_rejected);
}

TEST_CASE("Bradley-Terry closed form and metrics", "[reward]") {
  // r_c = [1, 0, 2], r_r = [0, 1, 2]: losses log(1+e^{-1}), log(1+e^{1}), log 2.
  const auto r = reward_model_loss(vec({1, 0, 2}), vec({0, 1, 2}));
  const double want = (std::log1p(std::exp(-1.0)) + std::log1p(std::exp(1.0)) + std::log(2.0)) / 3;
  check_all({ops::item(r.loss)}, {want});
  check_all({ops::item(r.accuracy)}, {1.0 / 3});
  check_all({ops::item(r.margin)}, {0.0});
  check_all({ops::item(r.mean_chosen)}, {1.0});
  check_all({ops::item(r.min_reward)}, {0.0});
  check_all({ops::item(r.max_reward)}, {2.0});
  using Catch::Matchers::Contains;
  CHECK_THROWS_WITH(reward_model_loss(vec({1, 2}), vec({1})), Contains("rewards_rejected"));
  CHECK_THROWS_WITH(reward_model_loss(vec({1}), vec({1}), {.center_rewards_coefficient = -1}),
                    Contains("center_rewards_coefficient"));
  CHECK_THROWS_WITH(reward_model_loss(vec({1}), vec({1}), {.margin = vec({1, 2})}), Contains("options.margin"));
}
