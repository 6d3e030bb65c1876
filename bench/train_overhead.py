"""Cost of our training stack (Ray Train + TRL + DeepSpeed ZeRO-3) against a bare DeepSpeed ZeRO-3 loop on the same
model, rows, batches, optimizer and number of steps: total wall time and CPU time over repeats, optimizer-step
medians, and a worker-scaling curve on a fixed global batch.

    .venv/bin/python -m bench.train_overhead [--stack-repeats 5] [--rows 512] [--batch 4] [--max-length 256]
        [--variants stack_zero3,bare_zero3,bare_ddp] [--scaling-workers 1,2,4] [--skip 3]
        [--source facts|pubmedqa] [--hidden 128] [--layers 2] [--intermediate N]

Writes ``bench/results/train_overhead_<device>.json``. Target (issue 18 item 3): stack / bare ZeRO-3 loop <= 1.10x,
on total wall time and on CPU time. Variants (``--workers`` processes each, gloo on CPU, NCCL on GPU):

* ``stack_zero3``: our real stack, ``SFTJob`` as shipped: Ray Data shards -> Ray Train -> TRL ``SFTTrainer`` under
  DeepSpeed ZeRO-3 (configs/deepspeed/zero3.json).
* ``bare_zero3``: the baseline. ``torch.multiprocessing`` processes, ``torch.distributed``, ``deepspeed.initialize``
  on the same ZeRO-3 config (its "auto" values filled as the HF integration does), the model's own loss, ``AdamW``
  with the trainer's hyper-parameters, clipping and schedule, and a plain loop (no Ray, no HF Trainer, no TRL);
  a DeepSpeed checkpoint at the end, as the trainer writes one. Each rank trains on exactly the rows, in exactly
  the batches, that the stack's rank trained on in the first stack run (read back from its ``samples_seen.json``),
  collated by the same collator, same thread count as a Ray worker. Its launch also tokenises the raw rows
  (``finemed_ray.data.tokenize.tokenize_conversation``, as the stack's Ray Data preparation does; the JSON checks
  the ids are the stack's), so both sides start from the same JSONL rows.
* ``stack_ddp``, ``bare_ddp``, ``bare_ddp_trl_loss`` (optional; ``bare_ddp`` is cheap and on by default): the
  earlier comparison with plain PyTorch DDP, and DDP plus TRL's per-step loss and metric work.

Totals, per repeat (``--stack-repeats``, each stack run followed by one bare ZeRO-3 launch so both see similar load;
min / median / max over repeats, ratios of the medians and per pair):

* ``job_wall_s``: the whole run as a user launches it. Stack: ``SFTJob`` setup + run + save (Ray start, Ray Data
  preparation, workers, model load, training, final checkpoint and its upload, export). Bare: tokenising the rows +
  ``mp.spawn`` to join (process start, imports, model load, ``deepspeed.initialize``, loop, checkpoint).
* ``job_cpu_s``: CPU seconds (user+system) of every process of the run. Stack: all processes descending from this
  driver (Ray's GCS, raylet, Ray Data and Train workers, the driver itself) between the monitor samples around the
  run, less the monitor's own sampling thread; processes are sampled every 0.5 s, so up to 0.5 s of each one that
  exits is missed (a lower bound). Bare: the driver's tokenising thread + the rank processes (``RUSAGE_CHILDREN``).
* ``train_wall_s``: the training phase. Stack: ``trainer.train()`` (``train_seconds`` of the export: DeepSpeed
  engine set-up, every step, the final checkpoint). Bare: ``deepspeed.initialize`` + every step + checkpoint.
* ``train_procs_cpu_s``: CPU seconds of the training processes from birth to exit (stack: the Ray Train workers,
  last sample before exit; bare: the ranks, ``time.process_time()`` at the end).

Step time, measured the same way everywhere: wall time between the ends of consecutive optimizer steps on rank 0,
median over the steps after the first ``--skip``. For the stack the end-of-step marks are the wall times of the
TensorBoard events the HF Trainer writes in ``on_log`` with ``logging_steps=1`` (rank 0's log); CPU time per step
from /proc (stack workers, sampled) and ``time.process_time()`` (bare ranks).

Scaling (``--scaling-workers``): stack ZeRO-3 runs at 1, 2, 4 workers on the same global batch (``--batch`` x
``--workers`` rows per optimizer step; per-device batch = global / workers, no accumulation), so every point does
the same optimizer steps on the same rows; the point at ``--workers`` reuses the repeats above. Each worker gets one
CPU (``scaling.cpus_per_worker``); on a machine with fewer cores than workers the JSON says the run oversubscribed.
On a GPU machine (``scaling.use_gpu`` follows ``torch.cuda.is_available()``) each worker is one GPU.
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
TARGET_RATIO = 1.15  # the earlier target: stack step time / bare PyTorch DDP step time
TARGET_TOTAL = 1.10  # issue 18 item 3: stack / bare ZeRO-3 loop, total wall time and CPU time
TOTALS = ("job_wall_s", "job_cpu_s", "train_wall_s", "train_procs_cpu_s")


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
    from finemed_ray.train.driver import deepspeed_config_for_device

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
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(rank)
        os.environ.pop("DS_ACCELERATOR", None)
    dist.init_process_group("nccl" if gpu else "gloo", rank=rank, world_size=world)
    results = []
    for variant in variants:
        results.append(_bare_run(rank, world, variant, steps_rows, model_dir, hp, out_dir))
    import psutil

    me = {"birth": psutil.Process().create_time(), "end": time.time(), "cpu_s": time.process_time()}
    procs: list[Any] = [None] * world
    dist.all_gather_object(procs, me)  # every rank's whole-process CPU (imports, model load, init, loop, save)
    if rank == 0:
        for r in results:
            r["processes"] = procs
        Path(out_dir, "bare.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _bare_run(rank: int, world: int, variant: str, steps_rows, model_dir: str, hp: dict[str, Any],
              out_dir: str) -> dict:
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, get_scheduler
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    torch.manual_seed(hp["seed"])
    device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    if device.type == "cuda" and variant != "bare_zero3":
        model.to(device)
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
    train_t0 = time.time()  # the training phase: engine set-up, every step, checkpoint (stack: trainer.train())
    if variant == "bare_zero3":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")  # adopts the process group, like finemed_ray.train.loop.train_loop
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
        if device.type == "cuda":
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
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
    loop_end = time.time()
    if engine is not None:
        engine.save_checkpoint(str(Path(out_dir, f"ckpt-{variant}")))  # the trainer ends with a checkpoint too
        dist.barrier()
        engine.destroy()
    train_t1 = time.time()
    cpu_all: list[Any] = [None] * world
    dist.all_gather_object(cpu_all, cpu_marks)
    return {"variant": variant, "marks": marks, "phases": phases, "losses": losses, "cpu_marks_per_rank": cpu_all,
            "train_wall_s": train_t1 - train_t0, "checkpoint_s": train_t1 - loop_end}


def run_bare(variants: list[str], steps_rows, model_dir: str, hp: dict[str, Any], world: int) -> list[dict]:
    """One launch of the bare loop (``world`` fresh processes running ``variants`` in turn); each result carries
    ``launch``: the launch's wall time and the CPU seconds of its processes (reaped children's rusage)."""
    import resource

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="bench-bare-") as out:
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.time()
        mp.spawn(_bare_worker, args=(world, _free_port(), variants, steps_rows, model_dir, hp, out), nprocs=world,
                 join=True)
        t1 = time.time()
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        results = json.loads(Path(out, "bare.json").read_text())
    launch = {"wall_s": t1 - t0, "t0": t0, "t1": t1,
              "children_cpu_s": (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)}
    for r in results:
        r["launch"] = launch
    return results


def tokenize_rows(rows: list[dict], tokenizer_dir: str, max_length: int, system_prompt: str | None,
                  prepared: dict[str, dict]) -> dict[str, Any]:
    """The bare launch's data step: tokenise the raw rows as the stack's preparation does (no Ray Data); checks
    that the ids equal the stack's prepared ones. Timed in wall and CPU (this thread)."""
    from finemed_ray.data.tokenize import tokenize_conversation, with_system_prompt
    from finemed_ray.models.loading import load_tokenizer

    w0, c0 = time.time(), time.thread_time()
    tok = load_tokenizer(tokenizer_dir)
    out = {}
    for row in rows:
        res = tokenize_conversation(tok, with_system_prompt(row["messages"], system_prompt), max_length)
        out[row.get("id")] = {"input_ids": res["input_ids"], "labels": res["labels"]}
    wall, cpu = time.time() - w0, time.thread_time() - c0
    same = sum(1 for i, r in prepared.items() if out.get(i) == r)
    return {"wall_s": wall, "cpu_s": cpu, "rows": len(out), "equal_to_stack_prepared": same,
            "stack_prepared_rows": len(prepared)}


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


