// fuzz/fuzz_support.hpp — what every posttrain fuzz target shares: decoding libFuzzer's bytes into
// shapes, values (moderate ones, or a sprinkle of ±inf, NaN, ±3e38, ±1e308, denormals, huge
// log-ratios), labels, masks and options; and the invariants, each of which aborts with a
// "posttrain fuzz finding:" line naming the entry point and what broke:
//   * a rejected input is a posttrain::error; any other exception is a finding (`call`);
//   * a finite loss has a finite gradient (`require_finite_gradient`);
//   * two paths that should agree do, within a tolerance stated here (`require_close`);
//   * the analytic backward matches central finite differences in double where the function is
//     smooth at the point (`check_finite_differences`: a coordinate whose left and right one-sided
//     differences disagree sits on a kink or a jump and is skipped).
// Crashes, leaks and undefined behaviour are AddressSanitizer's and UBSan's (the targets are built
// with -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all).
//
// Known defects (issue 13) that are being fixed elsewhere are tolerated by `known_defect(...)`,
// which names the defect; run with POSTTRAIN_FUZZ_STRICT=1 to turn every allowance into a finding.
#pragma once

#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <typeinfo>
#include <utility>
#include <vector>

#include "posttrain/backends/eigen.hpp"
#include "posttrain/error.hpp"

