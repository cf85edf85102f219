"""`chunkwise` command line: a parser, and a table of subcommands, each a plain function (`chunkwise.cli.commands`).

    chunkwise verify --model tiny-llama --seq-len 256 --chunk-size 32
    chunkwise bench --lengths 1024,2048,4096 --output bench-results
    chunkwise plan --model meta-llama/Llama-3.1-8B --seq-len 32768 --memory 80GiB
    chunkwise train                      # the built-in demo; see `chunkwise train --help`
    chunkwise eval --model runs/chunkwise
    chunkwise export --model runs/chunkwise --output merged   # LoRA merged: a plain transformers folder

`chunkwise train`'s options are generated from `TrainConfig`'s fields and their docstrings
(`chunkwise.cli.options`); the options several commands share come from small parent parsers.
"""

from __future__ import annotations

import argparse
import sys
import warnings

# Nothing here imports torch or transformers: arguments are parsed and checked first, and each command imports
# what it needs (tests/cli/test_cli_startup.py keeps it so).
from chunkwise.attention.names import ATTENTION_CHOICES
from chunkwise.cli import commands, environment
from chunkwise.cli.options import (
    UsageError, add_config_options, chunk_size_option, command_line_spelling, documents_option, lengths_option,
)
from chunkwise.data.files import DataError
from chunkwise.data.names import PAIR_DEPTHS
from chunkwise.models.quantize import Quantization
from chunkwise.recipes.checkpoint import CheckpointError
from chunkwise.recipes.train.config import TrainConfig
from chunkwise.utils.sizes import parse_bytes  # re-exported: `chunkwise bench`'s byte options

__all__ = ["COMMANDS", "build_parser", "main", "parse_bytes"]

# Each subcommand's function, called with the parsed options (a dict without "command" and "debug").
COMMANDS = {
    "verify": lambda options: commands.verify(**commands.with_quantization(options)),
    "bench": commands.bench_command,
    "plan": lambda options: commands.plan(**commands.with_quantization(options)),
    "train": commands.train,
    "eval": commands.evaluate,
    "export": lambda options: commands.export(**options),
}


def _parent(*arguments: tuple[tuple, dict]) -> argparse.ArgumentParser:
    """A parent parser holding options several subcommands share (declared once, listed in each one's --help)."""
    parent = argparse.ArgumentParser(add_help=False)
    for flags, settings in arguments:
        parent.add_argument(*flags, **settings)
    return parent


def _shared_options() -> dict[str, argparse.ArgumentParser]:
    """The parent parsers: device, seed, batch size, JSON output, the engines' attention, data fields."""
    return {
        "device": _parent((("--device",), dict(default="auto", help="cpu, cuda, cuda:N (default auto: cuda if this machine has one)"))),
        "seed": _parent((("--seed",), dict(type=int, default=0, help="seed of the weights, tokens and sampling (default 0)"))),
        "batch": _parent((("--batch-size",), dict(type=int, default=1, help="sequences per batch (default 1)"))),
        "json": _parent((("--json",), dict(dest="as_json", action="store_true", help="print the result as JSON"))),
        "attention": _parent((("--attention",), dict(default="chunkwise", metavar="{" + ",".join(ATTENTION_CHOICES) + "}",
                                                      help="seco/spaco attention: chunkwise (default; no repeated KV heads or mask "
                                                      "kept for backward) or the model's own"))),
        "quantization": _quantization_parent(),
        "threads": _parent((("--threads",), dict(dest="torch_threads", type=int, default=None, metavar="N",
                                                  help="torch's CPU threads (default: torch's, one per core; a hint is printed when "
                                                  "fewer cores are free)"))),
        "fields": _parent(
            (("--text-field",), dict(default="text", help="JSONL/dataset field with the text (default text)")),
            (("--prompt-field",), dict(default=None, help="instruction data: field with the prompt (its tokens are not scored)")),
            (("--response-field",), dict(default=None, help="instruction data: field with the response")),
            (("--response-separator",), dict(default=None, help="instruction data: text between prompt and response "
                                              "(default: the run's, else none: they are joined as they are)")),
            (("--messages-field",), dict(default=None, help="conversations: field with the {role, content} turns, rendered "
                                          "with the chat template, assistant turns scored (default: the run's; a "
                                          "'messages' field is found without it)")),
            (("--glob",), dict(default=None, help="files read from a --data folder, comma-separated patterns (default: the "
                                "run's, else *.txt)")),
            (("--split",), dict(default="train", help="dataset split (default train)")),
        ),
    }


