// moerl eval CHECKPOINT_DIR --data FILE.jsonl [--precision fp32|bf16|fp8]
#include <CLI/CLI.hpp>
#include <cstdio>

#include <nlohmann/json.hpp>

#include "actors/cli/commands.hpp"
#include "runtime/error.hpp"
#include "runtime/train/evaluate.hpp"

namespace moerl::cli {

void add_eval_command(CLI::App& app, std::function<int()>& action) {
  auto* cmd = app.add_subcommand(
      "eval", "Mean next-token cross-entropy and perplexity of a checkpoint over a JSONL file, printed as one JSON "
              "line: {\"loss\": ..., \"ppl\": ..., \"tokens\": ...}.\nWorks on any HF-format DeepSeek-V3 folder "
              "(config.json + model.safetensors, tokenizer.model optional).");
  struct Args {
    std::string dir, data, precision = "fp32", logits;
  };
  auto args = std::make_shared<Args>();
  cmd->add_option("checkpoint", args->dir, "Checkpoint folder")->required();
  cmd->add_option("--data", args->data,
                  "JSONL file: {\"input_ids\": [...]} lines (scored as given) or {\"text\": \"...\"} lines "
                  "(tokenized with the checkpoint's tokenizer, bos/eos added)")
      ->required();
  cmd->add_option("--precision", args->precision, "Linear layers in fp32, bf16 or fp8 (DeepSeek-V3 recipe)")
      ->check(CLI::IsMember({"fp32", "bf16", "fp8"}));
  cmd->add_option("--logits", args->logits,
                  "Also write the first sequence's input_ids and logits to this safetensors file (to compare with "
                  "another implementation, e.g. HF transformers)");
  cmd->callback([args, &action] {
    action = [args] {
      Precision p;
      parse_precision(args->precision, &p);
      const LoadedModel loaded = load_model_dir(args->dir);
      const EvalResult r = evaluate_jsonl(loaded, args->data, p, args->logits);
      const nlohmann::json out = {{"loss", r.loss}, {"ppl", r.ppl}, {"tokens", r.tokens}, {"sequences", r.sequences},
                                  {"precision", args->precision}};
      std::printf("%s\n", out.dump().c_str());
      return 0;
    };
  });
}

}  // namespace moerl::cli
