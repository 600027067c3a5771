#include "runtime/safetensors.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "runtime/error.hpp"

namespace moerl {

// Checks on every tensor of every file use `if (...) throw Error(...)` rather than require(), whose
// message would be built even when the check passes.
namespace {

// A header is a few hundred bytes per tensor; 100 MB would describe ~10^6 tensors. Anything larger is a
// corrupt length field, and refusing it keeps a hostile file from making us allocate gigabytes.
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;
constexpr const char* kMetadataKey = "__metadata__";

struct Entry {
  const std::string* name;
  uint64_t begin, end;
};

// A JSON value's type for messages; never the value itself (it may be megabytes of hostile text).
std::string kind(const nlohmann::json& v) { return v.type_name(); }

uint64_t read_u64_le(const std::byte* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | std::to_integer<uint64_t>(p[i]);
  return v;
}

// A non-negative JSON integer that fits in int64; `what` names it in the error.
uint64_t non_negative_integer(const nlohmann::json& v, const std::string& what) {
  if (v.is_number_unsigned()) {
    const uint64_t u = v.get<uint64_t>();
    if (u > static_cast<uint64_t>(INT64_MAX)) throw Error(what + " is " + std::to_string(u) + ", beyond 2^63 - 1");
    return u;
  }
  if (v.is_number_integer()) throw Error(what + " is negative (" + std::to_string(v.get<int64_t>()) + ")");
  throw Error(what + " must be a non-negative integer, got a JSON " + kind(v));
}

Shape parse_shape(const nlohmann::json& v, const std::string& where) {
  if (!v.is_array()) throw Error(where + ": \"shape\" must be an array, got a JSON " + kind(v));
  Shape shape;
  shape.reserve(v.size());
  for (size_t i = 0; i < v.size(); ++i)
    shape.push_back(static_cast<int64_t>(non_negative_integer(v[i], where + ": shape[" + std::to_string(i) + "]")));
  return shape;
}

void parse_metadata(const nlohmann::json& v, const std::string& source, std::map<std::string, std::string>& out) {
  if (!v.is_object()) throw Error(source + ": \"__metadata__\" must be an object of strings, got a JSON " + kind(v));
  for (const auto& [key, value] : v.items()) {
    if (!value.is_string())
      throw Error(source + ": __metadata__[\"" + key + "\"] must be a string, got a JSON " + kind(value));
    out[key] = value.get<std::string>();
  }
}

// Writes all of `n` bytes, retrying on short writes and EINTR.
void write_all(int fd, const std::byte* p, size_t n, const std::string& file) {
  while (n > 0) {
    const ssize_t w = ::write(fd, p, std::min<size_t>(n, 1u << 30));
    if (w < 0 && errno == EINTR) continue;
    require(w > 0, file + ": write failed: " + std::strerror(errno));
    p += w;
    n -= static_cast<size_t>(w);
  }
}

// Closes the descriptor and removes the temporary file unless released: no half-written leftovers.
struct TempFile {
  std::string path;
  int fd = -1;
  bool keep = false;
  ~TempFile() {
    if (fd >= 0) ::close(fd);
    if (!keep) ::unlink(path.c_str());
  }
};

}  // namespace

const Tensor& SafeTensors::at(const std::string& name) const {
  auto it = tensors.find(name);
  require(it != tensors.end(), source + ": no tensor named \"" + name + "\"");
  return it->second;
}

SafeTensors parse_safetensors(std::span<const std::byte> bytes, const std::string& source) {
  SafeTensors st;
  st.source = source;
  require(bytes.size() >= 8, source + ": file is " + std::to_string(bytes.size()) +
                                 " bytes, too short for the 8-byte header length (truncated)");
  const uint64_t header_len = read_u64_le(bytes.data());
  require(header_len <= kMaxHeaderBytes, source + ": header length " + std::to_string(header_len) +
                                             " is absurd (limit " + std::to_string(kMaxHeaderBytes) + " bytes)");
  require(header_len <= bytes.size() - 8, source + ": header length " + std::to_string(header_len) +
                                              " goes beyond the end of the file (" + std::to_string(bytes.size()) +
                                              " bytes)");
  const char* header_begin = reinterpret_cast<const char*>(bytes.data() + 8);
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(header_begin, header_begin + header_len);
  } catch (const nlohmann::json::exception& e) {
    throw Error(source + ": header is not valid JSON: " + e.what());
  }
  require(header.is_object(), source + ": header must be a JSON object, got a JSON " + kind(header));

