// PartyGroup across processes: the board and the checkpoint shared between the processes of a group
// (party.hpp). Each process packs its own parties' entries into bytes, every process gets every process's
// bytes (allgather over Gloo), and unpacks the others'. Only bytes move: doubles and tensors arrive bit for
// bit, so every process computes the same norm, totals and loads as a group in one process.
#include <cstring>
#include <type_traits>

#include "runtime/error.hpp"
#include "runtime/parallel/party.hpp"

namespace moerl {
namespace {

// Appends plain values and strings to a byte buffer.
class Packer {
 public:
  template <class T>
  void put(const T& v) {
    static_assert(std::is_trivially_copyable_v<T>);
    const auto* p = reinterpret_cast<const std::byte*>(&v);
    bytes.insert(bytes.end(), p, p + sizeof v);
  }
  void put(const std::string& s) {
    put<uint64_t>(s.size());
    const auto* p = reinterpret_cast<const std::byte*>(s.data());
    bytes.insert(bytes.end(), p, p + s.size());
  }
  std::vector<std::byte> bytes;
};

// Reads them back; running past the end throws naming `what` (a process that packed something else).
class Unpacker {
 public:
  Unpacker(std::span<const std::byte> bytes, std::string what) : bytes_(bytes), what_(std::move(what)) {}
  template <class T>
  T get() {
    T v;
    std::memcpy(&v, take(sizeof v), sizeof v);
    return v;
  }
  std::string get_string() {
    const auto n = get<uint64_t>();
    const std::byte* p = take(n);
    return std::string(reinterpret_cast<const char*>(p), n);
  }
  bool done() const { return at_ == bytes_.size(); }

 private:
  const std::byte* take(size_t n) {
    require(n <= bytes_.size() - at_, what_ + ": truncated at byte " + std::to_string(at_));
    const std::byte* p = bytes_.data() + at_;
    at_ += n;
    return p;
  }
  std::span<const std::byte> bytes_;
  std::string what_;
  size_t at_ = 0;
};

// Every process's `mine`, in process order. Sizes first (an allreduce of doubles: exact for any size below
// 2^53), then the bytes as 4-byte words through allgather (copied, never added).
std::vector<std::vector<std::byte>> allgather_bytes(Collectives& c, const std::vector<std::byte>& mine) {
  const int P = c.size(), me = c.rank();
  std::vector<double> sizes(static_cast<size_t>(P), 0.0);
  sizes[static_cast<size_t>(me)] = static_cast<double>(mine.size());
  c.allreduce_sum(sizes.data(), sizes.size());
  std::vector<size_t> words(static_cast<size_t>(P));
  size_t total = 0;
  for (int p = 0; p < P; ++p) total += words[p] = (static_cast<size_t>(sizes[p]) + 3) / 4;
  std::vector<float> in(words[me], 0.0f), out(total);
  if (!mine.empty()) std::memcpy(in.data(), mine.data(), mine.size());
  c.allgather(in.data(), out.data(), words);
  std::vector<std::vector<std::byte>> all(static_cast<size_t>(P));
  size_t offset = 0;
  for (int p = 0; p < P; ++p) {
    const auto* begin = reinterpret_cast<const std::byte*>(out.data() + offset);
    all[p].assign(begin, begin + static_cast<size_t>(sizes[p]));
    offset += words[p];
  }
  return all;
}

}  // namespace

void PartyGroup::share_board() {
  // Per local party: its index, grad squares (name, Σ g²), loss sums, expert loads.
  Packer pack;
  for (int p = 0; p < size(); ++p) {
    if (!local(p)) continue;
    pack.put<int64_t>(p);
    const GradSquares& squares = board_.squares[static_cast<size_t>(p)];
    pack.put<uint64_t>(squares.size());
    for (const auto& [name, sq] : squares) {
      pack.put(name);
      pack.put(sq);
    }
    const LossSums& s = board_.sums[static_cast<size_t>(p)];
    pack.put(s.loss_sum);
    pack.put(s.tokens);
    pack.put(s.mtp_sum);
    pack.put(s.mtp_tokens);
    pack.put(s.balance_loss);
    const std::vector<ExpertLoad>& loads = board_.loads[static_cast<size_t>(p)];
    pack.put<uint64_t>(loads.size());
    for (const ExpertLoad& l : loads) {
      pack.put(l.tokens);
      pack.put<uint64_t>(l.tokens_per_expert.size());
      for (int64_t n : l.tokens_per_expert) pack.put(n);
    }
  }
  const auto all = allgather_bytes(*processes_, pack.bytes);
  for (size_t proc = 0; proc < all.size(); ++proc) {
    if (static_cast<int>(proc) == process_) continue;
    Unpacker in(all[proc], "the board from process " + std::to_string(proc));
    while (!in.done()) {
      const auto p = in.get<int64_t>();
      require(p >= 0 && p < size() && process_of_[static_cast<size_t>(p)] == static_cast<int>(proc),
              "the board from process " + std::to_string(proc) + ": party " + std::to_string(p) + " is not its own");
      GradSquares& squares = board_.squares[static_cast<size_t>(p)];
      squares.resize(in.get<uint64_t>());
      for (auto& [name, sq] : squares) {
        name = in.get_string();
        sq = in.get<double>();
      }
      LossSums& s = board_.sums[static_cast<size_t>(p)];
      s.loss_sum = in.get<double>();
      s.tokens = in.get<int64_t>();
      s.mtp_sum = in.get<double>();
      s.mtp_tokens = in.get<int64_t>();
      s.balance_loss = in.get<double>();
      std::vector<ExpertLoad>& loads = board_.loads[static_cast<size_t>(p)];
      loads.resize(in.get<uint64_t>());
      for (ExpertLoad& l : loads) {
        l.tokens = in.get<int64_t>();
        l.tokens_per_expert.resize(in.get<uint64_t>());
        for (int64_t& n : l.tokens_per_expert) n = in.get<int64_t>();
      }
    }
  }
}

void PartyGroup::gather_checkpoint() {
  // This process's weights ("w:<name>") and optimizer tensors ("o:<file>:<key>") as one safetensors buffer.
  std::map<std::string, const Tensor*> mine;
  for (const std::string& name : checkpoint_names_) mine["w:" + name] = &checkpoint_model_->params().at(name).value;
  for (const auto& [file, tensors] : checkpoint_files_)
    for (const auto& [key, t] : tensors) mine["o:" + file + ":" + key] = t;
  const auto all = allgather_bytes(*processes_, encode_safetensors(mine));
  if (process_ != 0) return;  // process 0 writes the checkpoint
  for (size_t proc = 1; proc < all.size(); ++proc) {
    received_.push_back(parse_safetensors(all[proc], "the checkpoint from process " + std::to_string(proc)));
    for (const auto& [key, t] : received_.back().tensors) {
      if (key.rfind("w:", 0) == 0) {
        Param& w = checkpoint_model_->params().at(key.substr(2));
        require(w.value.shape() == t.shape() && w.value.dtype() == t.dtype(),
                received_.back().source + ": " + key + " is " + shape_string(t.shape()) + ", the model's " +
                    shape_string(w.value.shape()));
        std::memcpy(w.value.bytes(), t.bytes(), t.nbytes());
      } else {
        const auto colon = key.find(':', 2);
        require(key.rfind("o:", 0) == 0 && colon != std::string::npos,
                received_.back().source + ": unexpected tensor " + key);
        checkpoint_files_[key.substr(2, colon - 2)][key.substr(colon + 1)] = &t;
      }
    }
  }
}

}  // namespace moerl
