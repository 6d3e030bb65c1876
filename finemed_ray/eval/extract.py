"""Which option did a model's free-text reply choose? Rule-based answer extraction for multiple-choice items.

A false answer is worse than no answer: a wrong letter counts as knowledge the model may not have, a ``none`` is
only a miss. So every rule below needs an explicit signal, and every doubt (a hedge, a contradiction, a retraction,
an option text shared by two options) ends in ``Extraction(None, "none")`` rather than a guess.

Terms
-----

* **letter**: one of the item's option letters (A-J) standing alone: not part of a word (``B12``, ``B-cell``,
  ``I'd``), not an abbreviation (``E. coli``), not the English article or pronoun (``A patient``, ``A 45-year-old``,
  ``I think``): an upper-case letter followed by a lower-case word counts only when that word is a connector such
  as ``because``, ``since``, ``here``. Lower-case letters count only in an answer context and only in brackets or
  quotes, before ``)``, or followed by nothing but punctuation (``answer: c``, ``(b)``, ``b) metformin``); a reply
  that is only ``c`` is not read. Letters that are not among the item's options are ignored.
* **option text**: an option's text compared without case, spaces, markup and punctuation (``Vitamin B-12
  deficiency`` = ``vitamin b12 deficiency``; symbols, decimal points and minus signs are kept, so ``↓ ↑`` and
  ``15.6`` and ``-20`` stay distinct), with or without a leading article. Inside a sentence it must end at a word
  boundary (``Vitamin B1`` is not read from ``Vitamin B12``) and the longest matching text wins. A text two
  options share identifies neither.
* **choice**: a letter or an option text read at one place; the text wins when it is longer than one character
  (``the answer is A culture`` is the option "A culture.", not the letter A). A choice is **void** when it is
  hedged (``B or C``, ``B/C``, ``either B or C``, ``B? Or C?``, ``B?``, ``metformin or insulin``) or contradicts
  itself (``B) Vitamin C``, or ``B. Vitamin C`` ending the line, where "Vitamin C" is another option's text).

Rules, in order: the first rule that yields an answer wins; ``Extraction.method`` names it
------------------------------------------------------------------------------------------

1. ``bare_letter`` -- the whole reply is one letter, possibly marked up: ``B``, ``(B)``, ``B.``, ``**B**``,
   ``Option D.``, ``option b``, ``Letter G``.
2. ``option_text`` -- the whole reply is exactly one option's text (``METFORMIN.``, ``"Long thoracic nerve"``,
   ``40mg``). A text shared by two options: ``none``, and no later rule is tried.
3. ``answer_phrase`` / ``answer_phrase_text`` / ``boxed`` -- explicit answer statements anywhere in the reply
   (markdown removed). **The last statement wins.** If it is void, or an explicit negation of its letter comes
   after it ("Answer: B ... so B is wrong"), the answer is ``none``. Statements:

   a. an answer phrase followed by a choice on the same line (or on the next line, unless that line starts an
      option list, as in an echoed prompt): ``the answer is (B)``, ``Answer: c``, ``Answer - H``,
      ``Final answer — J``, ``The correct option is (B)``, ``the right choice here would be option C``,
      ``the answer to this question is B``, ``{"answer": "B"}``, ``Most likely: E``, ``I'd go with option I``,
      ``I choose H``, ``I'm going to choose D``, ``I think B.``, ``I'll go with the ulnar nerve``,
      ``The answer is Hepatitis C`` (an option text), and in a few other languages: ``Respuesta: B``,
      ``La respuesta correcta es la C``, ``Antwort: C``, ``Die Antwort lautet C``, ``Réponse : E``,
      ``Risposta: B``, ``Resposta: A``, ``Ответ: B``, ``答案：D``, ``答案是 A``, ``正解はC``. A phrase
      in a reported or hypothetical clause is not the model's statement: ``Some would say the answer is A``,
      ``If ..., the answer would be D`` (the clause before the phrase holds *if*, *some*, *many*, *students*,
      *would say*, *tempting* ...);
   b. a negated answer phrase (``The answer is not A``, ``The answer isn't B``) states nothing, but a choice
      right after it does: ``The answer is not A; it is E`` -> E;
   c. a letter or an option text declared correct at the start of a clause: ``E is the answer``,
      ``Option B is correct``, ``(C) is correct``, ``Option B (Hepatitis B) is correct``, ``D is the better
      choice``, ``C is more likely``, ``C as the answer``, ``Hepatitis B is the correct answer``. A letter that
      ends a name is not one: ``Vitamin A is the best answer`` is about vitamin A;
   d. ``\\boxed{C}``, ``\\boxed{\\text{C}}``, ``\\boxed{(C)}``;
   e. a conclusion word and a letter ending the sentence: ``Therefore: (B)``, ``So B.``, ``Actually C.``,
      ``In conclusion, option J.``;
   f. ``(option H)`` / ``(choice H)`` ending a line;
   g. the closing clause of the last line: *is / are / be / 's* and a letter followed by nothing, by a connector
      or by that option's own text (``... the most likely diagnosis is B because ...``, ``... the best next step
      is (B) Fine-needle aspiration.``, ``It's B.``), or *is* and an option's text ending the line (``... the
      deficient vitamin is vitamin B12.``), or a bracketed letter ending the last line after some text and not
      after *not / or / and / vs / than* (``... hypokalemia (H).``).

   Explicit negations (``not A``, ``A is wrong``, ``B is incorrect``, ``rule out C``) are collected alongside;
   they only ever remove an answer, never supply one (eliminating B, C and D does not answer A).
4. ``bold`` -- the reply's bold spans that name an option (``**C**``, ``**C. text**``, or an option's text in bold
   ending the last line: ``the dose is **40 mg**.``) all name the same option.
5. ``leading_label`` -- the reply opens with a label: ``B) text``, ``B. Text``, ``(B) text``, ``B: text``,
   ``B - text``, ``Option C: text``. Skipped when the reply holds labels of several options (an enumeration,
   also on one line: ``(A) Insulin (B) Glucagon``), when the label's text is another option's text, for an
   abbreviation (``E. coli is ...``) and for the Q/A mark ``A: <text that is not option A's>``.
6. ``trailing_letter`` -- the last line is just a letter (as in rule 1).
7. ``yes_no_maybe`` -- yes/no/maybe items only: a reply opening with ``Yes,`` / ``No.`` / ``Maybe`` followed by
   punctuation, or a last line that is one of the words.
8. ``option_text`` -- the last line is exactly one option's text.
9. ``none`` -- nothing above applies. There is no further fallback: an option's text somewhere in prose ("A
   patient with CKD should not receive metformin.") is not an answer.

A reply that is a single letter is read as that letter even when another option's *text* is that letter (rare
MedQA items list options such as ``A: "B", B: "C"``); the letter reading is the one a model asked for a letter means.

``tests/data/extraction_corpus.jsonl`` holds several hundred hand-written replies (4-, 5- and 10-option items)
with the reading a careful human gives them; ``tests/test_eval_extract.py`` prints precision, recall and overall
agreement on it and fails if the extractor returns a wrong letter for more than 1% of the replies.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from itertools import islice
from dataclasses import dataclass

from finemed_ray.schemas import OPTION_LETTERS

__all__ = ["Extraction", "METHODS", "extract_answer", "normalize_text"]

METHODS = (
    "bare_letter", "option_text", "answer_phrase", "answer_phrase_text", "boxed", "bold", "leading_label",
    "trailing_letter", "yes_no_maybe", "none",
)


@dataclass(frozen=True)
class Extraction:
    """The chosen letter (None when nothing could be read) and the rule that found it (one of ``METHODS``)."""

    letter: str | None
    method: str


NONE = Extraction(None, "none")

_MARKUP = re.compile(r"[*_`]+")
_EDGE_PUNCT = " \t\n.;:!,\"'“”‘’"


def normalize_text(text: str) -> str:
    """Lower case, markdown and edge punctuation removed, whitespace collapsed (a readable form of a text)."""
    text = _MARKUP.sub("", text)
    return " ".join(text.split()).strip(_EDGE_PUNCT).lower()


# ------------------------------------------------------------------------------------------------ text helpers
_QUOTES = str.maketrans({"’": "'", "‘": "'", "“": '"', "”": '"', "\u00a0": " ", "\u200b": ""})
_EMPHASIS = re.compile(r"\*+|`+|(?<!\w)_+|(?<!_)_+(?!\w)")
_LINE_MARKS = re.compile(r"(?m)^[ \t]*(?:#+[ \t]*|>+[ \t]+)")  # headings, quotes (not ">81 dB")
_ARTICLE = re.compile(r"(?i)(?:the|an?)[ \t]+")
# Words that may follow an upper-case letter in an answer ("B because ..."); any other lower-case word makes the
# letter an article, a pronoun or a name ("A patient", "I think", "E coli").
_CONNECTORS = frozenset(
    "because since as given due which for in here with then but so being per according based considering and or "
    "over rather instead now".split())


def _base(text: str) -> str:
    return unicodedata.normalize("NFKC", text).translate(_QUOTES)


def _strip_markup(text: str) -> str:
    return _LINE_MARKS.sub("", _EMPHASIS.sub("", text))


def _compact_chars(text: str, start: int = 0, end: int | None = None):
    """(character, index) of the characters that carry meaning when comparing option texts: letters and digits
    (case-folded), symbols such as ``↑ ↓ + < >``, a decimal point between digits (``15.6`` is not ``156``) and a
    minus sign before a number (``-20`` is not ``20``). Spaces, markup and other punctuation are dropped, so
    ``Vitamin B-12`` = ``vitamin b12``."""
    end = len(text) if end is None else end
    for j in range(start, end):
        ch = text[j]
        prev = text[j - 1] if j > start else ""
        nxt = text[j + 1] if j + 1 < end else ""
        if ch.isalnum() or unicodedata.category(ch) in ("Sm", "So"):
            for c in ch.casefold():
                yield c, j
        elif ch == "." and prev.isdigit() and nxt.isdigit():
            yield ch, j
        elif ch in "-−" and nxt.isdigit() and not prev.isalnum():
            yield "-", j


def _compact(text: str) -> str:
    """The comparison form of an option text (see :func:`_compact_chars`)."""
    return "".join(c for c, _ in _compact_chars(unicodedata.normalize("NFKC", text)))


class _Options:
    """The item's option letters and a lookup of option texts (exact and inside a sentence)."""

    AMBIGUOUS = "?"

    def __init__(self, options: Mapping[str, str]):
        self.letters = {k.strip().upper() for k in options if k.strip().upper() in OPTION_LETTERS}
        self.text: dict[str, str] = {}
        self.full: dict[str, set[str]] = {}  # compact text -> letters
        self.bare: dict[str, set[str]] = {}  # compact text without a leading article -> letters
        for key, text in options.items():
            letter = key.strip().upper()
            if letter not in self.letters:
                continue
            self.text[letter] = text
            full = _compact(text)
            if full:
                self.full.setdefault(full, set()).add(letter)
            bare = _compact(_ARTICLE.sub("", text.strip(), count=1))
            if bare:
                self.bare.setdefault(bare, set()).add(letter)
        self.keys = sorted({*self.full, *self.bare}, key=len, reverse=True)
        self.longest = len(self.keys[0]) if self.keys else 0

    def _pick(self, found: set[str]) -> str:
        return next(iter(found)) if len(found) == 1 else self.AMBIGUOUS

    def lookup(self, text: str) -> str | None:
        """The option whose whole text ``text`` is (``AMBIGUOUS`` for a shared text), else None."""
        forms = [_compact(text)]
        m = _ARTICLE.match(text.strip())
        if m:
            forms.append(_compact(text.strip()[m.end():]))
        for table in (self.full, self.bare):
            for form in forms:
                if form and form in table:
                    return self._pick(table[form])
        return None

    def prefix(self, s: str, i: int) -> tuple[str, int, int, bool, frozenset[str]] | None:
        """The option whose text starts ``s`` at ``i`` (same line, word-bounded, longest wins): (letter or
        ``AMBIGUOUS``, end index, compact length, whether a leading article was skipped, every letter with that
        text); else None."""
        line_end = s.find("\n", i)
        line_end = len(s) if line_end < 0 else line_end
        best: tuple[str, int, int, bool, frozenset[str]] | None = None
        starts = [(i, False)]
        m = _ARTICLE.match(s, i, line_end)
        if m:
            starts.append((m.end(), True))
        for start, skipped in starts:
            pairs = list(islice(_compact_chars(s, start, line_end), self.longest))
            comp = "".join(c for c, _ in pairs)
            where = [j for _, j in pairs]
            for key in self.keys:
                if best is not None and len(key) <= best[2]:
                    break
                if not comp.startswith(key):
                    continue
                end = where[len(key) - 1] + 1
                if end < line_end and s[end].isalnum():
                    continue  # not at a word boundary ("Vitamin B1" inside "Vitamin B12")
                found = self.full.get(key, set()) | self.bare.get(key, set())
                best = (self._pick(found), end, len(key), skipped, frozenset(found))
        return best