namespace posttrain::fuzz {

inline constexpr double pos_inf = std::numeric_limits<double>::infinity();
inline constexpr double qnan = std::numeric_limits<double>::quiet_NaN();

// ---- findings ----------------------------------------------------------------------------------

[[noreturn]] inline void finding(const std::string& what) {
  std::fprintf(stderr, "\nposttrain fuzz finding: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

/// POSTTRAIN_FUZZ_STRICT=1: the known-defect allowances below become findings.
inline bool strict() {
  static const bool s = [] {
    const char* e = std::getenv("POSTTRAIN_FUZZ_STRICT");
    return e != nullptr && *e != '\0' && *e != '0';
  }();
  return s;
}

/// True when `condition` describes an input that trips a known, tracked defect (and not strict).
inline bool known_defect(bool condition) { return condition && !strict(); }

/// Runs f(). A posttrain::error (a rejected input) returns false; any other exception is a finding.
template <class F>
bool call(const char* what, F&& f) {
  try {
    f();
    return true;
  } catch (const posttrain::error&) {
    return false;
  } catch (const std::exception& e) {
    finding(std::string(what) + ": threw " + typeid(e).name() + " (not posttrain::error): " + e.what());
  } catch (...) {
    finding(std::string(what) + ": threw a non-std exception");
  }
}

// ---- tensors -----------------------------------------------------------------------------------

template <class S>
using tensor_t = eigen_tensor<S>;
using index_t = eigen_index;

template <class S>
bool all_finite(const tensor_t<S>& t) {
  for (std::int64_t i = 0; i < t.numel(); ++i)
    if (!std::isfinite(t.data()[i])) return false;
  return true;
}

template <class S>
double max_abs(const tensor_t<S>& t) {
  double m = 0;
  for (std::int64_t i = 0; i < t.numel(); ++i)
    if (std::isfinite(t.data()[i])) m = std::max(m, std::abs(static_cast<double>(t.data()[i])));
  return m;
}

template <class S>
double item(const tensor_t<S>& t) {
  return static_cast<double>(t.data()[0]);
}

/// A double value as S: out-of-range finite doubles become ±inf in float (the IEEE rounding), spelled out.
template <class S>
S to_scalar(double v) {
  if constexpr (std::is_same_v<S, float>) {
    if (std::isfinite(v) && std::abs(v) > std::numeric_limits<float>::max()) return v > 0 ? INFINITY : -INFINITY;
  }
  return static_cast<S>(v);
}

template <class S>
tensor_t<double> to_double(const tensor_t<S>& t) {
  tensor_t<double> out(t.shape());
  for (std::int64_t i = 0; i < t.numel(); ++i) out.data()[i] = static_cast<double>(t.data()[i]);
  return out;
}

template <class S>
std::string describe(const tensor_t<S>& t) {
  std::ostringstream out;
  out.precision(17);
  out << detail::shape_string(t.shape()) << " {";
  for (std::int64_t i = 0; i < t.numel() && i < 64; ++i) out << (i ? ", " : "") << static_cast<double>(t.data()[i]);
  if (t.numel() > 64) out << ", ...";
  out << '}';
  return out.str();
}

inline std::string describe(const index_t& t) {
  std::ostringstream out;
  out << detail::shape_string(t.shape()) << " {";
  for (std::int64_t i = 0; i < t.numel() && i < 64; ++i) out << (i ? ", " : "") << t.data()[i];
  out << '}';
  return out.str();
}

// ---- decoding ----------------------------------------------------------------------------------

/// The values a wide input may hold besides moderate ones: the float32 and float64 edges, denormals,
/// signed zeros and the log-ratios where exp overflows (88.7 in float32, 709.8 in float64).
inline constexpr double extreme_values[] = {pos_inf,
                                            -pos_inf,
                                            qnan,
                                            3e38,
                                            -3e38,
                                            3.4028234663852886e38,
                                            -3.4028234663852886e38,
                                            1e308,
                                            -1e308,
                                            1.7976931348623157e308,
                                            4.9406564584124654e-324,
                                            -4.9406564584124654e-324,
                                            1e-310,
                                            1.4e-45,
                                            -1.4e-45,
                                            1e-40,
                                            0.0,
                                            -0.0,
                                            100.0,
                                            -100.0,
                                            710.0,
                                            -710.0,
                                            89.0,
                                            -89.0,
                                            1e4,
                                            -1e4,
                                            1e15,
                                            -1e15,
                                            1.0,
                                            -1.0,
                                            0.5,
                                            1e-8};

/// Decodes the fuzzer's bytes. `wide` inputs draw about one value in six from extreme_values.
class decoder {
 public:
  decoder(const std::uint8_t* data, std::size_t size) : p_(data, size) {}

  FuzzedDataProvider& provider() { return p_; }
  bool wide() const { return wide_; }
  void set_wide(bool w) { wide_ = w; }

  std::uint8_t byte() { return p_.ConsumeIntegral<std::uint8_t>(); }
  bool flag() { return p_.ConsumeBool(); }
  /// An integer in [lo, hi].
  std::int64_t range(std::int64_t lo, std::int64_t hi) { return p_.ConsumeIntegralInRange<std::int64_t>(lo, hi); }
  template <class E>
  E pick(std::initializer_list<E> choices) {
    return *(choices.begin() + range(0, static_cast<std::int64_t>(choices.size()) - 1));
  }
  /// A uniform value in [lo, hi] (16 bits of resolution).
  double uniform(double lo, double hi) { return lo + (hi - lo) * (p_.ConsumeIntegral<std::uint16_t>() / 65535.0); }

  /// A moderate value in [-scale, scale], or (wide inputs) now and then an extreme one.
  double value(double scale) {
    if (wide_) {
      const std::uint8_t k = byte();
      if (k >= 214) return extreme_values[k % std::size(extreme_values)];
    }
    return uniform(-scale, scale);
  }

  /// A scale for the moderate values of one tensor.
  double scale() { return pick({1.0, 3.0, 10.0, 30.0, 1e3}); }

  /// A shape of rank in [lo_rank, hi_rank] with extents in [0, max_extent] (0 and 1 included).
  shape_t shape(std::int64_t lo_rank, std::int64_t hi_rank, std::int64_t max_extent) {
    shape_t s(static_cast<std::size_t>(range(lo_rank, hi_rank)));
    for (auto& d : s) d = range(0, max_extent);
    return s;
  }

  template <class S>
  tensor_t<S> values(const shape_t& s, double scale) {
    tensor_t<S> t(s);
    for (std::int64_t i = 0; i < t.numel(); ++i) t.data()[i] = to_scalar<S>(value(scale));
    return t;
  }

  /// A mask: mostly 0/1, sometimes another non-zero (a mask is boolean: non-zero keeps).
  template <class S>
  tensor_t<S> mask(const shape_t& s) {
    tensor_t<S> t(s);
    const std::uint8_t density = byte();  // probability of keeping, in 1/256
    for (std::int64_t i = 0; i < t.numel(); ++i) {
      const std::uint8_t k = byte();
      S v = k < density ? S(1) : S(0);
      if (wide_ && k == 255) v = pick({S(2), S(-1), S(0.5)});
      t.data()[i] = v;
    }
    return t;
  }

  /// Labels for logits [..., vocab]: mostly in [0, vocab), some ignore_index, rarely out of range.
  index_t labels(const shape_t& s, std::int64_t vocab, std::int64_t ignore_index) {
    index_t t(s);
    for (std::int64_t i = 0; i < t.numel(); ++i) {
      const std::uint8_t k = byte();
      std::int64_t v = vocab > 0 ? static_cast<std::int64_t>(k) % vocab : 0;
      if (k >= 200) v = ignore_index;
      if (k == 255) v = pick<std::int64_t>({-1, vocab, vocab + 7, std::numeric_limits<std::int64_t>::min()});
      t.data()[i] = v;
    }
    return t;
  }

  /// An optional normaliser: usually none, sometimes a count, rarely an invalid one.
  std::optional<double> normalizer() {
    const std::uint8_t k = byte();
    if (k < 160) return std::nullopt;
    if (k < 250) return uniform(0.5, 64.0);
    return pick({0.0, -1.0, qnan, pos_inf});
  }

 private:
  FuzzedDataProvider p_;
  bool wide_ = false;
};

// ---- invariants ----------------------------------------------------------------------------------

/// |got - want| <= atol + rtol·max(|got|, |want|); NaN only against NaN, ±inf only against itself.
/// A finite value against a non-finite one is a finding unless `allow_nonfinite_mismatch`; an infinite
/// rtol compares nothing but shapes (and, unless allowed, which entries are finite).
template <class S>
void require_close(const std::string& what, const tensor_t<S>& got, const tensor_t<S>& want, double rtol, double atol,
                   bool allow_nonfinite_mismatch = false) {
  if (got.shape() != want.shape())
    finding(what + ": shapes differ: " + detail::shape_string(got.shape()) + " vs " +
            detail::shape_string(want.shape()));
  for (std::int64_t i = 0; i < got.numel(); ++i) {
    const double a = static_cast<double>(got.data()[i]), b = static_cast<double>(want.data()[i]);
    bool ok;
    if (std::isnan(a) || std::isnan(b) || std::isinf(a) || std::isinf(b))
      ok = (std::isnan(a) && std::isnan(b)) || a == b || allow_nonfinite_mismatch;
    else
      ok = !std::isfinite(rtol) || std::abs(a - b) <= atol + rtol * std::max(std::abs(a), std::abs(b));
    if (!ok) {
      std::ostringstream out;
      out.precision(17);
      out << what << ": element " << i << " differs: " << a << " vs " << b << " (rtol " << rtol << ", atol " << atol
          << ")\n  first: " << describe(got) << "\n  second: " << describe(want);
      finding(out.str());
    }
  }
}

/// A finite loss must come with a finite gradient.
template <class S, class G>
void require_finite_gradient(const std::string& what, const tensor_t<S>& loss, const tensor_t<G>& grad,
                             const std::string& inputs) {
  if (std::isfinite(item(loss)) && !all_finite(grad)) {
    std::ostringstream out;
    out.precision(17);
    out << what << ": finite loss " << item(loss) << " but non-finite gradient " << describe(grad)
        << "\n  inputs: " << inputs;
    finding(out.str());
  }
}

/// Central finite differences of the scalar f at x against `analytic` [x's shape], on up to
/// `max_coords` coordinates chosen by the decoder. A coordinate is checked only where f is smooth
/// at x: the one-sided slopes agree (else x sits on a kink or a jump of a selection), the central
/// differences with steps h and h/4 agree (else f bends or saturates within h) and f is finite at
/// the probes. Tolerance: 1e-4 relative, far above h = 1e-5's truncation and rounding errors
/// for the moderate inputs (|x| <= 30) it is used on, far below the O(1) error of a wrong gradient.
template <class F>
void check_finite_differences(const std::string& what, F&& f, const tensor_t<double>& x,
                              const tensor_t<double>& analytic, decoder& d, int max_coords = 4) {
  if (x.numel() == 0) return;
  if (analytic.shape() != x.shape())
    finding(what + ": gradient shape " + detail::shape_string(analytic.shape()) + " but input shape " +
            detail::shape_string(x.shape()));
  const double f0 = f(x);
  if (!std::isfinite(f0)) return;
  tensor_t<double> probe = x;
  for (int c = 0; c < max_coords; ++c) {
    const auto i = static_cast<Eigen::Index>(d.range(0, x.numel() - 1));
    const double h = 1e-5 * std::max(1.0, std::abs(x.data()[i]));
    const double x0 = probe.data()[i];
    probe.data()[i] = x0 + h;
    const double up = f(probe);
    probe.data()[i] = x0 - h;
    const double down = f(probe);
    probe.data()[i] = x0;
    probe.data()[i] = x0 + h / 4;
    const double up4 = f(probe);
    probe.data()[i] = x0 - h / 4;
    const double down4 = f(probe);
    probe.data()[i] = x0;
    if (!std::isfinite(up) || !std::isfinite(down) || !std::isfinite(up4) || !std::isfinite(down4)) continue;
    const double right = (up - f0) / h, left = (f0 - down) / h, central = (up - down) / (2 * h);
    const double central4 = (up4 - down4) / (h / 2);
    const double noise = 1e-9 * std::abs(f0) / h;  // rounding of f, amplified by 1/h
    // Not smooth at the scale h (a kink, a jump, or a curvature so large that f saturates within h):
    // the one-sided slopes differ, or the central difference changes with the step.
    const double band = 1e-3 * (1 + std::abs(central)) + 4 * noise;
    if (std::abs(right - left) > band || std::abs(central - central4) > band) continue;
    const double g = analytic.data()[i];
    if (std::abs(g - central) > 1e-4 * (1 + std::abs(central)) + 4 * noise) {
      std::ostringstream out;
      out.precision(17);
      out << what << ": analytic gradient " << g << " vs central difference " << central << " (left " << left
          << ", right " << right << ") at coordinate " << i << " of " << describe(x);
      finding(out.str());
    }
  }
}

}  // namespace posttrain::fuzz

/// The libFuzzer entry of a target whose `run<S>(decoder&)` exercises one scalar type: the first byte picks
/// float64 or float32.
#define POSTTRAIN_FUZZ_ENTRY_POINT(run)                                               \
  extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) { \
    decoder d(data, size);                                                            \
    if (d.flag())                                                                     \
      run<double>(d);                                                                 \
    else                                                                              \
      run<float>(d);                                                                  \
    return 0;                                                                         \
  }
