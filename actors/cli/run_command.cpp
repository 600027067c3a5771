// moerl run RECIPE [--set key=value ...] [--out DIR]
#include <CLI/CLI.hpp>
#include <cstdio>
#include <filesystem>

#include "actors/cli/commands.hpp"
#include "actors/cli/process_launcher.hpp"
#include "actors/roles/driver.hpp"
#include "actors/roles/preference_pairs.hpp"
#include "actors/roles/replay_recorder.hpp"
#include "actors/roles/rlhf_actors.hpp"
#include "runtime/error.hpp"
#include "runtime/recipe/recipe.hpp"
#include "runtime/train/preferences_stage.hpp"
#include "runtime/train/rlhf_stage.hpp"
#include "runtime/train/run_recipe.hpp"
#ifdef MOERL_HAVE_GPU_MODEL
#include "runtime/gpu/gpu_trainer.hpp"
#endif

namespace moerl::cli {

void add_run_command(CLI::App& app, std::function<int()>& action) {
  auto* cmd = app.add_subcommand("run", "Run every stage of a recipe (pretrain, sft, reward_model, rlhf, dpo, "
                                        "eval_task) in this process; rlhf stages generate and score through "
                                        "supervised rollout and reward-model actors.\n"
                                        "Re-running the same command resumes: finished stages are skipped and an "
                                        "interrupted stage continues from its last checkpoint.");
  struct Args {
    std::string recipe;
    std::vector<std::string> overrides;
    std::string out;
    int processes = 1;
    int process = 0;
    std::string rendezvous;
    int restarts = 3;
  };
  auto args = std::make_shared<Args>();
  cmd->add_option("recipe", args->recipe, "Recipe file (YAML), e.g. recipes/quickstart.yaml")->required();
  cmd->add_option("--set", args->overrides,
                  "Override a recipe field before validation, as dotted.path=value (repeatable), e.g. "
                  "--set stages.0.steps=20 --set precision=fp8");
  cmd->add_option("--out", args->out, "Run folder (default: the recipe's `out`, else runs/<recipe name>)");
  cmd->add_option("--processes", args->processes,
                  "Spread the recipe's parallel parties over this many processes (one `moerl run` each, the same "
                  "recipe, --set and --out): whole pipeline stages (with their expert shards) or whole "
                  "data-parallel replicas per process; tensors move between them over Gloo. Without --process, "
                  "this command launches and supervises the N processes on this machine itself")
      ->check(CLI::Range(1, 1024));
  auto* process = cmd->add_option("--process", args->process,
                                  "This process's index, 0 .. processes - 1 (0 writes the checkpoints and metrics; "
                                  "I > 0 its metrics into <out>/process-I/), when you start each process yourself "
                                  "(e.g. on several machines)");
  auto* rendezvous = cmd->add_option(
      "--rendezvous", args->rendezvous,
      "With --process: a folder every process can reach where they meet (fresh for each launch)");
  process->needs(rendezvous);
  rendezvous->needs(process);
  cmd->add_option("--restarts", args->restarts,
                  "With --processes and no --process: when a process dies, stop the others and launch all again "
                  "from the newest checkpoint, at most this many times")
      ->check(CLI::Range(0, 1000))
      ->capture_default_str();
  cmd->callback([args, &action] {
    action = [args] {
      // A recipe with RLHF stages runs run_recipe's stage loop, its rlhf stages through the actor runtime:
      // generation by a rollout actor that gets the policy zero-copy after every update, rewards by a
      // reward-model actor, both supervised (restarted when they die; actors/roles/rlhf_actors.hpp). The
      // other stages of such a recipe (pretrain, task_sft, preferences, reward_model, dpo, eval_task) run in
      // this process: the driver actor does not run RL kinds (TODO(actors): those kinds as driver steps).
      Recipe recipe = load_recipe(args->recipe, args->overrides);
      if (!args->out.empty()) recipe.out = args->out;
      require(!std::filesystem::exists(recipe.out) || std::filesystem::is_directory(recipe.out),
              (args->out.empty() ? args->recipe + ": out: " : std::string("--out ")) + recipe.out.string() +
                  ": exists and is not a folder (the run folder holds checkpoints, metrics and the summary)");
      if (args->processes > 1 && args->rendezvous.empty()) {
        // Launch mode: this process starts and supervises the N `moerl run --process I` processes.
        for (const auto& st : recipe.stages)
          require(!is_rl_stage_kind(st.kind), args->recipe + ": --processes: recipes with rlhf stages run in one process");
        LaunchSpec spec;
        spec.binary = std::filesystem::read_symlink("/proc/self/exe");
        spec.run_args = {args->recipe, "--out", recipe.out.string()};
        for (const std::string& o : args->overrides) spec.run_args.insert(spec.run_args.end(), {"--set", o});
        spec.out = recipe.out;
        spec.processes = args->processes;
        spec.restarts = args->restarts;
        return launch_processes(spec);
      }
      bool rl = false;
      for (const auto& st : recipe.stages) rl = rl || is_rl_stage_kind(st.kind);
      actors::DriverProcesses processes{args->process, args->processes, args->rendezvous};
      if (processes.processes > 1) {
        require(!rl, args->recipe + ": --processes: recipes with rlhf stages run in one process");
        require(processes.process >= 0 && processes.process < processes.processes,
                "--process " + std::to_string(processes.process) + ": must lie in 0 .. " +
                    std::to_string(processes.processes - 1));
        require(!processes.rendezvous.empty(), "--processes " + std::to_string(processes.processes) +
                                                   ": give every process the same --rendezvous folder");
      }
      if (rl) {
        std::fprintf(stderr, "%s: RLHF recipe: rlhf stages through the rollout and reward-model actors, the other "
                             "stages in this process\n", args->recipe.c_str());
        caf::actor_system_config config;
        actors::add_message_types(config);
        caf::actor_system system{config};
        // Each rlhf step's rollouts and rewards also go to a durable replay buffer actor (<out>/replay/<stage>).
        const ScopedRlhfServices rlhf_actors(actors::recorded_rlhf_services_factory(system));
        actors::ActorPairSource preference_pairs(system);  // preferences: rollout -> replay buffer -> collector actors
        const ScopedPairSource preference_actors(&preference_pairs);
        const auto summary = run_recipe(recipe);
        std::printf("%s\n", summary.dump(2).c_str());
        std::fprintf(stderr, "run folder: %s (summary.json, report.html, metrics.jsonl, checkpoints)\n",
                     recipe.out.c_str());
        return 0;
      }
      // Through the actor runtime: a driver, a data loader and a stage trainer in this process.
#ifdef MOERL_HAVE_GPU_MODEL
      const actors::BackendChooser backend = gpu::backend_for_recipe;  // device: cuda trains on the GPU
#else
      const actors::BackendChooser backend;  // CPU only: the driver refuses device: cuda
#endif
      const auto run = actors::run_recipe_with_actors(args->recipe, args->overrides, args->out, backend, processes);
      std::printf("%s\n", run.summary.dump(2).c_str());
      std::fprintf(stderr, "run folder: %s (summary.json, report.html, metrics.jsonl, checkpoints)\n", run.out.c_str());
      return 0;
    };
  });
}

}  // namespace moerl::cli
