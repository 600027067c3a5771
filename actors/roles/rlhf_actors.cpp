#include "actors/roles/rlhf_actors.hpp"

#include <cstdio>
#include <optional>
#include <type_traits>

#include "actors/roles/reward_model.hpp"
#include "actors/roles/rollout.hpp"
#include "runtime/train/checkpoint.hpp"

namespace moerl::actors {
namespace {

namespace fs = std::filesystem;

// One supervised actor: its current handle, and how often it was asked and restarted in this stage.
template <class Handle>
struct Supervised {
  std::string name;
  Handle handle;
  uint64_t sent = 0;
  int restarts = 0;
};

class ActorServices final : public RlhfServices {
 public:
  ActorServices(caf::actor_system& system, RlhfSetup setup, RlhfActorOptions options)
      : system_(system), self_(system), setup_(std::move(setup)), options_(std::move(options)) {
    rollout_.name = kRlhfRolloutName;
    reward_.name = kRlhfRewardModelName;
    if (!setup_.reward_model.empty()) spawn_reward_model_actor();
  }

  ~ActorServices() override {
    // The rollout holds a pointer to the trainer's model: it must be gone before the model may be.
    stop(rollout_.handle);
    stop(reward_.handle);
    std::error_code ec;
    fs::remove_all(setup_.work_dir, ec);
    fs::remove(setup_.work_dir.parent_path(), ec);  // when no other stage's folder is left in it
  }

  void publish_weights(Model& policy, uint64_t version, int64_t step) override {
    if (!rollout_.handle) {
      // What a respawned rollout loads before it is given the current weights again.
      save_checkpoint(start_dir(), policy, nullptr, nullptr, nullptr);
      spawn_rollout_actor();
    }
    weights_ = std::shared_ptr<Model>(&policy, [](Model*) {});  // not owned: the trainer's model
    version_ = version;
    weights_step_ = static_cast<uint64_t>(step);
    send_weights(step);
  }

  std::vector<msg::Rollout> generate(const std::vector<msg::GenerationRequest>& requests, int64_t step) override {
    require(static_cast<bool>(rollout_.handle), setup_.stage + ": generate before any weights were published");
    std::vector<msg::Rollout> out;
    for (const auto& req : requests) {
      const Envelope request = wrap(req);
      const auto replies = ask<std::vector<Envelope>>(rollout_, step, generate_atom::value, request);
      for (const Envelope& e : replies) out.push_back(unwrap<msg::Rollout>(e));
    }
    return out;
  }

  std::vector<float> score(const std::vector<msg::Rollout>& sequences, int64_t step) override {
    require(static_cast<bool>(reward_.handle), setup_.stage + ": score without a reward model");
    std::vector<float> out;
    for (const auto& r : sequences) {
      const Envelope request = wrap(r);
      const auto s = unwrap<msg::RewardScore>(ask<Envelope>(reward_, step, score_atom::value, request));
      require(s.request_id == r.request_id && s.sample_index == r.sample_index,
              setup_.stage + ": " + reward_.name + " answered request " + std::to_string(s.request_id) + " sample " +
                  std::to_string(s.sample_index) + " for request " + std::to_string(r.request_id) + " sample " +
                  std::to_string(r.sample_index));
      out.push_back(s.score);
    }
    return out;
  }

  void record(int64_t step, const std::vector<msg::Rollout>& rollouts, std::span<const float> rewards) override {
    if (options_.record) options_.record(step, rollouts, rewards);
  }

 private:
  fs::path start_dir() const { return setup_.work_dir / "start"; }

  void spawn_rollout_actor() {
    rollout_.handle = spawn_rollout(system_, start_dir(), setup_.precision, rollout_.name, setup_.threads);
    self_->monitor(rollout_.handle);
  }

  void spawn_reward_model_actor() {
    reward_.handle = spawn_reward_model(system_, setup_.reward_model, setup_.precision, reward_.name, setup_.threads);
    self_->monitor(reward_.handle);
  }

