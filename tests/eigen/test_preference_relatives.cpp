// Sequence log-probs, CPO / SimPO / AlphaPO, ORPO, KTO and unpaired BCO on the Eigen reference
// (float64) vs TRL's formulas evaluated with PyTorch autograd (tests/reference/make_golden.py).
#include <catch2/catch.hpp>
#include <cmath>
#include <vector>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/posttrain.hpp"
#include "reference/golden.hpp"
#include "support/tolerances.hpp"

namespace test_preference_relatives {  // one namespace per test file: the unity build compiles several in one TU

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
void check_one(double got, double want) { check_all({got}, {want}); }
tensor_d vec(const std::vector<double>& v) { return tensor_d({static_cast<std::int64_t>(v.size())}, v); }
cpo_batch<tensor_d> golden_cpo_batch() {
  return {vec(g::cpo_chosen), vec(g::cpo_rejected), vec(g::dpo_len_chosen), vec(g::dpo_len_rejected)};
}
unpaired_batch<tensor_d> golden_unpaired(bool with_kl) {
  unpaired_batch<tensor_d> b{vec(g::kto_logps), vec(g::kto_ref), vec(g::kto_desirable)};
  if (with_kl) {
    b.kl_logps = vec(g::kto_kl_logps);
    b.ref_kl_logps = vec(g::kto_ref_kl_logps);
  }
  return b;
}
}  // namespace

TEST_CASE("sequence_logps sums and means token log-probs (golden, float64)", "[reference][sequence_logps]") {
  const tensor_d logits(g::sft_logits_shape, g::sft_logits);
  const eigen_index labels(g::sft_labels_shape, g::sft_labels);
  const tensor_d upstream = vec({1.0, -2.0});
  const auto s = sequence_logps(logits, labels);
  check_all(ops::to_host(s.logps), g::seq_logps_sum);
  check_all(ops::to_host(s.lengths), {2, 2});  // one label of each row is ignore_index
  check_all(ops::to_host(sequence_logps_backward(logits, labels, upstream)), g::seq_logps_sum_grad);
  const sequence_logps_options mean{.reduction = sequence_reduction::mean};
  check_all(ops::to_host(sequence_logps(logits, labels, mean).logps), g::seq_logps_mean);
  check_all(ops::to_host(sequence_logps_backward(logits, labels, upstream, mean)), g::seq_logps_mean_grad);
  using Catch::Matchers::Contains;
  CHECK_THROWS_WITH(sequence_logps(tensor_d({2, 5}), eigen_index({2}, {0, 1})), Contains("rank 3"));
  CHECK_THROWS_WITH(sequence_logps_backward(logits, labels, vec({1, 2, 3})), Contains("grad"));
}

TEST_CASE("CPO, SimPO and AlphaPO match TRL's CPOTrainer (golden, float64)", "[reference][cpo]") {
  struct c {
    const char* name;
    cpo_options options;
    double loss;
    const std::vector<double>*gc, *gr;
  };
  const c cases[] = {
      {"sigmoid", {}, g::cpo_sigmoid_loss, &g::cpo_sigmoid_grad_chosen, &g::cpo_sigmoid_grad_rejected},
      {"cdpo", {.label_smoothing = 0.2}, g::cpo_cdpo_loss, &g::cpo_cdpo_grad_chosen, &g::cpo_cdpo_grad_rejected},
      {"hinge", {.loss = cpo_loss::hinge}, g::cpo_hinge_loss, &g::cpo_hinge_grad_chosen, &g::cpo_hinge_grad_rejected},
      {"ipo", {.loss = cpo_loss::ipo}, g::cpo_ipo_loss, &g::cpo_ipo_grad_chosen, &g::cpo_ipo_grad_rejected},
      {"simpo",
       {.beta = 2.0, .loss = cpo_loss::simpo, .cpo_alpha = 0.0},
       g::cpo_simpo_loss,
       &g::cpo_simpo_grad_chosen,
       &g::cpo_simpo_grad_rejected},
      {"alphapo",
       {.beta = 2.0, .loss = cpo_loss::simpo, .cpo_alpha = 0.0, .alpha = 0.25},
       g::cpo_alphapo_loss,
       &g::cpo_alphapo_grad_chosen,
       &g::cpo_alphapo_grad_rejected},
  };
  for (const auto& k : cases) {
    SECTION(k.name) {
      const auto b = golden_cpo_batch();
      check_one(ops::item(cpo(b, k.options).loss), k.loss);
      const auto grad = cpo_backward(b, k.options);
      check_all(ops::to_host(grad.chosen_logps), *k.gc);
      check_all(ops::to_host(grad.rejected_logps), *k.gr);
    }
  }
  CHECK(cpo_options::simpo().cpo_alpha == 0.0);
  using Catch::Matchers::Contains;
  CHECK_THROWS_WITH(cpo(golden_cpo_batch(), {.label_smoothing = 0.7}), Contains("options.label_smoothing"));
  auto bad = golden_cpo_batch();
  bad.rejected_lengths = vec({1, 2});
  CHECK_THROWS_WITH(cpo(bad), Contains("cpo") && Contains("rejected_lengths"));
}

