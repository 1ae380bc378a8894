"""Stage ingest: the params' LeRobot source -> data/demos (dataset copy, keys, split, q01/q99 stats)."""

import sys

from lingbot.cli import main
from lingbot.config import load_run_config

if __name__ == "__main__":
    source = load_run_config("params.yaml").ingest.source
    sys.exit(main(["ingest", source, "--params", "params.yaml", "--out", "data/demos",
                   "--metrics", "reports/ingest.json"]))