  void send_weights(int64_t step) {
    const uint64_t held = ask<uint64_t>(rollout_, step, weights_atom::value, weights_, version_, weights_step_);
    require(held == version_, setup_.stage + ": " + rollout_.name + " holds policy version " + std::to_string(held) +
                                  " after being sent version " + std::to_string(version_));
  }

  template <class Handle>
  void stop(Handle& handle) {
    if (!handle) return;
    self_->send_exit(handle, caf::exit_reason::user_shutdown);
    self_->wait_for(handle);
    handle = nullptr;
  }

  // The down messages that arrived (without waiting): a current actor's death restarts it; an old handle's
  // (already replaced after a bounced request) is ignored.
  void take_down_messages(int64_t step) {
    for (bool more = true; more;) {
      self_->receive(
          [&](caf::down_msg& down) {
            if (rollout_.handle && down.source == rollout_.handle.address())
              restart(rollout_, step, caf::to_string(down.reason));
            else if (reward_.handle && down.source == reward_.handle.address())
              restart(reward_, step, caf::to_string(down.reason));
          },
          caf::after(std::chrono::seconds(0)) >> [&] { more = false; });
    }
  }

  template <class Handle>
  void restart(Supervised<Handle>& actor, int64_t step, const std::string& reason) {
    self_->demonitor(actor.handle.address());
    actor.handle = nullptr;
    const std::string where = "at step " + std::to_string(step + 1) + " of " + setup_.stage;
    if (actor.restarts >= options_.max_restarts)
      throw Error(setup_.stage + ": the " + actor.name + " actor died (" + reason + ") " + where +
                  " and was restarted " + std::to_string(actor.restarts) +
                  " times already in this stage; the stage stops");
    ++actor.restarts;
    std::fprintf(stderr, "%s died (%s) %s; restarted, the request is sent again (restart %d of %d)\n",
                 actor.name.c_str(), reason.c_str(), where.c_str(), actor.restarts, options_.max_restarts);
    if (setup_.metrics)
      setup_.metrics->write(
          {{"event", "restart"}, {"stage", setup_.stage}, {"actor", actor.name}, {"step", step + 1},
           {"reason", reason}});
    if constexpr (std::is_same_v<Handle, rollout_actor>) {
      spawn_rollout_actor();
      send_weights(step);
    } else {
      spawn_reward_model_actor();
    }
  }

  // The reply of `actor` to xs..., restarting it and asking again while it is dead.
  template <class Reply, class Handle, class... Ts>
  Reply ask(Supervised<Handle>& actor, int64_t step, const Ts&... xs) {
    for (;;) {
      const uint64_t sent = actor.sent++;
      if (options_.before_request) options_.before_request(actor.name, caf::actor_cast<caf::actor>(actor.handle), sent);
      take_down_messages(step);
      std::optional<Reply> reply;
      caf::error failure;
      self_->request(actor.handle, options_.reply_timeout, xs...)
          .receive([&](Reply& r) { reply = std::move(r); }, [&](caf::error& e) { failure = std::move(e); });
      if (reply) return std::move(*reply);
      if (failure != caf::sec::request_receiver_down)
        throw Error(setup_.stage + ": step " + std::to_string(step + 1) + ": " + actor.name + ": " + describe(failure));
      restart(actor, step, "its request bounced: " + describe(failure));
    }
  }

  caf::actor_system& system_;
  caf::scoped_actor self_;
  RlhfSetup setup_;
  RlhfActorOptions options_;
  Supervised<rollout_actor> rollout_;
  Supervised<reward_model_actor> reward_;
  std::shared_ptr<Model> weights_;
  uint64_t version_ = 0, weights_step_ = 0;
};

}  // namespace

std::unique_ptr<RlhfServices> actor_rlhf_services(caf::actor_system& system, const RlhfSetup& setup,
                                                  RlhfActorOptions options) {
  return std::make_unique<ActorServices>(system, setup, std::move(options));
}

RlhfServicesFactory actor_rlhf_services_factory(caf::actor_system& system, RlhfActorOptions options) {
  return [&system, options](const RlhfSetup& setup) { return actor_rlhf_services(system, setup, options); };
}

}  // namespace moerl::actors
