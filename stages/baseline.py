"""Stage bc / peer@KIND (baselines/dvc.yaml): baseline KIND on finetune's demos, rolled out on evaluate's
held-out episodes -> models/baselines/KIND, reports/baselines/KIND(.json)."""

import sys

from lingbot.cli import main

if __name__ == "__main__":
    kind = sys.argv[1]
    sys.exit(main(["baseline", kind, "--params", "params.yaml", "--demos", "data/demos", "--cache", "data/latents",
                   "--out", f"models/baselines/{kind}", "--eval-out", f"reports/baselines/{kind}",
                   "--metrics", f"reports/baselines/{kind}.json"]))
