"""Stage publish: models/policy + reports/eval.json -> tag vN of publish.repo_id (local hub or the Hub), if the
evaluation passes publish.min_success."""

import sys

from lingbot.cli import main

if __name__ == "__main__":
    sys.exit(main(["publish", "models/policy", "--eval", "reports/eval.json", "--params", "params.yaml",
                   "--lock", "dvc.lock", "--demos", "data/demos/lingbot.json", "--metrics", "reports/publish.json",
                   "--quiet"]))
