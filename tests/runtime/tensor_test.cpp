#include "runtime/tensor.hpp"

#include <gtest/gtest.h>

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

}  // namespace moerl
