"""Generation-mode MCQ scoring (finemed_ray.eval.generative) and the paired McNemar test (finemed_ray.eval.stats)."""

import pytest

from finemed_ray.eval.generative import final_answer, match_option, mcq_generation_accuracy
from finemed_ray.eval.stats import mcnemar_exact, paired_comparison

OPTIONS = [("A", "CT of the abdomen"), ("B", "non-contrast CT of the abdomen and pelvis"), ("C", "serum TSH"),
           ("D", "hemoglobin A1c")]


def test_final_answer_reads_the_conclusion_only():
    reply = ("## Thought\n\nStep 1: Could the answer be serum TSH? No.\n\n## Summarization\n\n"
             "The first-line test for type 2 diabetes is hemoglobin A1c.")
    assert final_answer(reply, cut_off=False) == ("The first-line test for type 2 diabetes is hemoglobin A1c.",
                                                   "reasoning")
    assert final_answer("## Thought\n\nStep 1: serum TSH", cut_off=True) == (None, "cut_off")
    assert final_answer("## Thought\n\nStep 1: serum TSH", cut_off=False) == (None, "unfinished")
    assert final_answer(" Serum TSH. ", cut_off=False) == ("Serum TSH.", "direct")


def test_match_option_is_word_bounded_prefers_the_longer_text_and_refuses_ambiguity():
    assert match_option("The first-line test is Hemoglobin A1c.", OPTIONS) == "D"
    # the shorter option's text lies inside the longer one: the longer one is what was stated
    assert match_option("Order a non-contrast CT of the abdomen and pelvis.", OPTIONS) == "B"
    assert match_option("Order a CT of the abdomen.", OPTIONS) == "A"
    assert match_option("Either serum TSH or hemoglobin A1c.", OPTIONS) is None  # two answers: none
    assert match_option("No idea.", OPTIONS) is None
    assert match_option(None, OPTIONS) is None
    assert match_option("serum TSHX", OPTIONS) is None  # not a whole-word match


def test_mcnemar_exact_values():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)  # 2 * 0.5**6
    assert mcnemar_exact(1, 10) == pytest.approx(2 * 12 / 2048)
    assert mcnemar_exact(10, 1) == mcnemar_exact(1, 10)
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


def test_paired_comparison_counts_discordant_pairs():
    before = [{"id": i, "correct": i < 5} for i in range(20)]
    after = [{"id": i, "correct": i < 5 or 10 <= i < 18} for i in range(20)]
    r = paired_comparison(before, after)
    assert (r["n"], r["gained"], r["lost"]) == (20, 8, 0)
    assert r["delta"] == pytest.approx(0.4) and r["p_value"] == pytest.approx(2 / 256)
    with pytest.raises(ValueError):
        paired_comparison(before, after[:-1])


def test_generation_accuracy_on_a_trained_tiny_model(tmp_path):
    """A tiny model trained for a few steps to answer one fact in the reasoning layout: its generated reply is
    read from the summarization, scored right, and a budget too small to reach it counts as cut off."""
    import torch

    from finemed_ray.toy.sample import reasoning_answer, sample_mcq_items
    from finemed_ray.models.loading import load_model, load_tokenizer
    from finemed_ray.toy.tiny_model import save_tiny_model

    save_tiny_model(str(tmp_path / "m"))
    model, tok = load_model(str(tmp_path / "m")), load_tokenizer(str(tmp_path / "m"))
    item = next(i for i in sample_mcq_items(paraphrases="train") if i["id"].startswith("mcq-drug-00-"))
    p = int(item["id"].rsplit("-p", 1)[1])
    messages = [{"role": "user", "content": item["question"]},
                {"role": "assistant", "content": reasoning_answer("drug", 0, p)}]
    ids = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False, return_tensors="pt")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        loss = model(**ids, labels=ids["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    r = mcq_generation_accuracy(model, tok, [item], max_new_tokens=256)
    assert r["predictions"][0]["form"] == "reasoning", r["predictions"][0]["reply"]
    assert r["accuracy"] == 1.0 and r["cut_off_rate"] == 0.0 and r["chance"] == 0.25
    short = mcq_generation_accuracy(model, tok, [item], max_new_tokens=8)
    assert short["cut_off_rate"] == 1.0 and short["accuracy"] == 0.0 and short["no_answer_rate"] == 1.0
