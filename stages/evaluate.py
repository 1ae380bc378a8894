"""Stage evaluate: assemble models/policy from the fine-tuned checkpoint, roll it out -> reports/eval*."""

import sys

from lingbot.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", "--params", "params.yaml", "--policy", "models/policy",
                   "--checkpoint", "models/finetune/checkpoint", "--vae", "models/vae", "--cache", "data/latents",
                   "--demos", "data/demos", "--out", "reports/eval", "--tasks-tsv", "reports/eval_tasks.tsv",
                   "--latency-tsv", "reports/eval_latency.tsv",
                   "--error-tsv", "reports/eval_action_error.tsv", "--metrics", "reports/eval.json"]))