# ------------------------------------------------------------------------------------------------ letters
_LETTER_AT = re.compile(r"(?P<open>[(\[{\"'])?[ \t]*(?P<l>[A-Ja-j])(?:[ \t]*(?P<close>[)\]}\"']))?")
_PAIRS = {"(": ")", "[": "]", "{": "}", '"': '"', "'": "'"}
_NEXT_WORD = re.compile(r"[ \t]+([A-Za-z]+)")
_ABBREVIATION = re.compile(r"\.[ \t]*[a-z]")
_LOWER_END = re.compile(r"[ \t]*(?:$|\n|[.,;:!?)](?:\s|$))")
_HEDGE = re.compile(
    r"[ \t]*(?:[,?][ \t]*)?(?:(?i:or|and|vs\.?|versus)[ \t]+|/[ \t]*|&[ \t]*)(?:(?i:option|choice)[ \t]+)?"
    r"(?:[(\[][A-Ja-j][)\]]|[A-J](?![\w'-]))")  # "B or C", "B/C", "B and C", "B? Or C?"
_QUESTIONED = re.compile(r"[ \t]*\?")  # "Answer: B?"
_TEXT_HEDGE = re.compile(r"[ \t]*(?:,[ \t]*)?(?:(?i:or|and|vs\.?|versus)[ \t]+|/[ \t]*)")
_LABEL_SEP = re.compile(r"[ \t]*(?:[.:)\-–—][ \t]*|[ \t](?=[A-Z0-9]))")
_TO_LINE_END = re.compile(r"[^\w\n]*(?:\n|$)")  # only punctuation, brackets and spaces left on the line


