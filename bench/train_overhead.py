"""Optimizer-step time of our training stack versus a bare PyTorch loop, on the same model, data and batch.

    .venv/bin/python -m bench.train_overhead [--rows 512] [--batch 4] [--max-length 256] [--skip 3]
        [--variants stack_zero3,stack_ddp,bare_ddp,bare_ddp_trl_loss,bare_zero3] [--stack-repeats 1]
        [--bare-rounds 1] [--source facts|pubmedqa] [--hidden 128] [--layers 2] [--intermediate N]

Writes ``bench/results/train_overhead_<device>.json``. Variants (2 workers / 2 processes each, gloo on CPU):

* ``stack_zero3``: our real stack, ``SFTJob`` as shipped: Ray Data shards -> Ray Train (2 workers) -> TRL
  ``SFTTrainer`` under DeepSpeed ZeRO-3 (configs/deepspeed/zero3.json).
* ``stack_ddp``: the same with ``deepspeed.config=null`` (the HF Trainer's plain DDP).
* ``bare_ddp``: the reference. Two ``torch.multiprocessing`` processes, ``torch.distributed`` over gloo, the
  model wrapped in ``DistributedDataParallel``, the model's own loss, ``AdamW`` (fused, like the HF default),
  gradient clipping and the cosine schedule. Each rank trains on exactly the rows, in exactly the batches, that
  the stack's rank trained on (read back from the stack run's ``samples_seen.json`` and prepared data), collated
  by the same TRL collator, same thread count as a Ray worker.
* ``bare_ddp_trl_loss``: ``bare_ddp`` plus what TRL's ``compute_loss`` adds to every step: its fused, chunked LM
  head (log-probs + entropy + top-1), the cross-rank token count the HF Trainer all-reduces for the loss, and the
  four ``gather_for_metrics`` + ``.item()`` of its logged metrics. Isolates TRL's share of the overhead.
* ``bare_zero3``: ``bare_ddp`` with ``deepspeed.initialize`` on the same ZeRO-3 config instead of DDP (no Ray,
  no HF Trainer, no TRL). Isolates ZeRO-3's own cost (parameter all-gathers, gradient reduce-scatter).

Step time, measured the same way everywhere: wall time between the ends of consecutive optimizer steps on rank 0
(end = after the step and the loss ``.item()``), median over the steps after the first ``--skip``. For the stack
the end-of-step marks are the wall times of the TensorBoard events the HF Trainer writes in ``on_log`` with
``logging_steps=1`` (rank 0's log, uploaded to ``<storage>/<run>/tensorboard``): they bracket the whole step as
the trainer runs it, data fetch from the Ray shard included. ``train_seconds / steps`` is also reported but is
not a step time: it includes ``trainer.train()`` start-up (DeepSpeed engine init, first Ray Data block fetch) and
the final checkpoint.

Order: each stack run is followed by one round of every bare variant (``--bare-rounds``), so stack and bare runs
interleave and see similar load from other processes. On a shared machine wall time is inflated by whatever else
runs, so the JSON also gives CPU time per step (user+system of the two training processes, all threads): stack
workers sampled from /proc every second by the driver, bare ranks by ``time.process_time()``. CPU time hides
waiting (gloo latency, stragglers) but is far less sensitive to other processes; ``ratios_cpu_time`` is its
version of the ratios. Foreign CPU share (other processes' CPU / machine capacity) is recorded per run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import _harness as H

ZERO3_CONFIG = "configs/deepspeed/zero3.json"
STACK_VARIANTS = {
    "stack_zero3": [f"deepspeed.config={ZERO3_CONFIG}"],
    "stack_ddp": ["deepspeed.config=null"],
}
BARE_VARIANTS = ("bare_ddp", "bare_ddp_trl_loss", "bare_zero3")
TARGET_RATIO = 1.15


# ---------------------------------------------------------------------------------------------- bare loop
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _zero3_config(path: Path, hidden: int, micro_batch: int, grad_clip: float) -> dict[str, Any]:
    """configs/deepspeed/zero3.json with its "auto" values filled exactly as the HF DeepSpeed integration does."""
    cfg = json.loads(path.read_text())
    z = cfg["zero_optimization"]
    for key, value in (("reduce_bucket_size", hidden * hidden),
                       ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
                       ("stage3_param_persistence_threshold", 10 * hidden)):
        if z.get(key) == "auto":
            z[key] = value
    cfg["bf16"] = {"enabled": False}
    cfg["fp16"] = {"enabled": False}
    cfg["gradient_accumulation_steps"] = 1
    cfg["gradient_clipping"] = grad_clip
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["steps_per_print"] = 10**9
    from finemed_ray.train.sft import deepspeed_config_for_device

    return deepspeed_config_for_device(cfg, use_gpu=False)  # as SFTJob runs it on CPU workers


def _bare_worker(rank: int, world: int, port: int, variants: list[str], steps_rows: list[list[list[dict]]],
                 model_dir: str, hp: dict[str, Any], out_dir: str) -> None:
    """One rank of the bare loop; runs ``variants`` one after the other in the same two processes (each with a
    fresh model and optimizer), so process start-up and imports are paid once."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(hp["threads"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = []
    for variant in variants:
        results.append(_bare_run(rank, world, variant, steps_rows, model_dir, hp))
    if rank == 0:
        Path(out_dir, "bare.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _bare_run(rank: int, world: int, variant: str, steps_rows, model_dir: str, hp: dict[str, Any]) -> dict:
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, get_scheduler
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    torch.manual_seed(hp["seed"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    trl_loss = variant == "bare_ddp_trl_loss"
    if trl_loss:
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    collate = DataCollatorForLanguageModeling(pad_token_id=hp["pad_id"])
    total = len(steps_rows)
    opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"], fused=True)
    sched = get_scheduler(hp["lr_scheduler"], opt, num_warmup_steps=math.ceil(hp["warmup_ratio"] * total),
                          num_training_steps=total)
    engine = None
    if variant == "bare_zero3":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")  # adopts the process group, like sft_train_loop
        engine, opt, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                                    config=hp["ds_config"])
        fwd = engine
    else:
        fwd = torch.nn.parallel.DistributedDataParallel(model)

    phases: dict[str, list[float]] = {"data": [], "forward": [], "backward": [], "optimizer": []}
    marks, losses, cpu_marks = [], [], []
    dist.barrier()
    for step in range(total):
        t0 = time.perf_counter()
        batch = collate(steps_rows[step][rank])
        t1 = time.perf_counter()
        if trl_loss:
            count = (batch["labels"][..., 1:] != -100).sum()
            dist.all_reduce(count)  # the HF Trainer's num_items_in_batch across devices
            out = fwd(**batch, use_cache=False, fused_lm_head=True)
            loss = (-out.log_probs).sum() / count.clamp(min=1) * world
            # TRL's four gathered metrics, each synchronised by .item()
            for value in (out.label_mask.sum(), out.entropy.detach().sum(), out.is_top1.sum(),
                          batch["attention_mask"].sum()):
                gathered = [torch.zeros_like(value) for _ in range(world)]
                dist.all_gather(gathered, value)
                torch.stack(gathered).sum().item()
        else:
            loss = fwd(**batch, use_cache=False).loss
        t2 = time.perf_counter()
        if engine is not None:
            engine.backward(loss)
        else:
            loss.backward()
        t3 = time.perf_counter()
        if engine is not None:
            engine.step()  # clipping, optimizer, scheduler, zero_grad inside
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), hp["max_grad_norm"])
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        t4 = time.perf_counter()
        marks.append(time.time())
        cpu_marks.append(time.process_time())  # this process, all threads
        for k, a, b in (("data", t0, t1), ("forward", t1, t2), ("backward", t2, t3), ("optimizer", t3, t4)):
            phases[k].append(b - a)
    dist.barrier()
    if engine is not None:
        engine.destroy()
    cpu_all: list[Any] = [None] * world
    dist.all_gather_object(cpu_all, cpu_marks)
    return {"variant": variant, "marks": marks, "phases": phases, "losses": losses, "cpu_marks_per_rank": cpu_all}


