"""Answer extraction from free-text replies: every supported form, the last stated answer, and no false positives."""

from __future__ import annotations

import pytest

from finemed_ray.eval.extract import Extraction, extract_answer, normalize_text

ABCD = {"A": "Disclose the error to the patient",
        "B": "Tell the attending that he cannot fail to disclose this mistake",
        "C": "Report the physician to the ethics committee", "D": "Refuse to dictate the operative report"}
TEN = {k: f"Drug {k.lower()}{i}" for i, k in enumerate("ABCDEFGHIJ")}
YNM = {"A": "yes", "B": "no", "C": "maybe"}


@pytest.mark.parametrize(
    ("text", "letter", "method"),
    [
        ("the answer is (B)", "B", "answer_phrase"),
        ("The answer is B", "B", "answer_phrase"),
        ("The answer is B.", "B", "answer_phrase"),
        ("Answer: B", "B", "answer_phrase"),
        ("answer: (b)", "B", "answer_phrase"),
        ("**Answer:** C", "C", "answer_phrase"),
        ("Final answer: **C**", "C", "answer_phrase"),
        ("The correct option is D because the report must be accurate.", "D", "answer_phrase"),
        ("So the answer is option C.", "C", "answer_phrase"),
        ("Option B is correct.", "B", "answer_phrase"),
        ("The correct answer is **B. Tell the attending**", "B", "answer_phrase"),
        ("Therefore: $\\boxed{D}$", "D", "boxed"),
        ("**B**", "B", "bare_letter"),
        ("B.", "B", "bare_letter"),
        ("(B)", "B", "bare_letter"),
        ("B", "B", "bare_letter"),
        ("  c  ", None, "none"),  # lower-case bare letter: not a letter answer
        ("B) Tell the attending that he cannot fail to disclose this mistake", "B", "leading_label"),
        ("B. Tell the attending", "B", "leading_label"),
        ("(D) Refuse to dictate\nBecause it would be dishonest.", "D", "leading_label"),
        ("After weighing the options, I pick **C** here.", "C", "bold"),
        ("Reasoning about ethics...\nThe resident must be honest.\n\nB", "B", "trailing_letter"),
        ("Some reasoning.\n(A)", "A", "trailing_letter"),
        ("Tell the attending that he cannot fail to disclose this mistake.", "B", "option_text"),
        ("  report the physician to the ETHICS committee ", "C", "option_text"),
        ("Long reasoning here.\nRefuse to dictate the operative report", "D", "option_text"),
        ("The answer is Report the physician to the ethics committee, since...", "C", "answer_phrase_text"),
    ],
)
def test_forms(text, letter, method):
    assert extract_answer(text, ABCD) == Extraction(letter, method)


def test_changed_mind_takes_the_last_statement():
    changed = "The answer is (A). Wait, actually the answer is (C)."
    assert extract_answer(changed, ABCD) == Extraction("C", "answer_phrase")
    text = "Answer: B\n\nOn reflection, that ignores consent.\nFinal answer: **D**"
    assert extract_answer(text, ABCD).letter == "D"
    # a rejected (out-of-range) later letter does not override an earlier valid one
    assert extract_answer("The answer is (B). Or maybe (E)? No: the answer is E.", ABCD).letter == "B"


@pytest.mark.parametrize("letter", list("EFGHIJ"))
def test_letters_beyond_d(letter):
    assert extract_answer(f"the answer is ({letter})", TEN).letter == letter
    assert extract_answer(f"Answer: {letter}", TEN).letter == letter
    assert extract_answer(f"{letter}) {TEN[letter]}", TEN).letter == letter
    assert extract_answer(TEN[letter], TEN) == Extraction(letter, "option_text")
    # ...and rejected when the item has only four options
    assert extract_answer(f"the answer is ({letter})", ABCD) == Extraction(None, "none")


