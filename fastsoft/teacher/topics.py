"""Topic queries: template questions about the names, numbers and identifiers a context mentions, no model needed.

The frozen model writes usable questions about half the time on prose and a third of the time on technical text
(README, self-study). Much of what a reader asks about is visible on the surface of the text: capitalised names
(Pell Harbour, Halden Systems), numbers with their unit (214 metres, 8 milliseconds, the 9th of August) and
identifiers (allow_shared_disk, QS-207, --stale). :func:`topics` finds them, :func:`topic_queries` asks two template
questions about each; the teacher answers them with the whole context, so its answers carry what the context says
about each phrase, and σ learns it. Deterministic: the same context always gives the same queries.

Scripts without capital letters or Latin digits yield few topics; the model-written queries still cover them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TOPICS_VERSION = 1  # in the synthesis fingerprint: bump when the rules or templates change what a context gives
NAME_TEMPLATES = ("What does the text say about {}?", "What is {}?")
NUMBER_TEMPLATES = ("What does the text say about {}?", "What is {} in the text?")

_SENTENCE_START = re.compile(r"(?:^|[.!?:]\s+|\n\s*)([\"'(]?)(?=\S)")
_NAME = re.compile(r"\b[A-Z][\w'’]*(?:-[\w'’]+)*(?:\s+(?:of\s+)?[A-Z0-9][\w'’]*(?:-[\w'’]+)*)*")
_NUMBER = re.compile(r"(?<![\w.,-])\d(?:[\d,.]*\d)?(?:st|nd|rd|th)?(?![\w-])")
_UNIT = re.compile(r"\s+(of\s+[A-Z]\w+|[a-z][a-z]*(?:-[a-z]+)*)")
_IDENTIFIER = re.compile(r"(?<![\w-])(?:--?[A-Za-z][\w-]*|\w*[A-Za-z]\w*_\w+|[A-Za-z]+\d\w*|\w+(?:-\w+)+)")
FUNCTION_WORDS = frozenset(
    "a an and are as at be by for from had has have in into is it its may must of on or than that the then this to "
    "was were which while who will with".split()
)


def _has_unit(text: str, end: int) -> int:
    """Where the unit after a number ending at ``end`` ends ("214| metres", "9th| of August"), or 0 for none."""
    unit = _UNIT.match(text, end)
    return unit.end() if unit and (unit.group(1).startswith("of ") or unit.group(1) not in FUNCTION_WORDS) else 0


@dataclass(frozen=True)
class Topic:
    """A phrase of the context and the character span ``[start, end)`` of its first occurrence."""

    phrase: str
    start: int
    end: int
    number: bool


def topics(text: str) -> list[Topic]:
    """The context's names, numbers (with their unit) and identifiers, in order of first occurrence.

    A capitalised word that starts a sentence counts only if it is capitalised somewhere else as well ("The" and
    "Shelves" do not, "Marrowick" does). Case-insensitive duplicates and phrases contained word-wise in a longer one
    ("412" in "412 people", "August" in "9th of August") are dropped.
    """
    starts = {m.end() for m in _SENTENCE_START.finditer(text)}
    mid_caps = {m.group(0).split()[0] for m in _NAME.finditer(text) if m.start() not in starts}
    # "Word N" is a name when one of its occurrences is followed by no unit ("Quillstore 3 is", not "Exactly 412 people")
    numbered_names = {m.group(0) for m in _NAME.finditer(text) if " " in m.group(0) and not _has_unit(text, m.end())}
    found: list[Topic] = []

    for m in _NAME.finditer(text):
        start, phrase = m.start(), m.group(0)
        first, _, rest = phrase.partition(" ")
        if start in starts and first not in mid_caps:  # a sentence's first word: a name only if more follows
            if rest[:1].isdigit():  # "Quillstore 3 is" names a thing; "Exactly 412 people" counts something
                if phrase not in numbered_names:
                    continue
                found.append(Topic(phrase, start, start + len(phrase), False))
                continue
            if not rest:
                continue
            start, phrase = start + len(first) + 1 + (len(rest) - len(rest.lstrip())), rest.strip()
            if phrase.startswith("of "):
                continue
        found.append(Topic(phrase, start, start + len(phrase), False))
    names = [(t.start, t.end) for t in found]
    for m in _NUMBER.finditer(text):
        if any(start <= m.start() < end for start, end in names):  # "Quillstore 3", "Level 0": part of a name
            continue
        end = _has_unit(text, m.end()) or m.end()
        found.append(Topic(text[m.start() : end], m.start(), end, True))
    for m in _IDENTIFIER.finditer(text):
        found.append(Topic(m.group(0), m.start(), m.end(), False))

    found.sort(key=lambda t: (t.start, -len(t.phrase)))
    kept: list[Topic] = []
    for topic in found:
        key = topic.phrase.lower()
        if any(key == k.phrase.lower() for k in kept):
            continue
        kept.append(topic)
    lowered = [t.phrase.lower() for t in kept]
    return [
        t
        for t, key in zip(kept, lowered)
        if not any(other != key and re.search(rf"(?<![\w-]){re.escape(key)}(?![\w-])", other) for other in lowered)
    ]


def topic_queries(text: str, limit: int) -> list[tuple[str, Topic]]:
    """At most ``limit`` template questions about the topics of ``text``, two a topic (adjacent), as
    ``(query, topic)`` pairs. With more topics than ``limit // 2`` they are picked evenly across the text's topics
    in order of occurrence, so a long context is covered from start to end."""
    found, count = topics(text), max(0, limit) // 2
    if len(found) > count:
        found = [found[i * len(found) // count] for i in range(count)]
    return [(form.format(t.phrase), t) for t in found for form in (NUMBER_TEMPLATES if t.number else NAME_TEMPLATES)]
