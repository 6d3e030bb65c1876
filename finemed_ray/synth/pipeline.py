"""The FineMed synthesis pipeline on Ray Data (``jobs/synthesize.py`` is its entrypoint).

Seed texts -> primary + secondary department (teacher) -> questions -> scores -> the paper's selection ->
common/complex split -> answers (common: two styles + a judge; complex: Thought/Summarization reasoning) ->
follow-up turns -> DPO rejected answers -> benchmark decontamination -> SFT (partitioned by department),
reasoning SFT and DPO datasets, quarantine and a manifest.

Every document is one row (``doc_id``, ``status``, ``kind``, ``state`` as JSON). Each teacher step turns the
documents that need it into request rows, sends only requests whose response is not cached yet
(``finemed_ray.synth.cache``), joins the responses back and applies the step's parser per document. A bad teacher
output drops the document with a reason (kept, with the raw output, in the quarantine); it never fails the job.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from typing import Any, Callable

import pyarrow as pa

from finemed_ray import storage
from finemed_ray.errors import DataError
from finemed_ray.synth import parsing, prompts
from finemed_ray.synth.cache import StepStats, request_key, run_cached_step
from finemed_ray.synth.config import SynthJobConfig

log = logging.getLogger(__name__)

DOC_SCHEMA = pa.schema([("doc_id", pa.string()), ("status", pa.string()), ("kind", pa.string()),
                        ("state", pa.string())])
ACTIVE, DROPPED = "active", "dropped"
STYLES = tuple(prompts.ANSWER_STYLES)  # the two answer styles of common questions


# ------------------------------------------------------------------------------------------------ documents
def _doc(doc_id: str, status: str, kind: str, state: dict) -> dict:
    return {"doc_id": doc_id, "status": status, "kind": kind, "state": json.dumps(state, ensure_ascii=False)}


def _count_tokens(text: str, tokenizer: Any) -> tuple[int, Callable[[int], str]]:
    if tokenizer is None:
        words = text.split()
        return len(words), lambda n: " ".join(words[:n])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return len(ids), lambda n: tokenizer.decode(ids[:n])


def seed_batch(batch: pa.Table, fmt: str, text_field: str, max_tokens: int, overlong: str,
               tokenizer_path: str | None, source_uri: str) -> pa.Table:
    """Raw input rows -> documents. Invalid, empty or (with overlong=drop) over-long rows become dropped docs."""
    tokenizer = None
    if tokenizer_path:
        from finemed_ray.data.sft_prepare import _cached_tokenizer

        tokenizer = _cached_tokenizer(tokenizer_path)
    rows = batch.column("text").to_pylist() if fmt == "jsonl" else batch.to_pylist()
    out = []
    for raw in rows:
        row, err = _json_line(raw) if fmt == "jsonl" else (raw, None)
        raw_text = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False, default=str)
        text = row.get(text_field) if isinstance(row, dict) else None
        if err is None and not (isinstance(text, str) and text.strip()):
            err = f"seed: field {text_field!r} missing or empty"
        if err:
            did = "bad-" + hashlib.sha256(raw_text.encode()).hexdigest()[:16]
            out.append(_doc(did, DROPPED, "", {"dropped_at": "read", "reason": err, "raw": raw_text}))
            continue
        text = " ".join(text.split()) if tokenizer is None else text.strip()
        n_tokens, cut = _count_tokens(text, tokenizer)
        truncated = False
        if n_tokens > max_tokens:
            if overlong == "drop":
                did = "long-" + hashlib.sha256(text.encode()).hexdigest()[:16]
                out.append(_doc(did, DROPPED, "", {"dropped_at": "read", "raw": raw_text,
                                                   "reason": f"overlong: {n_tokens} tokens > input.max_tokens={max_tokens}"}))
                continue
            text, truncated = cut(max_tokens), True
        text_hash = hashlib.sha256(text.encode()).hexdigest()[:16]
        given = row.get("id")
        doc_id = str(given) if isinstance(given, (str, int)) and str(given) else "d" + text_hash
        out.append(_doc(doc_id, ACTIVE, "", {
            "text": text, "text_hash": text_hash, "source": row.get("source") or source_uri,
            "language": row.get("language"), "truncated": truncated, "tokens": min(n_tokens, max_tokens)}))
    return pa.Table.from_pylist(out, schema=DOC_SCHEMA)


def _json_line(line: str) -> tuple[Any, str | None]:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"invalid JSON: {e.msg} at column {e.colno}"
    if not isinstance(value, dict):
        return None, f"seed: expected a JSON object, got {type(value).__name__}"
    return value, None


def dedupe_group(group: pa.Table) -> pa.Table:
    """Documents with the same text: keep the first (by id), drop the others with a reason (nothing is lost)."""
    rows = sorted(group.to_pylist(), key=lambda r: r["doc_id"])
    for r in rows[1:]:
        state = json.loads(r["state"])
        r.update(status=DROPPED, state=json.dumps({"dropped_at": "dedupe", "raw": state["text"],
                                                   "reason": f"duplicate: same text as {rows[0]['doc_id']}"}))
    return pa.Table.from_pylist(rows, schema=DOC_SCHEMA)


# ------------------------------------------------------------------------------------------------ steps
# Each step: which documents it applies to, the requests it makes for one document, and how the responses
# (in request order) update the document. `apply` returns (state, None) or (state, drop reason).
def _build_primary(st: dict, cfg: dict) -> list[list[dict]]:
    return [prompts.classify_primary(st["text"], _taxonomy(cfg))]


def _apply_primary(st: dict, resp: list[dict], cfg: dict, doc_id: str):
    text = resp[0]["text"]
    label = _taxonomy(cfg).match_primary(text) if text is not None else None
    if label is None:
        return st, f"unclassified_primary: {_short(text)}"
    st["department"] = label
    return st, None


def _build_secondary(st: dict, cfg: dict) -> list[list[dict]]:
    return [prompts.classify_secondary(st["text"], st["department"], _taxonomy(cfg))]


def _apply_secondary(st: dict, resp: list[dict], cfg: dict, doc_id: str):
    text = resp[0]["text"]
    label = _taxonomy(cfg).match_secondary(text, st["department"]) if text is not None else None
    if label is None:
        return st, f"unclassified_secondary: {_short(text)}"
    st["subdepartment"] = label
    return st, None


def _build_questions(st: dict, cfg: dict) -> list[list[dict]]:
    return [prompts.generate_questions(st["text"], cfg["selection"]["questions_per_text"])]


def _apply_questions(st: dict, resp: list[dict], cfg: dict, doc_id: str):
    got = parsing.parse_questions(resp[0]["text"], cfg["selection"]["questions_per_text"])
    if not got.ok:
        return st, f"questions_{got.reason}"
    st["questions"] = got.value
    return st, None


def _build_scores(st: dict, cfg: dict) -> list[list[dict]]:
    return [prompts.score_question(st["text"], q) for q in st["questions"]]


def _apply_scores(st: dict, resp: list[dict], cfg: dict, doc_id: str):
    candidates, problems = [], []
    for q, r in zip(st["questions"], resp):
        got = parsing.parse_scores(r["text"])
        candidates.append({"question": q, "scores": got.value})
        if not got.ok:
            problems.append(got.reason)
    st["candidates"] = candidates
    if problems:
        st["score_problems"] = problems
    chosen = parsing.select_question(candidates, cfg["seed"], doc_id)
    if not chosen.ok:
        return st, f"selection_{chosen.reason}" if not problems else f"selection_{chosen.reason} ({problems[0]})"
    pick = candidates[chosen.value]
    st["question"], st["scores"] = pick["question"], pick["scores"]
    st["kind"] = parsing.split_kind(pick["scores"], cfg["selection"]["complex_threshold"])
    return st, None


def _build_common(st: dict, cfg: dict) -> list[list[dict]]:
    return [prompts.answer_common(st["text"], st["question"], style) for style in STYLES]


def _apply_common(st: dict, resp: list[dict], cfg: dict, doc_id: str):
    answers = [parsing.parse_answer(r["text"]) for r in resp]
    st["answers"] = [a.value for a in answers]
    if not any(a.ok for a in answers):
        return st, f"answer_{answers[0].reason}"
    return st, None


def _needs_judge(st: dict) -> bool:
    return all(a is not None for a in st.get("answers", []))


def _build_judge(st: dict, cfg: dict) -> list[list[dict]]:
    if not _needs_judge(st):  # one answer failed: the other one is the answer, no judge call
        return []
    return [prompts.judge_answers(st["question"], st["answers"][0], st["answers"][1])]


def _apply_judge(st: dict, resp: list[dict], cfg: dict, doc_id: str):
    if not resp:
        st["answer"] = next(a for a in st["answers"] if a is not None)
        st["judge"] = "single"
        return st, None
    got = parsing.parse_judge(resp[0]["text"])
    if not got.ok:
        return st, f"judge_{got.reason}"
    st["judge"] = got.value
    st["answer"] = st["answers"][0 if got.value == "A" else 1]
    return st, None


def _build_complex(st: dict, cfg: dict) -> list[list[dict]]:
    return [prompts.answer_complex(st["text"], st["question"])]


def _apply_complex(st: dict, resp: list[dict], cfg: dict, doc_id: str):
    got = parsing.parse_reasoning(resp[0]["text"])
    if not got.ok:
        return st, f"reasoning_{got.reason}"
    thought, summary = got.value
    st["answer"] = parsing.format_reasoning(thought, summary)
    return st, None


def _dialogue(st: dict) -> list[dict]:
    return [{"role": "user", "content": st["question"]}, {"role": "assistant", "content": st["answer"]}] + \
        st.get("follow_ups", [])


def _persona(cfg: dict, turn: int) -> str:
    personas = cfg["dialogue"]["personas"]
    return personas[turn % len(personas)]


def _build_follow_q(st: dict, cfg: dict) -> list[list[dict]]:
    return [prompts.follow_up_question(_dialogue(st), _persona(cfg, len(st.get("follow_ups", [])) // 2),
                                       text=st["text"])]


def _apply_follow_q(st: dict, resp: list[dict], cfg: dict, doc_id: str):
    got = parsing.parse_answer(resp[0]["text"])
    if got.ok:
        st["pending_follow_up"] = got.value
    else:  # the dialogue stays valid without this turn; record why it is shorter
        st.setdefault("follow_up_problems", []).append(f"follow_up_question_{got.reason}")
        st["follow_up_done"] = True
    return st, None


def _build_follow_a(st: dict, cfg: dict) -> list[list[dict]]:
    dialogue = _dialogue(st) + [{"role": "user", "content": st["pending_follow_up"]}]
    return [prompts.follow_up_answer(dialogue, st["text"])]


def _apply_follow_a(st: dict, resp: list[dict], cfg: dict, doc_id: str):
    question = st.pop("pending_follow_up")
    got = parsing.parse_answer(resp[0]["text"])
    if got.ok:
        st.setdefault("follow_ups", []).extend(
            [{"role": "user", "content": question}, {"role": "assistant", "content": got.value}])
    else:
        st.setdefault("follow_up_problems", []).append(f"follow_up_answer_{got.reason}")
        st["follow_up_done"] = True
    return st, None


def _build_direct(st: dict, cfg: dict) -> list[list[dict]]:
    return [prompts.direct_answer(st["question"])]


def _apply_direct(st: dict, resp: list[dict], cfg: dict, doc_id: str):
    got = parsing.parse_answer(resp[0]["text"])
    if got.ok:
        st["direct_answer"] = got.value
    else:  # the SFT/reasoning rows stay; only the DPO pair is missing
        st["dpo_problem"] = f"direct_answer_{got.reason}"
    return st, None


STEPS: dict[str, tuple[str, Callable, Callable]] = {
    # name: (teacher step in config, build, apply)
    "classify_primary": ("classify_primary", _build_primary, _apply_primary),
    "classify_secondary": ("classify_secondary", _build_secondary, _apply_secondary),
    "generate_questions": ("generate_questions", _build_questions, _apply_questions),
    "score_questions": ("score_questions", _build_scores, _apply_scores),
    "answer_common": ("answer_common", _build_common, _apply_common),
    "judge": ("judge", _build_judge, _apply_judge),
    "answer_complex": ("answer_complex", _build_complex, _apply_complex),
    "follow_up_question": ("follow_up", _build_follow_q, _apply_follow_q),
    "follow_up_answer": ("follow_up", _build_follow_a, _apply_follow_a),
    "direct_answer": ("direct_answer", _build_direct, _apply_direct),
}
PROMPT_VERSION_OF = {
    "classify_primary": "classify_primary", "classify_secondary": "classify_secondary",
    "generate_questions": "generate_questions", "score_questions": "score_question",
    "answer_common": "answer_common", "judge": "judge_answers", "answer_complex": "answer_complex",
    "follow_up_question": "follow_up_question", "follow_up_answer": "follow_up_answer",
    "direct_answer": "direct_answer",
}

_TAXONOMIES: dict[str, Any] = {}


def _taxonomy(cfg: dict):
    from finemed_ray.synth.taxonomy import DEFAULT_TAXONOMY, Taxonomy

    departments = cfg["taxonomy"]["departments"]
    if departments is None:
        return DEFAULT_TAXONOMY
    key = json.dumps(departments, sort_keys=True)
    if key not in _TAXONOMIES:  # built once per worker process
        _TAXONOMIES[key] = Taxonomy.from_dict({"departments": departments})
    return _TAXONOMIES[key]


def _short(text: str | None, limit: int = 60) -> str:
    if text is None:
        return "<no output>"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------------- Ray Data plumbing per step
def make_requests(row: dict, step: str, cfg: dict, teacher_identity: str) -> list[dict]:
    st = json.loads(row["state"])
    version = prompts.PROMPT_VERSIONS[PROMPT_VERSION_OF[step]]
    out = []
    built = STEPS[step][1](st, cfg)
    for sub, messages in enumerate(built):
        out.append({**row, "sub": sub, "n_sub": len(built), "messages": messages,
                    "key": request_key(step, version, teacher_identity, messages)})
    return out


REQUEST_SCHEMA = pa.schema(list(DOC_SCHEMA) + [
    ("sub", pa.int64()), ("n_sub", pa.int64()),
    ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))), ("key", pa.string())])


def make_requests_batch(batch: pa.Table, step: str, cfg: dict, teacher_identity: str) -> pa.Table:
    """``make_requests`` over a block. Always the same schema, also for a block that makes no request (Ray Data's
    ``flat_map`` turns those into blocks without columns, which a later shuffle cannot concatenate)."""
    rows = [r for row in batch.to_pylist() for r in make_requests(row, step, cfg, teacher_identity)]
    return pa.Table.from_pylist(rows, schema=REQUEST_SCHEMA)


def apply_group(group: pa.Table, step: str, cfg: dict) -> pa.Table:
    """One document's answered requests (any order) -> the document."""
    return _apply_doc(sorted(group.to_pylist(), key=lambda r: r["sub"]), step, cfg)


