"""Stage pretrain: world-model training on data/latents -> models/pretrain (checkpoint/ + log.tsv)."""

import sys

from lingbot.cli import main

if __name__ == "__main__":
    sys.exit(main(["pretrain", "data/latents", "--params", "params.yaml", "--out", "models/pretrain",
                   "--log", "reports/pretrain_loss.tsv", "--metrics", "reports/pretrain.json"]))
