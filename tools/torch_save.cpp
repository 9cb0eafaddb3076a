// tools/torch_save.cpp — posttrain-verify's torch.save reader (see torch_save.hpp), built as a module that the
// tool loads with dlopen only when a dump is a torch.save file, so that checking a safetensors dump never pays
// LibTorch's start-up (about a second of CPU). The tool's only LibTorch translation unit; it includes LibTorch's
// serialization headers only (not torch/torch.h).
#include "torch_save.hpp"

#include <ATen/core/ivalue.h>
#include <caffe2/serialize/inline_container.h>
#include <caffe2/serialize/read_adapter_interface.h>
#include <torch/csrc/jit/serialization/unpickler.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

namespace posttrain_verify {
namespace {

static_assert(std::endian::native == std::endian::little, "the dump's bytes are copied as little-endian");

[[noreturn]] void fail(const std::string& message) { throw std::runtime_error(message); }

/// One line: LibTorch's messages may hold newlines (and, without what_without_backtrace, a backtrace).
std::string one_line(std::string text) {
  for (auto& c : text)
    if (c == '\n' || c == '\r') c = ' ';
  while (!text.empty() && text.back() == ' ') text.pop_back();
  return text;
}

/// The file's bytes as caffe2's reader wants them (no copy; `bytes` outlives the reader).
class span_adapter final : public caffe2::serialize::ReadAdapterInterface {
 public:
  explicit span_adapter(std::span<const unsigned char> bytes) : bytes_(bytes) {}
  size_t size() const override { return bytes_.size(); }
  size_t read(uint64_t pos, void* buf, size_t n, const char* /*what*/) const override {
    if (pos >= bytes_.size()) return 0;
    const size_t k = std::min<uint64_t>(n, bytes_.size() - pos);
    std::memcpy(buf, bytes_.data() + pos, k);
    return k;
  }

