"""The process a command runs in: the libraries' chatter kept off the screen (unless `--debug`), and torch's CPU threads.

`configure` runs first, before anything heavy is imported (a logger's level set then holds when the library loads);
`torch_ready` runs in a command once it has checked its arguments and is about to use torch. The thread hint it
finds waits for the command's first line of output (`hinted`), or for the command's end (`flush_hint`): a setting
refused after torch loads (a length above the model's limit, ...) stays a one-line error.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# Loggers that speak on import or load in every process, about nothing the user did or can change.
QUIET_LOGGERS = {
    # transformers imports torchao when it is installed (its quantizer and safetensors support): torchao then logs
    # "Failed to load ..._C_*.so" for each optional GPU kernel a CPU build lacks...
    "torchao": logging.ERROR,
    # ...and registers its Enums with a pytree call torch has deprecated ("W... _pytree.py ... Enum subclass").
    "torch.utils._pytree": logging.ERROR,
    # peft imports bitsandbytes when installed; its CPU backend tries an optional kernel from the hub, which it refuses.
    "bitsandbytes.backends.cpu.ops": logging.ERROR,
}

_settings = {"quiet": True, "threads": None, "hint": None}


def configure(*, debug: bool, threads: int | None) -> None:
    """Quiet the libraries unless `debug`; remember `threads` (torch's CPU threads) for `torch_ready`."""
    _settings.update(quiet=not debug, threads=threads, hint=None)
    if debug:
        return
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # transformers' own notes on loading and deprecations
    # Deprecation notices are addressed to the code that calls a library (ours), not to the user running it.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def torch_ready() -> None:
    """Apply --threads; quiet transformers' weight-loading bars (not the hub's download bars); hint at a thread count
    above the cores that are free."""
    import torch

    if _settings["threads"] is not None:
        torch.set_num_threads(_settings["threads"])
    if _settings["quiet"]:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" per model: seconds of bars for a tiny model
        if not os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS"):
            from huggingface_hub.utils import enable_progress_bars

            enable_progress_bars()  # a download of gigabytes keeps its progress (transformers turned it off with its own)
    hint = thread_hint(torch.get_num_threads(), cuda=torch.cuda.is_available(), given=_settings["threads"] is not None)
    if hint and os.environ.get("RANK", "0") == "0":
        _settings["hint"] = hint


def flush_hint() -> None:
    """Print the thread hint if `torch_ready` found one and nothing has printed it yet (on stderr)."""
    hint, _settings["hint"] = _settings["hint"], None
    if hint:
        print(hint, file=sys.stderr)


def hinted(log):
    """`log`, printing the pending thread hint before its first line: the hint comes once the command runs."""
    def log_with_hint(line):
        flush_hint()
        log(line)
    return log_with_hint


def free_cores() -> tuple[int, int, float]:
    """`(cores this process may use, about how many of them are free, the 1-minute load average)`."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return cores, max(1, round(cores - load)), load


def thread_hint(threads: int, *, cuda: bool, given: bool) -> str | None:
    """One line when torch would run more CPU threads than there are free cores (a CPU run, --threads not given).

    Why: torch's threads wait for each other at every op; a thread the scheduler keeps off its core stalls the rest
    (the demo ran 8x slower with two threads than with one on a 2-core machine kept busy by other work).
    """
    if cuda or given or threads <= 1:
        return None
    cores, free, load = free_cores()
    if threads <= free:
        return None
    return (f"note: torch runs {threads} CPU threads, but only about {free} of this machine's {cores} cores are free (load "
            f"{load:.1f}); on a busy CPU fewer threads are often several times faster: try --threads {free}")
