"""`make demo` runs `python -m jobs.demo`: the whole chain on embedded defaults, in a fresh process, at the shipped
settings. The test asserts what the demo claims, on its own held-out figures: every stage's effect on the same
held-out questions, a clean terminal and log, and outputs a user can open afterwards."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(2400)  # the demo (~12 min on 2 quiet cores) runs in the first test's fixture


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-output")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.demo", "--output", str(out)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        terminal, err = proc.communicate(timeout=1800)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = (out / "demo.log").read_text(errors="replace") if (out / "demo.log").exists() else ""
    assert proc.returncode == 0, (terminal[-3000:], err[-3000:], log[-5000:])
    return {"out": out, "terminal": terminal + err, "log": log,
            "summary": json.loads((out / "summary.json").read_text())}


@pytest.mark.slow  # the whole chain at the shipped settings, ~12 min on 2 cores: `make test-slow`
def test_every_stage_is_measured_on_the_same_heldout_questions(demo):
    s = demo["summary"]
    stages = {st["stage"]: st for st in s["stages"]}
    assert list(stages) == ["base", "stage1-all", "stage2-internal-medicine", "stage3-endocrinology", "reasoning",
                            "dpo"]
    for st in stages.values():
        ev = st["eval"]
        assert ev["n"] == 128 and ev["chance"] == 0.25  # each figure with its n and chance level
    assert stages["base"]["eval"]["accuracy"] < 0.1  # a random model answers nothing
    assert stages["stage1-all"]["eval"]["accuracy"] > 0.4  # SFT teaches the facts (chance 0.25)
    assert stages["stage1-all"]["paired_vs_previous"]["p_value"] < 0.001


@pytest.mark.slow
def test_the_chain_ends_with_a_model_that_answers_the_heldout_questions(demo):
    """Floors on the figures, looser than the Claims (which the next test checks are reported truthfully): on this
    machine the shipped run gives stage 1 1.000, stage 3 0.984, reasoning SFT 0.930, DPO 0.953 (README, 'What each
    stage teaches the tiny model'; bit-reproducible here, not yet compared across CPUs). Before the seed corpus
    asked six train wordings per fact, reasoning SFT fell to 0.734 and DPO to 0.648: these floors fail there."""
    stages = {st["stage"]: st["eval"]["accuracy"] for st in demo["summary"]["stages"]}
    assert stages["stage1-all"] >= 0.9
    assert stages["reasoning"] >= 0.85 and stages["reasoning"] >= stages["stage3-endocrinology"] - 0.10
    assert stages["dpo"] >= 0.85  # the final model, in the mode it trains (reason, then answer)


@pytest.mark.slow
def test_reasoning_sft_and_dpo_train_their_format_and_the_claims_are_reported_truthfully(demo):
    stages = {st["stage"]: st for st in demo["summary"]["stages"]}
    reasoning, dpo = stages["reasoning"]["eval"], stages["dpo"]["eval"]
    # reasoning SFT and DPO teach the trained layout: the model reasons, then answers, within the token budget
    assert reasoning["reasoning_rate"] > 0.8 and reasoning["cut_off_rate"] < 0.05
    assert dpo["reasoning_rate"] > 0.8 and dpo["cut_off_rate"] < 0.05
    # DPO separates held-out pairs (the reference scores 0 / 0 by definition)
    pref = stages["dpo"]["preference"]
    assert pref["n"] == 128 and pref["preference_accuracy"] >= 0.9 and pref["reward_margin"] > 0
    # Each of the method's promises is checked on this run and reported as met / NOT met, truthfully, on the
    # terminal and in summary.json (README 'What each stage teaches the tiny model' reports the measured runs).
    claims = {c["claim"].split(" ", 1)[0]: c for c in demo["summary"]["claims"]}
    assert set(claims) == {"reasoning", "DPO", "the", "TTT"}
    r = stages["reasoning"]["paired_vs_previous"]
    assert claims["reasoning"]["met"] == (r["after"] >= r["before"] or r["p_value"] >= 0.05)
    d = stages["dpo"]["paired_vs_previous"]
    assert claims["DPO"]["met"] == (d["after"] >= d["before"] - 0.02)
    chain = demo["summary"]["chain"]
    assert chain["from"] == "stage3-endocrinology" and chain["to"] == "dpo" and chain["n"] == 128
    assert claims["the"]["met"] == (chain["after"] >= chain["before"] - 0.02)
    assert claims["TTT"]["met"] == demo["summary"]["ttt"]["significant"]
    for c in claims.values():
        assert f"[{'met' if c['met'] else 'NOT met'}] {c['claim']}: {c['detail']}" in demo["terminal"]


@pytest.mark.slow
def test_ttt_figure_comes_with_its_paired_test_and_a_plain_verdict(demo):
    ttt = demo["summary"]["ttt"]
    assert ttt["n"] == 128 and 0 <= ttt["p_value"] <= 1
    assert ttt["significant"] == (ttt["p_value"] < 0.05 and ttt["ttt"] > ttt["no_ttt"])
    assert ("is significant" in ttt["verdict"]) == ttt["significant"]
    assert ttt["verdict"] in demo["terminal"]


@pytest.mark.slow
def test_synthesis_feeds_training_and_the_served_reply_is_readable(demo):
    s = demo["summary"]
    syn = s["synthesis"]
    assert syn["teacher"]["offline"] and syn["decontaminated"] >= 1
    assert syn["outputs"]["sft"] > 0 and syn["outputs"]["dpo"] > 0
    stages = {st["stage"]: st for st in s["stages"]}
    assert stages["stage1-all"]["train"]["data"]["rows_valid"] == syn["outputs"]["sft"]
    served = s["serving"]
    # the trained layout, complete: a Thought, then a Summarization that names the answer
    assert served["plain_form"] == "reasoning" and served["ttt_form"] == "reasoning", served
    assert served["finish_reasons"] == ["stop", "stop"]
    assert "## Thought" in served["plain"] and "## Summarization" in served["plain"]


@pytest.mark.slow
def test_terminal_is_readable_and_the_log_has_no_traceback(demo):
    terminal, log = demo["terminal"], demo["log"]
    assert "Traceback" not in terminal and "Traceback" not in log
    assert "Warning" not in terminal and "WARNING" not in terminal
    assert len(terminal.splitlines()) < 150
    for label in ("1/7 storage", "3/7 synthesis", "4/7 train 1/5", "4/7 train 5/5", "5/7 TTT", "6/7 serving",
                  "7/7 outputs"):
        assert f"[{label}] done in" in terminal, label
    assert "FailurePolicy" not in log  # no crash-and-retry in a clean run
    assert "Summary (held-out questions: n=128, chance 0.25; whole demo" in terminal


@pytest.mark.slow
def test_outputs_are_local_files_a_user_can_open(demo):
    out = demo["out"]
    for rel in ("model/config.json", "model/tokenizer.json", "eval/report.md", "eval/accuracy.png",
                "eval/predictions.jsonl", "synthesis/manifest.json", "summary.json", "demo.log"):
        assert (out / rel).is_file(), rel
    assert any((out / "synthesis" / "quarantine").rglob("*.parquet"))
    assert str(out) in demo["terminal"]
    # The eval report a user opens: CIs, chance, the paired TTT test and a breakdown by the questions' department.
    report = (out / "eval/report.md").read_text()
    for needle in ("95% CI", "| chance |", "McNemar exact p=", "### facts-heldout by category", "| Pediatrics |"):
        assert needle in report, needle


def test_stage_line_says_when_ray_train_recovered_from_a_fault():
    """One terminal line says what happened when a stage resumed after a worker fault; none on a clean run."""
    from jobs.demo_extras import stage_line

    ev = {"accuracy": 0.5, "n": 2, "chance": 0.25, "reasoning_rate": 0, "no_answer_rate": 0, "cut_off_rate": 0,
          "direct_loglik": 0.5, "predictions": [{"id": 1, "correct": True}, {"id": 2, "correct": False}]}
    trained = {"data": {"rows_valid": 10, "rows_train": 9, "rows_eval": 1, "rows_quarantined": 0}, "global_step": 5,
               "first_loss": 2.0, "last_loss": 1.0, "resumed_from_step": None}
    clean = stage_line(trained, ev, ev)
    assert "worker failed" not in clean and "held-out accuracy 0.500 -> 0.500 (n=2, chance 0.25" in clean
    recovered = stage_line({**trained, "resumed_from_step": 3}, ev, ev)
    assert recovered.splitlines()[-1].strip().startswith("a worker failed") and "step 3" in recovered


def test_claims_say_met_or_not_met_from_the_figures():
    from jobs.demo_extras import claims, claims_text

    def stage(name, before, after, p, **extra):
        return {"stage": name, "paired_vs_previous": {"before": before, "after": after, "p_value": p}, **extra}

    pref = {"preference_accuracy": 1.0, "reward_margin": 7.0}
    ttt = {"no_ttt": 0.70, "ttt": 0.72, "p_value": 0.5, "significant": False}
    good = claims([stage("reasoning", 0.80, 0.78, 0.6), stage("dpo", 0.78, 0.77, 0.9, preference=pref)],
                  {"before": 0.80, "after": 0.79, "p_value": 0.8}, ttt)
    assert [c["met"] for c in good] == [True, True, True, False]
    bad = claims([stage("reasoning", 0.93, 0.55, 1e-9), stage("dpo", 0.55, 0.50, 0.04, preference=pref)],
                 {"before": 0.93, "after": 0.50, "p_value": 1e-10}, {**ttt, "significant": True})
    assert [c["met"] for c in bad] == [False, False, False, True]
    assert "significantly lower" in bad[0]["detail"]
    text = claims_text(bad)
    assert text.count("[NOT met]") == 3 and text.count("[met]") == 1
