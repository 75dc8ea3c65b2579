"""The results file read back to resume (`read_done`), folded from the parts of a multi-process run (`fold_parts`)
and written (`Writer`), called directly: what is kept, dropped or rewritten in the file."""

import json

import pytest

from palitorch.cli.results import Writer, fold_parts, read_done


def line(record) -> str:
    return json.dumps(record) + "\n"


def test_a_line_whose_index_is_not_an_integer_is_no_result(tmp_path, capsys):
    """A result's "index" is its request's line number: a line with a text or a missing index (a file edited by hand,
    another tool's) is dropped and its request runs again, rather than resumed under a key no request has."""
    out = tmp_path / "out.jsonl"
    out.write_text(line({"index": 1, "text": "a"}) + line({"index": "2", "text": "b"}) + line({"text": "c"})
                   + line({"index": True, "text": "d"}))  # (a bool is an int to Python: it was request 1)
    done, tidy = read_done(out)
    assert list(done) == [1] and done[1]["text"] == "a"
    assert capsys.readouterr().err.count("dropping an unreadable line") == 3
    tidy()
    assert out.read_text() == line({"index": 1, "text": "a"})
    out.write_text(line({"index": "1", "text": "a"}))
    with pytest.raises(Exception, match="holds no results of palitorch batch"):
        read_done(out)


def test_lines_of_the_parts_that_are_no_results_are_dropped(tmp_path):
    """Folding keeps the output's own lines that are not results (read_done judges them, and refuses a file that is
    not an output), but a part is palitorch's own: what in it is no result line is left out."""
    out = tmp_path / "out.jsonl"
    out.write_text(line({"index": 1, "text": "a"}) + "mine, not a result\n")
    (tmp_path / "out.jsonl.rank0").write_text("theirs, not a result\n" + line({"index": 2, "text": "b"}))
    assert fold_parts(out) == 1
    assert out.read_text().splitlines() == ["mine, not a result", json.dumps({"index": 1, "text": "a"}),
                                            json.dumps({"index": 2, "text": "b"})]


def test_results_are_written_as_utf8_not_escaped(tmp_path):
    """Text in any language is written as itself, in UTF-8 (a results file read by people and by grep), as `run
    --json` writes it (JSON's \\u escapes would read the same to a parser, not to a person)."""
    out = tmp_path / "out.jsonl"
    w = Writer(out)
    w.add({"prompt": "caption fr"}, 1, text="un chien dans la neige, très blanche ❄")
    w.close()
    (first,) = out.read_bytes().splitlines()
    assert "très blanche ❄".encode() in first and b"\\u" not in first
    assert json.loads(first)["text"] == "un chien dans la neige, très blanche ❄"
