"""One ZeRO-3 SFT run of our stack on GPU (NCCL, bf16) and its model FLOPs utilisation (MFU).

    .venv/bin/python -m bench.sft_mfu [--model-dir LOCAL_HF_DIR] [--hidden 1024] [--layers 8] [--rows 2048]
        [--batch 8] [--max-length 512] [--workers 1] [--peak-tflops N]

Writes ``bench/results/sft_mfu_<device>.json``. Needs CUDA (exit 2 without it): it is ``bench/gpu.sh``'s training
step. The run is the real ``SFTJob`` (Ray Data preparation, Ray Train, TRL ``SFTTrainer``, DeepSpeed ZeRO-3 from
configs/deepspeed/zero3.json) with ``model.dtype=bfloat16`` (the HF Trainer's bf16, DeepSpeed's bf16 section) and
``scaling.use_gpu=true`` (one GPU per worker, NCCL). The model: ``--model-dir`` (any local Hugging Face causal-LM
folder; GPU machines may have no internet), else a random Llama-style model of ``--hidden`` x ``--layers`` built
locally with the tiny tokenizer.

MFU = model FLOPs per second / the GPUs' peak dense bf16 FLOPs. Model FLOPs per trained token: 6 x parameters
(forward + backward of every weight matmul) + 12 x layers x hidden x sequence length (attention scores and
values, forward + backward, as in the PaLM paper's appendix B). Tokens: exactly those of each timed optimizer step,
reconstructed from every rank's trained ids (``samples_seen.json``) and the prepared rows; two figures: non-pad
tokens (useful work, the usual MFU) and padded tokens (what the GPU computes). Step times: TensorBoard event
times of rank 0 (``logging_steps=1``), median over the steps after the first ``--skip``. Peak FLOPs: a table of
known GPUs by name (dense bf16, no sparsity) or ``--peak-tflops``; unknown GPU and no override: MFU is null.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from bench import _harness as H

# Dense bf16 tensor-core peak (no sparsity), TFLOP/s, from the vendors' data sheets; matched on the CUDA name.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0), ("H100 SXM", 989.0), ("H100 80GB HBM3", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0),
    ("H100", 756.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
)


def peak_tflops(name: str) -> float | None:
    return next((v for key, v in PEAK_BF16_TFLOPS if key in name), None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default=None, help="a local Hugging Face causal-LM folder (default: random model)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8, help="per-device batch size")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--workers", type=int, default=1, help="Ray Train workers = GPUs")
    ap.add_argument("--skip", type=int, default=5, help="warm-up steps left out")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s of one GPU")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    H.setup_env()
    os.environ.pop("DS_ACCELERATOR", None)  # H.setup_env pins DeepSpeed to CPU for the CPU benchmarks
    import torch

    if not torch.cuda.is_available():
        print("bench.sft_mfu: no CUDA device; this benchmark needs a GPU (bench/gpu.sh)", file=sys.stderr)
        return 2
    import ray
    from transformers import AutoConfig

    from finemed_ray import storage
    from finemed_ray.toy.s3_server import EmbeddedS3
    from finemed_ray.toy.sample import sample_sft_rows, write_jsonl
    from finemed_ray.toy.tiny_model import save_tiny_model

    gpu_name = torch.cuda.get_device_name(0)
    peak = args.peak_tflops or peak_tflops(gpu_name)
    mon = H.Monitor(interval=1.0).start()
    with EmbeddedS3(buckets=("bench",)):
        if args.model_dir:
            storage.upload_dir(args.model_dir, "s3://bench/models/tiny")
            model_desc = f"local folder {args.model_dir}"
        else:
            heads = max(2, args.hidden // 64)
            save_tiny_model("s3://bench/models/tiny", hidden_size=args.hidden, num_layers=args.layers,
                            num_heads=heads, num_kv_heads=heads, intermediate_size=int(2.75 * args.hidden))
            model_desc = f"random Llama-style model, hidden {args.hidden} x {args.layers} layers, tiny tokenizer"
        rows_uri = write_jsonl(H.synthetic_conversations(args.rows), "s3://bench/data/sft.jsonl")
        cfg = H.sft_config("sft-mfu", [f"data.max_length={args.max_length}",
                                       f"train.per_device_batch_size={args.batch}",
                                       "train.gradient_accumulation_steps=1", "train.epochs=1",
                                       "train.report_to=[tensorboard]", "model.dtype=bfloat16",
                                       "deepspeed.config=configs/deepspeed/zero3.json"],
                           rows_uri, workers=args.workers)
        r = H.run_sft(cfg)
        ray.shutdown()
        from finemed_ray.models.loading import resolve_model_path

        mcfg = AutoConfig.from_pretrained(resolve_model_path("s3://bench/models/tiny"))
        prepared = H.read_prepared_rows(r["summary"]["data"]["prepared_uri"])
    load = mon.stop()
    params = r["meta"]["sharding_per_rank"][0]["total_numel"]
    plan = r["summary"]["plan"]
    steps_ids = H.rank_batches(r["samples_seen"]["per_rank"], args.batch, plan["rows_per_worker"])
    times = r["tb_times"]
    marks = [times[s] for s in sorted(times)]
    durations = H.step_durations(times)
    k = min(args.skip, len(durations) - 1)
    timed = range(k + 1, len(marks))  # step i (0-based) ends at marks[i]; durations[i-1] is its time
    useful = padded = attn = 0.0
    seconds = sum(durations[i - 1] for i in timed)
    for i in timed:
        for ids in steps_ids[i]:
            lens = [len(prepared[x]["input_ids"]) for x in ids]
            useful += sum(lens)
            padded += max(lens, default=0) * len(lens)
            attn += sum(12 * mcfg.num_hidden_layers * mcfg.hidden_size * n * n for n in lens)
    flops_useful = 6 * params * useful + attn
    flops_padded = 6 * params * padded + attn
    peak_total = peak * 1e12 * args.workers if peak else None
    result: dict[str, Any] = {
        "benchmark": "sft_mfu", "host": H.host_info(), "gpu": gpu_name, "gpus": args.workers,
        "model": {"description": model_desc, "parameters": params, "hidden": mcfg.hidden_size,
                  "layers": mcfg.num_hidden_layers},
        "setting": {"rows": args.rows, "per_device_batch": args.batch, "max_length": args.max_length,
                    "dtype": "bfloat16", "zero_stage": r["meta"].get("zero_stage"), "backend": "nccl",
                    "data": "bench._harness.synthetic_conversations (log-normal lengths)"},
        "steps": len(marks), "steps_timed": len(timed), "step_median_ms": round(1000 * statistics.median(
            durations[k:]), 2), "train_seconds": r["meta"]["train_seconds"], "job_wall_s": round(r["wall_seconds"], 1),
        "tokens_per_s_useful": round(useful / seconds, 1), "tokens_per_s_padded": round(padded / seconds, 1),
        "peak_bf16_tflops_per_gpu": peak,
        "peak_source": "--peak-tflops" if args.peak_tflops else ("bench.sft_mfu.PEAK_BF16_TFLOPS" if peak else None),
        "mfu": round(flops_useful / seconds / peak_total, 4) if peak_total else None,
        "mfu_padded_tokens": round(flops_padded / seconds / peak_total, 4) if peak_total else None,
        "mfu_definition": "(6 x parameters x tokens + 12 x layers x hidden x seq^2 per sequence) / step time / "
                          "(peak dense bf16 FLOP/s x GPUs); mfu: non-pad tokens, mfu_padded_tokens: padded batch",
        "first_loss": r["summary"]["first_loss"], "last_loss": r["summary"]["last_loss"], "load": load,
    }
    out = Path(args.out or H.RESULTS / f"sft_mfu_{H.device_name()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("gpu", "step_median_ms", "tokens_per_s_useful", "mfu",
                                             "mfu_padded_tokens")}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
