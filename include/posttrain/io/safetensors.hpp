// posttrain/io/safetensors.hpp — read and write the safetensors format (Hugging Face), for dumps of a
// trainer's step that posttrain-verify checks against the double-precision reference, and so that a C++
// trainer can write such dumps too. Standard library only (no LibTorch, no Eigen, no JSON library).
//
// Layout (https://github.com/huggingface/safetensors, "Format"):
//   [8 bytes]  N, unsigned little-endian: the header's length in bytes
//   [N bytes]  a UTF-8 JSON object {"name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...,
//              "__metadata__": {"key": "value", ...} (optional, strings only)}, possibly padded with spaces
//   [rest]     the data area: each tensor's bytes, row-major, little-endian, at [begin, end) relative to the
//              start of the data area
// Dumps are untrusted input. parse_safetensors checks, and throws posttrain::error naming the source, the
// tensor and what is wrong, when: the file is shorter than 8 bytes or than 8 + N; N exceeds the file or
// 100 MB; the header is not strict JSON (no trailing commas, comments, NaN, duplicate keys; depth <= 64) or
// not an object of tensor entries; a dtype is unknown; a shape has a negative extent, or its element count
// times the item size overflows or differs from end - begin; begin > end; an offset passes the data area;
// two tensors overlap; a byte of the data area belongs to no tensor (a gap, or bytes after the last one).
// These are the checks of the reference implementation (safetensors' `validate`), all with checked
// arithmetic: nothing is read past the end of the bytes given, whatever they hold.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "posttrain/error.hpp"

