"""Tiny Llama model + local tokenizer, model loading (local / S3), and the synthetic medical-facts data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from finemed_ray import storage
from finemed_ray.toy.sample import (
    DEFAULT_SYSTEM_PROMPT,
    DEPARTMENTS,
    bad_sft_rows,
    sample_mcq_items,
    sample_sft_rows,
    tokenizer_corpus,
    write_jsonl,
)
from finemed_ray.errors import ModelError
from finemed_ray.models import loading
from finemed_ray.toy import tiny_model as tiny

CONVERSATION = [
    {"role": "system", "content": "You are a helpful professional doctor."},
    {"role": "user", "content": "What is metformin used to treat?"},
    {"role": "assistant", "content": "Metformin is used to treat type 2 diabetes."},
    {"role": "user", "content": "And levothyroxine?\nAnswer briefly."},
    {"role": "assistant", "content": "Levothyroxine is used to treat hypothyroidism."},
]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_tiny_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "model"
    out.mkdir()
    model = tiny.build_tiny_model(tokenizer, seed=0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def reloaded(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir)


def _logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


# ------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_is_deterministic_and_medical(tokenizer):
    again = tiny.build_tiny_tokenizer()
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    assert 1000 < len(tokenizer) <= 4096
    # Trained on medical text: common medical words are single tokens.
    for word in (" diabetes", " ultrasound", " hypertension", " patient", " infection", " metformin"):
        assert len(tokenizer.encode(word, add_special_tokens=False)) == 1, word
    # A different corpus gives a different (smaller) vocabulary.
    small = tiny.build_tiny_tokenizer(corpus=["aaa bbb aaa bbb"] * 10, vocab_size=300)
    assert len(small) < len(tokenizer)


def test_special_tokens(tokenizer):
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tiny.SPECIAL_TOKENS}
    assert sorted(ids.values()) == list(range(5))
    assert tokenizer.bos_token == tiny.BOS_TOKEN
    assert tokenizer.eos_token == tiny.IM_END
    assert tokenizer.pad_token == tiny.PAD_TOKEN and tokenizer.pad_token_id != tokenizer.eos_token_id
    # No special tokens are added implicitly: only the chat template places them.
    assert tokenizer("hello").input_ids == tokenizer.encode("hello", add_special_tokens=False)
    # Control tokens inside rendered chats are single ids.
    enc = tokenizer.encode(tokenizer.apply_chat_template(CONVERSATION, tokenize=False), add_special_tokens=False)
    assert enc.count(ids[tiny.IM_START]) == 5 and enc.count(ids[tiny.IM_END]) == 5


@pytest.mark.parametrize(
    "text",
    [
        "Plain ASCII, with punctuation: (a) 1/2; b=3!",
        "Ünïcödé: café, naïve, Straße, Ελληνικά, русский, 中文医学, 日本語, 한국어, עברית, العربية",
        "emoji 🙂🩺💊 and ZWJ 👩‍⚕️, combining e\u0301, NBSP\u00a0, tab\tnewline\n  two spaces  ",
        "\x00\x07 control chars and a lone \r carriage return\r\n",
        "",
    ],
)
def test_encode_decode_round_trip(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids


# ------------------------------------------------------------------------------------------- chat template


def test_chat_template_renders_chatml(tokenizer):
    text = tokenizer.apply_chat_template(CONVERSATION[:3], tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful professional doctor.<|im_end|>\n"
        "<|im_start|>user\nWhat is metformin used to treat?<|im_end|>\n"
        "<|im_start|>assistant\nMetformin is used to treat type 2 diabetes.<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(CONVERSATION[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nWhat is metformin used to treat?<|im_end|>\n<|im_start|>assistant\n"
    # The {% generation %} markers give the assistant mask: the assistant content plus its end-of-turn token.
    enc = tokenizer.apply_chat_template(CONVERSATION[:3], return_dict=True, return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert tokenizer.decode(masked) == "Metformin is used to treat type 2 diabetes.<|im_end|>"


@pytest.mark.parametrize("system", [True, False])
def test_chat_template_is_prefix_stable(tokenizer, system):
    conv = CONVERSATION if system else CONVERSATION[1:]

    def render(msgs, gen=False):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) if msgs else ""

    full = render(conv)
    checked = 0
    for i in range(len(conv) + 1):
        assert full.startswith(render(conv[:i])), i
        if i < len(conv) and conv[i]["role"] == "assistant":
            assert render(conv[: i + 1]).startswith(render(conv[:i], gen=True)), i
            checked += 1
    assert checked == 2
    # Token level too: the prompt's ids are a prefix of the full conversation's ids.
    prompt_ids = tokenizer.apply_chat_template(conv[:-1], add_generation_prompt=True, return_dict=True)["input_ids"]
    full_ids = tokenizer.apply_chat_template(conv, return_dict=True)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids


# ------------------------------------------------------------------------------------------- model


def test_reload_with_auto_classes(reloaded, tokenizer):
    tok, model = reloaded
    assert tok.chat_template == tiny.CHAT_TEMPLATE
    assert tok.get_vocab() == tokenizer.get_vocab()
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == (tiny.IM_END, tiny.PAD_TOKEN, tiny.BOS_TOKEN)
    cfg = model.config
    assert cfg.model_type == "llama"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (128, 2, 2, 2)
    assert cfg.head_dim == 64 and cfg.intermediate_size == 256 and cfg.max_position_embeddings == 2048
    assert cfg.vocab_size == len(tokenizer)
    assert next(model.parameters()).dtype == torch.float32
    im_end, eot = tok.convert_tokens_to_ids([tiny.IM_END, tiny.END_OF_TEXT_TOKEN])
    assert cfg.eos_token_id == im_end and cfg.pad_token_id == tok.pad_token_id and cfg.bos_token_id == tok.bos_token_id
    assert model.generation_config.eos_token_id == [im_end, eot]
    assert model.generation_config.pad_token_id == tok.pad_token_id


def test_model_is_seeded(tokenizer, reloaded):
    _, model = reloaded
    rng_before = torch.get_rng_state()
    same = tiny.build_tiny_model(tokenizer, seed=0)
    assert torch.equal(torch.get_rng_state(), rng_before)  # building does not disturb the caller's RNG
    other = tiny.build_tiny_model(tokenizer, seed=1)
    assert torch.equal(_logits(same, tokenizer), _logits(model, tokenizer))
    assert not torch.equal(_logits(other, tokenizer), _logits(model, tokenizer))


def test_generate_produces_text(reloaded):
    tok, model = reloaded
    reply = loading.generate_reply(model, tok, CONVERSATION[:2], max_new_tokens=12)
    assert isinstance(reply, str) and reply.strip()
    assert tiny.IM_START not in reply and tiny.IM_END not in reply
    assert reply == loading.generate_reply(model, tok, CONVERSATION[:2], max_new_tokens=12)  # greedy


@pytest.mark.parametrize("stop_token", [tiny.IM_END, tiny.END_OF_TEXT_TOKEN])
def test_generate_stops_at_end_tokens(reloaded, stop_token):
    """Force the stop token to be the argmax after 3 new tokens: generate() must stop right there."""
    tok, model = reloaded
    stop_id = tok.convert_tokens_to_ids(stop_token)
    inputs = tok.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)
    prompt_len = inputs["input_ids"].shape[1]

    def boost(_module, _args, logits):
        if logits.shape[1] == 1 and getattr(boost, "steps", 0) >= 3:  # decoding steps after the third token
            logits = logits.clone()
            logits[..., stop_id] += 1e4
        boost.steps = getattr(boost, "steps", 0) + 1
        return logits

    handle = model.lm_head.register_forward_hook(boost)
    try:
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    finally:
        handle.remove()
    new = out[0, prompt_len:].tolist()
    assert len(new) == 4 and new[-1] == stop_id
    assert stop_id not in new[:-1]


# ------------------------------------------------------------------------------------------- S3 + loading


def test_save_to_s3_and_load_back(s3_prefix, tmp_path, monkeypatch, model_dir, reloaded):
    monkeypatch.setenv("FINEMED_CACHE_DIR", str(tmp_path / "cache"))
    uri = storage.join(s3_prefix, "tiny")
    assert tiny.save_tiny_model(uri) == uri
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert storage.exists(storage.join(uri, name)), name
    assert storage.exists(storage.join(uri, "chat_template.jinja")) or "chat_template" in json.loads(
        storage.read_text(storage.join(uri, "tokenizer_config.json"))
    )

    local = loading.resolve_model_path(uri)
    assert local != uri and os.path.isdir(local) and local.startswith(str(tmp_path / "cache"))
    assert os.path.isfile(os.path.join(local, "config.json"))
    tok = loading.load_tokenizer(uri)
    model = loading.load_model(uri)
    ref_tok, ref_model = reloaded
    assert tok.get_vocab() == ref_tok.get_vocab() and tok.chat_template == ref_tok.chat_template
    assert torch.equal(_logits(model, tok), _logits(ref_model, ref_tok))
    assert loading.load_model(uri, dtype="bfloat16").dtype == torch.bfloat16


def test_cli_saves_local_model(tmp_path):
    out = tmp_path / "cli-model"
    assert tiny.main(["--output", str(out), "--hidden-size", "64", "--layers", "1", "--seed", "3"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["head_dim"]) == (64, 1, 32)
    model = loading.load_model(str(out))
    tok = loading.load_tokenizer(str(out))
    assert loading.generate_reply(model, tok, CONVERSATION[1:2], max_new_tokens=4) is not None


def test_missing_local_path_is_model_error(tmp_path):
    missing = str(tmp_path / "no-such-model")
    for fn in (loading.resolve_model_path, loading.load_model, loading.load_tokenizer):
        with pytest.raises(ModelError, match="no-such-model"):
            fn(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match=r"empty.*config\.json"):
        loading.load_model(str(empty))
    with pytest.raises(ModelError, match="dtype"):
        loading.load_model(str(empty), dtype="int3")


def test_tokenizer_without_chat_template_is_model_error(tokenizer, tmp_path):
    out = tmp_path / "no-template"
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"no-template: tokenizer has no chat template; use a chat/instruct model"):
        loading.load_tokenizer(str(out))
    tok = loading.load_tokenizer(str(out), require_chat_template=False)
    assert not tok.chat_template and tok.pad_token == tiny.PAD_TOKEN


def test_tokenizer_pad_defaults_to_eos(tokenizer, tmp_path):
    out = tmp_path / "no-pad"
    tokenizer.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("pad_token")
    cfg_path.write_text(json.dumps(cfg))
    tok = loading.load_tokenizer(str(out))
    assert tok.pad_token == tok.eos_token == tiny.IM_END


# ------------------------------------------------------------------------------------------- sample data


def test_sample_rows_are_deterministic_and_well_formed():
    rows = sample_sft_rows()
    assert rows == sample_sft_rows() and rows != sample_sft_rows(seed=1)
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in sample_sft_rows(seed=1))
    assert len({r["id"] for r in rows}) == len(rows) == 64 * 3
    for r in rows:
        roles = [m["role"] for m in r["messages"]]
        assert roles == ["system", "user", "assistant"]
        assert r["messages"][0]["content"] == DEFAULT_SYSTEM_PROMPT
        assert r["department"] in DEPARTMENTS and r["subdepartment"] and r["source"] == "synthetic-facts"
    no_sys = sample_sft_rows(n=5, system_prompt=None)
    assert [[m["role"] for m in r["messages"]] for r in no_sys] == [["user", "assistant"]] * 5
    assert {r["department"] for r in rows} == set(DEPARTMENTS)
    many = sample_sft_rows(n=500)
    assert len(many) == 500 and len({r["id"] for r in many}) == 500


def test_heldout_paraphrases_are_disjoint_from_train():
    train = sample_sft_rows(paraphrases="train", system_prompt=None)
    heldout = sample_sft_rows(paraphrases="heldout", system_prompt=None)
    q_train = {r["messages"][0]["content"] for r in train}
    q_held = {r["messages"][0]["content"] for r in heldout}
    assert q_train and q_held and not (q_train & q_held)
    # Same facts (same answers), different wording.
    assert {r["messages"][1]["content"] for r in train} == {r["messages"][1]["content"] for r in heldout}
    assert len(sample_sft_rows(paraphrases="all")) == len(train) + len(heldout)
    with pytest.raises(ValueError):
        sample_sft_rows(paraphrases="test")


def test_mcq_items_contain_gold_answer():
    items = sample_mcq_items()
    assert items == sample_mcq_items() and len(items) == 64
    heldout_questions = {r["messages"][0]["content"] for r in sample_sft_rows(paraphrases="heldout", system_prompt=None)}
    for it in items:
        assert set(it["options"]) == {"A", "B", "C", "D"} and len(set(it["options"].values())) == 4
        assert it["options"][it["answer_idx"]] == it["answer"]
        assert it["question"] in heldout_questions
    letters = [it["answer_idx"] for it in items]
    assert all(letters.count(x) >= 5 for x in "ABCD")  # gold position is spread out


def test_bad_rows_and_write_jsonl(tmp_path):
    bad = bad_sft_rows()
    assert any(isinstance(r, str) for r in bad) and len(bad) >= 7
    rows = sample_sft_rows(n=3) + bad
    path = tmp_path / "sub" / "data.jsonl"
    assert write_jsonl(rows, str(path)) == str(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(rows)
    assert json.loads(lines[0]) == rows[0]
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[-1])


def test_write_jsonl_to_s3(s3_prefix):
    uri = storage.join(s3_prefix, "data.jsonl")
    rows = sample_sft_rows(n=4)
    write_jsonl(rows, uri)
    assert [json.loads(line) for line in storage.read_text(uri).splitlines()] == rows


def test_tokenizer_corpus_covers_the_task():
    corpus = tokenizer_corpus()
    assert len(corpus) > 500 and all(isinstance(line, str) and line for line in corpus)
    assert any("metformin" in line for line in corpus)
