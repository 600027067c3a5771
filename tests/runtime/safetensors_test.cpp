#include "runtime/safetensors.hpp"

#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <random>

#include "runtime/error.hpp"

namespace moerl {
namespace {

namespace fs = std::filesystem;
using Bytes = std::vector<std::byte>;

// A safetensors file from a header text and `data_bytes` bytes of data (0, 1, 2, ...).
Bytes make_file(const std::string& header, size_t data_bytes) {
  Bytes b(8 + header.size() + data_bytes);
  for (int i = 0; i < 8; ++i) b[static_cast<size_t>(i)] = static_cast<std::byte>((header.size() >> (8 * i)) & 0xff);
  std::memcpy(b.data() + 8, header.data(), header.size());
  for (size_t i = 0; i < data_bytes; ++i) b[8 + header.size() + i] = static_cast<std::byte>(i & 0xff);
  return b;
}

// The message of the moerl::Error that parsing `bytes` throws; fails the test when it parses.
std::string parse_error(const Bytes& bytes) {
  try {
    parse_safetensors(bytes, "bad.safetensors");
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "parsed without error";
  return "";
}

// A fresh folder under the test's temporary directory, removed at the end of the test.
struct TempDir {
  fs::path path;
  TempDir() {
    path = fs::path(::testing::TempDir()) /
           ("moerl_st_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
};

Bytes file_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::string s((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  Bytes b(s.size());
  std::memcpy(b.data(), s.data(), s.size());
  return b;
}

TEST(SafeTensors, RoundTripsEveryDtypeWithMetadata) {
  TempDir dir;
  std::map<std::string, Tensor> owned;
  const DType all[] = {DType::F32, DType::BF16, DType::F16, DType::F8_E4M3, DType::I64, DType::I32, DType::U8};
  int k = 0;
  for (DType d : all) {
    Tensor t({3, 5}, d);
    for (size_t i = 0; i < t.nbytes(); ++i)
      t.bytes()[i] = static_cast<std::byte>((i * 37 + static_cast<size_t>(k)) & 0xff);
    owned.emplace("t." + std::string(dtype_name(d)), std::move(t));
    ++k;
  }
  owned.emplace("empty", Tensor({0, 4}, DType::F32));
  owned.emplace("scalar", Tensor::from_floats({}, std::vector<float>{2.5f}));
  std::map<std::string, const Tensor*> view;
  for (auto& [name, t] : owned) view[name] = &t;
  const std::map<std::string, std::string> meta = {{"format", "pt"}, {"step", "12"}};

  const fs::path file = dir.path / "all.safetensors";
  write_safetensors(file, view, meta);
  const SafeTensors st = read_safetensors(file);
  EXPECT_EQ(st.metadata, meta);
  ASSERT_EQ(st.tensors.size(), owned.size());
  for (const auto& [name, t] : owned) {
    const Tensor& r = st.at(name);
    EXPECT_EQ(r.dtype(), t.dtype()) << name;
    EXPECT_EQ(r.shape(), t.shape()) << name;
    ASSERT_EQ(r.nbytes(), t.nbytes()) << name;
    EXPECT_EQ(std::memcmp(r.bytes(), t.bytes(), t.nbytes()), 0) << name;
  }
  // The temporary file was renamed away: the folder holds the checkpoint only.
  EXPECT_EQ(std::distance(fs::directory_iterator(dir.path), fs::directory_iterator()), 1);
}

TEST(SafeTensors, WritesAnAlignedHeaderAndContiguousDataInNameOrder) {
  TempDir dir;
  Tensor a({3}, DType::U8), b({2}, DType::F32), c({1}, DType::I64);
  const fs::path file = dir.path / "x.safetensors";
  write_safetensors(file, {{"c", &c}, {"a", &a}, {"b", &b}}, {{"k", "v"}});
  const Bytes bytes = file_bytes(file);
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | std::to_integer<uint64_t>(bytes[static_cast<size_t>(i)]);
  EXPECT_EQ(n % 8, 0u);
  EXPECT_EQ(bytes.size(), 8 + n + 3 + 8 + 8);
  const std::string header(reinterpret_cast<const char*>(bytes.data() + 8), n);
  EXPECT_NE(header.find("\"__metadata__\":{\"k\":\"v\"}"), std::string::npos) << header;
  EXPECT_NE(header.find("\"a\":{\"dtype\":\"U8\",\"shape\":[3],\"data_offsets\":[0,3]}"), std::string::npos) << header;
  EXPECT_NE(header.find("\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[3,11]}"), std::string::npos);
  EXPECT_NE(header.find("\"c\":{\"dtype\":\"I64\",\"shape\":[1],\"data_offsets\":[11,19]}"), std::string::npos);
}

TEST(SafeTensors, ReplacesAnExistingFileWhole) {
  TempDir dir;
  const fs::path file = dir.path / "ckpt.safetensors";
  Tensor big({1000}, DType::F32), small = Tensor::from_floats({1}, std::vector<float>{7.0f});
  write_safetensors(file, {{"w", &big}});
  write_safetensors(file, {{"w", &small}});
  const SafeTensors st = read_safetensors(file);
  EXPECT_EQ(st.at("w").shape(), Shape{1});
  EXPECT_EQ(st.at("w").data<float>()[0], 7.0f);
}

TEST(SafeTensors, ReadsTheTinyDeepSeekFixture) {
  const fs::path dir = fs::path(MOERL_TEST_FIXTURES) / "deepseek-v3-tiny";
  const SafeTensors model = read_safetensors(dir / "model.safetensors");
  // 3 (embeddings, final norm, lm_head) + 12 (dense layer 0) + 2 x 38 (MoE layers 1-2, 8 experts + shared).
  EXPECT_EQ(model.tensors.size(), 91u);
  EXPECT_EQ(model.metadata.at("format"), "pt");
  EXPECT_EQ(model.at("lm_head.weight").shape(), (Shape{512, 64}));
  EXPECT_EQ(model.at("lm_head.weight").dtype(), DType::F32);
  EXPECT_EQ(model.at("model.layers.1.mlp.experts.7.down_proj.weight").shape(), (Shape{64, 32}));
  EXPECT_EQ(model.at("model.layers.2.self_attn.kv_a_proj_with_mqa.weight").shape(), (Shape{24, 64}));
  EXPECT_EQ(model.at("model.layers.1.mlp.gate.e_score_correction_bias").shape(), (Shape{8}));
  for (const auto& [name, t] : model.tensors) EXPECT_EQ(t.dtype(), DType::F32) << name;

  const SafeTensors ref = read_safetensors(dir / "reference.safetensors");
  const Tensor& ids = ref.at("input_ids");
  EXPECT_EQ(ids.dtype(), DType::I64);
  EXPECT_EQ(ids.shape(), (Shape{2, 48}));
  for (int64_t id : ids.span<int64_t>()) EXPECT_TRUE(id >= 0 && id < 512) << id;
  EXPECT_EQ(ref.at("loss").shape(), Shape{1});
  EXPECT_THROW(ref.at("no.such.tensor"), Error);
}

TEST(SafeTensors, NamesTheMissingTensorAndTheFile) {
  const SafeTensors st = parse_safetensors(make_file("{}", 0), "empty.safetensors");
  try {
    st.at("w");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("empty.safetensors"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("\"w\""), std::string::npos);
  }
}

TEST(SafeTensors, RefusesAFileShorterThanTheLengthField) {
  const std::string msg = parse_error(Bytes(5));
  EXPECT_NE(msg.find("bad.safetensors"), std::string::npos) << msg;
  EXPECT_NE(msg.find("truncated"), std::string::npos) << msg;
}

TEST(SafeTensors, RefusesAHeaderLengthBeyondTheFile) {
  Bytes b = make_file("{}", 0);
  b[0] = std::byte{200};
  EXPECT_NE(parse_error(b).find("header length 200 goes beyond the end of the file"), std::string::npos);
}

TEST(SafeTensors, RefusesAnAbsurdHeaderLength) {
  Bytes b = make_file("{}", 0);
  b[7] = std::byte{0x80};  // 2^63 + 2
  EXPECT_NE(parse_error(b).find("is absurd"), std::string::npos);
}

TEST(SafeTensors, RefusesInvalidJson) {
  EXPECT_NE(parse_error(make_file("{\"a\": {", 0)).find("not valid JSON"), std::string::npos);
  EXPECT_NE(parse_error(make_file("[1, 2]", 0)).find("must be a JSON object"), std::string::npos);
}

TEST(SafeTensors, RefusesAnUnknownDtypeNamingTensorAndDtype) {
  const std::string msg = parse_error(make_file(R"({"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}})", 1));
  EXPECT_NE(msg.find("tensor \"w\" has unknown dtype \"F4\""), std::string::npos) << msg;
}

TEST(SafeTensors, RefusesOffsetsBeyondTheData) {
  const std::string msg =
      parse_error(make_file(R"({"w": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})", 8));
  EXPECT_NE(msg.find("\"w\": data_offsets [4, 12] go beyond the data section (8 bytes)"), std::string::npos) << msg;
}

TEST(SafeTensors, RefusesOffsetsWithBeginAfterEnd) {
  const std::string msg = parse_error(make_file(R"({"w": {"dtype": "U8", "shape": [0], "data_offsets": [4, 3]}})", 8));
  EXPECT_NE(msg.find("begin after end"), std::string::npos) << msg;
}

TEST(SafeTensors, RefusesOverlappingOffsetsNamingBothTensors) {
  const std::string msg = parse_error(make_file(
      R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})", 12));
  EXPECT_NE(msg.find("\"a\" [0, 8] and \"b\" [4, 12] have overlapping data_offsets"), std::string::npos) << msg;
}

TEST(SafeTensors, RefusesASizeThatDoesNotMatchTheShape) {
  const std::string msg =
      parse_error(make_file(R"({"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 8]}})", 8));
  EXPECT_NE(msg.find("hold 8 bytes but BF16 [2, 3] needs 12 (size mismatch)"), std::string::npos) << msg;
}

TEST(SafeTensors, RefusesANegativeDimension) {
  const std::string msg =
      parse_error(make_file(R"({"w": {"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 0]}})", 0));
  EXPECT_NE(msg.find("\"w\": shape[1] is negative (-1)"), std::string::npos) << msg;
}

TEST(SafeTensors, RefusesAShapeWhoseSizeOverflows) {
  // 2^32 * 2^32 elements: the product wraps to 0 in unchecked 64-bit arithmetic and would match [0, 0].
  std::string msg = parse_error(make_file(
      R"({"w": {"dtype": "U8", "shape": [4294967296, 4294967296], "data_offsets": [0, 0]}})", 0));
  EXPECT_NE(msg.find("overflows 64 bits"), std::string::npos) << msg;
  msg = parse_error(make_file(R"({"w": {"dtype": "U8", "shape": [9223372036854775808], "data_offsets": [0, 0]}})", 0));
  EXPECT_NE(msg.find("beyond 2^63 - 1"), std::string::npos) << msg;
}

TEST(SafeTensors, RefusesNonStringMetadata) {
  const std::string msg = parse_error(make_file(R"({"__metadata__": {"format": "pt", "step": 3}})", 0));
  EXPECT_NE(msg.find("__metadata__[\"step\"] must be a string, got a JSON number"), std::string::npos) << msg;
}

TEST(SafeTensors, RefusesAnEntryWithoutDataOffsets) {
  const std::string msg = parse_error(make_file(R"({"w": {"dtype": "F32", "shape": [2]}})", 8));
  EXPECT_NE(msg.find("tensor \"w\" has no \"data_offsets\""), std::string::npos) << msg;
}

TEST(SafeTensors, RefusesToWriteATensorWithoutStorage) {
  TempDir dir;
  Tensor none;
  EXPECT_THROW(write_safetensors(dir.path / "x.safetensors", {{"w", &none}}), Error);
  EXPECT_FALSE(fs::exists(dir.path / "x.safetensors"));
  EXPECT_EQ(std::distance(fs::directory_iterator(dir.path), fs::directory_iterator()), 0);
}

// ---- Fuzzing -------------------------------------------------------------------------------------

// Mutates a valid file the ways corrupt downloads and hostile files differ from it. Deterministic per seed.
class Mutator {
 public:
  Mutator(const Bytes& seed, uint64_t rng_seed) : seed_(seed), rng_(rng_seed) {
    for (size_t i = 8; i-- > 0;) header_len_ = (header_len_ << 8) | std::to_integer<uint64_t>(seed[i]);
  }