@dataclass(frozen=True)
class _Choice:
    letter: str | None  # None: void (hedged, contradictory, ambiguous text)
    method: str
    end: int


def _read_letter(s: str, i: int) -> tuple[str, int, bool] | None:
    """A standalone letter at ``i``: (upper-case letter, end, was bracketed/quoted), else None."""
    m = _LETTER_AT.match(s, i)
    if not m:
        return None
    letter, opened, closed = m.group("l"), m.group("open"), m.group("close")
    if opened and (not closed or _PAIRS[opened] != closed):
        return None
    if closed and not opened and closed not in ")]":
        return None  # B' / B" without an opening mark
    end = m.end()
    after = s[end:end + 40]
    if not closed and after[:1] and (after[0].isalnum() or after[0] in "'-_"):
        return None  # part of a word: B12, B-cell, I'd
    if not opened and not closed:
        if letter.islower():
            if not _LOWER_END.match(after):
                return None  # "a patient", "c cells"
        else:
            if _ABBREVIATION.match(after):
                return None  # "E. coli"
            word = _NEXT_WORD.match(after)
            if word and word.group(1)[0].islower() and word.group(1).lower() not in _CONNECTORS:
                return None  # "A patient", "I think", "E coli"
            if letter == "A" and re.match(r"[ \t]+\d", after):
                return None  # "A 45-year-old"
    return letter.upper(), end, bool(opened)


