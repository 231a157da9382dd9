"""Topic queries: template questions about the names, numbers and identifiers a context mentions, no model needed.

The frozen model writes usable questions about half the time on prose and a third of the time on technical text
(benchmarks/RESULTS.md, self-study). Much of what a reader asks about is visible on the surface of the text: capitalised names
(Pell Harbour, Halden Systems), numbers with their unit (214 metres, 8 milliseconds, the 9th of August) and
identifiers (allow_shared_disk, QS-207, --stale). :func:`topics` finds them, :func:`topic_queries` asks two template
questions about each; the teacher answers them with the whole context, so its answers carry what the context says
about each phrase, and σ learns it. Deterministic: the same context always gives the same queries.

Scripts without capital letters or Latin digits yield few topics; the model-written queries still cover them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TOPICS_VERSION = 1  # in the synthesis resume stamp: bump when the rules or templates change what a context gives
NAME_TEMPLATES = ("What does the text say about {}?", "What is {}?")
NUMBER_TEMPLATES = ("What does the text say about {}?", "What is {} in the text?")

_CAP = "[" + re.escape("".join(c for c in map(chr, range(0x3000)) if c.isupper())) + "]"  # re has no \\p{Lu}
_SP = r"[^\S\n]+"  # spaces within a line: a name or a unit never runs over a line break
_PART = rf"{_CAP}[\w'’]*(?:-[\w'’]+)*|\d+(?:[.,]\d+)*"  # a capitalised word, or a number ("Python 3.11")
_NAME = re.compile(rf"(?<![\w'’-]){_CAP}[\w'’]*(?:-[\w'’]+)*(?:{_SP}(?:of{_SP})?(?:{_PART}))*")
_SENTENCE_START = re.compile(
    r"(?:^|(?<=[.!?:])[)\]\"'’”*]*\s+|\n\s*)"  # after a sentence's end, or at a line's start ...
    r"(?:(?:[-*•+>]|\d+[.)]|#+)[^\S\n]+)?"  # ... past a list marker or a heading's hashes
    r"[\"'‘“(\[*_]*(?=\S)"  # ... and an opening quote, bracket or emphasis
)
_LIST_NUMBER = re.compile(r"^[^\S\n]*(\d+)[.)][^\S\n]", re.M)  # "1. Install": a marker, not a topic
_NUMBER = re.compile(r"(?<![\w.,:-])[$€£]?\d(?:[\d,.]*\d)?(?:st|nd|rd|th|%|°[CF]?)?(?![\w:-])")
_UNIT = re.compile(rf"{_SP}(of{_SP}{_CAP}\w+|[a-z]+(?:-[a-z]+)*)")
_IDENTIFIER = re.compile(r"(?<![\w-])(?:--?[A-Za-z][\w-]*|\w*[A-Za-z]\w*_\w+|[A-Za-z]+\d\w*|\w+(?:-\w+)+)")
FUNCTION_WORDS = frozenset(
    "a an and are as at be but by for from had has have he i if in into is it its may must not of on or she so than "
    "that the then they this to was we were when which while who will with you".split()
)
# words that open a sentence without being part of the name after them ("The Tamsin Light", "In 2019")
OPENERS = FUNCTION_WORDS | frozenset(
    "about after all almost around before between call during each every exactly nearly only over roughly see since "
    "some under until within".split()
)


def _has_unit(text: str, end: int) -> int:
    """Where the unit after a number ending at ``end`` ends ("214| metres", "9th| of August"), or 0 for none."""
    unit = _UNIT.match(text, end)
    return unit.end() if unit and unit.group(1) not in FUNCTION_WORDS else 0  # "of August" is not "of"


@dataclass(frozen=True)
class Topic:
    """A phrase of the context and the character span ``[start, end)`` of its first occurrence."""

    phrase: str
    start: int
    end: int
    number: bool


def _names(text: str, starts: set[int]) -> list[Topic]:
    """Capitalised runs. At a sentence's start the first word counts only if it is capitalised elsewhere too
    ("Marrowick is" yes, "Shelves are" no); an opener before a name is cut off ("The Tamsin Light")."""
    matches = list(_NAME.finditer(text))
    mid_caps = {m.group(0).split()[0] for m in matches if m.start() not in starts} - {w.title() for w in OPENERS}
    # "Word N" is a name when one of its occurrences is followed by no unit ("Quillstore 3 is", not "Exactly 412 people")
    numbered = {m.group(0) for m in matches if " " in m.group(0) and not _has_unit(text, m.end())}
    found = []
    for m in matches:
        start, phrase = m.start(), m.group(0)
        first, _, rest = phrase.partition(" ")
        rest = rest.lstrip()
        if first not in mid_caps and (start in starts or first.lower() in OPENERS):
            if first.lower() in OPENERS:
                if not rest or rest[0].isdigit() or rest.startswith("of "):  # "In 2019": the number is the topic
                    continue
                start, phrase = m.end() - len(rest), rest
            elif not rest or (rest[0].isdigit() and phrase not in numbered):
                continue  # one sentence-initial word ("Shelves"), or a count ("Roughly 40 boats" is the number's)
        if phrase.endswith(("'s", "’s")):  # "Marrowick's" is about Marrowick
            phrase = phrase[:-2]
        if len(phrase) < 2 or phrase in ("I'm", "I've", "I'll", "I'd"):
            continue
        found.append(Topic(phrase, start, start + len(phrase), False))
    return found


def topics(text: str) -> list[Topic]:
    """The context's names, numbers (with their unit) and identifiers, in order of first occurrence.

    Case-insensitive duplicates and phrases contained word-wise in a longer one ("412" in "412 people", "August" in
    "9th of August") are dropped. Linear in the text's length (a book's worth takes about a second).
    """
    starts = {m.end() for m in _SENTENCE_START.finditer(text)}
    found = _names(text, starts)
    in_name = bytearray(len(text) + 1)
    for t in found:
        in_name[t.start : t.end] = b"\x01" * (t.end - t.start)
    markers = {m.start(1) for m in _LIST_NUMBER.finditer(text)}
    for m in _NUMBER.finditer(text):
        if in_name[m.start()] or m.start() in markers:  # "Quillstore 3", "Level 0": part of a name
            continue
        end = _has_unit(text, m.end()) or m.end()
        found.append(Topic(text[m.start() : end], m.start(), end, True))
    for m in _IDENTIFIER.finditer(text):
        found.append(Topic(m.group(0), m.start(), m.end(), False))

    found.sort(key=lambda t: (t.start, -len(t.phrase)))
    kept, seen = [], set()
    for topic in found:
        key = topic.phrase.lower()
        if key not in seen:
            seen.add(key)
            kept.append(topic)
    inside = set()  # every shorter run of words of every phrase ("412" and "people" of "412 people")
    for t in kept:
        words = t.phrase.lower().split()
        n = len(words)
        inside.update(" ".join(words[i:j]) for i in range(n) for j in range(i + 1, n + 1) if j - i < n)
    return [t for t in kept if " ".join(t.phrase.lower().split()) not in inside]


def topic_queries(text: str, limit: int) -> list[tuple[str, Topic]]:
    """At most ``limit`` template questions about the topics of ``text``, two a topic (adjacent; an odd ``limit``
    asks one fewer), as ``(query, topic)`` pairs. With more topics than ``limit // 2`` they are picked evenly across
    the text's topics in order of occurrence, so a long context is covered from start to end."""
    found, count = topics(text), max(0, limit) // 2
    if len(found) > count:
        found = [found[i * len(found) // count] for i in range(count)]
    return [(form.format(t.phrase), t) for t in found for form in (NUMBER_TEMPLATES if t.number else NAME_TEMPLATES)]


def phrase_of(query: str) -> str | None:
    """The phrase a template question of :func:`topic_queries` asks about, or None for any other query."""
    for form in sorted({*NAME_TEMPLATES, *NUMBER_TEMPLATES}, key=len, reverse=True):  # "What is {} in the text?" first
        head, _, tail = form.partition("{}")
        if query.startswith(head) and query.endswith(tail) and len(query) > len(head) + len(tail):
            return query[len(head) : len(query) - len(tail)]
    return None
