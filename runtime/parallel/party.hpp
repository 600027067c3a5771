// The parties of one parallel training run and the in-process wiring between them: what the driver's
// stage-trainer actors (one per party, actors/roles/stage_trainer.hpp: spawn_party_trainer) each hold.
//
//   pipeline x expert (recipe parallelism.pipeline = P, expert = E):
//     P stage parties (PipelineStage, 1F1B over `micro_batches`) + P·E expert-shard parties (ExpertShard)
//     when E > 1; activations, their gradients and the experts' rows on in-process channels (data_plane.hpp);
//     one AdamW per party clipped with the global norm (pp_optimizer.hpp), exchanged on the group's board.
//   data x tensor (data = D, tensor = T):
//     D·T rank parties: a Model (T = 1) or a TensorParallelModel rank (T > 1), each with a DataParallelTrainer
//     (ZeRO-1 AdamW) on its slice of the batch; one InProcessGroup per tensor group and per data group.
//
// Across processes (PartyProcesses): each process builds the group for the parties it runs. Pipeline x expert:
// a channel between parties of one process stays in-process, one between processes is a Gloo channel
// (channel_gloo.hpp), and the board is shared by an allgather between the processes (party_board.cpp), so
// every party still gets the same result. Data x tensor: a replica's tensor group stays in one process, a data
// group spanning processes runs over Gloo (connect_gloo). A checkpoint gathers every party's weights and
// optimizer state to process 0, which writes it.
//
// Every party of a group gets every command (train, evaluate, checkpoint) and they run it together, each on
// its own thread; a command's result (the step's loss, the norm, the expert loads) is the same on every party.
// Tensors move only on the channels, the collectives and the board, never in actor messages.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "runtime/data/tokenizer.hpp"
#include "runtime/model/model.hpp"
#include "runtime/optim/adamw.hpp"
#include "runtime/parallel/collectives.hpp"
#include "runtime/parallel/pp_optimizer.hpp"
#include "runtime/parallel/pp_stage.hpp"
#include "runtime/recipe/recipe.hpp"
#include "runtime/safetensors.hpp"

namespace moerl {

struct PartyStep {
  LossReport loss;                       // over the whole batch, as Model::forward reports it
  StepStats stats;                       // grad_norm: the global norm before clipping
  std::vector<ExpertLoad> expert_loads;  // of the whole batch, Model::expert_loads() order
};

// Optimizer files of a checkpoint: file name -> tensors (pointers into the parties' optimizers).
using OptimizerFiles = std::map<std::string, std::map<std::string, const Tensor*>>;

class Party {
 public:
  virtual ~Party() = default;
  // A fresh optimizer for the next stage (collective-free).
  virtual void start_stage(const AdamWConfig& config) = 0;
  // This party's parameters (and buffers) from a whole model's.
  virtual void load_weights(const Params& whole) = 0;
  // This party's optimizer state from a checkpoint folder written by a group of the same shape.
  virtual void load_optimizer_state(const std::filesystem::path& folder) = 0;
  // One training step (0-based `step`); collective: every party of the group calls it with the same batch.
  virtual PartyStep train_step(const TokenBatch& batch, const ForwardOptions& options, int64_t step,
                               float bias_gamma) = 0;
  // Forward only (options.for_backward = false); collective. The whole batch's losses.
  virtual LossReport evaluate(const TokenBatch& batch, const ForwardOptions& options) = 0;
  // Writes this party's share of the whole model into `whole` (a Model's params), and its optimizer state.
  virtual void store_weights(Params& whole) const = 0;
  // The names of `whole` that store_weights writes (a checkpoint across processes sends these to process 0).
  virtual std::vector<std::string> stored_names(const Params& whole) const = 0;
  virtual void optimizer_state(OptimizerFiles& files) const = 0;
};

// The processes of a group spread over several: which process runs which party, and where they meet.
struct PartyProcesses {
  std::vector<int> process_of;  // [party] -> its process, 0 .. processes - 1; every process runs >= 1 party
  int process = 0;              // this process
  GlooRendezvous rendezvous;    // GlooRendezvous::in_folder between processes (in_memory between threads)
  std::string prefix = "moerl.party";  // the group's rendezvous keys: distinct per run (and per restart)
  std::string hostname = "127.0.0.1";  // the address this process listens on
};

// process_of for `processes` processes that each run whole units: pipeline x expert, a stage with its expert
// shards (stage s in process s mod processes); data x tensor, a replica with its tensor ranks (replica d in
// process d mod processes). Throws moerl::Error naming parallelism.pipeline (or .data) when there are fewer
// units than processes.
std::vector<int> spread_parties(const ParallelSpec& spec, int processes);

class PartyGroup {
 public:
  // `spec` must be one that load_recipe accepts (pipeline x expert or data x tensor, spec.any()).
  // `timeout`: how long a party waits for its peers at any exchange before failing.
  PartyGroup(const ModelConfig& config, const ParallelSpec& spec,
             std::chrono::milliseconds timeout = std::chrono::seconds(120));
  // This process's parties of a group spread over processes. Blocks until every process has joined the
  // board's collectives; pipeline x expert: then connects the Gloo channels it has an end of, in one global
  // order. Data x tensor: a replica's tensor ranks must share a process (a tensor group stays in-process); a
  // data group spanning processes is a Gloo group, each member connecting its rank in make(). Throws
  // moerl::Error naming what failed or timed out.
  PartyGroup(const ModelConfig& config, const ParallelSpec& spec, const PartyProcesses& processes,
             std::chrono::milliseconds timeout = std::chrono::seconds(120));
  ~PartyGroup();
  PartyGroup(const PartyGroup&) = delete;
  PartyGroup& operator=(const PartyGroup&) = delete;

