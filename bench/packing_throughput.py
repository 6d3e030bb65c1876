"""Training tokens/s with padding-free packing (``train.packing=true``) versus padded batches, on conversations
whose lengths vary the way real medical SFT data does.

    .venv/bin/python -m bench.packing_throughput [--rows 1200] [--batch 16] [--max-length 512] [--skip 3]
        [--source auto|pubmedqa|synthetic] [--pubmedqa-dir ../shared/data/benchmarks/pubmedqa]

Writes ``bench/results/packing_throughput_<device>.json``.

Data. With ``--source auto`` (default) the conversations are built from PubMedQA records if the directory exists
(real abstracts, questions, long answers), otherwise from a synthetic log-normal length distribution made of the
package's own medical sentences; the JSON says which. Three kinds of conversation are mixed, shuffled:
``short`` (question -> "Yes."), ``explain`` (question -> answer + the long answer) and ``abstract`` ("Summarize the
study behind ..." -> the abstract, often cut at ``--max-length``), so token counts range from tens to the limit.

Measurement. Both settings run the real ``SFTJob`` (Ray Data prepare -> Ray Train, 2 workers -> TRL SFTTrainer
under DeepSpeed ZeRO-3 by default), on the same prepared rows in the same order (checked). Tokens per step are
reconstructed exactly: each rank's trained ids in order (``samples_seen.json``) split into its micro-batches,
collated by the same collator the trainer used (TRL's padded ``DataCollatorForLanguageModeling`` / our
``packing_collator``), counted with ``finemed_ray.train.packing.padding_stats``. Step end times come from the
trainer's TensorBoard log (``logging_steps=1``). Steady-state tokens/s = non-pad tokens of the steps after the first
``--skip`` / wall time of those steps. ``tokens_per_second_end_to_end`` divides all non-pad tokens by the
trainer's ``train_seconds`` (includes ``trainer.train()`` start-up and the final checkpoint).

On a shared machine wall time depends on what else runs, so the JSON also gives tokens per worker-CPU-second over
the same steps (the two Ray Train workers' user+system CPU, all threads, sampled from /proc every second) and the
ratio of those, which is much less sensitive to other processes. ``upper_bound_speedup_from_slots`` = padded token
slots / packed token slots: the gain if a step's cost were proportional to the positions computed.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path
from typing import Any

from bench import _harness as H

TARGET = 1.5
DEFAULT_PUBMEDQA = H.ROOT.parent / "shared" / "data" / "benchmarks" / "pubmedqa"
SYSTEM_PROMPT = "You are a helpful professional doctor."


def pubmedqa_conversations(directory: Path, n: int, seed: int = 0) -> list[dict[str, Any]] | None:
    """``n`` conversations from PubMedQA records (``question`` = abstract + "\\n" + question), or None if absent."""
    files = sorted(directory.glob("*.jsonl")) if directory.is_dir() else []
    records = []
    for f in files:
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                records.append(json.loads(line))
    if not records:
        return None
    rng = random.Random(seed)
    rng.shuffle(records)
    kinds = ("short", "explain", "abstract")
    rows = []
    for i in range(n):
        rec = records[i % len(records)]
        text = rec["question"].strip()
        context, _, question = text.rpartition("\n")
        context = context.strip() or text
        answer = str(rec.get("answer", "")).strip().capitalize() or "Maybe"
        kind = kinds[i % len(kinds)]
        if kind == "short":
            user, assistant = question, f"{answer}."
        elif kind == "explain":
            user, assistant = question, f"{answer}. {rec.get('answer_rationale', '').strip()}"
        else:
            user, assistant = f"Summarize the study behind this question: {question}", context
        rows.append({
            "id": f"pubmedqa-{rec.get('realidx', i)}-{kind}-{i}",
            "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user},
                         {"role": "assistant", "content": assistant}],
            "department": "Research", "subdepartment": kind, "source": "pubmedqa",
        })
    rng.shuffle(rows)
    return rows


def step_token_stats(seen_per_rank, prepared, batch: int, rows_per_worker: int, collator, pad_id) -> list[dict]:
    """Per global step: padding_stats summed over ranks, with the collator the trainer used."""
    from finemed_ray.train.packing import padding_stats

    out = []
    for step in H.rank_batches(seen_per_rank, batch, rows_per_worker):
        total = {"slots": 0, "real_tokens": 0, "pad_tokens": 0, "label_tokens": 0, "sequences": 0}
        for ids in step:
            if not ids:
                continue
            stats = padding_stats(collator([prepared[i] for i in ids]), pad_token_id=pad_id)
            for k in total:
                total[k] += stats[k]
        out.append(total)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=16, help="per-device batch size (conversations per micro-batch)")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the steady-state figures")
    ap.add_argument("--deepspeed", default="configs/deepspeed/zero3.json", help="deepspeed.config, or 'null' (DDP)")
    ap.add_argument("--source", choices=("auto", "pubmedqa", "synthetic"), default="auto")
    ap.add_argument("--pubmedqa-dir", type=Path, default=DEFAULT_PUBMEDQA)
    ap.add_argument("--pack-length", default="auto",
                    help="train.pack_length: auto | single | N (auto = bins of --max-length on sdpa)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    pack_setting = args.pack_length if args.pack_length in ("auto", "single") else int(args.pack_length)
    H.setup_env()

    import ray
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from finemed_ray import storage
    from finemed_ray.toy.s3_server import EmbeddedS3
    from finemed_ray.toy.sample import write_jsonl
    from finemed_ray.models.loading import load_tokenizer, resolve_model_path
    from finemed_ray.toy.tiny_model import save_tiny_model
    from finemed_ray.train.packing import packing_collator, resolve_pack_length

    rows, source_note = None, None
    if args.source in ("auto", "pubmedqa"):
        rows = pubmedqa_conversations(args.pubmedqa_dir, args.rows)
        if rows is None:
            if args.source == "pubmedqa":
                ap.error(f"no PubMedQA *.jsonl under {args.pubmedqa_dir}")
            source_note = f"FALLBACK: {args.pubmedqa_dir} not found; synthetic log-normal lengths used instead"
        else:
            source_note = (f"PubMedQA records from {args.pubmedqa_dir} (abstract/question/long answer), "
                           "three conversation kinds mixed: short, explain, abstract")
    if rows is None:
        rows = H.synthetic_conversations(args.rows, median_words=120, sigma=0.9)
        source_note = source_note or "synthetic: log-normal answer lengths (median 120 words, sigma 0.9)"

    results: dict[str, Any] = {
        "benchmark": "packing_throughput",
        "pack_length": pack_setting,
        **H.host_info(),
        "data_source": source_note,
        "rows": args.rows,
        "per_device_batch": args.batch,
        "max_length": args.max_length,
        "workers": args.workers,
        "deepspeed": None if args.deepspeed == "null" else args.deepspeed,
        "skip_warmup_steps": args.skip,
        "target": f"tokens/s with packing / without >= {TARGET}",
        "tokens_definition": "non-pad tokens the model computed on (padding_stats real_tokens), summed over ranks",
        "settings": {},
    }
    monitor = H.Monitor(interval=1.0, track_workers=True).start()
    with EmbeddedS3(buckets=("bench",)):
        save_tiny_model("s3://bench/models/tiny")
        rows_uri = write_jsonl(rows, "s3://bench/data/sft.jsonl")
        tok = load_tokenizer(resolve_model_path("s3://bench/models/tiny"))
        collators = {
            False: DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id),  # what SFTTrainer builds
            # the collator the trainer builds: the tiny Llama loads with sdpa attention
            True: packing_collator(tok, pack_length=resolve_pack_length(pack_setting, args.max_length, "sdpa")),
        }
        reference_seen = None
        for packing in (False, True):
            name = "packing" if packing else "padded"
            cfg = H.sft_config(
                f"packing-{name}",
                [
                    f"data.max_length={args.max_length}",
                    f"train.per_device_batch_size={args.batch}",
                    "train.gradient_accumulation_steps=1",
                    "train.epochs=1",
                    f"train.packing={str(packing).lower()}",
                    f"train.pack_length={pack_setting}",
                    "train.report_to=[tensorboard]",
                    f"deepspeed.config={args.deepspeed}",
                ],
                rows_uri,
                workers=args.workers,
            )
            r = H.run_sft(cfg)
            data = r["summary"]["data"]
            plan = r["summary"]["plan"]
            seen = r["samples_seen"]["per_rank"]
            if reference_seen is None:
                reference_seen = seen
                prepared = H.read_prepared_rows(data["prepared_uri"])
                lengths = sorted(len(v["input_ids"]) for v in prepared.values())
                q = statistics.quantiles(lengths, n=20)
                results["length_distribution_tokens"] = {
                    "rows_train": len(lengths), "min": lengths[0], "p5": q[0], "p25": q[4], "median": q[9],
                    "p75": q[14], "p95": q[18], "max": lengths[-1], "mean": round(statistics.fmean(lengths), 1),
                    "rows_truncated_at_max_length": data["rows_truncated"],
                    "rows_quarantined": data["rows_quarantined"],
                }
            same_order = seen == reference_seen
            per_step = step_token_stats(seen, prepared, args.batch, plan["rows_per_worker"], collators[packing],
                                        tok.pad_token_id)
            times = r["tb_times"]
            steps = sorted(times)
            if len(steps) != len(per_step):
                raise SystemExit(f"{name}: {len(steps)} logged steps but {len(per_step)} reconstructed batches")
            k = min(args.skip, len(steps) - 2)
            span = times[steps[-1]] - times[steps[k]]
            real_ss = sum(s["real_tokens"] for s in per_step[k + 1:])
            slots_ss = sum(s["slots"] for s in per_step[k + 1:])
            totals = {key: sum(s[key] for s in per_step) for key in per_step[0]}
            durations = H.step_durations(times)
            meta = r["meta"]
            entry = {
                "steps": meta["global_step"],
                "same_rows_same_order_as_padded": same_order,
                "tokens_per_second": round(real_ss / span, 1),
                "slots_per_second": round(slots_ss / span, 1),
                "label_tokens_per_second": round(sum(s["label_tokens"] for s in per_step[k + 1:]) / span, 1),
                "steady_state": {"steps": len(per_step) - k - 1, "seconds": round(span, 3), "real_tokens": real_ss,
                                 "slots": slots_ss},
                "tokens_per_second_end_to_end": round(totals["real_tokens"] / meta["train_seconds"], 1),
                "train_seconds": meta["train_seconds"],
                "pad_fraction": round(totals["pad_tokens"] / totals["slots"], 4),
                "token_totals": totals,
                "step_time": H.summarize_durations(durations, k),
                "first_loss": r["summary"]["first_loss"],
                "last_loss": r["summary"]["last_loss"],
                "job_wall_seconds": round(r["wall_seconds"], 1),
                "load": {k2: v for k2, v in monitor.window(times[steps[k]], times[steps[-1]]).items()
                         if k2 != "window"},
            }
            cpu = H.worker_cpu_per_step(monitor, [times[x] for x in steps], times[steps[k]], times[steps[-1]])
            if cpu:
                tokens_per_step = real_ss / (len(per_step) - k - 1)
                entry["worker_cpu_ms_per_step"] = cpu["cpu_ms_per_step"]
                entry["tokens_per_worker_cpu_second"] = round(tokens_per_step / (cpu["cpu_ms_per_step"] / 1000), 1)
                # Each worker on its own core, nothing else running: wall ~ CPU per worker (comm waits ignored).
                entry["tokens_per_second_uncontended_estimate"] = round(
                    entry["tokens_per_worker_cpu_second"] * args.workers, 1)
            trained = sum(len(prepared[i]["input_ids"]) for ids in seen for i in ids)
            if trained != totals["real_tokens"]:
                entry["warning"] = f"collated batches hold {totals['real_tokens']} real tokens, the rows {trained}"
            results["settings"][name] = entry
            print(json.dumps({name: {k2: v for k2, v in entry.items() if k2 != "token_totals"}}), flush=True)
            ray.shutdown()

    S = results["settings"]
    results["speedup_tokens_per_second"] = round(
        S["packing"]["tokens_per_second"] / S["padded"]["tokens_per_second"], 3)
    results["speedup_end_to_end"] = round(
        S["packing"]["tokens_per_second_end_to_end"] / S["padded"]["tokens_per_second_end_to_end"], 3)
    results["meets_target"] = results["speedup_tokens_per_second"] >= TARGET
    if S["padded"].get("tokens_per_worker_cpu_second") and S["packing"].get("tokens_per_worker_cpu_second"):
        results["speedup_tokens_per_cpu_second"] = round(
            S["packing"]["tokens_per_worker_cpu_second"] / S["padded"]["tokens_per_worker_cpu_second"], 3)
        results["meets_target_by_cpu_time"] = results["speedup_tokens_per_cpu_second"] >= TARGET
    # What packing could gain at most if step cost were proportional to the token slots computed.
    results["upper_bound_speedup_from_slots"] = round(
        S["padded"]["token_totals"]["slots"] / S["packing"]["token_totals"]["slots"], 3)
    load = monitor.stop()
    results["load"] = load
    results["high_load"] = load["high_load"]
    out = Path(args.out or H.RESULTS / f"packing_throughput_{H.device_name()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    keys = ("speedup_tokens_per_second", "speedup_end_to_end", "speedup_tokens_per_cpu_second",
            "upper_bound_speedup_from_slots", "meets_target")
    print(json.dumps({k: results.get(k) for k in keys}
                     | {"pad_fraction_padded": S["padded"]["pad_fraction"], "load": load["note"]}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