  Bytes next() {
    Bytes b = seed_;
    const int rounds = 1 + static_cast<int>(below(3));
    for (int r = 0; r < rounds; ++r) mutate(b);
    return b;
  }

 private:
  uint64_t below(uint64_t n) { return n == 0 ? 0 : rng_() % n; }

  // A position, 7 times in 8 inside the length field or the header, where a change matters most.
  size_t position(const Bytes& b) {
    if (b.empty()) return 0;
    const uint64_t header_end = std::min<uint64_t>(8 + header_len_, b.size());
    return static_cast<size_t>(below(8) ? below(header_end) : below(b.size()));
  }

  void set_length(Bytes& b, uint64_t v) {
    for (size_t i = 0; i < 8 && i < b.size(); ++i) b[i] = static_cast<std::byte>((v >> (8 * i)) & 0xff);
  }

  void mutate(Bytes& b) {
    static constexpr uint8_t kInteresting[] = {0,   0xff, 0x7f, 0x80, '"', '{', '}', '[',
                                               ']', ',',  ':',  '-',  '0', '9', '\\'};
    static const char* kNumbers[] = {"-1", "0", "18446744073709551615", "18446744073709551616", "9223372036854775807",
                                     "9223372036854775808", "4294967296", "1e999", "-0", "1.5", "null", "\"8\""};
    static const char* kTokens[] = {"\"F4\"", "\"I64\"", "\"U8\"", "[]", "{}", "[0,0]", "\"__metadata__\"",
                                    "\"shape\"", "\"data_offsets\"", "\"dtype\"", "[[[[", "\"\\ud800\""};
    if (b.empty()) return;
    switch (below(7)) {
      case 0: {  // bit flip
        const size_t p = position(b);
        b[p] ^= static_cast<std::byte>(1u << below(8));
        break;
      }
      case 1:  // interesting byte
        b[position(b)] = static_cast<std::byte>(kInteresting[below(std::size(kInteresting))]);
        break;
      case 2:  // truncation, half the time inside the header
        b.resize(static_cast<size_t>(below(2) ? below(std::min<uint64_t>(8 + header_len_, b.size()) + 1)
                                              : below(b.size() + 1)));
        break;
      case 3: {  // length field corruption
        const uint64_t size = b.size();
        const uint64_t choices[] = {0, 1, header_len_ - 1, header_len_ + 1, header_len_ + 8, size - 8, size, size + 1,
                                    1ull << 63, ~0ull, 100ull << 20, (100ull << 20) + 1, rng_()};
        set_length(b, choices[below(std::size(choices))]);
        break;
      }
      default: {  // JSON splice: a number, a token or a copied header slice replaces a header slice
        const uint64_t header_end = std::min<uint64_t>(8 + header_len_, b.size());
        if (header_end <= 8) break;
        const size_t at = 8 + static_cast<size_t>(below(header_end - 8));
        const size_t cut = std::min<size_t>(static_cast<size_t>(below(12)), static_cast<size_t>(header_end) - at);
        std::string insert;
        const uint64_t what = below(3);
        if (what == 0) {
          insert = kNumbers[below(std::size(kNumbers))];
        } else if (what == 1) {
          insert = kTokens[below(std::size(kTokens))];
        } else {
          const size_t from = 8 + static_cast<size_t>(below(header_end - 8));
          const size_t len = std::min<size_t>(static_cast<size_t>(below(64)), static_cast<size_t>(header_end) - from);
          insert.assign(reinterpret_cast<const char*>(b.data() + from), len);
        }
        b.erase(b.begin() + static_cast<std::ptrdiff_t>(at), b.begin() + static_cast<std::ptrdiff_t>(at + cut));
        const auto* ins = reinterpret_cast<const std::byte*>(insert.data());
        b.insert(b.begin() + static_cast<std::ptrdiff_t>(at), ins, ins + insert.size());
        if (below(4)) set_length(b, header_len_ + insert.size() - cut);  // usually keep the framing consistent
        break;
      }
    }
  }

