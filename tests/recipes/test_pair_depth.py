"""The synthetic task with its key→value pairs at a random depth (`--pair-depth random`): the fact anywhere in
the sequence, the question still at the end (docs/spaco.md's random-depth task)."""

from __future__ import annotations

import json
import shutil

from chunkwise.cli.main import main
from chunkwise.data.synthetic import RecallTask

SEQ_LEN = 64
DEMO = ["--steps", "2", "--seq-len", str(SEQ_LEN), "--chunk-size", "16", "--batch-size", "2", "--no-progress"]


def pairs_at(task: RecallTask, ids: list[int]) -> int:
    """Index of the first key or value token after <bos>: where the block of pairs starts."""
    fillers = range(task.vocab_size - task.num_fillers, task.vocab_size)
    return next(i for i in range(1, len(ids)) if ids[i] not in fillers)


def test_random_depth_moves_only_the_pairs_block_to_a_uniform_depth():
    start, moved = RecallTask(), RecallTask(pair_depth="random")
    block = 2 * start.num_pairs * start.repeats
    queries = 3 * start.num_pairs
    num_filler = SEQ_LEN - 1 - block - queries
    depths = []
    for position in range(200):
        a = start.sequence(position, seq_len=SEQ_LEN, seed=3).input_ids
        b_sequence = moved.sequence(position, seq_len=SEQ_LEN, seed=3)
        b = b_sequence.input_ids
        assert pairs_at(start, a) == 1  # the demo's layout is unchanged: the pairs right after <bos>
        depth = pairs_at(moved, b) - 1
        # Same draws: the same pairs, filler and queries; only the block moved, inside the filler.
        assert b[0] == a[0] and b[1 + depth : 1 + depth + block] == a[1 : 1 + block]
        assert b[1 : 1 + depth] + b[1 + depth + block : SEQ_LEN - queries] == a[1 + block : SEQ_LEN - queries]
        assert b[SEQ_LEN - queries :] == a[SEQ_LEN - queries :]
        assert b_sequence.labels == start.sequence(position, seq_len=SEQ_LEN, seed=3).labels  # the answer only
        depths.append(depth)
    assert min(depths) >= 0 and max(depths) <= num_filler
    # Uniform on {0, ..., 52}: mean 26, sd 15.6, so the mean of 200 draws is 26 ± 1.1; 4 sd = 4.4.
    assert abs(sum(depths) / len(depths) - num_filler / 2) < 4.4
    assert min(depths) < 5 and max(depths) > num_filler - 5


def test_train_and_eval_read_the_run_s_pair_depth_and_an_older_run_resumes(tmp_path, capsys):
    output = tmp_path / "run"
    assert main(["train", "--output", str(output), *DEMO, "--eval-every", "2", "--checkpoint-every", "1",
                 "--keep-checkpoints", "2", "--pair-depth", "random"]) == 0
    record = json.loads((output / "chunkwise_run.json").read_text())
    assert record["config"]["pair_depth"] == "random"
    capsys.readouterr()
    for given, expected in (([], "random"), (["--pair-depth", "start"], "start")):
        assert main(["eval", "--model", str(output), "--num-sequences", "2", "--chunk-size", "16", "--json", *given]) == 0
        assert json.loads(capsys.readouterr().out)["settings"]["pair_depth"] == expected

    # A run started before --pair-depth existed has no such setting in its record: it resumes, with the default.
    older = tmp_path / "older"
    assert main(["train", "--output", str(older), *DEMO, "--eval-every", "0", "--checkpoint-every", "1", "--keep-checkpoints", "2"]) == 0
    record = json.loads((older / "chunkwise_run.json").read_text())
    del record["config"]["pair_depth"]
    (older / "chunkwise_run.json").write_text(json.dumps(record))
    shutil.rmtree(older / "checkpoints" / "step-000002")
    shutil.rmtree(older / "model")
    assert main(["train", "--output", str(older), "--resume"]) == 0
    assert (older / "model").is_dir()


def test_pair_depth_with_file_data_or_a_probe_is_refused_in_one_line(tmp_path, capsys):
    data = tmp_path / "a.txt"
    data.write_text("some text\n")
    assert main(["train", "--data", str(data), "--pair-depth", "random", "--output", str(tmp_path / "x")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("chunkwise train: error: --pair-depth places the synthetic task's key→value pairs") and "\n" not in error
    assert main(["eval", "--model", "tiny-llama", "--task", "passkey", "--pair-depth", "random"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("chunkwise eval: error: --pair-depth places the synthetic task's pairs") and "\n" not in error
