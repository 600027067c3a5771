// safetensors files (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length,
// a JSON header {"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}},
// then the raw little-endian tensor bytes. Dtypes: F32, BF16, F16, F8_E4M3, I64, I32, U8.
#pragma once
#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "runtime/tensor.hpp"

namespace moerl {

struct SafeTensors {
  std::map<std::string, Tensor> tensors;
  std::map<std::string, std::string> metadata;

  // The tensor `name`; throws moerl::Error naming it (and `source`) when absent.
  const Tensor& at(const std::string& name) const;
  std::string source;  // file name, for error messages
};

// Parses a whole file. Any malformation (truncated header, bad JSON, unknown dtype, offsets out of range
// or overlapping, shape/size mismatch) throws moerl::Error naming the file and the problem; never crashes.
SafeTensors read_safetensors(const std::filesystem::path& file);
SafeTensors parse_safetensors(std::span<const std::byte> bytes, const std::string& source);

// Writes atomically: a temporary file in the same folder, fsync, rename over `file`.
// Tensors are written in name order, 8-byte aligned header as the reference implementation does.
void write_safetensors(const std::filesystem::path& file, const std::map<std::string, const Tensor*>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// The bytes write_safetensors would write (parse_safetensors reads them back): tensors moved between
// processes (PartyGroup's checkpoint gathers its parties' weights this way). `source` names it in errors.
std::vector<std::byte> encode_safetensors(const std::map<std::string, const Tensor*>& tensors,
                                          const std::map<std::string, std::string>& metadata = {},
                                          const std::string& source = "safetensors buffer");

}  // namespace moerl
