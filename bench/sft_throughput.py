"""SFT throughput on the tiny model: data preparation time, training tokens/s and samples/s, per variant.

    .venv/bin/python -m bench.sft_throughput [--rows 192] [--epochs 2] [--variants zero3,ddp]

Writes ``bench/results/sft_throughput_<device>.json``. Everything runs for real: a local S3 server, a local Ray
cluster, Ray Data preparation, Ray Train workers. On CPU the numbers measure our overheads (start-up, data
path), not model FLOPs: the tiny model is 2 layers x 128 wide.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "zero3": ["deepspeed.config=configs/deepspeed/zero3.json"],
    "ddp": ["deepspeed.config=null"],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=192, help="training conversations")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--variants", default="zero3,ddp")
    ap.add_argument("--out", default=None, help="result JSON (default bench/results/sft_throughput_<device>.json)")
    args = ap.parse_args()
    for k, v in {"HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(k, v)

    import ray
    import torch

    from finemed_ray import storage
    from finemed_ray.toy.s3_server import EmbeddedS3
    from finemed_ray.config import load_config
    from finemed_ray.toy.sample import sample_sft_rows, write_jsonl
    from finemed_ray.toy.tiny_model import save_tiny_model
    from finemed_ray.train.configs import SFTJobConfig
    from finemed_ray.train.stages.sft import SFTJob

    gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0).replace(" ", "_") if gpu else "cpu"
    results = {
        "benchmark": "sft_throughput",
        "device": device,
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "rows": args.rows,
        "epochs": args.epochs,
        "workers": args.workers,
        "variants": {},
    }
    with EmbeddedS3(buckets=("bench",)):
        save_tiny_model("s3://bench/models/tiny")
        write_jsonl(sample_sft_rows(n=args.rows, paraphrases="train"), "s3://bench/data/sft.jsonl")
        for name in args.variants.split(","):
            cfg = load_config(
                SFTJobConfig,
                ROOT / "configs/sft_tiny.yaml",
                [
                    "model.path=s3://bench/models/tiny",
                    "data.path=s3://bench/data/sft.jsonl",
                    "run.storage_path=s3://bench/runs",
                    f"run.name=bench-{name}",
                    f"output.export_path=s3://bench/exports/{name}",
                    f"train.epochs={args.epochs}",
                    f"scaling.num_workers={args.workers}",
                    f"scaling.use_gpu={str(gpu).lower()}",
                    f"ray.local_num_cpus={max(4, args.workers + 2)}",
                    "train.report_to=[]",
                    "train.save_steps=100000",
                    *VARIANTS[name],
                ],
            )
            t0 = time.time()
            job = SFTJob(cfg).setup()
            job.run()
            summary = job.save()
            wall = time.time() - t0
            meta = storage.read_json(storage.join(cfg.output.export_path, "finemed_export.json"))
            tokens = summary["data"]["tokens_valid"] * args.epochs
            results["variants"][name] = {
                "wall_seconds": round(wall, 2),
                "prepare_seconds": summary["data"]["seconds"],
                "train_seconds": meta["train_seconds"],
                "steps": meta["global_step"],
                "samples_per_second": round(meta["samples_seen"] / meta["train_seconds"], 2),
                "tokens_per_second": round(tokens / meta["train_seconds"], 1),
                "first_loss": summary["first_loss"],
                "last_loss": summary["last_loss"],
                "local_param_fraction_rank0": round(
                    meta["sharding_per_rank"][0]["local_numel"] / meta["sharding_per_rank"][0]["total_numel"], 3
                ),
            }
            print(json.dumps({name: results["variants"][name]}), flush=True)
            ray.shutdown()
    out = Path(args.out or ROOT / f"bench/results/sft_throughput_{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