  const std::span<const std::byte> data = bytes.subspan(8 + header_len);
  std::vector<Entry> entries;
  std::map<std::string, Tensor> tensors;
  for (const auto& [name, entry] : header.items()) {
    if (name == kMetadataKey) {
      parse_metadata(entry, source, st.metadata);
      continue;
    }
    const std::string where = source + ": tensor \"" + name + "\"";
    if (!entry.is_object()) throw Error(where + " must be an object, got a JSON " + kind(entry));
    for (const char* field : {"dtype", "shape", "data_offsets"})
      if (!entry.contains(field)) throw Error(where + " has no \"" + field + "\"");

    const auto& dtype_json = entry["dtype"];
    if (!dtype_json.is_string()) throw Error(where + ": \"dtype\" must be a string, got a JSON " + kind(dtype_json));
    const std::string dtype_str = dtype_json.get<std::string>();
    const std::optional<DType> dtype = dtype_from_name(dtype_str);
    if (!dtype)
      throw Error(where + " has unknown dtype \"" + dtype_str +
                  "\" (expected F32, BF16, F16, F8_E4M3, I64, I32 or U8)");

    Shape shape = parse_shape(entry["shape"], where);
    // Checked product in the order Tensor::numel() multiplies, so no later computation can overflow.
    uint64_t nbytes = dtype_size(*dtype);
    for (int64_t d : shape)
      if (__builtin_mul_overflow(nbytes, static_cast<uint64_t>(d), &nbytes) || nbytes > uint64_t{INT64_MAX})
        throw Error(where + ": shape " + shape_string(shape) + " overflows 64 bits");

    const auto& offsets = entry["data_offsets"];
    if (!offsets.is_array() || offsets.size() != 2)
      throw Error(where + ": \"data_offsets\" must be an array [begin, end], got a JSON " + kind(offsets) +
                  (offsets.is_array() ? " of " + std::to_string(offsets.size()) + " elements" : ""));
    const uint64_t begin = non_negative_integer(offsets[0], where + ": data_offsets[0]");
    const uint64_t end = non_negative_integer(offsets[1], where + ": data_offsets[1]");
    if (begin > end || end > data.size() || end - begin != nbytes) {
      const std::string range = where + ": data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) + "]";
      if (begin > end) throw Error(range + " have begin after end");
      if (end > data.size())
        throw Error(range + " go beyond the data section (" + std::to_string(data.size()) + " bytes)");
      throw Error(range + " hold " + std::to_string(end - begin) + " bytes but " + std::string(dtype_name(*dtype)) +
                  " " + shape_string(shape) + " needs " + std::to_string(nbytes) + " (size mismatch)");
    }

    // nbytes <= data.size() here, so the allocation is bounded by the input's size.
    Tensor t(std::move(shape), *dtype);
    if (nbytes) std::memcpy(t.bytes(), data.data() + begin, nbytes);
    auto it = tensors.emplace(name, std::move(t)).first;
    entries.push_back({&it->first, begin, end});
  }

  // Empty tensors own no bytes and cannot overlap anything.
  std::erase_if(entries, [](const Entry& e) { return e.begin == e.end; });
  std::sort(entries.begin(), entries.end(),
            [](const Entry& a, const Entry& b) { return std::tie(a.begin, a.end) < std::tie(b.begin, b.end); });
  for (size_t i = 1; i < entries.size(); ++i) {
    const Entry& a = entries[i - 1];
    const Entry& b = entries[i];
    if (b.begin < a.end)
      throw Error(source + ": tensors \"" + *a.name + "\" [" + std::to_string(a.begin) + ", " + std::to_string(a.end) +
                  "] and \"" + *b.name + "\" [" + std::to_string(b.begin) + ", " + std::to_string(b.end) +
                  "] have overlapping data_offsets");
  }
  st.tensors = std::move(tensors);
  return st;
}

SafeTensors read_safetensors(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  require(in.good(), file.string() + ": cannot open for reading: " + std::strerror(errno));
  std::error_code ec;
  const uintmax_t size = std::filesystem::file_size(file, ec);
  require(!ec, file.string() + ": cannot read its size: " + ec.message());
  std::vector<std::byte> bytes(static_cast<size_t>(size));
  in.read(reinterpret_cast<char*>(bytes.data()), static_cast<std::streamsize>(size));
  require(in.gcount() == static_cast<std::streamsize>(size),
          file.string() + ": read " + std::to_string(in.gcount()) + " of " + std::to_string(size) + " bytes");
  return parse_safetensors(bytes, file.string());
}

