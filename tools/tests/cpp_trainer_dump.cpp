// A C++ trainer's dump (issue 16): a hand-written DPO step in float32, as a C++ trainer would compute it, written
// with posttrain/io/safetensors.hpp. The ctest "verify: C++ trainer dump" then checks it with posttrain-verify.
// The formulas are TRL dpo_loss's sigmoid type, written out here with <cmath> (no posttrain loss is called).
//   usage: posttrain_cpp_trainer_dump OUT.safetensors [--wrong]   (--wrong: losses[1] off by 1e-3)
#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <vector>

#include "posttrain/io/safetensors.hpp"

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s OUT.safetensors [--wrong]\n", argv[0]);
    return 2;
  }
  const float beta = 0.1f;
  const std::vector<float> chosen = {-12.5f, -30.25f, -7.0f, -41.0f};
  const std::vector<float> rejected = {-14.0f, -29.0f, -19.5f, -40.0f};
  const std::vector<float> ref_chosen = {-13.0f, -31.0f, -8.25f, -40.5f};
  const std::vector<float> ref_rejected = {-13.5f, -28.5f, -18.0f, -41.5f};
  const std::size_t n = chosen.size();
  std::vector<double> losses(n), grad_c(n), grad_r(n), c(n), r(n), rc(n), rr(n);
  double loss = 0;
  for (std::size_t i = 0; i < n; ++i) {
    // h = (chosen - ref_chosen) - (rejected - ref_rejected); loss_i = -log sigmoid(beta h) = log1p(exp(-beta h))
    const float h = (chosen[i] - ref_chosen[i]) - (rejected[i] - ref_rejected[i]);
    const float x = beta * h;
    losses[i] = x > 0 ? std::log1p(std::exp(-x)) : -x + std::log1p(std::exp(x));
    // d loss / d chosen_i = -beta sigmoid(-x) / n; d / d rejected_i = +beta sigmoid(-x) / n
    const float s = 1.0f / (1.0f + std::exp(x));
    grad_c[i] = -beta * s / static_cast<float>(n);
    grad_r[i] = beta * s / static_cast<float>(n);
    loss += losses[i] / static_cast<double>(n);
    c[i] = chosen[i], r[i] = rejected[i], rc[i] = ref_chosen[i], rr[i] = ref_rejected[i];
  }
  if (argc > 2 && std::strcmp(argv[2], "--wrong") == 0) losses[1] += 1e-3;
  try {
    using posttrain::io::safetensor;
    using posttrain::io::st_dtype;
    const std::vector<std::int64_t> shape = {static_cast<std::int64_t>(n)};
    posttrain::io::safetensors_file f;
    f.metadata["writer"] = "tools/tests/cpp_trainer_dump.cpp";
    f.add(safetensor::from_doubles("chosen_logps", st_dtype::f32, shape, c));
    f.add(safetensor::from_doubles("rejected_logps", st_dtype::f32, shape, r));
    f.add(safetensor::from_doubles("ref_chosen_logps", st_dtype::f32, shape, rc));
    f.add(safetensor::from_doubles("ref_rejected_logps", st_dtype::f32, shape, rr));
    f.add(safetensor::from_doubles("losses", st_dtype::f32, shape, losses));
    f.add(safetensor::from_doubles("loss", st_dtype::f32, {}, std::vector<double>{loss}));
    f.add(safetensor::from_doubles("chosen_logps.grad", st_dtype::f32, shape, grad_c));
    f.add(safetensor::from_doubles("rejected_logps.grad", st_dtype::f32, shape, grad_r));
    posttrain::io::write_safetensors(argv[1], f);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}
