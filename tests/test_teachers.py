"""Teachers: http (against the scripted server), hf and vllm (tiny model) backends, in-process and via Ray Data."""

from __future__ import annotations

import socket
import time

import pytest

from finemed_ray.errors import ConfigError
from finemed_ray.toy.scripted_teacher import ScriptedError, ScriptedTeacherServer, messages_hash
from finemed_ray.synth.teachers import (
    RESULT_COLUMNS,
    HfTeacher,
    HttpTeacher,
    TeacherSpec,
    TeacherUnavailable,
    VllmTeacher,
    find_teacher_unavailable,
    make_teacher,
)

FAST = {"backoff_base_s": 0.01, "backoff_max_s": 0.05}


def msgs(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You are a careful doctor."}, {"role": "user", "content": text}]


def reqs(n: int, prefix: str = "question") -> list[dict]:
    return [{"key": f"k{i}", "messages": msgs(f"{prefix} number {i}")} for i in range(n)]


def echo(messages: list[dict]) -> str:
    return "answer to " + messages[-1]["content"]


def http_spec(srv_or_url, **kw) -> TeacherSpec:
    base_url = srv_or_url if isinstance(srv_or_url, str) else srv_or_url.base_url
    extra = {**FAST, **kw.pop("extra", {})}
    return TeacherSpec(backend="http", model="scripted", base_url=base_url, extra=extra, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- spec
def test_spec_validation_and_identity():
    s = TeacherSpec.parse({"backend": "http", "model": "gpt-x", "base_url": "http://h:8000/v1/"})
    assert make_teacher(s).identity == "http:gpt-x@http://h:8000/v1"
    assert make_teacher({"backend": "hf", "model": "/m"}).identity == "hf:/m"
    assert make_teacher({"backend": "vllm", "model": "s3://b/m"}).identity == "vllm:s3://b/m"
    assert isinstance(make_teacher(s), HttpTeacher)

    with pytest.raises(ConfigError, match="needs base_url"):
        TeacherSpec.parse({"backend": "http", "model": "m"})
    with pytest.raises(ConfigError, match="only for backend 'http'"):
        TeacherSpec.parse({"backend": "hf", "model": "m", "base_url": "http://h/v1"})
    with pytest.raises(ConfigError, match="extra.engine_kwargs: unknown key for backend 'http'"):
        TeacherSpec.parse({"backend": "http", "model": "m", "base_url": "http://h/v1", "extra": {"engine_kwargs": {}}})
    with pytest.raises(ConfigError, match="max_tokens"):
        TeacherSpec.parse({"backend": "hf", "model": "m", "max_tokens": 0})
    with pytest.raises(ConfigError, match="unknown key"):
        TeacherSpec.parse({"backend": "hf", "model": "m", "tempreature": 0.5})
    # A pasted key instead of a variable name is refused, and the message does not echo it.
    with pytest.raises(ConfigError, match="NAME of an environment variable") as err:
        TeacherSpec.parse({"backend": "http", "model": "m", "base_url": "http://h/v1", "api_key_env": "sk-s3cr3t"})
    assert "s3cr3t" not in str(err.value)
    with pytest.raises(Exception):  # frozen
        s.model = "other"


def test_one_teacher_type_for_synthesis_evaluation_and_the_factory():
    """Synthesis teachers (``teachers.models.<name>``) and the evaluation ``engine`` are TeacherSpec itself, so a
    teacher's mistakes surface when the YAML loads (naming the dotted key), not when a worker builds it."""
    from pathlib import Path

    from finemed_ray.config import load_config
    from finemed_ray.eval.config import EvalJobConfig
    from finemed_ray.synth.config import SynthJobConfig

    root = Path(__file__).resolve().parents[1]
    synth = load_config(SynthJobConfig, root / "configs/synth_http.yaml")
    main = synth.teachers.models["main"]
    assert type(main) is TeacherSpec
    assert make_teacher(main).spec is main  # no re-validation, no copy
    ev = load_config(EvalJobConfig, root / "configs/eval_tiny.yaml", ["engine.model=m", "output.path=/tmp/x"])
    assert type(ev.engine) is TeacherSpec and make_teacher(ev.engine).spec is ev.engine

    with pytest.raises(ConfigError, match=r"teachers\.models\.main: .*extra\.engine_kwargs: unknown key"):
        load_config(SynthJobConfig, root / "configs/synth_http.yaml",
                    ["teachers.models.main.extra={engine_kwargs: {}}"])
    with pytest.raises(ConfigError, match=r"teachers\.models\.main\.temperature"):
        load_config(SynthJobConfig, root / "configs/synth_http.yaml", ["teachers.models.main.temperature=3"])
    with pytest.raises(ConfigError, match="NAME of an environment variable") as err:
        load_config(SynthJobConfig, root / "configs/synth_http.yaml", ["teachers.models.main.api_key_env=sk-s3cr3t"])
    assert "s3cr3t" not in str(err.value)
    with pytest.raises(ConfigError, match="engine: .*needs base_url"):
        load_config(EvalJobConfig, root / "configs/eval_tiny.yaml",
                    ["engine.model=m", "output.path=/tmp/x", "engine.backend=http"])
    with pytest.raises(ConfigError, match=r"engine: .*extra\.num_cpu: unknown key for backend 'hf'"):
        load_config(EvalJobConfig, root / "configs/eval_tiny.yaml",
                    ["engine.model=m", "output.path=/tmp/x", "engine.extra={num_cpu: 1}"])


# ---------------------------------------------------------------------------------------------- http
def test_http_results_in_order_with_tokens_and_bounded_concurrency():
    with ScriptedTeacherServer(echo, delay_s=0.05) as srv:
        teacher = make_teacher(http_spec(srv, concurrency=3, max_tokens=50))
        requests = reqs(12)
        results = teacher.generate(requests)
        assert [r["key"] for r in results] == [r["key"] for r in requests]
        for req, res in zip(requests, results):
            assert set(res) == {"key", *RESULT_COLUMNS}
            assert res["error"] is None and res["attempts"] == 1
            assert res["text"] == echo(req["messages"])
            prompt_words = sum(len(m["content"].split()) for m in req["messages"])
            assert res["prompt_tokens"] == prompt_words
            assert res["completion_tokens"] == len(res["text"].split())
        assert srv.request_count == 12
        assert 2 <= srv.max_in_flight <= 3, srv.max_in_flight  # concurrent, and bounded by spec.concurrency
        body = srv.log[0]["body"]
        assert body["model"] == "scripted" and body["max_tokens"] == 50 and body["temperature"] == 0.0
        assert teacher.generate([]) == []


def test_http_retries_500_per_row_then_succeeds():
    with ScriptedTeacherServer(echo, fail_each=2, fail_status=500) as srv:
        requests = reqs(5)
        results = make_teacher(http_spec(srv, max_retries=3)).generate(requests)
        assert all(r["error"] is None for r in results), results
        assert [r["attempts"] for r in results] == [3] * 5
        for req in requests:
            assert srv.calls_for(messages_hash(req["messages"])) == 3
        assert srv.request_count == 15


def test_http_honours_retry_after_on_429():
    with ScriptedTeacherServer(echo, fail_first=1, fail_status=429, retry_after=1) as srv:
        t0 = time.monotonic()
        [res] = make_teacher(http_spec(srv)).generate(reqs(1))
        elapsed = time.monotonic() - t0
        assert res["error"] is None and res["attempts"] == 2
        assert srv.log[0]["status"] == 429 and srv.log[1]["status"] == 200
        assert elapsed >= 0.95, elapsed  # backoff alone would be ~0.01 s
        gap = srv.log[1]["t_start"] - srv.log[0]["t_end"]
        assert gap >= 0.95, gap


def test_http_per_row_errors_do_not_raise():
    def reply(messages):
        content = messages[-1]["content"]
        if content == "too long":
            raise ScriptedError(400, "context length exceeded")
        if content == "overloaded":
            raise ScriptedError(503, "busy")
        return "ok " + content

    with ScriptedTeacherServer(reply, delay_fn=lambda m: 3.0 if m[-1]["content"] == "slow" else 0.0) as srv:
        teacher = make_teacher(http_spec(srv, max_retries=2, timeout_s=0.5))
        requests = [
            {"key": "good", "messages": msgs("fine")},
            {"key": "400", "messages": msgs("too long")},
            {"key": "503", "messages": msgs("overloaded")},
            {"key": "slow", "messages": msgs("slow")},
            {"key": "bad-messages", "messages": [{"role": "user", "content": None}]},
            {"key": "no-messages", "messages": []},
        ]
        t0 = time.monotonic()
        res = {r["key"]: r for r in teacher.generate(requests)}
        assert time.monotonic() - t0 < 5
    assert res["good"]["text"] == "ok fine" and res["good"]["error"] is None
    for key in ("400", "503", "slow", "bad-messages", "no-messages"):
        assert res[key]["text"] is None and res[key]["error"], key
        assert res[key]["prompt_tokens"] == res[key]["completion_tokens"] == 0
    assert "HTTP 400" in res["400"]["error"] and "context length" in res["400"]["error"]
    assert res["400"]["attempts"] == 1  # not retried
    assert "HTTP 503" in res["503"]["error"] and "gave up after 3 attempts" in res["503"]["error"]
    assert res["503"]["attempts"] == 3
    assert "timeout" in res["slow"]["error"] and res["slow"]["attempts"] == 3
    assert "content must be a string" in res["bad-messages"]["error"]
    assert "empty" in res["no-messages"]["error"] and res["no-messages"]["attempts"] == 0


def test_http_down_endpoint_raises_quickly():
    url = f"http://127.0.0.1:{free_port()}/v1"
    teacher = make_teacher(http_spec(url, max_retries=3))
    t0 = time.monotonic()
    with pytest.raises(TeacherUnavailable) as err:
        teacher.generate(reqs(20))
    assert time.monotonic() - t0 < 3
    assert f"{url}/chat/completions" in str(err.value)
    assert "connection error" in str(err.value) and "gave up after 4 attempts" in str(err.value)


def test_http_every_row_exhausting_retries_raises():
    with ScriptedTeacherServer(echo, fail_first=10**6, fail_status=502) as srv:
        with pytest.raises(TeacherUnavailable, match="HTTP 502"):
            make_teacher(http_spec(srv, max_retries=2)).generate(reqs(4))
        # The first row to give up stops the others (no success seen): at most 3 attempts for each row.
        assert srv.request_count <= 4 * 3


def test_http_api_key_from_env(monkeypatch):
    with ScriptedTeacherServer(echo, api_key="s3cr3t-key") as srv:
        monkeypatch.setenv("FINEMED_TEST_TEACHER_KEY", "s3cr3t-key")
        [ok] = make_teacher(http_spec(srv, api_key_env="FINEMED_TEST_TEACHER_KEY")).generate(reqs(1))
        assert ok["error"] is None
        assert srv.log[-1]["authorization"] == "Bearer s3cr3t-key"

        monkeypatch.delenv("FINEMED_TEST_TEACHER_KEY")
        teacher = make_teacher(http_spec(srv, api_key_env="FINEMED_TEST_TEACHER_KEY"))
        with pytest.raises(TeacherUnavailable, match="HTTP 401.*FINEMED_TEST_TEACHER_KEY is not set"):
            teacher.generate(reqs(3))
        assert srv.log[-1]["authorization"] is None
        assert srv.request_count == 4  # 401 is not retried


def test_http_map_dataset_keeps_columns(ray_cluster, monkeypatch):
    import ray.data

    monkeypatch.setenv("FINEMED_TEST_TEACHER_KEY", "k-123")  # set after ray.init: workers get it from the driver
    with ScriptedTeacherServer(echo, fail_each=1, fail_status=500, api_key="k-123", delay_s=0.02) as srv:
        rows = [
            {"key": f"k{i}", "messages": msgs(f"q {i}"), "doc_id": i, "meta": {"dept": "cardio", "n": i},
             "tags": ["a", str(i)]}
            for i in range(30)
        ]
        spec = http_spec(srv, batch_size=8, concurrency=4, api_key_env="FINEMED_TEST_TEACHER_KEY",
                         extra={"num_workers": 2})
        out = make_teacher(spec).map_dataset(ray.data.from_items(rows)).take_all()
        assert len(out) == 30
        by_id = {r["doc_id"]: r for r in out}
        for row in rows:
            got = by_id[row["doc_id"]]
            assert got["key"] == row["key"] and got["meta"] == row["meta"] and list(got["tags"]) == row["tags"]
            assert [dict(m) for m in got["messages"]] == row["messages"]
            assert got["text"] == echo(row["messages"]) and got["error"] is None
            assert got["attempts"] == 2 and got["completion_tokens"] == len(got["text"].split())
        assert srv.request_count == 60 and srv.success_count == 30


def test_http_map_dataset_down_fails_the_dataset(ray_cluster):
    import ray.data

    url = f"http://127.0.0.1:{free_port()}/v1"
    ds = make_teacher(http_spec(url, max_retries=1)).map_dataset(ray.data.from_items(reqs(4)))
    with pytest.raises(Exception) as err:
        ds.take_all()
    # Ray Data re-raises it as RayTaskError(UserCodeException); the original is in the cause chain.
    found = find_teacher_unavailable(err.value)
    assert isinstance(found, TeacherUnavailable), repr(err.value)
    assert f"{url}/chat/completions" in str(found) and "connection error" in str(found)


# ---------------------------------------------------------------------------------------------- hf
@pytest.fixture(scope="module")
def hf_teacher(tiny_model_dir):
    return HfTeacher(TeacherSpec(backend="hf", model=str(tiny_model_dir), max_tokens=12, batch_size=4))


def test_hf_generate_batched_matches_single(hf_teacher, tiny_tokenizer):
    requests = [{"key": f"k{i}", "messages": msgs("fever and cough " * (1 + 3 * i))} for i in range(5)]
    requests.append({"key": "bad", "messages": [{"role": "user"}]})
    results = hf_teacher.generate(requests)
    assert [r["key"] for r in results] == [r["key"] for r in requests]
    for req, res in zip(requests[:-1], results[:-1]):
        assert res["error"] is None and isinstance(res["text"], str) and res["attempts"] == 1
        prompt = tiny_tokenizer.apply_chat_template(req["messages"], add_generation_prompt=True, tokenize=True)
        if isinstance(prompt, dict) or hasattr(prompt, "keys"):
            prompt = prompt["input_ids"]
        assert res["prompt_tokens"] == len(prompt)
        assert 1 <= res["completion_tokens"] <= 12
    assert results[-1]["text"] is None and "content must be a string" in results[-1]["error"]
    # Left padding is right: a row alone gives the same greedy output as inside a padded batch.
    for req, res in zip(requests[:2], results[:2]):
        [alone] = hf_teacher.generate([req])
        assert alone["text"] == res["text"] and alone["completion_tokens"] == res["completion_tokens"]


def test_hf_loads_from_s3(tiny_model_s3, hf_teacher):
    import torch

    # tiny_model_s3 is hf_teacher's local model directory published to S3: the S3 teacher must serve exactly that
    # model (its saved weights, not a fresh initialisation of the same config nor some other cached copy, and
    # its tokenizer), so its greedy generations equal the local teacher's.
    teacher = make_teacher({"backend": "hf", "model": tiny_model_s3, "max_tokens": 12, "batch_size": 4})
    (model, tok), (local_model, local_tok) = teacher.load(), hf_teacher.load()
    weights, local_weights = model.state_dict(), local_model.state_dict()
    assert weights.keys() == local_weights.keys()
    assert [k for k in local_weights if not torch.equal(weights[k], local_weights[k])] == []
    assert tok.get_vocab() == local_tok.get_vocab() and tok.chat_template == local_tok.chat_template
    requests = reqs(3)
    results = teacher.generate(requests)
    assert all(r["error"] is None and r["completion_tokens"] >= 1 for r in results), results
    assert results == hf_teacher.generate(requests)


def test_hf_map_dataset(ray_cluster, hf_teacher, tiny_model_dir):
    import ray.data

    rows = [{"key": f"k{i}", "messages": msgs(f"chest pain {i}"), "doc_id": i} for i in range(6)]
    spec = TeacherSpec(backend="hf", model=str(tiny_model_dir), max_tokens=12, batch_size=4, concurrency=1)
    out = make_teacher(spec).map_dataset(ray.data.from_items(rows)).take_all()
    expected = {r["key"]: r for r in hf_teacher.generate(rows)}
    assert sorted(r["doc_id"] for r in out) == list(range(6))
    for r in out:
        assert r["error"] is None and r["text"] == expected[r["key"]]["text"]
        assert r["prompt_tokens"] == expected[r["key"]]["prompt_tokens"] > 0


# ---------------------------------------------------------------------------------------------- vllm
def test_vllm_config_cpu_and_gpu_without_engine():
    cpu = make_teacher({"backend": "vllm", "model": "/m", "concurrency": 2, "batch_size": 8,
                        "extra": {"device": "cpu", "engine_kwargs": {"max_model_len": 512}}})
    cfg = cpu.processor_config()
    assert cfg.placement_group_config["bundle_per_worker"]["CPU"] == 1  # not the default {"GPU": 1}
    assert cfg.runtime_env["env_vars"]["VLLM_CPU_KVCACHE_SPACE"]
    assert cfg.tokenize_stage is False and cfg.detokenize_stage is False
    assert cfg.should_continue_on_error is True and cfg.concurrency == 2 and cfg.batch_size == 8
    assert cfg.engine_kwargs["max_model_len"] == 512
    gpu = make_teacher({"backend": "vllm", "model": "/m", "extra": {"device": "gpu"}}).processor_config()
    assert gpu.placement_group_config is None  # ray.data.llm's default: one GPU per engine worker
    assert gpu.tokenize_stage is True and gpu.runtime_env is None
    assert make_teacher({"backend": "vllm", "model": "/m", "temperature": 0.7, "max_tokens": 9,
                         "extra": {"sampling_params": {"top_p": 0.9}}}).sampling_params() == {
        "max_tokens": 9, "temperature": 0.7, "detokenize": True, "top_p": 0.9}


def test_vllm_generate_orders_results_and_rejects_bad_rows(monkeypatch):
    """generate() wraps map_dataset: rows come back in any order and are put back in request order."""
    teacher = make_teacher({"backend": "vllm", "model": "/m"})
    seen = []

    class FakeDs:
        def __init__(self, rows):
            self.rows = rows

        def take_all(self):
            return list(reversed(self.rows))

    def fake_map(ds):
        rows = ds.take_all()
        seen.extend(rows)
        return FakeDs([{**r, "text": "t" + r["key"], "error": None, "prompt_tokens": 3, "completion_tokens": 2,
                        "attempts": 1} for r in rows])

    import ray.data

    monkeypatch.setattr(teacher, "map_dataset", fake_map)
    monkeypatch.setattr(ray.data, "from_items", lambda items: FakeDs(items))
    out = teacher.generate([{"key": "a", "messages": msgs("x")}, {"key": "b", "messages": "oops"},
                            {"key": "c", "messages": msgs("y")}])
    assert [r["key"] for r in out] == ["a", "b", "c"]
    assert out[0]["text"] == "ta" and out[2]["text"] == "tc"
    assert out[1]["text"] is None and "messages must be a list" in out[1]["error"]
    assert [r["key"] for r in seen] == ["c", "a"]  # the bad row never reached the engine


@pytest.mark.timeout(600)  # Ray resource problems hang rather than fail
def test_vllm_map_dataset_on_cpu(ray_cluster, hf_teacher, tiny_model_dir):
    """ray.data.llm on CPU (vllm-cpu): resources are CPU bundles, not a GPU; greedy float32 equals transformers."""
    import ray.data

    spec = TeacherSpec(
        backend="vllm", model=str(tiny_model_dir), max_tokens=12, batch_size=4, concurrency=1,
        extra={"engine_kwargs": {"dtype": "float32", "max_model_len": 256}},
    )
    teacher = make_teacher(spec)
    assert isinstance(teacher, VllmTeacher)
    if teacher.resolve_device() != "cpu":
        pytest.skip("not a CPU vLLM build")
    bundle = teacher.processor_config().placement_group_config["bundle_per_worker"]
    assert bundle["CPU"] == 1 and not bundle.get("GPU")

    rows = [{"key": f"k{i}", "messages": msgs("fever and cough " * (1 + 2 * i)), "doc_id": i,
             "model": "column-named-model", "prompt": "column-named-prompt"} for i in range(5)]
    rows.append({"key": "bad", "messages": [], "doc_id": 98, "model": "m", "prompt": "p"})
    rows.append({"key": "too-long", "messages": msgs("fever " * 400), "doc_id": 99, "model": "m", "prompt": "p"})
    t0 = time.monotonic()
    out = {r["key"]: r for r in teacher.map_dataset(ray.data.from_items(rows)).take_all()}
    elapsed = time.monotonic() - t0
    print(f"vllm map_dataset: {len(rows)} rows in {elapsed:.1f}s")
    assert set(out) == {r["key"] for r in rows}
    expected = {r["key"]: r for r in hf_teacher.generate(rows[:5])}
    for row in rows[:5]:
        got = out[row["key"]]
        assert got["doc_id"] == row["doc_id"]
        assert got["model"] == "column-named-model" and got["prompt"] == "column-named-prompt"  # kept, not clobbered
        assert got["error"] is None and got["attempts"] == 1
        assert got["text"] == expected[row["key"]]["text"]
        assert got["prompt_tokens"] == expected[row["key"]]["prompt_tokens"]
        assert got["completion_tokens"] == expected[row["key"]]["completion_tokens"]
    assert out["bad"]["text"] is None and "empty" in out["bad"]["error"] and out["bad"]["attempts"] == 0
    assert out["too-long"]["text"] is None and out["too-long"]["error"].startswith("vllm:")