namespace posttrain::io {

/// The element types posttrain reads and writes (safetensors' names: F16 BF16 F32 F64 I64 I32 BOOL).
enum class st_dtype { f16, bf16, f32, f64, i64, i32, boolean };

constexpr const char* st_dtype_name(st_dtype d) {
  switch (d) {
    case st_dtype::f16: return "F16";
    case st_dtype::bf16: return "BF16";
    case st_dtype::f32: return "F32";
    case st_dtype::f64: return "F64";
    case st_dtype::i64: return "I64";
    case st_dtype::i32: return "I32";
    case st_dtype::boolean: return "BOOL";
  }
  return "?";
}

constexpr std::size_t st_itemsize(st_dtype d) {
  switch (d) {
    case st_dtype::f16:
    case st_dtype::bf16: return 2;
    case st_dtype::f32:
    case st_dtype::i32: return 4;
    case st_dtype::f64:
    case st_dtype::i64: return 8;
    case st_dtype::boolean: return 1;
  }
  return 1;
}

constexpr bool st_is_floating(st_dtype d) {
  return d == st_dtype::f16 || d == st_dtype::bf16 || d == st_dtype::f32 || d == st_dtype::f64;
}

/// The dtype spelled `name` ("F32", ...), or empty.
inline std::optional<st_dtype> st_dtype_from_name(std::string_view name) {
  for (st_dtype d :
       {st_dtype::f16, st_dtype::bf16, st_dtype::f32, st_dtype::f64, st_dtype::i64, st_dtype::i32, st_dtype::boolean})
    if (name == st_dtype_name(d)) return d;
  return std::nullopt;
}

namespace detail {

inline std::uint64_t load_le(const unsigned char* p, std::size_t n) {
  std::uint64_t v = 0;
  for (std::size_t i = 0; i < n; ++i) v |= static_cast<std::uint64_t>(p[i]) << (8 * i);
  return v;
}

inline void store_le(unsigned char* p, std::uint64_t v, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) p[i] = static_cast<unsigned char>(v >> (8 * i));
}

/// IEEE binary16 bits -> double (exact).
inline double half_to_double(std::uint16_t h) {
  const int sign = h >> 15, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
  double v;
  if (exponent == 0)
    v = std::ldexp(static_cast<double>(mantissa), -24);  // zero or subnormal
  else if (exponent == 31)
    v = mantissa ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else
    v = std::ldexp(static_cast<double>(mantissa | 0x400), exponent - 25);
  return sign ? -v : v;
}

/// double -> IEEE binary16 bits, rounded to nearest even (through float, then the float's bits).
inline std::uint16_t double_to_half(double x) {
  const float f = static_cast<float>(x);
  std::uint32_t b;
  std::memcpy(&b, &f, 4);
  const std::uint16_t sign = static_cast<std::uint16_t>((b >> 16) & 0x8000);
  const std::uint32_t abs = b & 0x7fffffffu;
  if (abs >= 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7c00 | (abs > 0x7f800000u ? 0x200 : 0));
  if (abs >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00);  // rounds past 65504: inf
  if (abs < 0x38800000u) {                                                   // subnormal half (or zero)
    const float a = std::abs(f);
    const double scaled = static_cast<double>(a) * 16777216.0;  // in units of 2^-24
    const auto m = static_cast<std::uint16_t>(std::nearbyint(scaled));
    return static_cast<std::uint16_t>(sign | m);
  }
  std::uint32_t h = ((abs - 0x38000000u) >> 13);  // rebias 127 -> 15, drop 13 mantissa bits
  const std::uint32_t rest = abs & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
  return static_cast<std::uint16_t>(sign | h);
}

/// bfloat16 bits -> double (exact).
inline double bf16_to_double(std::uint16_t v) {
  const std::uint32_t b = static_cast<std::uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

/// double -> bfloat16 bits, rounded to nearest even (through float).
inline std::uint16_t double_to_bf16(double x) {
  const float f = static_cast<float>(x);
  std::uint32_t b;
  std::memcpy(&b, &f, 4);
  if ((b & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((b >> 16) | 0x40);  // NaN stays NaN
  b += 0x7fffu + ((b >> 16) & 1u);
  return static_cast<std::uint16_t>(b >> 16);
}

// ---- a strict JSON reader, enough for safetensors headers ---------------------------------------

struct json_value {
  enum class kind { null, boolean, number, string, array, object } type = kind::null;
  bool flag = false;
  std::string text;  ///< a string's decoded UTF-8, or a number's literal text
  std::vector<json_value> items;
  std::vector<std::string> keys;    ///< an object's keys, in order
  std::vector<json_value> members;  ///< an object's values (a vector of pairs would need json_value complete)
};

class json_reader {
 public:
  json_reader(std::string_view text, std::string_view source) : s_(text), source_(source) {}

  json_value document() {
    skip_space();
    json_value v = value(0);
    skip_space();
    if (pos_ != s_.size()) error("unexpected '", printable(s_[pos_]), "' after the JSON value");
    return v;
  }

 private:
  static constexpr int max_depth = 64;

  static std::string printable(char c) {
    if (static_cast<unsigned char>(c) >= 0x20 && static_cast<unsigned char>(c) < 0x7f) return std::string(1, c);
    std::ostringstream out;
    out << "\\x" << std::hex << static_cast<int>(static_cast<unsigned char>(c));
    return out.str();
  }

  template <class... Parts>
  [[noreturn]] void error(const Parts&... parts) const {
    posttrain::detail::fail("io::read_safetensors", source_, ": bad header JSON at byte ", pos_, ": ", parts...);
  }

  void skip_space() {
    while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r')) ++pos_;
  }

  bool literal(std::string_view word) {
    if (s_.substr(pos_, word.size()) != word) return false;
    pos_ += word.size();
    return true;
  }

  json_value value(int depth) {
    if (depth > max_depth) error("nested deeper than ", max_depth, " levels");
    if (pos_ >= s_.size()) error("unexpected end of the header");
    json_value v;
    const char c = s_[pos_];
    if (c == '{') {
      v.type = json_value::kind::object;
      std::set<std::string> seen;  // keys so far: duplicates are an error (a log-time check)
      ++pos_;
      skip_space();
      if (pos_ < s_.size() && s_[pos_] == '}') {
        ++pos_;
        return v;
      }
      while (true) {
        skip_space();
        if (pos_ >= s_.size() || s_[pos_] != '"') error("expected a string key");
        std::string key = string();
        if (!seen.insert(key).second) error("duplicate key \"", key, "\"");
        skip_space();
        if (pos_ >= s_.size() || s_[pos_] != ':') error("expected ':' after key \"", key, "\"");
        ++pos_;
        skip_space();
        json_value member = value(depth + 1);
        v.keys.push_back(std::move(key));
        v.members.push_back(std::move(member));
        skip_space();
        if (pos_ < s_.size() && s_[pos_] == ',') {
          ++pos_;
          continue;
        }
        if (pos_ < s_.size() && s_[pos_] == '}') {
          ++pos_;
          return v;
        }
        error("expected ',' or '}' in an object");
      }
    }
    if (c == '[') {
      v.type = json_value::kind::array;
      ++pos_;
      skip_space();
      if (pos_ < s_.size() && s_[pos_] == ']') {
        ++pos_;
        return v;
      }
      while (true) {
        skip_space();
        v.items.push_back(value(depth + 1));
        skip_space();
        if (pos_ < s_.size() && s_[pos_] == ',') {
          ++pos_;
          continue;
        }
        if (pos_ < s_.size() && s_[pos_] == ']') {
          ++pos_;
          return v;
        }
        error("expected ',' or ']' in an array");
      }
    }
    if (c == '"') {
      v.type = json_value::kind::string;
      v.text = string();
      return v;
    }
    if (literal("true")) {
      v.type = json_value::kind::boolean;
      v.flag = true;
      return v;
    }
    if (literal("false")) {
      v.type = json_value::kind::boolean;
      return v;
    }
    if (literal("null")) return v;
    if (c == '-' || (c >= '0' && c <= '9')) {
      v.type = json_value::kind::number;
      v.text = number();
      return v;
    }
    error("unexpected '", printable(c), "'");
  }

  std::string number() {
    const std::size_t start = pos_;
    auto digits = [&] {
      const std::size_t d = pos_;
      while (pos_ < s_.size() && s_[pos_] >= '0' && s_[pos_] <= '9') ++pos_;
      return pos_ - d;
    };
    if (s_[pos_] == '-') ++pos_;
    if (pos_ < s_.size() && s_[pos_] == '0')
      ++pos_;
    else if (digits() == 0)
      error("a number needs digits");
    if (pos_ < s_.size() && s_[pos_] == '.') {
      ++pos_;
      if (digits() == 0) error("a number needs digits after '.'");
    }
    if (pos_ < s_.size() && (s_[pos_] == 'e' || s_[pos_] == 'E')) {
      ++pos_;
      if (pos_ < s_.size() && (s_[pos_] == '+' || s_[pos_] == '-')) ++pos_;
      if (digits() == 0) error("a number needs digits in its exponent");
    }
    return std::string(s_.substr(start, pos_ - start));
  }

  unsigned hex4() {
    if (s_.size() - pos_ < 4) error("a \\u escape needs 4 hex digits");
    unsigned v = 0;
    for (int i = 0; i < 4; ++i) {
      const char h = s_[pos_++];
      v <<= 4;
      if (h >= '0' && h <= '9')
        v |= static_cast<unsigned>(h - '0');
      else if (h >= 'a' && h <= 'f')
        v |= static_cast<unsigned>(h - 'a' + 10);
      else if (h >= 'A' && h <= 'F')
        v |= static_cast<unsigned>(h - 'A' + 10);
      else
        error("bad hex digit '", printable(h), "' in a \\u escape");
    }
    return v;
  }

  static void append_utf8(std::string& out, unsigned cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xc0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3f));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xe0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
      out += static_cast<char>(0x80 | (cp & 0x3f));
    } else {
      out += static_cast<char>(0xf0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3f));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
      out += static_cast<char>(0x80 | (cp & 0x3f));
    }
  }

