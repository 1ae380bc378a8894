"""Stage fit_vae: train (or load) the causal video VAE -> models/vae; PSNR/SSIM metrics and a PNG grid."""

import sys

from lingbot.cli import main

if __name__ == "__main__":
    sys.exit(main(["fit-vae", "data/demos", "--params", "params.yaml", "--out", "models/vae",
                   "--grid", "reports/vae_grid.png", "--log", "reports/vae_train.tsv",
                   "--metrics", "reports/vae.json"]))
