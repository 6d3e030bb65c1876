"""Typed config of the evaluation job (``jobs/evaluate.py``; YAML files ``configs/eval_*.yaml``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from finemed_ray.config import StrictModel
from finemed_ray.eval.benchmarks import BenchmarkSpec
from finemed_ray.synth.config import TeacherSpec
from finemed_ray.ttt.adapt import TTTConfig


class FewShotSection(StrictModel):
    k: int = Field(0, ge=0, le=32, description="Worked examples put before each question (0 = zero-shot).")
    split_path: str | None = Field(
        None, description="MCQ JSONL (local or s3://) of a dev split the examples are drawn from; required when "
        "k > 0. Never the evaluated file, and a dev question that is also a test question is never drawn."
    )
    seed: int = Field(0, description="Seed of the draw: the same seed and dev split give the same examples.")

    @model_validator(mode="after")
    def _dev_split_needed(self) -> FewShotSection:
        # Examples drawn from the evaluated rows would leak answers into the prompt: a dev split must be named.
        if self.k > 0 and not self.split_path:
            raise ValueError(f"few_shot.split_path: required when few_shot.k > 0 (k={self.k}); the examples come "
                             f"from a dev split, never from the rows being evaluated")
        return self


class EvalBenchmarkSpec(BenchmarkSpec):
    """A benchmark of the evaluation job: where it is (:class:`BenchmarkSpec`) and its few-shot examples."""

    few_shot: FewShotSection = Field(
        default_factory=FewShotSection, description="Worked examples from a dev split (k, split_path, seed)."
    )

    @model_validator(mode="after")
    def _dev_is_not_test(self) -> EvalBenchmarkSpec:
        if self.few_shot.k > 0 and self.few_shot.split_path == self.path:
            raise ValueError(f"few_shot.split_path: {self.path!r} is the evaluated file itself; name a dev split")
        return self


class PromptSection(StrictModel):
    mode: Literal["reasoning", "direct", "question"] = Field(
        "reasoning",
        description="reasoning: step by step, ending 'the answer is (X)'; direct: the letter only; question: the "
        "question alone as the user turn, no options listed (log-likelihood, or generate: the answer is read by the "
        "one option text it states, as for models trained to answer in sentences).",
    )
    system_prompt: str | None = Field(
        "You are a helpful professional doctor.", description="System turn (the paper's); null = none."
    )


class ScoringSection(StrictModel):
    method: Literal["generate", "loglik"] = Field(
        "generate", description="generate: decode an answer and extract the letter; loglik: the most likely option."
    )
    continuation: Literal["letter_text", "letter", "text"] = Field(
        "letter_text", description="loglik: what is scored per option ('The answer is (B) text', the letter, the text)."
    )
    normalize: Literal["mean", "sum"] = Field("mean", description="loglik: per-token mean or summed log-probability.")


class TTTSection(StrictModel):
    enabled: bool = Field(False, description="Evaluate with test-time training (a flag of the evaluation job).")
    compare: bool = Field(True, description="With TTT enabled, also evaluate without it: the report shows both.")
    index: str | None = Field(None, description="Retrieval index built by jobs/build_index.py (local or s3://).")
    verify_base: bool = Field(
        False, description="Hash every base weight before and after each batch and fail if one changed (slow on "
        "large models; on in tests)."
    )
    adapt: TTTConfig = Field(default_factory=TTTConfig, description="How each question is adapted.")

    @model_validator(mode="after")
    def _index_needed(self) -> TTTSection:
        if self.enabled and not self.index:
            raise ValueError("ttt.index: required when ttt.enabled (build one with jobs/build_index.py)")
        return self


class EvalOutputSection(StrictModel):
    path: str = Field(description="Report prefix (local or s3://): report.json/.md, accuracy.png, predictions.jsonl, "
                      "results_lm_eval.json.")
    baseline: str | None = Field(None, description="A previous report.json (or its prefix) to compare against.")


class EvalRaySection(StrictModel):
    address: str | None = Field(None, description="Ray cluster; null = the `ray job submit` cluster, else local.")
    local_num_cpus: int = Field(4, ge=2, description="Logical CPUs of a local cluster.")


# SamplingParams that the TTT path on vLLM (serving's engine: finemed_ray.serving.engines.GenRequest) passes on.
VLLM_TTT_SAMPLING = frozenset({"top_p", "seed", "stop"})


class EvalJobConfig(StrictModel):
    name: str = Field(description="Run name (in the report).")
    engine: TeacherSpec = Field(
        description="The model under evaluation behind the engine interface: hf (transformers), vllm, or http."
    )
    benchmarks: list[EvalBenchmarkSpec] = Field(
        min_length=1, description="Benchmark sets (name, path, kind, limit, few_shot)."
    )
    prompt: PromptSection = Field(default_factory=PromptSection, description="How items are put to the model.")
    scoring: ScoringSection = Field(default_factory=ScoringSection, description="Generation or log-likelihood.")
    ttt: TTTSection = Field(default_factory=TTTSection, description="Test-time training.")
    output: EvalOutputSection = Field(description="Where the report goes.")
    ray: EvalRaySection = Field(default_factory=EvalRaySection, description="Which Ray cluster runs the job.")
    baselines: str | None = Field(
        None, description="YAML file of published figures (e.g. configs/baselines/medical_8b.yaml), shown in the "
        "report beside ours as quoted, not measured; null = none."
    )

    @model_validator(mode="after")
    def _engine_supports(self) -> EvalJobConfig:
        if self.scoring.method == "loglik" and self.engine.backend != "hf":
            raise ValueError(f"scoring.method=loglik needs engine.backend=hf (token log-probabilities of every "
                             f"option); got {self.engine.backend!r}")
        if self.ttt.enabled and self.engine.backend == "http":
            raise ValueError("ttt.enabled: an http endpoint cannot take this job's adapters; use engine.backend=hf "
                             "(transformers) or vllm (adapters trained with torch, answered through LoRARequest)")
        if self.ttt.enabled and self.engine.backend == "vllm":
            if self.ttt.adapt.method != "lora":
                raise ValueError(f"ttt.adapt.method={self.ttt.adapt.method!r} updates the base weights; on "
                                 f"engine.backend=vllm only lora (one adapter per question, LoRARequest) is possible")
            unknown = sorted(set(self.engine.extra.get("sampling_params") or {}) - VLLM_TTT_SAMPLING)
            if unknown:
                raise ValueError(f"engine.extra.sampling_params: {unknown} not supported with TTT on vLLM "
                                 f"(supported: {sorted(VLLM_TTT_SAMPLING)})")
        names = [b.name for b in self.benchmarks]
        if len(set(names)) != len(names):
            raise ValueError(f"benchmarks: duplicate names {sorted(n for n in set(names) if names.count(n) > 1)}")
        return self
