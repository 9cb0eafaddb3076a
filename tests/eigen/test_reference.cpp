// Eigen double vs golden values computed by PyTorch (tests/reference/make_golden.py, checked in as
// tests/reference/golden.hpp): F.cross_entropy with ignore_index / label_smoothing / reduction,
// autograd gradients, Categorical entropy, F.kl_div, and verl's kl_penalty formulas.
#include <catch2/catch.hpp>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/posttrain.hpp"
#include "reference/golden.hpp"
#include "support/tolerances.hpp"

namespace test_reference {  // one namespace per test file: the unity build compiles several in one TU

using namespace posttrain;
namespace g = posttrain::golden;

namespace {
using tensor_d = eigen_tensor<double>;

void check_all(const std::vector<double>& got, const std::vector<double>& want) {
  const auto r = check::compare_values(got, want, test::float64_tol.atol, test::float64_tol.rtol);
  INFO(r.str());
  CHECK(r.ok);
}
void check_one(double got, double want) { check_all({got}, {want}); }

struct sft_case {
  const char* name;
  sft_options options;
  double loss;
  const std::vector<double>* grad;
};
}  // namespace

TEST_CASE("SFT matches PyTorch's cross_entropy (golden, float64)", "[reference][sft]") {
  const tensor_d logits(g::sft_logits_shape, g::sft_logits);
  const eigen_index labels(g::sft_labels_shape, g::sft_labels);
  const sft_case cases[] = {
      {"mean", {}, g::sft_mean, &g::sft_mean_grad},
      {"sum", {.reduction = aggregation::sum}, g::sft_sum, &g::sft_sum_grad},
      {"label smoothing 0.1", {.label_smoothing = 0.1}, g::sft_smooth, &g::sft_smooth_grad},
      {"z-loss 1e-2", {.z_loss = 1e-2}, g::sft_zloss, &g::sft_zloss_grad},
      {"dft", {.dft = true}, g::sft_dft, &g::sft_dft_grad},
      {"seq-mean-token-mean",
       {.reduction = aggregation::seq_mean_token_mean},
       g::sft_seq_mean_token_mean,
       &g::sft_seq_mean_token_mean_grad},
  };
  for (const auto& c : cases) {
    SECTION(c.name) {
      const auto r = sft_loss(logits, labels, c.options);
      check_one(ops::item(r.loss), c.loss);
      check_all(ops::to_host(sft_loss_backward(logits, labels, c.options)), *c.grad);
      check_one(ops::item(r.token_accuracy), g::sft_token_accuracy);
      check_one(ops::item(r.entropy), g::sft_mean_entropy);
    }
  }
}

TEST_CASE("entropy matches torch.distributions.Categorical (golden, float64)", "[reference][numerics]") {
  const tensor_d logits(g::sft_logits_shape, g::sft_logits);
  check_all(ops::to_host(entropy(logits)), g::entropy_per_token);
}

TEST_CASE("KL estimators match verl's kl_penalty formulas (golden, float64)", "[reference][kl]") {
  const tensor_d lp(g::kl_logprobs_shape, g::kl_logprobs), ref(g::kl_ref_shape, g::kl_ref);
  check_all(ops::to_host(kl_penalty(lp, ref, {.estimator = kl_estimator::k1})), g::kl_k1);
  check_all(ops::to_host(kl_penalty(lp, ref, {.estimator = kl_estimator::abs})), g::kl_abs);
  check_all(ops::to_host(kl_penalty(lp, ref, {.estimator = kl_estimator::k2})), g::kl_k2);
  check_all(ops::to_host(kl_penalty(lp, ref, {.estimator = kl_estimator::k3})), g::kl_k3);
  check_all(ops::to_host(kl_penalty(lp, ref, kl_options::verl_low_var_kl())), g::kl_k3_verl);
}

TEST_CASE("exact KL matches F.kl_div and its autograd gradient (golden, float64)", "[reference][kl]") {
  const tensor_d p(g::exact_logits_shape, g::exact_logits), q(g::exact_ref_logits_shape, g::exact_ref_logits);
  check_all(ops::to_host(kl_exact(p, q)), g::exact_kl);
  check_all(ops::to_host(kl_exact_backward(p, q, ops::full(p, shape_t{4}, 1.0))), g::exact_kl_grad);
}

}  // namespace test_reference
