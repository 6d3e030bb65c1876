"""TTT adaptation time with the LM head on labelled positions only (``logits_to_keep``, the default) versus on every
position, on a model with a realistic vocabulary.

    .venv/bin/python -m bench.ttt_lm_head [--vocab 128256] [--hidden 1024] [--layers 8] [--repeats 2]

Writes ``bench/results/ttt_lm_head_<device>.json``. The model is the bench.ttt random Llama-style model with its
embeddings and LM head resized to ``--vocab`` rows (Llama 3's 128256 by default; the tiny tokenizer only uses
the first ~2.3k, which does not matter for cost). The same ``adapt_lora`` call (k = 3 neighbours, 2 steps, top half
of the layers) runs for 1 and 8 questions, alternating the two settings; the "every position" setting is the
same code with ``logits_to_keep`` unavailable (``_accepts_logits_to_keep`` patched to False).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from bench import _harness as H


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2, help="rounds of both settings (1 question: 3 calls a round)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    H.setup_env()
    import torch

    import finemed_ray.ttt.adapt as adapt
    from finemed_ray.toy.sample import sample_sft_rows
    from finemed_ray.toy.tiny_model import save_tiny_model
    from finemed_ray.synth.teachers import TeacherSpec, make_teacher

    torch.set_num_threads(args.threads)
    model_dir = H.scratch_dir("bench-ttt-lm-head-")
    heads = max(2, args.hidden // 64)
    save_tiny_model(model_dir, hidden_size=args.hidden, num_layers=args.layers, num_heads=heads,
                    num_kv_heads=heads, intermediate_size=int(2.75 * args.hidden))
    model, tok = make_teacher(TeacherSpec(backend="hf", model=model_dir)).load()
    model.resize_token_embeddings(args.vocab, mean_resizing=False)
    pool = sample_sft_rows(paraphrases="train", system_prompt=None)
    neighbours = [pool[3 * i: 3 * i + 3] for i in range(8)]
    cfg = adapt.TTTConfig(k=3, steps=2, lr=1e-3)
    batch1 = adapt.collate_examples(model, adapt.build_examples(tok, neighbours[:1], cfg), 0)
    labelled = int((batch1["labels"][:, 1:] != adapt.IGNORE_INDEX).any(0).sum())
    settings = {"labelled_positions": adapt._accepts_logits_to_keep, "every_position": lambda model: False}
    adapt.adapt_lora(model, tok, ["warm-up"], neighbours[:1], cfg)
    times: dict[str, dict[int, list[float]]] = {s: {1: [], 8: []} for s in settings}
    try:
        for _ in range(args.repeats):
            for name, accepts in settings.items():
                adapt._accepts_logits_to_keep = accepts
                for n in (1, 8):
                    for _ in range(3 if n == 1 else 1):
                        t0 = time.perf_counter()
                        adapt.adapt_lora(model, tok, [f"q{i}" for i in range(n)], neighbours[:n], cfg)
                        times[name][n].append(time.perf_counter() - t0)
    finally:
        adapt._accepts_logits_to_keep = settings["labelled_positions"]
    med = {name: {n: statistics.median(v) for n, v in per.items()} for name, per in times.items()}
    results = {
        "benchmark": "ttt_lm_head", "host": H.host_info(),
        "model": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab,
                  "parameters": sum(p.numel() for p in model.parameters())},
        "one_question": {"positions": int(batch1["input_ids"].shape[1]) - 1, "labelled_positions": labelled,
                         "float32_logits_mib_every_position": round(
                             (batch1["input_ids"].shape[1] - 1) * args.vocab * 4 / 2**20, 1),
                         "float32_logits_mib_labelled_positions": round(labelled * args.vocab * 4 / 2**20, 1)},
        "adapt_s_median": {name: {str(n): round(t, 3) for n, t in per.items()} for name, per in med.items()},
        "adapt_s_all": {name: {str(n): [round(t, 3) for t in v] for n, v in per.items()} for name, per in times.items()},
        "speedup": {str(n): round(med["every_position"][n] / med["labelled_positions"][n], 3) for n in (1, 8)},
    }
    out = Path(args.out or H.RESULTS / f"ttt_lm_head_{H.device_name()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: results[k] for k in ("model", "one_question", "adapt_s_median", "speedup")}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
