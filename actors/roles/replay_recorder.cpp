#include "actors/roles/replay_recorder.hpp"

#include <chrono>
#include <deque>

#include "actors/roles/rlhf_actors.hpp"
#include "runtime/rl/grpo.hpp"

namespace moerl::actors {

std::vector<msg::ReplayRecord> replay_records(const std::string& stage, int64_t step,
                                              const std::vector<msg::Rollout>& rollouts, std::span<const float> rewards) {
  require(rewards.size() == rollouts.size(), stage + ": " + std::to_string(rewards.size()) + " rewards for " +
                                                 std::to_string(rollouts.size()) + " rollouts");
  if (rollouts.empty()) return {};
  // Group size: the samples of the first request (request-major, every request asked for as many).
  size_t group = 1;
  while (group < rollouts.size() && rollouts[group].request_id == rollouts[0].request_id) ++group;
  require(rollouts.size() % group == 0, stage + ": " + std::to_string(rollouts.size()) +
                                            " rollouts are not whole groups of " + std::to_string(group));
  const auto advantages = rl::group_advantages(rewards, static_cast<int64_t>(group), true);
  std::vector<msg::ReplayRecord> out;
  for (size_t i = 0; i < rollouts.size(); ++i) {
    require(rollouts[i].request_id == rollouts[i - i % group].request_id,
            stage + ": rollout " + std::to_string(i) + " (request " + std::to_string(rollouts[i].request_id) +
                ") breaks the groups of " + std::to_string(group));
    msg::ReplayRecord r;
    r.rollout = rollouts[i];
    const size_t n = r.rollout.response_ids.size();
    r.score = rewards[i];
    r.rewards.assign(n, 0.0f);
    if (n > 0) r.rewards.back() = rewards[i];
    r.advantages.assign(n, advantages[i]);
    r.group_id = r.rollout.request_id;
    r.step = msg::StepId{stage, static_cast<uint64_t>(step + 1)};
    out.push_back(std::move(r));
  }
  return out;
}

RolloutRecorder replay_recorder(caf::actor_system& system, replay_buffer_actor buffer, std::string stage) {
  return [&system, buffer, stage](int64_t step, const std::vector<msg::Rollout>& rollouts, std::span<const float> rewards) {
    caf::scoped_actor self{system};
    using Handle = decltype(self->request(buffer, std::chrono::seconds(1), put_atom::value, Envelope{}));
    std::deque<std::pair<Handle, const msg::Rollout*>> pending;
    const auto records = replay_records(stage, step, rollouts, rewards);
    for (size_t i = 0; i < records.size(); ++i)
      pending.emplace_back(self->request(buffer, std::chrono::minutes(5), put_atom::value, wrap(records[i])), &rollouts[i]);
    std::string failure;
    for (auto& [handle, rollout] : pending)
      handle.receive([](uint64_t) {},
                     [&, r = rollout](caf::error& e) {
                       if (failure.empty())
                         failure = stage + ": step " + std::to_string(step + 1) + ": the replay buffer refused request " +
                                   std::to_string(r->request_id) + " sample " + std::to_string(r->sample_index) + ": " +
                                   describe(e);
                     });
    if (!failure.empty()) throw Error(failure);
  };
}

namespace {

// The actor services plus the replay buffer they record into; the services go first (no record after that),
// then the buffer is stopped and awaited, so its store is closed when the stage returns.
class RecordedServices : public RlhfServices {
 public:
  RecordedServices(caf::actor_system& system, replay_buffer_actor buffer, std::unique_ptr<RlhfServices> inner)
      : system_(system), buffer_(std::move(buffer)), inner_(std::move(inner)) {}
  ~RecordedServices() override {
    inner_.reset();
    caf::scoped_actor self{system_};
    self->monitor(buffer_);
    self->send_exit(buffer_, caf::exit_reason::user_shutdown);
    self->receive([](const caf::down_msg&) {}, caf::after(std::chrono::seconds(30)) >> [] {});
  }
  void publish_weights(Model& policy, uint64_t version, int64_t step) override {
    inner_->publish_weights(policy, version, step);
  }
  std::vector<msg::Rollout> generate(const std::vector<msg::GenerationRequest>& requests, int64_t step) override {
    return inner_->generate(requests, step);
  }
  std::vector<float> score(const std::vector<msg::Rollout>& sequences, int64_t step) override {
    return inner_->score(sequences, step);
  }
  void record(int64_t step, const std::vector<msg::Rollout>& rollouts, std::span<const float> rewards) override {
    inner_->record(step, rollouts, rewards);
  }

 private:
  caf::actor_system& system_;
  replay_buffer_actor buffer_;
  std::unique_ptr<RlhfServices> inner_;
};

}  // namespace

RlhfServicesFactory recorded_rlhf_services_factory(caf::actor_system& system, size_t capacity) {
  return [&system, capacity](const RlhfSetup& setup) -> std::unique_ptr<RlhfServices> {
    require(!setup.replay_dir.empty(), setup.stage + ": the rlhf services need a folder for the replay buffer");
    const std::filesystem::path& db = setup.replay_dir;
    std::filesystem::remove_all(db);  // a stage that runs (again) records its own rollouts only
    std::filesystem::create_directories(db.parent_path());
    auto buffer = spawn_replay_buffer(system, capacity, "replay_buffer/" + setup.stage, db.string());
    RlhfActorOptions options;
    options.record = replay_recorder(system, buffer, setup.stage);
    return std::make_unique<RecordedServices>(system, buffer, actor_rlhf_services(system, setup, options));
  };
}

}  // namespace moerl::actors