def _hedged(s: str, end: int, opts: _Options, *, letter: bool = True) -> bool:
    """Does another letter or option text follow ``end`` as an alternative ("B or C", "metformin or insulin"), or
    (after a letter) a question mark ("B?")?"""
    if _HEDGE.match(s, end) or (letter and _QUESTIONED.match(s, end)):
        return True
    m = _TEXT_HEDGE.match(s, end)
    return bool(m and opts.prefix(s, m.end()))


def _contradicted(s: str, letter: str, end: int, opts: _Options, bracketed: bool) -> bool:
    """Is ``letter`` labelling another option's text ("B) Vitamin C", "B. Vitamin C" at the end of a line)?"""
    m = _LABEL_SEP.match(s, end)
    if not m:
        return False
    text = opts.prefix(s, m.end())
    if not text or letter in text[4]:
        return False
    sep = s[end:m.end()].strip()
    # "B) text" / "B: text" / "(B) text" are labels; "B. Text" only when the text ends the line (otherwise it may
    # be the next sentence: "The answer is C. Hepatitis B is less likely ...").
    return bool(bracketed or sep in (")", ":", "-", "–", "—") or _TO_LINE_END.match(s, text[1]))


def _read_choice(s: str, i: int, opts: _Options, *, text_method: str = "answer_phrase_text",
                 letter_method: str = "answer_phrase") -> _Choice | None:
    """The choice stated at ``i`` (a letter or an option text), None when nothing is stated there."""
    lr = _read_letter(s, i)
    valid = lr is not None and lr[0] in opts.letters
    tr = opts.prefix(s, i)
    if tr and tr[2] == 1 and lr is None and _LETTER_AT.match(s, i):
        tr = None  # an option whose text is one letter ("a", "c") is not read from a rejected letter token
    if tr and (tr[2] > 1 or not valid):
        if valid and tr[3] and tr[0] != lr[0]:  # type: ignore[index]
            return _Choice(None, letter_method, tr[1])  # "A Metformin": the letter and the text disagree
        if tr[0] == _Options.AMBIGUOUS or _hedged(s, tr[1], opts, letter=False):
            return _Choice(None, text_method, tr[1])
        return _Choice(tr[0], text_method, tr[1])
    if not valid:
        return None  # nothing stated, or a letter that is no option of this item
    letter, end, bracketed = lr
    if _hedged(s, end, opts) or _contradicted(s, letter, end, opts, bracketed):
        return _Choice(None, letter_method, end)
    return _Choice(letter, letter_method, end)


