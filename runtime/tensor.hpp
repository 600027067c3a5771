// Tensor: a small owning n-d array with contiguous row-major storage. No views, no autograd, no
// broadcasting: the model's forward and backward passes are written out by hand over raw pointers;
// this type only owns memory, knows its shape and dtype, and moves between files and devices.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace moerl {

// The element types of safetensors files that moerl reads and writes.
enum class DType : uint8_t { F32, BF16, F16, F8_E4M3, I64, I32, U8 };

size_t dtype_size(DType dtype);                         // bytes per element
std::string_view dtype_name(DType dtype);               // the safetensors spelling: "F32", "F8_E4M3", ...
std::optional<DType> dtype_from_name(std::string_view name);

enum class Device : uint8_t { CPU, CUDA };

using Shape = std::vector<int64_t>;
std::string shape_string(const Shape& shape);           // "[2, 48, 512]"
int64_t shape_numel(const Shape& shape);

template <class T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::F32; }
template <> constexpr DType dtype_of<int64_t>() { return DType::I64; }
template <> constexpr DType dtype_of<int32_t>() { return DType::I32; }
template <> constexpr DType dtype_of<uint8_t>() { return DType::U8; }

class Tensor {
 public:
  Tensor() = default;
  // Zero-filled storage of the given shape and dtype, on the CPU.
  explicit Tensor(Shape shape, DType dtype = DType::F32);
  // A float tensor holding `values` (size must equal the shape's element count).
  static Tensor from_floats(Shape shape, std::span<const float> values);

  Tensor(Tensor&&) noexcept = default;
  Tensor& operator=(Tensor&&) noexcept = default;
  Tensor(const Tensor&) = delete;             // copies are explicit: clone()
  Tensor& operator=(const Tensor&) = delete;
  Tensor clone() const;

  const Shape& shape() const { return shape_; }
  int64_t dim(int i) const;                   // negative i counts from the end
  int rank() const { return static_cast<int>(shape_.size()); }
  int64_t numel() const { return shape_numel(shape_); }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }
  DType dtype() const { return dtype_; }
  Device device() const { return Device::CPU; }
  bool empty() const { return storage_ == nullptr; }

  std::byte* bytes() { return storage_.get(); }
  const std::byte* bytes() const { return storage_.get(); }
  // Typed access; throws if T does not match the dtype (BF16/F16/F8 have no C++ type: use u16()/bytes()).
  template <class T> T* data() { check_type(dtype_of<T>()); return reinterpret_cast<T*>(bytes()); }
  template <class T> const T* data() const { check_type(dtype_of<T>()); return reinterpret_cast<const T*>(bytes()); }
  template <class T> std::span<T> span() { return {data<T>(), static_cast<size_t>(numel())}; }
  template <class T> std::span<const T> span() const { return {data<T>(), static_cast<size_t>(numel())}; }
  // The raw 16-bit codes of a BF16 or F16 tensor (kernels/half.hpp converts them); throws for other dtypes.
  uint16_t* u16();
  const uint16_t* u16() const;

  // Same bytes, another shape with the same element count.
  Tensor reshaped(Shape shape) &&;
  // A copy converted to another dtype (F32 <-> BF16/F16 round to nearest even; integers exactly).
  Tensor to(DType dtype) const;
  void fill_zero();

 private:
  struct Free { void operator()(std::byte* p) const; };
  void check_type(DType wanted) const;
  Shape shape_;
  DType dtype_ = DType::F32;
  std::unique_ptr<std::byte[], Free> storage_;
};

}  // namespace moerl
