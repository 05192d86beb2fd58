"""Reading data sources: each named row format, skip counts by reason, JSON files, hub directories, fingerprints."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from trainer.config import SourceConfig
from trainer.examples import Example
from trainer.sources import SourceRows, format_row, read_source, source_fingerprint
from trainer.synthetic import digit_task, heldout_docs

NOT_AN_OBJECT = "[1, 2]"


def write_jsonl(path, rows) -> str:
    """Writes rows one per line; a str row is written as is (a raw line)."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def read_file(tmp_path, fmt, rows, name="data.jsonl", **kwargs) -> SourceRows:
    path = write_jsonl(tmp_path / name, rows)
    return read_source(SourceConfig(name="src", kind="file", path=path, format=fmt, **kwargs))


def test_fields_maps_the_rows_own_keys(tmp_path):
    fields = {"instruction": "q", "input": "ctx", "response": "a"}
    got = read_file(
        tmp_path,
        "fields",
        [
            {"q": "  Add 2 and 3. ", "ctx": " numbers ", "a": "5\n"},
            {"q": "Name a colour.", "a": "Blue."},  # input is optional
            "",  # blank lines are not rows
            {"q": "No answer here."},
            {"q": "   ", "a": "Something."},
            {"q": "Typed wrong.", "a": 5},
            NOT_AN_OBJECT,
        ],
        fields=fields,
    )
    assert got.examples == [
        Example(instruction="Add 2 and 3.", response="5", input="numbers"),
        Example(instruction="Name a colour.", response="Blue."),
    ]
    assert got.skipped == {"missing_field": 2, "empty_text": 1, "not_object": 1}


def test_dolly_context_becomes_input(tmp_path):
    got = read_file(
        tmp_path,
        "dolly",
        [
            {
                "instruction": "Who wrote it?",
                "context": "Tolstoy wrote War and Peace.",
                "response": "Tolstoy.",
                "category": "closed_qa",
            },
            {"instruction": "Give a tip.", "context": "", "response": "Sleep well.", "category": "brainstorming"},
            {"instruction": "Lost answer.", "context": "", "category": "open_qa"},
            {"instruction": "Blank answer.", "context": "", "response": " \n ", "category": "open_qa"},
            NOT_AN_OBJECT,
        ],
    )
    assert got.examples == [
        Example(instruction="Who wrote it?", response="Tolstoy.", input="Tolstoy wrote War and Peace."),
        Example(instruction="Give a tip.", response="Sleep well."),
    ]
    assert got.skipped == {"missing_field": 1, "empty_text": 1, "not_object": 1}


def test_alpaca_reads_output_and_ignores_text(tmp_path):
    got = read_file(
        tmp_path,
        "alpaca",
        [
            {"instruction": "Translate.", "input": "bonjour", "output": "hello", "text": "### Instruction: ..."},
            {"instruction": "Say hi.", "input": "", "output": "Hi!", "text": "ignored"},
            {"instruction": "Nothing out.", "input": "", "text": "ignored"},
            {"instruction": "Empty out.", "input": "", "output": "", "text": "ignored"},
            NOT_AN_OBJECT,
        ],
    )
    assert got.examples == [
        Example(instruction="Translate.", response="hello", input="bonjour"),
        Example(instruction="Say hi.", response="Hi!"),
    ]
    assert got.skipped == {"missing_field": 1, "empty_text": 1, "not_object": 1}


def test_platypus_input_may_be_missing_or_empty(tmp_path):
    got = read_file(
        tmp_path,
        "platypus",
        [
            {"instruction": "Solve x + 1 = 3.", "output": "x = 2", "data_source": "MATH"},
            {"instruction": "Explain.", "input": "  ", "output": "Because.", "data_source": "scibench"},
            {"output": "Orphan answer.", "data_source": "MATH"},
            {"instruction": "Empty.", "input": "", "output": "", "data_source": "MATH"},
            NOT_AN_OBJECT,
        ],
    )
    assert got.examples == [
        Example(instruction="Solve x + 1 = 3.", response="x = 2"),
        Example(instruction="Explain.", response="Because."),
    ]
    assert got.skipped == {"missing_field": 1, "empty_text": 1, "not_object": 1}


