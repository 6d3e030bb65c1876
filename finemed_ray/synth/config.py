"""Typed config of the synthesis job (``configs/synth_*.yaml``); every field's description is its documentation."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import ConfigDict, Field, ValidationError, model_validator

from finemed_ray.config import StrictModel, validate
from finemed_ray.errors import ConfigError

# The teacher-calling steps, in pipeline order. `teachers.steps` maps each to a named teacher.
TEACHER_STEPS = (
    "classify_primary",
    "classify_secondary",
    "generate_questions",
    "score_questions",
    "answer_common",
    "judge",
    "answer_complex",
    "follow_up",
    "direct_answer",
)


# ------------------------------------------------------------------------------------------------ teachers
# The one type describing a teacher LLM: the YAML schema of `teachers.models.<name>` (synthesis) and `engine`
# (evaluation), and what `finemed_ray.synth.teachers.make_teacher` and the synthesis engines take. Runtime-only
# things (the API key itself, the engine actors) are arguments of the teachers, never fields here.
class _Extra(StrictModel):
    model_config = ConfigDict(frozen=True)


class HttpExtra(_Extra):
    """``extra`` keys of the http backend."""

    num_workers: int = Field(2, ge=1, description="Ray Data tasks at a time in map_dataset.")
    worker_num_cpus: float = Field(0.25, gt=0, description="Logical CPUs per map_dataset worker (I/O bound).")
    backoff_base_s: float = Field(0.5, ge=0, description="First retry waits ~this long, doubling each retry.")
    backoff_max_s: float = Field(30.0, ge=0, description="Cap on one backoff wait.")
    retry_after_max_s: float = Field(120.0, ge=0, description="Cap on a server's Retry-After.")
    headers: dict[str, str] = Field(default_factory=dict, description="Extra request headers.")
    request_extra: dict[str, Any] = Field(
        default_factory=dict, description="Extra JSON body fields (top_p, seed...); a null value removes a field."
    )


class HfExtra(_Extra):
    """``extra`` keys of the hf backend."""

    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field("float32", description="Torch dtype.")
    num_cpus: float = Field(1.0, gt=0, description="Logical CPUs per map_dataset / engine actor.")
    onednn_linear: bool = Field(
        True,
        description="CPU float32 decoding: linears with <= 32 rows through oneDNN (finemed_ray.models.cpu_linear).",
    )


class VllmExtra(_Extra):
    """``extra`` keys of the vllm backend."""

    device: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="auto: GPUs when the cluster has them or vLLM is a CUDA build, else CPU."
    )
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="vLLM engine arguments.")
    sampling_params: dict[str, Any] = Field(default_factory=dict, description="Extra vLLM SamplingParams.")
    placement_group_config: dict[str, Any] | None = Field(None, description="ray.data.llm placement groups.")
    accelerator_type: str | None = Field(None, description="E.g. H100 (GPU only).")
    runtime_env: dict[str, Any] | None = Field(None, description="Runtime env of the processor stages / engines.")
    max_concurrent_batches: int | None = Field(None, ge=1, description="Overlapping batches per engine.")
    engine_num_cpus: float = Field(1.0, gt=0, description="CPU mode: logical CPUs of the engine actor.")
    cpu_kvcache_gib: float = Field(1.0, gt=0, description="CPU mode: VLLM_CPU_KVCACHE_SPACE unless set.")
    chat_template_stage: bool | dict[str, Any] | None = Field(None, description="ray.data.llm stage override.")
    tokenize_stage: bool | dict[str, Any] | None = Field(None, description="ray.data.llm stage override.")
    detokenize_stage: bool | dict[str, Any] | None = Field(None, description="ray.data.llm stage override.")


EXTRA_MODELS: dict[str, type[_Extra]] = {"http": HttpExtra, "hf": HfExtra, "vllm": VllmExtra}
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class TeacherSpec(StrictModel):
    """Which teacher LLM to call and how. Immutable; unknown keys (also inside ``extra``) are errors."""

    model_config = ConfigDict(frozen=True)

    backend: Literal["http", "hf", "vllm"] = Field(
        description="http (OpenAI-compatible endpoint), hf (transformers), vllm (vLLM engine)."
    )
    model: str = Field(
        min_length=1,
        description="Model name sent to the endpoint (http) or a local / s3:// model directory (hf, vllm).",
    )
    base_url: str | None = Field(
        None, description="http only (required there): OpenAI-compatible base URL, e.g. http://host:8000/v1."
    )
    api_key_env: str | None = Field(
        "OPENAI_API_KEY", description="http: NAME of the environment variable holding the API key (never the key)."
    )
    max_tokens: int = Field(512, ge=1, description="Most tokens generated per request.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="Sampling temperature; 0 = greedy.")
    concurrency: int = Field(
        4, ge=1, description="http: requests in flight per Ray worker; hf/vllm: replicas (engine actors)."
    )
    batch_size: int = Field(16, ge=1, description="Rows per Ray Data batch sent to the teacher (and per hf forward "
                            "batch).")
    max_retries: int = Field(5, ge=0, description="http: retries on 429/408/5xx/timeouts/connection errors, "
                             "exponential backoff with jitter.")
    timeout_s: float = Field(60.0, gt=0, description="http: per-request timeout in seconds.")
    extra: dict[str, Any] = Field(
        default_factory=dict, description="Backend-specific options, checked per backend (HttpExtra, HfExtra, "
        "VllmExtra in finemed_ray/synth/config.py), e.g. vllm engine_kwargs, hf num_cpus."
    )

    @model_validator(mode="after")
    def _check_backend(self) -> TeacherSpec:
        # Checked here, not in a field validator: a field error would echo the value, and a value that is not
        # an env var name may well be a pasted key.
        if self.api_key_env is not None and not _ENV_NAME.match(self.api_key_env):
            raise ValueError(
                "api_key_env must be the NAME of an environment variable holding the key (e.g. OPENAI_API_KEY), "
                "never the key itself"
            )
        if self.backend == "http":
            if not self.base_url:
                raise ValueError("backend 'http' needs base_url (e.g. http://127.0.0.1:8000/v1)")
            if not re.match(r"^https?://[^/\s]+", self.base_url):
                raise ValueError(f"base_url {self.base_url!r}: expected http(s)://host[:port]/path")
        elif self.base_url is not None:
            raise ValueError(f"base_url is only for backend 'http' (backend is {self.backend!r})")
        try:
            EXTRA_MODELS[self.backend].model_validate(self.extra)
        except ValidationError as exc:
            problems = "; ".join(
                f"extra.{'.'.join(str(p) for p in e['loc'])}: "
                + ("unknown key for backend " + repr(self.backend) if e["type"] == "extra_forbidden" else e["msg"])
                for e in exc.errors()
            )
            known = ", ".join(EXTRA_MODELS[self.backend].model_fields)
            raise ValueError(f"{problems} (known keys: {known})") from None
        return self

    @classmethod
    def parse(cls, data: dict[str, Any] | TeacherSpec, source: str = "teacher") -> TeacherSpec:
        """Validate a mapping (e.g. a YAML section) into a spec; errors are ConfigError naming the key."""
        if isinstance(data, TeacherSpec):
            return data
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping, got {type(data).__name__}")
        return validate(cls, data, source=source)

    def parsed_extra(self) -> Any:
        """``extra`` as its backend's options model (HttpExtra, HfExtra or VllmExtra), defaults filled in."""
        return EXTRA_MODELS[self.backend].model_validate(self.extra)


