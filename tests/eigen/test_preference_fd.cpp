// Every preference loss's analytic backward vs central finite differences of its forward, on the
// Eigen reference in double (the correctness triangle's second side for the preference family).
#include <catch2/catch.hpp>
#include <vector>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/losses/cpo.hpp"
#include "posttrain/losses/dpo.hpp"
#include "posttrain/losses/kto.hpp"
#include "posttrain/losses/orpo.hpp"
#include "posttrain/losses/reward_model.hpp"
#include "posttrain/losses/sequence_logps.hpp"
#include "support/data.hpp"
#include "support/finite_difference.hpp"

namespace test_preference_fd {  // one namespace per test file: the unity build compiles several in one TU

using namespace posttrain;
using namespace posttrain::test;
using tensor_d = eigen_tensor<double>;

namespace {
tensor_d vec(const std::vector<double>& v) { return tensor_d({static_cast<std::int64_t>(v.size())}, v); }
// Log-probs well inside their domain and pairs away from the hinge kink (|1 - βΔ| > h) and from ties.
const tensor_d chosen = vec({-12.3, -30.1, -7.7, -20.4, -3.2}), rejected = vec({-25.6, -29.2, -8.9, -14.1, -9.5});
const tensor_d ref_chosen = vec({-14.0, -30.5, -8.0, -19.0, -4.1}),
               ref_rejected = vec({-15.2, -30.0, -9.3, -16.8, -7.7});
const tensor_d len_chosen = vec({5, 12, 3, 9, 2}), len_rejected = vec({7, 11, 4, 6, 0});
const tensor_d w_chosen = vec({0.9, 0.4, 0.7, 0.2, 1.0}), w_rejected = vec({0.5, 0.8, 0.3, 0.6, 0.1});
// For the f-divergences, log-ratios of order 1: e^{-l} at l = -10 makes IPO's loss ~1e8, where a
// central difference with h = 1e-6 carries a rounding error of eps·|f|/h ~ 1e-2.
const tensor_d chosen_near = ops::add(ref_chosen, vec({0.3, -0.5, 1.1, -0.2, 0.7}));
const tensor_d rejected_near = ops::add(ref_rejected, vec({-0.4, 0.6, -1.0, 0.9, -0.3}));

preference_batch<tensor_d> batch(const tensor_d& c, const tensor_d& r, bool wpo) {
  preference_batch<tensor_d> b{c, r};
  b.ref_chosen_logps = ref_chosen;
  b.ref_rejected_logps = ref_rejected;
  b.chosen_lengths = len_chosen;
  b.rejected_lengths = len_rejected;
  if (wpo) {
    b.chosen_weights = w_chosen;
    b.rejected_weights = w_rejected;
  }
  return b;
}
}  // namespace

TEST_CASE("DPO family backward vs finite differences, every loss type and divergence", "[dpo][grad]") {
  using L = dpo_loss;
  std::vector<std::pair<const char*, dpo_options>> cases;
  for (L l : {L::sigmoid, L::hinge, L::ipo, L::nca_pair, L::bco_pair, L::sppo_hard, L::apo_zero, L::apo_down,
              L::discopop, L::sigmoid_norm, L::sft, L::aot, L::aot_unpaired})
    cases.push_back({dpo_loss_name(l), {.loss = l, .label_smoothing = 0.1}});
  cases.push_back({"exo_pair", {.loss = L::exo_pair, .label_smoothing = 1e-3}});
  cases.push_back({"robust", {.loss = L::robust, .label_smoothing = 0.2}});
  cases.push_back({"ipo_sum", {.loss = L::ipo, .ipo_sum = true}});
  cases.push_back({"mpo mix", {.mix = {{L::sigmoid, 0.8}, {L::bco_pair, 0.2}, {L::sft, 1.0}}}});
  for (f_divergence f : {f_divergence::forward_kl, f_divergence::js_divergence, f_divergence::alpha_divergence})
    for (L l : {L::sigmoid, L::ipo, L::nca_pair}) cases.push_back({dpo_loss_name(l), {.loss = l, .divergence = f}});
  cases.push_back({"reference_free", {.reference_free = true}});
  for (const auto& [name, opt] : cases) {
    for (bool wpo : {false, true}) {
      if (wpo && (opt.loss == L::sft || opt.loss == L::aot || opt.loss == L::aot_unpaired || !opt.mix.empty()))
        continue;
      INFO(name << " divergence " << static_cast<int>(opt.divergence) << (wpo ? " + WPO" : ""));
      const bool near = opt.divergence != f_divergence::reverse_kl;
      const tensor_d& c0 = near ? chosen_near : chosen;
      const tensor_d& r0 = near ? rejected_near : rejected;
      const auto g = dpo_backward(batch(c0, r0, wpo), opt);
      check_gradient(
          "chosen", g.chosen_logps, [&](const tensor_d& c) { return ops::item(dpo(batch(c, r0, wpo), opt).loss); }, c0);
      check_gradient(
          "rejected", g.rejected_logps, [&](const tensor_d& r) { return ops::item(dpo(batch(c0, r, wpo), opt).loss); },
          r0);
    }
  }
}

TEST_CASE("CPO family, ORPO, KTO, BCO and the reward models: backward vs finite differences", "[preference][grad]") {
  const auto cb = [](const tensor_d& c, const tensor_d& r) {
    return cpo_batch<tensor_d>{c, r, len_chosen, len_rejected};
  };
  for (const cpo_options& o : {cpo_options{}, cpo_options{.loss = cpo_loss::hinge}, cpo_options{.loss = cpo_loss::ipo},
                               cpo_options::simpo(), cpo_options{.beta = 2.0, .loss = cpo_loss::simpo, .alpha = 0.3}}) {
    const auto g = cpo_backward(cb(chosen, rejected), o);
    check_gradient(
        "cpo chosen", g.chosen_logps, [&](const tensor_d& c) { return ops::item(cpo(cb(c, rejected), o).loss); },
        chosen);
    check_gradient(
        "cpo rejected", g.rejected_logps, [&](const tensor_d& r) { return ops::item(cpo(cb(chosen, r), o).loss); },
        rejected);
  }
  {
    const auto g = orpo_backward(cb(chosen, rejected));
    check_gradient(
        "orpo chosen", g.chosen_logps, [&](const tensor_d& c) { return ops::item(orpo(cb(c, rejected)).loss); },
        chosen);
    check_gradient(
        "orpo rejected", g.rejected_logps, [&](const tensor_d& r) { return ops::item(orpo(cb(chosen, r)).loss); },
        rejected);
  }
  const tensor_d desirable = vec({1, 0, 1, 0, 0});
  const auto ub = [&](const tensor_d& lp) {
    unpaired_batch<tensor_d> b{lp, ref_chosen, desirable};
    b.kl_logps = rejected;
    b.ref_kl_logps = ref_rejected;
    return b;
  };
  for (const kto_options& o :
       {kto_options{}, kto_options{.undesirable_weight = 1.5}, kto_options{.loss = kto_loss::apo_zero_unpaired}})
    check_gradient(
        "kto", kto_backward(ub(chosen), o), [&](const tensor_d& lp) { return ops::item(kto(ub(lp), o).loss); }, chosen);
  check_gradient(
      "bco", bco_backward(ub(chosen), {.delta = 0.4}),
      [&](const tensor_d& lp) { return ops::item(bco(ub(lp), {.delta = 0.4}).loss); }, chosen);

  const reward_model_options<tensor_d> rmo{.margin = vec({0.1, 0.5, 0.0, 1.0, 0.2}),
                                           .center_rewards_coefficient = 0.01};
  const tensor_d rc = ops::mul(chosen, 0.1), rr = ops::mul(rejected, 0.1);
  const auto rg = reward_model_loss_backward(rc, rr, rmo);
  check_gradient(
      "rm chosen", rg.rewards_chosen, [&](const tensor_d& c) { return ops::item(reward_model_loss(c, rr, rmo).loss); },
      rc);
  check_gradient(
      "rm rejected", rg.rewards_rejected,
      [&](const tensor_d& r) { return ops::item(reward_model_loss(rc, r, rmo).loss); }, rr);
  const tensor_d ranked = to_eigen<double>(random_normal({3, 4}, 91, 2.0));
  check_gradient(
      "plackett-luce", plackett_luce_loss_backward(ranked),
      [&](const tensor_d& r) { return ops::item(plackett_luce_loss(r)); }, ranked);
}

TEST_CASE("sequence log-probs backward vs finite differences: sum, mean, LD-DPO", "[sequence_logps][grad]") {
  const tensor_d logits = to_eigen<double>(random_normal({2, 4, 5}, 92, 1.5));
  const eigen_index labels({2, 4}, {1, 4, -100, 0, 3, -100, 2, 2});
  const tensor_d w = vec({0.7, -1.3}), shared = vec({1, 2});
  for (auto red : {sequence_reduction::sum, sequence_reduction::mean}) {
    const sequence_logps_options o{.reduction = red};
    check_gradient(
        "sequence_logps", sequence_logps_backward(logits, labels, w, o),
        [&](const tensor_d& x) { return contract(w, sequence_logps(x, labels, o).logps); }, logits);
  }
  check_gradient(
      "ld_sequence_logps", ld_sequence_logps_backward(logits, labels, shared, 0.4, w),
      [&](const tensor_d& x) { return contract(w, ld_sequence_logps(x, labels, shared, 0.4).logps); }, logits);
}

}  // namespace test_preference_fd
