"""The Ray Serve application: an OpenAI-compatible FastAPI ingress, autoscaled engine replicas, a TTT trainer.

    ingress (FastAPI: auth, limits, validation, SSE)  ->  engine (vLLM AsyncLLM | transformers + @serve.batch)
                                                   \\->  TTT trainer (index + adapter training, cached adapters)

A TTT request (``extra_body={"ttt": {...}}`` or model ``<id>:ttt``) first gets an adapter from the TTT deployment
(retrieval + a fresh LoRA, or a cached one for the same neighbour set), then the engine answers through that
adapter; plain requests go straight to the engine. The response carries ``ttt``: neighbours, distances, training
time, cache hit. Every client error is a 4xx with OpenAI's error JSON (the body and header rules: the docstring of
``finemed_ray.serving.protocol``); anything unexpected is a 500 whose body names no internals (the trace goes to the
replica log).

A replica that dies or becomes unreachable under a request (``RayActorError``: killed, OOM, node lost) is not a 500:
a call that has sent nothing to the client yet (every non-streaming request; a stream before its first engine event;
a TTT adaptation) is retried ``Ingress.ENGINE_RETRIES`` times with a short backoff, and Serve routes the retry to a
live replica (it drops a dead one from its routing on the first ``ActorDiedError``); a response that needed retries
carries ``X-Engine-Retries: N``. When the retries are spent, or Serve reports the deployment unavailable or
overloaded, the answer is a 503 with ``Retry-After`` and OpenAI's error JSON (``type: service_unavailable_error``,
``code: engine_unavailable``). A stream that breaks after its first event cannot be replayed: it ends with that error
as an in-band ``data:`` event.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models`` (API key when configured),
``GET /health`` (liveness: the ingress answers), ``GET /ready`` (readiness: 200 once the engine has answered a 1-token
warm-up generation, 503 + Retry-After before), ``GET /openapi.json`` (the request bodies as the protocol models).
The request handling is :class:`Ingress` (no Ray in it) behind :func:`create_app`; the Serve deployment builds one per
replica, tests use fake engine handles.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import time
import uuid
from typing import Any

from fastapi import Request  # module level: route annotations are strings (PEP 563) resolved in this namespace

from finemed_ray.serving.config import ServeConfig, check_model_id
from finemed_ray.serving.engines import GenRequest, GenResult, coalesce
from finemed_ray.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    chat_response,
    completion_response,
    new_id,
    openapi_schemas,
    parse_request,
    usage,
)

log = logging.getLogger(__name__)
TTT_SUFFIX = ":ttt"


# ================================================================================================ engine
def _engine_deployment():
    from ray import serve

    @serve.deployment
    class EngineDeployment:
        def __init__(self, cfg: dict[str, Any]):
            from finemed_ray.serving.engines import HFEngine, VLLMEngine

            m = cfg["model"]
            self.kind = m["engine"]
            self.stream_interval_s = cfg["tuning"]["stream_interval_ms"] / 1000
            device = m["device"]
            if device == "auto":
                import torch

                device = "gpu" if torch.cuda.is_available() else "cpu"
            if self.kind == "hf":
                self.engine = HFEngine(m["path"], dtype=m["dtype"], onednn_linear=m["onednn_linear"])
                b = cfg["batching"]
                self._hf_batch.set_max_batch_size(b["max_batch_size"])
                self._hf_batch.set_batch_wait_timeout_s(b["batch_wait_timeout_s"])
            else:
                t = cfg["ttt"]
                self.engine = VLLMEngine(
                    m["path"], dtype=m["dtype"], max_model_len=m["max_model_len"], device=device,
                    enable_lora=t["enabled"], adapters_in_flight=t["max_adapters_in_flight"],
                    max_lora_rank=t["adapt"]["r"], engine_kwargs=m["engine_kwargs"])

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
        async def _hf_batch(self, reqs: list[GenRequest]) -> list[GenResult]:
            return await self.engine.generate_batch(reqs)

        async def generate(self, req: GenRequest) -> GenResult:
            if self.kind == "hf":
                return await self._hf_batch(req)
            return await self.engine.generate(req)

        async def stream(self, req: GenRequest):
            # One yield is one Ray object (or gRPC message) to the ingress: tokens are sent in chunks (the first at
            # once, then one chunk per stream_interval_ms), not one object per token.
            async for event in coalesce(self._events(req), self.stream_interval_s):
                yield event

        async def _events(self, req: GenRequest):
            if self.kind == "hf":  # generated in a batch, then sent piece by piece
                res = await self._hf_batch(req)
                for piece in re.findall(r"\s*\S+|\s+$", res.text):
                    yield {"delta": piece}
                yield {"finish_reason": res.finish_reason, "prompt_tokens": res.prompt_tokens,
                       "completion_tokens": res.completion_tokens}
                return
            async for event in self.engine.stream(req):
                yield event

    return EngineDeployment


def _ttt_deployment():
    from ray import serve

    @serve.deployment
    class TTTDeployment:
        def __init__(self, cfg: dict[str, Any]):
            from finemed_ray.serving.ttt_service import TTTService
            from finemed_ray.ttt.adapt import TTTConfig

            t = cfg["ttt"]
            self.service = TTTService(cfg["model"]["path"], t["index"], TTTConfig(**t["adapt"]), t["cache_size"])
            self.adapt.set_max_batch_size(t["adapt"]["batch_questions"])

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
        async def adapt(self, queries: list[tuple[str, int | None, int | None]]) -> list[dict[str, Any]]:
            import asyncio

            return await asyncio.to_thread(self.service.adapt_many, queries)

        def stats(self) -> dict[str, Any]:
            return self.service.stats()

    return TTTDeployment


# ================================================================================================ engine failures
LOST, UNAVAILABLE = "lost", "unavailable"


def engine_failure(exc: BaseException) -> str | None:
    """How a failed deployment call failed: ``LOST`` (the replica died or cannot be reached: nothing came back, a retry
    goes to another replica), ``UNAVAILABLE`` (Serve refuses the call: the deployment is gone or over its queue
    limit; retrying now would not help) or None (the engine raised: a bug or a bad request, not retried)."""
    from ray.exceptions import RayActorError, RayTaskError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

    if isinstance(exc, (RayActorError, ReplicaUnavailableError)):
        return LOST
    if isinstance(exc, RayTaskError) and isinstance(getattr(exc, "cause", None), RayActorError):
        return LOST  # a chained call whose callee died
    if isinstance(exc, (BackPressureError, DeploymentUnavailableError)):
        return UNAVAILABLE
    return None


# ================================================================================================ ingress
class Ingress:
    """What the ingress does per request, free of Ray: auth, body limits and validation, the engine call, SSE.

    ``engine`` and ``ttt`` are deployment handles (``engine.generate.remote(req)``,
    ``engine.options(stream=True).stream.remote(req)``, ``ttt.adapt.remote(...)``); ``tokenizer`` counts prompt
    tokens. :func:`create_app` puts it behind FastAPI routes; the Serve deployment builds one per replica. Tests use
    fakes for all three."""

    READY_WAIT_S = 2.0  # a readiness check waits this long for the warm-up generation before answering 503
    READY_RETRY_S = 5.0  # a failed warm-up is retried by the next check after this long (also Retry-After)
    ENGINE_RETRIES = 2  # retries of a call whose replica died before it answered (Serve picks a live replica)
    RETRY_BACKOFF_S = (0.25, 1.0)  # wait before retry 1, 2, ...
    UNAVAILABLE_RETRY_AFTER_S = 5  # Retry-After of the 503 when the retries are spent

    def __init__(self, cfg: ServeConfig, engine: Any, ttt: Any, api_key: str | None, tokenizer: Any,
                 plain_engine: Any = None):
        self.cfg = cfg
        self.engine = engine
        # Handle for requests without an adapter (the deployment passes one that calls over gRPC); TTT requests,
        # whose adapter tensors can be megabytes, go through ``engine`` (Ray's object store).
        self.plain_engine = plain_engine if plain_engine is not None else engine
        self.ttt = ttt
        self.api_key = api_key
        self.tokenizer = tokenizer
        self.created = int(time.time())
        self._ready = False
        self._warmup: Any = None  # asyncio.Task of the warm-up generation
        self._warmup_at = 0.0
        self._warmup_error: str | None = None

    def _count_tokens(self, req: GenRequest) -> int:
        """Render and tokenise the prompt (once: the ids travel in ``req.prompt_token_ids`` and the engine uses them
        as they are) and return its length."""
        from finemed_ray.serving.engines import prompt_ids

        try:
            req.prompt_token_ids = list(prompt_ids(self.tokenizer, req))
            return len(req.prompt_token_ids)
        except Exception as e:
            from jinja2 import TemplateError

            if isinstance(e, TemplateError):  # the model's chat template refuses these messages (roles, order)
                raise APIError(400, f"messages cannot be rendered with the model's chat template: {e}",
                               param="messages") from None
            raise

    # ------------------------------------------------------------------------------------ checks
    def auth(self, request: Request) -> None:
        if not self.api_key:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        if not token or not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise APIError(401, "missing or invalid API key (Authorization: Bearer <key>)", "authentication_error",
                           code="invalid_api_key")

    @staticmethod
    def media(request: Request) -> None:
        """415 unless the body is plain JSON: ``Content-Type`` application/json (charset utf-8 if named; a missing
        header is accepted) and no ``Content-Encoding`` but identity."""
        ctype = request.headers.get("content-type")
        if ctype is not None:
            media, *params = (p.strip() for p in ctype.split(";"))
            charsets = [v.strip().strip('"').lower() for k, _, v in (p.partition("=") for p in params)
                        if k.strip().lower() == "charset"]
            if media.lower() != "application/json" or any(c not in ("utf-8", "utf8") for c in charsets):
                raise APIError(415, f"Content-Type must be application/json (UTF-8), got {ctype[:100]!r}",
                               code="unsupported_media_type")
        encoding = request.headers.get("content-encoding")
        if encoding is not None and encoding.strip().lower() not in ("", "identity"):
            raise APIError(415, f"Content-Encoding {encoding[:100]!r} is not supported: send the JSON body "
                           "uncompressed", code="unsupported_media_type")

    async def body(self, request: Request, model_cls: type) -> Any:
        """Auth, the size limit, then :func:`finemed_ray.serving.protocol.parse_request` (its docstring has the
        rules)."""
        self.auth(request)
        self.media(request)
        limit = self.cfg.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body of {declared} bytes exceeds the limit of {limit}")
        raw = await request.body()
        if len(raw) > limit:
            raise APIError(413, f"request body of {len(raw)} bytes exceeds the limit of {limit}")
        return parse_request(raw, model_cls)

    def _model(self, model: str, ttt_opts: Any) -> tuple[bool, dict | None]:
        base, wants_ttt = (model[: -len(TTT_SUFFIX)], True) if model.endswith(TTT_SUFFIX) else (model, False)
        try:
            check_model_id(base)
        except ValueError as e:
            raise APIError(400, str(e), param="model") from None
        if base != self.cfg.model.id:
            raise APIError(404, f"model {model!r} does not exist; GET /v1/models lists the served models",
                           param="model", code="model_not_found")
        wants_ttt = wants_ttt or ttt_opts is not None
        if not wants_ttt:
            return False, None
        t = self.cfg.ttt
        if not t.enabled:
            raise APIError(400, "ttt: test-time training is not enabled on this server (asked for with the 'ttt' "
                           f"field or the model id '{base}{TTT_SUFFIX}')", param="ttt")
        k = ttt_opts.k if ttt_opts and ttt_opts.k is not None else t.adapt.k
        steps = ttt_opts.steps if ttt_opts and ttt_opts.steps is not None else t.adapt.steps
        if k > t.max_k:
            raise APIError(400, f"ttt.k={k} exceeds the limit of {t.max_k}", param="ttt.k")
        if steps > t.max_steps:
            raise APIError(400, f"ttt.steps={steps} exceeds the limit of {t.max_steps}", param="ttt.steps")
        return True, {"k": k, "steps": steps}

    async def gen_request(self, body: Any, chat: bool) -> tuple[GenRequest, dict | None]:
        lim = self.cfg.limits
        n = body.choices()
        if n > lim.max_n:
            raise APIError(400, f"n={n} exceeds the limit of {lim.max_n}", param="n")
        if n != 1:  # GenRequest has no n: the engines return one choice per request
            raise APIError(400, f"n={n} is not supported: this server returns one choice per request", param="n")
        max_tokens = body.wanted_tokens(min(256, lim.max_tokens))
        if max_tokens > lim.max_tokens:
            field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
            raise APIError(400, f"{field}={max_tokens} exceeds the limit of {lim.max_tokens}", param=field)
        if chat:
            if len(body.messages) > lim.max_messages:
                raise APIError(400, f"{len(body.messages)} messages exceed the limit of {lim.max_messages}",
                               param="messages")
            chars = sum(len(m.content) for m in body.messages)
        else:
            chars = len(body.prompt)
        if chars > lim.max_prompt_chars:
            field = "messages" if chat else "prompt"
            raise APIError(400, f"{field}: {chars} characters of prompt exceed the limit of {lim.max_prompt_chars}",
                           param=field)
        ttt, ttt_args = self._model(body.model, body.ttt)
        temperature, top_p = body.sampling()
        req = GenRequest(
            request_id=new_id("req"),
            messages=[{"role": m.role, "content": m.content} for m in body.messages] if chat else None,
            prompt=None if chat else body.prompt, max_tokens=max_tokens, temperature=temperature,
            top_p=top_p, stop=body.stops(), seed=body.seed, ignore_eos=bool(body.ignore_eos))
        n_prompt = self._count_tokens(req)
        if n_prompt + max_tokens > self.cfg.model.max_model_len:
            raise APIError(400, f"prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                           f"context of {self.cfg.model.max_model_len} tokens", param="max_tokens",
                           code="context_length_exceeded")
        info = None
        if ttt:
            question = (next(m.content for m in reversed(body.messages) if m.role == "user")
                        if chat else body.prompt)
            got, _ = await self._retrying(lambda: self.ttt.adapt.remote((question, ttt_args["k"], ttt_args["steps"])),
                                          "TTT adaptation", req.request_id)
            req.adapter = got["adapter"]
            info = got["info"]
        return req, info

    # ------------------------------------------------------------------------------------ replica failures
    def unavailable(self, what: str, exc: BaseException, attempts: int | None = None) -> APIError:
        """The 503 for a call whose replica was lost (``attempts`` made) or, ``attempts`` None, for a stream that
        broke after ``what`` (the cause goes to the log with a reference, not to the client)."""
        ref = uuid.uuid4().hex[:12]
        log.warning("%s: engine unavailable (reference %s): %s: %s", what, ref, type(exc).__name__,
                    (str(exc).splitlines() or [""])[0])
        after = self.UNAVAILABLE_RETRY_AFTER_S
        if attempts is None:
            msg = (f"the model replica serving this stream became unavailable after {what}; the answer is "
                   f"incomplete: retry the request (reference {ref})")
        else:
            msg = (f"the model is temporarily unavailable: no replica answered the {what} after {attempts} "
                   f"attempt(s); retry in {after} s (reference {ref})")
        return APIError(503, msg, "service_unavailable_error", code="engine_unavailable",
                        headers={"Retry-After": str(after)})

    async def _retrying(self, call: Any, what: str, request_id: str) -> tuple[Any, int]:
        """``await call()``, again (on a live replica, Serve's choice) while the replica it went to is lost; returns
        (result, retries). Spent retries or an unavailable deployment: :meth:`unavailable` (503)."""
        attempt = 0
        while True:
            try:
                return await call(), attempt
            except Exception as e:
                kind = engine_failure(e)
                if kind is None:
                    raise
                if kind == UNAVAILABLE or attempt >= self.ENGINE_RETRIES:
                    raise self.unavailable(what, e, attempt + 1) from None
                log.warning("%s of %s: replica lost (%s); retry %d of %d", what, request_id, type(e).__name__,
                            attempt + 1, self.ENGINE_RETRIES)
                await asyncio.sleep(self.RETRY_BACKOFF_S[min(attempt, len(self.RETRY_BACKOFF_S) - 1)])
                attempt += 1

    async def _open_stream(self, req: GenRequest) -> tuple[Any, Any, int]:
        """Start the engine stream and wait for its first event, retried like a non-streaming call (the client has
        been sent nothing yet): (first event or None, the stream, retries)."""
        holder: dict[str, Any] = {}

        async def first():
            holder["gen"] = gen = self._engine_for(req).options(stream=True).stream.remote(req)
            try:
                return await gen.__anext__()
            except StopAsyncIteration:
                return None

        event, retries = await self._retrying(first, "generation", req.request_id)
        return event, holder["gen"], retries

    # ------------------------------------------------------------------------------------ readiness
    async def ready(self) -> tuple[bool, str]:
        """True once the engine has answered one generation (a 1-token warm-up, started by the first check and
        shared by concurrent ones; cached once it succeeded; a failed one is retried after READY_RETRY_S)."""
        import asyncio

        if self._ready:
            return True, "ready"
        now = time.monotonic()
        if (self._warmup is None or self._warmup.get_loop() is not asyncio.get_running_loop()
                or (self._warmup.done() and now - self._warmup_at >= self.READY_RETRY_S)):
            self._warmup_at = now
            self._warmup = asyncio.ensure_future(self._warm_up())
        try:
            await asyncio.wait_for(asyncio.shield(self._warmup), self.READY_WAIT_S)
        except asyncio.TimeoutError:
            pass
        if self._ready:
            return True, "ready"
        return False, self._warmup_error or "the engine has not answered its warm-up generation yet"

    async def _warm_up(self) -> None:
        try:
            await self.engine.generate.remote(GenRequest(request_id=new_id("ready"), prompt="Hello", max_tokens=1,
                                                         temperature=0.0))
        except Exception:
            ref = uuid.uuid4().hex[:12]
            log.exception("warm-up generation failed (reference %s)", ref)
            self._warmup_error = f"the engine's warm-up generation failed (reference {ref}); retrying"
            return
        self._ready = True

    # ------------------------------------------------------------------------------------ endpoints
    def models(self, request: Request) -> dict[str, Any]:
        self.auth(request)
        ids = [self.cfg.model.id] + ([self.cfg.model.id + TTT_SUFFIX] if self.cfg.ttt.enabled else [])
        return {"object": "list", "data": [{"id": i, "object": "model", "created": self.created,
                                            "owned_by": "finemed-ray"} for i in ids]}

    async def chat(self, request: Request):
        return await self._complete(request, ChatCompletionRequest, chat=True)

    async def completions(self, request: Request):
        return await self._complete(request, CompletionRequest, chat=False)

    async def _complete(self, request: Request, model_cls: type, chat: bool):
        from fastapi.responses import JSONResponse, StreamingResponse

        body = await self.body(request, model_cls)
        req, info = await self.gen_request(body, chat=chat)
        if body.streaming():
            first, gen, retries = await self._open_stream(req)
            return StreamingResponse(self._sse(first, gen, body.model, chat, info, body.include_usage()),
                                     media_type="text/event-stream", headers=self._retry_header(retries))
        res: GenResult
        res, retries = await self._retrying(lambda: self._engine_for(req).generate.remote(req), "generation",
                                            req.request_id)
        respond = chat_response if chat else completion_response
        return JSONResponse(respond(body.model, res.text, res.finish_reason, res.prompt_tokens, res.completion_tokens,
                                    info), headers=self._retry_header(retries))

    def _engine_for(self, req: GenRequest) -> Any:
        return self.engine if req.adapter is not None else self.plain_engine

    @staticmethod
    def _retry_header(retries: int) -> dict[str, str] | None:
        return {"X-Engine-Retries": str(retries)} if retries else None

    async def _sse(self, first: dict | None, gen: Any, model: str, chat: bool, info: dict | None,
                   include_usage: bool):
        cid = new_id("chatcmpl" if chat else "cmpl")
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: dict | str | None, finish: str | None) -> str:
            if chat:
                choice = {"index": 0, "delta": delta or {}, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            payload = {"id": cid, "object": obj, "created": created, "model": model, "choices": [choice]}
            if info is not None:
                payload["ttt"] = info
            return f"data: {json.dumps(payload)}\n\n"

        async def events():
            if first is not None:
                yield first
            async for event in gen:
                yield event

        sent = 0
        try:
            if chat:
                yield chunk({"role": "assistant", "content": ""}, None)
            async for event in events():
                sent += 1
                # An event is a chunk of text, the finish, or both (the engine sends tokens in chunks): one write.
                out = []
                if event.get("delta"):
                    out.append(chunk({"content": event["delta"]} if chat else event["delta"], None))
                if "finish_reason" in event:
                    out.append(chunk({} if chat else "", event["finish_reason"]))
                    if include_usage:
                        out.append("data: " + json.dumps({"id": cid, "object": obj, "created": created,
                                                          "model": model, "choices": [],
                                                          "usage": usage(event["prompt_tokens"],
                                                                         event["completion_tokens"])}) + "\n\n")
                if out:
                    yield "".join(out)
            yield "data: [DONE]\n\n"
        except Exception as e:  # headers are sent: report in-band, without internals
            if engine_failure(e) is not None:  # the replica died mid-stream: what was sent cannot be taken back
                err = self.unavailable(f"{sent} event(s)", e)
            else:
                ref = uuid.uuid4().hex[:12]
                log.exception("stream error %s", ref)
                err = APIError(500, f"internal error (reference {ref})", "server_error")
            yield "data: " + json.dumps(err.body()) + "\n\n"


def _body_of(name: str) -> dict[str, Any]:
    """``openapi_extra`` of a route that reads its body itself: the JSON body is the protocol model ``name``."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}}


def create_app(ingress: Ingress):
    """The FastAPI app of one ingress replica: routes call ``ingress``; every error is OpenAI's error JSON.

    Routes read their bodies themselves (size limit before parsing, a nesting-depth limit, strict validation: see
    ``finemed_ray.serving.protocol``); ``/openapi.json`` describes those bodies through ``openapi_extra`` and the
    protocol models' JSON schemas in ``components.schemas``."""
    from fastapi import FastAPI
    from fastapi.openapi.utils import get_openapi
    from fastapi.responses import JSONResponse

    app = FastAPI(title="finemed-ray", version="1", docs_url=None, redoc_url=None, openapi_url="/openapi.json")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(404)
    async def _not_found(request: Request, exc: Exception):
        return JSONResponse(APIError(404, f"no route {request.method} {request.url.path}", "not_found_error").body(),
                            status_code=404)

    @app.exception_handler(405)
    async def _method(request: Request, exc: Exception):
        return JSONResponse(APIError(405, f"method {request.method} not allowed on {request.url.path}").body(),
                            status_code=405)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        ref = uuid.uuid4().hex[:12]
        log.exception("internal error %s on %s", ref, request.url.path)  # the trace stays in the replica log
        return JSONResponse(APIError(500, f"internal error (reference {ref})", "server_error").body(),
                            status_code=500)

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: the ingress answers (the engine may still be loading)."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        """Readiness: 200 once the engine has answered a (1-token warm-up) generation; 503 with Retry-After
        before."""
        ok, detail = await ingress.ready()
        if ok:
            return {"status": "ready"}
        return JSONResponse(APIError(503, detail, "service_unavailable_error", code="not_ready").body(),
                            status_code=503, headers={"Retry-After": str(int(ingress.READY_RETRY_S))})

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        return ingress.models(request)

    @app.post("/v1/chat/completions", openapi_extra=_body_of("ChatCompletionRequest"))
    async def chat(request: Request):
        return await ingress.chat(request)

    @app.post("/v1/completions", openapi_extra=_body_of("CompletionRequest"))
    async def completions(request: Request):
        return await ingress.completions(request)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            doc.setdefault("components", {}).setdefault("schemas", {}).update(openapi_schemas())
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _ingress_deployment():
    from ray import serve

    # The app is built on the replica, after __init__ (Serve's late-bound ingress: `serve.ingress()` without an app
    # calls `__serve_build_asgi_app__`), so its routes are plain functions over this replica's Ingress.
    @serve.deployment
    @serve.ingress()
    class OpenAIIngress:
        def __init__(self, cfg: dict[str, Any], engine: Any, ttt: Any, api_key: str | None):
            from finemed_ray.models.loading import load_tokenizer

            config = ServeConfig.model_validate(cfg)
            # Prompt length is checked here, not with a round trip to the engine: one RPC less per request.
            # Plain requests go to the engine over gRPC when tuned for throughput (what RAY_SERVE_USE_GRPC_BY_DEFAULT
            # does for every handle): no object-store object per request or streamed chunk.
            plain = engine.options(_by_reference=False) if config.tuning.throughput_optimized else None
            self.ingress = Ingress(config, engine, ttt, api_key, load_tokenizer(config.model.path), plain_engine=plain)

        def __serve_build_asgi_app__(self):
            return create_app(self.ingress)

    return OpenAIIngress


# ================================================================================================ building
def resolve_api_key(cfg: ServeConfig) -> str | None:
    if cfg.security.api_key:
        return cfg.security.api_key
    if cfg.security.api_key_env:
        return os.environ.get(cfg.security.api_key_env) or None
    return None


# What RAY_SERVE_THROUGHPUT_OPTIMIZED=1 sets (ray/serve/_private/constants.py, Ray 2.60) that a replica reads at
# start-up, so it can be set per deployment through its runtime_env on any cluster. The rest of that flag needs the
# variable in the controller and proxies (direct ingress: ingress replicas serve HTTP themselves) or is applied per
# handle instead (gRPC between deployments: ``_by_reference=False`` in the ingress).
SERVE_THROUGHPUT_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",  # user code on the replica's main loop: no loop hop per call
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",  # the handle router (ingress -> engine) on that loop too
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",  # access-log lines buffered, not flushed one by one
    "RAY_SERVE_LOG_TO_STDERR": "0",  # replica logs go to their files only
    "RAY_SERVE_FREEZE_GC_ON_STARTUP": "1",  # gc.freeze() after the constructor: the model is not rescanned
}


def _actor_options(cfg: ServeConfig, **options: Any) -> dict[str, Any]:
    if cfg.tuning.throughput_optimized:
        # Serve merges these env_vars with the application's runtime_env (theirs kept, ours added).
        options["runtime_env"] = {"env_vars": dict(SERVE_THROUGHPUT_ENV)}
    return options


def build_app(cfg: ServeConfig):
    """The bound application (engine, optional TTT trainer, ingress) for ``serve.run`` / ``serve run``."""
    d = cfg.model_dump(mode="json")
    res, a = cfg.resources, cfg.autoscaling
    engine = _engine_deployment().options(
        name="engine",
        autoscaling_config={"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                            "target_ongoing_requests": a.target_ongoing_requests,
                            "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s,
                            "initial_replicas": a.initial_replicas if a.initial_replicas is not None
                            else max(1, a.min_replicas)},
        max_ongoing_requests=a.max_ongoing_requests,
        ray_actor_options=_actor_options(cfg, num_cpus=res.engine_num_cpus, num_gpus=res.engine_num_gpus),
    ).bind(d)
    ttt = None
    if cfg.ttt.enabled:
        ttt = _ttt_deployment().options(
            name="ttt", num_replicas=cfg.ttt.replicas,
            ray_actor_options=_actor_options(cfg, num_cpus=cfg.ttt.num_cpus, num_gpus=cfg.ttt.num_gpus),
        ).bind(d)
    return _ingress_deployment().options(
        name="ingress", num_replicas=res.ingress_replicas, max_ongoing_requests=res.ingress_max_ongoing_requests,
        ray_actor_options=_actor_options(cfg, num_cpus=res.ingress_num_cpus),
    ).bind(d, engine, ttt, resolve_api_key(cfg))
