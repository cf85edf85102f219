"""`chunkwise verify`: prints per-group differences, exits 0 within tolerance, 1 above, 2 on bad input."""

import subprocess
import sys
from pathlib import Path

import pytest

from chunkwise.cli.main import main
from chunkwise.models.presets import build_tiny_model


def test_verify_passes_on_a_tiny_preset(capsys):
    code = main(["verify", "--model", "tiny-mistral", "--seq-len", "40", "--chunk-size", "6", "--batch-size", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "model.layers.*.self_attn.q_proj.weight" in out and "max rel diff" in out
    assert "PASS" in out


def test_verify_fails_when_the_tolerance_cannot_be_met(capsys):
    # float32 chunked vs full differ by rounding, so a tolerance of 0 must fail.
    code = main(["verify", "--dtype", "float32", "--tolerance", "0", "--seq-len", "40", "--chunk-size", "6"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL: max relative difference" in out


def test_verify_lora_on_a_saved_model(tmp_path, capsys):
    build_tiny_model("tiny-qwen3").save_pretrained(tmp_path / "model")
    code = main(["verify", "--model", str(tmp_path / "model"), "--seq-len", "24", "--chunk-size", "5", "--lora-r", "4"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "lora_A" in out and "lora_B" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "./no/such/model"], "does not exist"),
        (["--seq-len", "1"], "--seq-len must be at least 2"),
        (["--chunk-size", "0"], "--chunk-size must be a positive integer"),  # named as the option, checked before loading
        (["--tolerance", "-1"], "--tolerance must be a finite number"),
    ],
)
def test_verify_bad_input_is_one_line(capsys, args, message):
    assert main(["verify", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "chunkwise"
    result = subprocess.run(
        [str(script), "verify", "--seq-len", "16", "--chunk-size", "4"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "PASS" in result.stdout


def test_train_help_describes_every_setting_from_its_docstring(capsys, monkeypatch):
    """`chunkwise train`'s options are TrainConfig's fields: one option per field, its docstring the help."""
    import dataclasses

    monkeypatch.setenv("COLUMNS", "1000")  # no line breaks inside words such as micro-batch

    from chunkwise.cli.options import field_docs, option_name
    from chunkwise.recipes.train import TrainConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    docs = field_docs(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        flag = option_name("no_" + field.name) if field.default is True else option_name(field.name)
        assert flag in help_text, flag
        assert " ".join(docs[field.name].split()[:6]) in help_text, field.name


@pytest.mark.parametrize("option, value", [("attention", "flash"), ("method", "sgd"), ("sampling", "random"), ("dtype", "int8")])
def test_train_options_are_checked_by_the_config_with_the_option_name(capsys, tmp_path, option, value):
    assert main(["train", f"--{option}", value, "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"--{option} must be one of" in err and repr(value) in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_engine_checks_name_the_python_setting_or_the_option():
    """One check serves ChunkwiseConfig and TrainConfig; each names the setting as its user wrote it."""
    from chunkwise import ChunkwiseConfig
    from chunkwise.recipes.train import TrainConfig

    with pytest.raises(ValueError, match=r"^ChunkwiseConfig\.attention must be one of chunkwise, model, got 'flash'$"):
        ChunkwiseConfig(attention="flash")
    with pytest.raises(ValueError, match=r"^--attention must be one of chunkwise, model, got 'flash'$"):
        TrainConfig(attention="flash").resolved()
    with pytest.raises(ValueError, match=r"^ChunkwiseConfig\.budget only applies to method='spaco'"):
        ChunkwiseConfig(budget=2)
    with pytest.raises(ValueError, match=r"^--budget only applies to --method spaco"):
        TrainConfig(budget=2).resolved()


def test_every_option_of_every_command_is_described():
    """`--help` of each subcommand describes each option (eval's --dtype had none)."""
    import argparse

    from chunkwise.cli.main import build_parser

    (subcommands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for command, parser in subcommands.choices.items():
        silent = [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]
        assert not silent, f"chunkwise {command}: {silent} have no help"
