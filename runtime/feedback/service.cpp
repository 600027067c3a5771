// FeedbackService: authentication, rate limits, validation, and the routes of service.hpp.
#include "runtime/feedback/service.hpp"

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "runtime/error.hpp"
#include "runtime/feedback/page.hpp"
#include "runtime/messages/codec.hpp"

namespace moerl::feedback {
namespace {

using nlohmann::json;

// A request the caller got wrong: becomes `status` with {"error": message}.
struct Reject {
  int status;
  std::string message;
};

HttpResponse json_response(int status, const json& j) {
  return HttpResponse{status, "application/json", j.dump(-1, ' ', false, json::error_handler_t::replace)};
}
HttpResponse error_response(int status, const std::string& message) {
  return json_response(status, json{{"error", message}});
}

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// Deepest nesting of [ and { outside strings; bodies we accept nest 2 levels (an object holding a policy).
int nesting_depth(const std::string& body) {
  int depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (char c : body) {
    if (in_string) {
      if (escaped) escaped = false;
      else if (c == '\\') escaped = true;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      deepest = std::max(deepest, ++depth);
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return deepest;
}

// The body as a JSON object whose keys are all in `allowed`.
json parse_object(const std::string& body, std::initializer_list<const char*> allowed) {
  if (body.empty()) throw Reject{400, "empty body, expected a JSON object"};
  if (nesting_depth(body) > 4) throw Reject{400, "body nests deeper than 4 levels"};
  json j = json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) throw Reject{400, "body is not valid JSON (UTF-8 text expected)"};
  if (!j.is_object()) throw Reject{400, std::string("body is a JSON ") + j.type_name() + ", expected an object"};
  for (const auto& [key, value] : j.items()) {
    bool known = false;
    for (const char* a : allowed) known = known || key == a;
    if (!known) throw Reject{400, "unknown field \"" + key.substr(0, 64) + "\""};
  }
  return j;
}

const json& field(const json& j, const char* name) {
  const auto it = j.find(name);
  if (it == j.end()) throw Reject{400, std::string("missing field \"") + name + "\""};
  return *it;
}

uint64_t positive_integer(const json& j, const char* name) {
  const json& v = field(j, name);
  if (!v.is_number_unsigned() || v.get<uint64_t>() == 0)
    throw Reject{400, std::string("field \"") + name + "\" must be a positive integer, got " + v.dump().substr(0, 64)};
  return v.get<uint64_t>();
}

std::string text_field(const json& j, const char* name, size_t max_bytes, bool required = true) {
  const auto it = j.find(name);
  if (it == j.end()) {
    if (required) throw Reject{400, std::string("missing field \"") + name + "\""};
    return {};
  }
  if (!it->is_string()) throw Reject{400, std::string("field \"") + name + "\" must be a string, got a " + it->type_name()};
  const auto& s = it->get_ref<const std::string&>();
  if (s.empty()) throw Reject{400, std::string("field \"") + name + "\" is empty"};
  if (s.size() > max_bytes)
    throw Reject{413, std::string("field \"") + name + "\" has " + std::to_string(s.size()) + " bytes, at most " +
                          std::to_string(max_bytes) + " allowed"};
  return s;
}

std::vector<int32_t> ids_field(const json& j, const char* name) {
  const auto it = j.find(name);
  if (it == j.end()) return {};
  if (!it->is_array()) throw Reject{400, std::string("field \"") + name + "\" must be an array of token ids"};
  std::vector<int32_t> out;
  for (const auto& v : *it) {
    if (!v.is_number_unsigned() || v.get<uint64_t>() > INT32_MAX)
      throw Reject{400, std::string("field \"") + name + "\" must hold token ids in [0, 2^31)"};
    out.push_back(static_cast<int32_t>(v.get<uint64_t>()));
  }
  return out;
}

msg::PolicyVersion policy_field(const json& j, const char* name) {
  const auto it = j.find(name);
  if (it == j.end()) return {};
  if (!it->is_object()) throw Reject{400, std::string("field \"") + name + "\" must be {\"version\", \"step\"}"};
  msg::PolicyVersion p;
  for (const auto& [key, v] : it->items()) {
    if ((key != "version" && key != "step") || !v.is_number_unsigned())
      throw Reject{400, std::string("field \"") + name + "\" must be {\"version\": n, \"step\": n} with integers >= 0"};
    (key == "version" ? p.version : p.step) = v.get<uint64_t>();
  }
  return p;
}

// "first" or "second": which response of the pair.
bool which_field(const json& j, const char* name) {
  const json& v = field(j, name);
  if (v == "first") return false;
  if (v == "second") return true;
  throw Reject{400, std::string("field \"") + name + "\" must be \"first\" or \"second\", got " + v.dump().substr(0, 64)};
}

std::string key_text(const store::Key& k) { return std::to_string(k.time_ns) + "-" + std::to_string(k.seq); }

}  // namespace

std::vector<TokenEntry> read_tokens(const std::string& path) {
  std::ifstream in(path);
  require(in.good(), path + ": cannot read the tokens file");
  std::vector<TokenEntry> out;
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream fields(line);
    std::string role, name, token, extra;
    fields >> role >> name >> token;
    const std::string where = path + ":" + std::to_string(n) + ": ";
    require(!(fields >> extra), where + "expected \"annotator|admin NAME TOKEN\", found more fields");
    require(role == "annotator" || role == "admin", where + "role \"" + role + "\", expected annotator or admin");
    require(!name.empty() && name.size() <= 256, where + "expected a name of 1 to 256 characters");
    require(token.size() >= 16 && token.size() <= 256, where + "token must have 16 to 256 characters");
    for (const auto& e : out) require(e.token != token && e.name != name, where + "duplicate name or token");
    out.push_back({role == "admin" ? Role::Admin : Role::Annotator, name, token});
  }
  require(!out.empty(), path + ": no tokens");
  return out;
}

bool constant_time_equal(std::string_view a, std::string_view b) {
  const size_t n = std::max(a.size(), b.size());
  unsigned diff = a.size() == b.size() ? 0u : 1u;
  for (size_t i = 0; i < n; ++i) {
    const unsigned x = i < a.size() ? static_cast<uint8_t>(a[i]) : 0u;
    const unsigned y = i < b.size() ? static_cast<uint8_t>(b[i]) : 0u;
    diff |= x ^ y;
  }
  return diff == 0;
}

FeedbackService::FeedbackService(store::DurableStore& store, std::vector<TokenEntry> tokens, ServiceOptions options)
    : store_(store), own_sink_(std::make_unique<StoreSink>(store)), sink_(*own_sink_), tokens_(std::move(tokens)),
      options_(options) {
  load_pairs();
}

FeedbackService::FeedbackService(store::DurableStore& store, RecordSink& sink, std::vector<TokenEntry> tokens,
                                 ServiceOptions options)
    : store_(store), sink_(sink), tokens_(std::move(tokens)), options_(options) {
  load_pairs();
}

void FeedbackService::load_pairs() {
  store_.scan(store::Family::Pair, 0, UINT64_MAX, [&](const store::Key&, std::span<const uint8_t> bytes) {
    auto pair = store::decode_pair(bytes);
    next_pair_id_ = std::max(next_pair_id_, pair.pair_id + 1);
    pairs_.emplace(pair.pair_id, std::move(pair));
    return true;
  });
}

size_t FeedbackService::pairs() const {
  std::shared_lock lock(pairs_mutex_);
  return pairs_.size();
}

uint64_t FeedbackService::add_pair(store::PairToJudge pair) {
  {
    std::unique_lock lock(pairs_mutex_);
    pair.pair_id = next_pair_id_++;
  }
  if (pair.created_ns <= 0) pair.created_ns = now_ns();
  const auto bytes = store::encode(pair);
  store::decode_pair(bytes);  // the record must read back before it is stored
  submit_and_wait(sink_, store::Family::Pair, static_cast<uint64_t>(pair.created_ns), bytes);
  const uint64_t id = pair.pair_id;
  std::unique_lock lock(pairs_mutex_);
  pairs_.emplace(id, std::move(pair));
  return id;
}

void FeedbackService::count_status(int status) {
  const int c = status / 100;
  if (c >= 0 && c < 6) ++status_counts_[c];
}

HttpResponse FeedbackService::handle(const HttpRequest& request) {
  HttpResponse r;
  try {
    r = route(request);
  } catch (const Reject& e) {
    r = error_response(e.status, e.message);
  } catch (const Error& e) {
    r = error_response(500, e.what());
  } catch (const std::exception& e) {
    r = error_response(500, std::string("internal error: ") + e.what());
  }
  count_status(r.status);
  return r;
}

void FeedbackService::handle_async(const HttpRequest& request, Reply reply) {
  Submission s;
  HttpResponse r;
  try {
    r = route(request, &s);
  } catch (const Reject& e) {
    r = error_response(e.status, e.message);
  } catch (const Error& e) {
    r = error_response(500, e.what());
  } catch (const std::exception& e) {
    r = error_response(500, std::string("internal error: ") + e.what());
  }
  if (r.status == 0) {
    auto shared_reply = std::make_shared<Reply>(std::move(reply));  // std::function needs a copyable callback
    try {
      const store::Family family = s.family;
      const uint64_t t = s.time_ns;
      std::vector<uint8_t> bytes = std::move(s.bytes);
      sink_.submit(family, t, std::move(bytes),
                   [this, s = std::move(s), shared_reply](const store::Key& key, const std::string& error) {
                     HttpResponse answer = error.empty() ? submitted(s, key) : error_response(500, sink_.name() + ": " + error);
                     count_status(answer.status);
                     (*shared_reply)(std::move(answer));
                   });
      return;
    } catch (const std::exception& e) {
      r = error_response(500, e.what());
    }
    count_status(r.status);
    (*shared_reply)(std::move(r));
    return;
  }
  count_status(r.status);
  reply(std::move(r));
}

const TokenEntry* FeedbackService::authenticate(const HttpRequest& request, HttpResponse& error) {
  constexpr std::string_view kBearer = "Bearer ";
  if (request.authorization.empty()) {
    error = error_response(401, "missing \"Authorization: Bearer <token>\" header");
    return nullptr;
  }
  if (request.authorization.compare(0, kBearer.size(), kBearer) != 0) {
    error = error_response(401, "Authorization header must be \"Bearer <token>\"");
    return nullptr;
  }
  const std::string_view given = std::string_view(request.authorization).substr(kBearer.size());
  const TokenEntry* found = nullptr;
  for (const auto& e : tokens_)  // every entry compared, so the time does not tell which one matched
    if (constant_time_equal(given, e.token)) found = &e;
  if (!found) error = error_response(401, "unknown token");
  return found;
}

bool FeedbackService::allow(const TokenEntry& who) {
  if (options_.rate_per_s <= 0) return true;
  const auto now = std::chrono::steady_clock::now();
  std::lock_guard lock(buckets_mutex_);
  auto [it, fresh] = buckets_.try_emplace(who.name, Bucket{options_.burst, now});
  Bucket& b = it->second;
  if (!fresh) {
    b.tokens = std::min(options_.burst, b.tokens + std::chrono::duration<double>(now - b.last).count() * options_.rate_per_s);
    b.last = now;
  }
  if (b.tokens < 1) return false;
  b.tokens -= 1;
  return true;
}

HttpResponse FeedbackService::route(const HttpRequest& request, Submission* deferred) {
  const std::string& path = request.path;
  const auto method_is = [&](const char* m) {
    if (request.method != m)
      throw Reject{405, request.method.substr(0, 16) + " " + path.substr(0, 64) + ": method not allowed, use " + m};
  };
  if (path == "/" || path == "/index.html") {
    method_is("GET");
    return HttpResponse{200, "text/html; charset=utf-8", std::string(page_html())};
  }
  if (path == "/healthz") {
    method_is("GET");
    return HttpResponse{200, "text/plain", "ok\n"};
  }
  if (path == "/metrics") {
    method_is("GET");
    return HttpResponse{200, "text/plain; version=0.0.4", metrics()};
  }
  static const char* const kRoutes[][2] = {{"/api/v1/next", "GET"},         {"/api/v1/comparisons", "POST"},
                                           {"/api/v1/ratings", "POST"},     {"/api/v1/corrections", "POST"},
                                           {"/api/v1/pairs", "POST"},       {"/api/v1/export", "GET"},
                                           {"/api/v1/config", "GET"}};
  const char* method = nullptr;
  for (const auto& r : kRoutes)
    if (path == r[0]) method = r[1];
  if (!method) throw Reject{404, "no route " + path.substr(0, 128)};
  method_is(method);
  if (request.body.size() > options_.max_body_bytes)
    throw Reject{413, "body of " + std::to_string(request.body.size()) + " bytes, at most " +
                          std::to_string(options_.max_body_bytes) + " allowed"};
  HttpResponse denied;
  const TokenEntry* who = authenticate(request, denied);
  if (!who) return denied;
  const bool admin_route = path == "/api/v1/pairs" || path == "/api/v1/export" || path == "/api/v1/config";
  if (admin_route && who->role != Role::Admin) throw Reject{403, path + " needs the admin token"};
  if (!allow(*who)) {
    ++rate_limited_;
    throw Reject{429, "rate limit of " + std::to_string(options_.rate_per_s) + " requests/s for \"" + who->name + "\" exceeded"};
  }
  if (path != "/api/v1/export" && !request.query.empty())
    throw Reject{400, "unexpected query parameter \"" + request.query.begin()->first.substr(0, 64) + "\""};
  if (path == "/api/v1/next") return next_pair(*who);
  const char* kind = path == "/api/v1/comparisons" ? "comparison"
                     : path == "/api/v1/ratings"   ? "rating"
                     : path == "/api/v1/corrections" ? "correction"
                                                     : nullptr;
  if (kind) {
    Submission s = prepare(*who, kind, request.body);
    if (deferred) {
      *deferred = std::move(s);
      return HttpResponse{0, "", ""};
    }
    return submitted(s, submit_and_wait(sink_, s.family, s.time_ns, std::move(s.bytes)));
  }
  if (path == "/api/v1/pairs") return post_pair(request.body);
  if (path == "/api/v1/export") return export_records(request);
  return config();
}

HttpResponse FeedbackService::next_pair(const TokenEntry& who) {
  std::unique_lock lock(pairs_mutex_);
  const uint64_t judged = judged_[who.name];
  if (pairs_.empty()) return json_response(200, json{{"pair", nullptr}, {"judged", judged}});
  auto it = pairs_.upper_bound(cursor_[who.name]);
  if (it == pairs_.end()) it = pairs_.begin();  // every pair shown once: start again
  cursor_[who.name] = it->first;
  const auto& p = it->second;
  return json_response(200, json{{"pair", {{"pair_id", p.pair_id},
                                           {"prompt", p.prompt.text},
                                           {"first", p.first.text},
                                           {"second", p.second.text}}},
                                 {"judged", judged},
                                 {"scale", {options_.scale_min, options_.scale_max}}});
}

FeedbackService::Submission FeedbackService::prepare(const TokenEntry& who, const std::string& kind, const std::string& body) {
  json j;
  if (kind == "comparison") j = parse_object(body, {"pair_id", "choice"});
  else if (kind == "rating") j = parse_object(body, {"pair_id", "response", "score"});
  else j = parse_object(body, {"pair_id", "response", "corrected"});
  const uint64_t pair_id = positive_integer(j, "pair_id");
  store::PairToJudge pair;
  {
    std::shared_lock lock(pairs_mutex_);
    const auto it = pairs_.find(pair_id);
    if (it == pairs_.end()) throw Reject{404, "pair_id " + std::to_string(pair_id) + ": no such pair"};
    pair = it->second;
  }
  const int64_t t = now_ns();
  std::vector<uint8_t> bytes;
  store::Family family;
  int counter = 0;
  if (kind == "comparison") {
    const json& c = field(j, "choice");
    msg::Comparison x;
    if (c == "first") x.choice = msg::Choice::FirstChosen;
    else if (c == "second") x.choice = msg::Choice::SecondChosen;
    else if (c == "tie") x.choice = msg::Choice::Tie;
    else throw Reject{400, "field \"choice\" must be \"first\", \"second\" or \"tie\", got " + c.dump().substr(0, 64)};
    x.prompt = pair.prompt;
    x.first = pair.first;
    x.second = pair.second;
    x.annotator = who.name;
    x.timestamp_ns = t;
    x.first_policy = pair.first_policy;
    x.second_policy = pair.second_policy;
    bytes = msg::encode(x);
    family = store::Family::Comparison;
  } else if (kind == "rating") {
    const bool second = which_field(j, "response");
    const json& s = field(j, "score");
    if (!s.is_number()) throw Reject{400, std::string("field \"score\" must be a number, got a ") + s.type_name()};
    const double score = s.get<double>();
    if (!(score >= options_.scale_min && score <= options_.scale_max))
      throw Reject{400, "field \"score\" is " + s.dump() + ", expected a number in [" + std::to_string(options_.scale_min) +
                            ", " + std::to_string(options_.scale_max) + "]"};
    msg::Rating x;
    x.prompt = pair.prompt;
    x.response = second ? pair.second : pair.first;
    x.score = static_cast<float>(score);
    x.scale_min = options_.scale_min;
    x.scale_max = options_.scale_max;
    x.annotator = who.name;
    x.timestamp_ns = t;
    x.policy = second ? pair.second_policy : pair.first_policy;
    bytes = msg::encode(x);
    family = store::Family::Rating;
    counter = 1;
  } else {
    const bool second = which_field(j, "response");
    msg::Correction x;
    x.prompt = pair.prompt;
    x.original = second ? pair.second : pair.first;
    x.corrected = text_field(j, "corrected", options_.max_text_bytes);
    x.annotator = who.name;
    x.timestamp_ns = t;
    x.policy = second ? pair.second_policy : pair.first_policy;
    bytes = msg::encode(x);
    family = store::Family::Correction;
    counter = 2;
  }
  Submission s;
  s.family = family;
  s.bytes = std::move(bytes);
  s.time_ns = static_cast<uint64_t>(t);
  s.counter = counter;
  s.kind = counter == 0 ? "comparison" : counter == 1 ? "rating" : "correction";
  s.who = &who;
  return s;
}

HttpResponse FeedbackService::submitted(const Submission& s, const store::Key& key) {
  ++submitted_[s.counter];
  uint64_t judged;
  {
    std::unique_lock lock(pairs_mutex_);
    judged = ++judged_[s.who->name];
  }
  // Written by hand (this runs for every submission): the same text json::dump gives, keys in order.
  return HttpResponse{201, "application/json",
                      "{\"judged\":" + std::to_string(judged) + ",\"key\":\"" + key_text(key) + "\",\"kind\":\"" + s.kind + "\"}"};
}

HttpResponse FeedbackService::post_pair(const std::string& body) {
  const json j = parse_object(body, {"prompt", "first", "second", "prompt_ids", "first_ids", "second_ids",
                                     "first_policy", "second_policy"});
  store::PairToJudge p;
  p.prompt = {text_field(j, "prompt", options_.max_text_bytes), ids_field(j, "prompt_ids")};
  p.first = {text_field(j, "first", options_.max_text_bytes), ids_field(j, "first_ids")};
  p.second = {text_field(j, "second", options_.max_text_bytes), ids_field(j, "second_ids")};
  p.first_policy = policy_field(j, "first_policy");
  p.second_policy = policy_field(j, "second_policy");
  const uint64_t id = add_pair(std::move(p));
  return json_response(201, json{{"pair_id", id}});
}

HttpResponse FeedbackService::export_records(const HttpRequest& request) {
  std::string kind;
  for (const auto& [k, v] : request.query) {
    if (k != "kind") throw Reject{400, "unexpected query parameter \"" + k.substr(0, 64) + "\", expected kind"};
    kind = v;
  }
  store::Family family;
  if (kind == "comparisons") family = store::Family::Comparison;
  else if (kind == "ratings") family = store::Family::Rating;
  else if (kind == "corrections") family = store::Family::Correction;
  else throw Reject{400, "query parameter kind must be comparisons, ratings or corrections"};
  std::string out;
  store_.scan(family, 0, UINT64_MAX, [&](const store::Key&, std::span<const uint8_t> bytes) {
    if (family == store::Family::Comparison) out += store::comparison_jsonl(msg::decode_comparison(bytes));
    else if (family == store::Family::Rating) out += store::rating_jsonl(msg::decode_rating(bytes));
    else out += store::correction_jsonl(msg::decode_correction(bytes));
    out += '\n';
    return true;
  });
  return HttpResponse{200, "application/x-ndjson", std::move(out)};
}

HttpResponse FeedbackService::config() const {
  return json_response(200, json{{"max_body_bytes", options_.max_body_bytes},
                                 {"max_text_bytes", options_.max_text_bytes},
                                 {"rate_per_s", options_.rate_per_s},
                                 {"burst", options_.burst},
                                 {"scale", {options_.scale_min, options_.scale_max}},
                                 {"tokens", tokens_.size()}});
}

std::string FeedbackService::metrics() const {
  std::ostringstream m;
  m << "# HELP moerl_feedback_requests_total Requests answered, by status class.\n"
       "# TYPE moerl_feedback_requests_total counter\n";
  for (int c = 1; c < 6; ++c) m << "moerl_feedback_requests_total{code=\"" << c << "xx\"} " << status_counts_[c] << "\n";
  m << "# HELP moerl_feedback_submissions_total Durable submissions, by kind.\n"
       "# TYPE moerl_feedback_submissions_total counter\n";
  const char* kinds[] = {"comparison", "rating", "correction"};
  for (int k = 0; k < 3; ++k) m << "moerl_feedback_submissions_total{kind=\"" << kinds[k] << "\"} " << submitted_[k] << "\n";
  m << "# TYPE moerl_feedback_rate_limited_total counter\nmoerl_feedback_rate_limited_total " << rate_limited_ << "\n";
  m << "# HELP moerl_feedback_store_records Records held, by column family.\n# TYPE moerl_feedback_store_records gauge\n";
  for (int f = 0; f < store::kFamilies; ++f)
    m << "moerl_feedback_store_records{family=\"" << store::family_name(static_cast<store::Family>(f)) << "\"} "
      << store_.count(static_cast<store::Family>(f)) << "\n";
  const auto stats = store_.stats();
  m << "# HELP moerl_feedback_store_commits_total WAL-synced write batches (group commits).\n"
       "# TYPE moerl_feedback_store_commits_total counter\nmoerl_feedback_store_commits_total "
    << stats.commits << "\n# TYPE moerl_feedback_store_committed_records_total counter\n"
       "moerl_feedback_store_committed_records_total " << stats.records << "\n";
  m << "# TYPE moerl_feedback_pairs_waiting gauge\nmoerl_feedback_pairs_waiting " << pairs() << "\n";
  m << "# HELP moerl_feedback_sink_info Where submissions go (\"store\": directly; \"actor ...\": the collector actor).\n"
       "# TYPE moerl_feedback_sink_info gauge\nmoerl_feedback_sink_info{sink=\"" << sink_.name() << "\"} 1\n";
  m << sink_.metrics();
  return m.str();
}

}  // namespace moerl::feedback
