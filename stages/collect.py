"""Stage collect: scripted MetaWorld experts -> LeRobot v3 dataset at data/collected (skipped, leaving a
placeholder, when ingest.source is another dataset: a robot of one's own)."""

import sys

from lingbot.cli import main

if __name__ == "__main__":
    sys.exit(main(["collect", "--params", "params.yaml", "--out", "data/collected", "--for-ingest",
                   "--metrics", "reports/collect.json"]))