def _quantization_parent() -> argparse.ArgumentParser:
    """--load-in-4bit, --load-in-8bit and the --bnb-4bit-* options (TRL's names), generated from `Quantization`."""
    parent = argparse.ArgumentParser(add_help=False)
    add_config_options(parent, Quantization)
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chunkwise", description="Fine-tune long-context causal LMs chunk by chunk (SeCO / SpaCO)."
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors, and the libraries' own warnings, "
                        "log lines and progress bars (quiet otherwise)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    shared = _shared_options()
    _add_verify(subparsers, shared)
    _add_bench(subparsers, shared)
    _add_plan(subparsers, shared)
    _add_train(subparsers, shared)
    _add_eval(subparsers, shared)
    _add_export(subparsers)
    return parser


def _add_verify(subparsers, shared: dict) -> None:
    verify = subparsers.add_parser(
        "verify",
        help="check SeCO's gradient against ordinary backprop on a model",
        description="Compute one random batch's gradient with SeCO and with ordinary backprop, print the "
        "largest differences per parameter group, and exit 1 if any exceeds the tolerance. In float64, the RMSNorms "
        "transformers computes in float32 inside (Llama, Qwen, Mistral) compute in float64 in both passes, so the "
        "differences are chunking's alone (the output says so).",
        parents=[shared["device"], shared["seed"], shared["batch"], shared["quantization"], shared["threads"]],
    )
    verify.add_argument("--model", default="tiny-llama", help="run directory (its trained model), model folder, hub id, or tiny preset "
                        "(tiny-llama, tiny-qwen2, tiny-qwen3, tiny-mistral, tiny-gemma3)")
    verify.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    verify.add_argument("--chunk-size", type=int, default=32, help="tokens per chunk (default 32)")
    verify.add_argument("--tolerance", type=float, default=None, help="largest relative difference that passes (default: 1e-6 float64, 1e-3 float32, 1e-1 bfloat16)")
    verify.add_argument("--dtype", choices=sorted(commands.DTYPES), default="float64", help="precision of both passes (default float64)")
    verify.add_argument("--lora-r", type=int, default=0, help="wrap the model in a LoRA adapter of this rank (0: full parameters)")


def _add_bench(subparsers, shared: dict) -> None:
    bench = subparsers.add_parser(
        "bench",
        help="measure step time and peak memory of forward, full, ckpt, seco and spaco",
        description="Measure each (method, sequence length) case in a fresh process: median step time and "
        "peak memory above the loaded model. Writes bench.md (table), bench.json (raw numbers, machine) "
        "and bench.png (plots) to --output and prints the table. Models: quick, quick-wide, llama-56m (default), "
        "llama-1b, llama-8b (random weights from Llama configs), a tiny preset, or a local directory.",
        parents=[shared["device"], shared["seed"], shared["batch"], shared["attention"]],
    )
    bench.add_argument("--model", default=None, help="benchmark model, tiny preset or local directory (default llama-56m; quick with --quick)")
    bench.add_argument("--methods", default="forward,full,ckpt,seco,spaco", help="comma-separated subset of forward,full,ckpt,seco,spaco,spaco-est (SpaCO without the LM head on skipped chunks)")
    bench.add_argument("--lengths", default=None, help="comma-separated sequence lengths (default 1024,2048,4096; 256,512,1024 with --quick)")
    bench.add_argument("--chunk-size", type=int, default=None, help="tokens per chunk for seco/spaco (default 512; 64 with --quick)")
    bench.add_argument("--budget", type=int, default=8, help="SpaCO chunks backpropagated per step, uniform sampling (default 8)")
    bench.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16", "float64"], default="auto", help="default: float32 on CPU, bfloat16 on CUDA")
    bench.add_argument("--lora-r", type=int, default=0, help="train a LoRA adapter of this rank on q_proj/v_proj (0: all parameters)")
    bench.add_argument("--repeats", type=int, default=None, help="measured steps per case; the median is reported (default 3; 2 with --quick)")
    bench.add_argument("--warmup", type=int, default=None, help="unmeasured steps before them (default 1)")
    bench.add_argument("--output", default="bench-results", help="directory for bench.md, bench.json, bench.png")
    bench.add_argument("--quick", action="store_true", help="tiny model, short lengths: a smoke run in well under two minutes")
    bench.add_argument("--max-memory", default=None, metavar="BYTES", help="also find, per method, the longest sequence whose peak stays within BYTES above the loaded model (e.g. 2GiB)")
    bench.add_argument("--max-length", type=int, default=None, help="with --max-memory: double the length no further than this")
    bench.add_argument("--threads", type=int, default=None, help="torch CPU threads per case (default: one per core; 1 with --quick)")
    bench.add_argument("--memory-cap", default=None, metavar="BYTES", help="fail a case (recorded as OOM) that allocates more than BYTES above its baseline")
    bench.add_argument("--case-timeout", dest="timeout_s", type=float, default=None, metavar="SECONDS", help="give up on a case after this long (recorded as timeout)")
    bench.add_argument("--offload-kv", action="store_true", help="seco/spaco: KV cache and its gradient in host memory")
    bench.add_argument("--documents", type=documents_option, default=None, metavar="LENGTHS",
                       help="measure a packed row: documents of these lengths (e.g. 4096x8 or 1024,2048,4096) with position_ids "
                       "restarting at each, so attention stays inside each document; --lengths defaults to their sum")
    bench.add_argument("--suite", choices=["gpu"], default=None, help="run the one-shot GPU suite (<= 8 minutes on one GPU; writes suite.json/suite.md to --output) instead of a grid; see docs/benchmarks.md")
    bench.add_argument("--dry-run", action="store_true", help="with --suite gpu: the same cases on CPU with a tiny model, a smoke test")