  Bytes seed_;
  std::mt19937_64 rng_;
  uint64_t header_len_ = 0;
};

struct FuzzOutcome {
  int64_t parsed = 0, refused = 0;
  std::vector<std::string> failures;  // inputs that ended otherwise than parsed / moerl::Error
};

// Parses `count` mutations of `seed`. Iteration i uses its own generator, so the inputs do not depend on
// the number of threads. Every success must hold no more tensor bytes than its input: no huge allocation.
FuzzOutcome fuzz(const Bytes& seed, int64_t count, uint64_t base_seed) {
  FuzzOutcome out;
  int64_t parsed = 0, refused = 0;
  constexpr int64_t kChunk = 1000;  // mutations per generator
#pragma omp parallel for schedule(dynamic, 1) reduction(+ : parsed, refused)
  for (int64_t c = 0; c < count / kChunk; ++c) {
    Mutator m(seed, base_seed + static_cast<uint64_t>(c));
    for (int64_t i = 0; i < kChunk; ++i) {
      const Bytes input = m.next();
      std::string failure;
      try {
        const SafeTensors st = parse_safetensors(input, "fuzz");
        size_t total = 0;
        for (const auto& [name, t] : st.tensors) total += t.nbytes();
        if (total > input.size()) failure = "parsed " + std::to_string(total) + " tensor bytes from a smaller input";
        ++parsed;
      } catch (const Error&) {
        ++refused;
      } catch (const std::exception& e) {
        failure = std::string("non-moerl exception: ") + e.what();
      } catch (...) {
        failure = "unknown exception";
      }
      if (!failure.empty()) {
#pragma omp critical
        out.failures.push_back("chunk " + std::to_string(c) + " input " + std::to_string(i) + ": " + failure);
      }
    }
  }
  out.parsed = parsed;
  out.refused = refused;
  return out;
}

Bytes small_valid_file() {
  Tensor a = Tensor::from_floats({2, 2}, std::vector<float>{1, 2, 3, 4});
  Tensor b({3}, DType::I64), c({2, 1}, DType::BF16), d({0}, DType::U8);
  TempDir dir;
  const fs::path file = dir.path / "seed.safetensors";
  write_safetensors(file, {{"a", &a}, {"b", &b}, {"c", &c}, {"d", &d}}, {{"format", "pt"}});
  return file_bytes(file);
}

TEST(SafeTensors, FuzzedSmallFilesEitherParseOrThrowMoerlError) {
  const Bytes seed = small_valid_file();
  ASSERT_NO_THROW(parse_safetensors(seed, "seed"));
  const auto t0 = std::chrono::steady_clock::now();
  const FuzzOutcome r = fuzz(seed, 190000, 20240601);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  for (size_t i = 0; i < std::min<size_t>(r.failures.size(), 20); ++i) ADD_FAILURE() << r.failures[i];
  EXPECT_EQ(r.parsed + r.refused, 190000);
  // Both outcomes must occur, or the mutations are too weak (or too destructive) to test anything.
  EXPECT_GT(r.parsed, 1000);
  EXPECT_GT(r.refused, 1000);
  std::printf("small seed: %lld parsed, %lld refused in %.2f s\n", static_cast<long long>(r.parsed),
              static_cast<long long>(r.refused), s);
}

// Fewer inputs than the small seed: each costs ~0.4 ms (a 10 KB header to parse, ~1 MB to copy).
TEST(SafeTensors, FuzzedFixtureEitherParsesOrThrowsMoerlError) {
  const Bytes seed = file_bytes(fs::path(MOERL_TEST_FIXTURES) / "deepseek-v3-tiny" / "model.safetensors");
  ASSERT_GT(seed.size(), 900000u);
  const auto t0 = std::chrono::steady_clock::now();
  const FuzzOutcome r = fuzz(seed, 10000, 777);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  for (size_t i = 0; i < std::min<size_t>(r.failures.size(), 20); ++i) ADD_FAILURE() << r.failures[i];
  EXPECT_EQ(r.parsed + r.refused, 10000);
  EXPECT_GT(r.parsed, 100);
  EXPECT_GT(r.refused, 1000);
  std::printf("fixture seed: %lld parsed, %lld refused in %.2f s\n", static_cast<long long>(r.parsed),
              static_cast<long long>(r.refused), s);
}

}  // namespace
}  // namespace moerl
