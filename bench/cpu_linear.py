"""oneDNN small-batch linears on CPU (finemed_ray.models.cpu_linear) against torch's F.linear (MKL sgemm).

    .venv/bin/python -m bench.cpu_linear [--hidden 1024] [--layers 8] [--max-new-tokens 64] [--batch 8]

Three measurements, each in this process with ``torch.set_num_threads(--threads)``:
1. matmul time per row count (1..32 and 64, 512 for reference), weight [2.75*hidden x hidden], float32;
2. greedy generation through the transformers engine (``HfTeacher``) of a random Llama-style model (~100M
   parameters by default), one prompt and ``--batch`` prompts, with ``onednn_linear`` off and on; the texts must
   be identical;
3. resident memory (``VmRSS``) over ``--creep-iters`` generations whose prompts change length every time (1 to
   ``--batch`` prompts of varying length), with the fast path on: oneDNN keeps kernels per shape, and the row
   buckets must keep that bounded.
Writes ``bench/results/cpu_linear_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from bench import _harness as H


def rss_mib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return -1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--creep-iters", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    H.setup_env()
    import torch
    import torch.nn.functional as F

    from finemed_ray.toy.sample import sample_mcq_items
    from finemed_ray.models.cpu_linear import SmallBatchLinear, small_batch_linear, use_plain_linears
    from finemed_ray.models.cpu_linear import use_small_batch_linears
    from finemed_ray.toy.tiny_model import save_tiny_model
    from finemed_ray.synth.teachers import TeacherSpec, make_teacher

    torch.set_num_threads(args.threads)
    med = statistics.median

    def timed(fn, n: int) -> float:
        for _ in range(3):
            fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n

    # 1. matmuls
    inter = int(2.75 * args.hidden)
    w = torch.randn(inter, args.hidden)
    matmul = []
    for rows in (1, 2, 4, 8, 16, 32, 64, 512):
        x = torch.randn(rows, args.hidden)
        n = 20 if rows >= 512 else 200
        with torch.no_grad():
            mkl = med(timed(lambda: F.linear(x, w), n) for _ in range(3))
            dnnl = med(timed(lambda: small_batch_linear(x, w), n) for _ in range(3))
        matmul.append({"rows": rows, "f_linear_ms": round(mkl * 1e3, 4), "small_batch_linear_ms": round(dnnl * 1e3, 4),
                       "speedup": round(mkl / dnnl, 2)})
        print(matmul[-1])

    # 2. generation
    model_dir = H.scratch_dir("bench-cpu-linear-")
    heads = max(2, args.hidden // 64)
    save_tiny_model(model_dir, hidden_size=args.hidden, num_layers=args.layers, num_heads=heads, num_kv_heads=heads,
                    intermediate_size=inter)
    teacher = make_teacher(TeacherSpec(backend="hf", model=model_dir, max_tokens=args.max_new_tokens,
                                       batch_size=args.batch, extra={"onednn_linear": False}))
    model, _ = teacher.load()
    model.generation_config.eos_token_id = None  # every answer exactly --max-new-tokens long
    items = sample_mcq_items(paraphrases="heldout")
    reqs = [{"key": it["id"], "messages": [{"role": "user", "content": it["question"]}]} for it in items]

    def gen(n: int) -> tuple[float, list[str]]:
        t0 = time.perf_counter()
        out = teacher.generate(reqs[:n])
        return time.perf_counter() - t0, [r["text"] for r in out]

    generation: dict[str, dict[str, float]] = {}
    texts: dict[str, list[str]] = {}
    for setting in ("f_linear", "onednn", "f_linear", "onednn"):  # interleaved: drift hits both alike
        (use_small_batch_linears if setting == "onednn" else use_plain_linears)(model)
        gen(1), gen(args.batch)  # warm-up
        for n in (1, args.batch):
            runs = [gen(n) for _ in range(args.repeats)]
            generation.setdefault(setting, {}).setdefault(f"batch_{n}_s", [])
            generation[setting][f"batch_{n}_s"] += [r[0] for r in runs]  # type: ignore[operator]
            texts.setdefault(f"{setting}_{n}", runs[0][1])
    gen_summary = {s: {k: round(med(v), 4) for k, v in d.items()} for s, d in generation.items()}
    speedup = {k: round(gen_summary["f_linear"][k] / gen_summary["onednn"][k], 2) for k in gen_summary["onednn"]}
    identical = all(texts[f"f_linear_{n}"] == texts[f"onednn_{n}"] for n in (1, args.batch))
    print(gen_summary, speedup, "identical text:", identical)

    # 3. memory over varying prompt shapes (fast path on)
    use_small_batch_linears(model)
    assert any(type(m) is SmallBatchLinear for m in model.modules())
    rss = [rss_mib()]
    for i in range(args.creep_iters):
        n = 1 + (i * 5) % args.batch
        prompts = [{"key": j, "messages": [{"role": "user", "content": " ".join(
            [reqs[(i + j) % len(reqs)]["messages"][0]["content"]] * (1 + (i + j) % 4))}]} for j in range(n)]
        teacher.generate(prompts)
        rss.append(rss_mib())
    print("rss", rss[0], "->", rss[-1])

    results = {
        "benchmark": "cpu_linear", "host": H.host_info(),
        "model": {"hidden": args.hidden, "layers": args.layers,
                  "parameters": sum(p.numel() for p in model.parameters())},
        "max_new_tokens": args.max_new_tokens, "batch": args.batch,
        "matmul": matmul,
        "generation": gen_summary, "generation_speedup": speedup, "identical_text": identical,
        "memory_varying_prompts": {"iterations": args.creep_iters, "rss_mib_first": rss[0],
                                   "rss_mib_after_first_5": rss[min(5, len(rss) - 1)], "rss_mib_last": rss[-1],
                                   "rss_mib": rss},
    }
    out = Path(args.out or H.RESULTS / f"cpu_linear_{H.device_name()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
