"""`chunkwise train`'s data options of issue 23, from the command line: conversations (loss on the assistant
turns), the held-out split of --data (--eval-fraction), and folders read beyond *.txt (--glob)."""

import json

import pytest

from chunkwise.cli.main import main
from chunkwise.data.files import DataError, Record, load_records
from chunkwise.data.sequences import hold_out

TINY = ["--model", "tiny-llama", "--seq-len", "128", "--chunk-size", "32", "--steps", "1", "--no-progress"]


def _evaluations(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]


def test_a_conversational_jsonl_trains_on_the_assistant_tokens_only(tmp_path, capsys):
    answers = [str(7 * i) for i in range(6)]
    rows = [{"messages": [{"role": "system", "content": "Answer in digits."}, {"role": "user", "content": f"Seven times {i}?"},
                          {"role": "assistant", "content": answer}]} for i, answer in enumerate(answers)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    run = tmp_path / "run"
    code = main(["train", *TINY, "--data", str(data), "--eval-data", str(data), "--eval-every", "1", "--packing", "truncate",
                 "--output", str(run)])
    assert code == 0, capsys.readouterr().err
    # Held-out scoring counts the targets: each answer's bytes and the template's "<|im_end|>" and "\n" that close it.
    assert {record["targets"] for record in _evaluations(run)} == {sum(len(answer) + 2 for answer in answers)}


def test_eval_fraction_holds_out_whole_documents_of_the_data(tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(8):
        (docs / f"{i}.txt").write_text(f"document {i} " + "x" * (10 * i) + "\n")
    run = tmp_path / "run"
    assert main(["train", *TINY, "--data", str(docs), "--eval-fraction", "0.25", "--output", str(run)]) == 0, capsys.readouterr().err
    train, held = hold_out(load_records(str(docs)), 0.25, seed=0)
    (first, last) = _evaluations(run)  # default --eval-every 100 with a split: at the start and the end
    assert first["sequences"] == 2 and first["tokens"] == sum(len(r.text.encode()) + 2 for r in held)
    out = capsys.readouterr().out
    assert "held-out loss" in out
    assert main(["train", *TINY, "--data", str(docs), "--eval-fraction", "0.25", "--eval-data", str(docs),
                 "--output", str(tmp_path / "r2")]) == 2
    assert "--eval-fraction holds out part of --data and --eval-data names other held-out data" in capsys.readouterr().err


def test_hold_out_is_seeded_disjoint_and_keeps_the_order():
    documents = [Record(f"d{i}", text=f"text {i}") for i in range(10)]
    train, held = hold_out(documents, 0.3, seed=1)
    assert len(held) == 3 and len(train) == 7 and set(train).isdisjoint(held) and set(train) | set(held) == set(documents)
    assert train == sorted(train, key=documents.index) and held == sorted(held, key=documents.index)
    assert hold_out(documents, 0.3, seed=1) == (train, held) and hold_out(documents, 0.3, seed=2) != (train, held)
    with pytest.raises(DataError, match="cannot hold out 0.5 of 1 document"):
        hold_out(documents[:1], 0.5, seed=0)


def test_glob_reads_folders_beyond_txt(tmp_path, capsys):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    for name in ("a.txt", "b.md", "c.rst", "sub/d.md"):
        (docs / name).write_text(f"contents of {name}\n")

    def names(glob):
        return [record.source.removeprefix(str(docs) + "/") for record in load_records(str(docs), glob=glob)]
    assert names("*.txt") == ["a.txt"]
    assert names("*.md") == ["b.md", "sub/d.md"] and names("*.txt, *.md") == ["a.txt", "b.md", "sub/d.md"]
    with pytest.raises(DataError, match=r"no non-empty file matching '\*.csv'"):
        load_records(str(docs), glob="*.csv")
    run = tmp_path / "run"
    assert main(["train", *TINY, "--data", str(docs), "--glob", "*.md,*.rst", "--output", str(run)]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(run), "--chunk-size", "32", "--json"]) == 0  # the run's data, read with the run's glob
    assert json.loads(capsys.readouterr().out)["documents"] == 3