  std::string string() {
    ++pos_;  // the opening quote
    std::string out;
    while (true) {
      if (pos_ >= s_.size()) error("unterminated string");
      const char c = s_[pos_++];
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) error("a control character inside a string");
      if (c != '\\') {
        out += c;
        continue;
      }
      if (pos_ >= s_.size()) error("unterminated escape");
      const char e = s_[pos_++];
      switch (e) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned cp = hex4();
          if (cp >= 0xd800 && cp < 0xdc00) {
            if (!literal("\\u")) error("a lone high surrogate in a \\u escape");
            const unsigned low = hex4();
            if (low < 0xdc00 || low >= 0xe000) error("a high surrogate not followed by a low one");
            cp = 0x10000 + ((cp - 0xd800) << 10) + (low - 0xdc00);
          } else if (cp >= 0xdc00 && cp < 0xe000) {
            error("a lone low surrogate in a \\u escape");
          }
          append_utf8(out, cp);
          break;
        }
        default: error("unknown escape '\\", printable(e), "'");
      }
    }
  }

  std::string_view s_;
  std::string_view source_;
  std::size_t pos_ = 0;
};

inline void append_json_string(std::string& out, std::string_view s) {
  out += '"';
  for (char c : s) {
    const auto u = static_cast<unsigned char>(c);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (u < 0x20) {
      static const char* hex = "0123456789abcdef";
      out += "\\u00";
      out += hex[u >> 4];
      out += hex[u & 15];
    } else {
      out += c;
    }
  }
  out += '"';
}

}  // namespace detail