def run_bare(variants: list[str], steps_rows, model_dir: str, hp: dict[str, Any], world: int) -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="bench-bare-") as out:
        mp.spawn(_bare_worker, args=(world, _free_port(), variants, steps_rows, model_dir, hp, out), nprocs=world,
                 join=True)
        return json.loads(Path(out, "bare.json").read_text())


# ----------------------------------------------------------------------------------------------- data path
def measure_data_path(prepared_uri: str, workers: int, batch: int, pad_id: int, max_batches: int) -> dict[str, Any]:
    """Per-batch cost of the stack's input path, measured in the driver: a Ray Data equal split -> ShardSource ->
    ``datasets.IterableDataset`` -> DataLoader -> TRL collator (what each worker runs between optimizer steps)."""
    import datasets
    from torch.utils.data import DataLoader
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from finemed_ray.data.sft_prepare import read_prepared
    from finemed_ray.train.ray_shard import ShardSource, shard_to_iterable_dataset

    ds = read_prepared(prepared_uri, "train")
    shard = ds.split(workers, equal=True)[0].iterator()
    columns = ("input_ids", "labels")
    source = ShardSource(shard, probe_example={c: [0] for c in columns}, columns=columns)
    source.arm()
    features = datasets.Features({c: datasets.List(datasets.Value("int32")) for c in columns})
    loader = DataLoader(shard_to_iterable_dataset(source, features), batch_size=batch,
                        collate_fn=DataCollatorForLanguageModeling(pad_token_id=pad_id), num_workers=0)
    it = iter(loader)
    t0 = time.perf_counter()
    next(it)  # first batch: starts the Ray Data execution (a one-off, like the first step)
    first = time.perf_counter() - t0
    times = []
    for _ in range(max_batches):
        t = time.perf_counter()
        try:
            next(it)
        except StopIteration:
            break
        times.append(time.perf_counter() - t)
    return {
        "first_batch_ms": round(1000 * first, 1),
        "batches_timed": len(times),
        "median_ms_per_batch": round(1000 * statistics.median(times), 2) if times else None,
        "mean_ms_per_batch": round(1000 * statistics.fmean(times), 2) if times else None,
    }