# ------------------------------------------------------------------------------------------------ statements
_NOUN = r"(?:answer|option|choice|decision|response|selection)"
_PHRASE = re.compile(
    r"(?i:"
    rf"\b{_NOUN}\b[\"']?(?:[ \t]+(?:to|for)[ \t]+(?:this|the)[ \t]+(?:question|item|case|vignette|problem))?"
    r"(?:[ \t]+(?:here|then|therefore|thus|now|overall))?[ \t]*"
    r"(?:(?P<neg>is[ \t]+(?:definitely[ \t]+|certainly[ \t]+|clearly[ \t]+)?not\b|isn't\b|cannot[ \t]+be\b"
    r"|can't[ \t]+be\b|is[ \t]+never\b)"
    r"|is\b[ \t]*:?|(?:would|should|will|must|might|may)[ \t]+be\b|=|:|-(?=\s)|–|—)"
    r"|\banswer[ \t]*(?=[(\[])"
    r"|\bI(?:'d|[ \t]+would|'ll|[ \t]+will|'m[ \t]+going[ \t]+to|[ \t]+am[ \t]+going[ \t]+to)?[ \t]+"
    r"(?:go[ \t]+with|choose|pick|select|opt[ \t]+for|say|think|believe)\b"
    r"|\bmost[ \t]+likely[ \t]*:"
    r"|\b(?:going|go)[ \t]+with\b"
    r"|\brespuesta(?:[ \t]+correcta)?[ \t]*(?:es(?:[ \t]+la)?\b|:)"
    r"|\bantwort[ \t]*(?:ist\b|lautet\b|:)"
    r"|\bответ[ \t]*(?:[-—:])"
    r"|正解[ \t]*(?:は|:)"
    r"|\br[ée]ponse(?:[ \t]+correcte)?[ \t]*(?:est\b|:)"
    r"|\brisposta(?:[ \t]+corretta)?[ \t]*(?:[èe]\b|:)"
    r"|\bresposta(?:[ \t]+correta)?[ \t]*(?:[ée]\b|:)"
    r"|答案[ \t]*(?:是|为|為|:)"
    r")"
)
_AFTER_PHRASE = re.compile(
    r"(?i:[\s:]*(?:(?:probably|likely|most[ \t]+likely|clearly|definitely|certainly|actually|indeed|therefore|thus"
    r"|then|simply|either|still|really|now)\b[ \t]*(?:,[ \t]*)?)*(?:(?:option|choice|letter)\b[ \t]*(?:[:#][ \t]*)?)?)"
)
_REPORTED = re.compile(
    r"(?i)\b(?:if|some|others|many|people|students|one[ \t]+might|would[ \t]+say|might[ \t]+say|could[ \t]+argue"
    r"|might[ \t]+think|tempting)\b")
_CONTINUATION = re.compile(
    r"[ \t,;:.]*(?i:(?:but|rather|instead)\b[ \t]*(?:,[ \t]*)?)?"
    r"(?i:it's|it[ \t]+is|it[ \t]+was|rather|instead|but|the[ \t]+answer[ \t]+is)[ \t]+"
    r"(?i:(?:actually|really|definitely|clearly)[ \t]+)?(?i:(?:option|choice)[ \t]+)?"
)
_LETTER_FIRST = re.compile(
    r"(?:(?i:option|choice|answer|letter)[ \t]+)?(?P<open>[(\[])?(?P<l>[A-J])(?(open)[)\]])"
    r"(?:[ \t]*\([^()\n]{1,80}\))?"  # "Option B (Hepatitis B) is correct"
    r"(?:[ \t]+(?i:is|would[ \t]+be|seems[ \t]+to[ \t]+be|must[ \t]+be)[ \t]+(?i:(?:the|my|our)[ \t]+)?"
    r"(?i:(?:correct|right|best|final|better|preferred|most[ \t]+likely|more[ \t]+likely|most[ \t]+appropriate"
    r"|more[ \t]+appropriate)\b|(?:answer|option|choice)\b)"
    r"|[ \t]+(?i:as[ \t]+(?:the|my)[ \t]+(?:(?:correct|best|final|right)[ \t]+)?answer)\b)"
)
_TEXT_CORRECT = re.compile(
    r"(?<![ \t])[ \t]+(?i:is|would[ \t]+be|seems[ \t]+to[ \t]+be)[ \t]+(?i:(?:the|my)[ \t]+)?"
    r"(?i:(?:correct|right|best|final|most[ \t]+likely)\b(?:[ \t]+(?:answer|option|choice|one))?"
    r"|(?:final[ \t]+)?answer\b)"
)
_CLAUSE_OPENER = re.compile(
    r"(?i)^[ \t]*(?:(?:so|thus|therefore|hence|then|clearly|overall|i[ \t]+think|i[ \t]+believe)\b[ \t]*(?:,[ \t]*)?)*")
_BOXED = re.compile(
    r"\\boxed[ \t]*\{[ \t]*(?:\\(?:text|textbf|mathrm|mathbf|bf)[ \t]*\{[ \t]*)?[(\[]?[ \t]*(?P<l>[A-Ja-j])[ \t]*"
    r"[)\]]?[ \t]*(?:[.:)][^{}\n]*)?\}"
)
_CONCLUDE = re.compile(
    r"\b(?i:so|thus|therefore|hence|actually|finally|overall|in[ \t]+conclusion|in[ \t]+summary)\b[ \t]*(?:[,:][ \t]*)?"
    r"(?i:(?:it's|it[ \t]+is)[ \t]+)?(?i:(?:option|choice)[ \t]+)?"
    r"(?P<open>[(\[])?(?P<l>[A-J])(?(open)[)\]])"
    r"(?=[ \t]*(?:[.!][ \t]*)?(?:\n|$)|[.!;][ \t]+(?:[A-Z]|$))"
)
_OPTION_PAREN = re.compile(
    r"(?m)[(\[][ \t]*(?i:option|choice|answer)[ \t]*(?::[ \t]*)?(?P<l>[A-Ja-j])[ \t]*[)\]][ \t]*(?:[.!][ \t]*)?$")