/// One tensor: its name, dtype, shape and raw little-endian bytes (row-major).
struct safetensor {
  std::string name;
  st_dtype dtype = st_dtype::f32;
  std::vector<std::int64_t> shape;
  std::vector<unsigned char> bytes;

  std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }

  /// Element i as a double (exact for every floating dtype; integers beyond 2^53 round).
  double value(std::int64_t i) const {
    const unsigned char* p = bytes.data() + static_cast<std::size_t>(i) * st_itemsize(dtype);
    switch (dtype) {
      case st_dtype::f16: return detail::half_to_double(static_cast<std::uint16_t>(detail::load_le(p, 2)));
      case st_dtype::bf16: return detail::bf16_to_double(static_cast<std::uint16_t>(detail::load_le(p, 2)));
      case st_dtype::f32: {
        const auto b = static_cast<std::uint32_t>(detail::load_le(p, 4));
        float f;
        std::memcpy(&f, &b, 4);
        return f;
      }
      case st_dtype::f64: {
        const std::uint64_t b = detail::load_le(p, 8);
        double d;
        std::memcpy(&d, &b, 8);
        return d;
      }
      case st_dtype::i64: return static_cast<double>(static_cast<std::int64_t>(detail::load_le(p, 8)));
      case st_dtype::i32:
        return static_cast<double>(static_cast<std::int32_t>(static_cast<std::uint32_t>(detail::load_le(p, 4))));
      case st_dtype::boolean: return *p != 0 ? 1.0 : 0.0;
    }
    return 0.0;
  }

  /// Every element as a double.
  std::vector<double> to_double() const {
    std::vector<double> out(static_cast<std::size_t>(numel()));
    for (std::size_t i = 0; i < out.size(); ++i) out[i] = value(static_cast<std::int64_t>(i));
    return out;
  }

  /// Every element as an integer: integer and boolean dtypes as stored; a floating dtype only where each
  /// value is integral (a label tensor saved as float), else posttrain::error.
  std::vector<std::int64_t> to_int64() const {
    std::vector<std::int64_t> out(static_cast<std::size_t>(numel()));
    for (std::size_t i = 0; i < out.size(); ++i) {
      const unsigned char* p = bytes.data() + i * st_itemsize(dtype);
      if (dtype == st_dtype::i64) {
        out[i] = static_cast<std::int64_t>(detail::load_le(p, 8));
      } else if (dtype == st_dtype::i32) {
        out[i] = static_cast<std::int32_t>(static_cast<std::uint32_t>(detail::load_le(p, 4)));
      } else if (dtype == st_dtype::boolean) {
        out[i] = *p != 0;
      } else {
        const double v = value(static_cast<std::int64_t>(i));
        if (!(v >= -9007199254740992.0 && v <= 9007199254740992.0) || v != std::floor(v))
          posttrain::detail::fail("io::safetensor::to_int64", "tensor '", name, "' (", st_dtype_name(dtype),
                                  ") holds the non-integer ", v, " at index ", i);
        out[i] = static_cast<std::int64_t>(v);
      }
    }
    return out;
  }

  /// A tensor of `dtype` holding `values` (rounded to nearest even for F32/F16/BF16, truncated toward zero
  /// for integers, non-zero -> true for BOOL). values.size() must equal the shape's element count.
  static safetensor from_doubles(std::string name, st_dtype dtype, std::vector<std::int64_t> shape,
                                 std::span<const double> values) {
    safetensor t{std::move(name), dtype, std::move(shape), {}};
    check_count("io::safetensor::from_doubles", t, values.size());
    const std::size_t w = st_itemsize(dtype);
    t.bytes.resize(values.size() * w);
    for (std::size_t i = 0; i < values.size(); ++i) {
      unsigned char* p = t.bytes.data() + i * w;
      const double v = values[i];
      switch (dtype) {
        case st_dtype::f16: detail::store_le(p, detail::double_to_half(v), 2); break;
        case st_dtype::bf16: detail::store_le(p, detail::double_to_bf16(v), 2); break;
        case st_dtype::f32: {
          const float f = static_cast<float>(v);
          std::uint32_t b;
          std::memcpy(&b, &f, 4);
          detail::store_le(p, b, 4);
          break;
        }
        case st_dtype::f64: {
          std::uint64_t b;
          std::memcpy(&b, &v, 8);
          detail::store_le(p, b, 8);
          break;
        }
        case st_dtype::i64:
        case st_dtype::i32: {
          if (!(v >= -9.2233720368547758e18 && v < 9.2233720368547758e18))
            posttrain::detail::fail("io::safetensor::from_doubles", "tensor '", t.name, "': ", v,
                                    " is not representable as ", st_dtype_name(dtype));
          detail::store_le(p, static_cast<std::uint64_t>(static_cast<std::int64_t>(v)), w);
          break;
        }
        case st_dtype::boolean: *p = v != 0.0; break;
      }
    }
    return t;
  }

  /// An I64 (or I32) tensor holding `values`.
  static safetensor from_int64(std::string name, std::vector<std::int64_t> shape, std::span<const std::int64_t> values,
                               st_dtype dtype = st_dtype::i64) {
    if (dtype != st_dtype::i64 && dtype != st_dtype::i32)
      posttrain::detail::fail("io::safetensor::from_int64", "tensor '", name, "': dtype must be I64 or I32, got ",
                              st_dtype_name(dtype));
    safetensor t{std::move(name), dtype, std::move(shape), {}};
    check_count("io::safetensor::from_int64", t, values.size());
    const std::size_t w = st_itemsize(dtype);
    t.bytes.resize(values.size() * w);
    for (std::size_t i = 0; i < values.size(); ++i)
      detail::store_le(t.bytes.data() + i * w, static_cast<std::uint64_t>(values[i]), w);
    return t;
  }

 private:
  static void check_count(std::string_view fn, const safetensor& t, std::size_t n) {
    for (auto d : t.shape)
      if (d < 0) posttrain::detail::fail(fn, "tensor '", t.name, "' has a negative extent in ", shape_text(t.shape));
    if (static_cast<std::size_t>(t.numel()) != n)
      posttrain::detail::fail(fn, "tensor '", t.name, "' has shape ", shape_text(t.shape), " (", t.numel(),
                              " elements) but ", n, " values");
  }
  static std::string shape_text(const std::vector<std::int64_t>& s) { return posttrain::detail::shape_string(s); }
};

