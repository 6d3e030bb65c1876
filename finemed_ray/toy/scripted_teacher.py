"""TEST FIXTURE: a scripted OpenAI-compatible chat server on 127.0.0.1 (not for production use).

Tests, the synthesis-pipeline tests and the fixed-latency benchmark use it as a stand-in for a real teacher
endpoint. Replies come from a Python function the test gives, ``reply(messages) -> str``; the server counts
requests (in total and per request content), reports ``usage`` (whitespace token counts) and can inject
failures and latency::

    with ScriptedTeacherServer(lambda msgs: "echo " + msgs[-1]["content"], fail_first=2, fail_status=429,
                               retry_after=0.2) as srv:
        teacher = make_teacher(TeacherSpec(backend="http", model="scripted", base_url=srv.base_url))
        ...
        assert srv.request_count == 3
        assert srv.calls_for(messages_hash(messages)) == 3

Endpoints: ``POST /v1/chat/completions`` (also ``/chat/completions``) and ``GET /v1/models``. Built on the
standard library's ``ThreadingHTTPServer`` (one thread per connection, HTTP/1.1 keep-alive), so ``reply``
may block and a fixed ``delay_s`` costs no client-side CPU; it serves hundreds of concurrent connections.

Failure injection (all optional, all readable/settable while the server runs):

* ``fail_first=N`` + ``fail_status`` (default 500): the first N chat requests overall get that status;
  ``retry_after`` (seconds) adds a ``Retry-After`` header to those failures.
* ``fail_each=N``: every distinct request content fails its first N calls (deterministic per row under any
  concurrency), same status / Retry-After.
* ``disconnect_first=N``: the first N chat requests are answered by closing the connection (a transport
  error on the client).
* ``delay_s``: added latency (seconds) before every reply; ``delay_fn(messages) -> float`` per request.
* ``reply`` raising :class:`ScriptedError` answers with that status (a per-row error); any other exception
  becomes a 500 whose body names it.
* ``api_key``: when set, requests without ``Authorization: Bearer <api_key>`` get 401.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ReplyFn = Callable[[list[dict[str, Any]]], str]

__all__ = ["ScriptedError", "ScriptedTeacherServer", "messages_hash", "pipeline_reply", "whitespace_tokens"]


class ScriptedError(Exception):
    """Raise from ``reply`` to answer this request with ``status`` (and optional ``Retry-After``)."""

    def __init__(self, status: int, message: str = "scripted error", retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


def messages_hash(messages: list[dict[str, Any]]) -> str:
    """Stable hash of a request's messages (role + content only): the key of :meth:`calls_for`."""
    canon = [{"role": str(m.get("role")), "content": str(m.get("content"))} for m in messages]
    blob = json.dumps(canon, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def whitespace_tokens(text: str) -> int:
    return len(str(text).split())


def _default_reply(messages: list[dict[str, Any]]) -> str:
    return "echo: " + str(messages[-1].get("content", "")) if messages else "echo:"


class ScriptedTeacherServer:
    """A scripted OpenAI-compatible chat server (test fixture). Use as a context manager or start()/stop()."""

    def __init__(
        self,
        reply: ReplyFn | None = None,
        *,
        model: str = "scripted-teacher",
        fail_first: int = 0,
        fail_each: int = 0,
        fail_status: int = 500,
        retry_after: float | None = None,
        disconnect_first: int = 0,
        delay_s: float = 0.0,
        delay_fn: Callable[[list[dict[str, Any]]], float] | None = None,
        api_key: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        self.reply = reply or _default_reply
        self.model = model
        self.fail_first = fail_first
        self.fail_each = fail_each
        self.fail_status = fail_status
        self.retry_after = retry_after
        self.disconnect_first = disconnect_first
        self.delay_s = delay_s
        self.delay_fn = delay_fn
        self.api_key = api_key
        self._host = host
        self._port = port
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._conns: set[socket.socket] = set()
        self._thread: threading.Thread | None = None
        self.reset()

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> ScriptedTeacherServer:
        if self._server is not None:
            return self
        owner = self

        class Handler(_Handler):
            server_owner = owner

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 1024  # bursts of connects must not overflow the listen backlog
            allow_reuse_address = True

            def process_request(self, request: Any, client_address: Any) -> None:
                with owner._lock:
                    owner._conns.add(request)
                super().process_request(request, client_address)

            def shutdown_request(self, request: Any) -> None:
                with owner._lock:
                    owner._conns.discard(request)
                super().shutdown_request(request)

        self._server = Server((self._host, self._port), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="scripted-teacher", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        # Keep-alive connections outlive the listening socket: close them, so a stopped server is really down.
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> ScriptedTeacherServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------ introspection
    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("server not started")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """OpenAI-style base url, e.g. ``http://127.0.0.1:PORT/v1``."""
        return f"http://{self._host}:{self.port}/v1"

    @property
    def request_count(self) -> int:
        """Chat-completion requests received (failed and injected ones included)."""
        with self._lock:
            return self._total

    @property
    def success_count(self) -> int:
        with self._lock:
            return self._ok

    @property
    def max_in_flight(self) -> int:
        """The most chat requests that were being handled at the same time."""
        with self._lock:
            return self._max_in_flight

    def calls_for(self, content_hash: str) -> int:
        """Requests received whose messages hash (:func:`messages_hash`) to ``content_hash``."""
        with self._lock:
            return self._per_hash[content_hash]

    def calls_for_messages(self, messages: list[dict[str, Any]]) -> int:
        return self.calls_for(messages_hash(messages))

    @property
    def log(self) -> list[dict[str, Any]]:
        """One entry per chat request: hash, messages, status, authorization header, body, start/end times."""
        with self._lock:
            return list(self._log)

    def reset(self) -> None:
        """Clear the counters and the log (failure-injection settings stay)."""
        with self._lock:
            self._total = 0
            self._ok = 0
            self._in_flight = 0
            self._max_in_flight = 0
            self._per_hash: Counter[str] = Counter()
            self._log: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------------------ request logic
    def _admit(self, messages: list[dict[str, Any]]) -> tuple[int, str, dict[str, Any]]:
        h = messages_hash(messages)
        with self._lock:
            self._total += 1
            self._per_hash[h] += 1
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
            entry = {"hash": h, "messages": messages, "t_start": time.monotonic(), "n": self._total}
            self._log.append(entry)
            return self._total, h, entry

    def _finish(self, entry: dict[str, Any], status: int) -> None:
        with self._lock:
            self._in_flight -= 1
            entry["status"] = status
            entry["t_end"] = time.monotonic()
            if status == 200:
                self._ok += 1


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms Nagle/delayed-ACK stalls
    server_owner: ScriptedTeacherServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass

    def _send_json(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, retry_after: float | None = None) -> None:
        headers = {"Retry-After": _fmt_seconds(retry_after)} if retry_after is not None else None
        kind = "rate_limit_error" if status == 429 else "server_error" if status >= 500 else "invalid_request_error"
        self._send_json(status, {"error": {"message": message, "type": kind, "code": status}}, headers)

    def do_GET(self) -> None:  # noqa: N802
        owner = self.server_owner
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            self._send_json(200, {"object": "list", "data": [{"id": owner.model, "object": "model"}]})
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self) -> None:  # noqa: N802
        owner = self.server_owner
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if self.path.rstrip("/") not in ("/v1/chat/completions", "/chat/completions"):
            self._error(404, f"no route {self.path}")
            return
        try:
            body = json.loads(raw or b"{}")
            messages = body["messages"]
            if not isinstance(messages, list):
                raise TypeError("messages must be a list")
        except (ValueError, KeyError, TypeError) as exc:
            self._error(400, f"bad request body: {exc}")
            return

        n, h, entry = owner._admit(messages)
        entry["authorization"] = self.headers.get("Authorization")
        entry["body"] = body
        status = 500
        try:
            if owner.api_key is not None and self.headers.get("Authorization") != f"Bearer {owner.api_key}":
                status = 401
                self._error(401, "invalid or missing API key")
                return
            if n <= owner.disconnect_first:
                status = -1  # no response: drop the connection
                self.close_connection = True
                self.connection.shutdown(2)
                return
            if n <= owner.fail_first or owner.calls_for(h) <= owner.fail_each:
                status = owner.fail_status
                self._error(status, f"injected failure {n}", owner.retry_after)
                return
            delay = owner.delay_fn(messages) if owner.delay_fn is not None else owner.delay_s
            if delay:
                time.sleep(delay)
            try:
                text = owner.reply(messages)
            except ScriptedError as exc:
                status = exc.status
                self._error(status, exc.message, exc.retry_after)
                return
            except Exception as exc:  # noqa: BLE001 - a broken reply fn is a 500, as a real server would answer
                status = 500
                self._error(500, f"reply function failed: {type(exc).__name__}: {exc}")
                return
            text = str(text)
            finish = "stop"
            max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
            words = text.split()
            if isinstance(max_tokens, int) and max_tokens > 0 and len(words) > max_tokens:
                text, finish = " ".join(words[:max_tokens]), "length"
            prompt_tokens = sum(whitespace_tokens(m.get("content") or "") for m in messages)
            completion_tokens = whitespace_tokens(text)
            status = 200
            self._send_json(
                200,
                {
                    "id": f"chatcmpl-scripted-{n}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body.get("model", owner.model),
                    "choices": [
                        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                    ],
                    "usage": {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": completion_tokens,
                        "total_tokens": prompt_tokens + completion_tokens,
                    },
                },
            )
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass  # the client went away (e.g. its timeout fired)
        finally:
            owner._finish(entry, status)


def _fmt_seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _h(s: str) -> int:
    return int(hashlib.sha256(s.encode()).hexdigest()[:8], 16)


def pipeline_reply(messages: list[dict[str, Any]], planted: frozenset[str] | set[str] = frozenset()) -> str:
    """Deterministic teacher behaviour for every prompt of the synthesis pipeline (recognised by its wording in
    finemed_ray/synth/prompts.py), derived from a hash of the text: about 1 in 5 texts gets a primary label outside
    the taxonomy, 1 in 7 malformed question JSON, 1 in 11 questions mention source-specific details, and scores
    spread over the common/complex split. Texts in ``planted`` (benchmark questions planted in a seed corpus)
    always get well-formed replies, so they reach the decontamination step."""
    user = messages[-1]["content"]
    text = user.split("<text>")[-1].split("</text>")[0].strip() if "<text>" in user else user
    words = text.split()
    planted = text in planted
    if "primary clinical department" in user:
        if "chorioamnionitis" in text:
            return "Obstetrics and Gynecology."  # normalises to the label
        return "Internal Medicine" if planted or _h(text) % 5 else "Cardiology clinic"  # not a primary label
    if "sub-departments" in user:
        if '"Obstetrics' in user:
            return "Obstetrics"
        return "Endocrinology"
    if "different questions" in user:
        if _h(text) % 7 == 0 and not planted:
            return "Sure! Here are the questions: {questions: [oops"  # malformed JSON
        return json.dumps({"questions": [
            f"What does the evidence say about {' '.join(words[3:10])}?",
            f"How should clinicians manage {' '.join(words[10:16])} in practice?"]})
    if "mentions_specific_details" in user or "complexity" in user:
        q = user.split("<question>")[-1].split("</question>")[0] if "<question>" in user else user
        h = _h(q)
        return json.dumps({"quality": 5 + h % 5, "complexity": 4 + h % 7, "relevance": 1 + h % 6,
                           "mentions_specific_details": h % 11 == 0 and not planted})
    if "follow-up question" in user:
        return "What should I watch out for next?"
    if "Write the doctor's answer" in user:
        return f"In practice, watch for {' '.join(words[:6])}."
    if "Summarization" in user and "Thought" in user:
        return f"## Thought\nStep 1: recall {' '.join(words[:30])}.\nStep 2: weigh it.\n## Summarization\nIn short: {' '.join(words[:12])}."
    if "<answer_A>" in user:
        return json.dumps({"choice": "B"})
    if "short, direct answer" in user:
        return f"Briefly: {' '.join(words[:8])}."
    return f"In practice, {' '.join(words[:30])}."
