"""`chunkwise` command line: each subcommand maps to one plain, typed function.

    chunkwise verify --model tiny-llama --seq-len 256 --chunk-size 32
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings

import torch

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}
# Default pass/fail line per dtype. Differences from chunking are rounding only (Llama-like models show
# ~1e-15 in float64); a few models (Gemma family) compute norms in float32 even in float64 (~1e-7).
# A real bug (wrong shift, mask or position) shows up as an error of order 1e-2 to 1.
DEFAULT_TOLERANCE = {"float64": 1e-6, "float32": 1e-3, "bfloat16": 1e-1}


class UsageError(Exception):
    """A problem with the user's input: printed as one line, no stack trace (unless --debug)."""


def _add_lora(model: torch.nn.Module, rank: int, seed: int) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"]))
    # LoRA starts with B = 0, where A's gradient is exactly zero and proves nothing: perturb B.
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                param.copy_(0.02 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    return model


def verify(
    *,
    model: str,
    seq_len: int,
    chunk_size: int,
    tolerance: float | None = None,
    dtype: str = "float64",
    device: str = "auto",
    batch_size: int = 1,
    lora_r: int = 0,
    seed: int = 0,
) -> int:
    """Compare SeCO's gradient with ordinary backprop on `model`; return 0 if within tolerance, else 1."""
    from rich.console import Console
    from rich.table import Table

    from .models import load_causal_lm
    from .verify import compare_gradients

    if seq_len < 2:
        raise UsageError(f"--seq-len must be at least 2 (one token predicts the next), got {seq_len}")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    tolerance = DEFAULT_TOLERANCE[dtype] if tolerance is None else tolerance
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise UsageError(f"--tolerance must be a finite number >= 0, got {tolerance}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"

    console = Console()
    if not console.is_terminal:  # piped or captured: don't fold parameter names to 80 columns
        console = Console(width=140)
    lm = load_causal_lm(model, dtype=DTYPES[dtype], seed=seed).to(device)
    if lora_r > 0:
        lm = _add_lora(lm, lora_r, seed)
    report = compare_gradients(lm, seq_len=seq_len, chunk_size=chunk_size, batch_size=batch_size, seed=seed)

    num_chunks = math.ceil(seq_len / chunk_size)
    console.print(
        f"[bold]chunkwise verify[/]: {model} ({dtype}, {device}), batch {batch_size} x {seq_len} tokens, "
        f"chunk size {chunk_size} ({num_chunks} chunks){', LoRA r=' + str(lora_r) if lora_r else ''}"
    )
    console.print(f"loss: SeCO {report.loss_seco:.12g}   full backprop {report.loss_full:.12g}")
    table = Table(title="gradient difference, SeCO vs full backprop", title_justify="left")
    table.add_column("parameter group", overflow="fold", min_width=30)
    for column in ("tensors", "max abs diff", "max rel diff"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("", no_wrap=True)
    for group in report.groups:
        mark = "[green]ok[/]" if group.max_rel <= tolerance else "[red]FAIL[/]"
        table.add_row(group.group, str(group.num_tensors), f"{group.max_abs:.2e}", f"{group.max_rel:.2e}", mark)
    console.print(table)
    if report.max_rel <= tolerance:
        console.print(f"[green]PASS[/]: max relative difference {report.max_rel:.2e} <= tolerance {tolerance:.1e}")
        return 0
    console.print(f"[red]FAIL[/]: max relative difference {report.max_rel:.2e} > tolerance {tolerance:.1e}")
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chunkwise", description="Fine-tune long-context causal LMs chunk by chunk (SeCO / SpaCO)."
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser(
        "verify",
        help="check SeCO's gradient against ordinary backprop on a model",
        description="Compute one random batch's gradient with SeCO and with ordinary backprop, print the "
        "largest differences per parameter group, and exit 1 if any exceeds the tolerance.",
    )
    check.add_argument("--model", default="tiny-llama", help="local directory, hub id, or tiny preset (tiny-llama, tiny-qwen2, tiny-qwen3, tiny-mistral, tiny-gemma3)")
    check.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    check.add_argument("--chunk-size", type=int, default=32, help="tokens per chunk (default 32)")
    check.add_argument("--tolerance", type=float, default=None, help="largest relative difference that passes (default: 1e-6 float64, 1e-3 float32, 1e-1 bfloat16)")
    check.add_argument("--dtype", choices=sorted(DTYPES), default="float64", help="precision of both passes (default float64)")
    check.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    check.add_argument("--batch-size", type=int, default=1)
    check.add_argument("--lora-r", type=int, default=0, help="wrap the model in a LoRA adapter of this rank (0: full parameters)")
    check.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    # peft calls a transformers API that transformers has deprecated; the warning is not the user's concern.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    args = build_parser().parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k not in ("command", "debug")}
    try:
        if args.command == "verify":
            return verify(**options)
    except (UsageError, ValueError, TypeError, OSError) as error:
        if args.debug:
            raise
        print(f"chunkwise {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
