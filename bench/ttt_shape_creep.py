"""Resident memory of a process that adapts (TTT) many times with varying token counts, per adaptation precision.

    .venv/bin/python -m bench.ttt_shape_creep [--iters 30] [--precisions float32,bfloat16]

Each precision runs in a fresh process: a random Llama-style model (hidden 512 x 4 layers), then ``--iters``
calls of ``adapt_lora`` whose batch shape changes every time (1-3 questions, 1-5 neighbours each, as real
retrievals vary), and the same with one fixed shape. RSS (``VmRSS``) is sampled after every adaptation. On CPU,
bfloat16 matmuls go through oneDNN, which keeps kernels and buffers per matrix shape: with varying shapes the
process grows, which is why ``ttt.adapt.precision: auto`` stays float32 on CPU. Writes
``bench/results/ttt_shape_creep_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench import _harness as H


def rss_mib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return -1


def one(precision: str, iters: int, fixed: bool) -> dict:
    import torch
    from transformers import AutoTokenizer

    from finemed_ray.toy.sample import sample_sft_rows
    from finemed_ray.models.loading import load_model
    from finemed_ray.toy.tiny_model import save_tiny_model
    from finemed_ray.ttt.adapt import TTTConfig, adapt_lora

    torch.set_num_threads(2)
    model_dir = H.scratch_dir("bench-creep-")
    save_tiny_model(model_dir, hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=8, intermediate_size=1408)
    model, tok = load_model(model_dir), AutoTokenizer.from_pretrained(model_dir)
    pool = sample_sft_rows(paraphrases="train", system_prompt=None)
    cfg = TTTConfig(k=3, steps=2, r=8, lr=1e-3, precision=precision)
    series = []
    for i in range(iters):
        n, k, at = (2, 3, 0) if fixed else (1 + i % 3, 1 + (i * 7) % 5, i * 5)
        neighbours = [pool[(at + j) % len(pool): (at + j) % len(pool) + k] for j in range(n)]
        adapt_lora(model, tok, [f"q{i}-{j}" for j in range(n)], neighbours, cfg)
        series.append(rss_mib())
    return {"precision": precision, "shapes": "fixed" if fixed else "varying", "rss_mib": series,
            "growth_after_first_mib": series[-1] - series[0]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--precisions", default="float32,bfloat16")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help="internal: precision:fixed|varying in a fresh process")
    args = ap.parse_args()
    H.setup_env()
    if args.child:
        precision, shapes = args.child.split(":")
        print("RESULT " + json.dumps(one(precision, args.iters, shapes == "fixed")))
        return 0
    runs = []
    for precision in args.precisions.split(","):
        for shapes in ("varying", "fixed"):
            out = subprocess.run([sys.executable, "-m", "bench.ttt_shape_creep", "--child", f"{precision}:{shapes}",
                                  "--iters", str(args.iters)], cwd=H.ROOT, capture_output=True, text=True,
                                 check=True).stdout
            runs.append(json.loads([l for l in out.splitlines() if l.startswith("RESULT ")][-1][7:]))
            print(runs[-1]["precision"], runs[-1]["shapes"], runs[-1]["rss_mib"][0], "->", runs[-1]["rss_mib"][-1])
    result = {"benchmark": "ttt_shape_creep", "host": H.host_info(), "iters": args.iters, "runs": runs}
    out_path = Path(args.out or H.RESULTS / f"ttt_shape_creep_{H.device_name()}.json")
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