namespace {

// The 8-byte length and the JSON header of `tensors` (data offsets in name order), padded to 8 bytes.
std::string encode_header(const std::map<std::string, const Tensor*>& tensors,
                          const std::map<std::string, std::string>& metadata, const std::string& fname,
                          std::byte (&len)[8]) {
  // __metadata__ first, then tensors in name order with contiguous offsets.
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header[kMetadataKey] = metadata;
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    if (name == kMetadataKey) throw Error(fname + ": a tensor may not be named __metadata__");
    if (t == nullptr || t->empty()) throw Error(fname + ": tensor \"" + name + "\" has no storage");
    header[name] = {{"dtype", dtype_name(t->dtype())},
                    {"shape", t->shape()},
                    {"data_offsets", {offset, offset + t->nbytes()}}};
    offset += t->nbytes();
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const nlohmann::json::exception& e) {  // names or metadata that are not UTF-8
    throw Error(fname + ": cannot encode the header: " + e.what());
  }
  // Pad with spaces so the data section starts 8-byte aligned, as the reference writer does.
  text.append((8 - text.size() % 8) % 8, ' ');
  for (int i = 0; i < 8; ++i) len[i] = static_cast<std::byte>((static_cast<uint64_t>(text.size()) >> (8 * i)) & 0xff);
  return text;
}

}  // namespace

std::vector<std::byte> encode_safetensors(const std::map<std::string, const Tensor*>& tensors,
                                          const std::map<std::string, std::string>& metadata,
                                          const std::string& source) {
  std::byte len[8];
  const std::string text = encode_header(tensors, metadata, source, len);
  size_t total = 8 + text.size();
  for (const auto& [name, t] : tensors) total += t->nbytes();
  std::vector<std::byte> out(total);
  std::memcpy(out.data(), len, 8);
  std::memcpy(out.data() + 8, text.data(), text.size());
  size_t at = 8 + text.size();
  for (const auto& [name, t] : tensors) {
    std::memcpy(out.data() + at, t->bytes(), t->nbytes());
    at += t->nbytes();
  }
  return out;
}

void write_safetensors(const std::filesystem::path& file, const std::map<std::string, const Tensor*>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  const std::string fname = file.string();
  std::byte len[8];
  const std::string text = encode_header(tensors, metadata, fname, len);
  const std::filesystem::path dir = file.has_parent_path() ? file.parent_path() : std::filesystem::path(".");
  TempFile tmp;
  // Unique per process and call, so concurrent writers never share a temporary.
  static std::atomic<uint64_t> counter{0};
  std::string tmp_name = file.filename().string();
  tmp_name.insert(tmp_name.begin(), '.');  // hidden; built without "." + string&&, which trips GCC 12 -Wrestrict
  tmp_name += ".tmp." + std::to_string(::getpid()) + "." + std::to_string(counter++);
  tmp.path = (dir / tmp_name).string();
  tmp.fd = ::open(tmp.path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  require(tmp.fd >= 0, tmp.path + ": cannot create: " + std::strerror(errno));
  write_all(tmp.fd, len, 8, tmp.path);
  write_all(tmp.fd, reinterpret_cast<const std::byte*>(text.data()), text.size(), tmp.path);
  for (const auto& [name, t] : tensors) write_all(tmp.fd, t->bytes(), t->nbytes(), tmp.path);
  require(::fsync(tmp.fd) == 0, tmp.path + ": fsync failed: " + std::strerror(errno));
  const int rc = ::close(tmp.fd);
  tmp.fd = -1;
  require(rc == 0, tmp.path + ": close failed: " + std::strerror(errno));
  require(::rename(tmp.path.c_str(), fname.c_str()) == 0,
          fname + ": cannot rename " + tmp.path + " over it: " + std::strerror(errno));
  tmp.keep = true;
  // The rename is durable only once the folder's entry is on disk.
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  require(dfd >= 0, dir.string() + ": cannot open folder to fsync: " + std::strerror(errno));
  const int drc = ::fsync(dfd);
  ::close(dfd);
  require(drc == 0, dir.string() + ": fsync of folder failed: " + std::strerror(errno));
}

}  // namespace moerl
