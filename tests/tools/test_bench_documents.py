"""`chunkwise bench --documents`: a packed row measured with position_ids restarting at each document."""

from __future__ import annotations

import json
import math

import pytest

from chunkwise.cli.main import main
from chunkwise.tools.bench.case import BenchCase
from chunkwise.tools.bench.measure import measure_case

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def quick_case(method: str, documents: tuple[int, ...] | None) -> BenchCase:
    return BenchCase(method=method, model="quick", seq_len=256, chunk_size=64, repeats=1, warmup=0, threads=1, documents=documents)


def test_packed_row_reaches_every_method_as_documents():
    """The same tokens give one loss per reading: full backprop (transformers' per-document mask) and SeCO (the
    engine's per-document attention) agree on the packed row, and both differ from the row read as one stream."""
    losses = {}
    for method in ("full", "seco"):
        for documents in ((64,) * 4, None):
            result = measure_case(quick_case(method, documents))
            assert result.ok, result.error
            assert len(result.step_cpu_s) == 1 and 0 < result.step_cpu_s[0]  # the step's CPU time beside its wall time
            losses[method, documents] = result.loss
    assert losses["full", (64,) * 4] == pytest.approx(losses["seco", (64,) * 4], rel=1e-5)
    assert losses["full", None] == pytest.approx(losses["seco", None], rel=1e-5)
    # Random weights predict about uniformly, so the readings differ little, but 100x more than the agreement above.
    assert not math.isclose(losses["seco", (64,) * 4], losses["seco", None], rel_tol=1e-4)


def test_bench_command_measures_a_packed_row(tmp_path, capsys):
    code = main(["bench", "--quick", "--methods", "seco", "--documents", "64x2,128", "--repeats", "1", "--warmup", "0",
                 "--output", str(tmp_path)])
    assert code == 0
    table = (tmp_path / "bench.md").read_text()
    assert "Packed row: 3 documents of 64, 64, 128 tokens" in table and "| seco | 256 |" in table
    (result,) = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert result["status"] == "ok" and result["case"]["documents"] == [64, 64, 128]


@pytest.mark.parametrize("args, message", [
    (["--documents", "64x2", "--lengths", "512"], "--documents make a row of 128 tokens; leave out --lengths or give that length"),
    (["--documents", "64x2", "--max-memory", "1GiB"], "the longest-sequence search (max_memory) grows rows of one document"),
])
def test_bench_documents_bad_input_is_one_line(tmp_path, capsys, args, message):
    assert main(["bench", "--quick", *args, "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "bench.json").exists()


def test_case_documents_must_fill_the_row():
    with pytest.raises(ValueError, match=r"^the documents' lengths add up to 200 tokens, not the row's 256$"):
        BenchCase(method="seco", model="quick", seq_len=256, documents=(100, 100))
