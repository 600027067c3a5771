#include "runtime/tensor.hpp"

#include <cstdlib>
#include <cstring>
#include <sstream>

#include "kernels/half.hpp"
#include "runtime/error.hpp"

namespace moerl {

size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::F32: case DType::I32: return 4;
    case DType::BF16: case DType::F16: return 2;
    case DType::F8_E4M3: case DType::U8: return 1;
    case DType::I64: return 8;
  }
  return 0;
}

std::string_view dtype_name(DType dtype) {
  switch (dtype) {
    case DType::F32: return "F32";
    case DType::BF16: return "BF16";
    case DType::F16: return "F16";
    case DType::F8_E4M3: return "F8_E4M3";
    case DType::I64: return "I64";
    case DType::I32: return "I32";
    case DType::U8: return "U8";
  }
  return "?";
}

std::optional<DType> dtype_from_name(std::string_view name) {
  for (DType d : {DType::F32, DType::BF16, DType::F16, DType::F8_E4M3, DType::I64, DType::I32, DType::U8})
    if (dtype_name(d) == name) return d;
  return std::nullopt;
}

std::string shape_string(const Shape& shape) {
  std::ostringstream s;
  s << '[';
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << ']';
  return s.str();
}

int64_t shape_numel(const Shape& shape) {
  int64_t n = 1;
  // Checked: shapes come from files we do not control, and signed overflow is undefined behaviour.
  // if/throw rather than require(), which would build the message on every call of numel().
  for (int64_t d : shape)
    if (__builtin_mul_overflow(n, d, &n)) throw Error("tensor shape " + shape_string(shape) + " overflows 64 bits");
  return n;
}

void Tensor::Free::operator()(std::byte* p) const { std::free(p); }

Tensor::Tensor(Shape shape, DType dtype) : shape_(std::move(shape)), dtype_(dtype) {
  for (int64_t d : shape_)
    if (d < 0) throw Error("tensor shape " + shape_string(shape_) + " has a negative dimension");
  size_t total = 0;
  // The 2^62 cap keeps the rounding up below from wrapping; no machine has that much memory anyway.
  if (__builtin_mul_overflow(static_cast<size_t>(numel()), dtype_size(dtype_), &total) || total > (1ull << 62))
    throw Error("tensor shape " + shape_string(shape_) + " of " + std::string(dtype_name(dtype_)) +
                " overflows 64 bits");
  // 64-byte aligned (one cache line, one AVX-512 vector); at least one line so empty tensors own memory.
  const size_t n = (std::max<size_t>(nbytes(), 1) + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, n);
  if (!p) throw std::bad_alloc();
  std::memset(p, 0, n);
  storage_.reset(static_cast<std::byte*>(p));
}

Tensor Tensor::from_floats(Shape shape, std::span<const float> values) {
  Tensor t(std::move(shape), DType::F32);
  require(static_cast<int64_t>(values.size()) == t.numel(),
          "from_floats: " + std::to_string(values.size()) + " values for shape " + shape_string(t.shape()));
  std::memcpy(t.bytes(), values.data(), t.nbytes());
  return t;
}

Tensor Tensor::clone() const {
  Tensor t(shape_, dtype_);
  if (nbytes()) std::memcpy(t.bytes(), bytes(), nbytes());
  return t;
}

int64_t Tensor::dim(int i) const {
  const int r = rank();
  const int j = i < 0 ? i + r : i;
  if (j < 0 || j >= r)
    throw Error("dimension " + std::to_string(i) + " out of range for shape " + shape_string(shape_));
  return shape_[static_cast<size_t>(j)];
}

void Tensor::check_type(DType wanted) const {
  // Called by every data<T>(): the message is built only on failure.
  if (wanted != dtype_)
    throw Error("tensor of dtype " + std::string(dtype_name(dtype_)) + " accessed as " +
                std::string(dtype_name(wanted)));
}

uint16_t* Tensor::u16() {
  if (dtype_ != DType::BF16 && dtype_ != DType::F16)
    throw Error("tensor of dtype " + std::string(dtype_name(dtype_)) + " accessed as 16-bit codes (BF16/F16)");
  return reinterpret_cast<uint16_t*>(bytes());
}

const uint16_t* Tensor::u16() const { return const_cast<Tensor*>(this)->u16(); }

Tensor Tensor::reshaped(Shape shape) && {
  require(shape_numel(shape) == numel(),
          "cannot reshape " + shape_string(shape_) + " to " + shape_string(shape));
  Tensor t(std::move(*this));
  t.shape_ = std::move(shape);
  return t;
}

void Tensor::fill_zero() {
  if (nbytes()) std::memset(bytes(), 0, nbytes());
}

namespace {
bool is_float(DType d) { return d == DType::F32 || d == DType::BF16 || d == DType::F16; }
bool is_int(DType d) { return d == DType::I64 || d == DType::I32 || d == DType::U8; }

double load(const std::byte* p, DType d, int64_t i) {
  switch (d) {
    case DType::F32: return reinterpret_cast<const float*>(p)[i];
    case DType::BF16: return float_from_bf16(reinterpret_cast<const uint16_t*>(p)[i]);
    case DType::F16: return float_from_f16(reinterpret_cast<const uint16_t*>(p)[i]);
    case DType::I64: return static_cast<double>(reinterpret_cast<const int64_t*>(p)[i]);
    case DType::I32: return reinterpret_cast<const int32_t*>(p)[i];
    case DType::U8: return reinterpret_cast<const uint8_t*>(p)[i];
    case DType::F8_E4M3: break;
  }
  return 0;
}

void store(std::byte* p, DType d, int64_t i, double v) {
  switch (d) {
    case DType::F32: reinterpret_cast<float*>(p)[i] = static_cast<float>(v); break;
    case DType::BF16: reinterpret_cast<uint16_t*>(p)[i] = bf16_from_float(static_cast<float>(v)); break;
    case DType::F16: reinterpret_cast<uint16_t*>(p)[i] = f16_from_float(static_cast<float>(v)); break;
    case DType::I64: reinterpret_cast<int64_t*>(p)[i] = static_cast<int64_t>(v); break;
    case DType::I32: reinterpret_cast<int32_t*>(p)[i] = static_cast<int32_t>(v); break;
    case DType::U8: reinterpret_cast<uint8_t*>(p)[i] = static_cast<uint8_t>(v); break;
    case DType::F8_E4M3: break;
  }
}
}  // namespace

Tensor Tensor::to(DType dtype) const {
  if (dtype == dtype_) return clone();
  // FP8 needs scales to mean anything: it is produced by kernels/fp8.hpp quantization, not by a cast.
  require((is_float(dtype_) && is_float(dtype)) || (is_int(dtype_) && is_int(dtype)) ||
              (is_int(dtype_) && dtype == DType::F32) || (is_float(dtype_) && dtype == DType::I64),
          "cannot convert a " + std::string(dtype_name(dtype_)) + " tensor to " + std::string(dtype_name(dtype)));
  Tensor t(shape_, dtype);
  // int64 through double is exact only below 2^53; token ids and counts are far below.
  for (int64_t i = 0, n = numel(); i < n; ++i) store(t.bytes(), dtype, i, load(bytes(), dtype_, i));
  return t;
}

}  // namespace moerl
