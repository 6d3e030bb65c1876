"""Answer extraction from free-text replies: every supported form, the last stated answer, and no false positives."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

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
        # "I pick" is an answer phrase (issue 17: "I choose H"), so the statement rule reads this before the bold rule
        ("After weighing the options, I pick **C** here.", "C", "answer_phrase"),
        ("After weighing the options, **C** seems best here.", "C", "bold"),
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


# ------------------------------------------------------------------------------------------------ issue 17 forms
FIVE = {"A": "Amlodipine", "B": "Metformin", "C": "Lisinopril", "D": "Atorvastatin", "E": "Warfarin"}
PATIENT = {"A": "A patient with a history of falls", "B": "Bed rest", "C": "Physical therapy", "D": "Hip protectors"}


@pytest.mark.parametrize(
    ("text", "options", "letter"),
    [
        ("I'd go with option I", TEN, "I"),
        ("The answer is not A; it is E", TEN, "E"),
        ("I choose H", TEN, "H"),
        ("E is the answer", TEN, "E"),
        ("Answer - H", TEN, "H"),
        ("The likely culprit is the vasopressin axis (option H)", TEN, "H"),
        ("lisinopril!", FIVE, "C"),
        ("**ATORVASTATIN**", FIVE, "D"),
        ("answer: c", ABCD, "C"),
        ("the answer is (e)", FIVE, "E"),
        ("The correct option is (B)", FIVE, "B"),
        ('{"answer": "B"}', FIVE, "B"),
        ("$\\boxed{\\text{C}}$", FIVE, "C"),
        ("Respuesta: B", FIVE, "B"),
        ("Antwort: C", FIVE, "C"),
        ("答案：D", FIVE, "D"),
        ("A is wrong because it is a calcium channel blocker, B is unlikely given the eGFR, so the answer is D.",
         FIVE, "D"),
    ],
)
def test_issue_17_forms(text, options, letter):
    assert extract_answer(text, options).letter == letter


@pytest.mark.parametrize(
    ("text", "options", "letter"),
    [
        ("Answer: A patient with these findings needs imaging first.", ABCD, None),  # "A" is an article
        ("Answer: A patient with a history of falls", PATIENT, "A"),  # ...unless it is option A's own text
        ("Answer: A or B? Actually C.", ABCD, "C"),  # the final self-correction
        ("The answer is either B or C.", FIVE, None),
        ("I think the answer is B or C; I cannot tell.", FIVE, None),
        ("I am not sure.", FIVE, None),
        ("I'm sorry, but I can't provide medical advice.", FIVE, None),
        ("Answer: B\n\nWait, that ignores the eGFR, so B is wrong.", FIVE, None),  # a retraction, nothing after it
        ("The answer is B. Warfarin", FIVE, None),  # the letter and the text contradict each other
        ("Some would say the answer is A, but I don't have a final answer.", FIVE, None),
        ("B is incorrect. C is incorrect. D is incorrect. E is incorrect.", FIVE, None),  # elimination only
        ("Metformin is contraindicated here.", FIVE, None),  # an option text in prose is no answer
        ("Answer: E. coli", {"A": "Klebsiella", "B": "Proteus", "C": "Enterococcus", "D": "Escherichia coli",
                             "E": "Pseudomonas"}, None),  # an abbreviation, not option E
        ("(A) Amlodipine (B) Metformin (C) Lisinopril", FIVE, None),  # an echoed option list
        ("Treatment of choice is:\n\nA. Amlodipine\nB. Metformin\nC. Lisinopril", FIVE, None),
    ],
)
def test_false_answers_are_refused(text, options, letter):
    assert extract_answer(text, options).letter == letter


def test_option_texts_with_letters_are_not_letters():
    hep = {"A": "Hepatitis B", "B": "Hepatitis C", "C": "Hepatitis D", "D": "Hepatitis A"}
    assert extract_answer("Hepatitis B is the correct answer.", hep) == Extraction("A", "answer_phrase_text")
    assert extract_answer("The answer is Hepatitis C.", hep) == Extraction("B", "answer_phrase_text")
    assert extract_answer("hepatitis a", hep) == Extraction("D", "option_text")
    vit = {"A": "Vitamin A", "B": "Vitamin B1", "C": "Vitamin B6", "D": "Vitamin B12"}
    assert extract_answer("The answer is vitamin B12.", vit).letter == "D"  # not "Vitamin B1" (word-bounded)
    assert extract_answer("The answer is vitamin B1, given the Wernicke signs.", vit).letter == "B"
    assert extract_answer("Vitamin A is unlikely here; more workup is needed.", vit).letter is None
    # symbols, decimal points and minus signs distinguish options that differ only by them
    assert extract_answer("15.6", {"A": "156", "B": "15.6", "C": "1.56", "D": "15600"}).letter == "B"
    assert extract_answer("80", {"A": "20", "B": "-20", "C": "80", "D": "-80"}).letter == "C"
    assert extract_answer(">81 dB", {"A": "61-71 dB", "B": ">81 dB", "C": ">91 dB", "D": ">101 dB"}).letter == "B"


def test_pathological_replies_stay_fast():
    import time

    start = time.perf_counter()
    for text in ("the answer is B " * 3000, "answer is " + " " * 20000 + "x", "_" * 20000 + "x",
                 "I think " * 5000 + "B", "x" + " " * 20000 + "is correct", ("word " * 20000).strip()):
        extract_answer(text, TEN)
    assert time.perf_counter() - start < 5


# ------------------------------------------------------------------------------------------------ the corpus
CORPUS = Path(__file__).resolve().parent / "data" / "extraction_corpus.jsonl"


def _corpus() -> list[dict]:
    return [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_corpus_is_well_formed():
    rows = _corpus()
    assert len(rows) >= 150
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert set(r) == {"id", "options", "reply", "gold", "form"}, r["id"]
        assert list(r["options"]) == list("ABCDEFGHIJ"[: len(r["options"])]), r["id"]
        assert r["gold"] == "none" or r["gold"] in r["options"], r["id"]
        assert isinstance(r["reply"], str) and r["form"], r["id"]
    by_count = Counter(len(r["options"]) for r in rows)
    assert set(by_count) == {4, 5, 10} and min(by_count.values()) >= 30, by_count
    assert sum(r["gold"] == "none" for r in rows) >= 30  # enough replies that must not be read


def test_corpus_precision_and_recall(record_property, capsys):
    """Run the extractor over the phrasing corpus and report precision (correct letters / letters returned),
    recall (correct letters / gold letters) and overall agreement (a correct "none" counts). A gold of "none"
    means the reply states no answer explicitly (a hedge, a refusal, prose, an echoed prompt), even where one
    could be guessed from it. Fails below 97% overall or when wrong letters exceed 1% of the replies."""
    rows = _corpus()
    returned = correct = gold_letters = agree = 0
    wrong, missed = [], []
    for r in rows:
        gold = None if r["gold"] == "none" else r["gold"]
        got = extract_answer(r["reply"], r["options"])
        gold_letters += gold is not None
        agree += got.letter == gold
        if got.letter is not None:
            returned += 1
            if got.letter == gold:
                correct += 1
            else:
                wrong.append(f"{r['id']} [{r['form']}] gold={r['gold']} got={got.letter} ({got.method}): "
                             f"{r['reply']!r}")
        elif gold is not None:
            missed.append(f"{r['id']} [{r['form']}] gold={gold}: {r['reply']!r}")
    n = len(rows)
    precision, recall, overall = correct / max(returned, 1), correct / gold_letters, agree / n
    counts = ", ".join(f"{k} options: {v}" for k, v in sorted(Counter(len(r["options"]) for r in rows).items()))
    report = (f"extraction corpus ({n} replies; {counts}): precision {precision:.1%} ({correct}/{returned} letters "
              f"returned), recall {recall:.1%} ({correct}/{gold_letters} gold letters), overall {overall:.1%} "
              f"({agree}/{n}, correct 'none' included), wrong letters {len(wrong)} ({len(wrong) / n:.2%})")
    for name, value in (("precision", precision), ("recall", recall), ("overall", overall),
                        ("wrong_letter_rate", len(wrong) / n), ("replies", n)):
        record_property(f"extraction_{name}", round(value, 4))
    with capsys.disabled():  # shown with or without -s
        print("\n" + report)
    details = "\n".join([report, "wrong letters:", *wrong, "missed:", *missed])
    assert overall >= 0.97, details
    assert len(wrong) <= 0.01 * n, details


# ------------------------------------------------------------------------------------------------ prompting
def test_option_texts_render_on_one_line():
    from finemed_ray.eval.benchmarks import MCQItem
    from finemed_ray.eval.prompting import build_messages, format_options, option_continuations, option_text

    assert option_text("  Start IV fluids\nand\tantibiotics \r\n now  ") == "Start IV fluids and antibiotics now"
    item = MCQItem(id="1", question="Next step?", answer="B", benchmark="t",
                   options={"A": "Observation", "B": "Start IV fluids\nand antibiotics",
                            "C": "CT\tscan  of the\n\nabdomen", "D": " Surgery "})
    assert format_options(item) == (
        "A. Observation\nB. Start IV fluids and antibiotics\nC. CT scan of the abdomen\nD. Surgery")
    user = build_messages(item, mode="direct")[1]["content"]
    assert "B. Start IV fluids and antibiotics\nC. CT scan of the abdomen\nD. Surgery\n\n" in user
    assert option_continuations(item)[1] == ("B", "The answer is (B) Start IV fluids and antibiotics")
    assert option_continuations(item, style="text")[2] == ("C", "CT scan of the abdomen")
    assert item.options["B"] == "Start IV fluids\nand antibiotics"  # the item itself is not changed
    # a reply quoting the rendered text is still read as that option
    assert extract_answer("The answer is Start IV fluids and antibiotics.", item.options).letter == "B"
