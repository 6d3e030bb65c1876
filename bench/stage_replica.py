"""An in-process replica of the demo's stage 1 and reasoning SFT (and optionally DPO), for trying ideas on the
learning claims of issue 15 in minutes instead of one 12-minute demo per idea. NOT the product's training path:
one process, plain AdamW with a warm-up + cosine schedule, gradient clipping 1.0, no Ray, no DeepSpeed, no TRL.
Same inputs as the demo: the synthesized datasets of the offline teacher (run here through the real synthesis
pipeline into ``--work``), the tiny model, the demo's hyper-parameters, and its held-out evaluation (128
four-option questions in unseen wordings, the answer generated greedily and read from the Summarization).

    .venv/bin/python -m bench.stage_replica [--work /tmp/stage-replica] [--seed 42] [--variant shipped|recall-first]
        [--dpo-lr 2e-4 ...] [--out results.json]

``--extra-wordings N`` (1 or 3) adds, for every synthesized SFT and reasoning dialogue, N copies whose question is
asked in train wordings the offline teacher never writes (:data:`EXTRA_WORDINGS`, or :data:`VIGNETTE_WORDINGS` with
``--wordings vignette``; never a held-out one): 1 = twice the rows (halve ``--stage1-epochs``/``--epochs`` for the
same steps), 3 = four times the rows. Until 2026-12-08 the offline teacher wrote three wordings per fact, and these
flags measured six (README, "What each stage teaches the tiny model"); it now writes six, so the defaults
(``--extra-wordings 0``, 20 / 16 epochs) replicate today's demo.

``--variant recall-first`` rewrites Step 1 of every reasoning answer to the plain answer sentence ("What I recall
first: X is used to treat Y. Let me check this."), which shows whether the reasoning model still knows the fact
for a wording (README "What each stage teaches the tiny model", point 3). Figures printed and, with ``--out``,
written as JSON (they are experiments, not bench targets: nothing here goes into bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

SYSTEM_PROMPT = "You are a helpful professional doctor."
# Train wordings beyond sample.py's three (--extra-wordings): same question kinds, no held-out phrasing.
EXTRA_WORDINGS = {
    "drug": ("Name the condition that {drug} treats.", "Why would someone take {drug}?",
             "{Drug} is given for which disease?"),
    "test": ("Name the test done first for {disease}.", "How do you start testing for {disease}?",
             "Which investigation is done first in {disease}?"),
}
# The same, with one case-style wording per kind ("Someone takes X ..."): a real teacher writes case-style questions
# too, and both held-out wordings are case-style ("A patient was started on X ...", "A patient may have X ..."),
# which no train wording is. Neither held-out wording is used.
VIGNETTE_WORDINGS = {
    "drug": ("Name the condition that {drug} treats.", "Someone takes {drug} every day. Which condition do they have?",
             "{Drug} is given for which disease?"),
    "test": ("Name the test done first for {disease}.", "Someone is thought to have {disease}. What is checked first?",
             "Which investigation is done first in {disease}?"),
}


def _rows(root: Path, name: str) -> list[dict[str, Any]]:
    import pyarrow.dataset as pads

    return pads.dataset(str(root / name), format="parquet", partitioning="hive").to_table().to_pylist()


def _tokenized(tokenizer: Any, conversations: list[list[dict]], max_length: int) -> list[tuple[list[int], list[int]]]:
    from finemed_ray.data.tokenize import tokenize_conversation, with_system_prompt

    out = []
    for messages in conversations:
        r = tokenize_conversation(tokenizer, with_system_prompt(messages, SYSTEM_PROMPT), max_length)
        out.append((r["input_ids"], r["labels"]))
    return out


def _schedule(optimizer: Any, steps: int, warmup_ratio: float) -> Any:
    import torch

    warm = math.ceil(warmup_ratio * steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: s / max(1, warm) if s < warm else
                                             0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))


def _batch(seqs: list[tuple[list[int], list[int]]], pad: int) -> tuple[Any, Any, Any]:
    import torch

    length = max(len(s[0]) for s in seqs)
    ids = torch.tensor([s[0] + [pad] * (length - len(s[0])) for s in seqs])
    labels = torch.tensor([s[1] + [-100] * (length - len(s[1])) for s in seqs])
    mask = (torch.arange(length)[None] < torch.tensor([len(s[0]) for s in seqs])[:, None]).long()
    return ids, labels, mask


def sft(model: Any, data: list, epochs: int, lr: float, batch: int, pad: int, seed: int,
        warmup_ratio: float = 0.05) -> list[float]:
    """Plain SFT: shuffled per epoch (seeded), AdamW (weight decay 0.01), clipping 1.0; returns the losses."""
    import torch

    torch.manual_seed(seed)
    rng = random.Random(seed)
    steps = epochs * math.ceil(len(data) / batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = _schedule(optimizer, steps, warmup_ratio)
    model.train()
    losses = []
    for _ in range(epochs):
        order = list(range(len(data)))
        rng.shuffle(order)
        for start in range(0, len(order), batch):
            ids, labels, mask = _batch([data[i] for i in order[start:start + batch]], pad)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    return losses


def dpo(model: Any, reference: Any, pairs: list, epochs: int, lr: float, beta: float, sft_weight: float, batch: int,
        pad: int, seed: int) -> dict[str, float]:
    """DPO (sigmoid) plus ``sft_weight`` x the mean NLL of the chosen answer (the shipped RPO variant)."""
    import torch
    import torch.nn.functional as F

    def logps(m: Any, seqs: list) -> tuple[Any, Any]:
        ids, labels, mask = _batch(seqs, pad)
        logits = m(input_ids=ids, attention_mask=mask).logits[:, :-1]
        labels = labels[:, 1:]
        keep = labels != -100
        lp = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0)[..., None])[..., 0]
        return (lp * keep).sum(1), keep.sum(1)

    torch.manual_seed(seed)
    rng = random.Random(seed)
    steps = epochs * math.ceil(len(pairs) / batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    scheduler = _schedule(optimizer, steps, 0.05)
    reference.eval()
    loss = margin = torch.tensor(0.0)
    for _ in range(epochs):
        order = list(range(len(pairs)))
        rng.shuffle(order)
        for start in range(0, len(order), batch):
            chunk = [pairs[i] for i in order[start:start + batch]]
            seqs = [p[0] for p in chunk] + [p[1] for p in chunk]
            lp, n = logps(model, seqs)
            with torch.no_grad():
                ref, _ = logps(reference, seqs)
            k = len(chunk)
            margin = beta * ((lp[:k] - ref[:k]) - (lp[k:] - ref[k:]))
            loss = -F.logsigmoid(margin).mean() + sft_weight * (-(lp[:k] / n[:k]).mean())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    return {"last_loss": loss.item(), "last_margin": margin.mean().item()}


def held_out(model: Any, tokenizer: Any) -> dict[str, Any]:
    """The demo's held-out evaluation, with errors counted per question kind and wording."""
    from finemed_ray.eval.generative import mcq_generation_accuracy
    from finemed_ray.toy.sample import sample_mcq_items

    items = sample_mcq_items(paraphrases="heldout", every_paraphrase=True)
    r = mcq_generation_accuracy(model, tokenizer, items, system_prompt=SYSTEM_PROMPT, max_new_tokens=384,
                                batch_size=64)
    wrong = Counter("-".join(p["id"].split("-")[1::2]) for p in r["predictions"] if not p["correct"])
    return {"accuracy": r["accuracy"], "n": r["n"], "chance": r["chance"], "no_answer_rate": r["no_answer_rate"],
            "forms": dict(Counter(p["form"] for p in r["predictions"])), "wrong_by_kind_and_wording": dict(wrong),
            "predictions": r["predictions"]}