def test_lima_last_pair_is_the_example_and_earlier_pairs_its_history(tmp_path):
    got = read_file(
        tmp_path,
        "lima",
        [
            {"conversations": ["What is 2+2?", "4."], "source": "stackexchange"},
            {"conversations": ["Hi", "Hello!", "How are you?", "Fine, thanks."], "source": "multi_turn"},
            {"conversations": ["Q1", "A1", "Unanswered Q2"], "source": "multi_turn"},  # last turn dropped
            {"conversations": ["Only a question"], "source": "wikihow"},
            {"conversations": ["Q", "   "], "source": "wikihow"},
            {"conversations": "not a list", "source": "wikihow"},
            NOT_AN_OBJECT,
        ],
    )
    assert got.examples == [
        Example(instruction="What is 2+2?", response="4."),
        Example(instruction="How are you?", response="Fine, thanks.", history=(("Hi", "Hello!"),)),
        Example(instruction="Q1", response="A1"),
    ]
    assert got.skipped == {"no_reply": 1, "empty_text": 1, "missing_field": 1, "not_object": 1}


def test_mmlu_letters_the_choices_and_answers_letter_and_text(tmp_path):
    row = {"question": "Which is a prime?", "subject": "", "choices": ["4", "6", "7", "9"], "answer": 2}
    got = read_file(
        tmp_path,
        "mmlu",
        [
            row,
            {**row, "answer": "b"},  # a letter answer
            {"train": {**row, "answer": 0}},  # auxiliary_train rows nested under "train"
            {**row, "answer": 4},
            {**row, "choices": None},
            {**row, "question": " "},
            NOT_AN_OBJECT,
        ],
    )
    prompt = "Which is a prime?\nA. 4\nB. 6\nC. 7\nD. 9\nAnswer:"
    assert got.examples == [
        Example(instruction=prompt, response="C. 7"),
        Example(instruction=prompt, response="B. 6"),
        Example(instruction=prompt, response="A. 4"),
    ]
    assert got.skipped == {"bad_answer": 1, "missing_field": 1, "empty_text": 1, "not_object": 1}


def test_cnn_dailymail_summarizes_the_article(tmp_path):
    got = read_file(
        tmp_path,
        "cnn_dailymail",
        [
            {"article": "  A long story about a cat. ", "highlights": "Cat found.\nAll well.", "id": "a1"},
            {"article": "No summary.", "id": "a2"},
            {"article": "", "highlights": "Summary of nothing.", "id": "a3"},
            NOT_AN_OBJECT,
        ],
    )
    assert got.examples == [
        Example(
            instruction="Summarize the following news article.",
            response="Cat found.\nAll well.",
            input="A long story about a cat.",
        )
    ]
    assert got.skipped == {"missing_field": 1, "empty_text": 1, "not_object": 1}


def test_gsm8k_keeps_the_whole_worked_answer(tmp_path):
    answer = "Tom has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"
    got = read_file(
        tmp_path,
        "gsm8k",
        [
            {"question": "Tom has 3 apples and gets 4 more. How many?", "answer": answer},
            {"question": "Where is the answer?"},
            {"question": "", "answer": "#### 1"},
            NOT_AN_OBJECT,
        ],
    )
    assert got.examples == [Example(instruction="Tom has 3 apples and gets 4 more. How many?", response=answer)]
    assert got.skipped == {"missing_field": 1, "empty_text": 1, "not_object": 1}


def test_bbq_letters_the_three_answers_and_answers_the_labelled_text(tmp_path):
    row = {
        "example_id": 0, "question_index": "1", "question_polarity": "neg", "context_condition": "ambig",
        "category": "Age", "context": " I saw a grandson and his grandfather outside the Walmart. ",
        "question": "Who was not comfortable using the phone?",
        "ans0": "The grandfather", "ans1": "The grandson", "ans2": "Can't be determined", "label": 2,
    }
    got = read_file(
        tmp_path,
        "bbq",
        [
            row,
            {**row, "context_condition": "disambig", "label": 0},
            {**row, "label": 3},  # names no answer
            {**row, "label": None},
            {k: v for k, v in row.items() if k != "ans1"},
            {**row, "question": "  "},
            NOT_AN_OBJECT,
        ],
    )
    prompt = ("I saw a grandson and his grandfather outside the Walmart.\nWho was not comfortable using the phone?\n"
              "A. The grandfather\nB. The grandson\nC. Can't be determined\nAnswer:")
    assert got.examples == [
        Example(instruction=prompt, response="Can't be determined"),
        Example(instruction=prompt, response="The grandfather"),
    ]
    assert got.skipped == {"bad_answer": 1, "missing_field": 2, "empty_text": 1, "not_object": 1}


