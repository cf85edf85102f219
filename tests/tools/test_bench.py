"""`chunkwise bench`: every case in its own process, out of memory recorded as a result, outputs written.

The end-to-end tests run the `--quick` model (0.9M parameters, one thread); each case is a fresh Python
process, so they cost about a second of import time per case. Timing and memory *targets* are not
tested here (DESIGN.md §4): they live in docs/benchmarks.md.
"""

import json
import math
import sys

import pytest

from chunkwise.cli.main import main, parse_bytes
from chunkwise.tools.bench import runner as bench
from chunkwise.tools.bench.case import DEFAULT_METHODS, BenchCase, BenchSettings, CaseResult
from chunkwise.tools.bench.runner import longest_within, run_case

QUICK_PARAMETERS = 887_424  # the `quick` model: vocab 2048, hidden 128, 2 layers, intermediate 344


def _load(tmp_path) -> dict:
    return json.loads((tmp_path / "bench.json").read_text())


def _by_case(data: dict) -> dict[tuple[str, int], dict]:
    return {(r["case"]["method"], r["case"]["seq_len"]): r for r in data["results"]}


def test_quick_run_writes_table_json_and_plot_and_records_oom(tmp_path, capsys):
    # A 36 MiB cap above the baseline: every method fits at 256 tokens; at 1024 full backprop (~48 MiB:
    # the logits and every activation) does not, while layer checkpointing (~28 MiB), forward (~17 MiB),
    # SeCO and SpaCO (~12 MiB: one 64-token chunk's activations plus the KV cache) do.
    code = main(["bench", "--quick", "--lengths", "256,1024", "--memory-cap", "36MiB", "--output", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "| method | length | chunks | step time (s) | time × full |" in out
    assert "| full | 256 | – |" in out and "| full | 1024 | – | OOM |" in out
    assert (tmp_path / "bench.md").read_text() in out
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    data = _load(tmp_path)
    assert data["machine"]["torch"] and data["machine"]["cpu_count"] >= 1 and data["machine"]["device"] == "cpu"
    assert data["model"]["parameters"] == QUICK_PARAMETERS
    assert data["model"]["kv_bytes_per_token"] == 2 * 2 * 2 * 32 * 4  # K and V, 2 layers, 2 heads x 32, float32
    results = _by_case(data)
    assert set(results) == {(m, n) for m in DEFAULT_METHODS for n in (256, 1024)}
    expected_oom = {("full", 1024)}
    for key, result in results.items():
        if key in expected_oom:
            assert result["status"] == "oom", result
            assert "allocate" in result["error"] and result["time_s"] is None and result["peak_memory_bytes"] is None
            continue
        assert result["status"] == "ok", result
        assert result["time_s"] > 0 and all(t > 0 for t in result["step_times_s"]) and len(result["step_times_s"]) == 2
        assert result["peak_memory_bytes"] > 0 and result["baseline_bytes"] > 0
        assert math.isfinite(result["loss"])
        assert "clear_refs" in result["memory_method"]
    spaco = results[("spaco", 1024)]
    assert (spaco["num_chunks"], spaco["backprop_chunks"]) == (16, 8)  # budget 8 of 16 chunks
    assert results[("seco", 1024)]["backprop_chunks"] == 16


def test_killed_or_failing_case_is_recorded_not_raised():
    case = BenchCase(method="full", seq_len=64, model="quick")
    # What the kernel's OOM killer does: SIGKILL, no result line.
    killed = run_case(case, command=[sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    assert killed.status == "oom" and "SIGKILL" in killed.error and killed.time_s is None
    failed = run_case(case, command=[sys.executable, "-c", "raise SystemExit('model exploded')"])
    assert failed.status == "error" and failed.error == "model exploded"
    # Another signal is a crash, not a memory verdict.
    crashed = run_case(case, command=[sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"])
    assert crashed.status == "error" and "SIGTERM" in crashed.error


def test_max_memory_finds_a_longer_sequence_for_seco_than_for_full(tmp_path, capsys):
    # 40 MiB: full backprop of the quick model fits 512 tokens (~24 MiB) but not 1024 (~48 MiB); SeCO with
    # 256-token chunks grows by a few KiB per token, so it reaches the 2048-token search limit.
    code = main([
        "bench", "--quick", "--methods", "full,seco", "--lengths", "512", "--chunk-size", "256",
        "--max-memory", "40MiB", "--max-length", "2048", "--output", str(tmp_path),
    ])
    out = capsys.readouterr().out
    assert code == 0, out
    searches = {s["method"]: s for s in _load(tmp_path)["max_memory"]}
    full, seco = searches["full"], searches["seco"]
    assert full["budget_bytes"] == 40 << 20
    assert 512 <= full["longest"] < 1024 and full["longest"] % 256 == 0
    assert seco["longest"] == 2048 and seco["at_limit"]
    assert seco["longest"] > full["longest"]
    for search in (full, seco):  # every probe measured one step, and the answer's probe fit the budget
        fitting = [p for p in search["probes"] if p["case"]["seq_len"] == search["longest"]]
        assert fitting and fitting[0]["peak_memory_bytes"] <= 40 << 20
    assert "Longest sequence within 40 MiB" in out and "| seco | ≥ 2048 (search limit) |" in out


# ----- the search on a simulated memory curve (no subprocesses) ----------------------------------------


def _simulate(monkeypatch, *, fixed_mib: float, per_token_kib: float, oom_above_mib: float | None = None) -> list[int]:
    """Replace `run_case` by a linear memory model; return the list of probed lengths."""
    probed = []

    def fake_run_case(case, timeout_s=None):
        probed.append(case.seq_len)
        peak = int((fixed_mib * 1024 + per_token_kib * case.seq_len) * 1024)
        if oom_above_mib is not None and peak > oom_above_mib * (1 << 20):
            return CaseResult(case, "oom", error="MemoryError")
        return CaseResult(case, "ok", time_s=1.0, step_times_s=[1.0], peak_memory_bytes=peak, step_peaks_bytes=[peak])

    monkeypatch.setattr(bench, "run_case", fake_run_case)
    return probed


@pytest.mark.parametrize("start", [128, 1024, 16384])
def test_search_doubles_then_bisects_to_one_chunk(monkeypatch, start):
    probed = _simulate(monkeypatch, fixed_mib=10, per_token_kib=4, oom_above_mib=60)
    settings = BenchSettings(model="quick", methods=("seco",), lengths=(start,), chunk_size=128)
    search = longest_within(settings, "seco", 50 << 20, log=lambda line: None)
    # 10 MiB + 4 KiB/token <= 50 MiB  <=>  tokens <= 10240: exactly a multiple of 128.
    assert search.longest == 10240 and not search.at_limit
    assert probed == [p.case.seq_len for p in search.probes] and all(n % 128 == 0 for n in probed)
    # Logarithmic: at most one probe per doubling or halving, and one per bisection step.
    assert len(probed) <= 2 * math.log2(16384 // 128) + 2
    assert 10240 in probed and (10240 + 128) in probed  # the answer fits and one more chunk was a miss


def test_search_reports_nothing_fits_and_the_length_limit(monkeypatch):
    _simulate(monkeypatch, fixed_mib=100, per_token_kib=1)
    settings = BenchSettings(model="quick", methods=("full",), lengths=(1024,), chunk_size=256)
    nothing = longest_within(settings, "full", 50 << 20, log=lambda line: None)
    assert nothing.longest == 0 and [p.case.seq_len for p in nothing.probes] == [1024, 512, 256]

    settings = BenchSettings(model="quick", methods=("seco",), lengths=(1024,), chunk_size=256, max_length=4096)
    capped = longest_within(settings, "seco", 1 << 30, log=lambda line: None)
    assert capped.longest == 4096 and capped.at_limit


# ----- command-line input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--methods", "full,backprop"], "methods must be some of forward, full, ckpt, seco, spaco"),
        (["--lengths", "1k,2k"], "--lengths must be a comma-separated list"),
        (["--lengths", "1"], "lengths must be integers >= 2"),
        (["--max-memory", "lots"], "--max-memory must be a positive number of bytes"),
        (["--budget", "0"], "budget must be at least 1"),
    ],
)
def test_bench_bad_input_is_one_line(tmp_path, capsys, args, message):
    assert main(["bench", *args, "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "bench.json").exists()


def test_parse_bytes_uses_binary_units():
    assert parse_bytes("4096", "--max-memory") == 4096
    assert parse_bytes("512M", "--max-memory") == 512 << 20
    assert parse_bytes("2GiB", "--max-memory") == 2 << 30
    assert parse_bytes("1.5g", "--max-memory") == 3 << 29
