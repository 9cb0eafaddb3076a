// posttrain/io/safetensors.hpp: the reader and writer of posttrain-verify's dumps (issue 16). Expected bytes are
// IEEE 754 encodings written out by hand (binary16 1.5 = 0x3E00, bfloat16 1.5 = 0x3FC0, ...), and the files of
// the malformed cases are byte strings built here, never the library's own output.
#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "posttrain/io/safetensors.hpp"

namespace test_safetensors {  // one namespace per test file: the unity build compiles several in one TU

using namespace posttrain;
using namespace posttrain::io;
using Catch::Matchers::Contains;

namespace {

using bytes_t = std::vector<unsigned char>;

/// A file: the 8-byte little-endian header length, the header text, the data.
bytes_t file_of(const std::string& header, const bytes_t& data) {
  // sized once, then filled (an insert into the 8-byte prefix draws a false -Warray-bounds from GCC 12 at -O3)
  bytes_t out(8 + header.size() + data.size());
  const std::uint64_t n = header.size();
  for (std::size_t i = 0; i < 8; ++i) out[i] = static_cast<unsigned char>(n >> (8 * i));
  std::copy(header.begin(), header.end(), out.begin() + 8);
  std::copy(data.begin(), data.end(), out.begin() + 8 + static_cast<std::ptrdiff_t>(header.size()));
  return out;
}

std::uint16_t u16(const bytes_t& b, std::size_t at) { return static_cast<std::uint16_t>(b[at] | (b[at + 1] << 8)); }

void expect_parse_error(const bytes_t& bytes, const std::string& part) {
  REQUIRE_THROWS_MATCHES(parse_safetensors(bytes, "dump.safetensors"), posttrain::error,
                         Catch::Matchers::Predicate<posttrain::error>(
                             [&](const posttrain::error& e) {
                               const std::string m = e.what();
                               return m.rfind("posttrain::io::read_safetensors: dump.safetensors: ", 0) == 0 &&
                                      m.find(part) != std::string::npos;
                             },
                             "names the file and says: " + part));
}

}  // namespace

TEST_CASE("safetensors: a hand-written file reads back its values", "[io][safetensors]") {
  // x: F32 [2] = {1.5, -2}: 0x3FC00000, 0xC0000000; ids: I64 [1] = {-100}; m: BOOL [2] = {1, 0}
  const bytes_t data = {0x00, 0x00, 0xC0, 0x3F, 0x00, 0x00, 0x00, 0xC0, 0x9C,
                        0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x01, 0x00};
  const auto f = parse_safetensors(
      file_of(R"({"__metadata__":{"format":"pt"},"ids":{"dtype":"I64","shape":[1],"data_offsets":[8,16]},)"
              R"("x":{"shape":[2],"dtype":"F32","data_offsets":[0,8]},"m":{"dtype":"BOOL","shape":[2],)"
              R"("data_offsets":[16,18]}}   )",
              data));
  REQUIRE(f.tensors.size() == 3);
  REQUIRE(f.metadata.at("format") == "pt");
  REQUIRE(f.find("x")->to_double() == std::vector<double>{1.5, -2.0});
  REQUIRE(f.find("x")->shape == std::vector<std::int64_t>{2});
  REQUIRE(f.find("ids")->to_int64() == std::vector<std::int64_t>{-100});
  REQUIRE(f.find("ids")->to_double() == std::vector<double>{-100.0});
  REQUIRE(f.find("m")->to_double() == std::vector<double>{1.0, 0.0});
  REQUIRE(f.tensors[0].name == "x");  // data order
  REQUIRE(f.find("nope") == nullptr);
}

TEST_CASE("safetensors: writer and reader round trip every dtype", "[io][safetensors]") {
  const std::vector<double> v = {1.5, -2.25, 0.0, 1024.0, -0.5, 3.0};
  safetensors_file f;
  for (st_dtype d :
       {st_dtype::f16, st_dtype::bf16, st_dtype::f32, st_dtype::f64, st_dtype::i64, st_dtype::i32, st_dtype::boolean})
    f.add(safetensor::from_doubles(std::string("t_") + st_dtype_name(d), d, {2, 3}, v));
  f.add(safetensor::from_int64("labels", {3}, std::vector<std::int64_t>{-100, 7, 1LL << 40}));
  f.add(safetensor::from_doubles("scalar", st_dtype::f64, {}, std::vector<double>{0.25}));
  f.add(safetensor::from_doubles("empty", st_dtype::f32, {0, 4}, std::vector<double>{}));
  f.metadata["step"] = "12";
  f.metadata["quote\"and\\slash\n"] = "tab\tend";
  const bytes_t bytes = serialize_safetensors(f);
  REQUIRE((bytes[0] | (bytes[1] << 8)) % 8 == 0);  // header padded to 8 bytes
  const auto g = parse_safetensors(bytes);
  REQUIRE(g.metadata == f.metadata);
  REQUIRE(g.tensors.size() == f.tensors.size());
  for (const auto& t : f.tensors) {
    const auto* r = g.find(t.name);
    REQUIRE(r != nullptr);
    CHECK(r->dtype == t.dtype);
    CHECK(r->shape == t.shape);
    CHECK(r->bytes == t.bytes);
  }
  // every value above is exact in every floating dtype; integers truncate; BOOL is non-zero
  for (const char* name : {"t_F16", "t_BF16", "t_F32", "t_F64"}) CHECK(g.find(name)->to_double() == v);
  CHECK(g.find("t_I64")->to_int64() == std::vector<std::int64_t>{1, -2, 0, 1024, 0, 3});
  CHECK(g.find("t_I32")->to_int64() == std::vector<std::int64_t>{1, -2, 0, 1024, 0, 3});
  CHECK(g.find("t_BOOL")->to_double() == std::vector<double>{1, 1, 0, 1, 1, 1});
  CHECK(g.find("labels")->to_int64() == std::vector<std::int64_t>{-100, 7, 1LL << 40});
  CHECK(g.find("scalar")->numel() == 1);
  CHECK(g.find("empty")->numel() == 0);

  const std::string path = "posttrain_test_roundtrip.safetensors";
  write_safetensors(path, f);
  const auto h = read_safetensors(path);
  std::remove(path.c_str());
  CHECK(h.find("t_F16")->to_double() == v);
}

TEST_CASE("safetensors: half-precision encodings round to nearest even", "[io][safetensors]") {
  auto half = [](double x) { return u16(safetensor::from_doubles("h", st_dtype::f16, {1}, {{x}}).bytes, 0); };
  auto bf16 = [](double x) { return u16(safetensor::from_doubles("b", st_dtype::bf16, {1}, {{x}}).bytes, 0); };
  CHECK(half(1.5) == 0x3E00);
  CHECK(half(-2.0) == 0xC000);
  CHECK(half(0.1) == 0x2E66);                             // 0.0999755859375
  CHECK(half(65504.0) == 0x7BFF);                         // the largest finite
  CHECK(half(65520.0) == 0x7C00);                         // rounds to infinity
  CHECK(half(std::ldexp(1.0, -24)) == 0x0001);            // the smallest subnormal
  CHECK(half(std::ldexp(1.0, -25)) == 0x0000);            // a tie: to even (zero)
  CHECK(half(3 * std::ldexp(1.0, -25)) == 0x0002);        // a tie: to even
  CHECK(half(1.0 + std::ldexp(1.0, -11)) == 0x3C00);      // a tie between 1 and 1 + 2^-10: even
  CHECK(half(1.0 + 3 * std::ldexp(1.0, -11)) == 0x3C02);  // a tie: even
  CHECK(bf16(1.5) == 0x3FC0);
  CHECK(bf16(1.0 + std::ldexp(1.0, -8)) == 0x3F80);      // a tie: even
  CHECK(bf16(1.0 + 3 * std::ldexp(1.0, -8)) == 0x3F82);  // a tie: even
  CHECK(std::isnan(safetensor::from_doubles("n", st_dtype::bf16, {1}, {{NAN}}).to_double()[0]));
  CHECK(std::isinf(safetensor::from_doubles("i", st_dtype::f16, {1}, {{1e6}}).to_double()[0]));
  // decoding: binary16 0x3555 = 0.333251953125, a subnormal 0x03FF = 1023 * 2^-24
  const auto f =
      parse_safetensors(file_of(R"({"h":{"dtype":"F16","shape":[2],"data_offsets":[0,4]}})", {0x55, 0x35, 0xFF, 0x03}));
  CHECK(f.find("h")->to_double() == std::vector<double>{0.333251953125, 1023 * std::ldexp(1.0, -24)});
}

TEST_CASE("safetensors: JSON escapes in names and metadata", "[io][safetensors]") {
  const auto f = parse_safetensors(
      file_of(R"({"__metadata__":{"k\u00e9y":"a\/b\u20ac\ud83d\ude00"},"x\n\"y":{"dtype":"F32","shape":[],)"
              R"("data_offsets":[0,4]}})",
              {0, 0, 0x80, 0x3F}));
  CHECK(f.metadata.at("k\xc3\xa9y") == "a/b\xe2\x82\xac\xf0\x9f\x98\x80");
  REQUIRE(f.find("x\n\"y") != nullptr);
  CHECK(f.find("x\n\"y")->to_double() == std::vector<double>{1.0});
}

TEST_CASE("safetensors: malformed files are posttrain::error naming the file and the problem", "[io][safetensors]") {
  const std::string ok = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  const bytes_t eight(8, 0);
  REQUIRE_NOTHROW(parse_safetensors(file_of(ok, eight)));
  expect_parse_error(bytes_t{1, 2, 3}, "truncated: 3 bytes");
  {
    bytes_t b = file_of(ok, eight);
    b.resize(20);
    expect_parse_error(b, "truncated: the header length says");
  }
  expect_parse_error(file_of(ok, bytes_t(6, 0)), "reach past the end of the data area (6 bytes)");
  expect_parse_error(file_of(ok, bytes_t(12, 0)), "bytes [8, 12) at the end of the data area belong to no tensor");
  {
    bytes_t b(8, 0xff);  // header length 2^64 - 1
    expect_parse_error(b, "exceeds the limit");
  }
  expect_parse_error(file_of(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},})", eight), "bad header JSON");
  expect_parse_error(file_of(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})", eight), "bad header JSON");
  expect_parse_error(file_of(R"({"a":1,"a":2})", {}), "duplicate key \"a\"");
  expect_parse_error(file_of("[1]", {}), "must start with '{'");
  expect_parse_error(file_of(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}} x)", eight),
                     "after the JSON value");
  expect_parse_error(file_of("{\"a\":" + std::string(100, '[') + std::string(100, ']') + "}", {}), "nested deeper");
  expect_parse_error(file_of(R"({"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})", eight),
                     "tensor 'a': unknown dtype \"Q4\"");
  expect_parse_error(file_of(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", eight),
                     "shape[0] must be a non-negative integer, got -2");
  expect_parse_error(file_of(R"({"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", eight),
                     "must be a non-negative integer");
  expect_parse_error(file_of(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", eight),
                     "needs 12 bytes but data_offsets [0, 8] hold 8");
  expect_parse_error(file_of(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", eight), "begin > end");
  expect_parse_error(file_of(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,99999999999999999999]}})", eight),
                     "overflows 64 bits");
  expect_parse_error(file_of(R"({"a":{"dtype":"F64","shape":[4294967296,4294967296,16],"data_offsets":[0,0]}})", {}),
                     "has too many elements");
  expect_parse_error(file_of(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"extra":1}})", eight),
                     "unknown field \"extra\"");
  expect_parse_error(file_of(R"({"a":{"dtype":"F32","shape":[2]}})", eight), "missing field \"data_offsets\"");
  expect_parse_error(file_of(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                             R"("b":{"dtype":"F32","shape":[1],"data_offsets":[2,6]}})",
                             bytes_t(6, 0)),
                     "overlaps tensor");
  expect_parse_error(file_of(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                             R"("b":{"dtype":"F32","shape":[1],"data_offsets":[6,10]}})",
                             bytes_t(10, 0)),
                     "bytes [4, 6) of the data area belong to no tensor");
  expect_parse_error(file_of(R"({"__metadata__":{"k":1}})", {}), "__metadata__[\"k\"] must be a string");
  REQUIRE_THROWS_AS(read_safetensors("/nonexistent/dir/x.safetensors"), posttrain::error);
}