# ----------------------------------------------------------------------------------------------------- main
def _aggregate(runs: list[dict[str, Any]], skip: int) -> dict[str, Any]:
    """Pool the timed step durations of all repeats of one variant; keep each repeat's median too."""
    pooled = [d for r in runs for d in r["durations"][skip:]]
    out = H.summarize_durations(pooled, 0)
    out["skipped_first_per_repeat"] = skip
    out["repeats"] = len(runs)
    out["median_ms_per_repeat"] = [H.summarize_durations(r["durations"], skip)["median_ms"] for r in runs]
    out["foreign_cpu_share_per_repeat"] = [r["load"].get("foreign_cpu_share") for r in runs]
    cpu = [r["cpu_ms_per_step"] for r in runs if r.get("cpu_ms_per_step") is not None]
    out["cpu_ms_per_step"] = round(statistics.median(cpu), 2) if cpu else None
    out["cpu_ms_per_step_per_repeat"] = cpu
    own = [r["own_cpu_ms_per_step_excl_driver"] for r in runs if r.get("own_cpu_ms_per_step_excl_driver")]
    if own:
        out["own_cpu_ms_per_step_excl_driver"] = round(statistics.median(own), 2)
    return out


def _own_cpu_per_step(monitor: H.Monitor, marks: list[float], t0: float, t1: float) -> float | None:
    """CPU ms per step of all our processes except the driver (Ray Train workers, raylet, GCS, Ray Data
    actors...), from the monitor samples strictly inside [t0, t1]."""
    inside = [s for s in monitor.timeline if t0 <= s[0] <= t1]
    if len(inside) < 2:
        return None
    a, b = inside[0], inside[-1]
    steps = H.steps_done(marks, b[0]) - H.steps_done(marks, a[0])
    return round(1000 * (b[4] - a[4]) / steps, 2) if steps > 0 else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=512, help="training conversations (sample_sft_rows)")
    ap.add_argument("--batch", type=int, default=4, help="per-device batch size")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--source", choices=("facts", "pubmedqa"), default="facts",
                    help="facts: short single-fact conversations (~50 tokens); pubmedqa: conversations from PubMedQA "
                         "abstracts (hundreds of tokens, as bench.packing_throughput), a realistic step size")
    ap.add_argument("--hidden", type=int, default=128, help="tiny model hidden size (default: the test model's)")
    ap.add_argument("--layers", type=int, default=2, help="tiny model decoder layers")
    ap.add_argument("--intermediate", type=int, default=None, help="MLP size (default 2 x hidden)")
    ap.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the statistics")
    ap.add_argument("--variants", default="stack_zero3,stack_ddp,bare_ddp,bare_ddp_trl_loss,bare_zero3")
    ap.add_argument("--stack-repeats", type=int, default=1, help="runs of each stack variant (about 100 s each)")
    ap.add_argument("--bare-rounds", type=int, default=1,
                    help="rounds of all bare variants after each stack run (interleaved, so both see similar load)")
    ap.add_argument("--zero3-config", default=ZERO3_CONFIG,
                    help="DeepSpeed config of stack_zero3 and bare_zero3 (path relative to the repository)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    H.setup_env()

    import ray

    from finemed_ray import storage
    from finemed_ray.data.sample import sample_sft_rows, write_jsonl
    from finemed_ray.models.loading import load_tokenizer, resolve_model_path
    from finemed_ray.models.tiny import save_tiny_model

    variants = args.variants.split(",")
    unknown = set(variants) - set(STACK_VARIANTS) - set(BARE_VARIANTS)
    if unknown:
        ap.error(f"unknown variants: {sorted(unknown)}")
    stack_names = [v for v in variants if v in STACK_VARIANTS]
    bare_names = [v for v in variants if v in BARE_VARIANTS]
    if bare_names and not stack_names:
        ap.error("bare variants replay the batches of a stack run: include at least one stack_* variant")
    results: dict[str, Any] = {
        "benchmark": "train_overhead",
        **H.host_info(),
        "rows": args.rows,
        "data": None,
        "model": {"hidden": args.hidden, "layers": args.layers, "intermediate": args.intermediate or 2 * args.hidden},
        "per_device_batch": args.batch,
        "max_length": args.max_length,
        "workers": args.workers,
        "skip_warmup_steps": args.skip,
        "target": f"stack step time / bare PyTorch step time <= {TARGET_RATIO}",
        "step_time_definition": (
            "rank 0 wall time between the ends of consecutive optimizer steps, median over the steps after the "
            "first `skip_warmup_steps` of each run (repeats pooled); stack: wall times of the TensorBoard events "
            "the HF Trainer writes in on_log (logging_steps=1), bare: time.time() after the optimizer step and "
            "loss.item()"
        ),
        "cpu_per_step_definition": (
            "CPU seconds (user+system, all threads) of the two training processes summed, per optimizer step, "
            "over the timed steps; stack: sampled every second from /proc by the driver (steps interpolated "
            "between TensorBoard step marks), bare: time.process_time() in each rank. Much less sensitive to "
            "other processes on the machine than wall time. `own_cpu_ms_per_step_excl_driver` (stack) adds every "
            "other process of the local Ray cluster (raylet, GCS, Ray Data split coordinator...)"
        ),
        "order": [],
        "variants": {},
    }
    monitor = H.Monitor(interval=1.0, track_workers=True).start()
    runs: dict[str, list[dict[str, Any]]] = {}
    stack_info: dict[str, Any] = {}
    with storage.EmbeddedS3(buckets=("bench",)):
        heads = max(2, args.hidden // 64)
        save_tiny_model("s3://bench/models/tiny", hidden_size=args.hidden, num_layers=args.layers, num_heads=heads,
                        num_kv_heads=heads, intermediate_size=args.intermediate or 2 * args.hidden)
        rows = None
        if args.source == "pubmedqa":
            from bench.packing_throughput import DEFAULT_PUBMEDQA, pubmedqa_conversations

            rows = pubmedqa_conversations(DEFAULT_PUBMEDQA, args.rows)
            if rows is None:
                ap.error(f"--source pubmedqa: no PubMedQA *.jsonl under {DEFAULT_PUBMEDQA}")
            results["data"] = f"PubMedQA conversations from {DEFAULT_PUBMEDQA} (bench.packing_throughput)"
        else:
            rows = sample_sft_rows(n=args.rows, paraphrases="train")
            results["data"] = "finemed_ray.data.sample.sample_sft_rows (short single-fact conversations)"
        rows_uri = write_jsonl(rows, "s3://bench/data/sft.jsonl")
        model_dir = resolve_model_path("s3://bench/models/tiny")
        tok = load_tokenizer(model_dir)
        reference = None  # the first stack run: its batches are replayed by the bare variants
        steps_rows, hp = None, None
        for rep in range(args.stack_repeats):
            for name in stack_names:
                cfg = H.sft_config(
                    f"overhead-{name}-{rep}",
                    [
                        f"data.max_length={args.max_length}",
                        f"train.per_device_batch_size={args.batch}",
                        "train.gradient_accumulation_steps=1",
                        "train.epochs=1",
                        "train.report_to=[tensorboard]",
                        *(STACK_VARIANTS[name] if name != "stack_zero3"
                          else [f"deepspeed.config={args.zero3_config}"]),
                    ],
                    rows_uri,
                    workers=args.workers,
                )
                r = H.run_sft(cfg)
                results["order"].append(name)
                times = r["tb_times"]
                marks = [times[s] for s in sorted(times)]
                durations = H.step_durations(times)
                meta = r["meta"]
                t0, t1 = marks[min(args.skip, len(marks) - 2)], marks[-1]
                cpu = H.worker_cpu_per_step(monitor, marks, t0, t1)
                run = {
                    "durations": durations,
                    "cpu_ms_per_step": cpu["cpu_ms_per_step"] if cpu else None,
                    "cpu_window": cpu,
                    "own_cpu_ms_per_step_excl_driver": _own_cpu_per_step(monitor, marks, t0, t1),
                    "load": {k: v for k, v in monitor.window(t0, t1).items() if k != "window"},
                    "train_seconds": meta["train_seconds"],
                    "steps": meta["global_step"],
                    "job_wall_seconds": round(r["wall_seconds"], 1),
                    "prepare_seconds": r["summary"]["data"]["seconds"],
                    "first_loss": r["summary"]["first_loss"],
                    "last_loss": r["summary"]["last_loss"],
                }
                runs.setdefault(name, []).append(run)
                stack_info.setdefault(name, {
                    "zero_stage": meta.get("zero_stage"),
                    "optimizer_rank0": meta["sharding_per_rank"][0]["optimizer"],
                    "local_param_fraction_rank0": round(meta["sharding_per_rank"][0]["local_numel"]
                                                        / meta["sharding_per_rank"][0]["total_numel"], 3),
                    "tokens_train": r["summary"]["data"]["tokens_train"],
                    "plan": r["summary"]["plan"],
                })
                if reference is None:
                    reference = r
                    stack_info[name]["data_path_driver"] = measure_data_path(
                        r["summary"]["data"]["prepared_uri"], args.workers, args.batch, tok.pad_token_id, 100
                    )
                elif r["samples_seen"]["per_rank"] != reference["samples_seen"]["per_rank"]:
                    run["warning"] = "this run's ranks saw different rows/order than the reference run"
                print(json.dumps({name: {k: v for k, v in run.items() if k != "durations"},
                                  "median_ms": H.summarize_durations(durations, args.skip)["median_ms"]}),
                      flush=True)
                ray.shutdown()
                if not bare_names:
                    continue
                if steps_rows is None:
                    plan = reference["summary"]["plan"]
                    prepared = H.read_prepared_rows(reference["summary"]["data"]["prepared_uri"])
                    steps_ids = H.rank_batches(reference["samples_seen"]["per_rank"], args.batch,
                                               plan["rows_per_worker"])
                    steps_rows = [[[prepared[i] for i in ids] for ids in step] for step in steps_ids]
                    t = reference["meta"]["config"]["train"]
                    from transformers import AutoConfig

                    hidden = AutoConfig.from_pretrained(model_dir).hidden_size
                    # Ray sets OMP_NUM_THREADS = floor(the worker's CPUs) inside each worker unless set: match it.
                    threads = max(1, int(reference["meta"]["config"]["scaling"]["cpus_per_worker"]))
                    results["threads_per_process"] = threads
                    hp = {
                        "threads": threads,
                        "seed": 42,
                        "pad_id": tok.pad_token_id,
                        "lr": t["learning_rate"],
                        "weight_decay": t["weight_decay"],
                        "lr_scheduler": t["lr_scheduler"],
                        "warmup_ratio": t["warmup_ratio"],
                        "max_grad_norm": t["max_grad_norm"],
                        "ds_config": _zero3_config(H.ROOT / args.zero3_config, hidden, args.batch,
                                                   t["max_grad_norm"]),
                    }
                order = bare_names * args.bare_rounds
                for res in run_bare(order, steps_rows, model_dir, hp, args.workers):
                    results["order"].append(res["variant"])
                    durations = H.step_durations(res["marks"])
                    k = min(args.skip, len(res["marks"]) - 2)
                    n = len(res["marks"]) - 1 - k
                    cpu_ms = sum(c[-1] - c[k] for c in res["cpu_marks_per_rank"]) / n * 1000
                    run = {
                        "durations": durations,
                        "cpu_ms_per_step": round(cpu_ms, 2),
                        "load": {k2: v for k2, v in monitor.window(res["marks"][k], res["marks"][-1]).items()
                                 if k2 != "window"},
                        "steps": len(res["marks"]),
                        "first_loss": res["losses"][0],
                        "last_loss": res["losses"][-1],
                        "phase_mean_ms_rank0": {p: round(1000 * statistics.fmean(v[k:] or v), 2)
                                                for p, v in res["phases"].items()},
                    }
                    runs.setdefault(res["variant"], []).append(run)
                    print(json.dumps({res["variant"]: {k2: v for k2, v in run.items() if k2 != "durations"},
                                      "median_ms": H.summarize_durations(durations, k)["median_ms"]}), flush=True)

    for name in variants:
        entry = _aggregate(runs[name], args.skip)
        entry.update(stack_info.get(name, {}))
        entry["runs"] = [{**{k: v for k, v in r.items() if k != "durations"},
                          "step_durations_ms": [round(1000 * d, 1) for d in r["durations"]]} for r in runs[name]]
        results["variants"][name] = entry
    V = results["variants"]

    def ratios(key: str) -> dict[str, float | None]:
        def ratio(a: str, b: str) -> float | None:
            if a in V and b in V and V[a].get(key) and V[b].get(key):
                return round(V[a][key] / V[b][key], 3)
            return None

        return {
            "stack_zero3_over_bare_ddp": ratio("stack_zero3", "bare_ddp"),
            "stack_ddp_over_bare_ddp": ratio("stack_ddp", "bare_ddp"),
            "stack_zero3_over_stack_ddp": ratio("stack_zero3", "stack_ddp"),
            "bare_zero3_over_bare_ddp": ratio("bare_zero3", "bare_ddp"),
            "stack_zero3_over_bare_zero3": ratio("stack_zero3", "bare_zero3"),
            "bare_ddp_trl_loss_over_bare_ddp": ratio("bare_ddp_trl_loss", "bare_ddp"),
            "stack_ddp_over_bare_ddp_trl_loss": ratio("stack_ddp", "bare_ddp_trl_loss"),
        }

    def breakdown(key: str) -> dict[str, Any] | None:
        """Where the time goes, per step: differences between variants (approximate; noisy under load)."""
        if not all(V.get(v, {}).get(key) for v in ("stack_zero3", "stack_ddp", "bare_ddp")):
            return None
        b = V["bare_ddp"][key]
        br: dict[str, Any] = {"bare_ddp_step": b}
        base = b
        if V.get("bare_ddp_trl_loss", {}).get(key):
            br["trl_loss_and_metric_gathers"] = round(V["bare_ddp_trl_loss"][key] - b, 2)
            base = V["bare_ddp_trl_loss"][key]
        br["hf_trainer_ray_train_data_path_callbacks_logging"] = round(V["stack_ddp"][key] - base, 2)
        br["stack_ddp_step"] = V["stack_ddp"][key]
        if V.get("bare_zero3", {}).get(key):
            br["zero3_minus_ddp_bare"] = round(V["bare_zero3"][key] - b, 2)
        br["zero3_minus_ddp_stack"] = round(V["stack_zero3"][key] - V["stack_ddp"][key], 2)
        br["stack_zero3_step"] = V["stack_zero3"][key]
        return br

    results["ratios"] = ratios("median_ms")
    results["ratios_cpu_time"] = ratios("cpu_ms_per_step")
    headline = results["ratios"]["stack_zero3_over_bare_ddp"]
    results["meets_target"] = None if headline is None else headline <= TARGET_RATIO
    results["meets_target_by_cpu_time"] = (None if results["ratios_cpu_time"]["stack_zero3_over_bare_ddp"] is None
                                           else results["ratios_cpu_time"]["stack_zero3_over_bare_ddp"] <= TARGET_RATIO)
    results["breakdown_wall_ms_per_step"] = breakdown("median_ms")
    results["breakdown_cpu_ms_per_step"] = breakdown("cpu_ms_per_step")
    dp = next((i.get("data_path_driver") for i in stack_info.values() if i.get("data_path_driver")), None)
    if dp:
        results["ray_shard_input_path_ms_per_batch_measured_in_driver"] = dp
    load = monitor.stop()
    results["load"] = load
    results["high_load"] = load["high_load"]
    out = Path(args.out or H.RESULTS / f"train_overhead_{H.device_name()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({"medians_ms": {k: v["median_ms"] for k, v in V.items()},
                      "cpu_ms_per_step": {k: v["cpu_ms_per_step"] for k, v in V.items()},
                      "ratios": results["ratios"], "ratios_cpu_time": results["ratios_cpu_time"],
                      "breakdown_wall_ms_per_step": results["breakdown_wall_ms_per_step"],
                      "breakdown_cpu_ms_per_step": results["breakdown_cpu_ms_per_step"], "load": load["note"]},
                     indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
