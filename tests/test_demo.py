"""`make demo` runs `python -m jobs.demo`: the whole slice on embedded defaults, in a fresh process."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # the whole five-stage recipe, ~10 min on 2 cores: `make test-slow`
def test_demo_runs_end_to_end():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    # One epoch per stage keeps this test short; `make demo` runs the recipe's own settings.
    proc = subprocess.Popen([sys.executable, "-m", "jobs.demo", "defaults.train.epochs=1"], cwd=ROOT, env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=1200)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, (out[-3000:], err[-3000:])
    summary = json.loads(out[out.index("\n{") + 1:])
    stages = summary["recipe"]["stages"]
    assert [s["stage"] for s in stages] == ["sft:stage1-all", "sft:stage2-internal-medicine",
                                            "sft:stage3-endocrinology", "sft:reasoning", "dpo:dpo"]
    assert all(s["global_step"] == s["plan"]["max_steps"] > 0 for s in stages)
    assert stages[0]["data"]["rows_quarantined"] == 7 and stages[0]["data"]["rows_valid"] == 192
    assert stages[-1]["data"]["rows_quarantined"] > 0  # the broken DPO pairs
    # Stage 1 and reasoning SFT learn new text: the loss falls. Stages 2-3 revisit facts stage 1 already learnt
    # (their loss starts near zero and moves by noise): it must stay near zero, i.e. nothing is forgotten.
    assert all(s["last_loss"] < 0.5 * s["first_loss"] for s in (stages[0], stages[3]))
    assert all(s["first_loss"] < 0.1 and s["last_loss"] < 0.1 for s in stages[1:3])
    assert set(summary["heldout_mcq_accuracy"]) >= {"base", "finemed-tiny-dpo"}
    assert summary["dpo_heldout"]["n"] == 64
    assert summary["demo_reply"]["reply"].strip()
    assert "[8/8]" in out
    ev = summary["evaluation"]
    assert 0 <= ev["no_ttt"] <= 1 and 0 <= ev["ttt"] <= 1
    served = summary["serving"]
    assert served["plain"].strip() and served["ttt_info"]["applied"] and len(served["ttt_info"]["neighbours"]) == 3