  int size() const { return static_cast<int>(names_.size()); }
  // "stage_trainer/<s>" and "expert_shard/<s>.<r>" (pipeline x expert), "stage_trainer/<d>.<t>" (data x tensor).
  const std::string& name(int party) const { return names_.at(static_cast<size_t>(party)); }
  // Builds party `party` on the group's channels and collectives (once per party; call it on the thread that
  // will run the party). Only a party of this process (local()).
  std::unique_ptr<Party> make(int party);
  bool local(int party) const;
  int local_size() const { return local_size_; }
  const ModelConfig& config() const { return config_; }

  // Every party calls sync with its contribution `mine`; the last to arrive runs `once` after every `mine`;
  // all return after `once` ran (or throw what it threw). Serialised under the group's lock.
  void sync(int party, const std::function<void()>& mine, const std::function<void()>& once);
  // Every party calls it; the last to arrive writes the training checkpoint `dir` atomically, in
  // runtime/train/checkpoint.hpp's layout: the whole model's weights assembled from every party, the tokenizer,
  // trainer_state.json, and the optimizer files (pipeline x expert: one optimizer.safetensors, AdamW's own
  // format, resumable by a single stage trainer; data x tensor: optimizer.rank<d>.<t>.safetensors, each rank's
  // ZeRO-1 shard, resumable by a group of the same shape).
  void checkpoint(int party, const Party& p, const std::filesystem::path& dir, const Tokenizer* tokenizer,
                  const nlohmann::json& trainer_state);
  // Wakes every waiting party and fails every later exchange with `why`: a dead party releases its peers.
  void abort(const std::string& why);

  // The board of the pipeline parties' exchange after a step's backward (written by sync's `once`).
  struct Board {
    std::vector<GradSquares> squares;           // [party]
    std::vector<LossSums> sums;                 // [party]
    std::vector<std::vector<ExpertLoad>> loads; // [party]
    double norm = 0;
    LossSums total;
    std::vector<ExpertLoad> all_loads;  // stage 0's layers, then stage 1's, ...
  };
  Board& board() { return board_; }

 private:
  friend class StageParty;
  friend class ShardParty;
  friend class RankParty;
  void build(const PartyProcesses* processes);
  // Replica d's member of tensor rank t's data group when that group spans processes (null otherwise).
  std::unique_ptr<Collectives> connect_data_member(int d, int t);
  // Fills the board's entries of the other processes' parties (sync's `once`, across processes).
  void share_board();
  // Process 0 gets every other process's checkpoint weights and optimizer tensors.
  void gather_checkpoint();

  ModelConfig config_;
  ParallelSpec spec_;
  std::chrono::milliseconds timeout_;
  std::vector<std::string> names_;
  // pipeline x expert
  PipelinePlan plan_;
  std::vector<std::shared_ptr<Channel>> channels_;
  std::vector<StageLinks> stage_links_;          // [stage]
  // data x tensor
  std::vector<std::unique_ptr<InProcessGroup>> tensor_groups_;  // [replica], T ranks each
  std::vector<std::unique_ptr<InProcessGroup>> data_groups_;    // [tensor rank], D replicas each; null: over Gloo
  // across processes (empty process_of_: every party here)
  std::vector<int> process_of_;
  int process_ = 0;
  int local_size_ = 0;
  std::unique_ptr<Collectives> processes_;  // one rank per process: the board and the checkpoint
  GlooRendezvous rendezvous_;
  GlooOptions gloo_;  // the group's prefix, hostname and timeout
  std::vector<SafeTensors> received_;        // a distributed checkpoint's tensors from the other processes
  std::vector<std::string> checkpoint_names_;  // the weights this process's parties stored (checkpoint())

  std::mutex mu_;
  std::condition_variable cv_;
  int arrived_ = 0;
  uint64_t generation_ = 0;
  std::string aborted_;
  std::exception_ptr once_error_;
  Board board_;
  std::unique_ptr<Model> checkpoint_model_;  // assembled by checkpoint()
  OptimizerFiles checkpoint_files_;
};

}  // namespace moerl
