"""The demo's inputs, uploaded to a bucket so every ``jobs/`` command can be run by hand against them.

``python -m finemed_ray.toy.s3_server serve-s3 --bucket finemed-demo --sample`` (``make s3-sample``) calls
:func:`upload_demo_inputs` after its S3 server starts. ``make demo`` itself trains on the synthesized datasets
(``synth/``); the hand-written sample datasets (``data/``) are inputs for ``jobs.sft`` / ``jobs.dpo`` /
``jobs.build_index`` run alone:

=========================================  ==========================================================================
``s3://BUCKET/models/tiny``                the tiny Llama-style model + tokenizer (``save_tiny_model``)
``s3://BUCKET/data/sft.jsonl``             SFT conversations (train wordings, departments) + deliberately broken rows
``s3://BUCKET/data/reasoning.jsonl``       o1-style reasoning conversations (train wordings)
``s3://BUCKET/data/dpo.jsonl``             DPO pairs (chosen = reasoning, rejected = direct) + broken rows
``s3://BUCKET/data/heldout_mcq.jsonl``     4-option MCQ items on held-out wordings (``jobs.evaluate`` benchmark)
``s3://BUCKET/seeds/seed_corpus.jsonl``    seed texts for ``jobs.synthesize`` (when ``finemed_ray.toy`` exists)
``s3://BUCKET/synth/``                     the demo's synthesis run on them (offline teacher): sft/, reasoning/,
                                           dpo/, quarantine/, manifest.json -- what the tiny recipe trains on
=========================================  ==========================================================================
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable

__all__ = ["upload_demo_inputs"]


def upload_demo_inputs(bucket: str, note: Callable[[str], None] = print, synthesize: bool = True) -> dict[str, str]:
    """Write the demo's inputs under ``s3://bucket/`` (or a local dir); returns ``{what: uri}`` in upload order.

    The S3 endpoint and credentials come from the environment (see :mod:`finemed_ray.storage`). ``note`` gets one
    line per skipped item (the seed corpus when ``finemed_ray.toy.seed_corpus`` is not installed).
    """
    from finemed_ray import storage
    from finemed_ray.toy.sample import (bad_dpo_rows, bad_sft_rows, sample_dpo_rows, sample_mcq_items,
                                         sample_reasoning_rows, sample_sft_rows, write_jsonl)
    from finemed_ray.toy.tiny_model import save_tiny_model

    root = bucket if "://" in bucket or bucket.startswith(("/", ".")) else f"s3://{bucket}"
    data = storage.join(root, "data")
    out: dict[str, str] = {}
    out["model"] = save_tiny_model(storage.join(root, "models", "tiny"))
    sft = sample_sft_rows(paraphrases="train", system_prompt=None) + bad_sft_rows()
    out["sft"] = write_jsonl(sft, storage.join(data, "sft.jsonl"))
    out["reasoning"] = write_jsonl(sample_reasoning_rows(paraphrases="train", system_prompt=None),
                                   storage.join(data, "reasoning.jsonl"))
    out["dpo"] = write_jsonl(sample_dpo_rows(paraphrases="train") + bad_dpo_rows(), storage.join(data, "dpo.jsonl"))
    mcq_uri = storage.join(data, "heldout_mcq.jsonl")
    storage.write_text(mcq_uri, "".join(json.dumps(i, ensure_ascii=False) + "\n"
                                        for i in sample_mcq_items(paraphrases="heldout")))
    out["heldout_mcq"] = mcq_uri
    try:
        seed_corpus = importlib.import_module("finemed_ray.toy.seed_corpus")
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("finemed_ray.toy"):
            raise
        note("seed corpus skipped: finemed_ray.toy.seed_corpus is not installed")
    else:
        out["seeds"] = seed_corpus.write_seed_corpus(storage.join(root, "seeds", "seed_corpus.jsonl"))
        if synthesize:
            # What the tiny recipe trains on (configs/recipe_finemed_tiny.yaml reads <bucket>/synth/): the demo's
            # synthesis run, offline teacher and all (a local Ray cluster for ~1 minute).
            from finemed_ray.toy.synthesis import synthesize_demo_data

            got = synthesize_demo_data(storage.join(root, "synth"), storage.join(root, "synth-inputs"))
            out.update({f"synth_{k}": v for k, v in got["uris"].items() if k in ("sft", "reasoning", "dpo",
                                                                                   "manifest")})
    return out