def apply_single(batch: pa.Table, step: str, cfg: dict) -> pa.Table:
    """Answered requests of documents that made exactly one request (``n_sub == 1``): each row is its document's
    whole group, so no regrouping (a shuffle) is needed."""
    docs = [_apply_doc([row], step, cfg) for row in batch.to_pylist()]
    return pa.concat_tables(docs) if docs else DOC_SCHEMA.empty_table()


def _apply_doc(rows: list[dict], step: str, cfg: dict) -> pa.Table:
    return pa.Table.from_pylist([_apply_doc_row(rows, step, cfg)], schema=DOC_SCHEMA)


def _apply_doc_row(rows: list[dict], step: str, cfg: dict, note: dict | None = None) -> dict:
    """One document's responses (in request order) -> the document row. ``note``: per-step teacher counts the
    streaming pipeline keeps in the state (``_TEACHER_NOTE``), added whether the document is kept or dropped."""
    first = rows[0]
    if len(rows) != first["n_sub"]:  # never apply a step to part of a document's responses
        raise RuntimeError(f"step {step}: document {first['doc_id']} has {len(rows)} of {first['n_sub']} responses")
    st = json.loads(first["state"])
    if note is not None:
        _add_note(st, step, note)
    responses = [{"text": r["text"] if not r["error"] else None, "error": r["error"]} for r in rows]
    if all(r["error"] for r in rows):
        # The teacher failed this document's every request (after retries): drop it with the error, keep going.
        st.update(dropped_at=step, reason=f"teacher_error: {rows[0]['error']}")
        return _doc(first["doc_id"], DROPPED, first["kind"], st)
    st, reason = STEPS[step][2](st, responses, cfg, first["doc_id"])
    if reason:
        st.update(dropped_at=step, reason=reason, raw=[r["text"] for r in rows])
        return _doc(first["doc_id"], DROPPED, first["kind"], st)
    return _doc(first["doc_id"], ACTIVE, st.get("kind", first["kind"]) or "", st)


