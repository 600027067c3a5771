// The data loader and the stage trainer: run_recipe's data path and run_stage's step, split into the
// messages of actors/roles/data_loader.hpp and stage_trainer.hpp.

#include <algorithm>
#include <array>
#include <fstream>
#include <map>

#include "actors/roles/data_loader.hpp"
#include "actors/roles/stage_trainer.hpp"
#include "actors/roles/step_book.hpp"
#include "runtime/safetensors.hpp"
#include "runtime/train/checkpoint.hpp"
#include "runtime/train/step_apply.hpp"
#include "runtime/train/step_data.hpp"
#include "runtime/util/threads.hpp"


namespace moerl::actors {
namespace fs = std::filesystem;

namespace {

// OpenMP's thread count is per thread: each actor thread sets the recipe's before heavy work.
void use_recipe_threads(const Recipe& recipe) { use_threads(recipe.threads); }

msg::TokenBatch to_message(const Batch& b, const msg::StepId& step) {
  msg::TokenBatch out{step, static_cast<uint32_t>(b.batch), static_cast<uint32_t>(b.seq), {}, {}};
  out.ids.resize(b.input_ids.size());
  out.labels.resize(b.labels.size());
  for (size_t i = 0; i < b.input_ids.size(); ++i) {
    require(b.input_ids[i] >= 0 && b.input_ids[i] <= INT32_MAX, "token id " + std::to_string(b.input_ids[i]) +
                                                                    " does not fit a TokenBatch (int32)");
    out.ids[i] = static_cast<int32_t>(b.input_ids[i]);
    out.labels[i] = static_cast<int32_t>(b.labels[i]);
  }
  return out;
}

Batch from_message(const msg::TokenBatch& m) {
  Batch b{m.batch, m.seq, std::vector<int64_t>(m.ids.begin(), m.ids.end()),
          std::vector<int64_t>(m.labels.begin(), m.labels.end())};
  return b;
}

// ---- data loader ----

struct DataLoaderState {
  Recipe recipe;
  std::string name;
  std::unique_ptr<RunData> data;
  std::unique_ptr<StageSource> source;  // of the open stage
  uint32_t stage = 0;
  std::string run_id;
  uint64_t last_step = 0;                    // the step of the last batch served
  std::optional<msg::TokenBatch> last_batch;  // served again when that step is asked for again

