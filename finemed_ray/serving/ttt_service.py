"""The TTT trainer behind serving: question -> neighbours from the index -> a fresh LoRA adapter -> its tensors.

Its own deployment (own replicas, own copy of the weights for training), so adaptation never runs on the model an
engine is serving from: an engine only ever *applies* adapters, per request, and plain requests are untouched.
Concurrent requests are adapted together (``@serve.batch`` in the deployment -> one :func:`adapt_lora` call, one
adapter per question). Adapters are cached by a hash of (neighbour ids, adaptation settings): the same or a
similar question that retrieves the same neighbours reuses the adapter without training.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from typing import Any

from finemed_ray.ttt.adapt import TTTConfig, adapt_lora


class TTTService:
    def __init__(self, model_path: str, index_uri: str, defaults: TTTConfig, cache_size: int = 64):
        from finemed_ray.models.loading import load_model, load_tokenizer
        from finemed_ray.ttt.index import load_index_and_encoder

        self.model_path = model_path
        self.tokenizer = load_tokenizer(model_path)
        self.model = load_model(model_path, dtype="float32").eval()
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
                res = adapt_lora(self.model, self.tokenizer, [k for k, _ in uniq],
                                 [neighbours[i][: cfg.k] for _, i in uniq], cfg)
                seconds = time.time() - t1
                for slot, (key, _) in enumerate(uniq):
                    payload = res.lora.payload(slot, f"ttt-{key}", base_model_name=self.model_path)
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
