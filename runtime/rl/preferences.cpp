#include "runtime/rl/preferences.hpp"

#include <fstream>
#include <nlohmann/json.hpp>

#include "runtime/error.hpp"

namespace moerl {
namespace {

std::string string_field(const nlohmann::json& j, const char* field, const std::string& where) {
  const auto it = j.find(field);
  require(it != j.end(), where + ": missing field \"" + field + "\" (expected {\"prompt\", \"chosen\", \"rejected\"})");
  require(it->is_string(), where + ": field \"" + field + "\" must be a string");
  return it->get<std::string>();
}

}  // namespace

std::vector<PreferencePair> read_preferences(const std::filesystem::path& path) {
  std::ifstream in(path);
  require(in.good(), path.string() + ": cannot open the preference file");
  std::vector<PreferencePair> pairs;
  std::string line;
  for (int64_t n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = path.string() + ":" + std::to_string(n);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      throw Error(where + ": not valid JSON: " + e.what());
    }
    require(j.is_object(), where + ": expected a JSON object per line");
    pairs.push_back({string_field(j, "prompt", where), string_field(j, "chosen", where),
                     string_field(j, "rejected", where)});
  }
  return pairs;
}

void write_preferences(const std::filesystem::path& path, const std::vector<PreferencePair>& pairs) {
  if (path.has_parent_path()) std::filesystem::create_directories(path.parent_path());
  const auto tmp = std::filesystem::path(path.string() + ".tmp");
  {
    std::ofstream out(tmp, std::ios::trunc);
    require(out.good(), tmp.string() + ": cannot write the preference file");
    for (const auto& p : pairs)
      out << nlohmann::json{{"prompt", p.prompt}, {"chosen", p.chosen}, {"rejected", p.rejected}}.dump() << '\n';
    require(out.good(), tmp.string() + ": write failed");
  }
  std::filesystem::rename(tmp, path);
}

std::vector<PreferencePair> judge_by_checker(const std::vector<Candidates>& candidates, const AnswerChecker& check) {
  std::vector<PreferencePair> pairs;
  for (const auto& c : candidates) {
    const bool a = check(c.prompt, c.a), b = check(c.prompt, c.b);
    if (a == b) continue;
    pairs.push_back(a ? PreferencePair{c.prompt, c.a, c.b} : PreferencePair{c.prompt, c.b, c.a});
  }
  return pairs;
}

std::string corrupt_digits(const std::string& answer, std::mt19937_64& rng) {
  std::vector<size_t> digits;
  for (size_t i = 0; i < answer.size(); ++i)
    if (answer[i] >= '0' && answer[i] <= '9') digits.push_back(i);
  std::string out = answer;
  if (digits.empty()) return out + static_cast<char>('0' + rng() % 10);
  const size_t at = digits[rng() % digits.size()];
  // 1..9 added mod 10: always a different digit.
  out[at] = static_cast<char>('0' + (out[at] - '0' + 1 + static_cast<int>(rng() % 9)) % 10);
  return out;
}

ScoredTokens preference_tokens(const TextEncoder& encode, const std::string& prompt, const std::string& response,
                               int32_t bos_id, int32_t eos_id) {
  ScoredTokens t;
  t.ids.push_back(bos_id);
  const auto prompt_ids = encode(prompt);
  t.ids.insert(t.ids.end(), prompt_ids.begin(), prompt_ids.end());
  t.response_start = static_cast<int64_t>(t.ids.size());
  const auto response_ids = encode(response);
  t.ids.insert(t.ids.end(), response_ids.begin(), response_ids.end());
  t.ids.push_back(eos_id);
  return t;
}

}  // namespace moerl