/// A parsed file: its tensors in data order and its __metadata__.
struct safetensors_file {
  std::vector<safetensor> tensors;
  std::map<std::string, std::string> metadata;

  const safetensor* find(std::string_view name) const {
    for (const auto& t : tensors)
      if (t.name == name) return &t;
    return nullptr;
  }
  void add(safetensor t) {
    if (find(t.name)) posttrain::detail::fail("io::safetensors_file::add", "a tensor named '", t.name, "' exists");
    tensors.push_back(std::move(t));
  }
};

/// The largest header parse_safetensors accepts (the reference implementation's limit).
inline constexpr std::uint64_t max_safetensors_header = 100'000'000;

/// Parses the bytes of a safetensors file; `source` (a path) names it in every error message.
inline safetensors_file parse_safetensors(std::span<const unsigned char> bytes, std::string_view source = "<memory>") {
  constexpr std::string_view fn = "io::read_safetensors";
  auto fail = [&](const auto&... parts) { posttrain::detail::fail(fn, source, ": ", parts...); };
  if (bytes.size() < 8) fail("truncated: ", bytes.size(), " bytes, fewer than the 8-byte header length");
  const std::uint64_t n = detail::load_le(bytes.data(), 8);
  if (n > max_safetensors_header) fail("header length ", n, " exceeds the limit of ", max_safetensors_header);
  if (n > bytes.size() - 8)
    fail("truncated: the header length says ", n, " bytes but only ", bytes.size() - 8, " follow it");
  if (n < 2) fail("header length ", n, " is too short for a JSON object");
  const std::string_view text(reinterpret_cast<const char*>(bytes.data() + 8), static_cast<std::size_t>(n));
  if (text[0] != '{') fail("bad header JSON: it must start with '{'");
  const detail::json_value root = detail::json_reader(text, source).document();
  if (root.type != detail::json_value::kind::object) fail("bad header JSON: not an object");
  const std::uint64_t data_size = bytes.size() - 8 - n;
  const unsigned char* data = bytes.data() + 8 + n;

  using kind = detail::json_value::kind;
  auto to_u64 = [&](const detail::json_value& v, const std::string& what) -> std::uint64_t {
    if (v.type != kind::number || v.text.empty() || v.text[0] == '-' ||
        v.text.find_first_of(".eE") != std::string::npos)
      fail(what, " must be a non-negative integer, got ", v.type == kind::number ? v.text : "a non-number");
    std::uint64_t x = 0;
    for (char c : v.text) {
      const auto d = static_cast<std::uint64_t>(c - '0');
      if (x > (std::numeric_limits<std::uint64_t>::max() - d) / 10) fail(what, " ", v.text, " overflows 64 bits");
      x = x * 10 + d;
    }
    return x;
  };

  struct entry {
    safetensor t;
    std::uint64_t begin, end;
  };
  std::vector<entry> entries;
  safetensors_file out;
  for (std::size_t m = 0; m < root.keys.size(); ++m) {
    const std::string& name = root.keys[m];
    const detail::json_value& v = root.members[m];
    if (name == "__metadata__") {
      if (v.type != kind::object) fail("__metadata__ must be an object of strings");
      for (std::size_t i = 0; i < v.keys.size(); ++i) {
        const std::string& k = v.keys[i];
        const detail::json_value& mv = v.members[i];
        if (mv.type != kind::string) fail("__metadata__[\"", k, "\"] must be a string");
        out.metadata[k] = mv.text;
      }
      continue;
    }
    std::string where = "tensor '";  // built piece by piece (see serialize_safetensors on GCC's -Wrestrict)
    where += name;
    where += '\'';
    if (v.type != kind::object) fail(where, ": its entry must be an object {dtype, shape, data_offsets}");
    const detail::json_value *dtype = nullptr, *shape = nullptr, *offsets = nullptr;
    for (std::size_t i = 0; i < v.keys.size(); ++i) {
      const std::string& k = v.keys[i];
      const detail::json_value& mv = v.members[i];
      if (k == "dtype")
        dtype = &mv;
      else if (k == "shape")
        shape = &mv;
      else if (k == "data_offsets")
        offsets = &mv;
      else
        fail(where, ": unknown field \"", k, "\" (expected dtype, shape, data_offsets)");
    }
    if (!dtype || !shape || !offsets)
      fail(where, ": missing field \"", !dtype ? "dtype" : !shape ? "shape" : "data_offsets", "\"");
    if (dtype->type != kind::string) fail(where, ": dtype must be a string");
    const auto d = st_dtype_from_name(dtype->text);
    if (!d) fail(where, ": unknown dtype \"", dtype->text, "\" (supported: F16, BF16, F32, F64, I64, I32, BOOL)");
    if (shape->type != kind::array) fail(where, ": shape must be an array of integers");
    if (offsets->type != kind::array || offsets->items.size() != 2)
      fail(where, ": data_offsets must be an array [begin, end]");
    entry e{safetensor{name, *d, {}, {}}, to_u64(offsets->items[0], where + " data_offsets[0]"),
            to_u64(offsets->items[1], where + " data_offsets[1]")};
    std::uint64_t count = 1;
    bool overflow = false;
    for (std::size_t i = 0; i < shape->items.size(); ++i) {
      std::string what = where;
      what += " shape[";
      what += std::to_string(i);
      what += ']';
      const std::uint64_t extent = to_u64(shape->items[i], what);
      if (extent > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
        fail(where, ": shape[", i, "] = ", extent, " is too large");
      if (extent != 0 && count > std::numeric_limits<std::uint64_t>::max() / extent) overflow = true;
      count = overflow ? count : count * extent;
      e.t.shape.push_back(static_cast<std::int64_t>(extent));
    }
    for (auto x : e.t.shape)
      if (x == 0) overflow = false, count = 0;  // an empty tensor, whatever its other extents
    const std::uint64_t w = st_itemsize(*d);
    if (overflow || count > std::numeric_limits<std::uint64_t>::max() / w ||
        count > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
      fail(where, ": shape ", posttrain::detail::shape_string(e.t.shape), " has too many elements");
    if (e.begin > e.end) fail(where, ": data_offsets [", e.begin, ", ", e.end, "] has begin > end");
    if (e.end > data_size)
      fail(where, ": data_offsets [", e.begin, ", ", e.end, "] reach past the end of the data area (", data_size,
           " bytes): the file is truncated or the offsets are wrong");
    if (count * w != e.end - e.begin)
      fail(where, ": shape ", posttrain::detail::shape_string(e.t.shape), " of ", dtype->text, " needs ", count * w,
           " bytes but data_offsets [", e.begin, ", ", e.end, "] hold ", e.end - e.begin);
    entries.push_back(std::move(e));
  }
  std::stable_sort(entries.begin(), entries.end(), [](const entry& a, const entry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  std::uint64_t covered = 0;
  for (std::size_t i = 0; i < entries.size(); ++i) {
    const entry& e = entries[i];
    if (e.begin < covered)
      fail("tensor '", e.t.name, "' (data_offsets [", e.begin, ", ", e.end, "]) overlaps tensor '",
           entries[i - 1].t.name, "' (data_offsets [", entries[i - 1].begin, ", ", entries[i - 1].end, "])");
    if (e.begin > covered)
      fail("bytes [", covered, ", ", e.begin, ") of the data area belong to no tensor (a gap before tensor '", e.t.name,
           "')");
    covered = e.end;
  }
  if (covered != data_size)
    fail("bytes [", covered, ", ", data_size, ") at the end of the data area belong to no tensor");
  for (auto& e : entries) {
    e.t.bytes.assign(data + e.begin, data + e.end);
    out.tensors.push_back(std::move(e.t));
  }
  return out;
}

/// Reads and parses a safetensors file.
inline safetensors_file read_safetensors(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) posttrain::detail::fail("io::read_safetensors", path, ": cannot open the file");
  std::vector<unsigned char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) posttrain::detail::fail("io::read_safetensors", path, ": read error");
  return parse_safetensors(bytes, path);
}

/// The bytes of a safetensors file holding `file`'s tensors (in order) and metadata. The header is padded
/// with spaces to a multiple of 8 bytes, as the reference implementation writes it.
inline std::vector<unsigned char> serialize_safetensors(const safetensors_file& file) {
  constexpr std::string_view fn = "io::write_safetensors";
  std::string header = "{";
  bool first = true;
  if (!file.metadata.empty()) {
    header += "\"__metadata__\":{";
    for (const auto& [k, v] : file.metadata) {
      if (!first) header += ',';
      first = false;
      detail::append_json_string(header, k);
      header += ':';
      detail::append_json_string(header, v);
    }
    header += '}';
    first = false;
  }
  std::uint64_t offset = 0;
  for (std::size_t i = 0; i < file.tensors.size(); ++i) {
    const safetensor& t = file.tensors[i];
    if (t.name == "__metadata__") posttrain::detail::fail(fn, "a tensor may not be named __metadata__");
    for (std::size_t j = 0; j < i; ++j)
      if (file.tensors[j].name == t.name) posttrain::detail::fail(fn, "two tensors are named '", t.name, "'");
    for (auto d : t.shape)
      if (d < 0)
        posttrain::detail::fail(fn, "tensor '", t.name, "' has shape ", posttrain::detail::shape_string(t.shape));
    if (static_cast<std::uint64_t>(t.numel()) * st_itemsize(t.dtype) != t.bytes.size())
      posttrain::detail::fail(fn, "tensor '", t.name, "' has shape ", posttrain::detail::shape_string(t.shape), " of ",
                              st_dtype_name(t.dtype), " but ", t.bytes.size(), " bytes");
    if (!first) header += ',';
    first = false;
    detail::append_json_string(header, t.name);
    header += ":{\"dtype\":\"";
    header += st_dtype_name(t.dtype);
    header += "\",\"shape\":[";
    // appended piece by piece: GCC 12 at -O2 reports a false -Wrestrict for `"literal" + std::string` (users'
    // -Werror builds include this header)
    for (std::size_t k = 0; k < t.shape.size(); ++k) {
      if (k) header += ',';
      header += std::to_string(t.shape[k]);
    }
    header += "],\"data_offsets\":[";
    header += std::to_string(offset);
    header += ',';
    header += std::to_string(offset + t.bytes.size());
    header += "]}";
    offset += t.bytes.size();
  }
  header += '}';
  while (header.size() % 8 != 0) header += ' ';
  std::vector<unsigned char> out(8 + header.size() + offset);
  detail::store_le(out.data(), header.size(), 8);
  std::memcpy(out.data() + 8, header.data(), header.size());
  std::size_t at = 8 + header.size();
  for (const auto& t : file.tensors) {
    if (!t.bytes.empty()) std::memcpy(out.data() + at, t.bytes.data(), t.bytes.size());
    at += t.bytes.size();
  }
  return out;
}

/// Writes `file` to `path` as safetensors.
inline void write_safetensors(const std::string& path, const safetensors_file& file) {
  const std::vector<unsigned char> bytes = serialize_safetensors(file);
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) posttrain::detail::fail("io::write_safetensors", path, ": cannot open the file for writing");
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  if (!out) posttrain::detail::fail("io::write_safetensors", path, ": write error");
}

}  // namespace posttrain::io
