// moerl run RECIPE [--set key=value ...] [--out DIR]
#include <CLI/CLI.hpp>
#include <cstdio>

#include "actors/cli/commands.hpp"
#include "actors/roles/driver.hpp"
#include "actors/roles/preference_pairs.hpp"
#include "actors/roles/replay_recorder.hpp"
#include "actors/roles/rlhf_actors.hpp"
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
  };
  auto args = std::make_shared<Args>();
  cmd->add_option("recipe", args->recipe, "Recipe file (YAML), e.g. recipes/quickstart.yaml")->required();
  cmd->add_option("--set", args->overrides,
                  "Override a recipe field before validation, as dotted.path=value (repeatable), e.g. "
                  "--set stages.0.steps=20 --set precision=fp8");
  cmd->add_option("--out", args->out, "Run folder (default: the recipe's `out`, else runs/<recipe name>)");
  cmd->callback([args, &action] {
    action = [args] {
      // A recipe with RLHF stages runs run_recipe's stage loop, its rlhf stages through the actor runtime:
      // generation by a rollout actor that gets the policy zero-copy after every update, rewards by a
      // reward-model actor, both supervised (restarted when they die; actors/roles/rlhf_actors.hpp). The
      // other stages of such a recipe (pretrain, task_sft, preferences, reward_model, dpo, eval_task) run in
      // this process: the driver actor does not run RL kinds (TODO(actors): those kinds as driver steps).
      Recipe recipe = load_recipe(args->recipe, args->overrides);
      if (!args->out.empty()) recipe.out = args->out;
      bool rl = false;
      for (const auto& st : recipe.stages) rl = rl || is_rl_stage_kind(st.kind);
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
      const auto run = actors::run_recipe_with_actors(args->recipe, args->overrides, args->out, backend);
      std::printf("%s\n", run.summary.dump(2).c_str());
      std::fprintf(stderr, "run folder: %s (summary.json, metrics.jsonl, checkpoints)\n", run.out.c_str());
      return 0;
    };
  });
}

}  // namespace moerl::cli
