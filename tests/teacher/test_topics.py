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


def test_everyday_text_names_numbers_and_markup():
    assert phrases("Version 2\nRelease Notes follow. We run Python 3.11, not Model 3.5 Turbo.") == [
        "Version 2",
        "Release Notes",
        "Python 3.11",
        "Model 3.5 Turbo",
    ]  # a name never runs over a line break; decimals stay in a name
    assert phrases("Zoë Ørsted met Émile Durand in Århus. Большой Город стоит на реке Волга.") == [
        "Zoë Ørsted",
        "Émile Durand",
        "Århus",
        "Большой Город",
        "Волга",
    ]
    assert phrases("In 2019, sales rose. Roughly 0.5 of them paid $40, or 12% at 40°C.") == [
        "2019",
        "0.5",
        "$40",
        "12%",
        "40°C",
    ]  # an opener is not part of a name; "of them" is no unit
    assert phrases("Pell Harbour is deep. People love Marrowick. Marrowick's coast is steep. I think I'm fine.") == [
        "Pell Harbour",
        "Marrowick",
    ]
    assert phrases("1. Install it\n2. Run it\n- The node fails.\n**Warning** The disk fills at 3 am.") == ["3 am"]


def test_phrase_of_inverts_the_templates():
    from fastsoft.teacher.topics import phrase_of

    for query, topic in topic_queries("Gull Maiden sails at 3 pm from Corrin.", 64):
        assert phrase_of(query) == topic.phrase
    assert phrase_of("Who is the mayor?") is None


def test_a_long_text_is_quick():
    import time

    text = (EXAMPLES / "quillstore.txt").read_text()
    big = " ".join(text.replace("Quillstore", f"Quillstore{i}") for i in range(100))  # 300k characters
    started = time.perf_counter()
    assert len(topics(big)) > 100
    assert time.perf_counter() - started < 20  # quadratic matching took minutes at this size