  RunData& dataset() {
    if (!data) {
      use_recipe_threads(recipe);
      data = std::make_unique<RunData>(prepare_run_data(recipe));
    }
    return *data;
  }
  StageSource& open_source() {
    require(source != nullptr, "no stage is open (send open first)");
    return *source;
  }
  msg::LoaderPosition position() {
    const LoaderState s = open_source().source.state();
    return msg::LoaderPosition{s.seed, s.epoch, s.cursor, msg::StepId{run_id, last_step}};
  }
};

data_loader_actor::behavior_type data_loader(data_loader_actor::stateful_pointer<DataLoaderState> self, Recipe recipe,
                                             std::string name) {
  self->state.recipe = std::move(recipe);
  self->state.name = std::move(name);
  auto& st = self->state;
  return {
      [&st](describe_atom) {
        return guarded(st.name, [&] {
          RunData& d = st.dataset();
          return wrap(msg::DatasetInfo{(st.recipe.out / Tokenizer::kFileName).string(),
                                       static_cast<uint32_t>(d.tokenizer.vocab_size()), d.tokenizer.bos_id(),
                                       d.tokenizer.eos_id(), d.tokenizer.pad_id(), static_cast<uint64_t>(d.train.size()),
                                       static_cast<uint64_t>(d.validation.size())});
        });
      },
      [&st](open_atom, uint32_t stage) {
        return guarded(st.name, [&] {
          RunData& d = st.dataset();
          st.source = make_stage_source(st.recipe, stage, d);
          st.stage = stage;
          st.run_id = stage_run_id(st.recipe, stage);
          st.last_step = 0;
          st.last_batch.reset();
          msg::StageData out;
          out.stage = stage;
          out.position = st.position();
          for (const Batch& b : st.source->source.validation) out.validation.push_back(to_message(b, {st.run_id, 0}));
          out.has_bigram = st.recipe.stages[stage].kind == "pretrain";
          if (out.has_bigram) out.bigram_validation_loss = bigram_validation_loss(d, st.source->source.validation);
          return wrap(out);
        });
      },
      [&st](batch_atom, uint64_t step) {
        return guarded(st.name, [&] {
          StageSource& s = st.open_source();
          if (step == st.last_step && st.last_batch) return wrap(*st.last_batch);
          if (step != st.last_step + 1)
            throw Refusal(msg::ErrorCode::InvalidRequest,
                          "batch for step " + std::to_string(step) + " of " + st.run_id + " refused: the loader served step " +
                              std::to_string(st.last_step) + " last (it serves that step again or the next one)");
          st.last_batch = to_message(s.source.next(), msg::StepId{st.run_id, step});
          st.last_step = step;
          return wrap(*st.last_batch);
        });
      },
      [&st](position_atom) { return guarded(st.name, [&] { return wrap(st.position()); }); },
      [&st](restore_atom, const Envelope& e) {
        return guarded(st.name, [&] {
          const auto p = unwrap<msg::LoaderPosition>(e);
          StageSource& s = st.open_source();
          require(p.step.run == st.run_id, "LoaderPosition.step.run: \"" + p.step.run + "\", expected the open stage's \"" +
                                               st.run_id + "\"");
          s.source.restore(LoaderState{p.seed, p.epoch, p.cursor});
          st.last_step = p.step.step;
          st.last_batch.reset();
          return wrap(st.position());
        });
      },
  };
}

// ---- stage trainer ----

struct StageTrainerState {
  StageTrainerSetup setup;
  std::string name;
  std::unique_ptr<Model> host;
  std::unique_ptr<TrainingBackend> backend;
  std::optional<Tokenizer> tokenizer;
  uint32_t stage = 0;
  ForwardOptions options;
  StepBook book;

