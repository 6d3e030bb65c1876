"""Preference metrics of a policy against a reference on DPO pairs, computed outside the trainer: DPO's implicit
reward margin ``beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)))`` and the
share of pairs where it is positive (preference accuracy). A policy equal to its reference scores margin 0 and
accuracy 0, so only a policy that moved towards the chosen answers can pass a threshold on these."""

from __future__ import annotations

from typing import Any

import torch

from finemed_ray.data.dpo_prepare import tokenize_pair


@torch.no_grad()
def completion_logps(model: Any, prompt_ids: list[int], completions: list[list[int]]) -> list[float]:
    """Sum of the log-probabilities of each completion's tokens after ``prompt_ids`` (one padded batch)."""
    seqs = [prompt_ids + c for c in completions]
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    out = []
    for i, c in enumerate(completions):
        start = len(prompt_ids) - 1  # logits at t predict token t+1
        out.append(float(logp[i, start : start + len(c)].sum()))
    return out


def preference_metrics(policy: Any, reference: Any, tokenizer: Any, rows: list[dict[str, Any]],
                       beta: float = 0.1) -> dict[str, Any]:
    margins = []
    for row in rows:
        ids = tokenize_pair(tokenizer, row["prompt"], row["chosen"], row["rejected"])
        pc, pr = completion_logps(policy, ids["prompt_ids"], [ids["chosen_ids"], ids["rejected_ids"]])
        rc, rr = completion_logps(reference, ids["prompt_ids"], [ids["chosen_ids"], ids["rejected_ids"]])
        margins.append(beta * ((pc - rc) - (pr - rr)))
    return {
        "n": len(margins),
        "reward_margin": sum(margins) / len(margins),
        "preference_accuracy": sum(m > 0 for m in margins) / len(margins),
    }