class TeachersSection(StrictModel):
    models: dict[str, TeacherSpec] = Field(description="Named teachers, e.g. {main: ..., reasoner: ..., judge: ...}.")
    default: str = Field(description="Teacher used by every step not listed in `steps`.")
    steps: dict[str, str] = Field(
        default_factory=dict, description=f"Step -> teacher name overrides; steps: {', '.join(TEACHER_STEPS)}."
    )

    @model_validator(mode="after")
    def _known(self) -> "TeachersSection":
        names = set(self.models)
        if self.default not in names:
            raise ValueError(f"default: unknown teacher {self.default!r}; defined: {sorted(names)}")
        for step, name in self.steps.items():
            if step not in TEACHER_STEPS:
                raise ValueError(f"steps.{step}: unknown step; steps: {list(TEACHER_STEPS)}")
            if name not in names:
                raise ValueError(f"steps.{step}: unknown teacher {name!r}; defined: {sorted(names)}")
        return self

    def for_step(self, step: str) -> tuple[str, TeacherSpec]:
        name = self.steps.get(step, self.default)
        return name, self.models[name]


class InputSection(StrictModel):
    path: str = Field(description="Seed documents: .jsonl/.parquet file or prefix (local or s3://); field `text`.")
    text_field: str = Field("text", description="Column holding the document text (PubMedQA-style files: question).")
    max_tokens: int = Field(2048, ge=16, description="Longest seed text, in tokens (see overlong).")
    overlong: Literal["truncate", "drop"] = Field(
        "truncate", description="Texts over max_tokens: cut them (counted) or quarantine them."
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer (HF dir or s3://) for counting tokens; null = whitespace-separated words."
    )
    limit: int | None = Field(None, ge=1, description="Use only the first N documents (smoke runs); null = all.")


class SelectionSection(StrictModel):
    questions_per_text: int = Field(2, ge=1, description="Questions the teacher writes per text (paper: 2).")
    complex_threshold: int = Field(8, ge=1, le=10, description="complexity > this -> complex question (paper: 8).")


class AnswersSection(StrictModel):
    judge: Literal["teacher", "reward_model"] = Field(
        "teacher", description="Who picks between the two common answers: the judge teacher or a reward model."
    )
    reward_model: str | None = Field(
        None, description="judge=reward_model: a sequence-classification model directory (local or s3://)."
    )

    @model_validator(mode="after")
    def _rm(self) -> "AnswersSection":
        if self.judge == "reward_model" and not self.reward_model:
            raise ValueError("reward_model: required when judge=reward_model")
        return self


class DialogueSection(StrictModel):
    follow_up_turns: int = Field(1, ge=0, description="Follow-up question/answer turns added per dialogue (0 = none).")
    follow_up_kinds: list[Literal["common", "complex"]] = Field(
        default_factory=lambda: ["common", "complex"],
        description="Which dialogues get follow-ups: common (SFT) and/or complex (reasoning SFT, DPO prompt only).",
    )
    personas: list[Literal["patient", "clinician"]] = Field(
        default_factory=lambda: ["patient", "clinician"], min_length=1,
        description="Who asks follow-ups, cycled per turn.",
    )


class DecontamSection(StrictModel):
    benchmarks: dict[str, str] = Field(
        default_factory=dict, description="Benchmark name -> JSONL path (local or s3://); empty = no decontamination."
    )
    ngram: int = Field(13, ge=3, description="Word n-gram length for overlap (default 13).")


class SynthOutputSection(StrictModel):
    path: str = Field(description="Output prefix (local or s3://): sft/, reasoning/, dpo/, quarantine/, manifest.json.")


class SynthRaySection(StrictModel):
    address: str | None = Field(None, description="Ray cluster; null = the `ray job submit` cluster, else local.")
    local_num_cpus: int = Field(4, ge=2, description="Logical CPUs of a local cluster.")


class ExecutionSection(StrictModel):
    mode: Literal["streaming", "steps"] = Field(
        "streaming", description="streaming: documents stream through all teacher steps in one Ray Data execution, "
        "vllm/hf teachers load once per run (engine actors); steps: one materialised Ray Data pass per step "
        "(vllm through ray.data.llm, an engine start per step).")
    docs_per_batch: int | None = Field(
        None, ge=1, description="streaming: documents per step batch (one teacher call per step and batch); "
        "null = the default teacher's batch_size.")
    batches_in_flight: int | None = Field(
        None, ge=1, description="streaming: step tasks at a time; null = 4 per vllm/hf replica plus the http "
        "teachers' num_workers.")
    task_num_cpus: float = Field(0.25, gt=0, description="streaming: logical CPUs per step task (I/O bound).")


class TaxonomySection(StrictModel):
    departments: dict[str, list[str]] | None = Field(
        None, description="Primary department -> its secondary departments; null = the paper's 6/29 "
        "(finemed_ray/synth/taxonomy.py)."
    )


class SynthJobConfig(StrictModel):
    name: str = Field(description="Job name (in the manifest).")
    seed: int = Field(0, description="Seed for tie-breaks and persona choice.")
    input: InputSection = Field(description="The seed corpus.")
    teachers: TeachersSection = Field(description="Teacher models and which step uses which.")
    taxonomy: TaxonomySection = Field(default_factory=TaxonomySection, description="Department labels.")
    selection: SelectionSection = Field(default_factory=SelectionSection, description="Question selection.")
    answers: AnswersSection = Field(default_factory=AnswersSection, description="Answer generation and judging.")
    dialogue: DialogueSection = Field(default_factory=DialogueSection, description="Multi-turn dialogues.")
    decontamination: DecontamSection = Field(default_factory=DecontamSection, description="Benchmark decontamination.")
    output: SynthOutputSection = Field(description="Where datasets, quarantine and manifest go.")
    execution: ExecutionSection = Field(default_factory=ExecutionSection, description="How the steps run.")
    ray: SynthRaySection = Field(default_factory=SynthRaySection, description="Which Ray cluster runs the job.")
