// A party of a parallel run behind the stage trainer's protocol (stage_trainer.hpp: spawn_party_trainer). The
// step bookkeeping (step ids, a repeated step answered from its recorded result, the learning-rate check) is
// the single stage trainer's; the work is the party's share, done together with its peers.
#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <map>

#include "actors/roles/data_loader.hpp"
#include "actors/roles/stage_trainer.hpp"
#include "actors/roles/step_book.hpp"
#include "runtime/safetensors.hpp"
#include "runtime/train/checkpoint.hpp"
#include "runtime/train/step_apply.hpp"

extern "C" void openblas_set_num_threads(int);

namespace moerl::actors {
namespace fs = std::filesystem;

namespace {

struct PartyTrainerState {
  PartyTrainerSetup setup;
  std::string name;
  std::unique_ptr<Party> party;
  std::optional<Tokenizer> tokenizer;
  uint32_t stage = 0;
  ForwardOptions options;
  StepBook book;

  // Built on the party's own thread at the first command. Every party runs its loops on one thread: the
  // parties themselves are the parallelism (pp_local.hpp says why more threads per party slow a small machine).
  Party& get() {
    if (!party) {
      omp_set_num_threads(1);
      openblas_set_num_threads(1);
      party = setup.group->make(setup.party);
      // TODO(perf): every party initialises a whole model to take its share; a large model wants init by part.
      Model whole(setup.model);
      whole.init_random(setup.recipe.seed);
      party->load_weights(whole.params());
      tokenizer = Tokenizer::load(setup.tokenizer_file);
    }
    return *party;
  }
  const StageSpec& spec() const { return setup.recipe.stages[stage]; }
  msg::DecodeLimits limits() const {
    msg::DecodeLimits l;
    l.vocab = setup.model.vocab_size;
    return l;
  }
  // Work done together with the peers: a failure here aborts the group, so that no peer waits for this party.
  template <class F>
  auto together(F&& f) -> decltype(f()) {
    try {
      return f();
    } catch (const std::exception& e) {
      setup.group->abort(name + " failed: " + e.what());
      throw;
    }
  }
};

TokenBatch view(const msg::TokenBatch& m, std::vector<int64_t>& ids, std::vector<int64_t>& labels) {
  ids.assign(m.ids.begin(), m.ids.end());
  labels.assign(m.labels.begin(), m.labels.end());
  return TokenBatch{ids.data(), labels.data(), m.batch, m.seq};
}

stage_trainer_actor::behavior_type party_trainer(stage_trainer_actor::stateful_pointer<PartyTrainerState> self,
                                                 PartyTrainerSetup setup) {
  self->state.name = setup.group->name(setup.party);
  self->state.setup = std::move(setup);
  auto& st = self->state;
  return {
      [&st](describe_atom) {
        return guarded(st.name, [&] {
          st.together([&] { st.get(); });
          return std::string("cpu");
        });
      },
      [&st](begin_atom, uint32_t stage, const std::string& folder, bool with_optimizer) {
        return guarded(st.name, [&] {
          require(stage < st.setup.recipe.stages.size(),
                  "begin: stage " + std::to_string(stage) + " does not exist (the recipe has " +
                      std::to_string(st.setup.recipe.stages.size()) + ")");
          st.book.begun = false;
          st.stage = stage;
          uint64_t resumed = 0;
          st.together([&] {
            Party& p = st.get();
            p.start_stage(st.spec().optimizer);
            if (folder.empty()) return;
            Model whole(st.setup.model);
            whole.load_weights(read_safetensors(fs::path(folder) / "model.safetensors"));
            p.load_weights(whole.params());
            if (auto state = read_trainer_state(folder)) resumed = state->at("step").get<uint64_t>();
            if (with_optimizer) p.load_optimizer_state(folder);
          });
          st.options = stage_forward_options(st.setup.recipe, st.spec(), st.setup.model);
          st.book.begin(stage_run_id(st.setup.recipe, stage), resumed);
          return resumed;
        });
      },
      [&st](train_atom, const Envelope& e) {
        return guarded(st.name, [&] {
          const auto cmd = unwrap<msg::TrainStep>(e, st.limits());
          if (auto recorded = st.book.replay(cmd, st.spec())) return wrap(*recorded);
          const uint64_t step = cmd.step.step;
          std::vector<int64_t> ids, labels;
          const TokenBatch batch = view(cmd.batches[0], ids, labels);
          const PartyStep r = st.together([&] {
            return st.get().train_step(batch, st.options, static_cast<int64_t>(step) - 1, st.spec().bias_gamma);
          });
          require(std::isfinite(r.loss.total), "stage " + st.spec().name + ": the loss became " +
                                                   std::to_string(r.loss.total) + " at step " + std::to_string(step) +
                                                   " (try a lower learning rate)");
          msg::TrainStepResult out{cmd.step,          r.loss.loss,     r.loss.mtp_loss,
                                   r.loss.balance_loss, r.stats.grad_norm, r.stats.lr,
                                   static_cast<uint64_t>(r.loss.tokens), r.stats.skipped,
                                   loads_message(r.expert_loads, st.setup.model)};
          st.book.record(out);
          return wrap(out);
        });
      },
      [&st](evaluate_atom, const Envelope& e) {
        return guarded(st.name, [&] {
          const auto req = unwrap<msg::EvalRequest>(e, st.limits());
          st.book.check_run(req.step, "EvalRequest");
          // validation_loss (trainer.cpp): the token-weighted mean of every batch's loss.
          ForwardOptions options;
          options.precision = st.setup.recipe.precision;
          options.for_backward = false;
          double total = 0;
          int64_t tokens = 0;
          uint64_t counted = 0;
          for (const msg::TokenBatch& b : req.batches) {
            std::vector<int64_t> ids, labels;
            const LossReport r = st.together([&] { return st.get().evaluate(view(b, ids, labels), options); });
            total += r.loss * static_cast<double>(r.tokens);
            tokens += r.tokens;
            counted += loss_tokens(b);
          }
          return wrap(msg::EvalResult{req.step, tokens ? total / static_cast<double>(tokens) : 0.0, counted});
        });
      },
      [&st](checkpoint_atom, const Envelope& e) {
        return guarded(st.name, [&] {
          const auto req = unwrap<msg::CheckpointRequest>(e);
          const nlohmann::json state = st.book.checkpoint_state(req);
          st.together([&] {
            st.setup.group->checkpoint(st.setup.party, st.get(), req.folder, &*st.tokenizer, state);
          });
          // The first party of this process lists the files (every process's driver checks a manifest;
          // process 0 wrote the folder before any party returned).
          int first = 0;
          while (!st.setup.group->local(first)) ++first;
          if (st.setup.party != first) return wrap(msg::CheckpointManifest{req.folder, req.step, {}});
          return wrap(checkpoint_manifest(req.folder, req.step));
        });
      },
  };
}

}  // namespace

stage_trainer_actor spawn_party_trainer(caf::actor_system& system, PartyTrainerSetup setup) {
  return system.spawn<caf::detached>(party_trainer, std::move(setup));
}

}  // namespace moerl::actors