def _add_plan(subparsers, shared: dict) -> None:
    plan = subparsers.add_parser(
        "plan",
        help="predict the peak memory of each method from the model's config (no weights loaded)",
        description="Predict a training step's peak memory for full backprop, layer checkpointing, SeCO, SpaCO and "
        "SeCO with the KV cache offloaded, broken into weights, gradients, optimizer state, KV cache and its "
        "gradient, activations and logits/loss. With --memory (or on this machine's device), also the chunk size "
        "--chunk-size auto would pick and the longest sequence each method fits. Only the config is read.",
        parents=[shared["batch"], shared["attention"], shared["json"], shared["quantization"]],
    )
    plan.add_argument("--device", default="auto", help="cpu, cuda or cuda:N: the device to plan for (default auto: this machine's "
                      "GPU, else a CUDA GPU in bfloat16, said on stderr)")
    plan.add_argument("--model", required=True, help="hub id, local model folder (its config.json), or preset (tiny-llama, "
                      "llama-8b, ...); only the config is read, and well-known hub ids (Llama 3.x, Qwen 2.5/3, Mistral 7B, "
                      "Gemma 3) need no network")
    plan.add_argument("--seq-len", type=int, default=None, help="tokens per sequence: the breakdown at this length")
    plan.add_argument("--memory", default=None, metavar="BYTES", help="the device's memory, e.g. 24GiB: the longest length and the chunk that fit (default: this machine's free memory on --device, if it has one)")
    plan.add_argument("--chunk-size", type=chunk_size_option, default="auto", help="tokens per chunk for seco/spaco (default auto: the largest that fits, else 1024)")
    plan.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16", "float64"], default="auto", help="as chunkwise train runs it (auto: bfloat16 autocast on cuda, float32 on cpu)")
    plan.add_argument("--lora-r", type=int, default=None, help="LoRA rank; 0 = full fine-tuning (default 8, as chunkwise train with --model)")
    plan.add_argument("--lora-targets", default="q_proj,v_proj", help="comma-separated module names for LoRA (default q_proj,v_proj)")
    plan.add_argument("--documents", type=documents_option, default=None, metavar="LENGTHS",
                      help="a packed row: its documents' lengths, e.g. 4096x8 or 1024,2048,4096 (--seq-len defaults to their sum): "
                      "memory and FLOPs with per-document attention, beside the FLOPs of attention across the whole row")
    plan.add_argument("--budget", type=int, default=8, help="SpaCO chunks backpropagated per step, for its FLOPs with --documents (default 8)")


def _add_train(subparsers, shared: dict) -> None:
    train = subparsers.add_parser(
        "train",
        help="fine-tune a causal LM chunk by chunk (with no options: the built-in CPU demo)",
        description="Train with SeCO, SpaCO or ordinary backprop. Without --model and --data it trains a small "
        "Llama from scratch on a synthetic long-range recall task (2048-token sequences) on CPU in about two "
        "minutes. Writes metrics.jsonl, loss.png, checkpoints/ and model/ to --output. Only the options given "
        "override the defaults (or, with --resume, the run's saved settings).",
        parents=[shared["threads"]],
    )
    add_config_options(train, TrainConfig)


