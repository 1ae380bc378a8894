"""`.ci/gpu run`: the steps in order, each in its own process group with its own time limit, inside a
total budget; then summary.json, summary.md (the table, printed last) and log.txt.

A step past its limit is killed with the workers it started and reported as a timeout; what it had
written stays. A failed step leaves its error and traceback in its JSON; the run goes on to the next.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lingbot.errors import LingbotError
from tools.gpu import REPO, STEPS

GPU_LIMITS = {"train": 50, "realtime": 110, "vae": 120, "policy": 240}
CPU_LIMITS = {"train": 60, "realtime": 60, "vae": 90, "policy": 150}
# Seconds of each step's limit it spends on its fixed-time work (the rest is start-up and scoring).
GPU_WORK_SECONDS = {"vae": 95}
CPU_WORK_SECONDS = {"vae": 25}


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None


def _headline(name: str, r: dict) -> str:
    """One line of the summary table: the step's headline figures."""
    if r.get("status") != "ok" and not any(k.startswith(("best", "psnr", "world_model_success")) for k in r):
        return (r.get("error") or r.get("status", "?")).splitlines()[0][:120]
    if name == "train":
        return (f"{r.get('device')}: best MFU {r.get('best_mfu')} at batch {r.get('best_batch')} "
                f"({r.get('best_samples_per_s')} samples/s, {r.get('best_tokens_per_s')} tokens/s; "
                f"peak {r.get('peak_tflops')} TFLOP/s {r.get('peak_dtype')} measured)")
    if name == "realtime":
        v = r.get("variants", {}).get(r.get("best_mode"), {})
        return (f"{r.get('device')}: {r.get('best_latency_ms')} ms/chunk ({r.get('best_mode')}, "
                f"{r.get('window_chunks')}-chunk window; half-way video {r.get('best_latency_ms_half_video')} ms); "
                f"cache vs recompute {v.get('cache_vs_recompute_max_abs_diff_actions')}")
    if name == "vae":
        return (f"held-out PSNR {r.get('psnr_db')} dB, SSIM {r.get('ssim')} after {r.get('steps')} steps "
                f"({r.get('fit_seconds')} s; >= 28 dB: {r.get('reached_28db')})")
    if name == "policy":
        def rate(who):
            k = r.get(f"{who}_success_rate")
            if k is None:
                return "n/a"
            n = r.get(f"{who}_episodes")
            return f"{round(k * n)}/{n} [{r.get(f'{who}_success_ci_low')}, {r.get(f'{who}_success_ci_high')}]"
        return (f"world model {rate('world_model')} vs BC {rate('bc')} "
                f"(each {r.get('train_seconds_budget')} s of training; {', '.join(r.get('tasks', []))})")
    return ""


def run(out: Path, gpu_dir: Path, cpu: bool, limits: dict[str, float], total: float, only: list[str],
        step_args: list[str], install_note: str | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    inputs = gpu_dir / "inputs"
    if not (gpu_dir / "prepare.json").is_file():
        raise LingbotError(f"run: {gpu_dir / 'prepare.json'} missing: run `.ci/gpu prepare` first")
    work = Path(tempfile.mkdtemp(prefix="lingbot-gpu-run-"))
    deadline = time.monotonic() + total
    log_lines = []
    summary = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "commit": _git("rev-parse", "HEAD"), "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
               "mode": "cpu" if cpu else "gpu", "install": install_note, "steps": {}}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"),
           "PYOPENGL_PLATFORM": os.environ.get("PYOPENGL_PLATFORM", "egl")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    work_seconds = CPU_WORK_SECONDS if cpu else GPU_WORK_SECONDS
    for name in STEPS:
        if only and name not in only:
            continue
        path = out / f"{name}.json"
        left = deadline - time.monotonic()
        limit = min(limits[name], left)
        if limit < 1:
            data = {"step": name, "status": "skipped", "error": "no time left in the run's total budget"}
            path.write_text(json.dumps(data, indent=2) + "\n")
            summary["steps"][name] = data
            continue
        cmd = [sys.executable, "-m", "tools.gpu", "step", name, "--inputs", str(inputs),
               "--work", str(work / name), "--result", str(path), *step_args]
        if cpu:
            cmd.append("--cpu")
        if name in work_seconds:
            cmd += ["--seconds", str(min(work_seconds[name], max(1.0, limit - (limits[name] - work_seconds[name]))))]
        print(f"gpu run: {name} (limit {limit:.0f} s)", flush=True)
        t0 = time.monotonic()
        with open(work / f"{name}.log", "w") as logf:
            proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=limit)
                status = None
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the step and the workers it started
                proc.wait()
                rc, status = None, "timeout"
        wall = round(time.monotonic() - t0, 1)
        try:
            data = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            data = {"step": name}
        tail = (work / f"{name}.log").read_text(errors="replace")[-4000:]
        if status == "timeout":
            data.update(status="timeout", error=f"stopped at its {limit:.0f} s limit")
        elif rc != 0 and data.get("status") != "failed":
            data.update(status="failed", error=f"exit code {rc}: " + (tail.strip().splitlines() or ["?"])[-1])
        data.update(wall_s=wall, limit_s=round(limit, 1))
        path.write_text(json.dumps(data, indent=2) + "\n")
        summary["steps"][name] = data
        log_lines.append(f"===== {name}: {data.get('status')} in {wall} s\n{tail}\n")
        print(f"gpu run: {name} {data.get('status')} in {wall} s", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    rows = [(name, data.get("status", "?"), data.get("wall_s", ""), _headline(name, data))
            for name, data in summary["steps"].items()]
    table = ["| step | status | wall s | figures |", "| --- | --- | --- | --- |"]
    table += [f"| {n} | {s} | {w} | {h} |" for n, s, w, h in rows]
    device = next((d.get("device") for d in summary["steps"].values() if d.get("device")), "?")
    text = (f"# lingbot GPU run, {summary['date']}, commit {summary['commit']}{' (dirty)' if summary['dirty'] else ''}, "
            f"{device}, mode {summary['mode']}\n\n" + "\n".join(table) + "\n")
    summary["table"], summary["device"] = text, device
    (out / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "steps"}
                                                 | {"steps": {n: {k: d.get(k) for k in ("status", "wall_s", "error")}
                                                              for n, d in summary["steps"].items()}}, indent=2) + "\n")
    (out / "log.txt").write_text("".join(log_lines)[-2_000_000:])
    (out / "summary.md").write_text(text)
    print(text, flush=True)
    return summary
