"""The synthesis pipeline end to end on Ray Data, with real S3 and a teacher served over real HTTP.

The teacher here is a TEST FIXTURE (``finemed_ray.toy.scripted_teacher``): an OpenAI-compatible server on
127.0.0.1 whose replies are scripted per prompt type, so every rule of the pipeline has a known expected outcome,
and which counts the requests it receives (to prove that a resumed run repeats no teacher call)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from finemed_ray import storage
from finemed_ray.config import load_config
from finemed_ray.errors import FinemedError
from finemed_ray.schemas import validate_dpo_row, validate_sft_row
from finemed_ray.synth.config import SynthJobConfig
from finemed_ray.synth.pipeline import SynthesisPipeline
from finemed_ray.toy.scripted_teacher import pipeline_reply

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT.parent / "shared" / "data" / "benchmarks"
PUBMEDQA = BENCH / "pubmedqa" / "train.jsonl"
MEDQA = BENCH / "medqa" / "test.jsonl"
N_SEEDS = 24
pytestmark = [
    pytest.mark.skipif(not PUBMEDQA.is_file() or not MEDQA.is_file(), reason=f"benchmark files not found under {BENCH}"),
    pytest.mark.slow,  # several full pipeline runs (~20 s each on 2 cores, ~2 min for the file): `make test-slow`
]


def _planted_texts() -> set[str]:
    return {" ".join(json.loads(l)["question"].split()) for l in MEDQA.read_text().splitlines()[:2]} \
        if MEDQA.is_file() else set()


PLANTED = _planted_texts()


def scripted_reply(messages: list[dict]) -> str:
    return pipeline_reply(messages, planted=PLANTED)


def seed_rows() -> list[str]:
    lines = PUBMEDQA.read_text().splitlines()[:N_SEEDS]
    medqa = [json.loads(l) for l in MEDQA.read_text().splitlines()[:2]]
    planted = [json.dumps({"id": f"planted-{q['realidx']}", "question": q["question"]}) for q in medqa]
    bad = ["{not json", json.dumps({"question": "   "})]
    duplicate = [lines[0]]
    return lines + planted + bad + duplicate


def synth_config(prefix: str, base_url: str, *extra: str) -> SynthJobConfig:
    return load_config(SynthJobConfig, ROOT / "configs/synth_http.yaml", [
        f"input.path={prefix}/seeds.jsonl", "input.text_field=question", "input.max_tokens=300",
        f"output.path={prefix}/out", f"teachers.models.main.base_url={base_url}",
        f"teachers.models.reasoner.base_url={base_url}", "teachers.models.main.model=scripted",
        "teachers.models.reasoner.model=scripted", "teachers.models.main.max_retries=1",
        "teachers.models.reasoner.max_retries=1", "teachers.models.main.concurrency=4",
        f"decontamination.benchmarks={{medqa: {MEDQA}}}", *extra])


def read_output(uri: str) -> list[dict]:
    if not storage.exists(uri):
        return []
    rows = []
    for f in storage.list_files(uri, suffixes=(".parquet",)):
        fs, path = storage.get_filesystem(f)
        rows += pq.read_table(path, filesystem=fs).to_pylist()
    return rows


@pytest.fixture(scope="module")
def server():
    from finemed_ray.toy.scripted_teacher import ScriptedTeacherServer

    with ScriptedTeacherServer(scripted_reply) as srv:
        yield srv


@pytest.fixture(scope="module")
def first_run(server, ray_cluster, s3):
    prefix = "s3://finemed-test/synth-http"
    storage.write_text(f"{prefix}/seeds.jsonl", "\n".join(seed_rows()) + "\n")
    cfg = synth_config(prefix, server.base_url)
    before = server.request_count
    manifest = SynthesisPipeline(cfg).run()
    return {"cfg": cfg, "manifest": manifest, "calls": server.request_count - before, "prefix": prefix}


def test_counts_add_up_and_nothing_is_lost(first_run):
    m = first_run["manifest"]
    out = m["outputs"]
    n_in = N_SEEDS + 2 + 2 + 1
    assert m["docs"] == n_in
    kept = out["sft"]["rows"] + out["reasoning"]["rows"]
    assert kept + out["quarantine"]["rows"] == n_in  # every document is kept or quarantined with a reason
    assert kept == sum(m["kept_by_kind"].values()) > 0
    for a, b in zip(m["steps"], m["steps"][1:]):
        assert a["docs_out"] == b["docs_in"]
    assert m["steps"][-1]["docs_out"] == kept
    assert m["teacher_calls"] == first_run["calls"] > 0 and m["cache_hits"] == 0
    assert m["prompt_tokens"] > 0 and m["completion_tokens"] > 0


def test_bad_rows_duplicates_and_unclassified_are_quarantined_with_reasons(first_run):
    q = read_output(first_run["manifest"]["outputs"]["quarantine"]["uri"])
    reasons = [r["reason"] for r in q]
    assert any(r.startswith("invalid JSON") for r in reasons)
    assert any("missing or empty" in r for r in reasons)
    assert any(r.startswith("duplicate:") for r in reasons)
    assert any(r.startswith("unclassified_primary: Cardiology clinic") for r in reasons)
    assert all(r["raw"] for r in q)  # the raw row or teacher output is kept


def test_planted_benchmark_questions_are_caught(first_run):
    q = read_output(first_run["manifest"]["outputs"]["quarantine"]["uri"])
    medqa = [json.loads(l) for l in MEDQA.read_text().splitlines()[:2]]
    contaminated = {r["reason"] for r in q if r["reason"].startswith("contaminated:")}
    for item in medqa:
        assert f"contaminated:medqa:{item['realidx']}" in contaminated


def test_outputs_follow_the_schemas_and_the_method(first_run):
    out = first_run["manifest"]["outputs"]
    sft, reasoning, dpo = (read_output(out[k]["uri"]) for k in ("sft", "reasoning", "dpo"))
    assert sft and reasoning and dpo
    for row in sft + reasoning:
        assert validate_sft_row(row) is None
        assert len(row["messages"]) == 4  # question, answer, one follow-up turn (config default)
        assert row["department"] and row["subdepartment"]
    assert all("## Thought" in r["messages"][1]["content"] and "## Summarization" in r["messages"][1]["content"]
               for r in reasoning)
    assert all(r["messages"][1]["content"].startswith("In practice") for r in sft)  # a plain (judged) answer
    for row in dpo:
        assert validate_dpo_row(row) is None and row["chosen"] != row["rejected"]
        assert "## Thought" in row["chosen"][0]["content"] and row["rejected"][0]["content"].startswith("Briefly")
    assert {r["department"] for r in sft + reasoning} <= {"Internal Medicine", "Obstetrics & Gynecology"}
    # SFT is partitioned by department / sub-department on storage.
    files = storage.list_files(out["sft"]["uri"], suffixes=(".parquet",))
    assert any("part_department=Internal_Medicine/part_subdepartment=Endocrinology/" in f for f in files)


def test_malformed_teacher_output_is_recorded_not_fatal(first_run):
    q = read_output(first_run["manifest"]["outputs"]["quarantine"]["uri"])
    bad_json = [r for r in q if r["reason"].startswith("questions_bad_json")]
    assert bad_json and all("oops" in r["raw"] for r in bad_json)


def test_rerun_reuses_every_response(first_run, server):
    before = server.request_count
    manifest = SynthesisPipeline(first_run["cfg"]).run()
    assert server.request_count == before  # no teacher call at all
    assert manifest["teacher_calls"] == 0 and manifest["cache_hits"] == first_run["manifest"]["teacher_calls"]
    assert manifest["outputs"] == first_run["manifest"]["outputs"]


def test_killed_run_resumes_without_repeats_or_losses(first_run, server, s3):
    """A run killed mid-pipeline, then rerun: same outputs as an uninterrupted run, and no request content is
    ever sent to the teacher twice."""
    prefix = "s3://finemed-test/synth-kill"
    storage.write_text(f"{prefix}/seeds.jsonl", "\n".join(seed_rows()) + "\n")
    server.reset()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = ("import sys; from jobs.synthesize import main, run; "
            "sys.exit(main(run, sys.argv[1:]))")
    cfg_args = ["--config", str(ROOT / "configs/synth_http.yaml"), f"input.path={prefix}/seeds.jsonl",
                "input.text_field=question", "input.max_tokens=300", f"output.path={prefix}/out",
                f"teachers.models.main.base_url={server.base_url}", f"teachers.models.reasoner.base_url={server.base_url}",
                "teachers.models.main.model=scripted", "teachers.models.reasoner.model=scripted",
                f"decontamination.benchmarks={{medqa: {MEDQA}}}"]
    proc = subprocess.Popen([sys.executable, "-c", code, *cfg_args], cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cache = f"{prefix}/out/cache/score_questions"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if storage.exists(cache) and storage.list_files(cache, suffixes=(".parquet",)):
            break
        time.sleep(0.5)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, 9)
    proc.wait()
    calls_before_kill = server.request_count
    assert calls_before_kill > 0

    cfg = synth_config(prefix, server.base_url)
    manifest = SynthesisPipeline(cfg).run()
    assert manifest["cache_hits"] > 0
    per_content = {}
    for entry in server.log:
        per_content[entry["hash"]] = per_content.get(entry["hash"], 0) + 1
    assert max(per_content.values()) == 1  # no prompt was sent twice across the two runs
    assert server.request_count == first_run["manifest"]["teacher_calls"]  # same total work as one clean run
    def rows(uri: str) -> list[str]:  # `source` is the input path, which differs between the two runs
        return sorted(json.dumps({k: v for k, v in r.items() if k != "source"}, sort_keys=True)
                      for r in read_output(uri))

    for name in ("sft", "reasoning", "dpo", "quarantine"):
        got = rows(manifest["outputs"][name]["uri"])
        want = rows(first_run["manifest"]["outputs"][name]["uri"])
        if name == "quarantine":  # dataset names carry no path, reasons and raw rows must match exactly
            assert len(got) == len(want)
        else:
            assert got == want, name


def test_teacher_down_fails_clearly_and_keeps_finished_work(ray_cluster, s3):
    prefix = "s3://finemed-test/synth-down"
    storage.write_text(f"{prefix}/seeds.jsonl", "\n".join(seed_rows()[:4]) + "\n")
    cfg = synth_config(prefix, "http://127.0.0.1:9/v1")  # nothing listens on port 9
    with pytest.raises(FinemedError, match="127.0.0.1:9"):
        SynthesisPipeline(cfg).run()


def test_s3_outage_mid_run_is_waited_out_with_the_same_outputs(first_run, server, s3_outage):
    """A 10 s S3 outage while the pipeline runs (reads, cache and step writes retry within
    FINEMED_S3_RETRY_WINDOW_S): the run finishes with exactly the rows of an uninterrupted run."""
    import threading

    prefix = "s3://finemed-test/synth-outage"
    storage.write_text(f"{prefix}/seeds.jsonl", "\n".join(seed_rows()) + "\n")
    cfg = synth_config(prefix, server.base_url)
    outcome: dict = {}

    def target():
        try:
            outcome["manifest"] = SynthesisPipeline(cfg).run()
        except BaseException as e:  # surfaced below
            outcome["error"] = e

    before = server.request_count
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    deadline = time.time() + 300
    while time.time() < deadline and thread.is_alive() and server.request_count - before < 10:
        time.sleep(0.1)
    assert thread.is_alive(), "the run ended before the outage could start"
    s3_outage.start(10.0)
    s3_outage.wait()
    assert s3_outage.blocked
    alive_after_outage = thread.is_alive()
    thread.join(timeout=600)
    if "error" in outcome:
        raise outcome["error"]
    assert alive_after_outage, "the run finished during the outage: it cannot have needed S3 (nothing tested)"
    manifest = outcome["manifest"]

    def rows(uri: str) -> list[str]:  # `source` is the input path, which differs between the two runs
        return sorted(json.dumps({k: v for k, v in r.items() if k != "source"}, sort_keys=True)
                      for r in read_output(uri))

    for name in ("sft", "reasoning", "dpo"):
        assert rows(manifest["outputs"][name]["uri"]) == rows(first_run["manifest"]["outputs"][name]["uri"]), name
    assert manifest["outputs"]["quarantine"]["rows"] == first_run["manifest"]["outputs"]["quarantine"]["rows"]