def test_sciq_orders_the_choices_by_the_question_and_keeps_the_support(tmp_path):
    rows = [
        {"question": "What type of organism is commonly used in preparation of foods such as cheese and yogurt?",
         "distractor1": "viruses", "distractor2": "protozoa", "distractor3": "gymnosperms",
         "correct_answer": "mesophilic organisms", "support": " Mesophiles grow best in moderate temperature. "},
        {"question": "What is the least dangerous radioactive decay?", "distractor1": "zeta decay",
         "distractor2": "beta decay", "distractor3": "gamma decay", "correct_answer": "alpha decay", "support": ""},
        {"question": "Where is the answer?", "distractor1": "a", "distractor2": "b", "distractor3": "c",
         "support": ""},
        {"question": "Blank distractor?", "distractor1": "a", "distractor2": " ", "distractor3": "c",
         "correct_answer": "d", "support": ""},
        NOT_AN_OBJECT,
    ]
    got = read_file(tmp_path, "sciq", rows)
    assert got.skipped == {"missing_field": 1, "empty_text": 1, "not_object": 1}
    assert [e.response for e in got.examples] == ["mesophilic organisms", "alpha decay"]
    first, second = got.examples
    assert first.instruction.startswith("Mesophiles grow best in moderate temperature.\nQuestion: What type of")
    assert second.instruction.startswith("Question: What is the least dangerous radioactive decay?\nA. ")
    for example, row in zip(got.examples, rows, strict=False):
        lines = example.instruction.split("\n")
        assert lines[-1] == "Answer:"
        choices = [line[3:] for line in lines[-5:-1]]
        assert [line[:3] for line in lines[-5:-1]] == ["A. ", "B. ", "C. ", "D. "]
        assert sorted(choices) == sorted([row["correct_answer"], row["distractor1"], row["distractor2"],
                                          row["distractor3"]])
    # Same row, same order; the correct answer is not always last (as the rows list it) nor in one place.
    assert read_file(tmp_path, "sciq", rows).examples == got.examples
    many = [{**rows[1], "question": f"Question number {i}?"} for i in range(12)]
    letters = {next(line[0] for line in e.instruction.split("\n") if line.endswith(". alpha decay"))
               for e in read_file(tmp_path, "sciq", many).examples}
    assert len(letters) > 1


def test_hub_ids_pick_their_row_format_and_subset():
    assert SourceConfig(name="b", kind="hub", dataset="oskarvanderwal/bbq", split="test").row_format == "bbq"
    assert SourceConfig(name="b", kind="hub", dataset="oskarvanderwal/bbq").dataset_subset == "All"
    sciq = SourceConfig(name="s", kind="hub", dataset="allenai/sciq")
    assert sciq.row_format == "sciq" and sciq.dataset_subset is None
    assert SourceConfig(name="s", kind="hub", dataset="someone/sciq").row_format == "fields"
    # A format named in the config wins over the hub id's.
    assert SourceConfig(name="s", kind="hub", dataset="allenai/sciq", format="fields").row_format == "fields"


def oasst_message(message_id, parent_id, role, text, rank=None, lang="en", tree="t1", **extra):
    return {
        "message_id": message_id,
        "parent_id": parent_id,
        "text": text,
        "role": role,
        "lang": lang,
        "rank": rank,
        "deleted": False,
        "review_result": True,
        "message_tree_id": tree,
        **extra,
    }


