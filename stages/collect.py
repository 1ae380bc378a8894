"""Stage collect: scripted MetaWorld experts -> LeRobot v3 dataset at data/collected."""

import sys

from lingbot.cli import main

if __name__ == "__main__":
    sys.exit(main(["collect", "--params", "params.yaml", "--out", "data/collected",
                   "--metrics", "reports/collect.json"]))
