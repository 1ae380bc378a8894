"""Stage cache_latents: encode every episode of data/demos with models/vae into data/latents."""

import sys

from lingbot.cli import main

if __name__ == "__main__":
    sys.exit(main(["cache-latents", "data/demos", "--vae", "models/vae", "--params", "params.yaml",
                   "--out", "data/latents", "--metrics", "reports/latents.json"]))