def apply_no_request(batch: pa.Table, step: str, cfg: dict) -> pa.Table:
    """Documents a step applies to but which need no teacher call (e.g. no judge when one answer failed)."""
    out = []
    for row in batch.to_pylist():
        st, reason = STEPS[step][2](json.loads(row["state"]), [], cfg, row["doc_id"])
        status = DROPPED if reason else ACTIVE
        if reason:
            st.update(dropped_at=step, reason=reason)
        out.append(_doc(row["doc_id"], status, st.get("kind", row["kind"]) or "", st))
    return pa.Table.from_pylist(out, schema=DOC_SCHEMA)


def _needs_requests(batch: pa.Table, step: str, cfg: dict) -> pa.Table:
    flags = [bool(STEPS[step][1](json.loads(s), cfg)) for s in batch.column("state").to_pylist()]
    return batch.append_column("needs", pa.array(flags, pa.bool_()))


# ------------------------------------------------------------------------------------- streaming execution
# execution.mode=streaming: every teacher step is one map over document batches that makes the batch's requests,
# answers them from the response cache or the teacher (storing new responses first), and applies the step's parser
# -- so a document needs nothing from any other document between the seed dedupe and the final write, and Ray Data
# streams the batches through all steps in one execution (no materialised step boundaries, no per-step shuffle).
# What truly needs all rows stays a barrier: the seed dedupe (which of the copies of a text is kept, before any
# teacher request, needs all copies), the reward-model judge (a separate actor pool, kept as a step boundary), and
# the final write (outputs are sorted so that a rerun writes the same files; the manifest counts every document).
# Question selection, the judge's pick between a document's two answers and the common/complex split (a fixed
# complexity threshold, no corpus-wide quantile) are per document, so they stream.
_TEACHER_NOTE = "_teacher"  # state key: {step: counts} (see _add_note); never written to an output dataset
_NOTE_FIELDS = ("requests", "cache_hits", "teacher_calls", "errors", "prompt_tokens", "completion_tokens")


