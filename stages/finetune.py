"""Stage finetune: world-model training on data/latents -> models/finetune (checkpoint/ + log.tsv)."""

import sys

from lingbot.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", "data/latents", "--params", "params.yaml", "--out", "models/finetune", "--init", "models/pretrain/checkpoint",
                   "--log", "reports/finetune_loss.tsv", "--metrics", "reports/finetune.json"]))