  TrainingBackend& model() {
    if (!backend) {
      use_recipe_threads(setup.recipe);
      host = std::make_unique<Model>(setup.model);
      host->init_random(setup.recipe.seed);
      backend = setup.backend ? setup.backend(setup.recipe, *host) : make_cpu_backend(*host);
      tokenizer = Tokenizer::load(setup.tokenizer_file);
    }
    return *backend;
  }
  const StageSpec& spec() const { return setup.recipe.stages[stage]; }
  msg::DecodeLimits limits() const {
    msg::DecodeLimits l;
    l.vocab = setup.model.vocab_size;
    return l;
  }
};

stage_trainer_actor::behavior_type stage_trainer(stage_trainer_actor::stateful_pointer<StageTrainerState> self,
                                                 StageTrainerSetup setup, std::string name) {
  self->state.setup = std::move(setup);
  self->state.name = std::move(name);
  auto& st = self->state;
  return {
      [&st](describe_atom) { return guarded(st.name, [&] { return st.model().device(); }); },
      [&st](begin_atom, uint32_t stage, const std::string& folder, bool with_optimizer) {
        return guarded(st.name, [&] {
          require(stage < st.setup.recipe.stages.size(),
                  "begin: stage " + std::to_string(stage) + " does not exist (the recipe has " +
                      std::to_string(st.setup.recipe.stages.size()) + ")");
          TrainingBackend& b = st.model();
          st.book.begun = false;
          st.stage = stage;
          b.start_stage(st.spec().optimizer);
          uint64_t resumed = 0;
          if (!folder.empty()) {
            b.load_weights(read_safetensors(fs::path(folder) / "model.safetensors"));
            if (auto state = read_trainer_state(folder)) resumed = state->at("step").get<uint64_t>();
            if (with_optimizer) b.load_optimizer_state(read_safetensors(fs::path(folder) / "optimizer.safetensors"));
          }
          st.options = stage_forward_options(st.setup.recipe, st.spec(), b.config());
          st.book.begin(stage_run_id(st.setup.recipe, stage), resumed);
          return resumed;
        });
      },
      [&st](train_atom, const Envelope& e) {
        return guarded(st.name, [&] {
          const auto cmd = unwrap<msg::TrainStep>(e, st.limits());
          if (auto recorded = st.book.replay(cmd, st.spec())) return wrap(*recorded);
          const uint64_t step = cmd.step.step;
          const Batch batch = from_message(cmd.batches[0]);
          const StepReport r =
              apply_train_step(st.model(), TokenBatch{batch.input_ids.data(), batch.labels.data(), batch.batch, batch.seq},
                               st.options, static_cast<int64_t>(step), st.spec().bias_gamma, st.spec().name);
          msg::TrainStepResult out{cmd.step,      r.loss.loss,  r.loss.mtp_loss,
                                   r.loss.balance_loss, r.stats.grad_norm, r.stats.lr,
                                   static_cast<uint64_t>(r.loss.tokens), r.stats.skipped,
                                   loads_message(r.expert_loads, st.model().config())};
          st.book.record(out);
          return wrap(out);
        });
      },
      [&st](evaluate_atom, const Envelope& e) {
        return guarded(st.name, [&] {
          const auto req = unwrap<msg::EvalRequest>(e, st.limits());
          st.book.check_run(req.step, "EvalRequest");
          std::vector<Batch> batches;
          uint64_t tokens = 0;
          for (const msg::TokenBatch& b : req.batches) {
            batches.push_back(from_message(b));
            tokens += loss_tokens(b);
          }
          return wrap(msg::EvalResult{req.step, validation_loss(st.model(), batches, st.setup.recipe.precision), tokens});
        });
      },
      [&st](checkpoint_atom, const Envelope& e) {
        return guarded(st.name, [&] {
          const auto req = unwrap<msg::CheckpointRequest>(e);
          const nlohmann::json state = st.book.checkpoint_state(req);
          TrainingBackend& b = st.model();
          save_checkpoint(req.folder, b.host_model(), &*st.tokenizer, &b.host_optimizer(), &state);
          return wrap(checkpoint_manifest(req.folder, req.step));
        });
      },
  };
}

}  // namespace

// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum of CheckpointManifest files.
static uint32_t crc32c_file(const fs::path& file) {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  std::ifstream in(file, std::ios::binary);
  require(in.good(), file.string() + ": cannot read");
  uint32_t crc = 0xFFFFFFFFu;
  std::vector<char> buf(1 << 20);
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    for (std::streamsize i = 0; i < in.gcount(); ++i)
      crc = table[(crc ^ static_cast<uint8_t>(buf[static_cast<size_t>(i)])) & 0xFF] ^ (crc >> 8);
  }
  return crc ^ 0xFFFFFFFFu;
}

msg::CheckpointManifest checkpoint_manifest(const fs::path& folder, const msg::StepId& step) {
  msg::CheckpointManifest m{folder.string(), step, {}};
  std::vector<fs::path> files;
  for (const auto& entry : fs::directory_iterator(folder))
    if (entry.is_regular_file()) files.push_back(entry.path());
  std::sort(files.begin(), files.end());
  for (const fs::path& f : files) {
    const uint32_t crc = crc32c_file(f);
    m.files.push_back(msg::FileEntry{f.filename().string(), static_cast<uint64_t>(fs::file_size(f)),
                                     msg::ChecksumKind::Crc32c,
                                     {static_cast<uint8_t>(crc >> 24), static_cast<uint8_t>(crc >> 16),
                                      static_cast<uint8_t>(crc >> 8), static_cast<uint8_t>(crc)}});
  }
  return m;
}

std::string stage_run_id(const Recipe& recipe, size_t stage) {
  require(stage < recipe.stages.size(), "stage " + std::to_string(stage) + " does not exist");
  return recipe.name + "/" + recipe.stages[stage].name;
}

data_loader_actor spawn_data_loader(caf::actor_system& system, const Recipe& recipe, std::string name) {
  return system.spawn<caf::detached>(data_loader, recipe, std::move(name));
}

stage_trainer_actor spawn_stage_trainer(caf::actor_system& system, StageTrainerSetup setup, std::string name) {
  return system.spawn<caf::detached>(stage_trainer, std::move(setup), std::move(name));
}

}  // namespace moerl::actors