 private:
  std::span<const unsigned char> bytes_;
};

posttrain::io::st_dtype dtype_of(const at::Tensor& t, const std::string& name) {
  switch (t.scalar_type()) {
    case at::kDouble: return posttrain::io::st_dtype::f64;
    case at::kFloat: return posttrain::io::st_dtype::f32;
    case at::kBFloat16: return posttrain::io::st_dtype::bf16;
    case at::kHalf: return posttrain::io::st_dtype::f16;
    case at::kLong: return posttrain::io::st_dtype::i64;
    case at::kInt: return posttrain::io::st_dtype::i32;
    case at::kBool: return posttrain::io::st_dtype::boolean;
    default:
      fail("tensor '" + name + "' has dtype " + std::string(c10::toString(t.scalar_type())) +
           "; posttrain-verify reads float64, float32, bfloat16, float16, int64, int32 and bool");
  }
}

/// Checks `t` (straight from the unpickler) against its storage, whose bytes came from a record of
/// `record_bytes` bytes, then copies it out row-major.
posttrain::io::safetensor convert(const std::string& name, const at::Tensor& t,
                                  const std::map<const void*, size_t>& record_bytes) {
  if (t.layout() != at::kStrided || t.is_quantized() || t.is_sparse() || !t.device().is_cpu())
    fail("tensor '" + name + "' is not a dense CPU tensor");
  const posttrain::io::st_dtype dtype = dtype_of(t, name);
  const size_t item = posttrain::io::st_itemsize(dtype);
  const c10::Storage& storage = t.storage();
  const size_t nbytes = storage.nbytes();
  if (storage.data() != nullptr) {
    const auto r = record_bytes.find(storage.data());
    if (r == record_bytes.end()) fail("tensor '" + name + "': its storage comes from no record of the archive");
    if (nbytes > r->second)
      fail("tensor '" + name + "': its storage claims " + std::to_string(nbytes) + " bytes but its record holds " +
           std::to_string(r->second));
  } else if (nbytes != 0) {
    fail("tensor '" + name + "': its storage claims " + std::to_string(nbytes) + " bytes but has no record");
  }
  if (t.dim() > 64) fail("tensor '" + name + "' has " + std::to_string(t.dim()) + " dimensions");
  std::vector<std::int64_t> shape(t.sizes().begin(), t.sizes().end());
  const auto strides = t.strides();
  const std::int64_t offset = t.storage_offset();
  if (offset < 0) fail("tensor '" + name + "' has a negative storage offset");
  std::uint64_t numel = 1, last = static_cast<std::uint64_t>(offset);
  for (std::size_t k = 0; k < shape.size(); ++k) {
    if (shape[k] < 0 || strides[k] < 0) fail("tensor '" + name + "' has a negative size or stride");
    if (__builtin_mul_overflow(numel, static_cast<std::uint64_t>(shape[k]), &numel))
      fail("tensor '" + name + "' has too many elements");
  }
  if (numel > 0) {
    for (std::size_t k = 0; k < shape.size(); ++k) {
      std::uint64_t reach = 0;
      if (__builtin_mul_overflow(static_cast<std::uint64_t>(shape[k] - 1), static_cast<std::uint64_t>(strides[k]),
                                 &reach) ||
          __builtin_add_overflow(last, reach, &last))
        fail("tensor '" + name + "': its sizes and strides overflow");
    }
    std::uint64_t need = 0;
    if (__builtin_add_overflow(last, std::uint64_t{1}, &need) || __builtin_mul_overflow(need, item, &need) ||
        need > nbytes)
      fail("tensor '" + name + "' with shape " + posttrain::detail::shape_string(shape) + ", strides " +
           posttrain::detail::shape_string(std::vector<std::int64_t>(strides.begin(), strides.end())) + " and offset " +
           std::to_string(offset) + " reaches past its storage of " + std::to_string(nbytes) + " bytes");
  }
  posttrain::io::safetensor out{name, dtype, shape, {}};
  out.bytes.resize(static_cast<size_t>(numel) * item);
  if (numel > 0) {
    const at::Tensor c = t.contiguous();
    std::memcpy(out.bytes.data(), c.data_ptr(), out.bytes.size());
  }
  return out;
}

}  // namespace

void check_torch_pickle(std::string_view p) {
  auto bad = [](std::size_t at, const std::string& what) {
    fail("data.pkl: " + what + " at byte " + std::to_string(at));
  };
  std::size_t depth = 0;           // items on the stack
  std::vector<std::size_t> marks;  // the depth at each open MARK
  std::set<std::uint32_t> memo;    // memo slots written
  std::size_t i = 0;
  auto need = [&](std::size_t at, std::size_t n) {  // n argument bytes after the opcode at `at`
    if (p.size() - i < n) bad(at, "truncated argument");
  };
  auto le = [&](std::size_t n) {
    std::uint32_t v = 0;
    for (std::size_t k = 0; k < n; ++k)
      v |= static_cast<std::uint32_t>(static_cast<unsigned char>(p[i + k])) << (8 * k);
    i += n;
    return v;
  };
  auto above_mark = [&] { return depth - (marks.empty() ? 0 : marks.back()); };
  auto pop = [&](std::size_t at, std::size_t n) {
    if (above_mark() < n) bad(at, "stack underflow");
    depth -= n;
  };
  auto pop_mark = [&](std::size_t at) {  // pops to the last MARK and the MARK; returns the items popped
    if (marks.empty()) bad(at, "no MARK");
    const std::size_t n = depth - marks.back();
    depth = marks.back();
    marks.pop_back();
    return n;
  };
  if (p.size() < 2 || static_cast<unsigned char>(p[0]) != 0x80) fail("data.pkl: not a pickle (no PROTO opcode)");
  while (true) {
    if (i >= p.size()) fail("data.pkl: ends without STOP");
    const std::size_t at = i;
    const auto op = static_cast<unsigned char>(p[i++]);
    switch (op) {
      case 0x80:  // PROTO
        need(at, 1);
        if (le(1) > 2) bad(at, "pickle protocol above 2 (torch.save's default pickle_protocol=2 is supported)");
        break;
      case '(': marks.push_back(depth); break;  // MARK
      case '.':                                 // STOP
        if (depth != 1 || !marks.empty()) bad(at, "STOP with " + std::to_string(depth) + " items on the stack");
        return;
      case '0': pop(at, 1); break;                   // POP
      case '1': pop_mark(at); break;                 // POP_MARK
      case '2': pop(at, 1), depth += 2; break;       // DUP
      case 'J': need(at, 4), le(4), ++depth; break;  // BININT
      case 'K': need(at, 1), le(1), ++depth; break;  // BININT1
      case 'M': need(at, 2), le(2), ++depth; break;  // BININT2
      case 0x8a: {                                   // LONG1
        need(at, 1);
        const std::uint32_t n = le(1);
        need(at, n);
        i += n, ++depth;
        break;
      }
      case 'G': need(at, 8), i += 8, ++depth; break;  // BINFLOAT
      case 'X': {                                     // BINUNICODE
        need(at, 4);
        const std::uint32_t n = le(4);
        need(at, n);
        i += n, ++depth;
        break;
      }
      case 'c': {  // GLOBAL: "module\nname\n"
        for (int line = 0; line < 2; ++line) {
          const auto nl = p.find('\n', i);
          if (nl == std::string_view::npos) bad(at, "GLOBAL without its newline");
          i = nl + 1;
        }
        ++depth;
        break;
      }
      case 'N':
      case 0x88:
      case 0x89:
      case ')':
      case ']':
      case '}': ++depth; break;              // NONE TRUE FALSE () [] {}
      case 'Q': pop(at, 1), ++depth; break;  // BINPERSID
      case 'R': pop(at, 2), ++depth; break;  // REDUCE
      case 't':
      case 'l':
      case 'd': {  // TUPLE LIST DICT
        const std::size_t n = pop_mark(at);
        if (op == 'd' && n % 2 != 0) bad(at, "DICT with an odd number of items");
        ++depth;
        break;
      }
      case 0x85:
      case 0x86:
      case 0x87: pop(at, op - 0x84u), ++depth; break;  // TUPLE1..3
      case 'a': pop(at, 2), ++depth; break;            // APPEND
      case 's': pop(at, 3), ++depth; break;            // SETITEM
      case 'e':
      case 'u': {  // APPENDS SETITEMS: MARK items on top of the container
        const std::size_t n = pop_mark(at);
        if (op == 'u' && n % 2 != 0) bad(at, "SETITEMS with an odd number of items");
        if (above_mark() < 1) bad(at, "no container below the MARK");
        break;
      }
      case 'q':
      case 'r': {  // BINPUT LONG_BINPUT
        need(at, op == 'q' ? 1 : 4);
        const std::uint32_t slot = le(op == 'q' ? 1 : 4);
        if (above_mark() < 1) bad(at, "memo write from an empty stack");
        if (slot > memo.size()) bad(at, "memo slot " + std::to_string(slot) + " out of order");
        memo.insert(slot);
        break;
      }
      case 'h':
      case 'j': {  // BINGET LONG_BINGET
        need(at, op == 'h' ? 1 : 4);
        if (!memo.count(le(op == 'h' ? 1 : 4))) bad(at, "memo read of a slot never written");
        ++depth;
        break;
      }
      default: {
        static const char hex[] = "0123456789abcdef";
        bad(at, std::string("unsupported pickle opcode 0x") + hex[op >> 4] + hex[op & 15]);
      }
    }
  }
}

posttrain::io::safetensors_file read_torch_save(std::span<const unsigned char> bytes, const std::string& source) {
  const std::string where = source + ": torch.save file: ";
  try {
    caffe2::serialize::PyTorchStreamReader reader(std::make_shared<span_adapter>(bytes));
    if (!reader.hasRecord("data.pkl")) fail("the archive has no data.pkl (is it a torch.save file?)");
    auto [pickle_ptr, pickle_size] = reader.getRecord("data.pkl");
    const std::string_view pickle(static_cast<const char*>(pickle_ptr.get()), pickle_size);
    check_torch_pickle(pickle);
    std::size_t pos = 0;
    auto read = [&](char* buffer, size_t len) -> size_t {
      len = std::min(pickle.size() - pos, len);
      std::memcpy(buffer, pickle.data() + pos, len);
      pos += len;
      return len;
    };
    std::map<const void*, size_t> record_bytes;  // storage data -> its record's size
    auto read_record = [&](const std::string& key) {
      auto [ptr, size] = reader.getRecord("data/" + key);
      record_bytes[ptr.get()] = size;
      return std::move(ptr);
    };
    torch::jit::Unpickler unpickler(read, nullptr, nullptr, read_record, c10::Device(c10::kCPU));
    unpickler.set_version(reader.version());
    const c10::IValue root = unpickler.parse_ivalue();
    if (!root.isGenericDict())
      fail("holds a " + std::string(root.tagKind()) + ", not a dict of tensors (torch.save({name: tensor, ...}))");
    posttrain::io::safetensors_file file;
    for (const auto& kv : root.toGenericDict()) {
      if (!kv.key().isString()) fail("a key of the dict is a " + std::string(kv.key().tagKind()) + ", not a str");
      const std::string& name = kv.key().toStringRef();
      if (!kv.value().isTensor()) fail("'" + name + "' is a " + std::string(kv.value().tagKind()) + ", not a tensor");
      file.add(convert(name, kv.value().toTensor(), record_bytes));
    }
    file.metadata["format"] = "torch.save";
    return file;
  } catch (const c10::Error& e) {
    throw std::runtime_error(where + one_line(e.what_without_backtrace()));
  } catch (const std::runtime_error& e) {
    throw std::runtime_error(where + one_line(e.what()));
  } catch (const std::exception& e) {
    throw std::runtime_error(where + one_line(e.what()));
  }
}

}  // namespace posttrain_verify

/// The module's entry point, looked up by name (dlsym) in posttrain-verify: reads the torch.save file `bytes` into
/// `*out`, or sets `*error` to a one-line message. Never throws.
extern "C" __attribute__((visibility("default"))) void posttrain_verify_read_torch_save(
    const unsigned char* bytes, std::size_t size, const std::string* source, posttrain::io::safetensors_file* out,
    std::string* error) noexcept {
  try {
    *out = posttrain_verify::read_torch_save(std::span<const unsigned char>(bytes, size), *source);
  } catch (const std::exception& e) {
    *error = e.what();
  } catch (...) {
    *error = *source + ": torch.save file: unknown error";
  }
}