def recall_first(conversations: list[dict]) -> list[list[dict]]:
    """Step 1 of every reasoning answer replaced by the plain answer sentence of its fact."""
    from finemed_ray.toy import sample

    out = []
    for row in conversations:
        kind, i = re.match(r"seed-(drug|test)-(\d+)-v\d", row["id"]).groups()
        plain = sample._answer(kind, sample._FACT_TYPES[kind][0][int(i)])
        messages = [dict(m) for m in row["messages"]]
        first = re.search(r"Step 1: (.*)\n", messages[-1]["content"]).group(1)
        messages[-1]["content"] = messages[-1]["content"].replace(
            first, f"What I recall first: {plain} Let me check this.", 1)
        out.append(messages)
    return out


def with_extra_wordings(rows: list[dict], n: int, table: dict | None = None) -> list[list[dict]]:
    """Each row's dialogue, then ``n`` copies asking its question in other train wordings (1: the row's own extra
    wording, ``EXTRA_WORDINGS[kind][v % 3]``; 3: all three); identical dialogues kept once."""
    from finemed_ray.toy import sample

    out, seen = [], set()
    for row in rows:
        kind, i, v = re.match(r"seed-(drug|test)-(\d+)-v(\d+)", row["id"]).groups()
        fact = sample._FACT_TYPES[kind][0][int(i)]
        table = table or EXTRA_WORDINGS
        wordings = table[kind][int(v) % 3:int(v) % 3 + 1] if n == 1 else table[kind][:n]
        variants = [row["messages"]]
        for w in wordings:
            messages = [dict(m) for m in row["messages"]]
            messages[0]["content"] = w.format(drug=fact[0], Drug=sample._cap(fact[0]), disease=fact[0])
            variants.append(messages)
        for messages in variants:
            key = json.dumps(messages)
            if key not in seen:
                seen.add(key)
                out.append(messages)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    from finemed_ray.models.loading import load_model, load_tokenizer
    from finemed_ray.toy.synthesis import synthesize_demo_data
    from finemed_ray.toy.tiny_model import save_tiny_model

    ap = argparse.ArgumentParser(prog="python -m bench.stage_replica", description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/stage-replica", help="synthesized data, models (reused when present)")
    ap.add_argument("--seed", type=int, default=42, help="data-order seed of reasoning SFT (and DPO)")
    ap.add_argument("--variant", choices=("shipped", "recall-first"), default="shipped")
    ap.add_argument("--extra-wordings", type=int, choices=(0, 1, 3), default=0,
                    help="copies of each dialogue in other train wordings (EXTRA_WORDINGS)")
    ap.add_argument("--wordings", choices=("extra", "vignette"), default="extra",
                    help="which extra train wordings: EXTRA_WORDINGS or VIGNETTE_WORDINGS")
    ap.add_argument("--stage1-epochs", type=int, default=20, help="stage 1 epochs (demo: 20 -> 240 steps)")
    ap.add_argument("--epochs", type=int, default=16, help="reasoning SFT epochs (demo: 16 -> 384 steps)")
    ap.add_argument("--stage1-batch", type=int, default=32, help="stage 1 global batch (demo: 2 workers x 16)")
    ap.add_argument("--batch", type=int, default=16, help="reasoning SFT global batch (demo: 2 workers x 8)")
    ap.add_argument("--lr", type=float, default=3e-3, help="reasoning SFT peak learning rate (demo: 3e-3)")
    ap.add_argument("--dpo-lr", type=float, action="append", default=[], help="also run DPO at this lr (repeatable)")
    ap.add_argument("--dpo-epochs", type=int, default=1,
                    help="DPO epochs (demo: 1 over ~346 pairs = 44 steps; 2 until 2026-12-08, over ~173 pairs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    table = VIGNETTE_WORDINGS if args.wordings == "vignette" else EXTRA_WORDINGS
    work = Path(args.work)
    t0 = time.time()
    if not (work / "synth" / "manifest.json").exists():
        synthesize_demo_data(str(work / "synth"), str(work / "inputs"))
    tiny, stage1 = work / "tiny", work / (f"stage1-e{args.stage1_epochs}-w{args.extra_wordings}"
                                          + (f"-b{args.stage1_batch}" if args.stage1_batch != 32 else "")
                                          + ("-vig" if args.wordings == "vignette" else ""))
    if not (tiny / "config.json").exists():
        save_tiny_model(str(tiny))
    result: dict[str, Any] = {"setting": vars(args)}
    tokenizer = load_tokenizer(str(tiny))
    pad = tokenizer.pad_token_id
    if not (stage1 / "config.json").exists():
        model = load_model(str(tiny))
        sft_rows = _rows(work / "synth", "sft")
        random.Random(0).shuffle(sft_rows)  # 10% held out, as the recipe's stage 1 (eval_fraction 0.1)
        sft_rows = sft_rows[: int(len(sft_rows) * 0.9) + 1]
        data = _tokenized(tokenizer, with_extra_wordings(sft_rows, args.extra_wordings, table), 256)
        sft(model, data, args.stage1_epochs, 5e-3, args.stage1_batch, pad, seed=42)
        model.save_pretrained(str(stage1))
    model = load_model(str(stage1))
    result["stage1"] = held_out(model, tokenizer)
    rows = _rows(work / "synth", "reasoning")
    if args.variant == "recall-first":
        conversations = recall_first(rows)
    else:
        conversations = with_extra_wordings(rows, args.extra_wordings, table)
    losses = sft(model, _tokenized(tokenizer, conversations, 512), args.epochs, args.lr, args.batch, pad, seed=args.seed)
    result["reasoning"] = {**held_out(model, tokenizer), "first_loss": losses[0], "last_loss": losses[-1]}
    reasoning_state = {k: v.clone() for k, v in model.state_dict().items()}
    pair_rows = _rows(work / "synth", "dpo")
    random.Random(0).shuffle(pair_rows)
    pair_rows = pair_rows[: int(len(pair_rows) * 0.9) + 1]
    pairs = [(_tokenized(tokenizer, [r["prompt"] + r["chosen"]], 512)[0],
              _tokenized(tokenizer, [r["prompt"] + r["rejected"]], 512)[0]) for r in pair_rows]
    for lr in args.dpo_lr:
        model.load_state_dict(reasoning_state)
        reference = load_model(str(stage1))
        reference.load_state_dict(reasoning_state)
        stats = dpo(model, reference, pairs, args.dpo_epochs, lr, 0.1, 1.0, 8, pad, seed=args.seed)
        result[f"dpo_lr_{lr:g}"] = {**held_out(model, tokenizer), **stats}
    result["seconds"] = round(time.time() - t0, 1)
    for name, r in result.items():
        if isinstance(r, dict) and "accuracy" in r:
            print(f"{name:12s} accuracy {r['accuracy']:.3f} (n={r['n']}, chance {r['chance']:.2f}; no answer "
                  f"{r['no_answer_rate']:.0%}; forms {r['forms']}; wrong by kind-wording {r['wrong_by_kind_and_wording']})")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
