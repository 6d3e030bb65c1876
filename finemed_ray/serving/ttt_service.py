"""The TTT trainer behind serving: question -> neighbours from the index -> a fresh LoRA adapter -> its tensors.

Its own deployment (own replicas, own copy of the weights for training), so adaptation never runs on the model an
engine is serving from: an engine only ever *applies* adapters, per request, and plain requests are untouched.
Concurrent requests are adapted together (``@serve.batch`` in the deployment -> one :func:`adapt_lora` call, one
adapter per question). Adapters are cached by a hash of (neighbour ids, adaptation settings): the same or a
similar question that retrieves the same neighbours reuses the adapter without training.

The two steps the evaluation job shares with it (``finemed_ray.eval.runner.VLLMTTTWorker``: TTT evaluation on
vLLM): :func:`load_trainer` (the transformers copy adapters are trained on) and :func:`train_adapter_payloads`
(one batched :func:`adapt_lora` pass -> one adapter payload per question, what ``VLLMEngine`` turns into a
``LoRARequest``).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from finemed_ray.ttt.adapt import AdaptResult, TTTConfig, adapt_lora


def load_trainer(model_path: str, dtype: str = "float32") -> tuple[Any, Any]:
    """``(model, tokenizer)``: the transformers copy of the base that adapters are trained on (eval mode; its
    weights are never written, see :mod:`finemed_ray.ttt.adapt`)."""
    from finemed_ray.models.loading import load_model, load_tokenizer

    return load_model(model_path, dtype=dtype).eval(), load_tokenizer(model_path)


def train_adapter_payloads(model: Any, tokenizer: Any, keys: Sequence[str], neighbours: Sequence[Sequence[dict]],
                           cfg: TTTConfig, adapter_ids: Sequence[str],
                           base_model_name: str | None = None) -> tuple[list[dict[str, Any]], AdaptResult]:
    """One fresh adapter per question, trained together (``keys[q]`` seeds question q's initialisation), returned
    as payloads (``adapter_ids[q]``; numpy tensors in peft's layout) that an engine applies per request."""
    res = adapt_lora(model, tokenizer, list(keys), neighbours, cfg)
    return [res.lora.payload(q, aid, base_model_name=base_model_name) for q, aid in enumerate(adapter_ids)], res


class TTTService:
    def __init__(self, model_path: str, index_uri: str, defaults: TTTConfig, cache_size: int = 64):
        from finemed_ray.ttt.index import load_index_and_encoder

        self.model_path = model_path
        self.model, self.tokenizer = load_trainer(model_path)
        self.index, self.encoder = load_index_and_encoder(index_uri)
        self.defaults = defaults
        self.cache: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.cache_size = cache_size
        self.hits = self.misses = 0
        self._lock = threading.Lock()  # one training pass at a time on this replica's model

    def settings(self, k: int | None, steps: int | None) -> TTTConfig:
        return self.defaults.model_copy(update={"k": k or self.defaults.k,
                                                "steps": self.defaults.steps if steps is None else steps})

    def adapt_many(self, queries: list[tuple[str, int | None, int | None]]) -> list[dict[str, Any]]:
        """``[(question text, k, steps), ...]`` -> one result per query: ``{"adapter": payload, "info": {...}}``."""
        with self._lock:
            t0 = time.time()
            cfgs = [self.settings(k, s) for _, k, s in queries]
            kmax = max(c.k for c in cfgs)
            # SIFT's first k picks are its k picks (greedy), so cutting the kmax selection per query is exact
            neighbours, distances = self.index.neighbours([q for q, _, _ in queries], kmax, self.encoder,
                                                          **self.defaults.retrieval_kwargs())
            t_retrieve = time.time() - t0
            out: list[dict[str, Any] | None] = [None] * len(queries)
            todo: dict[tuple, list[int]] = {}  # (steps, k) -> query positions needing training
            keys = []
            for i, cfg in enumerate(cfgs):
                nb = neighbours[i][: cfg.k]
                key = hashlib.sha256(json.dumps(
                    {"ids": [n.get("id") for n in nb], "cfg": cfg.model_dump(mode="json")}, sort_keys=True
                ).encode()).hexdigest()[:24]
                keys.append(key)
                info = {"applied": True, "k": cfg.k, "steps": cfg.steps, "adapter_id": f"ttt-{key}",
                        "neighbours": [{"id": n.get("id"), "distance": round(float(d), 5)}
                                       for n, d in zip(nb, distances[i][: cfg.k])],
                        "retrieve_seconds": round(t_retrieve, 4)}
                if key in self.cache:
                    self.cache.move_to_end(key)
                    self.hits += 1
                    out[i] = {"adapter": self.cache[key], "info": {**info, "cache_hit": True, "train_seconds": 0.0}}
                else:
                    out[i] = {"adapter": None, "info": {**info, "cache_hit": False}}
                    todo.setdefault((cfg.steps, cfg.k, cfg.lr), []).append(i)
            for (_, _, _), idx in todo.items():
                uniq = list(OrderedDict((keys[i], i) for i in idx).items())  # same neighbours twice: train once
                cfg = cfgs[uniq[0][1]]
                t1 = time.time()
                payloads, res = train_adapter_payloads(
                    self.model, self.tokenizer, [k for k, _ in uniq], [neighbours[i][: cfg.k] for _, i in uniq], cfg,
                    [f"ttt-{k}" for k, _ in uniq], base_model_name=self.model_path)
                seconds = time.time() - t1
                for (key, _), payload in zip(uniq, payloads):
                    self.misses += 1
                    if self.cache_size:
                        self.cache[key] = payload
                        while len(self.cache) > self.cache_size:
                            self.cache.popitem(last=False)
                    for i in idx:
                        if keys[i] == key:
                            out[i]["adapter"] = payload
                            out[i]["info"].update(train_seconds=round(seconds, 4), batch=len(uniq),
                                                  loss_first=res.losses[0] if res.losses else None,
                                                  loss_last=res.losses[-1] if res.losses else None)
            return out  # type: ignore[return-value]

    def stats(self) -> dict[str, Any]:
        return {"cache_entries": len(self.cache), "cache_hits": self.hits, "trained": self.misses}
