"""Synthesis throughput against teacher concurrency: documents/s through the whole pipeline with an HTTP teacher of
fixed latency, at concurrency 1, 2, 4 and 8.

    .venv/bin/python -m bench.synthesis [--docs 64] [--latency 0.5] [--concurrency 1,2,4,8] [--batch 16]

Writes ``bench/results/synthesis_<device>.json`` and ``synthesis_<device>.png``. Target: near-linear scaling of
documents/s with teacher concurrency until the CPU saturates.

Set-up: the real ``SynthesisPipeline`` (Ray Data, every step, decontamination, Parquet outputs and manifest on the
embedded S3) on PubMedQA abstracts (``../shared/data/benchmarks/pubmedqa/train.jsonl``; synthetic texts from the
package's own medical sentences when that file is absent). The teacher is the scripted OpenAI-compatible test
server (``finemed_ray.toy.scripted_teacher``) answering every prompt type after ``--latency`` seconds, so the
teacher's own cost is fixed and known. One Ray Data teacher worker (``extra.num_workers=1``), so the requests in
flight are exactly the configured concurrency (the server's observed maximum is recorded). Every run writes to a
fresh output prefix: no response cache is reused.

Where the time goes: an extra run with zero teacher latency (at the highest concurrency) measures the pipeline's
own cost (Ray Data planning, shuffles, joins, S3 I/O, parsing) for the same documents. The JSON reports, for each
concurrency, the measured wall time against the ideal of that overhead plus ``requests x latency / concurrency``;
and, from the server's own request log, the time the teacher was busy (at least one request in flight) and the
request rate inside it against the ideal ``concurrency / latency`` -- the teacher side's scaling, separated from
Ray Data's per-step cost (``outside_teacher_s``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench import _harness as H

PUBMEDQA = H.ROOT.parent / "shared" / "data" / "benchmarks" / "pubmedqa" / "train.jsonl"


def seed_lines(n: int) -> tuple[list[str], str]:
    if PUBMEDQA.is_file():
        lines = [l for l in PUBMEDQA.read_text().splitlines() if l.strip()]
        if len(lines) >= n:
            return lines[:n], f"pubmedqa train ({PUBMEDQA})"
    rows = H.synthetic_conversations(n, seed=0)
    texts = [" ".join(m["content"] for m in r["messages"]) for r in rows]
    return [json.dumps({"id": f"s{i}", "question": t}) for i, t in enumerate(texts)], "synthetic"


def synth_config(prefix: str, base_url: str, concurrency: int, batch: int, docs: int):
    from finemed_ray.config import load_config
    from finemed_ray.synth.config import SynthJobConfig

    over = [f"input.path={prefix}/seeds.jsonl", "input.text_field=question", "input.max_tokens=400",
            f"output.path={prefix}/out", "decontamination.benchmarks={}"]
    for name in ("main", "reasoner"):
        over += [f"teachers.models.{name}.base_url={base_url}", f"teachers.models.{name}.model=scripted",
                 f"teachers.models.{name}.concurrency={concurrency}", f"teachers.models.{name}.batch_size={batch}",
                 f"teachers.models.{name}.max_retries=1", f"teachers.models.{name}.extra={{num_workers: 1}}"]
    return load_config(SynthJobConfig, H.ROOT / "configs/synth_http.yaml", over)


def run_once(server, lines: list[str], label: str, concurrency: int, batch: int, latency: float) -> dict[str, Any]:
    from finemed_ray import storage
    from finemed_ray.synth.pipeline import SynthesisPipeline

    prefix = f"s3://bench/synthesis/{label}"
    storage.delete(prefix)
    storage.write_text(f"{prefix}/seeds.jsonl", "\n".join(lines) + "\n")
    server.reset()
    server.delay_s = latency
    cfg = synth_config(prefix, server.base_url, concurrency, batch, len(lines))
    mon = H.Monitor(interval=2.0).start()
    t0 = time.time()
    manifest = SynthesisPipeline(cfg).run()
    wall = time.time() - t0
    load = mon.stop()
    requests = manifest["teacher_calls"]
    assert manifest["cache_hits"] == 0 and requests == server.request_count, "a run reused cached responses"
    step_seconds = {s["step"]: s["teacher"]["seconds"] for s in manifest["steps"] if "teacher" in s}
    busy = busy_seconds([(e["t_start"], e["t_end"]) for e in server.log if "t_end" in e])
    return {
        "concurrency": concurrency, "latency_s": latency, "docs": manifest["docs"], "wall_s": round(wall, 2),
        "docs_per_s": round(manifest["docs"] / wall, 4), "teacher_requests": requests,
        "requests_per_s": round(requests / wall, 3), "server_max_in_flight": server.max_in_flight,
        "kept": manifest["kept_by_kind"], "outputs": {k: v["rows"] for k, v in manifest["outputs"].items()},
        "teacher_step_seconds": step_seconds, "load": load,
        # Time with at least one request in flight at the server, and the request rate inside it: the teacher
        # side of the pipeline, free of Ray Data's own per-step cost.
        "teacher_busy_s": round(busy, 2), "outside_teacher_s": round(wall - busy, 2),
        "teacher_requests_per_busy_s": round(requests / busy, 3) if busy else None,
        "ideal_requests_per_busy_s": round(concurrency / latency, 3) if latency else None,
    }


def busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    c = [r["concurrency"] for r in runs]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(c, [r["docs_per_s"] for r in runs], "o-", label="measured")
    ax[0].plot(c, [r["ideal_docs_per_s"] for r in runs], "s--", label="ideal: overhead + requests x latency / c")
    ax[0].plot(c, [runs[0]["docs_per_s"] * x for x in c], ":", color="grey", label="linear from c=1")
    ax[0].set(xlabel="teacher concurrency", ylabel="documents / s", title="whole pipeline", xscale="log", yscale="log")
    ax[0].set_xticks(c, [str(x) for x in c])
    ax[0].legend(fontsize=7)
    ax[1].plot(c, [r["teacher_requests_per_busy_s"] for r in runs], "o-", label="measured")
    ax[1].plot(c, [r["ideal_requests_per_busy_s"] for r in runs], ":", color="grey", label="ideal: c / latency")
    ax[1].set(xlabel="teacher concurrency", ylabel="requests / s while the teacher is busy",
              title="teacher side (server-measured)", xscale="log", yscale="log")
    ax[1].set_xticks(c, [str(x) for x in c])
    ax[1].legend(fontsize=7)
    fig.suptitle(f"synthesis, {results['docs']} docs, teacher latency {results['latency_s']} s, "
                 f"{results['host']['cpus']} CPUs ({results['host']['device']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=64, help="seed documents per run")
    ap.add_argument("--latency", type=float, default=0.5, help="teacher latency per request (s)")
    ap.add_argument("--concurrency", default="1,2,4,8", help="teacher concurrency values")
    ap.add_argument("--batch", type=int, default=16, help="rows per Ray Data batch sent to the teacher")
    ap.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    H.setup_env()
    import ray

    from finemed_ray.toy.s3_server import EmbeddedS3
    from finemed_ray.toy.scripted_teacher import ScriptedTeacherServer, pipeline_reply

    levels = [int(x) for x in args.concurrency.split(",")]
    lines, source = seed_lines(args.docs)
    results: dict[str, Any] = {"benchmark": "synthesis", "docs": len(lines), "latency_s": args.latency,
                               "batch_size": args.batch, "data_source": source, "host": H.host_info(),
                               "target": "near-linear docs/s in teacher concurrency until the CPU saturates"}
    with EmbeddedS3() as s3, ScriptedTeacherServer(pipeline_reply) as server:
        s3.create_bucket("bench")
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        try:
            overhead = run_once(server, lines, "overhead", max(levels), args.batch, 0.0)
            print(json.dumps({"overhead_run": {k: overhead[k] for k in ("wall_s", "teacher_requests")}}), flush=True)
            runs = []
            for c in levels:
                r = run_once(server, lines, f"c{c}", c, args.batch, args.latency)
                print(json.dumps({k: r[k] for k in ("concurrency", "wall_s", "docs_per_s", "server_max_in_flight")}),
                      flush=True)
                runs.append(r)
        finally:
            ray.shutdown()
    for r in runs:
        ideal = overhead["wall_s"] + r["teacher_requests"] * args.latency / r["concurrency"]
        r["ideal_wall_s"] = round(ideal, 2)
        r["ideal_docs_per_s"] = round(r["docs"] / ideal, 4)
        r["speedup_vs_c1"] = round(r["docs_per_s"] / runs[0]["docs_per_s"], 3)
        r["teacher_speedup_vs_c1"] = round(r["teacher_requests_per_busy_s"] / runs[0]["teacher_requests_per_busy_s"], 3)
        r["efficiency_vs_linear"] = round(r["speedup_vs_c1"] / r["concurrency"], 3)
    results["overhead_run"] = overhead
    results["runs"] = runs
    results["summary"] = {
        "docs_per_s": {r["concurrency"]: r["docs_per_s"] for r in runs},
        "speedup_vs_c1": {r["concurrency"]: r["speedup_vs_c1"] for r in runs},
        "teacher_speedup_vs_c1": {r["concurrency"]: r["teacher_speedup_vs_c1"] for r in runs},
        "outside_teacher_s": {r["concurrency"]: r["outside_teacher_s"] for r in runs},
        "pipeline_overhead_s": overhead["wall_s"],
        "high_load_any": any(r["load"]["high_load"] for r in runs + [overhead]),
    }
    device = H.device_name()
    out = Path(args.out or H.RESULTS / f"synthesis_{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    print(json.dumps(results["summary"], indent=1))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