def test_oasst1_builds_threads_with_the_top_ranked_reply(tmp_path):
    rows = [
        # Tree 1: three replies to the root; the one ranked 0 wins over rank 1 and an unranked one.
        oasst_message("p1", None, "prompter", "How do I boil an egg?"),
        oasst_message("a1u", "p1", "assistant", "Unranked reply.", rank=None),
        oasst_message("a1b", "p1", "assistant", "Second-best reply.", rank=1),
        oasst_message("a1a", "p1", "assistant", "Best reply: ten minutes.", rank=0),
        # A follow-up to the best reply: its history is the first turn.
        oasst_message("p2", "a1a", "prompter", "And soft-boiled?"),
        oasst_message("a2", "p2", "assistant", "Six minutes.", rank=0),
        # A follow-up to another reply, never answered.
        oasst_message("p3", "a1b", "prompter", "Why?"),
        # Tree 2: unranked replies tie, the first in order wins; deleted and rejected replies don't count.
        oasst_message("q1", None, "prompter", "Name a planet.", tree="t2"),
        oasst_message("b0", "q1", "assistant", "Deleted reply.", rank=0, tree="t2", deleted=True),
        oasst_message("b1", "q1", "assistant", "Mars.", tree="t2"),
        oasst_message("b2", "q1", "assistant", "Venus.", tree="t2"),
        oasst_message("b3", "q1", "assistant", "Rejected reply.", rank=0, tree="t2", review_result=False),
        # Tree 3: German, not examples.
        oasst_message("g1", None, "prompter", "Wie spät ist es?", lang="de", tree="t3"),
        oasst_message("g2", "g1", "assistant", "Zehn Uhr.", rank=0, lang="de", tree="t3"),
        NOT_AN_OBJECT,
    ]
    got = read_file(tmp_path, "oasst1", rows)
    assert got.examples == [
        Example(instruction="How do I boil an egg?", response="Best reply: ten minutes."),
        Example(
            instruction="And soft-boiled?",
            response="Six minutes.",
            history=(("How do I boil an egg?", "Best reply: ten minutes."),),
        ),
        Example(instruction="Name a planet.", response="Mars."),
    ]
    assert got.skipped == {"no_reply": 1, "not_english": 2, "deleted": 1, "review_failed": 1, "not_object": 1}


def test_oasst1_history_follows_the_actual_parent_and_needs_it_read(tmp_path):
    rows = [
        oasst_message("p1", None, "prompter", "Pick a number."),
        oasst_message("a_top", "p1", "assistant", "Seven.", rank=0),
        oasst_message("a_low", "p1", "assistant", "Three.", rank=1),
        oasst_message("p2", "a_low", "prompter", "Why three?"),
        oasst_message("a2", "p2", "assistant", "It is prime.", rank=0),
        oasst_message("p9", "gone", "prompter", "Follow-up to a message not read."),
        oasst_message("a9", "p9", "assistant", "An answer.", rank=0),
    ]
    got = read_file(tmp_path, "oasst1", rows)
    assert got.examples == [
        Example(instruction="Pick a number.", response="Seven."),
        Example(instruction="Why three?", response="It is prime.", history=(("Pick a number.", "Three."),)),
    ]
    assert got.skipped == {"missing_parent": 1}
    # max_rows counts messages before the trees are built: the reply to p2 is cut off.
    capped = read_file(tmp_path, "oasst1", rows, max_rows=4)
    assert [e.instruction for e in capped.examples] == ["Pick a number."]
    assert capped.skipped == {"no_reply": 1}


def test_json_array_and_object_files(tmp_path):
    rows = [{"instruction": "One.", "response": "1"}, "not an object", {"instruction": "Two.", "response": "2"}]
    (tmp_path / "list.json").write_text(json.dumps(rows, indent=2), encoding="utf-8")
    got = read_source(SourceConfig(name="s", kind="file", path=str(tmp_path / "list.json"), format="fields"))
    assert got.examples == [Example("One.", "1"), Example("Two.", "2")]
    assert got.skipped == {"not_object": 1}

    (tmp_path / "wrapped.json").write_text(json.dumps({"data": rows}), encoding="utf-8")
    wrapped = read_source(SourceConfig(name="s", kind="jsonl", path=str(tmp_path / "wrapped.json"), max_rows=1))
    assert wrapped.examples == [Example("One.", "1")] and wrapped.skipped == {}


