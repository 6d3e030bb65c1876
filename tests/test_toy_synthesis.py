"""The demo's synthesis: seed corpus -> the real pipeline (Ray Data, S3) -> SFT / reasoning / DPO data, with the
OFFLINE TEACHER (finemed_ray.toy.offline_teacher: rule-based, not an LLM). Asserts facts of the data, not just
that the run finished: every fact is covered in the train wording only, the planted benchmark question is
decontaminated, half of the DPO rejected answers are wrong, and the training data-prep steps read the outputs."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid

import pyarrow.parquet as pq
import pytest

from finemed_ray import storage
from finemed_ray.toy import sample
from finemed_ray.schemas import validate_sft_row
from finemed_ray.synth import parsing, prompts
from finemed_ray.synth.taxonomy import DEFAULT_TAXONOMY
from finemed_ray.toy.offline_teacher import (MODEL_NAME, OfflineTeacherError, OfflineTeacherServer, fact_labels,
                                             is_wrong_direct_answer, offline_teacher_reply, recognise_prompt)
from finemed_ray.toy.seed_corpus import SOURCE, planted_mcq_item, seed_corpus_rows, write_seed_corpus

TABLES = {"drug": sample.DRUG_INDICATIONS, "test": sample.DISEASE_TESTS}
FACTS = [(kind, i) for kind, table in TABLES.items() for i in range(len(table))]
N_FACTS = len(FACTS)
HELDOUT = [sample._question(kind, TABLES[kind][i], p) for kind, i in FACTS for p in (3, 4)]
TRAIN_WORDINGS = (0, 1, 2, 5, 6, 7)  # every train wording the seed corpus asks (sample.CORPUS_TRAIN_PARAPHRASES)


def _q(kind: str, i: int, p: int) -> str:
    return sample._question(kind, TABLES[kind][i], p)


def _plain(kind: str, i: int) -> str:
    return sample._answer(kind, TABLES[kind][i])


def _fold(s: str) -> str:
    return " ".join(s.casefold().split())


# ------------------------------------------------------------------------------------------------ seed corpus
def test_seed_corpus_states_each_fact_twelve_times_and_no_heldout_wording():
    rows = seed_corpus_rows()
    assert rows == seed_corpus_rows()  # deterministic
    assert len(rows) == 12 * N_FACTS + 1 and len({r["id"] for r in rows}) == len(rows)
    assert len({r["text"] for r in rows}) == len(rows)
    facts = [r for r in rows if not r["planted"]]
    assert sorted((r["kind"], r["fact"], r["variant"]) for r in facts) == sorted(
        (kind, i, v) for kind, i in FACTS for v in range(12))
    for r in rows:
        assert r["source"] == SOURCE
        fact = TABLES[r["kind"]][r["fact"]]
        assert _fold(fact[0]) in _fold(r["text"]) and _fold(fact[1]) in _fold(r["text"]), r["id"]
        assert 2 <= r["text"].count(". ") + 1 <= 5, r["text"]  # a few sentences
    for r in facts:
        assert not any(_fold(h) in _fold(r["text"]) for h in HELDOUT), r["id"]
    planted = [r for r in rows if r["planted"]]
    assert len(planted) == 1 and f'"{planted_mcq_item()["question"]}"' in planted[0]["text"]
    assert planted_mcq_item()["question"] in HELDOUT


def test_benchmark_holds_every_heldout_wording():
    from finemed_ray.toy.synthesis import heldout_benchmark_rows

    rows = heldout_benchmark_rows()
    assert rows[0] == planted_mcq_item() and {r["question"] for r in rows} == set(HELDOUT)


def test_write_seed_corpus_local(tmp_path):
    path = write_seed_corpus(str(tmp_path / "seeds.jsonl"))
    lines = open(path).read().splitlines()
    assert [json.loads(line) for line in lines] == seed_corpus_rows()


# ------------------------------------------------------------------------------------------------ offline teacher
def test_every_fact_gets_valid_taxonomy_labels():
    for kind, i in FACTS:
        primary, secondary = fact_labels(kind, i)
        assert DEFAULT_TAXONOMY.match_secondary(secondary, primary) == secondary, (kind, i, primary, secondary)
    assert fact_labels("drug", 0) == ("Internal Medicine", "Endocrinology")  # the demo's curriculum filter


def _ask(messages):
    return offline_teacher_reply(messages)


def test_offline_teacher_answers_each_prompt_builder():
    rows = {r["id"]: " ".join(r["text"].split()) for r in seed_corpus_rows()}
    text = rows["seed-test-01-v1"]  # hypothyroidism, clinic note -> train paraphrase 1
    primary = _ask(prompts.classify_primary(text))
    assert DEFAULT_TAXONOMY.match_primary(primary) == "Internal Medicine"
    assert DEFAULT_TAXONOMY.match_secondary(_ask(prompts.classify_secondary(text, primary)), primary) == "Endocrinology"
    questions = parsing.parse_questions(_ask(prompts.generate_questions(text, 2)), 2)
    assert questions.ok and questions.value[0] == _q("test", 1, 1)
    assert parsing.parse_questions(_ask(prompts.generate_questions(text, 3)), 3).ok
    candidates = [{"question": q, "scores": parsing.parse_scores(_ask(prompts.score_question(text, q))).value}
                  for q in questions.value]
    assert parsing.select_question(candidates, 0, "x").value == 0
    assert parsing.split_kind(candidates[0]["scores"], 8) == "common"
    q = questions.value[0]
    a, b = (_ask(prompts.answer_common(text, q, style)) for style in prompts.ANSWER_STYLES)
    assert a == _plain("test", 1) and b.startswith(_plain("test", 1)) and b != a
    assert parsing.parse_judge(_ask(prompts.judge_answers(q, a, b))).value == "A"
    assert parsing.parse_judge(_ask(prompts.judge_answers(q, b, a))).value == "B"
    dialogue = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    for persona in prompts.PERSONAS:
        follow = _ask(prompts.follow_up_question(dialogue, persona, text=text))
        assert "serum TSH" in follow and follow.endswith("?") and follow not in HELDOUT
        reply = _ask(prompts.follow_up_answer(dialogue + [{"role": "user", "content": follow}], text))
        assert reply.startswith(_plain("test", 1) + " ")

    text2 = rows["seed-drug-05-v5"]  # warfarin, case discussion (handover note) -> paraphrase 2, complex
    q2 = parsing.parse_questions(_ask(prompts.generate_questions(text2, 2)), 2).value[0]
    assert q2 == _q("drug", 5, 2)
    scores = parsing.parse_scores(_ask(prompts.score_question(text2, q2))).value
    assert parsing.split_kind(scores, 8) == "complex" and scores["mentions_specific_details"] is False
    answer = _ask(prompts.answer_complex(text2, q2))
    assert answer == sample.reasoning_answer("drug", 5, 2) and parsing.parse_reasoning(answer).ok
    direct = _ask(prompts.direct_answer(q2))
    assert (direct != _plain("drug", 5)) == is_wrong_direct_answer("drug", 5)


def test_direct_answers_are_wrong_for_a_fixed_half():
    wrong = [(k, i) for k, i in FACTS if is_wrong_direct_answer(k, i)]
    assert len(wrong) == N_FACTS // 2
    for kind, i in FACTS:
        direct = _ask(prompts.direct_answer(_q(kind, i, 2)))
        if (kind, i) in wrong:
            _, ruled_out = sample._reasoning_answer(kind, i, 2, 0)
            assert direct == sample._wrong_answer(kind, TABLES[kind][i], TABLES[kind][ruled_out[0]])
            assert TABLES[kind][i][1] not in direct
        else:
            assert direct == _plain(kind, i)


def test_unknown_prompts_raise_and_the_server_answers_500():
    with pytest.raises(OfflineTeacherError, match="unknown prompt"):
        recognise_prompt([{"role": "user", "content": "Tell me a joke about kidneys."}])
    with pytest.raises(OfflineTeacherError, match="states none of the facts"):
        _ask(prompts.classify_primary("Aspirin is used for headaches."))
    with pytest.raises(OfflineTeacherError, match="unknown question"):
        _ask(prompts.direct_answer("What is aspirin used for?"))
    body = json.dumps({"model": MODEL_NAME, "messages": [{"role": "user", "content": "Write a poem."}]}).encode()
    with OfflineTeacherServer() as srv:
        req = urllib.request.Request(srv.base_url + "/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == 500 and "unknown prompt" in err.value.read().decode()
        ok = json.dumps({"model": MODEL_NAME, "messages": prompts.direct_answer(_q("drug", 0, 0))}).encode()
        with urllib.request.urlopen(urllib.request.Request(srv.base_url + "/chat/completions", data=ok, headers={
                "Content-Type": "application/json"}), timeout=10) as resp:
            assert json.load(resp)["choices"][0]["message"]["content"] == _plain("drug", 0)


# ------------------------------------------------------------------------------------------------ the pipeline run
def _read(uri: str) -> list[dict]:
    rows = []
    if storage.exists(uri):
        for f in storage.list_files(uri, suffixes=(".parquet",)):
            fs, path = storage.get_filesystem(f)
            rows += pq.read_table(path, filesystem=fs).to_pylist()
    return rows


@pytest.fixture(scope="module")
def synth(ray_cluster, s3):
    from finemed_ray.toy.synthesis import synthesize_demo_data

    prefix = f"s3://finemed-test/toy-synth-{uuid.uuid4().hex[:8]}"
    result = synthesize_demo_data(f"{prefix}/out", f"{prefix}/work")
    data = {name: _read(result["uris"][name]) for name in ("sft", "reasoning", "dpo", "quarantine")}
    return {"result": result, "prefix": prefix, **data}


def _by_question(rows: list[dict], field: str = "messages") -> dict[str, dict]:
    out = {}
    for r in rows:
        q = r[field][-1]["content"] if field == "prompt" else r[field][0]["content"]
        assert q not in out, q
        out[q] = r
    return out


def test_sft_covers_every_fact_with_every_train_paraphrase(synth):
    sft = _by_question(synth["sft"])
    assert len(synth["sft"]) == 6 * N_FACTS == synth["result"]["outputs"]["sft"]["rows"]
    for kind, i in FACTS:
        for p in TRAIN_WORDINGS:
            row = sft[_q(kind, i, p)]
            assert row["messages"][1]["content"] == _plain(kind, i)
            assert len(row["messages"]) == 4 and row["messages"][3]["content"].startswith(_plain(kind, i))
            assert (row["department"], row["subdepartment"]) == fact_labels(kind, i)
            assert row["source"] == SOURCE


def test_reasoning_and_dpo_cover_every_fact_with_every_train_paraphrase(synth):
    reasoning, dpo = _by_question(synth["reasoning"]), _by_question(synth["dpo"], "prompt")
    assert len(reasoning) == len(dpo) == 6 * N_FACTS
    wrong = 0
    for kind, i, p in ((k, i, p) for k, i in FACTS for p in TRAIN_WORDINGS):
        q = _q(kind, i, p)
        chosen = sample.reasoning_answer(kind, i, p)
        assert reasoning[q]["messages"][1]["content"] == chosen
        assert len(reasoning[q]["messages"]) == 2  # synth_demo.yaml: follow-ups on SFT dialogues only
        assert (reasoning[q]["department"], reasoning[q]["subdepartment"]) == fact_labels(kind, i)
        row = dpo[prompts.dpo_prompt(q)[-1]["content"]]
        assert row["prompt"] == prompts.dpo_prompt(q)
        assert row["chosen"] == [{"role": "assistant", "content": chosen}]
        rejected = row["rejected"][0]["content"]
        assert "## Thought" not in rejected
        if rejected != _plain(kind, i):
            assert TABLES[kind][i][1] not in rejected  # names another fact's indication / test
            wrong += 1
    assert wrong == 6 * (N_FACTS // 2)  # pairs differ in correctness for half the facts, in reasoning for all


def test_no_heldout_wording_anywhere_and_the_planted_question_is_quarantined(synth):
    blob = _fold(json.dumps([synth[k] for k in ("sft", "reasoning", "dpo")], ensure_ascii=False))
    assert not [h for h in HELDOUT if _fold(h) in blob]
    item = planted_mcq_item()
    by_reason = {q["reason"].split(":")[0]: q for q in synth["quarantine"]}
    assert len(synth["quarantine"]) == 3  # the planted question and the two broken seed lines
    assert sum("seed-broken-json" in q["raw"] for q in synth["quarantine"]) == 1
    assert sum("seed-empty-text" in q["raw"] for q in synth["quarantine"]) == 1
    q = by_reason["contaminated"]
    assert q["reason"] == f"contaminated:heldout_mcq:{item['id']}" and q["raw"] == item["question"]
    steps = {s["step"]: s for s in synth["result"]["steps"]}
    assert steps["decontaminate"]["dropped"] == 1 and steps["decontaminate"]["reasons"] == {"contaminated": 1}
    assert steps["read"]["dropped"] == 2  # the broken lines, kept in the quarantine with their reason
    assert all(s["dropped"] == 0 for name, s in steps.items() if name not in ("decontaminate", "read"))
    assert synth["result"]["docs"] == 12 * N_FACTS + 1 + 2
    assert synth["result"]["kept_by_kind"] == {"common": 6 * N_FACTS, "complex": 6 * N_FACTS}


def test_manifest_names_the_offline_teacher(synth):
    result = synth["result"]
    manifest = storage.read_json(result["uris"]["manifest"])
    assert manifest["config"]["teachers"]["models"]["main"]["model"] == MODEL_NAME
    assert "offline" in manifest["job"]
    assert result["teacher"]["model"] == MODEL_NAME and result["teacher"]["offline"]
    assert result["teacher"]["requests_served"] == manifest["teacher_calls"] > 0
    files = storage.list_files(result["uris"]["sft"], suffixes=(".parquet",))
    assert any("part_department=Internal_Medicine/part_subdepartment=Endocrinology/" in f for f in files)


def test_training_data_prep_reads_the_outputs(synth, tiny_model_dir):
    from finemed_ray.data.dpo_prepare import prepare_dpo
    from finemed_ray.data.sft_prepare import RowSelection, prepare_sft

    uris, run = synth["result"]["uris"], f"{synth['prefix']}/prep"
    sft = prepare_sft(uris["sft"], str(tiny_model_dir), f"{run}/sft", max_length=256,
                      selection=RowSelection(department="Internal Medicine", subdepartment="Endocrinology"))
    assert (sft.rows_valid, sft.rows_quarantined, sft.rows_train) == (6 * N_FACTS, 0, 6 * 4)  # 4 endocrine facts
    assert sft.rows_truncated == 0
    assert all(validate_sft_row(r) is None for r in synth["reasoning"])  # same reader and checks as sft/
    dpo = prepare_dpo(uris["dpo"], str(tiny_model_dir), f"{run}/dpo", max_length=512)
    assert (dpo.rows_valid, dpo.rows_quarantined) == (6 * N_FACTS, 0)