def _add_note(st: dict, step: str, note: dict) -> None:
    acc = st.setdefault(_TEACHER_NOTE, {}).setdefault(step, {})
    for k, v in note.items():
        if k == "error_kinds":
            kinds = acc.setdefault("error_kinds", {})
            for e, n in v.items():
                kinds[e] = kinds.get(e, 0) + n
        else:
            acc[k] = round(acc.get(k, 0) + v, 6)


def _selected(row: dict, st: dict, kinds: tuple[str, ...] | None, extra_filter: str | None) -> bool:
    if row["status"] != ACTIVE or (kinds and row["kind"] not in kinds):
        return False
    if extra_filter == "follow_up_open":
        return not st.get("follow_up_done")
    if extra_filter:
        return extra_filter in st
    return True


_HTTP_TEACHERS: dict[tuple[str, str | None], Any] = {}


def _call_teacher(teacher: Any, requests: list[dict]) -> list[dict]:
    """``teacher``: ``("engine", pool, spec)`` (vllm/hf: the run's engine actors, a
    :class:`~finemed_ray.synth.engines.EnginePool`, with the calling teacher's spec), or ``("http", spec,
    api_key)``, an endpoint this worker process calls itself (one client per process and spec)."""
    if teacher[0] == "engine":
        return teacher[1].generate(requests, teacher[2])
    if teacher[0] == "http":
        from finemed_ray.synth.teachers import HttpTeacher

        _, spec, api_key = teacher
        key = (spec.model_dump_json(), api_key)
        if key not in _HTTP_TEACHERS:
            _HTTP_TEACHERS[key] = HttpTeacher(spec, api_key=api_key)
        return _HTTP_TEACHERS[key].generate(requests)
    raise ValueError(f"unknown teacher reference {teacher[0]!r}")


def stream_step_batch(batch: pa.Table, step: str, cfg: dict, kinds: tuple[str, ...] | None,
                      extra_filter: str | None, teacher: Any, teacher_identity: str, cache_fs: Any,
                      cache_path: str, cache_index: dict[str, str]) -> pa.Table:
    """One teacher step for a batch of documents: the documents it applies to make their requests; cached
    responses are read, the others sent to the teacher in one call and stored in the cache before they are used;
    each document's responses (in request order) go through the step's parser. Other documents pass unchanged."""
    import time as _time

    from finemed_ray.synth.cache import read_stored, store_results

    version = prompts.PROMPT_VERSIONS[PROMPT_VERSION_OF[step]]
    rows = batch.select(DOC_SCHEMA.names).to_pylist()
    out: list[dict | None] = list(rows)
    pending: list[tuple[int, dict, list[dict]]] = []  # (row index, row, [{key, messages}])
    for i, row in enumerate(rows):
        st = json.loads(row["state"])
        if not _selected(row, st, kinds, extra_filter):
            continue
        built = STEPS[step][1](st, cfg)
        if not built:  # applies, but without a teacher call (e.g. no judge when one answer failed)
            st, reason = STEPS[step][2](st, [], cfg, row["doc_id"])
            if reason:
                st.update(dropped_at=step, reason=reason)
            out[i] = _doc(row["doc_id"], DROPPED if reason else ACTIVE, st.get("kind", row["kind"]) or "", st)
            continue
        reqs = [{"key": request_key(step, version, teacher_identity, m), "messages": m} for m in built]
        pending.append((i, row, reqs))
    if pending:
        t0 = _time.time()
        flat = [r for _, _, reqs in pending for r in reqs]
        hit_keys = [r["key"] for r in flat if r["key"] in cache_index]
        responses = read_stored(cache_index, hit_keys, cache_fs) if hit_keys else {}
        todo = [r for r in flat if r["key"] not in cache_index]
        if todo:
            results = _call_teacher(teacher, todo)
            store_results(results, cache_fs, cache_path)  # stored before used: a rerun never asks again
            for req, res in zip(todo, results):
                responses[req["key"]] = res  # a key asked twice in one batch: both rows get an answer
        share = (_time.time() - t0) / len(pending)
        sent = {id(r) for r in todo}
        for i, row, reqs in pending:
            answers = [responses[r["key"]] for r in reqs]
            note = {"requests": len(reqs), "cache_hits": sum(id(r) not in sent for r in reqs),
                    "teacher_calls": sum(id(r) in sent for r in reqs),
                    "errors": sum(bool(a["error"]) for a in answers),
                    "prompt_tokens": sum(a["prompt_tokens"] or 0 for a in answers),
                    "completion_tokens": sum(a["completion_tokens"] or 0 for a in answers), "seconds": share,
                    "error_kinds": {}}
            for a in answers:
                if a["error"]:
                    kind = a["error"].split(":", 1)[0]
                    note["error_kinds"][kind] = note["error_kinds"].get(kind, 0) + 1
            doc_rows = [{**row, "sub": j, "n_sub": len(reqs), "text": a["text"], "error": a["error"]}
                        for j, a in enumerate(answers)]
            out[i] = _apply_doc_row(doc_rows, step, cfg, note)
    return pa.Table.from_pylist(out, schema=DOC_SCHEMA)


