"""OpenAI-compatible request/response models and the OpenAI error shape (what the unmodified ``openai`` client sends
and parses). Only the fields we honour are declared; unknown top-level fields are accepted and ignored, as OpenAI
does, except inside ``ttt``, which is ours and strict."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class APIError(Exception):
    """An error for the client: HTTP status + OpenAI error JSON (never a stack trace)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class TTTOptions(BaseModel):
    """``extra_body={"ttt": {"k": 3, "steps": 1}}``: adapt to this request's neighbours before answering."""

    model_config = ConfigDict(extra="forbid")
    k: int | None = Field(None, ge=1, description="Neighbours to retrieve.")
    steps: int | None = Field(None, ge=0, description="Optimizer steps on them.")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, v: Any) -> Any:
        # The OpenAI client may send content as a list of {"type": "text", "text": ...} parts.
        if isinstance(v, list):
            texts = []
            for part in v:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts are supported")
                texts.append(part["text"])
            return "".join(texts)
        return v


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    ttt: TTTOptions | None = None
    stream_options: StreamOptions | None = None

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def wanted_tokens(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str:
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("exactly one prompt per request is supported")
            v = v[0]
        if not v:
            raise ValueError("prompt is empty")
        return v


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int,
                  ttt: dict | None) -> dict[str, Any]:
    out = {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model,
           "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
           "usage": usage(prompt_tokens, completion_tokens)}
    if ttt is not None:
        out["ttt"] = ttt
    return out


def completion_response(model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int,
                        ttt: dict | None) -> dict[str, Any]:
    out = {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model,
           "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
           "usage": usage(prompt_tokens, completion_tokens)}
    if ttt is not None:
        out["ttt"] = ttt
    return out