_CLOSING = re.compile(
    r"(?:\b(?i:is|are|be)|(?<=\w)'s)[ \t]+(?i:(?:probably|likely|clearly|definitely|most[ \t]+likely)[ \t]+)?"
    r"(?i:(?:option|choice)[ \t]+)?")
_UPPER_LETTER = re.compile(r"[(\[{\"']?[ \t]*[A-J]")
_CLOSING_PAREN = re.compile(r"[(\[](?P<l>[A-J])[)\]][ \t]*(?:[.!][ \t]*)?$")
_NEGATED_BEFORE = re.compile(r"\b(?i:not|nor|never|except|than|vs\.?|versus|or|and)[ \t]*$")
_CLOSING_TAIL = re.compile(
    r"[ \t]*(?:(?:[.!][ \t]*)?$|(?:,[ \t]*)?(?i:because|since|as|given|due)\b)")
_NEGATION = re.compile(
    r"\b(?i:not|never|isn't|cannot[ \t]+be|can't[ \t]+be|rule[ \t]+out|rules[ \t]+out|ruled[ \t]+out|excludes?"
    r"|excluded)[ \t]+(?i:(?:option|choice)[ \t]+)?(?=[(\[]?[A-J]\b)"
    r"|(?=\b(?:(?i:option|choice)[ \t]+)?[(\[]?[A-J][)\]]?[ \t]+(?i:is|seems)[ \t]+(?i:wrong|incorrect|not[ \t]+correct"
    r"|not[ \t]+right|not[ \t]+the[ \t]+answer|unlikely|excluded|ruled[ \t]+out)\b)"
)
_OPTION_WORD = re.compile(r"(?i:option|choice)[ \t]+")
_LETTER_IS = re.compile(r"[(\[]?([A-J])[)\]]?[ \t]+(?i:is|seems)\b")
_PRE_OK_WORDS = re.compile(r"(?i)\b(?:so|thus|therefore|hence|then|clearly|overall|yes|think|believe|and|but)$")


def _starts_clause(s: str, start: int) -> bool:
    """Is ``start`` the start of a clause (not the end of a name such as "Vitamin A" or "Hepatitis B")?"""
    lo = max(0, start - 60)
    pre = s[lo:start].rstrip(" \t")
    if not pre:
        return True
    return pre[-1] in ".!?;:,([{-–—>\n\"'" or bool(_PRE_OK_WORDS.search(pre[-12:]))


def _next_line(s: str, i: int) -> str:
    """The first non-empty line after the line holding ``i``."""
    end = s.find("\n", i)
    while end >= 0:
        nxt = s.find("\n", end + 1)
        line = s[end + 1:nxt if nxt >= 0 else len(s)].strip()
        if line:
            return line
        end = nxt
    return ""


def _clause_start(s: str, i: int, marks: str, window: int = 300) -> int:
    """Start of the clause that ends at ``i``: after the last of ``marks`` (looking back at most ``window``)."""
    lo = max(0, i - window)
    return max([s.rfind(c, lo, i) for c in marks] + [lo - 1]) + 1