def _teacher_stats(docs, plan: list[tuple[str, str]]) -> list[StepStats]:
    """Per-step teacher counts summed over the documents' notes, one entry per step name in pipeline order."""
    stats = {step: StepStats(step=step, teacher=name) for step, name in plan}
    for batch in docs.select_columns(["state"]).iter_batches(batch_format="pyarrow", batch_size=4096):
        for s in batch.column("state").to_pylist():
            for step, note in (json.loads(s).get(_TEACHER_NOTE) or {}).items():
                acc = stats[step]
                for f in _NOTE_FIELDS:
                    setattr(acc, f, getattr(acc, f) + int(note.get(f, 0)))
                acc.seconds = round(acc.seconds + note.get("seconds", 0.0), 3)
                for e, n in (note.get("error_kinds") or {}).items():
                    acc.error_kinds[e] = acc.error_kinds.get(e, 0) + n
    return list(stats.values())


# ------------------------------------------------------------------------------------------------ the job
class SynthesisPipeline:
    def __init__(self, cfg: SynthJobConfig):
        self.cfg = cfg
        self.cfg_dict = cfg.model_dump(mode="json")
        self.out = cfg.output.path
        self.cache_root = storage.join(self.out, "cache")
        self.stats: list[StepStats] = []
        self.teachers: dict[str, Any] = {}
        self.engines: dict[str, Any] = {}  # engine key -> EnginePool (streaming mode, vllm/hf teachers)
        self.engine_teachers: dict[str, list[str]] = {}
        self.run_id = f"{int(time.time() * 1000):x}"
        self.t0 = time.time()

    def teacher(self, step: str):
        from finemed_ray.synth.teachers import make_teacher

        name, spec = self.cfg.teachers.for_step(STEPS[step][0])
        if name not in self.teachers:
            self.teachers[name] = make_teacher(spec)
        return name, self.teachers[name]

    def read(self):
        import ray.data

        from finemed_ray.data.sft_prepare import read_input

        files, fmt, ds = read_input(self.cfg.input.path)
        if self.cfg.input.limit:
            ds = ds.limit(self.cfg.input.limit)
        i = self.cfg.input
        docs = ds.map_batches(seed_batch, batch_format="pyarrow", fn_kwargs=dict(
            fmt=fmt, text_field=i.text_field, max_tokens=i.max_tokens, overlong=i.overlong,
            tokenizer_path=i.tokenizer, source_uri=self.cfg.input.path)).materialize()
        # The read kept input order (read_input: a `limit` keeps the same seeds every run); the LLM steps after it
        # need not wait for stragglers to keep an order: back to the session's setting.
        docs.context.execution_options.preserve_order = (
            ray.data.DataContext.get_current().execution_options.preserve_order)
        if docs.count() == 0:
            raise DataError(f"{self.cfg.input.path}: the seed corpus is empty")
        # Same text twice would mean the same teacher requests twice: keep one, drop the copies with a reason.
        keyed = docs.map_batches(_add_text_hash, batch_format="pyarrow")
        return _fresh(keyed.groupby("text_hash", num_partitions=_partitions(docs.count())).map_groups(
            _dedupe_keyed, batch_format="pyarrow"))

    def step(self, docs, step: str, kinds: tuple[str, ...] | None = None, extra_filter: str | None = None):
        from ray.data.expressions import col

        cond = col("status") == ACTIVE
        if kinds:
            cond = cond & col("kind").is_in(list(kinds))
        selected = docs.filter(expr=cond)
        others = docs.filter(expr=~cond)
        if extra_filter:
            flagged = selected.map_batches(_flag_filter, batch_format="pyarrow", fn_kwargs={"flag": extra_filter})
            others = others.union(flagged.filter(expr=~col("keep")).drop_columns(["keep"]))
            selected = flagged.filter(expr=col("keep")).drop_columns(["keep"])
        flagged = selected.map_batches(_needs_requests, batch_format="pyarrow",
                                       fn_kwargs={"step": step, "cfg": self.cfg_dict}).materialize()
        direct = flagged.filter(expr=~col("needs")).drop_columns(["needs"])
        todo = flagged.filter(expr=col("needs")).drop_columns(["needs"])
        name, teacher = self.teacher(step)
        stats = StepStats(step=step, teacher=name)
        t0 = time.time()
        requests = todo.map_batches(make_requests_batch, batch_format="pyarrow", fn_kwargs={
            "step": step, "cfg": self.cfg_dict, "teacher_identity": teacher.identity})
        answered = run_cached_step(requests, step, teacher, storage.join(self.cache_root, step), stats)
        parts = [others]
        if stats.requests:
            kw = {"step": step, "cfg": self.cfg_dict}
            # Documents with one request need no regrouping; only those with several (e.g. one score per
            # question) go through the groupby shuffle, and only when there are any.
            parts.append(answered.filter(expr=col("n_sub") == 1).map_batches(
                apply_single, batch_format="pyarrow", fn_kwargs=kw))
            multi = answered.filter(expr=col("n_sub") > 1)
            n_multi = multi.count()
            if n_multi:
                parts.append(multi.groupby("doc_id", num_partitions=_partitions(n_multi)).map_groups(
                    apply_group, batch_format="pyarrow", fn_kwargs=kw))
        parts.append(direct.map_batches(apply_no_request, batch_format="pyarrow",
                                        fn_kwargs={"step": step, "cfg": self.cfg_dict}))
        out = _fresh(parts[0].union(*parts[1:]))
        stats.seconds = round(time.time() - t0, 3)
        self.stats.append(stats)
        log.info("step %s: %s", step, json.dumps(stats.to_dict()))
        return out

    def run(self) -> dict[str, Any]:
        with _sort_based_shuffles():
            if self.cfg.execution.mode == "steps":
                return self._run()
            try:
                return self._run_streaming()
            finally:
                self.close_engines()

    def plan(self) -> list[tuple[str, tuple[str, ...] | None, str | None]]:
        """The teacher steps in order: (step, kinds it applies to, extra filter)."""
        out: list[tuple[str, tuple[str, ...] | None, str | None]] = [
            ("classify_primary", None, None), ("classify_secondary", None, None), ("generate_questions", None, None),
            ("score_questions", None, None), ("answer_common", ("common",), None), ("judge", ("common",), None),
            ("answer_complex", ("complex",), None)]
        follow_kinds = tuple(self.cfg.dialogue.follow_up_kinds)
        for _ in range(self.cfg.dialogue.follow_up_turns if follow_kinds else 0):
            out += [("follow_up_question", follow_kinds, "follow_up_open"),
                    ("follow_up_answer", follow_kinds, "pending_follow_up")]
        out.append(("direct_answer", ("complex",), None))
        return out

    def _run(self) -> dict[str, Any]:
        docs = self.read()
        for step, kinds, extra in self.plan():
            if step == "judge" and self.cfg.answers.judge == "reward_model":
                docs = self.reward_model_judge(docs)
            else:
                docs = self.step(docs, step, kinds=kinds, extra_filter=extra)
        docs = self.decontaminate(docs)
        return self.write(docs)

    # ------------------------------------------------------------------------------------- streaming
    def engine_pool(self, name: str, teacher: Any):
        """The run's engine actors for a vllm/hf teacher (started on first use, shared by teachers with the same
        spec); None for http teachers."""
        from finemed_ray.synth.engines import ENGINE_BACKENDS, EnginePool, engine_key

        if teacher.spec.backend not in ENGINE_BACKENDS:
            return None
        key = engine_key(teacher.spec)
        if key not in self.engines:
            t0 = time.time()
            self.engines[key] = EnginePool.start(teacher.spec, self.run_id)
            self.engine_teachers[key] = []
            log.info("engines for teacher %s (%s x%d) ready in %.1fs", name, teacher.identity,
                     teacher.spec.concurrency, time.time() - t0)
        if name not in self.engine_teachers[key]:
            self.engine_teachers[key].append(name)
        return self.engines[key]

    def engine_summary(self) -> list[dict[str, Any]]:
        out = []
        for key, pool in self.engines.items():
            replicas = pool.info()
            out.append({"teachers": self.engine_teachers[key], "identity": pool.identity,
                        "replicas": len(replicas), "engine_starts": sum(r["engine_starts"] for r in replicas),
                        "load_seconds": [r["load_seconds"] for r in replicas],
                        "requests": [r["requests"] for r in replicas],
                        "restarted_replicas": sum(bool(r.get("restarted")) for r in replicas)})
        return out

    def close_engines(self) -> None:
        for pool in self.engines.values():
            pool.close()
        self.engines.clear()

    def _run_streaming(self) -> dict[str, Any]:
        import math

        import ray.data

        docs = self.read()  # a barrier: the seed dedupe needs every copy of a text
        ex = self.cfg.execution
        plan = [(step, self.teacher(step)[0], kinds, extra) for step, kinds, extra in self.plan()]
        teachers: dict[str, tuple[Any, Any]] = {}  # name -> (what a step task calls, identity)
        in_flight = 0
        rm_judge = self.cfg.answers.judge == "reward_model"
        for step, name, _, _ in plan:
            if name in teachers or (step == "judge" and rm_judge):  # no engine for a teacher nothing calls
                continue
            teacher = self.teachers[name]
            pool = self.engine_pool(name, teacher)
            if pool is not None:
                teachers[name] = (("engine", pool, teacher.spec), teacher.identity)
            else:
                teachers[name] = (("http", teacher.spec, teacher._api_key()), teacher.identity)
                in_flight += teacher.options.num_workers
        in_flight += 4 * sum(p.spec.concurrency for p in self.engines.values())
        in_flight = ex.batches_in_flight or max(1, in_flight)
        per_batch = ex.docs_per_batch or self.cfg.teachers.models[self.cfg.teachers.default].batch_size
        n = docs.count()
        # Blocks of one batch each: a task streams its batch through every step while other tasks work on others.
        docs = docs.repartition(max(1, math.ceil(n / per_batch)))
        self.engine_ready_s = round(time.time() - self.t0, 3)
        self.stream_plan = [(step, f"reward_model:{self.cfg.answers.reward_model}"
                             if step == "judge" and self.cfg.answers.judge == "reward_model" else name)
                            for step, name, _, _ in plan]
        for step, name, kinds, extra in plan:
            if step == "judge" and self.cfg.answers.judge == "reward_model":
                docs = self.reward_model_judge(docs)  # its own actor pool: a step boundary (materialised)
                continue
            cache_uri = storage.join(self.cache_root, step)
            fs, path = storage.get_filesystem(cache_uri)
            if not storage.is_s3(cache_uri):
                fs.create_dir(path, recursive=True)
            from finemed_ray.synth.cache import stored_index

            call, identity = teachers[name]
            docs = docs.map_batches(
                stream_step_batch, batch_format="pyarrow", batch_size=None, num_cpus=ex.task_num_cpus,
                compute=ray.data.TaskPoolStrategy(size=in_flight), zero_copy_batch=True,
                fn_kwargs={"step": step, "cfg": self.cfg_dict, "kinds": kinds, "extra_filter": extra,
                           "teacher": call, "teacher_identity": identity, "cache_fs": fs, "cache_path": path,
                           "cache_index": stored_index(cache_uri)})
        bench = self.cfg.decontamination.benchmarks
        if bench:
            from finemed_ray.synth.decontam import Decontaminator

            index = Decontaminator.from_files(bench, n=self.cfg.decontamination.ngram)
            docs = docs.map_batches(_decontam_batch, batch_format="pyarrow", fn_kwargs={"index": index})
        try:  # the one barrier after the dedupe: the outputs are written sorted, and counted
            docs = _fresh(docs)
        except Exception as e:
            from finemed_ray.synth.teachers import find_teacher_unavailable

            down = find_teacher_unavailable(e)
            if down is not None:  # batches finished before the failure stay in the cache for the rerun
                raise down from None
            raise
        self.stream_seconds = round(time.time() - self.t0 - self.engine_ready_s, 3)
        self.stats = _teacher_stats(docs, self.stream_plan)
        return self.write(docs)

    def reward_model_judge(self, docs):
        """Pick between the two common answers with a reward model (higher score wins) instead of a teacher."""
        import ray.data
        from ray.data.expressions import col

        cond = (col("status") == ACTIVE) & (col("kind") == "common")
        judged = docs.filter(expr=cond).map_batches(
            RewardModelJudge, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1), batch_size=16,
            fn_constructor_kwargs={"model_path": self.cfg.answers.reward_model})
        out = docs.filter(expr=~cond).union(judged).materialize()
        self.stats.append(StepStats(step="judge", teacher=f"reward_model:{self.cfg.answers.reward_model}"))
        return out

    def decontaminate(self, docs):
        bench = self.cfg.decontamination.benchmarks
        if not bench:
            return docs
        from finemed_ray.synth.decontam import Decontaminator

        index = Decontaminator.from_files(bench, n=self.cfg.decontamination.ngram)
        return _fresh(docs.map_batches(_decontam_batch, batch_format="pyarrow", fn_kwargs={"index": index}))

    def write(self, docs) -> dict[str, Any]:
        outputs = {}
        for name, builder in (("sft", _sft_rows), ("reasoning", _reasoning_rows), ("dpo", _dpo_rows),
                              ("quarantine", _quarantine_rows)):
            uri = storage.join(self.out, name)
            storage.delete(uri)  # a rerun rewrites outputs from the cache: never a mix of old and new files
            rows = docs.map_batches(builder, batch_format="pyarrow", fn_kwargs={"cfg": self.cfg_dict}).materialize()
            n = rows.count()
            outputs[name] = {"uri": uri, "rows": n}
            if n:
                fs, path = storage.get_filesystem(uri)
                kwargs = {"partition_cols": ["part_department", "part_subdepartment"]} if name == "sft" else {}
                # Sorted: the teacher's calls finish in any order, and a rerun of the same synthesis must give
                # the same files (training reads them in file order, so the same trained model).
                rows.sort("dataset" if name == "quarantine" else "id").write_parquet(path, filesystem=fs, **kwargs)
        manifest = self.manifest(docs, outputs)
        storage.write_json(storage.join(self.out, "manifest.json"), manifest)
        return manifest

    def manifest(self, docs, outputs) -> dict[str, Any]:
        drops: dict[str, dict[str, int]] = {}
        kinds: dict[str, int] = {}
        n_docs = 0
        for batch in docs.iter_batches(batch_format="pyarrow", batch_size=4096):
            for row in batch.to_pylist():
                n_docs += 1
                st = json.loads(row["state"])
                if row["status"] == DROPPED:
                    where = st.get("dropped_at", "?")
                    kind = parsing.reason_kind(st.get("reason")) or "?"
                    drops.setdefault(where, {})
                    drops[where][kind] = drops[where].get(kind, 0) + 1
                else:
                    kinds[row["kind"]] = kinds.get(row["kind"], 0) + 1
        order = ["read", "dedupe"] + [s.step for s in self.stats] + ["decontaminate"]
        steps, remaining = [], n_docs
        for where in dict.fromkeys(order):
            dropped = sum(drops.get(where, {}).values())
            entry = {"step": where, "docs_in": remaining, "dropped": dropped, "reasons": drops.get(where, {})}
            remaining -= dropped
            entry["docs_out"] = remaining
            same = [s for s in self.stats if s.step == where]  # follow-up steps run once per turn: summed
            if same:
                entry["teacher"] = _sum_stats(same).to_dict()
            steps.append(entry)
        return {"job": self.cfg.name, "input": self.cfg.input.path, "docs": n_docs, "kept_by_kind": kinds,
                "steps": steps, "outputs": outputs, "teacher_calls": sum(s.teacher_calls for s in self.stats),
                "cache_hits": sum(s.cache_hits for s in self.stats),
                "prompt_tokens": sum(s.prompt_tokens for s in self.stats),
                "completion_tokens": sum(s.completion_tokens for s in self.stats),
                "seconds": round(time.time() - self.t0, 3), "execution": self.execution_summary(),
                "config": self.cfg_dict}

    def execution_summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.cfg.execution.mode}
        if self.cfg.execution.mode == "streaming":
            # engines: one entry per distinct vllm/hf teacher spec, engine_starts summed over its replicas (one
            # per replica per run); setup: read + dedupe + engine starts; stream: all teacher steps until the
            # documents are materialised for writing.
            out.update(engines=self.engine_summary(), setup_seconds=getattr(self, "engine_ready_s", None),
                       stream_seconds=getattr(self, "stream_seconds", None))
        return out


