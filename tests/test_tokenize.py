"""Assistant-only labels: the loss covers assistant turns (and their end-of-turn token) and nothing else."""

import pytest

from finemed_ray.data.tokenize import IGNORE_INDEX, TemplateError, tokenize_conversation, with_system_prompt

CONV = [
    {"role": "system", "content": "You are a helpful professional doctor."},
    {"role": "user", "content": "What is the first-line drug for type 2 diabetes?"},
    {"role": "assistant", "content": "Metformin is the usual first-line drug."},
    {"role": "user", "content": "And a common side effect?"},
    {"role": "assistant", "content": "Gastrointestinal upset."},
]


def labelled_text(tok, out):
    # Decode each contiguous run of labelled tokens.
    runs, cur = [], []
    for tid, lab in zip(out["input_ids"], out["labels"]):
        if lab == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert lab == tid
            cur.append(tid)
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


def test_only_assistant_turns_are_labelled(tiny_tokenizer):
    out = tokenize_conversation(tiny_tokenizer, CONV, max_length=512)
    runs = labelled_text(tiny_tokenizer, out)
    assert len(runs) == 2
    assert runs[0].startswith("Metformin is the usual first-line drug.")
    assert runs[1].startswith("Gastrointestinal upset.")
    # The end-of-turn token is learned, so generation stops; no user or system text is.
    end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    labelled = [t for t, lab in zip(out["input_ids"], out["labels"]) if lab != IGNORE_INDEX]
    assert labelled.count(end) == 2
    joined = "".join(runs)
    assert "first-line drug for" not in joined and "professional doctor" not in joined
    assert out["num_tokens"] == len(out["input_ids"]) and not out["truncated"]


def test_truncation_keeps_start_and_reports(tiny_tokenizer):
    out = tokenize_conversation(tiny_tokenizer, CONV, max_length=20)
    assert len(out["input_ids"]) == 20 and out["truncated"] and out["num_tokens"] > 20


def test_system_prompt_added_once():
    conv = CONV[1:3]
    assert with_system_prompt(conv, "S")[0] == {"role": "system", "content": "S"}
    assert with_system_prompt(CONV, "S") == CONV
    assert with_system_prompt(conv, None) == conv


def test_template_that_rewrites_history_is_rejected(tiny_tokenizer):
    class Rewriting:
        # Drops earlier assistant turns (like templates that strip old reasoning): not prefix-stable.
        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            last_a = max([i for i, m in enumerate(messages) if m["role"] == "assistant"], default=-1)
            kept = [m["content"] for i, m in enumerate(messages) if m["role"] != "assistant" or i == last_a]
            return "|".join(kept) + ("|A:" if add_generation_prompt else "")

    with pytest.raises(TemplateError, match="prefix-stable"):
        tokenize_conversation(Rewriting(), CONV, max_length=64)
