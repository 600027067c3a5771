// ActorPairSource: the preferences stage's pairs from the rollout actors through the replay buffer actor into
// the feedback collector actor. Lane threads drive the rollouts; the caller's thread sends the writes with
// bounded windows of outstanding requests, so the rollouts keep generating while earlier records commit.
#include "actors/roles/preference_pairs.hpp"

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <thread>

#include "actors/roles/feedback_collector.hpp"
#include "actors/roles/feedback_sink.hpp"
#include "actors/roles/replay_buffer.hpp"
#include "actors/roles/rlhf_actors.hpp"
#include "runtime/store/pair_record.hpp"
#include "runtime/train/checkpoint.hpp"

namespace moerl::actors {
namespace fs = std::filesystem;
namespace {

// A generation or a store write should take well under this; a lost reply fails the stage instead of hanging it.
constexpr auto kTimeout = std::chrono::minutes(10);
constexpr size_t kGenerateChunk = 16;  // GenerationRequests per generate call (one progress update)
constexpr size_t kWriteWindow = 512;   // writes in flight: they share the stores' group commits

std::unique_ptr<caf::actor_system_config> message_config() {
  auto c = std::make_unique<caf::actor_system_config>();
  add_message_types(*c);
  return c;
}

[[noreturn]] void fail(const std::string& stage, const std::string& what, const caf::error& e) {
  throw Error("preferences stage " + stage + ": " + what + ": " + describe(e));
}

// Waits for the oldest outstanding answers until at most `keep` remain; each answer goes to `on`.
template <class Handle, class On>
void drain(std::deque<Handle>& pending, size_t keep, const std::string& stage, const char* what, On on) {
  while (pending.size() > keep) {
    caf::error failure;  // thrown after receive() returns, not from inside CAF's handler
    pending.front().receive(on, [&](caf::error& e) { failure = std::move(e); });
    pending.pop_front();
    if (failure) fail(stage, what, failure);
  }
}

template <class Handle>
void stop_and_wait(caf::scoped_actor& self, const Handle& a) {
  self->monitor(a);
  self->send_exit(a, caf::exit_reason::user_shutdown);
  self->receive([](const caf::down_msg&) {}, caf::after(kTimeout) >> [] {});
}

// The rollout lanes: job.threads rollout actors of one thread each (a request decodes only 2 sequences, too
// few for OpenMP inside it to pay), each supervised as in the rlhf stage (actor_rlhf_services: respawned when
// it dies, the request sent again) and driven by a thread of its own; lane w generates chunks w, w + lanes, ...
// Lane 0 generates with the caller's policy itself (zero-copy); the others with exact copies (a Model keeps
// per-forward state, so two actors must not share one). Requests are seeded, so the rollouts do not depend on
// the lane that made them.
class Lanes {
 public:
  Lanes(const PairJob& job, const RlhfActorOptions& options, caf::actor_system& system, size_t chunks)
      : job_(job), chunks_(chunks), done_(chunks) {
    const size_t lanes = std::clamp<size_t>(static_cast<size_t>(std::max(job.threads, 1)), 1, std::max<size_t>(chunks, 1));
    if (lanes > 1) save_checkpoint(job.dir / "policy-copy", *job.policy, nullptr, nullptr, nullptr);
    for (size_t w = 0; w < lanes; ++w) {
      Model* policy = job.policy;
      if (w > 0) {
        copies_.push_back(load_model_dir(job.dir / "policy-copy"));
        policy = copies_.back().model.get();
      }
      threads_.emplace_back([this, &options, &system, policy, w, lanes] { run(options, system, policy, w, lanes); });
    }
  }
  ~Lanes() {
    {
      std::lock_guard lock(mutex_);
      stop_ = true;
    }
    for (auto& t : threads_) t.join();
    std::error_code ec;
    fs::remove_all(job_.dir / "policy-copy", ec);
  }

  // Chunk c's rollouts (request-major), once generated; rethrows a lane's failure.
  std::vector<msg::Rollout> take(size_t c) {
    std::unique_lock lock(mutex_);
    ready_.wait(lock, [&] { return done_[c].has_value() || failure_; });
    if (failure_) std::rethrow_exception(failure_);
    return std::move(*done_[c]);
  }

