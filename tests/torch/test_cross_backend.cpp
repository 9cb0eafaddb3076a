// Cross-backend agreement: every primitive, SFT and the KL estimators on torch float32/float64
// (and bfloat16/float16 inputs where the computation upcasts) and on eigen float32, each compared
// with the Eigen double reference run on the same (rounded) inputs. Values, metrics and the
// analytic gradients.
#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <optional>
#include <string>
#include <vector>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/backends/torch.hpp"
#include "posttrain/check/compare.hpp"
#include "posttrain/data/multi_turn.hpp"
#include "posttrain/data/next_token.hpp"
#include "posttrain/data/pairs.hpp"
#include "posttrain/kl/estimators.hpp"
#include "posttrain/kl/exact.hpp"
#include "posttrain/losses/grpo.hpp"
#include "posttrain/losses/sft.hpp"
#include "posttrain/numerics/aggregate.hpp"
#include "posttrain/numerics/logits.hpp"
#include "posttrain/numerics/masked.hpp"
#include "posttrain/numerics/stable.hpp"
#include "support/data.hpp"
#include "support/tolerances.hpp"
#include "support/torch_data.hpp"

namespace test_cross_backend {  // one namespace per test file: the unity build compiles several in one TU

using namespace posttrain;
using namespace posttrain::test;

namespace {

const std::vector<shape_t> logits_shapes = {{6, 11}, {2, 5, 9}, {1, 1, 3}};
const std::vector<shape_t> token_shapes = {{3, 7}, {13}, {1, 1}};

/// Sets the whole row `row` of a [B, T] mask to 0, so every reduction meets an all-masked row.
host_tensor mask_with_empty_row(const shape_t& s, std::uint64_t seed, std::int64_t row) {
  host_tensor m = random_mask(s, seed);
  if (s.size() == 2 && s[0] > 1)
    for (std::int64_t t = 0; t < s[1]; ++t) m.values[static_cast<std::size_t>(row * s[1] + t)] = 0.0;
  return m;
}

}  // namespace

TEST_CASE("cross-backend: softplus, log_sigmoid, sigmoid, log1mexp", "[numerics][cross]") {
  for (std::uint64_t seed : {1u, 2u}) {
    for (const auto& s : token_shapes) {
      // Wide spread: |x| up to ~40 so both branches of every formula are exercised.
      const host_tensor x = random_normal(s, seed, 12.0);
      host_tensor neg = x;  // log1mexp's domain is x <= 0; keep away from 0 where it is -inf
      for (auto& v : neg.values) v = -std::abs(v) - 1e-3;
      on_every_backend(
          [&](const auto& mk) {
            outputs o;
            o.add("softplus", softplus(mk.values(x)));
            o.add("log_sigmoid", log_sigmoid(mk.values(x)));
            o.add("sigmoid", sigmoid(mk.values(x)));
            o.add("log1mexp", log1mexp(mk.values(neg)));
            return o;
          },
          /*with_half=*/false);  // element-wise in the input dtype: no float32 upcast to compare
    }
  }
}

TEST_CASE("cross-backend: logsumexp, token_logprobs, entropy, softmax and their backwards", "[numerics][cross]") {
  for (std::uint64_t seed : {3u, 4u}) {
    for (const auto& s : logits_shapes) {
      const host_tensor logits = random_normal(s, seed, 3.0);
      shape_t ts(s.begin(), s.end() - 1);
      const host_labels labels = random_labels(ts, s.back(), seed + 10, /*ignore_fraction=*/0.3);
      const host_labels labels7 = random_labels(ts, s.back(), seed + 11, 0.3, /*ignore_index=*/7);
      const host_tensor grad = random_normal(ts, seed + 20);
      on_every_backend([&](const auto& mk) {
        outputs o;
        const auto x = mk.values(logits);
        o.add("logsumexp", logsumexp(x));
        o.add("token_logprobs", token_logprobs(x, mk.labels(labels)));
        o.add("entropy", entropy(x));
        o.add("softmax_last", softmax_last(x));
        o.add("logsumexp_backward", logsumexp_backward(x, mk.values(grad)));
        o.add("token_logprobs_backward", token_logprobs_backward(x, mk.labels(labels), mk.values(grad)));
        o.add("entropy_backward", entropy_backward(x, mk.values(grad)));
        if (s.back() > 7) {  // ignore_index 7 is a real label value only for V > 7: then it must be skipped
          o.add("token_logprobs ignore 7", token_logprobs(x, mk.labels(labels7), 7));
          o.add("token_logprobs_backward ignore 7", token_logprobs_backward(x, mk.labels(labels7), mk.values(grad), 7));
        }
        return o;
      });
    }
  }
}

TEST_CASE("cross-backend: masked sum, mean, var and whiten", "[numerics][masked][cross]") {
  for (std::uint64_t seed : {5u, 6u}) {
    for (const auto& s : token_shapes) {
      const host_tensor x = random_normal(s, seed, 2.0, 0.5);
      const host_tensor m = mask_with_empty_row(s, seed + 1, 0);
      on_every_backend(
          [&](const auto& mk) {
            outputs o;
            const auto xv = mk.values(x), mv = mk.values(m);
            o.add("masked_sum", masked_sum(xv, mv));
            o.add("masked_mean", masked_mean(xv, mv));
            o.add("masked_var unbiased", masked_var(xv, mv));
            o.add("masked_var biased", masked_var(xv, mv, false));
            for (std::int64_t d = 0; d < static_cast<std::int64_t>(s.size()); ++d) {
              const std::string dim = " dim " + std::to_string(d);
              o.add("masked_sum" + dim, masked_sum(xv, mv, d));
              o.add("masked_mean" + dim, masked_mean(xv, mv, d));
              o.add("masked_var" + dim, masked_var(xv, mv, true, d));
              o.add("masked_var biased" + dim, masked_var(xv, mv, false, -1 - d));
            }
            for (bool keep_mean : {false, true})
              for (bool unbiased : {true, false})
                for (double eps : {1e-8, 0.5}) {
                  const std::string name = "masked_whiten keep_mean=" + std::to_string(keep_mean) +
                                           " unbiased=" + std::to_string(unbiased) + " eps=" + std::to_string(eps);
                  o.add(name, masked_whiten(xv, mv, {.keep_mean = keep_mean, .eps = eps, .unbiased = unbiased}));
                }
            return o;
          },
          /*with_half=*/false);  // masked reductions compute in the input dtype
    }
  }
}

TEST_CASE("cross-backend: torch bool and int masks give the float mask's results", "[numerics][masked][cross]") {
  const host_tensor x = random_normal({3, 7}, 8);
  const host_tensor m = mask_with_empty_row({3, 7}, 9, 1);
  const auto ref = masked_whiten(to_eigen<double>(x), to_eigen<double>(m));
  const auto xt = to_torch(x);
  for (auto dt : {at::kBool, at::kInt, at::kLong, at::kFloat}) {
    INFO("mask dtype " << dtype_name(dtype_of(dt)));
    require_agree("masked_whiten", masked_whiten(xt, to_torch(m, dt)), ops::to_host(ref), float64_tol);
    require_agree("masked_mean", masked_mean(xt, to_torch(m, dt), 1),
                  ops::to_host(masked_mean(to_eigen<double>(x), to_eigen<double>(m), 1)), float64_tol);
  }
}

TEST_CASE("cross-backend: aggregate and aggregation_weights in every mode", "[numerics][aggregate][cross]") {
  const aggregation modes[] = {aggregation::token_mean, aggregation::seq_mean_token_sum,
                               aggregation::seq_mean_token_mean, aggregation::seq_mean_token_sum_norm,
                               aggregation::sum};
  for (std::uint64_t seed : {11u, 12u}) {
    for (const auto& s : token_shapes) {
      const host_tensor loss = random_normal(s, seed, 1.5, 1.0);
      const host_tensor m = mask_with_empty_row(s, seed + 1, static_cast<std::int64_t>(s[0]) - 1);
      on_every_backend(
          [&](const auto& mk) {
            outputs o;
            for (auto mode : modes) {
              const bool per_sequence = mode != aggregation::token_mean && mode != aggregation::sum;
              if (per_sequence && s.size() != 2) continue;
              for (std::optional<double> norm : {std::optional<double>{}, std::optional<double>{17.0}}) {
                const std::string name = std::string(aggregation_name(mode)) + (norm ? " normalizer 17" : "");
                o.add("aggregate " + name, aggregate(mk.values(loss), mk.values(m), mode, norm));
                o.add("aggregation_weights " + name, aggregation_weights(mk.values(m), mode, norm));
              }
            }
            return o;
          },
          /*with_half=*/false);
    }
  }
}

TEST_CASE("cross-backend: sft_loss values, metrics and analytic gradient, every option", "[sft][cross]") {
  const aggregation modes[] = {aggregation::token_mean, aggregation::seq_mean_token_sum,
                               aggregation::seq_mean_token_mean, aggregation::seq_mean_token_sum_norm,
                               aggregation::sum};
  struct variant {
    const char* name;
    double label_smoothing, z_loss;
    bool dft;
  };
  const variant variants[] = {{"plain", 0.0, 0.0, false},
                              {"label_smoothing", 0.1, 0.0, false},
                              {"z_loss", 0.0, 1e-3, false},
                              {"dft", 0.0, 0.0, true},
                              {"all three", 0.2, 1e-2, true}};
  for (std::uint64_t seed : {21u, 22u}) {
    for (const auto& s : logits_shapes) {
      const host_tensor logits = random_normal(s, seed, 2.5);
      const host_labels labels = random_labels(shape_t(s.begin(), s.end() - 1), s.back(), seed + 1, 0.25);
      on_every_backend([&](const auto& mk) {
        outputs o;
        const auto x = mk.values(logits);
        const auto y = mk.labels(labels);
        for (auto mode : modes) {
          const bool per_sequence = mode != aggregation::token_mean && mode != aggregation::sum;
          if (per_sequence && s.size() != 3) continue;
          for (const auto& v : variants)
            for (std::optional<double> norm : {std::optional<double>{}, std::optional<double>{9.0}}) {
              const sft_options opt{.label_smoothing = v.label_smoothing,
                                    .z_loss = v.z_loss,
                                    .reduction = mode,
                                    .normalizer = norm,
                                    .dft = v.dft};
              const std::string name =
                  std::string(v.name) + " " + aggregation_name(mode) + (norm ? " normalizer 9" : "");
              const auto r = sft_loss(x, y, opt);
              o.add("loss " + name, r.loss);
              o.add("per_token_loss " + name, r.per_token_loss);
              o.add("num_tokens " + name, r.num_tokens);
              o.add("token_accuracy " + name, r.token_accuracy);
              o.add("entropy " + name, r.entropy);
              o.add("backward " + name, sft_loss_backward(x, y, opt, 0.75));
            }
        }
        return o;
      });
    }
  }
}

TEST_CASE("cross-backend: sft_loss with a custom ignore_index", "[sft][cross]") {
  const host_tensor logits = random_normal({2, 4, 10}, 31, 2.0);
  const host_labels labels = random_labels({2, 4}, 10, 32, 0.4, /*ignore_index=*/3);
  on_every_backend([&](const auto& mk) {
    outputs o;
    const sft_options opt{.ignore_index = 3, .label_smoothing = 0.1};
    const auto r = sft_loss(mk.values(logits), mk.labels(labels), opt);
    o.add("loss", r.loss);
    o.add("num_tokens", r.num_tokens);
    o.add("backward", sft_loss_backward(mk.values(logits), mk.labels(labels), opt));
    return o;
  });
}

TEST_CASE("cross-backend: kl_penalty and kl_penalty_backward, every estimator and guard", "[kl][cross]") {
  const kl_estimator estimators[] = {kl_estimator::k1, kl_estimator::abs, kl_estimator::k2, kl_estimator::k3};
  struct guard {
    const char* name;
    std::optional<double> log_ratio_clamp, value_clamp;
  };
  const guard guards[] = {
      {"no clamp", {}, {}}, {"ratio clamp 0.5", 0.5, {}}, {"value clamp 0.3", {}, 0.3}, {"both", 1.0, 0.4}};
  for (std::uint64_t seed : {41u, 42u}) {
    for (const auto& s : token_shapes) {
      // log-probs of sampled tokens: <= 0, log-ratios of order 1 so the clamps above are active
      host_tensor lp = random_normal(s, seed, 1.5), ref = random_normal(s, seed + 1, 1.5);
      for (auto& v : lp.values) v = -std::abs(v);
      for (auto& v : ref.values) v = -std::abs(v);
      const host_tensor grad = random_normal(s, seed + 2);
      on_every_backend([&](const auto& mk) {
        outputs o;
        for (auto e : estimators)
          for (const auto& g : guards)
            for (bool st : {false, true}) {
              const kl_options opt{e, st, g.log_ratio_clamp, g.value_clamp};
              const std::string name = std::string(kl_estimator_name(e)) + " " + g.name + (st ? " straight" : "");
              o.add("kl_penalty " + name, kl_penalty(mk.values(lp), mk.values(ref), opt));
              o.add("kl_penalty_backward " + name,
                    kl_penalty_backward(mk.values(lp), mk.values(ref), mk.values(grad), opt));
            }
        o.add("verl low_var_kl", kl_penalty(mk.values(lp), mk.values(ref), kl_options::verl_low_var_kl()));
        return o;
      });
    }
  }
}

TEST_CASE("cross-backend: kl_exact and kl_exact_backward", "[kl][cross]") {
  for (std::uint64_t seed : {51u, 52u}) {
    for (const auto& s : logits_shapes) {
      const host_tensor x = random_normal(s, seed, 2.0), y = random_normal(s, seed + 1, 2.0);
      const host_tensor grad = random_normal(shape_t(s.begin(), s.end() - 1), seed + 2);
      on_every_backend([&](const auto& mk) {
        outputs o;
        o.add("kl_exact", kl_exact(mk.values(x), mk.values(y)));
        o.add("kl_exact_backward", kl_exact_backward(mk.values(x), mk.values(y), mk.values(grad)));
        return o;
      });
    }
  }
}

// ---- issue 15: LibTorch <-> Eigen conversion and the batch helpers on LibTorch ----------------------

namespace {
std::vector<double> doubles(const at::Tensor& t) {
  const at::Tensor c = t.detach().to(at::kDouble).contiguous();
  return {c.data_ptr<double>(), c.data_ptr<double>() + c.numel()};
}
std::vector<std::int64_t> longs(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kLong).contiguous();
  return {c.data_ptr<std::int64_t>(), c.data_ptr<std::int64_t>() + c.numel()};
}
}  // namespace

