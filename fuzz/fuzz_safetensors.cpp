// fuzz/fuzz_safetensors.cpp — the safetensors reader (posttrain/io/safetensors.hpp) on arbitrary bytes: a dump
// handed to posttrain-verify is untrusted input.
// Invariants: parse_safetensors either returns or throws posttrain::error (any other exception, a crash, a
// read past the end or undefined behaviour is a finding); what it returns is consistent (each tensor's bytes
// are its shape's element count times the item size, names are unique); writing it back and reading that
// again gives the same tensors and metadata; every element converts to double, and to_int64 either converts
// or throws posttrain::error.
#include <cstddef>
#include <cstdint>
#include <set>
#include <span>
#include <string>

#include "fuzz_support.hpp"
#include "posttrain/io/safetensors.hpp"

using namespace posttrain;
using namespace posttrain::fuzz;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const unsigned char> bytes(reinterpret_cast<const unsigned char*>(data), size);
  io::safetensors_file file;
  if (!call("io::parse_safetensors", [&] { file = io::parse_safetensors(bytes, "fuzz input"); })) return 0;
  std::set<std::string> names;
  for (const auto& t : file.tensors) {
    if (!names.insert(t.name).second) finding("parse_safetensors: two tensors named '" + t.name + "'");
    for (auto d : t.shape)
      if (d < 0) finding("parse_safetensors: tensor '" + t.name + "' has a negative extent");
    if (static_cast<std::uint64_t>(t.numel()) * io::st_itemsize(t.dtype) != t.bytes.size())
      finding("parse_safetensors: tensor '" + t.name + "' has " + std::to_string(t.bytes.size()) + " bytes for shape " +
              detail::shape_string(t.shape));
    const auto values = t.to_double();
    if (values.size() != static_cast<std::size_t>(t.numel())) finding("to_double: wrong element count");
    call("safetensor::to_int64", [&] { (void)t.to_int64(); });
  }
  io::safetensors_file again;
  if (!call("io::serialize_safetensors round trip",
            [&] { again = io::parse_safetensors(io::serialize_safetensors(file), "round trip"); }))
    finding("a parsed file does not survive writing and reading back");
  if (again.metadata != file.metadata) finding("round trip: metadata differs");
  if (again.tensors.size() != file.tensors.size()) finding("round trip: tensor count differs");
  for (std::size_t i = 0; i < file.tensors.size(); ++i) {
    const auto& a = file.tensors[i];
    const auto* b = again.find(a.name);
    if (!b || b->dtype != a.dtype || b->shape != a.shape || b->bytes != a.bytes)
      finding("round trip: tensor '" + a.name + "' differs");
  }
  return 0;
}