def _sum_stats(stats: list[StepStats]) -> StepStats:
    if len(stats) == 1:
        return stats[0]
    total = StepStats(step=stats[0].step, teacher=stats[0].teacher)
    for st in stats:
        for f in ("requests", "cache_hits", "teacher_calls", "errors", "prompt_tokens", "completion_tokens"):
            setattr(total, f, getattr(total, f) + getattr(st, f))
        total.seconds = round(total.seconds + st.seconds, 3)
        for k, n in st.error_kinds.items():
            total.error_kinds[k] = total.error_kinds.get(k, 0) + n
    return total


class RewardModelJudge:
    """Scores (question, answer) with a sequence-classification reward model rendered through its chat template."""

    def __init__(self, model_path: str):
        import torch
        from transformers import AutoModelForSequenceClassification

        from finemed_ray.models.loading import load_tokenizer, resolve_model_path

        local = resolve_model_path(model_path)
        self.tokenizer = load_tokenizer(local)
        self.model = AutoModelForSequenceClassification.from_pretrained(local, dtype=torch.float32).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def score(self, question: str, answer: str) -> float:
        import torch

        ids = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            return_tensors="pt", return_dict=True)
        with torch.no_grad():
            return float(self.model(input_ids=ids["input_ids"]).logits[0, 0])

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for row in batch.to_pylist():
            st = json.loads(row["state"])
            answers = st.get("answers", [])
            if all(a is not None for a in answers):
                scores = [self.score(st["question"], a) for a in answers]
                st["judge"] = "A" if scores[0] >= scores[1] else "B"
                st["judge_scores"] = scores
                st["answer"] = answers[0 if st["judge"] == "A" else 1]
            else:
                st["judge"], st["answer"] = "single", next(a for a in answers if a is not None)
            out.append(_doc(row["doc_id"], ACTIVE, row["kind"], st))
        return pa.Table.from_pylist(out, schema=DOC_SCHEMA)


