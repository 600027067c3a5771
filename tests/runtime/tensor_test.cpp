#include "runtime/tensor.hpp"

#include <gtest/gtest.h>

#include <vector>

#include "runtime/error.hpp"

namespace moerl {

TEST(Tensor, StartsZeroFilledWithItsShapeAndDtype) {
  Tensor t({2, 3}, DType::BF16);
  EXPECT_EQ(t.numel(), 6);
  EXPECT_EQ(t.nbytes(), 12u);
  EXPECT_EQ(t.dim(-1), 3);
  for (int i = 0; i < 12; ++i) EXPECT_EQ(t.bytes()[i], std::byte{0});
}

TEST(Tensor, RefusesTypedAccessWithTheWrongType) {
  Tensor t({4}, DType::I64);
  EXPECT_THROW(t.data<float>(), Error);
  EXPECT_NO_THROW(t.data<int64_t>());
}

TEST(Tensor, ConvertsToBf16WithRoundToNearestEven) {
  // 1 + 2^-8 lies exactly between two BF16 neighbours (1 and 1 + 2^-7): ties go to the even one, 1.
  const float values[] = {1.0f + 1.0f / 256, 1.0f + 3.0f / 256, -2.5f};
  Tensor t = Tensor::from_floats({3}, values).to(DType::BF16).to(DType::F32);
  EXPECT_EQ(t.data<float>()[0], 1.0f);
  EXPECT_EQ(t.data<float>()[1], 1.0f + 4.0f / 256);
  EXPECT_EQ(t.data<float>()[2], -2.5f);
}

TEST(Tensor, RefusesANegativeDimension) {
  EXPECT_THROW(Tensor({2, -1}), Error);
}

TEST(Tensor, RefusesShapesWhoseSizeOverflowsInsteadOfWrapping) {
  // 2^32 * 2^32 wraps to 0 in 64-bit arithmetic: unchecked, this would be a 0-byte tensor.
  EXPECT_THROW(shape_numel({int64_t{1} << 32, int64_t{1} << 32}), Error);
  EXPECT_THROW(Tensor({int64_t{1} << 32, int64_t{1} << 32}, DType::U8), Error);
  // 2^62 elements fit in int64, but 2^64 bytes of F32 do not fit in size_t.
  EXPECT_THROW(Tensor({int64_t{1} << 62}, DType::F32), Error);
  EXPECT_EQ(shape_numel({0, int64_t{1} << 62, 4}), 0);
}

TEST(Tensor, ClonesIntoIndependentStorage) {
  Tensor a = Tensor::from_floats({2}, std::vector<float>{1, 2});
  Tensor b = a.clone();
  b.data<float>()[0] = 5;
  EXPECT_EQ(a.data<float>()[0], 1.0f);
  EXPECT_EQ(b.shape(), a.shape());
}

TEST(Tensor, GivesSixteenBitCodesOfHalfTensorsOnly) {
  Tensor t = Tensor::from_floats({2}, std::vector<float>{1.0f, -2.0f}).to(DType::BF16);
  EXPECT_EQ(t.u16()[0], 0x3f80);  // BF16 1.0: the top half of FP32 0x3f800000
  EXPECT_EQ(t.u16()[1], 0xc000);
  EXPECT_NO_THROW(Tensor({1}, DType::F16).u16());
  EXPECT_THROW(Tensor({1}, DType::F32).u16(), Error);
}

}  // namespace moerl