def _statements(s: str, opts: _Options) -> tuple[list[tuple[int, _Choice]], list[tuple[int, str]]]:
    """Every explicit answer statement (position, choice) and every explicit negation (position, letter)."""
    found: list[tuple[int, _Choice]] = []
    negated: list[tuple[int, str]] = []

    def add(pos: int, choice: _Choice | None) -> None:
        if choice is not None:
            found.append((pos, choice))

    for m in _PHRASE.finditer(s):  # (a) answer phrases, (b) negated answer phrases with a correction
        clause = s[_clause_start(s, m.start(), ",;:.!?\n"):m.start()]
        if _REPORTED.search(clause):
            continue  # "Some would say the answer is A", "If it were X, the answer would be ..."
        start = _AFTER_PHRASE.match(s, m.end()).end()  # type: ignore[union-attr]
        if "\n" in s[m.end():start] and _LABEL.match(_next_line(s, start)):
            continue  # "Treatment of choice is:\nA. ...\nB. ...": an echoed option list, not an answer
        choice = _read_choice(s, start, opts)
        if m.group("neg"):
            if choice is not None and choice.letter:
                negated.append((start, choice.letter))
                cont = _CONTINUATION.match(s, choice.end)
                if cont:
                    add(cont.end(), _read_choice(s, cont.end(), opts))
            continue
        add(start, choice)
    for m in _LETTER_FIRST.finditer(s):  # (c) "E is the answer", "Option B is correct"
        if m.group("l") in opts.letters and _starts_clause(s, m.start()):
            add(m.start("l"), _Choice(m.group("l"), "answer_phrase", m.end()))
    for m in _TEXT_CORRECT.finditer(s):  # (c) "Hepatitis B is the correct answer"
        subject = s[_clause_start(s, m.start(), "\n.!?;:"):m.start()]
        subject = subject[_CLAUSE_OPENER.match(subject).end():]  # type: ignore[union-attr]
        letter = opts.lookup(subject) if len(_compact(subject)) > 1 else None
        if letter:
            add(m.start(), _Choice(None if letter == _Options.AMBIGUOUS else letter, "answer_phrase_text", m.end()))
    for m in _BOXED.finditer(s):  # (d)
        letter = m.group("l").upper()
        if letter in opts.letters:
            add(m.start("l"), _Choice(letter, "boxed", m.end()))
    for m in _CONCLUDE.finditer(s):  # (e) "Therefore: (B)", "Actually C."
        if m.group("l") in opts.letters:
            add(m.start("l"), _Choice(m.group("l"), "answer_phrase", m.end()))
    for m in _OPTION_PAREN.finditer(s):  # (f) "... (option H)"
        letter = m.group("l").upper()
        if letter in opts.letters:
            add(m.start("l"), _Choice(letter, "answer_phrase", m.end()))
    # (g) the last line's closing clause
    body = s.rstrip()
    last_start = body.rfind("\n") + 1
    closing: tuple[int, _Choice] | None = None
    for m in _CLOSING.finditer(body, last_start):
        lr = _read_letter(body, m.end())
        if not lr or lr[0] not in opts.letters or not _UPPER_LETTER.match(body, m.end()):
            text = opts.prefix(body, m.end())  # "... the most likely deficiency is vitamin B12."
            if text and text[0] != _Options.AMBIGUOUS and text[2] > 1 and _CLOSING_TAIL.match(body, text[1]):
                closing = (m.end(), _Choice(None if _hedged(body, text[1], opts, letter=False) else text[0],
                                            "answer_phrase_text", text[1]))
            continue
        letter, end, _ = lr
        if _hedged(body, end, opts):
            closing = (m.end(), _Choice(None, "answer_phrase", end))
            continue
        tail = body[end:]
        sep = _LABEL_SEP.match(tail)
        text = opts.prefix(body, end + sep.end()) if sep else None
        if _CLOSING_TAIL.match(tail) or (text and text[0] == letter and _TO_LINE_END.match(body, text[1])):
            closing = (m.end(), _Choice(letter, "answer_phrase", end))
        elif text and text[0] == letter and body[text[1]:].lstrip(" \t").startswith(","):
            closing = (m.end(), _Choice(letter, "answer_phrase", end))  # "is A. Type A dissection, which ..."
    if closing:
        add(*closing)
    paren = _CLOSING_PAREN.search(body, last_start)
    if (paren and paren.group("l") in opts.letters and body[last_start:paren.start()].strip()
            and not _NEGATED_BEFORE.search(body, 0, paren.start())):
        add(paren.start("l"), _Choice(paren.group("l"), "answer_phrase", paren.end()))

    for m in _NEGATION.finditer(s):  # explicit negations: "not A", "A is wrong", "rule out C"
        i = m.end()
        w = _OPTION_WORD.match(s, i)
        if m.end() == m.start() and not _starts_clause(s, i):
            continue  # "Vitamin A is unlikely": about vitamin A, not the letter
        lr = _read_letter(s, w.end() if w else i)
        if lr is None:
            # "A is wrong": the letter is followed by "is", which _read_letter refuses for A/I; read it directly
            j = w.end() if w else i
            lm = _LETTER_IS.match(s, j)
            lr = (lm.group(1), lm.end(1), False) if lm else None
        if lr and lr[0] in opts.letters:
            negated.append((i, lr[0]))
    return found, negated


# ------------------------------------------------------------------------------------------------ whole lines
_BARE = re.compile(
    r"(?:(?P<word>(?i:option|choice|letter))[ \t]*(?::[ \t]*)?)?"
    r"[(\[]?[ \t]*(?P<l>[A-Ja-j])[ \t]*(?:[)\]][ \t]*)?[.:)]?")
_LABEL = re.compile(r"(?:(?i:option|choice)[ \t]+)?[(\[]?([A-J])(?:[)\]:]|\.(?=\s|$)|[ \t]+[-–—](?=[ \t])|$)")
_INLINE_LABEL = re.compile(r"(?:^|[ \t])[(\[]?([A-J])(?:[)\]]|\.)[ \t]+(?=[A-Z0-9(])")
_BOLD = re.compile(r"\*\*(?P<a>[^*\n]+?)\*\*|__(?P<b>[^_\n]+?)__")
_YNM_START = re.compile(r"(?i)^\W*(yes|no|maybe)\b(?=\s*[,.;:!)\n-]|\s*$)")
_YNM = ("yes", "no", "maybe")