def _fresh(ds):
    """Materialise ``ds`` and start a new lineage from its blocks. Each step unions datasets derived from the
    previous step's; without this, Ray Data's per-execution stats summary walks the whole (exponentially
    duplicated) history of every earlier step and soon costs minutes of driver CPU per step."""
    import ray.data

    return ray.data.from_arrow_refs(ds.materialize().to_arrow_refs())


@contextlib.contextmanager
def _sort_based_shuffles():
    """Run the pipeline's groupbys (dedupe, regrouping a document's responses) on Ray Data's sort-based pull
    shuffle, whose map and reduce steps are tasks in Ray's pooled worker processes, instead of the default
    hash shuffle, which starts aggregator actors for every shuffle: seconds of fixed cost per groupby, several
    times the work on small inputs (32 docs: 28 s -> 15 s for the whole pipeline). Both are distributed. An
    explicit ``RAY_DATA_DEFAULT_SHUFFLE_STRATEGY`` wins. Only this driver's current DataContext changes, and only
    while the pipeline runs (datasets copy the context when they are created)."""
    import os

    from ray.data.context import DataContext, ShuffleStrategy

    ctx = DataContext.get_current()
    before = ctx.shuffle_strategy
    if not os.environ.get("RAY_DATA_DEFAULT_SHUFFLE_STRATEGY"):
        ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        yield
    finally:
        ctx.shuffle_strategy = before


