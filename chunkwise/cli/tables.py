"""The `chunkwise` subcommands' tables, rendered with rich: what each command prints, apart from what it computes."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from chunkwise.utils.sizes import format_bytes


def print_verify(report, *, model: str, dtype: str, device: str, batch_size: int, seq_len: int, chunk_size: int, lora_r: int,
                 tolerance: float) -> bool:
    """`chunkwise verify`'s report: the losses, a table of gradient differences per parameter group, PASS or FAIL.

    `report`: a `chunkwise.recipes.verify.VerifyReport`. Returns whether every group is within `tolerance`.
    """
    console = Console()
    if not console.is_terminal:  # piped or captured: don't fold parameter names to 80 columns
        console = Console(width=140)
    num_chunks = -(-seq_len // chunk_size)
    console.print(
        f"[bold]chunkwise verify[/]: {model} ({dtype}, {device}), batch {batch_size} x {seq_len} tokens, "
        f"chunk size {chunk_size} ({num_chunks} chunks){', LoRA r=' + str(lora_r) if lora_r else ''}"
    )
    console.print(f"loss: SeCO {report.loss_seco:.12g}   full backprop {report.loss_full:.12g}")
    if report.norms_in_model_dtype:
        console.print(f"{dtype}: {report.norms_in_model_dtype} RMSNorm modules computed in {dtype} in both passes (transformers "
                      "rounds them to float32 inside), so the differences below are chunking's alone")
    if report.norms_left_float32:
        console.print(f"note: {', '.join(report.norms_left_float32)} compute in float32 inside and were left so: their "
                      "rounding (~1e-7) is part of the differences below")
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
        return True
    console.print(f"[red]FAIL[/]: max relative difference {report.max_rel:.2e} > tolerance {tolerance:.1e}")
    return False


def print_plan(report, device: str) -> None:
    """`chunkwise plan`'s tables: each method's predicted peak, its parts, the budget and the longest lengths."""
    from chunkwise.plan import LONGEST_SEARCH_LIMIT, describe_parts

    shape, training, budget = report.shape, report.training, report.budget

    def size(count: int | None) -> str:
        return format_bytes(count) if count else "–"

    trained = f"LoRA r={training.lora_r} on {','.join(training.lora_targets)}" if training.lora else "all parameters trained"
    console = Console(width=170)
    console.print(f"[bold]chunkwise plan[/]: {shape.name} ({shape.model_type}, {shape.parameters / 1e6:,.1f}M parameters, "
                  f"{trained}), {training.precision} on {device}, AdamW; batch {training.batch_size}")
    if report.plans:
        table = Table(title=f"predicted peak memory at {report.seq_len} tokens", title_justify="left")
        for column in ("method", "chunk", "weights", "gradients", "optimizer", "KV cache", "KV grad", "activations",
                       "logits+loss", "other", "peak", "host", "peak at", "fits"):
            table.add_column(column, justify="left" if column in ("method", "peak at") else "right")
        for plan in report.plans:
            parts = plan.parts
            fits = "–" if budget is None else ("yes" if budget.admits(plan, training.device_type) else "[red]no[/]")
            table.add_row(plan.method, str(plan.chunk_size or "–"), size(parts.get("weights", 0) + parts.get("weight_copies", 0) + parts.get("dequantization", 0)),
                          size(parts.get("gradients")), size(parts.get("optimizer")), size(parts.get("kv_cache")),
                          size(parts.get("kv_gradient")), size(parts.get("activations")), size(parts.get("logits_loss")),
                          size(parts.get("attention_backward", 0) + parts.get("optimizer_step", 0)), size(plan.peak),
                          size(plan.host), plan.phase, fits)
        console.print(table)
        console.print("Columns hold what is allocated at the peak: full and ckpt peak in the loss's backward, before any "
                      "gradient exists; \"other\" is the attention's backward over the past or AdamW's step; weights include "
                      "autocast's low-precision copies. Derivation and validation: docs/plan.md.")
    if report.documents is not None and report.flops:
        _print_packed_flops(console, report)
    if budget is not None:
        console.print(f"budget: {budget.describe()}")
        if report.recommended is not None:
            plan = report.recommended
            offload = "needed (the KV cache does not fit beside the rest)" if plan.method == "seco+offload" else "not needed"
            console.print(f"recommended (--chunk-size auto): {plan.method} with {plan.chunk_size}-token chunks, peak "
                          f"{size(plan.peak)}; offload {offload}")
            console.print(f"  {describe_parts(plan)}")
        elif report.seq_len is not None:
            console.print(f"[red]{report.seq_len} tokens do not fit[/] with SeCO even with the KV cache offloaded")
        table = Table(title="longest sequence within the budget", title_justify="left")
        for column in ("method", "longest length", "chunk", "peak"):
            table.add_column(column, justify="left" if column == "method" else "right")
        for method, plan in report.longest.items():
            if plan is None:
                table.add_row(method, "none", "–", "–")
            elif plan.seq_len >= LONGEST_SEARCH_LIMIT:  # the device part stopped growing: host memory decides
                table.add_row(method, f"≥ {plan.seq_len:,} (device flat)", str(plan.chunk_size or "–"), size(plan.peak))
            else:
                table.add_row(method, f"{plan.seq_len:,}", str(plan.chunk_size or "–"), size(plan.peak))
        console.print(table)
    for note in report.notes:
        console.print(f"note: {note}")


def _print_packed_flops(console: Console, report) -> None:
    """With --documents: each method's step FLOPs with per-document attention and with attention across the row."""
    from chunkwise.plan.compute import attention_pairs

    documents = report.documents
    pairs = attention_pairs(report.seq_len, documents) / attention_pairs(report.seq_len)
    console.print(f"packed row: {len(documents)} documents ({_describe_lengths(documents)}) in {report.seq_len:,} tokens; "
                  f"per-document attention reads {pairs:.1%} of the query-key pairs of attention across the row. Memory above: "
                  "per-document (a chunk keeps what it reads from its first query's document start on; the KV cache spans the row)")
    table = Table(title="step FLOPs (one row; backward = 2 forwards)", title_justify="left")
    for column in ("method", "per-document", "attention share", "across documents", "attention share", "saved"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for own, cross in zip(report.flops, report.cross_flops):
        table.add_row(own.method, f"{own.total:.3g}", f"{own.attention_share:.1%}", f"{cross.total:.3g}",
                      f"{cross.attention_share:.1%}", f"{1 - own.total / cross.total:.1%}")
    console.print(table)


def _describe_lengths(documents: tuple[int, ...]) -> str:
    """"4,096 x 8" for equal lengths, else "1,024 to 16,384, mean 4,096"."""
    if len(set(documents)) == 1:
        return f"{documents[0]:,} x {len(documents)}"
    return f"{min(documents):,} to {max(documents):,}, mean {sum(documents) / len(documents):,.0f}"


def print_evaluation(report) -> None:
    """`chunkwise eval`'s table: documents, tokens, loss, perplexity, accuracy, peak memory, speed (an `EvalReport`)."""
    table = Table(title=f"chunkwise eval: {report.model} on {report.data}", title_justify="left")
    for column in ("documents", "tokens", "longest", "targets", "loss", "perplexity", "accuracy", "peak memory", "tokens/s"):
        table.add_column(column, justify="right")
    accuracy = f"{report.accuracy:.1%}" + (f" (chance {report.chance_accuracy:.1%})" if report.chance_accuracy else "")
    table.add_row(str(report.documents), f"{report.tokens:,}", f"{report.longest_document:,}", f"{report.targets:,}",
                  f"{report.loss:.4f}", f"{report.perplexity:.3f}", accuracy, format_bytes(report.peak_memory_bytes),
                  f"{report.tokens_per_s:,.0f}")
    Console(width=160).print(table)


def print_probes(report, *, task: str, num_probes: int, chunk_size: int) -> None:
    """`chunkwise eval --task passkey|needle`'s table: accuracy per depth (rows) and length (columns), then the costs."""
    console = Console(width=160)
    console.print(f"[bold]chunkwise eval --task {task}[/]: {report.model} ({report.language} probes, {num_probes} per "
                  f"length and depth; chunks of {chunk_size}); accuracy:", highlight=False)
    table = Table()
    table.add_column("depth")
    for length in report.lengths:
        table.add_column(f"{length:,}", justify="right")
    for depth in report.depths:
        table.add_row(f"{depth:.0%}", *(f"{report.accuracy(length, depth):.0%}" for length in report.lengths))
    table.add_row("mean", *(f"{sum(report.accuracy(length, d) for d in report.depths) / len(report.depths):.0%}" for length in report.lengths))
    table.add_section()
    costs = {cost.length: cost for cost in report.costs}
    table.add_row("peak memory", *(format_bytes(costs[length].peak_memory_bytes) for length in report.lengths))
    table.add_row("  KV cache", *(format_bytes(costs[length].kv_cache_bytes) for length in report.lengths))
    table.add_row("  the rest", *(format_bytes(costs[length].other_bytes) for length in report.lengths))
    table.add_row("seconds", *(f"{costs[length].seconds:.1f}" for length in report.lengths))
    console.print(table)
