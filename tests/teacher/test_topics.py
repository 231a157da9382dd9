from pathlib import Path

from fastsoft.teacher.topics import topic_queries, topics

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def phrases(text: str) -> list[str]:
    return [t.phrase for t in topics(text)]


def test_names_numbers_with_units_and_identifiers_in_order_of_first_occurrence():
    text = (
        "Shelves live in Level 0. The Tamsin Light was built in 1887 and is 214 metres tall. "
        "Set allow_shared_disk or pass --stale; errors read QS-207. The Tamsin Light shines."
    )
    assert phrases(text) == ["Level 0", "Tamsin Light", "1887", "214 metres", "allow_shared_disk", "--stale", "QS-207"]


def test_a_sentence_initial_word_is_a_name_only_if_capitalised_elsewhere():
    assert phrases("Marrowick is small. People love Marrowick. Otters swim.") == ["Marrowick"]
    # a name with a number is a name when it is once followed by no unit; "Exactly 412 people" counts people
    assert phrases("Quillstore 3 is fast. Quillstore 3 refuses. Exactly 412 people live here.") == [
        "Quillstore 3",
        "412 people",
    ]


def test_phrases_inside_longer_ones_and_repeats_are_dropped():
    text = "On the 9th of August, 16-kilobyte blocks; in August, 16 more. We love Pell Harbour and PELL HARBOUR."
    assert phrases(text) == ["9th of August", "16-kilobyte", "16 more", "Pell Harbour"]


def test_two_questions_a_topic_and_the_first_occurrence_span():
    text = "The ferry Gull Maiden sails once a week, taking 3 hours."
    queries = topic_queries(text, 64)
    assert [q for q, _ in queries] == [
        "What does the text say about Gull Maiden?",
        "What is Gull Maiden?",
        "What does the text say about 3 hours?",
        "What is 3 hours in the text?",
    ]
    for _, topic in queries:
        assert text[topic.start : topic.end] == topic.phrase
    assert [q for q, _ in topic_queries(text, 3)] == [
        "What does the text say about Gull Maiden?",
        "What is Gull Maiden?",
    ]
    assert topic_queries(text, 1) == []


def test_a_limit_picks_topics_spread_over_the_whole_text():
    text = " ".join(f"Room {i} has {i + 10} chairs." for i in range(1, 21))  # 40 topics
    picked = [t.phrase for _, t in topic_queries(text, 8)[::2]]
    assert picked == ["Room 1", "Room 6", "Room 11", "Room 16"]


def test_the_shipped_contexts_give_the_topics_a_reader_would_ask_about():
    island = phrases((EXAMPLES / "marrowick_island.txt").read_text())
    assert {"Marrowick", "Pell Harbour", "Tamsin Light", "Odile Frane", "214 metres", "9th of August"} <= set(island)
    assert not {"The", "It", "There", "Every"} & set(island)
    quill = phrases((EXAMPLES / "quillstore.txt").read_text())
    assert {"Quillstore 3", "8 milliseconds", "CLOCK-Pro", "allow_shared_disk", "QS-207", "7341"} <= set(quill)
    assert not {"Shelves", "Reads", "Deleted", "Writes"} & set(quill)


def test_text_without_names_or_numbers_has_no_topics():
    assert topics("") == []
    assert topics("it rained all day and the river rose.") == []
