"""Stage score_vae: what the VAE keeps of the objects (PSNR around each object and goal) -> reports/vae_objects.json."""

import sys

from lingbot.cli import main

if __name__ == "__main__":
    sys.exit(main(["score-vae", "data/demos", "--params", "params.yaml", "--vae", "models/vae",
                   "--metrics", "reports/vae_objects.json"]))
