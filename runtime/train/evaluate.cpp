#include "runtime/train/evaluate.hpp"

#include <cmath>
#include <fstream>

#include "runtime/data/jsonl.hpp"
#include "runtime/error.hpp"
#include "runtime/safetensors.hpp"

namespace moerl {
namespace {

// Whether the first record of `path` holds "input_ids" (pre-tokenized) rather than "text".
bool is_pretokenized(const std::filesystem::path& path) {
  std::ifstream f(path);
  require(f.good(), path.string() + ": cannot open the data file");
  std::string line;
  while (std::getline(f, line)) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const auto j = nlohmann::json::parse(line, nullptr, false);
    require(j.is_object(), path.string() + ":1: expected a JSON object per line");
    require(j.contains("input_ids") || j.contains("text"),
            path.string() + ": expected records with \"input_ids\" (token ids) or \"text\"");
    return j.contains("input_ids");
  }
  throw Error(path.string() + ": the file holds no records");
}

}  // namespace

EvalResult evaluate_jsonl(const LoadedModel& loaded, const std::filesystem::path& data, Precision precision,
                          const std::filesystem::path& logits_file) {
  Model& model = *loaded.model;
  const ModelConfig& c = model.config();
  std::vector<std::vector<int32_t>> sequences;
  if (is_pretokenized(data)) {
    sequences = read_token_ids_jsonl(data);
  } else {
    require(loaded.tokenizer.has_value(), data.string() + ": holds text, but the checkpoint has no tokenizer.model "
                                          "(give {\"input_ids\": [...]} lines instead)");
    for (const std::string& text : read_text_jsonl(data)) {
      std::vector<int32_t> ids{loaded.tokenizer->bos_id()};
      const auto body = loaded.tokenizer->encode(text);
      ids.insert(ids.end(), body.begin(), body.end());
      ids.push_back(loaded.tokenizer->eos_id());
      sequences.push_back(std::move(ids));
    }
  }
  EvalResult r;
  double total = 0;
  ForwardOptions options;
  options.precision = precision;
  options.keep_logits = !logits_file.empty();
  options.for_backward = false;
  for (size_t s = 0; s < sequences.size(); ++s) {
    const auto& seq = sequences[s];
    if (seq.size() < 2) continue;  // nothing to predict
    const int64_t n = static_cast<int64_t>(seq.size()) - 1;
    require(n <= c.max_position_embeddings, data.string() + ": sequence " + std::to_string(s + 1) + " has " +
                                                std::to_string(n) + " positions, more than max_position_embeddings = " +
                                                std::to_string(c.max_position_embeddings));
    std::vector<int64_t> ids(seq.begin(), seq.end() - 1), labels(seq.begin() + 1, seq.end());
    for (size_t i = 0; i < seq.size(); ++i)
      require(seq[i] >= 0 && seq[i] < c.vocab_size, data.string() + ": sequence " + std::to_string(s + 1) + ": token id " +
                                                        std::to_string(seq[i]) + " is outside the vocabulary of " +
                                                        std::to_string(c.vocab_size));
    const LossReport lr = model.forward(TokenBatch{ids.data(), labels.data(), 1, n}, options);
    if (options.keep_logits) {
      Tensor ids_t({n}, DType::I64), logits_t({n, c.vocab_size});
      std::copy(ids.begin(), ids.end(), ids_t.data<int64_t>());
      std::copy_n(model.logits(), n * c.vocab_size, logits_t.data<float>());
      write_safetensors(logits_file, {{"input_ids", &ids_t}, {"logits", &logits_t}});
      options.keep_logits = false;
    }
    total += lr.loss * static_cast<double>(lr.tokens);
    r.tokens += lr.tokens;
    ++r.sequences;
  }
  require(r.tokens > 0, data.string() + ": no sequence has two or more tokens to score");
  r.loss = total / static_cast<double>(r.tokens);
  r.ppl = std::exp(r.loss);
  return r;
}

}  // namespace moerl
