#include "runtime/data/jsonl.hpp"

#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>

#include "runtime/error.hpp"

namespace moerl {
namespace {

// Calls on_record(json, where) for every non-blank line; `where` is "FILE:LINE" for error messages.
template <class OnRecord>
void for_each_record(const std::filesystem::path& path, OnRecord&& on_record) {
  std::ifstream in(path, std::ios::binary);
  require(in.good(), path.string() + ": cannot open (a JSON Lines file was expected)");
  std::string line;
  for (int64_t number = 1; std::getline(in, line); ++number) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    const std::string where = path.string() + ":" + std::to_string(number);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::parse_error& e) {
      throw Error(where + ": not valid JSON (" + e.what() + ")");
    }
    require(j.is_object(), where + ": expected a JSON object, got " + std::string(j.type_name()));
    on_record(j, where);
  }
  require(!in.bad(), path.string() + ": read error");
}

const std::string& string_field(const nlohmann::json& j, const char* key, const std::string& where) {
  auto it = j.find(key);
  require(it != j.end(), where + ": expected a string field \"" + key + "\", it is missing");
  require(it->is_string(),
          where + ": expected a string field \"" + key + "\", got " + std::string(it->type_name()));
  return it->get_ref<const std::string&>();
}

}  // namespace

std::vector<std::string> read_text_jsonl(const std::filesystem::path& path) {
  std::vector<std::string> texts;
  for_each_record(path, [&](const nlohmann::json& j, const std::string& where) {
    texts.push_back(string_field(j, "text", where));
  });
  return texts;
}

std::vector<SftExample> read_sft_jsonl(const std::filesystem::path& path) {
  std::vector<SftExample> examples;
  for_each_record(path, [&](const nlohmann::json& j, const std::string& where) {
    examples.push_back({string_field(j, "prompt", where), string_field(j, "response", where)});
  });
  return examples;
}

std::vector<std::vector<int32_t>> read_token_ids_jsonl(const std::filesystem::path& path) {
  std::vector<std::vector<int32_t>> sequences;
  for_each_record(path, [&](const nlohmann::json& j, const std::string& where) {
    auto it = j.find("input_ids");
    require(it != j.end() && it->is_array(), where + ": expected an array field \"input_ids\"");
    std::vector<int32_t> ids;
    ids.reserve(it->size());
    for (size_t i = 0; i < it->size(); ++i) {
      const nlohmann::json& v = (*it)[i];
      require(v.is_number_integer() && v.get<int64_t>() >= 0 &&
                  v.get<int64_t>() <= std::numeric_limits<int32_t>::max(),
              where + ": field \"input_ids\"[" + std::to_string(i) +
                  "]: expected a non-negative integer token id, got " + v.dump());
      ids.push_back(static_cast<int32_t>(v.get<int64_t>()));
    }
    sequences.push_back(std::move(ids));
  });
  return sequences;
}

}  // namespace moerl