def _add_eval(subparsers, shared: dict) -> None:
    evaluate = subparsers.add_parser(
        "eval",
        help="perplexity and accuracy on long documents, chunk by chunk without autograd",
        description="Score documents with chunked no-grad inference through a KV cache: memory of one chunk's "
        "activations plus the cache, so documents far longer than a full forward allows can be scored. --model "
        "takes a run directory, a model or adapter folder, a hub id or a tiny preset.",
        parents=[shared["device"], shared["seed"], shared["batch"], shared["fields"], shared["json"], shared["quantization"],
                 shared["threads"]],
    )
    evaluate.add_argument("--model", required=True, help="run directory, model/adapter folder, hub id or tiny preset")
    evaluate.add_argument("--data", default=None, help="documents to score (as train --data); default: the run's data, else the synthetic task")
    evaluate.add_argument("--seq-len", type=lengths_option, default=None,
                       help="synthetic: tokens per sequence (default: the run's); files: at most this many tokens per document "
                       "(default: all); --task passkey/needle: comma-separated probe lengths (default 4096)")
    evaluate.add_argument("--chunk-size", type=int, default=1024, help="tokens per inference chunk (default 1024)")
    evaluate.add_argument("--num-sequences", type=int, default=32, help="synthetic: held-out sequences (default 32)")
    evaluate.add_argument("--pair-depth", choices=PAIR_DEPTHS, default=None,
                          help="synthetic: where the key→value pairs sit, start or random (default: the run's, else start)")
    evaluate.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"], default="float32",
                          help="precision of the model's weights (default float32)")
    evaluate.add_argument("--allow-extrapolation", action="store_true", help="score documents longer than the model's position limit")
    evaluate.add_argument("--task", choices=["lm", "passkey", "needle"], default="lm",
                       help="lm (default): loss and perplexity of documents; passkey / needle: long-context retrieval probes "
                       "built with the model's tokenizer, prefilled chunk by chunk, answered greedily")
    evaluate.add_argument("--depths", default=None, help="passkey/needle: comma-separated needle depths in [0, 1] (default 0,0.25,0.5,0.75,1)")
    evaluate.add_argument("--num-probes", type=int, default=None, help="passkey/needle: probes per length and depth (default 5)")
    evaluate.add_argument("--output", default=None, help="passkey/needle: folder for <task>.png (heat map) and <task>.json (default probe-results)")


def _add_export(subparsers) -> None:
    export = subparsers.add_parser(
        "export",
        help="write a run's model as a plain transformers folder, its LoRA adapter merged into the weights",
        description="Load a run directory (its final model, else its latest checkpoint) or a model/adapter folder, merge a "
        "LoRA adapter into the base weights (peft's merge_and_unload; a QLoRA run's base is loaded unquantized) and save "
        "the model and tokenizer to --output, loadable with AutoModelForCausalLM.from_pretrained without peft.",
    )
    export.add_argument("--model", required=True, help="run directory, or model/adapter folder")
    export.add_argument("--output", required=True, help="new (or empty) folder for the exported model")
    export.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="precision of the saved weights (default float32)")


def main(argv: list[str] | None = None) -> int:
    # peft calls a transformers API that transformers has deprecated; the warning is not the user's concern.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    args = build_parser().parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k not in ("command", "debug", "torch_threads")}
    threads = getattr(args, "torch_threads", None)
    if threads is not None and threads < 1:
        print(f"chunkwise {args.command}: error: --threads must be at least 1, got {threads}", file=sys.stderr)
        return 2
    environment.configure(debug=args.debug, threads=threads)
    try:
        code = COMMANDS[args.command](options)
        environment.flush_hint()  # a command that printed no line through `environment.hinted` (verify, plan, ...)
        return code
    except KeyboardInterrupt:
        # A second Ctrl-C during training (the first one asks for a checkpoint and a clean stop).
        print(f"chunkwise {args.command}: stopped by Ctrl-C; the last complete checkpoint, if any, is intact", file=sys.stderr)
        return 130
    except (UsageError, ValueError, TypeError, OSError, CheckpointError) as error:
        if args.debug:
            raise
        message = command_line_spelling(str(error)) if isinstance(error, DataError) else error
        print(f"chunkwise {args.command}: error: {message}", file=sys.stderr)
        return 2