TEST_CASE("to_eigen / to_torch: every dtype and any strides, both ways", "[convert]") {
  // Values exactly representable in every dtype below (bfloat16 has 8 significant bits).
  const auto base = torch::tensor({1.0, -2.5, 0.75, 3.0, 0.0, -1.0}, torch::kDouble).reshape({2, 3});
  const std::vector<double> want = {1.0, -2.5, 0.75, 3.0, 0.0, -1.0};
  for (auto dt : {at::kDouble, at::kFloat, at::kHalf, at::kBFloat16}) {
    INFO(c10::toString(dt));
    const auto e = to_eigen<double>(base.to(dt));
    CHECK(e.shape() == shape_t{2, 3});
    CHECK(std::vector<double>(e.data(), e.data() + 6) == want);
    const auto f = to_eigen<float>(base.to(dt));
    CHECK(std::vector<double>(f.data(), f.data() + 6) == want);
  }
  // A transposed (non-contiguous) view and a strided slice read in logical row-major order.
  const auto t = base.t();  // [3, 2]: 1, 3, -2.5, 0, 0.75, -1
  const auto et = to_eigen<double>(t);
  CHECK(et.shape() == shape_t{3, 2});
  CHECK(std::vector<double>(et.data(), et.data() + 6) == std::vector<double>{1.0, 3.0, -2.5, 0.0, 0.75, -1.0});
  const auto every_other = to_eigen<double>(base.reshape({6}).slice(0, 0, 6, 2));  // 1, 0.75, 0
  CHECK(std::vector<double>(every_other.data(), every_other.data() + 3) == std::vector<double>{1.0, 0.75, 0.0});
  // Integer and bool tensors: as values and as ids.
  const auto ids = to_eigen_index(torch::tensor({3, 0, 255}, torch::kLong).to(at::kByte));
  CHECK(std::vector<std::int64_t>(ids.data(), ids.data() + 3) == std::vector<std::int64_t>{3, 0, 255});
  const auto flags = to_eigen<double>(torch::tensor({1, 0, 1}, torch::kLong).to(at::kBool));
  CHECK(std::vector<double>(flags.data(), flags.data() + 3) == std::vector<double>{1.0, 0.0, 1.0});
  CHECK(longs(to_torch(to_eigen_index(torch::tensor({-100, 7}, torch::kInt)))) == std::vector<std::int64_t>{-100, 7});

  // Back: the dtype follows the Eigen scalar unless options name one; values and shape survive.
  const eigen_tensor<double> d({2, 2}, {0.1, -0.2, 0.3, 1e-300});
  const auto back = to_torch(d);
  CHECK(back.scalar_type() == at::kDouble);
  CHECK(back.sizes().vec() == std::vector<std::int64_t>{2, 2});
  CHECK(doubles(back) == std::vector<double>{0.1, -0.2, 0.3, 1e-300});
  CHECK(to_torch(eigen_tensor<float>({1}, {0.5f})).scalar_type() == at::kFloat);
  CHECK(to_torch(d, at::TensorOptions().dtype(at::kFloat)).scalar_type() == at::kFloat);
  // Round trip of a random double tensor: bit for bit.
  const auto r = torch::randn({3, 4, 5}, torch::kDouble);
  CHECK(torch::equal(to_torch(to_eigen<double>(r)), r));

  CHECK_THROWS_WITH(to_eigen<double>(at::Tensor()),
                    Catch::Matchers::Contains("to_eigen") && Catch::Matchers::Contains("undefined"));
  CHECK_THROWS_WITH(to_eigen<double>(torch::empty({2}, torch::TensorOptions().device(at::kMeta))),
                    Catch::Matchers::Contains("meta"));
  CHECK_THROWS_WITH(to_eigen<double>(torch::zeros({2}, torch::kComplexFloat)), Catch::Matchers::Contains("dtype"));
  CHECK_THROWS_WITH(to_eigen_index(torch::zeros({2})),
                    Catch::Matchers::Contains("to_eigen_index") && Catch::Matchers::Contains("integer"));
}