def test_prose_is_not_an_answer():
    prose = [
        "A 45-year-old man presents with chest pain. He is stable.",
        "A careful history is needed before deciding.",
        "I think this is a difficult question about ethics.",
        "Consider each choice carefully; none is perfect.",
        "The answer is not obvious.",
        "To find the answer, we weigh autonomy and beneficence.",
        "",
        "   ",
    ]
    for text in prose:
        assert extract_answer(text, ABCD) == Extraction(None, "none"), text
    assert extract_answer(None, ABCD) == Extraction(None, "none")
    # prose starting with "A " before a real answer: the answer statement wins
    assert extract_answer("A 45-year-old man is the patient here.\nThe answer is (C).", ABCD).letter == "C"
    # the prompt's own placeholder is not an answer
    assert extract_answer('Reply in the form "the answer is (X)".', ABCD).letter is None
    # "I think" after an answer phrase is not option I
    assert extract_answer("The answer is I think unclear.", TEN).letter is None


def test_enumerating_the_options_is_not_an_answer():
    text = "A. Disclose - incomplete.\nB. Tell the attending - right.\nC. Report - premature.\nD. Refuse - no."
    assert extract_answer(text, ABCD) == Extraction(None, "none")
    assert extract_answer(text + "\nThe answer is (B).", ABCD).letter == "B"


def test_yes_no_maybe():
    assert extract_answer("Yes", YNM) == Extraction("A", "option_text")
    assert extract_answer("No.", YNM) == Extraction("B", "option_text")
    assert extract_answer("the answer is (C)", YNM) == Extraction("C", "answer_phrase")
    assert extract_answer("The answer is no, the effect was not significant.", YNM) == Extraction(
        "B", "answer_phrase_text")
    assert extract_answer("Yes, the trial showed a clear benefit.", YNM) == Extraction("A", "yes_no_maybe")
    assert extract_answer("The data are mixed.\n\nMaybe", YNM) == Extraction("C", "yes_no_maybe")
    assert extract_answer("Final decision: maybe", YNM).letter == "C"
    # "No significant difference..." is prose, not the word "no" as an answer
    assert extract_answer("No significant difference was found between groups.", YNM) == Extraction(None, "none")
    # yes/no words do not count for ordinary items
    assert extract_answer("Yes, the trial showed a clear benefit.", ABCD) == Extraction(None, "none")


def test_option_text_edge_cases():
    shared = {"A": "Oxidases", "B": "Oxidases", "C": "Transferases", "D": "Lipases"}
    assert extract_answer("Oxidases", shared) == Extraction(None, "none")  # identifies neither A nor B
    assert extract_answer("Transferases", shared) == Extraction("C", "option_text")
    letters_as_text = {"A": "B", "B": "C", "C": "D", "D": "E"}
    assert extract_answer("B", letters_as_text) == Extraction("B", "bare_letter")  # a bare letter is a letter
    assert extract_answer("E", letters_as_text) == Extraction("D", "option_text")  # E is no option letter
    article = {"A": "A smear.", "B": "A culture.", "C": "Serology", "D": "PCR"}
    assert extract_answer("A culture.", article) == Extraction("B", "option_text")
    assert extract_answer("The answer is A culture.", article) == Extraction("B", "answer_phrase_text")
    nested = {"A": "paralysis of the facial muscles.", "B": "paralysis of the facial muscles and loss of taste.",
              "C": "paralysis of the facial muscles, loss of taste and lacrimation.", "D": "none"}
    assert extract_answer("The answer is paralysis of the facial muscles, loss of taste and lacrimation.",
                          nested).letter == "C"  # the longest matching option text wins
    assert normalize_text("  **Tell  the Attending.** ") == "tell the attending"


def test_realistic_reasoning_reply():
    reply = (
        "Let's think step by step.\n"
        "A. Disclosing to the patient is right eventually, but first the attending must be addressed.\n"
        "B. Telling the attending that he cannot fail to disclose is the correct first step.\n"
        "C. Reporting to the ethics committee is premature.\n"
        "D. Refusing to dictate does not solve the problem.\n\n"
        "Therefore, the answer is (B)."
    )
    assert extract_answer(reply, ABCD) == Extraction("B", "answer_phrase")