 private:
  void run(const RlhfActorOptions& options, caf::actor_system& system, Model* policy, size_t w, size_t lanes) {
    try {
      RlhfSetup setup;
      setup.stage = job_.stage;
      setup.work_dir = job_.dir / ("rollout-" + std::to_string(w));  // what a respawned rollout loads; removed after
      setup.precision = job_.precision;
      setup.threads = 1;
      setup.metrics = job_.metrics;
      auto generation = actor_rlhf_services(system, setup, options);
      generation->publish_weights(*policy, 0, 0);
      for (size_t c = w; c < chunks_; c += lanes) {
        {
          std::lock_guard lock(mutex_);
          if (stop_ || failure_) return;
        }
        std::vector<msg::GenerationRequest> requests;
        for (size_t i = c * kGenerateChunk; i < std::min(job_.prompts.size(), (c + 1) * kGenerateChunk); ++i) {
          msg::GenerationRequest req;
          req.request_id = i + 1;
          req.prompt_ids = job_.prompt_ids[i];
          req.sampling = job_.sampling;
          req.samples = 2;
          requests.push_back(std::move(req));
        }
        auto rollouts = generation->generate(requests, 0);
        std::lock_guard lock(mutex_);
        done_[c] = std::move(rollouts);
        ready_.notify_all();
      }
    } catch (...) {
      std::lock_guard lock(mutex_);
      if (!failure_) failure_ = std::current_exception();
      ready_.notify_all();
    }
  }

