"""DPO training-step tokens/s with packing (``train.packing=true``: chosen and rejected sequences flat,
finemed_ray/train/dpo_packing.py) versus TRL 1.16's padded batches, on preference pairs whose lengths vary 4x.

    .venv/bin/python -m bench.dpo_packing [--models tiny,h512] [--pairs 4] [--batches 4] [--repeats 5]
        [--min-length 64] [--max-length 256] [--threads 2] [--attn sdpa] [--device cpu|cuda] [--dtype float32]

Writes ``bench/results/dpo_packing_<device>.json``.

One step = what a DPO optimizer step computes apart from the optimizer itself (identical in both layouts): TRL's
``DPOTrainer.compute_loss`` (policy forward with TRL's fused LM head, reference forward under no_grad, the sigmoid
DPO loss and TRL's metrics) and ``loss.backward()``. Both layouts run through the same trainer class (our
``DPOPackingMixin`` over TRL's ``DPOTrainer``, packing off = TRL's own path), from the same weights, on the same
batches in the same order; only the collator and the forward differ. The losses of the two layouts are compared on
every batch (``max_abs_loss_diff``).

Data: synthetic token ids (throughput does not depend on them). Each pair has a prompt of 16-48 tokens; the chosen
and the rejected sequence (prompt + completion) each have a length drawn uniformly from
[``--min-length``, ``--max-length``] (64-256 by default: a 4x spread), independently, seeded. ``--pairs`` pairs per
micro-batch (the dpo_tiny default, 4), ``--batches`` distinct micro-batches per repeat.

Layouts: ``padded`` (TRL's ``DataCollatorForPreference``: right padding to the longest sequence of the micro-batch),
``packed`` (the shipped ``train.pack_length: auto``: one row on flash kernels, else first-fit bins of
``data.max_length`` = ``--max-length`` tokens per row; this is the setting judged against the target), and
``packed_single`` (every sequence in one row, for information: eager/sdpa attention then costs the square of the
whole micro-batch's tokens).

Timing: one warm-up pass over the batches per layout, then ``--repeats`` repeats; in each repeat every layout runs
all batches, layouts in rotating order (drift on a shared machine hits all alike). Per repeat and layout:
tokens/s = real (non-pad) tokens / wall seconds, and tokens per CPU-second (this process's user+system time, all
threads), which other processes on the machine disturb much less. Reported: min / median / max over repeats; the
speedups are ratios of the medians. Target (issue 19 item 4): packed / padded tokens/s >= 1.5x; judged per model on
wall-clock tokens/s at the shipped setting (``packed``). The JSON also records the machine's load while measuring.

GPU: ``--device cuda --dtype bfloat16 --attn flash_attention_2`` runs the flash varlen path (the packed forward
passes ``cu_seq_lens`` itself); that needs the flash-attn package, which the CPU machines cannot install, so the CPU
figures are sdpa.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

from bench import _harness as H

TARGET = 1.5
MODELS = {  # name -> build_tiny_model kwargs
    "tiny": dict(hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=256),
    "h512": dict(hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=8, intermediate_size=1024),
}
LAYOUTS = ("padded", "packed", "packed_single")


def make_pairs(n: int, min_length: int, max_length: int, vocab: int, seed: int = 0) -> list[dict[str, list[int]]]:
    from finemed_ray.train.dpo_packing import examples_from_lengths

    rng = random.Random(seed)
    lengths = []
    for _ in range(n):
        prompt = rng.randint(16, min(48, min_length - 1))
        chosen, rejected = (rng.randint(min_length, max_length) - prompt for _ in range(2))
        lengths.append((prompt, chosen, rejected))
    return examples_from_lengths(lengths, vocab, seed=seed)


def make_trainer(tok, model, examples, out_dir: str, layout: str, max_length: int, attn: str, device: str):
    import datasets
    import torch
    from trl import DPOConfig, DPOTrainer

    from finemed_ray.train.dpo_packing import DPOPackingMixin
    from finemed_ray.train.packing import resolve_pack_length

    class Trainer(DPOPackingMixin, DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # rows arrive tokenised (as in finemed_ray/train/stages/dpo.py)

    pack_length = {"padded": None, "packed": resolve_pack_length("auto", max_length, attn),
                   "packed_single": None}[layout]
    args = DPOConfig(output_dir=out_dir, use_cpu=device == "cpu", report_to=[], bf16=model.dtype == torch.bfloat16,
                     remove_unused_columns=False, per_device_train_batch_size=len(examples), max_length=max_length,
                     truncation_mode="keep_start", beta=0.1, loss_type=["sigmoid"])
    trainer = Trainer(model=model, ref_model=copy.deepcopy(model), args=args,
                      train_dataset=datasets.Dataset.from_list(examples), processing_class=tok,
                      dpo_packing=layout != "padded", dpo_pack_length=pack_length)
    return trainer, pack_length


def summarize(values: list[float]) -> dict[str, float]:
    return {"min": round(min(values), 2), "median": round(statistics.median(values), 2),
            "max": round(max(values), 2)}


def bench_model(name: str, args, tok, batches_examples: list[list[dict]], device: str) -> dict[str, Any]:
    import torch

    from finemed_ray.toy.tiny_model import build_tiny_model
    from finemed_ray.train.dpo_packing import padding_stats

    dtype = getattr(torch, args.dtype)
    base = build_tiny_model(tok, max_position_embeddings=max(2048, args.max_length), **MODELS[name])
    base.to(device=device, dtype=dtype)  # before choosing the kernel: flash attention checks device and dtype
    base.set_attn_implementation(args.attn)
    n_params = sum(p.numel() for p in base.parameters())
    trainers, batches, pack_lengths = {}, {}, {}
    for layout in LAYOUTS:
        trainer, pack_lengths[layout] = make_trainer(
            tok, copy.deepcopy(base), batches_examples[0], H.scratch_dir(f"bench-dpo-{layout}-"), layout,
            args.max_length, args.attn, device)
        trainer.model.train()
        trainers[layout] = trainer
        collated = [trainer.data_collator(ex) for ex in batches_examples]
        batches[layout] = [trainer._prepare_inputs(b) for b in collated]
    stats = {layout: [padding_stats(b) for b in batches[layout]] for layout in LAYOUTS}
    real_tokens = sum(s["real_tokens"] for s in stats["padded"])

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def run(layout: str) -> tuple[float, float, list[float]]:
        trainer = trainers[layout]
        losses = []
        sync()
        w0, c0 = time.perf_counter(), time.process_time()
        for batch in batches[layout]:
            loss = trainer.compute_loss(trainer.model, dict(batch))
            loss.backward()
            trainer.model.zero_grad(set_to_none=True)
            losses.append(loss.item())
        sync()
        return time.perf_counter() - w0, time.process_time() - c0, losses

    warm = {layout: run(layout)[2] for layout in LAYOUTS}  # warm-up, and the losses to compare
    loss_diff = max(abs(a - b) for layout in LAYOUTS[1:] for a, b in zip(warm[layout], warm["padded"]))
    wall: dict[str, list[float]] = {k: [] for k in LAYOUTS}
    cpu: dict[str, list[float]] = {k: [] for k in LAYOUTS}
    for r in range(args.repeats):
        order = LAYOUTS[r % len(LAYOUTS):] + LAYOUTS[: r % len(LAYOUTS)]
        for layout in order:
            w, c, _ = run(layout)
            wall[layout].append(real_tokens / w)
            cpu[layout].append(real_tokens / c)
        print(name, f"repeat {r + 1}/{args.repeats}", {k: round(v[-1]) for k, v in wall.items()}, flush=True)
    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    layouts = {}
    for layout in LAYOUTS:
        s = stats[layout]
        slots = sum(x["packed_slots"] if layout != "padded" else x["padded_slots"] for x in s)
        layouts[layout] = {
            "pack_length": pack_lengths[layout] if layout != "padded" else None,
            "rows_per_batch": [x.get("packed_rows", x["sequences"]) if layout != "padded" else x["sequences"]
                               for x in s],
            "token_slots": slots,
            "pad_fraction": round(1 - real_tokens / slots, 4),
            "tokens_per_second": summarize(wall[layout]),
            "tokens_per_cpu_second": summarize(cpu[layout]),
        }
    return {
        "model": {**MODELS[name], "parameters": n_params, "attn_implementation": args.attn, "dtype": args.dtype},
        "real_tokens_per_repeat": real_tokens,
        "sequences_per_batch": 2 * args.pairs,
        "padding_fraction_padded": layouts["padded"]["pad_fraction"],
        "padding_fraction_packed": layouts["packed"]["pad_fraction"],
        "upper_bound_speedup_from_slots": round(layouts["padded"]["token_slots"] / layouts["packed"]["token_slots"], 3),
        "layouts": layouts,
        "speedup_tokens_per_second": round(med["packed"] / med["padded"], 3),
        "speedup_tokens_per_cpu_second": round(med_cpu["packed"] / med_cpu["padded"], 3),
        "speedup_single_row_tokens_per_second": round(med["packed_single"] / med["padded"], 3),
        "max_abs_loss_diff": loss_diff,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,h512", help=f"comma-separated, of {sorted(MODELS)}")
    ap.add_argument("--pairs", type=int, default=4, help="preference pairs per micro-batch (2x sequences)")
    ap.add_argument("--batches", type=int, default=4, help="distinct micro-batches per repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--min-length", type=int, default=64, help="shortest prompt+completion sequence")
    ap.add_argument("--max-length", type=int, default=256, help="longest sequence; also data.max_length")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, flash_attention_2...)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.min_length < 17 or args.max_length < args.min_length:
        ap.error("need 17 <= --min-length <= --max-length")
    H.setup_env()
    import torch

    from finemed_ray.toy.tiny_model import build_tiny_tokenizer

    torch.set_num_threads(args.threads)
    tok = build_tiny_tokenizer()
    pairs = make_pairs(args.pairs * args.batches, args.min_length, args.max_length, len(tok), args.seed)
    batches = [pairs[i * args.pairs:(i + 1) * args.pairs] for i in range(args.batches)]
    monitor = H.Monitor().start()
    t0 = time.time()
    models = {}
    for name in args.models.split(","):
        models[name] = bench_model(name, args, tok, batches, args.device)
        print(name, {k: v for k, v in models[name].items() if k.startswith(("speedup", "padding", "max_abs"))},
              flush=True)
    load = monitor.stop()
    results: dict[str, Any] = {
        "benchmark": "dpo_packing",
        "host": H.host_info(),
        "load": load,
        "seconds": round(time.time() - t0, 1),
        "what": "DPO step (TRL compute_loss: policy fwd + reference fwd + loss; then backward), real tokens/s, "
                "packed (train.packing, pack_length auto) vs padded (TRL DataCollatorForPreference)",
        "pairs_per_batch": args.pairs, "batches": args.batches, "repeats": args.repeats,
        "sequence_length_range": [args.min_length, args.max_length], "max_length": args.max_length,
        "pack_length": "auto", "attn_implementation": args.attn, "dtype": args.dtype, "threads": args.threads,
        "target": f">= {TARGET}",
        "models": models,
    }
    for name, m in models.items():  # flat keys, one per model, for bench/results_table.py
        results[f"speedup_tokens_per_second_{name}"] = m["speedup_tokens_per_second"]
        results[f"speedup_tokens_per_cpu_second_{name}"] = m["speedup_tokens_per_cpu_second"]
        results[f"padding_fraction_{name}"] = m["padding_fraction_padded"]
        results[f"meets_target_{name}"] = m["speedup_tokens_per_second"] >= TARGET
    results["meets_target"] = all(m["speedup_tokens_per_second"] >= TARGET for m in models.values())
    out = Path(args.out or H.RESULTS / f"dpo_packing_{H.device_name()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    ok = all(m["max_abs_loss_diff"] < (1e-4 if args.dtype == "float32" else 5e-2) for m in models.values())
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