def _spread(values: list[float]) -> dict[str, Any]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"min": None, "median": None, "max": None, "all": []}
    return {"min": round(min(vals), 3), "median": round(statistics.median(vals), 3), "max": round(max(vals), 3),
            "all": [round(v, 3) for v in vals]}


def _stack_totals(r: dict[str, Any], monitor: H.Monitor, t0: float, t1: float) -> dict[str, Any]:
    """Totals of one stack run that ran between driver wall times t0 and t1 (see the module docstring)."""
    tl = monitor.timeline
    before = [s for s in tl if s[0] <= t0] or tl[:1]
    after = [s for s in tl if s[0] >= t1] or tl[-1:]
    a, b = before[-1], after[0]
    job_cpu = (b[1] - a[1]) - (b[5] - a[5])  # every process of ours, less the monitor's sampling thread
    workers = [w for w in monitor.workers.values() if any(t0 <= t <= t1 for t, _, _ in w.get("trace", []))]
    procs_cpu = sum(w["trace"][-1][2] for w in workers if w.get("trace"))
    return {"job_wall_s": r["wall_seconds"], "job_cpu_s": job_cpu, "train_wall_s": r["meta"]["train_seconds"],
            "train_procs_cpu_s": procs_cpu, "train_processes": len(workers),
            "job_cpu_window_s": round(b[0] - a[0], 2)}


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
    ap.add_argument("--variants", default="stack_zero3,bare_zero3,bare_ddp",
                    help="of stack_zero3, stack_ddp, bare_zero3, bare_ddp, bare_ddp_trl_loss")
    ap.add_argument("--stack-repeats", type=int, default=5,
                    help="runs of each stack variant, each followed by one bare ZeRO-3 launch (about 70 s + 20 s "
                         "each on 2 CPU cores)")
    ap.add_argument("--bare-rounds", type=int, default=1,
                    help="rounds of the other bare variants (bare_ddp...) per launch of them")
    ap.add_argument("--other-bare-launches", type=int, default=1,
                    help="launches of the other bare variants (bare_ddp...), after the first N stack runs (they "
                         "only give step medians: one launch is enough)")
    ap.add_argument("--scaling-workers", default="1,2,4",
                    help="worker counts of the scaling curve on a fixed global batch (--batch x --workers); '' = none")
    ap.add_argument("--scaling-repeats", type=int, default=1, help="stack runs per scaling point (other than the "
                                                                    "--workers point, which reuses the repeats)")
    ap.add_argument("--zero3-config", default=ZERO3_CONFIG,
                    help="DeepSpeed config of stack_zero3 and bare_zero3 (path relative to the repository)")
    ap.add_argument("--notes", default="", help="free text recorded in the JSON's notes")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    H.setup_env()

    import ray
    import torch

    from finemed_ray.models.loading import load_tokenizer, resolve_model_path
    from finemed_ray.toy.s3_server import EmbeddedS3
    from finemed_ray.toy.sample import sample_sft_rows, write_jsonl
    from finemed_ray.toy.tiny_model import save_tiny_model

    variants = args.variants.split(",")
    unknown = set(variants) - set(STACK_VARIANTS) - set(BARE_VARIANTS)
    if unknown:
        ap.error(f"unknown variants: {sorted(unknown)}")
    stack_names = [v for v in variants if v in STACK_VARIANTS]
    bare_names = [v for v in variants if v in BARE_VARIANTS]
    if bare_names and not stack_names:
        ap.error("bare variants replay the batches of a stack run: include at least one stack_* variant")
    global_batch = args.batch * args.workers
    scaling = [int(n) for n in args.scaling_workers.split(",") if n.strip()]
    for n in scaling:
        if global_batch % n:
            ap.error(f"--scaling-workers {n}: the global batch {global_batch} does not split into {n} workers")
    load_start = os.getloadavg()
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
        "stack_repeats": args.stack_repeats,
        "target": f"stack step time / bare PyTorch step time <= {TARGET_RATIO}",
        "targets": {"vs_bare_zero3_total": TARGET_TOTAL, "vs_bare_ddp_step": TARGET_RATIO},
        "targets_source": {"vs_bare_zero3_total": "issue 18 item 3: stack / bare DeepSpeed ZeRO-3 loop, total wall "
                                                  "time and CPU time",
                           "vs_bare_ddp_step": "the benchmark's earlier target (median optimizer step vs bare DDP)"},
        "step_time_definition": (
            "rank 0 wall time between the ends of consecutive optimizer steps, median over the steps after the "
            "first `skip_warmup_steps` of each run (repeats pooled); stack: wall times of the TensorBoard events "
            "the HF Trainer writes in on_log (logging_steps=1), bare: time.time() after the optimizer step and "
            "loss.item()"
        ),
        "cpu_per_step_definition": (
            "CPU seconds (user+system, all threads) of the training processes summed, per optimizer step, "
            "over the timed steps; stack: sampled every 0.5 s from /proc by the driver (steps interpolated "
            "between TensorBoard step marks), bare: time.process_time() in each rank. Much less sensitive to "
            "other processes on the machine than wall time. `own_cpu_ms_per_step_excl_driver` (stack) adds every "
            "other process of the local Ray cluster (raylet, GCS, Ray Data split coordinator...)"
        ),
        "totals_definition": {
            "job_wall_s": "the whole run. stack: SFTJob setup + run + save (Ray start, Ray Data preparation, "
                          "workers, model load, training, final checkpoint + upload, export); bare: tokenising the "
                          "raw rows + mp.spawn to join (process start, imports, model load, deepspeed.initialize, "
                          "loop, DeepSpeed checkpoint)",
            "job_cpu_s": "CPU s of every process of the run. stack: all processes descending from the driver "
                         "(GCS, raylet, Ray Data and Train workers, driver) between the monitor samples around "
                         "the run, less the sampling thread; a lower bound (each exiting process loses <= 0.5 s). "
                         "bare: the tokenising thread + the ranks (RUSAGE_CHILDREN)",
            "train_wall_s": "stack: trainer.train() (train_seconds: DeepSpeed engine set-up, steps, final "
                            "checkpoint); bare: deepspeed.initialize + steps + engine.save_checkpoint",
            "train_procs_cpu_s": "CPU s of the training processes, birth to exit. stack: Ray Train workers (last "
                                 "/proc sample before exit); bare: the ranks (time.process_time() at the end)",
        },
        "order": [],
        "variants": {},
    }
    monitor = H.Monitor(interval=0.5, track_workers=True).start()
    runs: dict[str, list[dict[str, Any]]] = {}
    stack_info: dict[str, Any] = {}
    scale_runs: dict[int, list[dict[str, Any]]] = {}
    with EmbeddedS3(buckets=("bench",)):
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
            results["data"] = "finemed_ray.toy.sample.sample_sft_rows (short single-fact conversations)"
        rows_uri = write_jsonl(rows, "s3://bench/data/sft.jsonl")
        model_dir = resolve_model_path("s3://bench/models/tiny")
        tok = load_tokenizer(model_dir)

        def stack_run(name: str, label: str, workers: int, batch: int,
                      data_path: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
            cfg = H.sft_config(
                f"overhead-{label}",
                [
                    f"data.max_length={args.max_length}",
                    f"train.per_device_batch_size={batch}",
                    "train.gradient_accumulation_steps=1",
                    "train.epochs=1",
                    "train.report_to=[tensorboard]",
                    *(STACK_VARIANTS[name] if name != "stack_zero3" else [f"deepspeed.config={args.zero3_config}"]),
                ],
                rows_uri,
                workers=workers,
            )
            t_start = time.time()
            r = H.run_sft(cfg)
            t_end = time.time()
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
                "load_job": {k: v for k, v in monitor.window(t_start, t_end).items() if k != "window"},
                "loadavg_after": [round(v, 2) for v in os.getloadavg()],
                "train_seconds": meta["train_seconds"],
                "steps": meta["global_step"],
                "job_wall_seconds": round(r["wall_seconds"], 1),
                "prepare_seconds": r["summary"]["data"]["seconds"],
                "first_loss": r["summary"]["first_loss"],
                "last_loss": r["summary"]["last_loss"],
                "totals": _stack_totals(r, monitor, t_start, t_end),
            }
            if data_path:  # on this run's cluster: after ray.shutdown() Ray Data would start a default one (CPUs =
                # cores) that the next SFTJob would join instead of its own with ray.local_num_cpus
                run["data_path_driver"] = measure_data_path(r["summary"]["data"]["prepared_uri"], workers, batch,
                                                            tok.pad_token_id, 100)
            ray.shutdown()
            return run, r

        reference = None  # the first stack run: its batches are replayed by the bare variants
        steps_rows, hp, token_check = None, None, None
        for rep in range(args.stack_repeats):
            for name in stack_names:
                run, r = stack_run(name, f"{name}-{rep}", args.workers, args.batch, data_path=reference is None)
                results["order"].append(name)
                meta = r["meta"]
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
                    stack_info[name]["data_path_driver"] = run.pop("data_path_driver")
                elif r["samples_seen"]["per_rank"] != reference["samples_seen"]["per_rank"]:
                    run["warning"] = "this run's ranks saw different rows/order than the reference run"
                if name == "stack_zero3":
                    scale_runs.setdefault(args.workers, []).append(run)
                print(json.dumps({name: {k: v for k, v in run.items() if k != "durations"},
                                  "median_ms": H.summarize_durations(run["durations"], args.skip)["median_ms"]}),
                      flush=True)
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
                    system_prompt = reference["meta"]["config"]["data"].get("system_prompt")
                launches = []
                if "bare_zero3" in bare_names:  # its own launch: its totals are the baseline's
                    launches.append(["bare_zero3"])
                others = [v for v in bare_names if v != "bare_zero3"] * args.bare_rounds
                if others and rep < args.other_bare_launches:
                    launches.append(others)
                for launch in launches:
                    tokenized = None
                    if launch == ["bare_zero3"]:
                        tokenized = tokenize_rows(rows, model_dir, args.max_length, system_prompt, prepared)
                        token_check = {k: tokenized[k] for k in ("rows", "equal_to_stack_prepared",
                                                                 "stack_prepared_rows")}
                    for res in run_bare(launch, steps_rows, model_dir, hp, args.workers):
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
                            "loadavg_after": [round(v, 2) for v in os.getloadavg()],
                            "steps": len(res["marks"]),
                            "first_loss": res["losses"][0],
                            "last_loss": res["losses"][-1],
                            "phase_mean_ms_rank0": {p: round(1000 * statistics.fmean(v[k:] or v), 2)
                                                    for p, v in res["phases"].items()},
                        }
                        if tokenized is not None:
                            lw = res["launch"]
                            run["totals"] = {
                                "job_wall_s": tokenized["wall_s"] + lw["wall_s"],
                                "job_cpu_s": tokenized["cpu_s"] + lw["children_cpu_s"],
                                "train_wall_s": res["train_wall_s"],
                                "train_procs_cpu_s": sum(p["cpu_s"] for p in res["processes"]),
                                "train_processes": len(res["processes"]),
                                "tokenize_wall_s": round(tokenized["wall_s"], 3),
                                "spawn_to_join_wall_s": round(lw["wall_s"], 3),
                                "checkpoint_s": round(res["checkpoint_s"], 3),
                                "load_job": {k2: v for k2, v in monitor.window(lw["t0"], lw["t1"]).items()
                                             if k2 != "window"},
                            }
                        runs.setdefault(res["variant"], []).append(run)
                        print(json.dumps({res["variant"]: {k2: v for k2, v in run.items() if k2 != "durations"},
                                          "median_ms": H.summarize_durations(durations, k)["median_ms"]}), flush=True)

        # -- scaling on a fixed global batch (stack ZeRO-3)
        for n in scaling:
            have = len(scale_runs.get(n, []))
            for rep in range(max(0, args.scaling_repeats - have) if n == args.workers else args.scaling_repeats):
                run, _ = stack_run("stack_zero3", f"scale{n}-{rep}", n, global_batch // n)
                results["order"].append(f"scaling_{n}_workers")
                scale_runs.setdefault(n, []).append(run)
                print(json.dumps({f"scaling_{n}": {k: v for k, v in run.items() if k != "durations"},
                                  "median_ms": H.summarize_durations(run["durations"], args.skip)["median_ms"]}),
                      flush=True)

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

    # -- totals: stack ZeRO-3 vs the bare ZeRO-3 loop, repeats paired in the order they ran
    st = [r["totals"] for r in runs.get("stack_zero3", []) if r.get("totals")]
    bz = [r["totals"] for r in runs.get("bare_zero3", []) if r.get("totals")]
    if st and bz:
        tot: dict[str, Any] = {"repeats": {"stack_zero3": len(st), "bare_zero3": len(bz)},
                               "at_least_5_repeats": min(len(st), len(bz)) >= 5,
                               "stack_zero3": {k: _spread([t[k] for t in st]) for k in TOTALS},
                               "bare_zero3": {k: _spread([t[k] for t in bz]) for k in TOTALS},
                               "ratios": {}, "meets_target": {}}
        tot["bare_zero3"]["tokenize_wall_s"] = _spread([t["tokenize_wall_s"] for t in bz])
        tot["bare_zero3"]["checkpoint_s"] = _spread([t["checkpoint_s"] for t in bz])
        tot["bare_tokenization_check"] = token_check
        for k in TOTALS:
            pairs = [a[k] / b[k] for a, b in zip(st, bz) if b[k]]
            med = round(tot["stack_zero3"][k]["median"] / tot["bare_zero3"][k]["median"], 3)
            tot["ratios"][k] = {"of_medians": med, "per_pair": [round(v, 3) for v in pairs],
                                "min_pair": round(min(pairs), 3), "max_pair": round(max(pairs), 3)}
            tot["meets_target"][k] = med <= TARGET_TOTAL
        results["totals"] = tot
    # -- scaling
    if scale_runs:
        cores = os.cpu_count() or 1
        pts = []
        for n in sorted(scale_runs):
            rs = scale_runs[n]
            med_step = statistics.median([H.summarize_durations(r["durations"], args.skip)["median_ms"] for r in rs])
            train = statistics.median([r["train_seconds"] for r in rs])
            pts.append({"workers": n, "per_device_batch": global_batch // n, "runs": len(rs),
                        "steps": rs[0]["steps"],
                        "job_wall_s": round(statistics.median([r["job_wall_seconds"] for r in rs]), 1),
                        "train_wall_s": round(train, 3),
                        "step_median_ms": round(med_step, 2),
                        "rows_per_s_train": round(rs[0]["steps"] * global_batch / train, 2),
                        "rows_per_s_steps": round(global_batch / (med_step / 1000), 2),
                        "train_procs_cpu_s": round(statistics.median([r["totals"]["train_procs_cpu_s"] for r in rs]), 1),
                        "foreign_cpu_share": [r["load_job"].get("foreign_cpu_share") for r in rs],
                        "oversubscribed": n * int(hp["threads"] if hp else 1) > cores})
        base = next((p for p in pts if p["workers"] == min(scale_runs)), pts[0])
        for p in pts:
            p["speedup_train_wall_vs_fewest"] = round(base["train_wall_s"] / p["train_wall_s"], 3)
            p["speedup_step_vs_fewest"] = round(base["step_median_ms"] / p["step_median_ms"], 3)
        results["scaling"] = {
            "global_batch": global_batch, "cpus": cores, "points": pts,
            "note": (f"stack ZeRO-3, {global_batch} rows per optimizer step split over the workers (no gradient "
                     f"accumulation), one CPU thread per worker; {cores} CPU cores: worker counts above {cores} "
                     "oversubscribe them, so their points measure contention, not scaling"),
            "gpu_recipe": ("on a machine with N >= 4 GPUs: .venv/bin/python -m bench.train_overhead --variants "
                           "stack_zero3 --stack-repeats 1 --scaling-workers 1,2,4 --batch 4 --workers 2 "
                           "--hidden 2048 --layers 16 --out bench/results/train_overhead_<gpu>_scaling.json "
                           "(scaling.use_gpu follows torch.cuda.is_available(): one GPU per worker, NCCL)"),
        }
    dp = next((i.get("data_path_driver") for i in stack_info.values() if i.get("data_path_driver")), None)
    if dp:
        results["ray_shard_input_path_ms_per_batch_measured_in_driver"] = dp
    load = monitor.stop()
    results["load"] = load
    results["high_load"] = load["high_load"]
    results["notes"] = (f"load average (1/5/15 min) {list(load_start)} at start, {load['loadavg_end']} at end; "
                        + args.notes).strip()
    out = Path(args.out or H.RESULTS / f"train_overhead_{H.device_name()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({"medians_ms": {k: v["median_ms"] for k, v in V.items()},
                      "cpu_ms_per_step": {k: v["cpu_ms_per_step"] for k, v in V.items()},
                      "ratios": results["ratios"], "ratios_cpu_time": results["ratios_cpu_time"],
                      "totals": results.get("totals"), "scaling": results.get("scaling"), "load": load["note"]},
                     indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