def test_a_line_that_is_not_json_is_a_skipped_row_and_a_broken_json_file_names_its_line(tmp_path):
    rows = [{"instruction": "One.", "response": "1"}, NOT_AN_OBJECT, "{not json",
            {"instruction": "Two.", "response": "2"}]
    got = read_file(tmp_path, "fields", rows)
    assert got.examples == [Example("One.", "1"), Example("Two.", "2")]
    assert got.skipped == {"not_object": 1, "not_json": 1}
    capped = read_file(tmp_path, "fields", rows, max_rows=2)  # bad rows count towards max_rows
    assert capped.examples == [Example("One.", "1")] and capped.skipped == {"not_object": 1}
    assert read_file(tmp_path, "oasst1", ["{not json"]).skipped == {"not_json": 1}

    (tmp_path / "broken.json").write_text('[\n  {"instruction": "x",\n  oops\n]', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.json:3: not valid JSON"):
        read_source(SourceConfig(name="s", kind="file", path=str(tmp_path / "broken.json")))

    (tmp_path / "broken.json").write_text('[\n  {"instruction": "x",\n  oops\n]', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.json:3: not valid JSON"):
        read_source(SourceConfig(name="s", kind="file", path=str(tmp_path / "broken.json")))


def test_file_fingerprint_follows_content_and_reading_options(tmp_path):
    rows = [{"instruction": "One.", "response": "1"}, {"instruction": "Two.", "response": "2"}]
    first = read_file(tmp_path, "fields", rows, name="a.jsonl").fingerprint
    assert read_file(tmp_path, "fields", rows, name="a.jsonl").fingerprint == first
    assert read_file(tmp_path, "fields", rows, name="copy.jsonl").fingerprint == first  # content, not path
    assert read_file(tmp_path, "fields", rows[:1], name="a.jsonl").fingerprint != first
    assert read_file(tmp_path, "fields", rows, name="a.jsonl", max_rows=1).fingerprint != first
    assert read_file(tmp_path, "dolly", rows, name="a.jsonl").fingerprint != first
    # The cache's cheap lookup gives the same fingerprint without parsing the rows.
    write_jsonl(tmp_path / "b.jsonl", rows)
    assert source_fingerprint(SourceConfig(name="s", kind="file", path=str(tmp_path / "b.jsonl"),
                                           format="fields")) == first


def test_hub_source_reads_a_local_dataset_directory(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    # Keep the Arrow cache of this test out of the user's cache.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")
    data_dir = tmp_path / "dolly-local"
    data_dir.mkdir()
    rows = [
        {"instruction": "Capital of France?", "context": "", "response": "Paris.", "category": "open_qa"},
        {"instruction": "Summarize.", "context": "A long text.", "response": None, "category": "summarization"},
        {"instruction": "Capital of Italy?", "context": "", "response": "Rome.", "category": "open_qa"},
    ]
    data_file = write_jsonl(data_dir / "train.jsonl", rows)
    source = SourceConfig(name="dolly", kind="hub", dataset=str(data_dir), format="dolly")

    got = read_source(source)
    assert got.examples == [Example("Capital of France?", "Paris."), Example("Capital of Italy?", "Rome.")]
    assert got.skipped == {"missing_field": 1}
    assert read_source(source).fingerprint == got.fingerprint == source_fingerprint(source)
    capped = read_source(SourceConfig(name="dolly", kind="hub", dataset=str(data_dir), format="dolly", max_rows=1))
    assert capped.examples == got.examples[:1] and capped.fingerprint != got.fingerprint

    rows[0]["response"] = "Paris, on the Seine."
    write_jsonl(data_dir / "train.jsonl", rows)
    # datasets notices a changed local file by its mtime: make sure it moved even on a coarse clock.
    stat = os.stat(data_file)
    os.utime(data_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
    changed = read_source(source)
    assert changed.examples[0] == Example("Capital of France?", "Paris, on the Seine.")
    assert changed.fingerprint != got.fingerprint and source_fingerprint(source) == changed.fingerprint


def test_synthetic_sources_are_read_like_the_others():
    source = SourceConfig(name="demo", kind="synthetic", num_train=50, num_eval=20, seed=3)
    got = read_source(source)
    train, _ = digit_task(3, 50, 20)
    assert got.examples == [Example(d.instruction, d.choices[d.answer]) for d in train] and got.skipped == {}
    assert got.fingerprint == source_fingerprint(source) == "synthetic:3:50:20"
    assert not {e.instruction for e in got.examples} & {d.instruction for d in heldout_docs(source)}
    assert source_fingerprint(dataclasses.replace(source, seed=4)) != got.fingerprint


def test_misused_formats_are_refused():
    with pytest.raises(ValueError, match="oasst1"):
        format_row("oasst1", {"message_id": "m"})
    with pytest.raises(ValueError, match="unknown row format"):
        format_row("sharegpt", {})
    assert format_row("gsm8k", ["not", "a", "row"]) == "not_object"
