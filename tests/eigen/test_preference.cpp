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

namespace test_preference {  // one namespace per test file: the unity build compiles several in one TU

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
      {"hinge",
       {.beta = 0.05, .loss = L::hinge},
       false,
       g::dpo_hinge_loss,
       &g::dpo_hinge_grad_chosen,
       &g::dpo_hinge_grad_rejected},
      {"ipo", {.loss = L::ipo}, false, g::dpo_ipo_loss, &g::dpo_ipo_grad_chosen, &g::dpo_ipo_grad_rejected},
      {"ipo_sum",
       {.loss = L::ipo, .ipo_sum = true},
       false,
       g::dpo_ipo_sum_loss,
       &g::dpo_ipo_sum_grad_chosen,
       &g::dpo_ipo_sum_grad_rejected},
      {"exo_pair",
       {.loss = L::exo_pair, .label_smoothing = 1e-3},
       false,
       g::dpo_exo_pair_loss,
       &g::dpo_exo_pair_grad_chosen,
       &g::dpo_exo_pair_grad_rejected},
      {"nca_pair",
       {.loss = L::nca_pair},
       false,
       g::dpo_nca_pair_loss,
       &g::dpo_nca_pair_grad_chosen,
       &g::dpo_nca_pair_grad_rejected},
      {"robust",
       {.loss = L::robust, .label_smoothing = 0.1},
       false,
       g::dpo_robust_loss,
       &g::dpo_robust_grad_chosen,
       &g::dpo_robust_grad_rejected},
      {"bco_pair",
       {.loss = L::bco_pair},
       false,
       g::dpo_bco_pair_loss,
       &g::dpo_bco_pair_grad_chosen,
       &g::dpo_bco_pair_grad_rejected},
      {"sppo_hard",
       {.loss = L::sppo_hard},
       false,
       g::dpo_sppo_hard_loss,
       &g::dpo_sppo_hard_grad_chosen,
       &g::dpo_sppo_hard_grad_rejected},
      {"apo_zero",
       {.loss = L::apo_zero},
       false,
       g::dpo_apo_zero_loss,
       &g::dpo_apo_zero_grad_chosen,
       &g::dpo_apo_zero_grad_rejected},
      {"apo_down",
       {.loss = L::apo_down},
       false,
       g::dpo_apo_down_loss,
       &g::dpo_apo_down_grad_chosen,
       &g::dpo_apo_down_grad_rejected},
      {"discopop",
       {.loss = L::discopop},
       false,
       g::dpo_discopop_loss,
       &g::dpo_discopop_grad_chosen,
       &g::dpo_discopop_grad_rejected},
      {"sigmoid_norm",
       {.loss = L::sigmoid_norm},
       false,
       g::dpo_sigmoid_norm_loss,
       &g::dpo_sigmoid_norm_grad_chosen,
       &g::dpo_sigmoid_norm_grad_rejected},
      {"rpo",
       {.mix = {{L::sigmoid, 1.0}, {L::sft, 0.5}}},
       false,
       g::dpo_rpo_loss,
       &g::dpo_rpo_grad_chosen,
       &g::dpo_rpo_grad_rejected},
      {"mpo",
       {.mix = {{L::sigmoid, 0.8}, {L::bco_pair, 0.2}, {L::sft, 1.0}}},
       false,
       g::dpo_mpo_loss,
       &g::dpo_mpo_grad_chosen,
       &g::dpo_mpo_grad_rejected},
      {"forward_kl",
       {.divergence = f_divergence::forward_kl},
       false,
       g::dpo_forward_kl_loss,
       &g::dpo_forward_kl_grad_chosen,
       &g::dpo_forward_kl_grad_rejected},
      {"js",
       {.divergence = f_divergence::js_divergence},
       false,
       g::dpo_js_loss,
       &g::dpo_js_grad_chosen,
       &g::dpo_js_grad_rejected},
      {"alpha",
       {.divergence = f_divergence::alpha_divergence},
       false,
       g::dpo_alpha_loss,
       &g::dpo_alpha_grad_chosen,
       &g::dpo_alpha_grad_rejected},
      {"wpo", {}, true, g::dpo_wpo_loss, &g::dpo_wpo_grad_chosen, &g::dpo_wpo_grad_rejected},
      {"reference_free",
       {.reference_free = true},
       false,
       g::dpo_reference_free_loss,
       &g::dpo_reference_free_grad_chosen,
       &g::dpo_reference_free_grad_rejected},
      {"aot",
       {.loss = L::aot, .label_smoothing = 0.1},
       false,
       g::dpo_aot_loss,
       &g::dpo_aot_grad_chosen,
       &g::dpo_aot_grad_rejected},
      {"aot_unpaired",
       {.loss = L::aot_unpaired},
       false,
       g::dpo_aot_unpaired_loss,
       &g::dpo_aot_unpaired_grad_chosen,
       &g::dpo_aot_unpaired_grad_rejected},
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

TEST_CASE("sigmoid DPO is Bradley-Terry on the implicit rewards β(logp - ref)", "[dpo][reward]") {
  // DPO eq. 7 with ε = 0 is -log σ(r_c - r_r) with r = β(ℓ - ℓ_ref): the reward model loss on implicit rewards.
  const auto b = golden_batch(false);
  const double beta = 0.1;
  const tensor_d rc = ops::mul(ops::sub(b.chosen_logps, *b.ref_chosen_logps), beta);
  const tensor_d rr = ops::mul(ops::sub(b.rejected_logps, *b.ref_rejected_logps), beta);
  check_all({ops::item(dpo(b, {.beta = beta}).loss)}, {ops::item(reward_model_loss(rc, rr).loss)});
}

TEST_CASE("IPO's minimiser sits at the margin 1/(2β)", "[dpo]") {
  // (Δ̄ - 1/(2β))² is 0 with zero gradient when the length-normalised margin equals 1/(2β) = 5.
  preference_batch<tensor_d> b{vec({-10.0}), vec({-20.0})};
  b.ref_chosen_logps = vec({0.0});
  b.ref_rejected_logps = vec({-15.0});  // Δ = (-10) - (-5) = -5 ... shifted below
  b.chosen_lengths = vec({1.0});
  b.rejected_lengths = vec({1.0});
  b.ref_rejected_logps = vec({-35.0});  // l_c = -10, l_r = 15: Δ = -25; move chosen so Δ = 5
  b.chosen_logps = vec({20.0});         // l_c = 20, Δ = 20 - 15 = 5
  const dpo_options ipo{.loss = dpo_loss::ipo};
  CHECK(ops::item(dpo(b, ipo).loss) == Approx(0.0).margin(1e-12));
  CHECK(ops::item(dpo_backward(b, ipo).chosen_logps) == Approx(0.0).margin(1e-12));
  b.chosen_logps = vec({21.0});  // one past the minimiser: loss 1, gradient 2
  CHECK(ops::item(dpo(b, ipo).loss) == Approx(1.0));
  CHECK(ops::item(dpo_backward(b, ipo).chosen_logps) == Approx(2.0));
}

TEST_CASE("Plackett-Luce matches its definition and reduces to Bradley-Terry at K = 2", "[reward][reference]") {
  const tensor_d r(g::pl_rewards_shape, g::pl_rewards);
  check_all({ops::item(plackett_luce_loss(r))}, {g::pl_loss});
  check_all(ops::to_host(plackett_luce_loss_backward(r)), g::pl_grad);
  // K = 2: rows [r_c, r_r] give exactly the Bradley-Terry loss and gradients.
  const tensor_d pair({3, 2}, {1.5, -0.5, 0.0, 2.0, -3.0, -3.0});
  const auto bt = reward_model_loss(vec({1.5, 0.0, -3.0}), vec({-0.5, 2.0, -3.0}));
  check_all({ops::item(plackett_luce_loss(pair))}, {ops::item(bt.loss)});
  const auto g2 = plackett_luce_loss_backward(pair);
  const auto gbt = reward_model_loss_backward(vec({1.5, 0.0, -3.0}), vec({-0.5, 2.0, -3.0}));
  check_all({g2(0, 0), g2(1, 0), g2(2, 0)}, ops::to_host(gbt.rewards_chosen));
  check_all({g2(0, 1), g2(1, 1), g2(2, 1)}, ops::to_host(gbt.rewards_rejected));
  using Catch::Matchers::Contains;
  CHECK_THROWS_WITH(plackett_luce_loss(vec({1, 2})), Contains("plackett_luce_loss") && Contains("rewards"));
}

TEST_CASE("LD-DPO log-probs weight the tail of the longer completion by α (golden, float64)",
          "[reference][sequence_logps]") {
  const tensor_d logits(g::sft_logits_shape, g::sft_logits);
  const eigen_index labels(g::sft_labels_shape, g::sft_labels);
  const tensor_d shared = vec(g::ld_shared_lengths);
  check_all(ops::to_host(ld_sequence_logps(logits, labels, shared, 0.3).logps), g::ld_logps);
  check_all(ops::to_host(ld_sequence_logps_backward(logits, labels, shared, 0.3, vec({1.0, 1.0}))), g::ld_logps_grad);
  // α = 1 is the plain sum.
  check_all(ops::to_host(ld_sequence_logps(logits, labels, shared, 1.0).logps),
            ops::to_host(sequence_logps(logits, labels).logps));
  using Catch::Matchers::Contains;
  CHECK_THROWS_WITH(ld_sequence_logps(logits, labels, shared, 1.5), Contains("ld_alpha"));
  CHECK_THROWS_WITH(ld_sequence_logps(logits, labels, vec({1, 2, 3}), 0.5), Contains("shared_lengths"));
}

TEMPLATE_TEST_CASE("every preference loss stays finite at log-ratios of ±5000, ties and a batch of one",
                   "[dpo][cpo][orpo][kto][extreme]", float, double) {
  using T = eigen_tensor<TestType>;
  const auto v = [](std::vector<double> x) {
    T t({static_cast<std::int64_t>(x.size())});
    for (std::size_t i = 0; i < x.size(); ++i) t.values()(static_cast<Eigen::Index>(i)) = static_cast<TestType>(x[i]);
    return t;
  };
  const auto finite = [](const T& t) { return t.values().allFinite(); };
  // pairs: log-ratio difference +5000, -5000, a tie, and a batch of one (below)
  const std::vector<std::vector<double>> cases[] = {
      {{-1.0, -5001.0, -3.0}, {-5001.0, -1.0, -3.0}, {0.0, 0.0, 0.0}, {0.0, 0.0, 0.0}},
      {{-2.0}, {-2.0}, {-7.0}, {-7.0}},
  };
  using L = dpo_loss;
  for (const auto& c : cases) {
    preference_batch<T> b{v(c[0]), v(c[1])};
    b.ref_chosen_logps = v(c[2]);
    b.ref_rejected_logps = v(c[3]);
    b.chosen_lengths = ops::full_like(b.chosen_logps, 3.0);
    b.rejected_lengths = ops::full_like(b.chosen_logps, 2.0);
    for (L l : {L::sigmoid, L::hinge, L::ipo, L::nca_pair, L::bco_pair, L::sppo_hard, L::apo_zero, L::apo_down,
                L::discopop, L::sigmoid_norm, L::sft, L::aot, L::aot_unpaired, L::exo_pair, L::robust}) {
      for (f_divergence f : {f_divergence::reverse_kl, f_divergence::forward_kl, f_divergence::js_divergence,
                             f_divergence::alpha_divergence}) {
        const dpo_options o{.loss = l, .label_smoothing = l == L::exo_pair ? 1e-3 : 0.1, .divergence = f};
        INFO(dpo_loss_name(l) << " divergence " << static_cast<int>(f));
        const auto r = dpo(b, o);
        const auto g = dpo_backward(b, o);
        CHECK(finite(r.loss));
        CHECK(finite(r.per_pair_loss));
        CHECK(finite(g.chosen_logps));
        CHECK(finite(g.rejected_logps));
      }
    }
    const cpo_batch<T> cb{b.chosen_logps, b.rejected_logps, *b.chosen_lengths, *b.rejected_lengths};
    for (const cpo_options& o : {cpo_options{}, cpo_options{.loss = cpo_loss::ipo}, cpo_options::simpo(),
                                 cpo_options{.loss = cpo_loss::simpo, .alpha = 0.5}}) {
      CHECK(finite(cpo(cb, o).loss));
      CHECK(finite(cpo_backward(cb, o).chosen_logps));
      CHECK(finite(cpo_backward(cb, o).rejected_logps));
    }
    CHECK(finite(orpo(cb).loss));
    CHECK(finite(orpo_backward(cb).chosen_logps));
    CHECK(finite(orpo_backward(cb).rejected_logps));
    const unpaired_batch<T> ub{b.chosen_logps, b.ref_chosen_logps.value(), ops::full_like(b.chosen_logps, 1.0)};
    CHECK(finite(kto(ub).loss));
    CHECK(finite(kto_backward(ub)));
    CHECK(finite(bco(ub).loss));
    CHECK(finite(bco_backward(ub)));
  }
}

TEST_CASE("ORPO rejects log-probabilities above 0", "[orpo][errors]") {
  using Catch::Matchers::Contains;
  const cpo_batch<tensor_d> b{vec({0.5}), vec({-1.0}), vec({1}), vec({1})};
  CHECK_THROWS_WITH(orpo(b), Contains("orpo") && Contains("chosen_logps") && Contains("<= 0"));
  CHECK_THROWS_WITH(dpo(golden_batch(true), {.loss = dpo_loss::aot}), Contains("aot"));
}

}  // namespace test_preference