def _partitions(rows: int) -> int:
    # Ray's default of 200 shuffle partitions costs minutes on small inputs; ~2k rows per partition, at most 64.
    return max(1, min(64, rows // 2048 + 1))


def _add_text_hash(batch: pa.Table) -> pa.Table:
    hashes = []
    for row in batch.to_pylist():
        st = json.loads(row["state"])
        hashes.append(st.get("text_hash") or "dropped-" + row["doc_id"])  # dropped rows never collide
    return batch.append_column("text_hash", pa.array(hashes, pa.string()))


def _dedupe_keyed(group: pa.Table) -> pa.Table:
    return dedupe_group(group.drop_columns(["text_hash"]))


def _flag_filter(batch: pa.Table, flag: str) -> pa.Table:
    keep = []
    for s in batch.column("state").to_pylist():
        st = json.loads(s)
        keep.append(not st.get("follow_up_done") if flag == "follow_up_open" else flag in st)
    return batch.append_column("keep", pa.array(keep, pa.bool_()))


def _decontam_batch(batch: pa.Table, index: Any) -> pa.Table:
    out = []
    for row in batch.to_pylist():
        if row["status"] == ACTIVE:
            st = json.loads(row["state"])
            texts = [st.get("question", ""), st.get("answer", ""), st.get("direct_answer", "")] + \
                [m["content"] for m in st.get("follow_ups", [])]
            reason = index.check_all([t for t in texts if t])
            if reason:
                st.update(dropped_at="decontaminate", reason=reason, raw=st.get("question"))
                row = _doc(row["doc_id"], DROPPED, row["kind"], st)
        out.append(row)
    return pa.Table.from_pylist(out, schema=DOC_SCHEMA)


# ------------------------------------------------------------------------------------------------ outputs
SYSTEM_PROMPT = "You are a helpful professional doctor."


def _safe_part(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label).strip("_") or "none"


def _sft_rows(batch: pa.Table, cfg: dict) -> pa.Table:
    rows = []
    for row in batch.to_pylist():
        if row["status"] != ACTIVE or row["kind"] != "common":
            continue
        st = json.loads(row["state"])
        rows.append({"id": row["doc_id"], "messages": _dialogue(st), "department": st["department"],
                     "subdepartment": st["subdepartment"], "source": st["source"],
                     "part_department": _safe_part(st["department"]),
                     "part_subdepartment": _safe_part(st["subdepartment"])})
    return _table(rows, with_parts=True)


def _reasoning_rows(batch: pa.Table, cfg: dict) -> pa.Table:
    rows = []
    for row in batch.to_pylist():
        if row["status"] != ACTIVE or row["kind"] != "complex":
            continue
        st = json.loads(row["state"])
        rows.append({"id": row["doc_id"], "messages": _dialogue(st), "department": st["department"],
                     "subdepartment": st["subdepartment"], "source": st["source"]})
    return _table(rows)


def _dpo_rows(batch: pa.Table, cfg: dict) -> pa.Table:
    from finemed_ray.schemas import DPO_SCHEMA

    rows = []
    for row in batch.to_pylist():
        if row["status"] != ACTIVE or row["kind"] != "complex":
            continue
        st = json.loads(row["state"])
        if not st.get("direct_answer") or st["direct_answer"].strip() == st["answer"].strip():
            continue
        rows.append({"id": row["doc_id"], "prompt": prompts.dpo_prompt(st["question"]),
                     "chosen": [{"role": "assistant", "content": st["answer"]}],
                     "rejected": [{"role": "assistant", "content": st["direct_answer"]}],
                     "department": st["department"], "subdepartment": st["subdepartment"], "source": st["source"]})
    return pa.Table.from_pylist(rows, schema=DPO_SCHEMA)


def _quarantine_rows(batch: pa.Table, cfg: dict) -> pa.Table:
    from finemed_ray.schemas import QUARANTINE_SCHEMA

    rows = []
    for row in batch.to_pylist():
        if row["status"] != DROPPED:
            continue
        st = json.loads(row["state"])
        raw = st.get("raw")
        rows.append({"dataset": f"synthesis:{st.get('dropped_at')}:{row['doc_id']}", "reason": st.get("reason"),
                     "raw": raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False)})
    return pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA)


def _table(rows: list[dict], with_parts: bool = False) -> pa.Table:
    from finemed_ray.schemas import SFT_SCHEMA

    schema = SFT_SCHEMA
    if with_parts:
        schema = schema.append(pa.field("part_department", pa.string())).append(
            pa.field("part_subdepartment", pa.string()))
    return pa.Table.from_pylist(rows, schema=schema)
