// Host transfers per call (issue 14 item 4), counted with the recording backend
// (tests/support/recording.hpp): every read of tensor values into host memory is a traits call
// (to_host, index_to_host, index_count_outside), so their count is the number of device-to-host
// copies the same call makes on a GPU. A recorder whose tensors report the device "cuda:0" stands for
// GPU tensors. sft_loss and token_logprobs read one count (the label range check) under the default
// label_checks::always and none under label_checks::host_only; dpo, grpo_loss and ppo_policy_loss read
// none. Host tensors are checked under both settings.
#include <catch2/catch.hpp>
#include <string>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/label_checks.hpp"
#include "posttrain/posttrain.hpp"
#include "support/eigen_checks.hpp"
#include "support/linear_eigen.hpp"
#include "support/recording.hpp"

namespace recording {
/// Tensors that say they live on a GPU.
struct device_recorder {
  posttrain::eigen_tensor<double> value;
};
}  // namespace recording

namespace posttrain {
template <>
struct tensor_traits<recording::device_recorder> : recording_traits<recording::device_recorder> {
  static std::string device(const recording::device_recorder&) { return note("device"), "cuda:0"; }
  static std::string index_device(const eigen_index&) { return note("index_device"), "cuda:0"; }
};

}  // namespace posttrain

namespace test_host_transfers {  // one namespace per test file: the unity build compiles several in one TU

using namespace posttrain;
using recording::device_recorder;
using test::expect_error;
using test::make;

namespace {
/// Restores the label-check setting when a test ends.
struct label_checks_guard {
  label_checks before = get_label_checks();
  ~label_checks_guard() { set_label_checks(before); }
};

int host_transfers() {
  return recording::count("to_host") + recording::count("index_to_host") + recording::count("index_count_outside");
}

device_recorder rec(const shape_t& s, std::vector<double> v) { return {make(s, std::move(v))}; }

/// Runs f with the counters reset and returns the host transfers it made.
template <class F>
int transfers_of(F&& f) {
  recording::reset();
  f();
  return host_transfers();
}
}  // namespace

TEST_CASE("host transfers: label range checks follow label_checks; dpo, grpo and ppo read nothing back",
          "[transfers]") {
  label_checks_guard guard;
  REQUIRE(get_label_checks() == label_checks::always);  // the documented default
  const auto logits = rec({2, 3}, {0.1, 0.2, 0.3, 1.0, -1.0, 0.5});
  const eigen_index labels({2}, {2, -100});

  // always: the one count of out-of-range labels (one device-to-host copy on a GPU).
  CHECK(transfers_of([&] { (void)sft_loss(logits, labels); }) == 1);
  CHECK(transfers_of([&] { (void)token_logprobs(logits, labels); }) == 1);

  CHECK(set_label_checks(label_checks::host_only) == label_checks::always);
  CHECK(label_checks_name(get_label_checks()) == "host_only");
  CHECK(transfers_of([&] { (void)sft_loss(logits, labels); }) == 0);
  CHECK(transfers_of([&] { (void)token_logprobs(logits, labels); }) == 0);
  CHECK(transfers_of([&] { (void)token_logprobs_and_entropy(logits, labels); }) == 0);

  // Losses without labels: none under either setting.
  for (const auto mode : {label_checks::always, label_checks::host_only}) {
    set_label_checks(mode);
    preference_batch<device_recorder> pairs{rec({2}, {-1.0, -2.0}), rec({2}, {-3.0, -1.5})};
    pairs.ref_chosen_logps = rec({2}, {-1.5, -2.5});
    pairs.ref_rejected_logps = rec({2}, {-2.0, -1.0});
    CHECK(transfers_of([&] { (void)dpo(pairs); }) == 0);

    const auto lp = rec({2, 3}, {-1.0, -0.5, -2.0, -0.3, -1.2, -0.8});
    const auto old_lp = rec({2, 3}, {-1.1, -0.4, -2.0, -0.2, -1.0, -0.9});
    const auto mask = rec({2, 3}, {1, 1, 1, 1, 1, 0});
    grpo_batch<device_recorder> rl{lp, rec({2}, {0.7, -0.4}), mask};
    rl.old_logprobs = old_lp;
    CHECK(transfers_of([&] { (void)grpo_loss(rl); }) == 0);
    CHECK(transfers_of([&] {
            (void)ppo_policy_loss(lp, old_lp, rec({2, 3}, {0.5, 0.5, 0.5, -1, -1, -1}), mask);
          }) == 0);
  }
}

TEST_CASE("host transfers: host tensors keep their label range check under host_only", "[transfers]") {
  label_checks_guard guard;
  set_label_checks(label_checks::host_only);
  const auto logits = make({2, 3}, {0.1, 0.2, 0.3, 1.0, -1.0, 0.5});
  expect_error(
      [&] {
        (void)sft_loss(logits, eigen_index({2}, {3, 0}));
      },
      "sft_loss", {"labels has 1 value(s) outside [0, 3)"});
  expect_error([&] { (void)token_logprobs(logits, eigen_index({2}, {0, -5})); }, "token_logprobs", {"outside [0, 3)"});
  // ... and the device recorder skips it (LibTorch's device-side assert is the check there).
  CHECK_NOTHROW(sft_loss(rec({2, 3}, {0.1, 0.2, 0.3, 1.0, -1.0, 0.5}), eigen_index({2}, {1, 0})));
}

}  // namespace test_host_transfers