  const PairJob& job_;
  const size_t chunks_;
  std::vector<LoadedModel> copies_;
  std::mutex mutex_;
  std::condition_variable ready_;
  std::vector<std::optional<std::vector<msg::Rollout>>> done_;  // by chunk
  std::exception_ptr failure_;
  bool stop_ = false;
  std::vector<std::thread> threads_;  // last: started once everything above exists
};

}  // namespace

ActorPairSource::ActorPairSource(caf::actor_system& system, RlhfActorOptions options)
    : system_(system), options_(std::move(options)) {}

ActorPairSource::ActorPairSource()
    : own_config_(message_config()),
      own_system_(std::make_unique<caf::actor_system>(*own_config_)),
      system_(*own_system_) {}

ActorPairSource::~ActorPairSource() = default;

std::vector<std::vector<int32_t>> ActorPairSource::sample_and_queue(const PairJob& job) {
  require(job.policy && job.feedback && job.text, "preferences stage " + job.stage + ": incomplete PairJob");
  require(job.prompts.size() == job.prompt_ids.size(),
          "preferences stage " + job.stage + ": " + std::to_string(job.prompts.size()) + " prompts, " +
              std::to_string(job.prompt_ids.size()) + " prompt id lists");
  const size_t n = job.prompts.size();
  caf::scoped_actor self{system_};

  const fs::path replay_dir = job.dir / "replay";
  fs::remove_all(replay_dir);  // a fresh buffer: a restarted stage samples again
  const auto replay = spawn_replay_buffer(system_, std::max<size_t>(2 * n, 1), "replay_buffer/" + job.stage,
                                          replay_dir.string());
  const std::shared_ptr<store::DurableStore> feedback(std::shared_ptr<store::DurableStore>{}, job.feedback);
  const auto collector = spawn_feedback_collector(system_, feedback, "feedback/" + job.stage);

  std::vector<std::vector<int32_t>> responses(2 * n);
  try {
    // 1. Rollouts -> replay buffer, in chunks of kGenerateChunk requests (request i + 1 asks prompt i for 2
    // samples), generated by the lanes while this thread makes earlier chunks durable.
    const size_t chunks = (n + kGenerateChunk - 1) / kGenerateChunk;
    Lanes lanes(job, options_, system_, chunks);
    using WriteHandle = decltype(self->request(replay, kTimeout, put_atom::value, Envelope{}));
    std::deque<WriteHandle> writing;
    for (size_t c = 0; c < chunks; ++c) {
      for (msg::Rollout& rollout : lanes.take(c)) {
        msg::ReplayRecord r;
        r.rollout = std::move(rollout);
        r.advantages.assign(r.rollout.response_ids.size(), 0.0f);
        r.group_id = r.rollout.request_id;
        r.step = msg::StepId{job.stage, 0};
        writing.push_back(self->request(replay, kTimeout, put_atom::value, wrap(r)));
      }
      if (job.progress) job.progress(static_cast<int64_t>(2 * std::min(n, (c + 1) * kGenerateChunk)));
      drain(writing, kWriteWindow, job.stage, "a replay buffer put", [](uint64_t) {});
    }
    drain(writing, 0, job.stage, "a replay buffer put", [](uint64_t) {});

    // 2. Replay buffer (by policy version; one version in this fresh buffer) -> pairs by request -> collector.
    std::vector<Envelope> records;
    caf::error failure;
    self->request(replay, kTimeout, version_atom::value, uint64_t{0}, UINT64_MAX, uint64_t{2 * n})
        .receive([&](std::vector<Envelope>& r) { records = std::move(r); }, [&](caf::error& e) { failure = std::move(e); });
    if (failure) fail(job.stage, "reading the replay buffer", failure);
    std::map<uint64_t, std::array<std::optional<msg::Rollout>, 2>> by_request;
    for (const Envelope& e : records) {
      auto r = unwrap<msg::ReplayRecord>(e);
      require(r.rollout.request_id >= 1 && r.rollout.request_id <= n && r.rollout.sample_index < 2,
              "preferences stage " + job.stage + ": unexpected rollout " + std::to_string(r.rollout.request_id) + "/" +
                  std::to_string(r.rollout.sample_index) + " in the replay buffer");
      by_request[r.rollout.request_id][r.rollout.sample_index] = std::move(r.rollout);
    }
    require(by_request.size() == n, "preferences stage " + job.stage + ": the replay buffer holds rollouts of " +
                                        std::to_string(by_request.size()) + " prompts, expected " + std::to_string(n));
    using QueueHandle = decltype(self->request(collector, kTimeout, queue_atom::value, Envelope{}));
    std::deque<QueueHandle> queueing;
    for (auto& [request, pair] : by_request) {
      require(pair[0] && pair[1], "preferences stage " + job.stage + ": request " + std::to_string(request) +
                                      " has one sample in the replay buffer, expected two");
      const size_t i = request - 1;
      responses[2 * i] = pair[0]->response_ids;
      responses[2 * i + 1] = pair[1]->response_ids;
      if (pair[0]->response_ids == pair[1]->response_ids) continue;  // identical: a certain tie, nothing to judge
      store::PairToJudge p;
      p.pair_id = request;
      p.prompt = {job.prompts[i], job.prompt_ids[i]};
      p.first = {job.text(pair[0]->response_ids), pair[0]->response_ids};
      p.second = {job.text(pair[1]->response_ids), pair[1]->response_ids};
      p.first_policy = pair[0]->policy_version;
      p.second_policy = pair[1]->policy_version;
      p.created_ns = static_cast<int64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                              std::chrono::system_clock::now().time_since_epoch())
                                              .count());
      queueing.push_back(self->request(collector, kTimeout, queue_atom::value, Envelope{kPairToJudgeKind, store::encode(p)}));
      drain(queueing, kWriteWindow, job.stage, "queueing a pair", [](uint64_t) {});
    }
    drain(queueing, 0, job.stage, "queueing a pair", [](uint64_t) {});
  } catch (...) {
    stop_and_wait(self, collector);
    stop_and_wait(self, replay);
    throw;
  }
  // The collector must be gone before the caller closes the feedback store it was given (the rollouts went
  // with the lanes, before the caller's policy may go).
  stop_and_wait(self, collector);
  stop_and_wait(self, replay);
  return responses;
}

std::unique_ptr<feedback::RecordSink> ActorPairSource::judgement_sink(const PairJob& job) {
  require(job.feedback != nullptr, "preferences stage " + job.stage + ": incomplete PairJob (no feedback store)");
  // Not owned: the stage closes the store after this sink (and with it the collector) has ended.
  const std::shared_ptr<store::DurableStore> feedback(std::shared_ptr<store::DurableStore>{}, job.feedback);
  return collector_sink(system_, feedback, "feedback/" + job.stage + "/judgements");
}

}  // namespace moerl::actors
