// fuzz/fuzz_preference.cpp — the preference losses on the Eigen backend, float and double: dpo (every
// loss type, mixtures, f-divergences, WPO weights, reference-free), cpo/simpo, orpo, kto, bco and the
// Bradley-Terry reward model loss, each with its backward.
// Invariants (fuzz_support.hpp): only posttrain::error; forward and backward accept the same inputs;
// a finite loss has finite gradients; the analytic backward matches finite differences in double
// on moderate inputs (where the loss is smooth at the point).
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "fuzz_support.hpp"
#include "posttrain/losses/cpo.hpp"
#include "posttrain/losses/dpo.hpp"
#include "posttrain/losses/kto.hpp"
#include "posttrain/losses/orpo.hpp"
#include "posttrain/losses/reward_model.hpp"

using namespace posttrain;
using namespace posttrain::fuzz;

namespace {

template <class S>
bool moderate(const decoder& d, std::initializer_list<const tensor_t<S>*> xs) {
  if (!std::is_same_v<S, double> || d.wide()) return false;
  for (const auto* x : xs)
    if (!all_finite(*x) || max_abs(*x) > 30) return false;
  return true;
}

/// Forward and backward accept the same inputs, and a finite loss has finite gradients; with `fd`,
/// finite differences of the loss in each differentiable input against the analytic gradients.
template <class S, class Forward, class Backward>
void check_pair(const char* name, decoder& d, Forward&& forward, Backward&& backward, const std::string& inputs) {
  tensor_t<S> loss;
  std::vector<tensor_t<S>> grads;
  const bool fwd = call(name, [&] { loss = forward(); });
  const bool bwd = call(name, [&] { grads = backward(); });
  if (fwd != bwd)
    finding(std::string(name) + ": the forward " + (fwd ? "accepted" : "rejected") + " what the backward " +
            (bwd ? "accepted" : "rejected") + "\n  inputs: " + inputs);
  if (!fwd) return;
  for (const auto& g : grads) require_finite_gradient(name, loss, g, inputs);
  (void)d;
}

template <class S>
void run_dpo(decoder& d) {
  using T = tensor_t<S>;
  const std::int64_t b = d.range(0, 5);
  const double sc = d.scale();
  preference_batch<T> batch{d.values<S>({b}, sc), d.values<S>({b}, sc)};
  dpo_options o;
  o.beta = d.pick({0.1, 0.1, 0.5, 1.0, 1e-3, 10.0, 0.0, -1.0, qnan});
  const auto losses = {dpo_loss::sigmoid,  dpo_loss::hinge,    dpo_loss::ipo,         dpo_loss::exo_pair,
                       dpo_loss::nca_pair, dpo_loss::robust,   dpo_loss::bco_pair,    dpo_loss::sppo_hard,
                       dpo_loss::apo_zero, dpo_loss::apo_down, dpo_loss::discopop,    dpo_loss::sigmoid_norm,
                       dpo_loss::sft,      dpo_loss::aot,      dpo_loss::aot_unpaired};
  o.loss = d.pick(losses);
  if (d.byte() < 48) {
    const auto n = d.range(0, 3);
    for (std::int64_t k = 0; k < n; ++k) o.mix.push_back({d.pick(losses), d.pick({1.0, 0.5, -1.0, 2.0, qnan})});
  }
  o.label_smoothing = d.pick({0.0, 0.0, 1e-3, 0.1, 0.3, 0.5, 0.6, -0.1});
  o.ipo_sum = d.flag();
  o.discopop_tau = d.pick({0.05, 1.0, 1e-3, 0.0});
  o.divergence = d.pick({f_divergence::reverse_kl, f_divergence::reverse_kl, f_divergence::forward_kl,
                         f_divergence::js_divergence, f_divergence::alpha_divergence});
  o.alpha = d.pick({0.5, 0.0, 1.0, 2.0, -1.0, 0.9999999});
  o.reference_free = d.byte() < 40;
  if (!o.reference_free || d.flag()) {
    batch.ref_chosen_logps = d.values<S>({b}, sc);
    batch.ref_rejected_logps = d.values<S>({b}, sc);
  }
  if (d.flag()) {
    batch.chosen_lengths = d.values<S>({b}, 0.0);
    for (std::int64_t i = 0; i < b; ++i) batch.chosen_lengths->data()[i] = S(d.range(0, 20));
    batch.rejected_lengths = *batch.chosen_lengths;
    for (std::int64_t i = 0; i < b; ++i) batch.rejected_lengths->data()[i] = S(d.range(0, 20));
  }
  if (d.byte() < 40) {
    batch.chosen_weights = d.values<S>({b}, 1.0);
    batch.rejected_weights = d.values<S>({b}, 1.0);
  }
  const double grad_loss = d.pick({1.0, 1.0, -0.5, 0.0});
  std::string mix;
  for (const auto& term : o.mix)
    mix += std::string(dpo_loss_name(term.loss)) + " x " + std::to_string(term.weight) + ", ";
  const std::string inputs =
      "dpo loss " + std::string(dpo_loss_name(o.loss)) + " (mix: " + mix + ") reference_free " +
      std::to_string(o.reference_free) + " ipo_sum " + std::to_string(o.ipo_sum) + " tau " +
      std::to_string(o.discopop_tau) + " wpo " + std::to_string(batch.chosen_weights.has_value()) + " chosen " +
      describe(batch.chosen_logps) + " rejected " + describe(batch.rejected_logps) +
      (batch.ref_chosen_logps
           ? " ref_chosen " + describe(*batch.ref_chosen_logps) + " ref_rejected " + describe(*batch.ref_rejected_logps)
           : std::string()) +
      " beta " + std::to_string(o.beta) + " eps " + std::to_string(o.label_smoothing) + " divergence " +
      std::to_string(static_cast<int>(o.divergence)) + " alpha " + std::to_string(o.alpha) + " lengths " +
      (batch.chosen_lengths ? describe(*batch.chosen_lengths) + " / " + describe(*batch.rejected_lengths)
                            : std::string("none"));
  check_pair<S>(
      "dpo / dpo_backward", d, [&] { return dpo(batch, o).loss; },
      [&] {
        auto g = dpo_backward(batch, o, grad_loss);
        return std::vector<T>{g.chosen_logps, g.rejected_logps};
      },
      inputs);
  if constexpr (std::is_same_v<S, double>) {
    std::vector<const T*> xs{&batch.chosen_logps, &batch.rejected_logps};
    bool ok = moderate<S>(d, {&batch.chosen_logps, &batch.rejected_logps});
    // AOT sorts ℓ_c - ℓ_r (paired) or each side (unpaired) before pairing the sorted values with the
    // reference's: where two of the sorted entries tie, a step up and a step down move the coordinate to
    // different slots, the loss has a kink there and the analytic gradient is one of its one-sided slopes
    // (fuzz/findings of 2026-12-02: three tied ℓ_c - ℓ_r, slopes 20% apart, inside the smoothness band).
    const auto uses = [&](dpo_loss l) {
      if (o.loss == l) return true;
      for (const auto& term : o.mix)
        if (term.loss == l) return true;
      return false;
    };
    const auto has_tie = [](const std::vector<double>& v) {
      for (std::size_t i = 0; i < v.size(); ++i)
        for (std::size_t j = i + 1; j < v.size(); ++j)
          if (std::abs(v[i] - v[j]) <= 1e-4 * (1 + std::abs(v[i]) + std::abs(v[j]))) return true;
      return false;
    };
    std::vector<double> chosen_v, rejected_v, diff_v;
    for (std::int64_t i = 0; i < b; ++i) {
      chosen_v.push_back(batch.chosen_logps.data()[i]);
      rejected_v.push_back(batch.rejected_logps.data()[i]);
      diff_v.push_back(chosen_v.back() - rejected_v.back());
    }
    if (uses(dpo_loss::aot) && has_tie(diff_v)) ok = false;
    if (uses(dpo_loss::aot_unpaired) && (has_tie(chosen_v) || has_tie(rejected_v))) ok = false;
    if (batch.ref_chosen_logps) ok = ok && moderate<S>(d, {&*batch.ref_chosen_logps, &*batch.ref_rejected_logps});
    if (batch.chosen_weights) ok = ok && moderate<S>(d, {&*batch.chosen_weights, &*batch.rejected_weights});
    dpo_gradients<T> g;
    if (ok && b > 0 && call("dpo_backward", [&] { g = dpo_backward(batch, o, grad_loss); })) {
      auto b2 = batch;
      check_finite_differences(
          "dpo_backward d/d chosen_logps: " + inputs,
          [&](const T& p) {
            b2.chosen_logps = p;
            return grad_loss * item(dpo(b2, o).loss);
          },
          batch.chosen_logps, g.chosen_logps, d, 2);
      b2 = batch;
      check_finite_differences(
          "dpo_backward d/d rejected_logps: " + inputs,
          [&](const T& p) {
            b2.rejected_logps = p;
            return grad_loss * item(dpo(b2, o).loss);
          },
          batch.rejected_logps, g.rejected_logps, d, 2);
    }
  }
}

template <class S>
void run_cpo_orpo(decoder& d) {
  using T = tensor_t<S>;
  const std::int64_t b = d.range(0, 5);
  const double sc = d.scale();
  // sequence log-probs are <= 0 in practice; the fuzzer also gives positive ones
  cpo_batch<T> batch{d.values<S>({b}, sc), d.values<S>({b}, sc), T({b}, S(1)), T({b}, S(1))};
  for (std::int64_t i = 0; i < b; ++i) {
    batch.chosen_lengths.data()[i] = S(d.range(0, 12));
    batch.rejected_lengths.data()[i] = S(d.range(0, 12));
  }
  cpo_options o;
  o.beta = d.pick({0.1, 2.0, 1e-3, 0.0, -1.0});
  o.loss = d.pick({cpo_loss::sigmoid, cpo_loss::hinge, cpo_loss::ipo, cpo_loss::simpo});
  o.label_smoothing = d.pick({0.0, 0.1, 0.5, -0.1});
  o.simpo_gamma = d.pick({0.5, 0.0, 1.0, -1.0});
  o.cpo_alpha = d.pick({1.0, 0.0, 0.5});
  o.alpha = d.pick({0.0, 0.5, 1.0});
  const double grad_loss = d.pick({1.0, -0.5});
  const std::string inputs = "cpo/orpo chosen " + describe(batch.chosen_logps) + " rejected " +
                             describe(batch.rejected_logps) + " lengths " + describe(batch.chosen_lengths) + " / " +
                             describe(batch.rejected_lengths) + " loss " + std::to_string(static_cast<int>(o.loss)) +
                             " beta " + std::to_string(o.beta);
  auto grads = [](const dpo_gradients<T>& g) { return std::vector<T>{g.chosen_logps, g.rejected_logps}; };
  check_pair<S>(
      "cpo / cpo_backward", d, [&] { return cpo(batch, o).loss; },
      [&] { return grads(cpo_backward(batch, o, grad_loss)); }, inputs);
  const orpo_options oo{.beta = o.beta};
  check_pair<S>(
      "orpo / orpo_backward", d, [&] { return orpo(batch, oo).loss; },
      [&] { return grads(orpo_backward(batch, oo, grad_loss)); }, inputs);
  if constexpr (std::is_same_v<S, double>) {
    if (b > 0 && moderate<S>(d, {&batch.chosen_logps, &batch.rejected_logps})) {
      dpo_gradients<T> g;
      if (call("cpo_backward", [&] { g = cpo_backward(batch, o, grad_loss); })) {
        auto b2 = batch;
        check_finite_differences(
            "cpo_backward d/d chosen_logps: " + inputs,
            [&](const T& p) {
              b2.chosen_logps = p;
              return grad_loss * item(cpo(b2, o).loss);
            },
            batch.chosen_logps, g.chosen_logps, d, 2);
      }
      if (call("orpo_backward", [&] { g = orpo_backward(batch, oo, grad_loss); })) {
        auto b2 = batch;
        check_finite_differences(
            "orpo_backward d/d rejected_logps: " + inputs,
            [&](const T& p) {
              b2.rejected_logps = p;
              return grad_loss * item(orpo(b2, oo).loss);
            },
            batch.rejected_logps, g.rejected_logps, d, 2);
      }
    }
  }
}

template <class S>
void run_unpaired(decoder& d) {
  using T = tensor_t<S>;
  const std::int64_t n = d.range(0, 6);
  const double sc = d.scale();
  unpaired_batch<T> batch{d.values<S>({n}, sc), d.values<S>({n}, sc), d.mask<S>({n})};
  if (d.flag()) {
    const std::int64_t m = d.range(0, 4);
    batch.kl_logps = d.values<S>({m}, sc);
    batch.ref_kl_logps = d.values<S>({m}, sc);
  }
  kto_options ko;
  ko.beta = d.pick({0.1, 1.0, 0.0, -1.0});
  ko.loss = d.pick({kto_loss::kto, kto_loss::apo_zero_unpaired});
  ko.desirable_weight = d.pick({1.0, 1.33, 0.0, -1.0});
  ko.undesirable_weight = d.pick({1.0, 0.5});
  bco_options bo;
  bo.beta = d.pick({0.1, 1.0, 0.0});
  bo.delta = d.pick({0.0, 0.3, -2.0, qnan});
  const double grad_loss = d.pick({1.0, 2.0});
  const std::string inputs =
      "kto/bco logps " + describe(batch.logps) + " ref " + describe(batch.ref_logps) + " desirable " +
      describe(batch.desirable) +
      (batch.kl_logps ? " kl " + describe(*batch.kl_logps) + " ref_kl " + describe(*batch.ref_kl_logps)
                      : std::string());
  check_pair<S>(
      "kto / kto_backward", d, [&] { return kto(batch, ko).loss; },
      [&] { return std::vector<T>{kto_backward(batch, ko, grad_loss)}; }, inputs);
  check_pair<S>(
      "bco / bco_backward", d, [&] { return bco(batch, bo).loss; },
      [&] { return std::vector<T>{bco_backward(batch, bo, grad_loss)}; }, inputs);
  if constexpr (std::is_same_v<S, double>) {
    T g;
    if (n > 0 && moderate<S>(d, {&batch.logps, &batch.ref_logps}) &&
        call("kto_backward", [&] { g = kto_backward(batch, ko, grad_loss); })) {
      auto b2 = batch;
      check_finite_differences(
          "kto_backward: " + inputs,
          [&](const T& p) {
            b2.logps = p;
            return grad_loss * item(kto(b2, ko).loss);
          },
          batch.logps, g, d, 2);
    }
  }
}

template <class S>
void run_reward_model(decoder& d) {
  using T = tensor_t<S>;
  const std::int64_t b = d.range(0, 6);
  const double sc = d.scale();
  const T rc = d.values<S>({b}, sc), rr = d.values<S>({b}, sc);
  const T ranked = d.values<S>({b, d.range(0, 4)}, sc);  // [B, K] for Plackett-Luce
  reward_model_options<T> o;
  if (d.flag()) o.margin = d.values<S>({b}, 1.0);
  o.center_rewards_coefficient = d.pick({0.0, 0.01, 1.0, -1.0});
  const double grad_loss = d.pick({1.0, 3.0});
  const std::string inputs = "reward model chosen " + describe(rc) + " rejected " + describe(rr);
  check_pair<S>(
      "reward_model_loss / backward", d, [&] { return reward_model_loss(rc, rr, o).loss; },
      [&] {
        auto g = reward_model_loss_backward(rc, rr, o, grad_loss);
        return std::vector<T>{g.rewards_chosen, g.rewards_rejected};
      },
      inputs);
  check_pair<S>(
      "plackett_luce_loss / backward", d, [&] { return plackett_luce_loss(ranked); },
      [&] { return std::vector<T>{plackett_luce_loss_backward(ranked, grad_loss)}; }, inputs);
  if constexpr (std::is_same_v<S, double>) {
    reward_model_gradients<T> g;
    if (b > 0 && moderate<S>(d, {&rc, &rr}) &&
        call("reward_model_loss_backward", [&] { g = reward_model_loss_backward(rc, rr, o, grad_loss); }))
      check_finite_differences(
          "reward_model_loss_backward: " + inputs,
          [&](const T& p) { return grad_loss * item(reward_model_loss(p, rr, o).loss); }, rc, g.rewards_chosen, d, 2);
  }
}

template <class S>
void run(decoder& d) {
  d.set_wide(d.flag());
  switch (d.range(0, 3)) {
    case 0: run_dpo<S>(d); break;
    case 1: run_cpo_orpo<S>(d); break;
    case 2: run_unpaired<S>(d); break;
    default: run_reward_model<S>(d); break;
  }
}

}  // namespace

POSTTRAIN_FUZZ_ENTRY_POINT(run)
