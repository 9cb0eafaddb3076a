// posttrain/error.hpp — the one exception type every public entry point throws.
#pragma once

#include <cmath>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace posttrain {

/// Thrown for every invalid input: the message names the function, the argument and the
/// offending shapes or values, e.g. `posttrain::sft_loss: labels has shape [2, 3] but logits
/// has shape [2, 4, 7]; expected labels to be logits' shape without the last dimension`.
class error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

namespace detail {

/// Formats a shape as `[2, 3, 5]`.
inline std::string shape_string(const std::vector<std::int64_t>& shape) {
  std::ostringstream out;
  out << '[';
  for (std::size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << ']';
  return out.str();
}

/// Builds a message from any streamable parts and throws `posttrain::error`.
template <class... Parts>
[[noreturn]] void fail(std::string_view function, const Parts&... parts) {
  std::ostringstream out;
  out << "posttrain::" << function << ": ";
  (out << ... << parts);
  throw error(out.str());
}

/// Rejects NaN (and optionally infinite) hyper-parameters by name.
inline void require_finite(std::string_view function, std::string_view name, double value) {
  if (!std::isfinite(value)) fail(function, name, " must be finite, got ", value);
}

}  // namespace detail
}  // namespace posttrain