def _bare_letter(line: str, opts: _Options) -> str | None:
    m = _BARE.fullmatch(line.strip())
    if not m:
        return None
    letter = m.group("l")
    if letter.islower() and not m.group("word"):
        return None  # a lone lower-case letter is not read
    return letter.upper() if letter.upper() in opts.letters else None


def _bold_choice(base: str, opts: _Options) -> str | None:
    """The one option the reply's bold spans name, else None."""
    named: set[str] = set()
    body = base.rstrip()
    last_line_start = body.rfind("\n") + 1
    for m in _BOLD.finditer(base):
        span = (m.group("a") or m.group("b")).strip()
        letter = _bare_letter(span, opts)
        if letter is None:
            label = re.match(r"[(\[]?([A-J])(?:[)\]:]|\.)[ \t]+(\S.*)$", span)
            if label and label.group(1) in opts.letters:
                own = opts.prefix(label.group(2), 0)
                letter = label.group(1)
                if own and own[0] != letter:
                    named.add(own[0])  # "**B. Vitamin C**" names two options: no answer
        if letter is None and m.start() >= last_line_start and _TO_LINE_END.match(body, m.end()):
            text = opts.lookup(span)  # an option's text in bold ending the reply
            letter = text if text and text != _Options.AMBIGUOUS else None
        if letter:
            named.add(letter)
    return next(iter(named)) if len(named) == 1 else None


def extract_answer(text: str | None, options: Mapping[str, str]) -> Extraction:
    """The option letter a free-text reply chose (see the module docstring for the rules, in order)."""
    if not text or not text.strip() or not options:
        return NONE
    opts = _Options(options)
    if not opts.letters:
        return NONE
    base = _base(text)
    s = _strip_markup(base)

    # 1-2: the whole reply is a letter or an option's text
    letter = _bare_letter(s, opts)
    if letter:
        return Extraction(letter, "bare_letter")
    whole = opts.lookup(s)
    if whole:
        return NONE if whole == _Options.AMBIGUOUS else Extraction(whole, "option_text")

    # 3: explicit statements; the last one wins, unless it is void or later negated
    found, negated = _statements(s, opts)
    if found:
        last = max(pos for pos, _ in found)
        final = {(c.letter, c.method) for pos, c in found if pos == last}
        if len({letter for letter, _ in final}) != 1:
            return NONE
        letter, method = sorted(final, key=lambda lm: METHODS.index(lm[1]))[0]
        if letter is None or any(pos > last and neg == letter for pos, neg in negated):
            return NONE
        return Extraction(letter, method)

    # 4: bold spans naming one option
    bold = _bold_choice(base, opts)
    if bold:
        return Extraction(bold, "bold")

    lines = [line.strip() for line in s.splitlines() if line.strip()]
    # 5: an opening label, unless the reply enumerates options or the label's text is another option's
    labels = {m.group(1) for m in (_LABEL.match(line) for line in lines) if m and m.group(1) in opts.letters}
    labels |= {m.group(1) for m in _INLINE_LABEL.finditer(s) if m.group(1) in opts.letters}
    first = _LABEL.match(lines[0]) if lines else None
    if first and first.group(1) in opts.letters and len(labels) == 1:
        letter = first.group(1)
        rest = lines[0][first.end():]
        own = opts.prefix(rest.lstrip(" \t"), 0) if rest.strip() else None
        mark = lines[0][first.end() - 1]
        # "E. coli ..." is an abbreviation; "A: the patient ..." / "A: Fluids" is the Q/A answer mark, not option A
        lowercase_next = rest[:1] == " " and rest.lstrip()[:1].islower() and mark == "."
        qa_mark = letter == "A" and mark == ":" and rest.strip() and not (own and own[0] == "A")
        if (own is None or own[0] == letter) and not (lowercase_next and own is None) and not qa_mark:
            return Extraction(letter, "leading_label")

    # 6: a last line that is only a letter
    if lines:
        letter = _bare_letter(lines[-1], opts)
        if letter:
            return Extraction(letter, "trailing_letter")

    # 7: yes/no/maybe words for yes/no/maybe items
    words = {w: opts.lookup(w) for w in _YNM}
    if lines and all(v and v != _Options.AMBIGUOUS for v in words.values()):
        start = _YNM_START.match(s.strip())
        word = start.group(1).lower() if start else None
        if word is None and normalize_text(lines[-1]) in _YNM:
            word = normalize_text(lines[-1])
        if word is not None:
            return Extraction(words[word], "yes_no_maybe")  # type: ignore[arg-type]

    # 8: a last line that is exactly one option's text
    if lines:
        tail = opts.lookup(lines[-1])
        if tail and tail != _Options.AMBIGUOUS:
            return Extraction(tail, "option_text")
    return NONE