TEST_CASE("batch helpers on LibTorch: label shift, completion mask, pairs, multi-turn mask", "[helpers]") {
  const auto labels = torch::tensor({-100, 7, 8, 9, 1, 2, -100, -100}, torch::kLong).reshape({2, 4});
  CHECK(longs(shift_labels(labels)) == std::vector<std::int64_t>{7, 8, 9, -100, 2, -100, -100, -100});
  CHECK(shift_labels(labels.to(at::kInt)).scalar_type() == at::kInt);

  const auto ids = torch::tensor({4, 2, 9, 2, 4, 4, 4, 4}, torch::kLong).reshape({2, 4});
  const auto mask = completion_mask(ids, 2, torch::zeros({1}));
  CHECK(mask.scalar_type() == at::kFloat);
  CHECK(doubles(mask) == std::vector<double>{1, 1, 0, 0, 1, 1, 1, 1});

  const auto chosen = torch::tensor({1, 2, 3, 4, 5, 6}, torch::kLong).reshape({2, 3});
  const auto rejected = torch::tensor({7, 8, 9, 10}, torch::kLong).reshape({2, 2});
  const auto both = concat_pairs(chosen, rejected, 0.0);
  CHECK(both.scalar_type() == at::kLong);
  CHECK(longs(both) == std::vector<std::int64_t>{1, 2, 3, 4, 5, 6, 7, 8, 0, 9, 10, 0});
  const auto halves = split_pairs(torch::tensor({-1.0, -2.0, -3.0, -4.0}));
  CHECK(doubles(halves.chosen) == std::vector<double>{-1, -2});
  CHECK(doubles(halves.rejected) == std::vector<double>{-3, -4});

  // A two-turn episode: assistant 2 tokens, calculator reply 2 tokens, assistant 1 token. Autograd
  // through GRPO gives the calculator's tokens exactly zero gradient.
  const auto like = torch::zeros({1}, torch::kDouble);
  const auto turns = multi_turn_mask(like, {{{2, true}, {2, false}, {1, true}}, {{1, true}, {3, false}, {1, true}}}, 5);
  CHECK(doubles(turns) == std::vector<double>{1, 1, 0, 0, 1, 1, 0, 0, 0, 1});
  auto logprobs = torch::tensor({-0.5, -1.0, -0.2, -0.7, -0.3, -0.4, -0.9, -1.1, -0.6, -0.8}, torch::kDouble)
                      .reshape({2, 5})
                      .requires_grad_(true);
  grpo_batch<at::Tensor> batch{logprobs, torch::tensor({1.0, -0.5}, torch::kDouble), turns};
  batch.old_logprobs =
      torch::tensor({-0.6, -1.0, 0.0, 0.0, -0.2, -0.4, 0.0, 0.0, 0.0, -0.7}, torch::kDouble).reshape({2, 5});
  grpo_loss(batch).loss.backward();
  const auto g = doubles(logprobs.grad());
  const auto m = doubles(turns);
  for (std::size_t k = 0; k < g.size(); ++k) {
    INFO("position " << k);
    if (m[k] == 0.0)
      CHECK(g[k] == 0.0);
    else
      CHECK(g[k] != 0.0);
  }
  const auto roles = torch::tensor({0, 1, 1, 2, 1}, torch::kLong).to(at::kByte);
  CHECK(doubles(role_mask(roles, 1, like)) == std::vector<double>{0, 1, 1, 0, 1});
}

}  // namespace test_cross_backend