TEST_CASE("safetensors: conversions and the writer reject what they cannot represent", "[io][safetensors]") {
  const auto t = safetensor::from_doubles("labels", st_dtype::f32, {2}, std::vector<double>{1.0, 2.5});
  REQUIRE_THROWS_WITH(t.to_int64(), Contains("tensor 'labels'") && Contains("non-integer 2.5 at index 1"));
  REQUIRE_THROWS_WITH(safetensor::from_doubles("x", st_dtype::f32, {2, 2}, std::vector<double>{1.0}),
                      Contains("tensor 'x' has shape [2, 2] (4 elements) but 1 values"));
  REQUIRE_THROWS_AS(safetensor::from_doubles("x", st_dtype::i64, {1}, std::vector<double>{1e300}), posttrain::error);
  safetensors_file f;
  f.add(safetensor::from_doubles("x", st_dtype::f32, {1}, std::vector<double>{1.0}));
  REQUIRE_THROWS_WITH(f.add(safetensor::from_doubles("x", st_dtype::f32, {1}, std::vector<double>{1.0})),
                      Contains("a tensor named 'x' exists"));
  f.tensors.push_back(f.tensors[0]);
  REQUIRE_THROWS_WITH(serialize_safetensors(f), Contains("two tensors are named 'x'"));
  f.tensors.pop_back();
  f.tensors[0].bytes.pop_back();
  REQUIRE_THROWS_WITH(serialize_safetensors(f), Contains("tensor 'x' has shape [1] of F32 but 3 bytes"));
}

}  // namespace test_safetensors
