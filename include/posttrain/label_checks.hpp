// posttrain/label_checks.hpp — when the label range check reads label values (a host transfer).
//
// Every loss that takes labels checks that each is in [0, V) or ignore_index, and says which are not
// (posttrain::error). That check reads a count back from the labels' device: free for CPU tensors,
// but on CUDA a device-to-host copy that waits for the stream on every call. LibTorch's own
// cross_entropy / gather check on the device instead (an asynchronous device-side assert that
// surfaces at the next synchronisation and leaves the CUDA context unusable).
//   always     (default) check on every device: every bad label is a posttrain::error at the call.
//   host_only  check CPU tensors (no transfer), skip device tensors: zero host transfers per call on
//              a GPU; an out-of-range label there trips LibTorch's device-side assert in the gather.
// Host tensors are always checked (there is no "off"): on the CPU an unchecked label would be an
// out-of-bounds read in the kernels, and the check costs no transfer there.
// A process-wide setting, like at::set_num_threads: set it once when the trainer starts, e.g.
// host_only for GPU training once a first step (or a debug run) has validated the data pipeline.
#pragma once

#include <atomic>
#include <string>
#include <string_view>

namespace posttrain {

enum class label_checks { always, host_only };

namespace detail {
inline std::atomic<label_checks>& label_checks_setting() {
  static std::atomic<label_checks> mode{label_checks::always};
  return mode;
}
}  // namespace detail

/// Sets when label values are range-checked (see the file comment); returns the previous setting.
inline label_checks set_label_checks(label_checks mode) {
  return detail::label_checks_setting().exchange(mode, std::memory_order_relaxed);
}
/// The current setting.
inline label_checks get_label_checks() { return detail::label_checks_setting().load(std::memory_order_relaxed); }

/// "always" or "host_only".
inline std::string_view label_checks_name(label_checks mode) {
  switch (mode) {
    case label_checks::always: return "always";
    case label_checks::host_only: return "host_only";
  }
  return "always";
}

namespace detail {
/// Whether to read label values on `device` under the current setting.
inline bool read_label_values(const std::string& device) {
  switch (get_label_checks()) {
    case label_checks::always: return true;
    case label_checks::host_only: return device.rfind("cpu", 0) == 0;
  }
  return true;
}
}  // namespace detail

}  // namespace posttrain
