"""Record the current hashes of the code deps (lingbot/, stages/) in dvc.lock, leaving data deps, params
and outs as recorded: for a code-only change (a refactor whose outs are the same bytes) on a checkout
that does not hold the pipeline's data, where `dvc commit` cannot run. Usage: `.ci/env python tools/relock.py`."""

from dvc.repo import Repo

CODE = ("lingbot/", "stages/")
repo = Repo(".")
changed = []
with repo.lock:
    for stage in repo.index.stages:
        if not getattr(stage, "cmd", None):
            continue
        touched = False
        for dep in stage.deps:
            rel = dep.def_path
            if rel.startswith(CODE) and dep.exists:
                old = dep.hash_info
                if not old:  # never run (no lock entry): nothing recorded to bring up to date
                    continue
                dep.save()
                if dep.hash_info != old:
                    touched = True
                    changed.append(f"{stage.addressing}: {rel}")
        if touched:
            stage.dump(update_pipeline=False)
print("\n".join(changed) or "no code dep changed")
