// tools/torch_save.hpp — posttrain-verify's reader of torch.save files (a dict of tensors), built where LibTorch is
// found as the module posttrain_verify_torch (tools/torch_save.cpp, the tool's only LibTorch translation unit),
// which posttrain-verify loads with dlopen when a dump is a zip archive. The tool itself never links LibTorch.
// The module's C entry point, for dlsym:
//   extern "C" void posttrain_verify_read_torch_save(const unsigned char* bytes, std::size_t size,
//       const std::string* source, posttrain::io::safetensors_file* out, std::string* error) noexcept;
#pragma once

#include <span>
#include <string>
#include <string_view>

#include "posttrain/io/safetensors.hpp"

namespace posttrain_verify {

/// The tensors of a torch.save file in its default zip format (PyTorch >= 1.6: a zip archive holding
/// `<name>/data.pkl`, pickle protocol 2, and one `<name>/data/<key>` record per storage), read through LibTorch's
/// unpickler (torch::jit::Unpickler over caffe2's PyTorchStreamReader, what torch::jit::pickle_load does) and
/// converted to posttrain::io::safetensor (CPU, contiguous, little-endian), so the tool compares them as it
/// compares a safetensors dump. The object saved must be a dict of str -> tensor (F64/F32/BF16/F16/I64/I32/BOOL,
/// strided, dense); tensors saved on CUDA are loaded on the CPU.
///
/// The file is untrusted: before LibTorch unpickles it, data.pkl is walked opcode by opcode (only the opcodes
/// torch.save writes for a dict of tensors at protocol 2; every pop checked against the stack depth and the
/// marks, every memo read against the memo writes) because LibTorch 1.13's unpickler does not check its stack
/// (a TUPLE1 on an empty stack crashes it). After unpickling, every storage is checked against the byte size of
/// its record and every tensor's sizes, strides and offset against its storage, before a byte is read.
/// Throws std::runtime_error with a one-line message naming `source` on anything malformed.
posttrain::io::safetensors_file read_torch_save(std::span<const unsigned char> bytes, const std::string& source);

/// Checks that `pickle` is a protocol-2 pickle of the subset torch.save writes for a dict of tensors, with
/// consistent stack use; throws std::runtime_error ("data.pkl: ...") otherwise. Standard C++ only.
void check_torch_pickle(std::string_view pickle);

}  // namespace posttrain_verify