TEST_CASE("ORPO matches TRL's odds-ratio loss (golden, float64)", "[reference][orpo]") {
  const auto b = golden_cpo_batch();
  const auto r = orpo(b);
  check_one(ops::item(r.loss), g::orpo_loss);
  check_one(ops::item(r.log_odds_chosen), g::orpo_log_odds_chosen);
  const auto grad = orpo_backward(b);
  check_all(ops::to_host(grad.chosen_logps), g::orpo_grad_chosen);
  check_all(ops::to_host(grad.rejected_logps), g::orpo_grad_rejected);
}

TEST_CASE("ORPO's log(1 - e^u) is accurate on both sides of -ln 2", "[orpo][numerics]") {
  // A single pair whose average log-probs straddle -ln 2: ū_c = -1e-6 (p ≈ 1), ū_r = -30.
  // log odds(ū) = ū - log(1 - e^ū); for ū = -1e-6, log(1 - e^ū) = log(1e-6 - 5e-13 + ...) ≈ -13.815511.
  const cpo_batch<tensor_d> b{vec({-1e-6}), vec({-30.0}), vec({1}), vec({1})};
  const double want_z = (-1e-6 - std::log(-std::expm1(-1e-6))) - (-30.0 - std::log1p(-std::exp(-30.0)));
  check_one(ops::item(orpo(b).log_odds_chosen), want_z);
}

TEST_CASE("KTO and apo_zero_unpaired match TRL's KTOTrainer (golden, float64)", "[reference][kto]") {
  const auto b = golden_unpaired(true);
  const auto r = kto(b);
  check_one(ops::item(r.kl), g::kto_kl);
  check_one(ops::item(r.loss), g::kto_loss);
  check_all(ops::to_host(kto_backward(b)), g::kto_grad);
  const kto_options weighted{.undesirable_weight = 1.33};
  check_one(ops::item(kto(b, weighted).loss), g::kto_weighted_loss);
  check_all(ops::to_host(kto_backward(b, weighted)), g::kto_weighted_grad);
  const kto_options apo{.loss = kto_loss::apo_zero_unpaired};
  check_one(ops::item(kto(b, apo).loss), g::apo_zero_unpaired_loss);
  check_all(ops::to_host(kto_backward(b, apo)), g::apo_zero_unpaired_grad);
  // Without mismatched pairs the baseline is 0; a negative estimate is clamped to 0 (TRL clamp(min=0)).
  CHECK(ops::item(kto(golden_unpaired(false)).kl) == 0.0);
  auto negative = golden_unpaired(true);
  negative.kl_logps = vec({-5.0});
  negative.ref_kl_logps = vec({-1.0});
  CHECK(ops::item(kto(negative).kl) == 0.0);
  using Catch::Matchers::Contains;
  auto half = golden_unpaired(false);
  half.kl_logps = vec({1.0});
  CHECK_THROWS_WITH(kto(half), Contains("ref_kl_logps"));
  CHECK_THROWS_WITH(kto(b, {.desirable_weight = -1}), Contains("options.desirable_weight"));
}

TEST_CASE("unpaired BCO matches TRL's BCOTrainer with its running shift (golden, float64)", "[reference][bco]") {
  const auto b = golden_unpaired(false);
  // TRL updates RunningMoments with this batch's mean reward first, then uses it as δ.
  bco_running_mean running;
  const double delta = running.update(ops::item(bco(b).reward_mean));
  check_one(delta, g::bco_delta);
  check_one(ops::item(bco(b, {.delta = delta}).loss), g::bco_loss);
  check_all(ops::to_host(bco_backward(b, {.delta = delta})), g::bco_grad);
  // The running mean averages the per-batch means: 2 then 4 -> 3.
  bco_running_mean m;
  m.update(2.0);
  CHECK(m.update(4.0) == Approx(3.0));
}

}  // namespace test_preference_relatives
