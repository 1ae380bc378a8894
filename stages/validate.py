"""Stage validate: Great Expectations gate over data/demos; report + data docs in reports/validation."""

import sys

from lingbot.cli import main

if __name__ == "__main__":
    sys.exit(main(["validate", "data/demos", "--params", "params.yaml", "--report", "reports/validation",
                   "--metrics", "reports/validate.json"]))
