"""Peak memory of the Ray Train worker processes when the corpus grows tenfold (N rows vs 10N rows).

    .venv/bin/python -m bench.streaming_rss [--rows 160] [--factor 10] [--batch 16] [--max-length 256]
        [--deepspeed configs/deepspeed/zero3.json|null]

Writes ``bench/results/streaming_rss_<device>.json``. Target: the workers' peak RSS with 10N rows within 10% of
the one with N rows, i.e. no worker ever materialises the corpus (or its shard); the rows stream through.

Each size runs the real ``SFTJob`` for exactly one epoch (no ``max_steps``), so every worker iterates over its
whole shard; the JSON checks it (``samples_seen`` = rows per worker x workers, ``global_step`` = the plan). While
it runs, the driver samples the ``ray::RayTrainWorker`` processes that descend from it (other Ray clusters on the
machine are ignored) every ``--interval`` seconds with psutil + /proc: VmRSS, and VmHWM (the kernel's own
high-water mark of RSS, so the peak is exact even between samples), with the RssAnon (private heap) /
RssShmem (mapped Ray object store) split at the sampled peak.

Phases: within each optimizer step RSS swings by hundreds of MiB (activations, the chunked LM head), so the
lifetime peak (VmHWM) is a per-step transient plus whatever stays allocated. The JSON also describes the training
loop alone (samples between the first and the last optimizer step, from the trainer's TensorBoard step times): the
median RSS, and the RSS *floor* (10th percentile of the samples) in each fifth of the epoch; a corpus accumulating
in the worker would show as a floor rising from the 2nd to the last fifth (the 1st fifth is allocator warm-up).

Sensitivity: how much a worker would grow if it did materialise its 10N shard is estimated in the driver by
building that shard as the Python lists the trainer consumes (``tracemalloc``) and as Arrow (``nbytes``). If that
is below 10% of the peak RSS, this benchmark could not tell streaming from materialising; the JSON says so.
Rows are synthetic (log-normal lengths from the package's own medical text): no files outside the repository.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tracemalloc
from pathlib import Path
from typing import Any

from bench import _harness as H

TARGET = 0.10


def _p10(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[0] if len(values) >= 2 else values[0]


def materialised_cost(prepared: dict[str, dict[str, list[int]]], ids: list[str]) -> dict[str, float]:
    """Bytes to hold these rows as Python lists of ints (what the trainer gets per row) and as Arrow."""
    import pyarrow as pa

    rows = [prepared[i] for i in ids]
    table = pa.table({"id": ids, "input_ids": [r["input_ids"] for r in rows], "labels": [r["labels"] for r in rows]},
                     schema=pa.schema([("id", pa.string()), ("input_ids", pa.list_(pa.int32())),
                                       ("labels", pa.list_(pa.int32()))]))
    tracemalloc.start()
    held = table.to_pylist()  # fresh Python objects, as a worker would build them from the Arrow blocks
    py_bytes, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del held
    return {"python_lists_mib": round(py_bytes / 2**20, 1), "arrow_mib": round(table.nbytes / 2**20, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=160, help="N; the second run has --factor x N rows")
    ap.add_argument("--factor", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16, help="per-device batch size")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--median-words", type=float, default=90.0, help="median assistant answer length (words)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--deepspeed", default="configs/deepspeed/zero3.json", help="deepspeed.config, or 'null' (DDP)")
    ap.add_argument("--interval", type=float, default=0.5, help="sampling period of the worker processes (s)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    H.setup_env()

    import ray

    from finemed_ray import storage
    from finemed_ray.toy.s3_server import EmbeddedS3
    from finemed_ray.toy.sample import write_jsonl
    from finemed_ray.toy.tiny_model import save_tiny_model

    results: dict[str, Any] = {
        "benchmark": "streaming_rss",
        **H.host_info(),
        "data": f"synthetic SFT rows, log-normal answer lengths (median {args.median_words} words)",
        "rows_small": args.rows,
        "rows_large": args.rows * args.factor,
        "per_device_batch": args.batch,
        "max_length": args.max_length,
        "workers": args.workers,
        "deepspeed": None if args.deepspeed == "null" else args.deepspeed,
        "epochs": 1,
        "max_steps": None,
        "target": f"peak worker RSS(10N) / peak worker RSS(N) - 1 <= {TARGET}",
        "rss_definition": (
            "per run: max over the ray::RayTrainWorker processes of this driver of VmHWM (kernel peak RSS, "
            "includes pages of the Ray object store the worker mapped: RssShmem)"
        ),
        "runs": {},
    }
    whole = H.Monitor(interval=5.0).start()
    with EmbeddedS3(buckets=("bench",)):
        save_tiny_model("s3://bench/models/tiny")
        for label, n in (("N", args.rows), ("10N", args.rows * args.factor)):
            rows_uri = write_jsonl(H.synthetic_conversations(n, median_words=args.median_words),
                                   f"s3://bench/data/rss-{n}.jsonl")
            cfg = H.sft_config(
                f"rss-{n}",
                [
                    f"data.max_length={args.max_length}",
                    f"train.per_device_batch_size={args.batch}",
                    "train.gradient_accumulation_steps=1",
                    "train.epochs=1",
                    "train.max_steps=null",
                    "train.report_to=[tensorboard]",  # step wall times delimit the training loop
                    f"deepspeed.config={args.deepspeed}",
                ],
                rows_uri,
                workers=args.workers,
            )
            mon = H.Monitor(interval=args.interval, track_workers=True).start()
            r = H.run_sft(cfg)
            load = mon.stop()
            meta, plan, data = r["meta"], r["summary"]["plan"], r["summary"]["data"]
            workers = sorted(mon.workers.values(), key=lambda w: w["pid"])
            times = r["tb_times"]
            t_first, t_last = times[min(times)], times[max(times)]  # ends of the first and the last step
            per_worker = []
            for w in workers:
                trace = w.get("trace", [])
                loop = [kib / 1024 for t, kib, _ in trace if t_first <= t <= t_last]
                fifths = [loop[len(loop) * i // 5:len(loop) * (i + 1) // 5] for i in range(5)]
                floors = [round(_p10(f), 1) for f in fifths if f]
                step = max(1, len(trace) // 80)
                per_worker.append({
                    "pid": w["pid"],
                    "samples": w["samples"],
                    "env_seen_in_proc": w.get("env", {}),
                    "vm_hwm_mib": round(w.get("vm_hwm_kib", 0) / 1024, 1),
                    "peak_rss_sampled_mib": round(w["peak_rss_sampled_kib"] / 1024, 1),
                    "at_sampled_peak_mib": {k: round((v or 0) / 1024, 1) for k, v in w.get("at_peak", {}).items()},
                    # RSS swings by hundreds of MiB within a step (activations); its floor (10th percentile) is what
                    # stays allocated between steps, where an accumulating corpus would show as a rising floor.
                    "training_loop": {
                        "samples": len(loop),
                        "peak_rss_sampled_mib": round(max(loop), 1) if loop else None,
                        "median_rss_mib": round(statistics.median(loop), 1) if loop else None,
                        "floor_per_fifth_mib": floors,
                        # 2nd fifth -> last fifth: the first steps still grow the allocator's pools (warm-up).
                        "floor_growth_mib": round(floors[-1] - floors[1], 1) if len(floors) == 5 else None,
                    },
                    "rss_trace_mib": [(round(t - mon.t_start, 1), round(kib / 1024, 1))
                                      for t, kib, _ in trace[::step]],
                })
            loops = [w["training_loop"] for w in per_worker if w["training_loop"]["samples"]]
            full_pass = (meta["samples_seen"] == plan["rows_per_worker"] * args.workers
                         and meta["global_step"] == plan["max_steps"]
                         and meta["distinct_samples_seen"] == meta["samples_seen"])
            entry = {
                "rows": n,
                "rows_train": data["rows_train"],
                "tokens_train": data["tokens_train"],
                "steps": meta["global_step"],
                "plan": plan,
                "samples_seen": meta["samples_seen"],
                "samples_seen_per_rank": meta["samples_seen_per_rank"],
                "every_worker_iterated_its_whole_shard": full_pass,
                "worker_processes": len(per_worker),
                "peak_rss_mib": max((w["vm_hwm_mib"] for w in per_worker), default=None),
                "peak_rss_sampled_mib": max((w["peak_rss_sampled_mib"] for w in per_worker), default=None),
                "training_loop_median_rss_mib": max((x["median_rss_mib"] for x in loops), default=None),
                "training_loop_floor_growth_mib": max((x["floor_growth_mib"] for x in loops), default=None),
                "training_loop_window_s": [round(t_first - mon.t_start, 1), round(t_last - mon.t_start, 1)],
                "workers": per_worker,
                "train_seconds": meta["train_seconds"],
                "job_wall_seconds": round(r["wall_seconds"], 1),
                "load": load,
            }
            if label == "10N":
                prepared = H.read_prepared_rows(data["prepared_uri"])
                shard = r["samples_seen"]["per_rank"][0]
                entry["materialising_rank0_shard_would_add"] = materialised_cost(prepared, shard)
                entry["materialising_whole_corpus_would_add"] = materialised_cost(prepared, list(prepared))
                ids = [i for rank in r["samples_seen"]["per_rank"] for i in rank]
                entry["seen_ids_bytes_per_row_estimate"] = round(
                    statistics.fmean(len(i) for i in ids) + 49 + 8, 1)  # str header + chars + list slot
            results["runs"][label] = entry
            print(json.dumps({label: {k: v for k, v in entry.items() if k not in ("workers", "plan", "load")}}),
                  flush=True)
            ray.shutdown()

    small, large = results["runs"]["N"], results["runs"]["10N"]
    growth = large["peak_rss_mib"] / small["peak_rss_mib"] - 1
    results["peak_rss_growth"] = round(growth, 4)
    results["meets_target"] = growth <= TARGET
    if small["training_loop_median_rss_mib"] and large["training_loop_median_rss_mib"]:
        results["training_loop_median_rss_difference_mib"] = round(
            large["training_loop_median_rss_mib"] - small["training_loop_median_rss_mib"], 1)
    threshold = TARGET * small["peak_rss_mib"]
    would = large["materialising_rank0_shard_would_add"]
    per_row = 2**20 * would["python_lists_mib"] / max(1, large["samples_seen_per_rank"][0])
    rows_needed = int(threshold * 2**20 / per_row) if per_row else None
    spread = [w["vm_hwm_mib"] for run in (small, large) for w in run["workers"]]
    results["sensitivity"] = {
        "threshold_mib": round(threshold, 1),
        "rank0_shard_as_python_lists_mib": would["python_lists_mib"],
        "rank0_shard_as_arrow_mib": would["arrow_mib"],
        "python_bytes_per_row": round(per_row),
        "rows_per_worker_for_10pct_rule_to_detect_a_materialised_shard": rows_needed,
        "detects_materialised_python_shard_by_10pct_rule": would["python_lists_mib"] > threshold,
        "worker_vm_hwm_spread_mib": round(max(spread) - min(spread), 1),
        "floor_growth_during_10N_epoch_mib": large["training_loop_floor_growth_mib"],
        "note": (
            "A worker holding its 10N shard (%d rows) as Python lists would add about %.0f MiB (%.1f%% of the "
            "N-run peak), as Arrow %.1f MiB: %s. Peaks of individual workers already differ by %.0f MiB. The RSS "
            "floor between steps moved by %s MiB from the 2nd to the last fifth of the 10N epoch (an accumulating "
            "shard would add ~%.0f MiB over the epoch)." % (
                large["samples_seen_per_rank"][0], would["python_lists_mib"],
                100 * would["python_lists_mib"] / small["peak_rss_mib"], would["arrow_mib"],
                "above the 10%% threshold (%.0f MiB), so the 10%% rule can tell" % threshold
                if would["python_lists_mib"] > threshold else
                "BELOW the 10%% threshold (%.0f MiB): at this size the 10%% rule cannot tell streaming from "
                "materialising; that needs about %s rows per worker" % (threshold, rows_needed),
                max(spread) - min(spread), large["training_loop_floor_growth_mib"], would["python_lists_mib"])
        ),
    }
    results["all_shards_fully_iterated"] = (small["every_worker_iterated_its_whole_shard"]
                                            and large["every_worker_iterated_its_whole_shard"])
    load = whole.stop()
    results["load"] = load
    results["high_load"] = load["high_load"]
    out = Path(args.out or H.RESULTS / f"streaming_rss_{H.device_name()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({"peak_rss_mib": {"N": small["peak_rss_mib"], "10N": large["peak_rss_mib"]},
                      "growth": results["peak_rss_growth"], "meets_target": results["meets_target"],
                      "training_loop_median_rss_mib": {"N": small["training_loop_median_rss_mib"],
                                                       "10N": large["training_loop_median_rss_mib"]},
                      "sensitivity": results["sensitivity"]["note"], "load": load["note"]}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
