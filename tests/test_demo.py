"""`make demo` runs `python -m jobs.demo`: the whole slice on embedded defaults, in a fresh process."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_end_to_end():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.demo", "train.epochs=2"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, (out[-3000:], err[-3000:])
    summary = json.loads(out[out.index("\n{") + 1:])
    assert summary["global_step"] == summary["plan"]["max_steps"] == 48  # 192 rows / 2 workers / 4 x 2 epochs
    assert summary["data"]["rows_quarantined"] == 7 and summary["data"]["rows_valid"] == 192
    assert summary["last_loss"] < summary["first_loss"]
    replies = summary["demo_replies"]
    assert set(replies) == {"trained wording", "held-out wording"}
    assert all(r["reply"].strip() for r in replies.values())
    assert "[5/5]" in out
