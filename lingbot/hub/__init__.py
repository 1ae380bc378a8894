"""Releases: publish a policy bundle to the Hub (or a local hub) and pull it back, verified.

- `lingbot.hub.publish.publish(bundle, eval_path, cfg, ...)`: gate on the evaluation, assemble the release
  (bundle + eval.json + model card + sha256 manifest), commit it and tag it vN.
- `lingbot.hub.pull.pull("org/name@vN", DIR)`: fetch a tag and verify every file before DIR appears.
- `lingbot.hub.pull.latest_release(cfg)`: the current release's tag and evaluation metrics (retraining
  compares a candidate with it).

The release format lives in lingbot/hub/manifest.py, the local hub's layout in lingbot/hub/local.py.
"""

