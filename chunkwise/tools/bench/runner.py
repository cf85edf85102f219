"""The benchmark harness behind `chunkwise bench`: step time and peak memory of ordinary training and
of chunk-wise training, each (method, sequence length) case measured in a fresh process.

Why a fresh process per case: peak memory belongs to a process (on CPU its peak resident set, on CUDA
the caching allocator's peak), and one case's leftovers — allocator caches, fragmentation, a grown
heap — must not leak into the next. The parent builds `BenchCase`s, runs
`python -m chunkwise.tools.bench.runner --case '<json>'` for each, and collects the `CaseResult` the child prints.

Methods (`METHODS`):

    forward  inference only: one full-sequence forward under torch.no_grad (LM head and loss included)
    full     ordinary backprop: model(input_ids).logits -> summed token loss / n -> backward
    ckpt     the same with transformers' layer-level activation checkpointing
    seco     chunkwise.SeCO
    spaco    chunkwise.SpaCO, uniform sampling, `budget` chunks backpropagated per step
    spaco-est  the same with full_loss=False: no LM head for the chunks stage 2 skips (loss estimated)

What is measured, per case:

* time: the median wall time of `repeats` steps after `warmup` unmeasured steps.
* memory: the peak over the measured steps *above a baseline* taken after the model is loaded and a
  tiny priming step (16 tokens) has run, so that lazily loaded code, thread pools and allocator set-up
  are in the baseline rather than in the measurement. Parameter gradients are freed before each step
  (`zero_grad(set_to_none=True)`), so a training step's peak includes allocating its gradients.
  CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`, minus `memory_allocated`
  at the baseline. CPU: the process's peak resident memory (`VmHWM` in /proc/self/status, reset by
  writing "5" to /proc/self/clear_refs before each measured step) minus its resident memory (`VmRSS`)
  at the baseline. The child runs with a fixed glibc mmap threshold so that freed tensors leave the
  resident set (see `child_environment`). Where clear_refs cannot be written, the peak is VmHWM since
  process start and the result says so in `memory_method`.

Out of memory is a result, not a crash: `torch.OutOfMemoryError`, `MemoryError`, the CPU allocator's
"can't allocate memory" error, and a child killed by SIGKILL are all recorded with status "oom".
On CPU every case runs under an address-space limit (`RLIMIT_AS`): `memory_cap` bytes above the
process's size at the baseline if given, else 90% of the machine's available memory, so that an
oversized case fails with an allocation error inside its own process instead of waking the kernel's
OOM killer, which might pick another process on the machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from chunkwise.utils.memory import CpuMemory, CudaMemory, MiB, is_out_of_memory, limit_memory

METHODS = ("forward", "full", "ckpt", "seco", "spaco", "spaco-est")
CHUNKED = ("seco", "spaco", "spaco-est")
DEFAULT_METHODS = ("forward", "full", "ckpt", "seco", "spaco")  # what a run measures unless told otherwise
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The child prints its result on one stdout line that starts with this marker; anything else the model
# or a library prints is ignored.
RESULT_MARKER = "CHUNKWISE_BENCH_RESULT "

# ----- benchmark models ---------------------------------------------------------------------------------
# Llama-shaped configs with random weights: nothing is downloaded, and a step costs the same whatever the
# weights are. Parameter counts are for untied embeddings unless tie_word_embeddings says otherwise.

_LLAMA_COMMON = dict(max_position_embeddings=131072, tie_word_embeddings=False)
BENCH_MODELS: dict[str, dict] = {
    # `--quick`: ~0.9M parameters, so that the whole quick run and the tests take seconds per case.
    "quick": dict(
        vocab_size=2048, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, **_LLAMA_COMMON,
    ),
    # The CPU default: 55,976,448 parameters (32.8M of them in the untied embedding and LM head).
    "llama-56m": dict(
        vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4, **_LLAMA_COMMON,
    ),
    # Llama-3.2-1B's shape (1.24B parameters, tied embeddings), without its llama3 RoPE scaling, which
    # changes the frequencies but not the cost.
    "llama-1b": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
        **{**_LLAMA_COMMON, "tie_word_embeddings": True},
    ),
    # Llama-3.1-8B's shape (8.03B parameters), for a GPU.
    "llama-8b": dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, **_LLAMA_COMMON,
    ),
}
DEFAULT_MODEL = "llama-56m"


def build_model(name: str, *, dtype: torch.dtype, device: torch.device, lora_r: int = 0, seed: int = 0):
    """A benchmark model (a `BENCH_MODELS` name, a tiny preset, or a local path), on `device`.

    Bench models are initialised directly on the device, so an 8B shape never passes through host memory.
    With `lora_r > 0` the model is wrapped in a LoRA adapter on q_proj/v_proj and only the adapter trains.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig

    from chunkwise.models.loading import add_lora, load_causal_lm

    torch.manual_seed(seed)
    if name in BENCH_MODELS:
        with device:
            model = AutoModelForCausalLM.from_config(LlamaConfig(**BENCH_MODELS[name]), dtype=dtype)
    else:
        model = load_causal_lm(name, dtype=dtype, seed=seed).to(device)
    if lora_r > 0:
        model = add_lora(model, rank=lora_r)
    return model


def describe_model(model: torch.nn.Module) -> dict:
    """Parameter counts and the KV cache size per token (keys + values, all layers, model dtype)."""
    from chunkwise.core.handle import unwrap_causal_lm

    config = unwrap_causal_lm(model).config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    element = next(model.parameters()).element_size()
    return {
        "architecture": type(unwrap_causal_lm(model)).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": config.vocab_size,
        "kv_bytes_per_token": 2 * config.num_hidden_layers * kv_heads * head_dim * element,
    }


# ----- one case -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchCase:
    """One measurement: a method on a sequence length, with everything the child process needs.

    Attributes:
        method: one of `METHODS`.
        seq_len: tokens per sequence.
        model: a `BENCH_MODELS` name, a tiny preset name, or a local model directory.
        chunk_size: tokens per chunk (seco, spaco).
        budget: chunks backpropagated per step (spaco).
        dtype: a `DTYPES` name.
        device: "cpu", "cuda", "cuda:1", ...
        lora_r: LoRA rank; 0 trains all parameters.
        batch_size: sequences per step.
        repeats: measured steps; the reported time is their median.
        warmup: unmeasured steps before them.
        memory_cap: bytes the case may use above its baseline (CPU: address-space limit, CUDA: allocator
            limit); None for no cap beyond the CPU's safety limit.
        threads: CPU threads for torch (None: torch's default, one per core).
        seed: seeds the weights, the tokens and SpaCO's sampler.
        attention: the engines' `attention` option (seco, spaco): "chunkwise" or "model".
        offload_kv: the engines' `offload_kv` option (seco, spaco).
    """

    method: str
    seq_len: int
    model: str = DEFAULT_MODEL
    chunk_size: int = 512
    budget: int = 8
    dtype: str = "float32"
    device: str = "cpu"
    lora_r: int = 0
    batch_size: int = 1
    repeats: int = 3
    warmup: int = 1
    memory_cap: int | None = None
    threads: int | None = None
    seed: int = 0
    attention: str = "chunkwise"
    offload_kv: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose from {', '.join(DTYPES)}")
        if self.attention not in ("chunkwise", "model"):
            raise ValueError(f"unknown attention {self.attention!r}; choose chunkwise or model")
        for name in ("seq_len", "chunk_size", "budget", "batch_size", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2 (one token predicts the next), got {self.seq_len}")
        if self.warmup < 0 or self.lora_r < 0:
            raise ValueError("warmup and lora_r must be >= 0")


@dataclass
class CaseResult:
    """What one case measured.

    Attributes:
        case: the case.
        status: "ok", "oom" (out of memory, including a child killed by SIGKILL), "error" or "timeout".
        time_s: median step time over the measured steps (None unless ok).
        step_times_s: every measured step's time.
        peak_memory_bytes: peak memory above the baseline over the measured steps (None unless ok).
        step_peaks_bytes: each measured step's peak above the baseline.
        baseline_bytes: memory at the baseline (model loaded, one priming step run, gradients freed).
        memory_method: how memory was read (see the module docstring).
        num_chunks: chunks per sequence (seco, spaco; 1 for the others).
        backprop_chunks: chunks backpropagated in the last step (spaco's sample; all for seco).
        loss: the last step's loss, a sanity check that the step computed something finite.
        model_info: `describe_model` of the loaded model.
        error: the error message when not ok.
        wall_s: the child's whole run time, model building included.
    """

    case: BenchCase
    status: str
    time_s: float | None = None
    step_times_s: list[float] = field(default_factory=list)
    peak_memory_bytes: int | None = None
    step_peaks_bytes: list[int] = field(default_factory=list)
    baseline_bytes: int | None = None
    memory_method: str = ""
    num_chunks: int = 1
    backprop_chunks: int | None = None
    loss: float | None = None
    model_info: dict = field(default_factory=dict)
    error: str | None = None
    wall_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CaseResult:
        return cls(**{**data, "case": BenchCase(**data["case"])})


# ----- memory meters (run inside the child) ----------------------------------------------------------


# ----- the step of each method -----------------------------------------------------------------------


def make_step(case: BenchCase, model: torch.nn.Module) -> Callable[[torch.Tensor], tuple[float, int | None]]:
    """The training (or inference) step of `case.method`; it returns (loss, chunks backpropagated)."""
    from chunkwise.core.config import ChunkwiseConfig
    from chunkwise.core.loss import sequence_loss

    def full_loss(input_ids: torch.Tensor) -> torch.Tensor:
        # use_cache=False: ordinary training builds no KV cache (and checkpointing refuses one).
        return sequence_loss(model(input_ids=input_ids, use_cache=False).logits, input_ids)

    if case.method == "forward":

        def forward_step(input_ids):
            with torch.no_grad():
                return full_loss(input_ids).item(), None

        return forward_step
    if case.method in ("full", "ckpt"):

        def backprop_step(input_ids):
            loss = full_loss(input_ids)
            loss.backward()
            return loss.item(), None

        return backprop_step
    spaco = case.method != "seco"
    settings = ChunkwiseConfig(method="spaco" if spaco else "seco", chunk_size=case.chunk_size, budget=case.budget if spaco else None,
                               sampling="uniform", seed=case.seed, attention=case.attention, offload_kv=case.offload_kv)
    engine = settings.make_engine(model, full_loss=case.method == "spaco")

    def chunkwise_step(input_ids):
        out = engine.backward(input_ids)
        return out.loss.item(), len(out.selected)

    return chunkwise_step


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random_tokens(case: BenchCase, vocab_size: int, seq_len: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(case.seed)
    return torch.randint(0, vocab_size, (case.batch_size, seq_len), generator=generator).to(device)


def build_case_model(case: BenchCase, device: torch.device) -> torch.nn.Module:
    return build_model(case.model, dtype=DTYPES[case.dtype], device=device, lora_r=case.lora_r, seed=case.seed)


def measure_case(case: BenchCase, *, build: Callable = build_case_model) -> CaseResult:
    """Run one case in this process and measure it. Out of memory, even while loading, is status "oom".

    `build(case, device)` gives the model (the GPU suite passes one that reuses the last one built).
    """
    started = time.perf_counter()
    if case.threads:
        torch.set_num_threads(case.threads)
    device = torch.device(case.device)
    meter = CudaMemory(device) if device.type == "cuda" else CpuMemory()
    result = CaseResult(case, "ok", memory_method=meter.method)
    try:
        model = build(case, device)
    except Exception as error:  # MemoryError is an Exception too
        _record_oom(result, error)
    else:
        measure_on(model, case, meter, result)
    result.wall_s = time.perf_counter() - started
    return result


def _record_oom(result: CaseResult, error: BaseException) -> None:
    if not is_out_of_memory(error):
        raise error
    result.status, result.error = "oom", f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"


def measure_on(model: torch.nn.Module, case: BenchCase, meter, result: CaseResult) -> None:
    """Measure `case` on an already built `model` (see `measure_case`), filling `result`.

    Leaves the model as it found it (activation checkpointing off, no gradients), so that a process
    may measure several cases on one model (the GPU suite does).
    """
    device = torch.device(case.device)
    lift_cap = None
    try:
        step, input_ids = _set_up(case, model, device, result)
        model.zero_grad(set_to_none=True)
        gc.collect()
        result.baseline_bytes = baseline = meter.current()
        lift_cap = limit_memory(device, case.memory_cap)
        for _ in range(case.warmup):
            model.zero_grad(set_to_none=True)
            step(input_ids)
        for _ in range(case.repeats):
            model.zero_grad(set_to_none=True)  # free the last step's gradients before the peak is reset
            meter.reset_peak()
            _synchronize(device)
            start = time.perf_counter()
            result.loss, result.backprop_chunks = step(input_ids)
            _synchronize(device)
            result.step_times_s.append(time.perf_counter() - start)
            result.step_peaks_bytes.append(max(0, meter.peak() - baseline))
    except Exception as error:  # MemoryError is an Exception too
        _record_oom(result, error)
    finally:
        if lift_cap is not None:
            lift_cap()
        model.zero_grad(set_to_none=True)
        _set_checkpointing(model, False)
    if result.ok:
        result.time_s = statistics.median(result.step_times_s)
        result.peak_memory_bytes = max(result.step_peaks_bytes)


def _set_checkpointing(model: torch.nn.Module, enabled: bool) -> None:
    """Layer-level activation checkpointing on or off (transformers renamed the methods in 5.x)."""
    prefix = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    if enabled:
        getattr(model, f"{prefix}_checkpointing_enable")(**{f"{prefix}_checkpointing_kwargs": {"use_reentrant": False}})
    elif any(getattr(module, "gradient_checkpointing", False) for module in model.modules()):
        getattr(model, f"{prefix}_checkpointing_disable")()


def _set_up(case: BenchCase, model: torch.nn.Module, device: torch.device, result: CaseResult):
    """Prepare `model` for the case and run the priming step; return (step, input_ids)."""
    model.train()  # activation checkpointing is active in training mode only
    _set_checkpointing(model, case.method == "ckpt")
    result.model_info = describe_model(model)
    vocab_size = result.model_info["vocab_size"]
    if case.method in CHUNKED:
        result.num_chunks = math.ceil(case.seq_len / case.chunk_size)
    # Priming: one step on 16 tokens in 4 chunks (budget 1 for spaco, so that both its backpropagated and
    # its report-only chunks run) loads code, starts thread pools and sets up allocators before the
    # baseline is taken.
    prime = replace(case, seq_len=16, chunk_size=4, budget=1)
    make_step(prime, model)(_random_tokens(prime, vocab_size, 16, device))
    return make_step(case, model), _random_tokens(case, vocab_size, case.seq_len, device)


# ----- the parent side: one subprocess per case --------------------------------------------------------


def child_command(case: BenchCase) -> list[str]:
    """The command line that measures `case` in a fresh Python process."""
    return [sys.executable, "-m", "chunkwise.tools.bench.runner", "--case", json.dumps(asdict(case))]


def child_environment() -> dict[str, str]:
    """The child's environment: ours, plus glibc malloc settings that make resident memory track live
    tensors (unless the caller set them).

    By default glibc serves blocks below a threshold that grows up to 32 MiB from its heap, and keeps
    freed heap memory resident for reuse; the peak resident set then depends on fragmentation and on
    what earlier steps left behind (the quick model's full backprop at 512 tokens peaked 39% higher
    after a warmup step than without one). With a
    fixed 16 KiB threshold every tensor of 16 KiB or more gets its own mapping, returned to the system
    when freed, so the peak resident set is the peak of live memory plus a small heap — the CPU analogue
    of CUDA's max_memory_allocated. The price is page faults on fresh memory in every step, a small
    cost next to the matrix products.
    """
    return {"MALLOC_MMAP_THRESHOLD_": "16384", "MALLOC_TRIM_THRESHOLD_": "0", **os.environ}


def run_case(case: BenchCase, *, timeout_s: float | None = None, command: list[str] | None = None) -> CaseResult:
    """Measure `case` in a fresh subprocess (`command` replaces the child's command line, for tests).

    A child killed by SIGKILL (what Linux's OOM killer sends) is recorded as "oom"; a child that fails
    otherwise is recorded as "error" with the last line it wrote to stderr (or the signal's name).
    """
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            command or child_command(case), capture_output=True, text=True, timeout=timeout_s, env=child_environment()
        )
    except subprocess.TimeoutExpired:
        return CaseResult(case, "timeout", error=f"no result within {timeout_s:g} s", wall_s=timeout_s)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return CaseResult.from_dict(json.loads(line[len(RESULT_MARKER) :]))
    wall = time.perf_counter() - started
    if proc.returncode == -signal.SIGKILL:
        return CaseResult(case, "oom", error="the case's process was killed by SIGKILL (out of memory)", wall_s=wall)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    if proc.returncode < 0:
        message = f"the case's process was killed by {signal.Signals(-proc.returncode).name}"
    else:
        message = lines[-1] if lines else f"exit status {proc.returncode} and no result"
    return CaseResult(case, "error", error=message[:500], wall_s=wall)


# ----- the benchmark: a grid of cases, and the longest sequence within a memory budget ------------------


@dataclass(frozen=True)
class BenchSettings:
    """What `chunkwise bench` runs.

    Attributes:
        model: a `BENCH_MODELS` name, a tiny preset, or a local model directory.
        methods: which of `METHODS` to run.
        lengths: sequence lengths of the grid (tokens).
        chunk_size: tokens per chunk for seco and spaco.
        budget: spaco's chunks backpropagated per step.
        dtype: a `DTYPES` name.
        device: "cpu", "cuda", ...
        lora_r: LoRA rank; 0 trains all parameters.
        batch_size: sequences per step.
        repeats: measured steps per case.
        warmup: unmeasured steps before them.
        memory_cap: per-case memory allowance in bytes above the baseline (see `BenchCase`).
        max_memory: if set, also search, per method, the longest sequence whose peak stays within this
            many bytes above the baseline.
        max_length: the search doubles no further than this (None: the model's maximum position).
        threads: CPU threads for torch in each case (None: torch's default, one per core).
        timeout_s: give up on a case after this many seconds (None: wait).
        seed: seeds weights, tokens and sampling.
        attention: the engines' `attention` option (seco, spaco): "chunkwise" or "model".
        offload_kv: the engines' `offload_kv` option (seco, spaco).
    """

    model: str = DEFAULT_MODEL
    methods: tuple[str, ...] = DEFAULT_METHODS
    lengths: tuple[int, ...] = (1024, 2048, 4096)
    chunk_size: int = 512
    budget: int = 8
    dtype: str = "float32"
    device: str = "cpu"
    lora_r: int = 0
    batch_size: int = 1
    repeats: int = 3
    warmup: int = 1
    memory_cap: int | None = None
    max_memory: int | None = None
    max_length: int | None = None
    threads: int | None = None
    timeout_s: float | None = None
    seed: int = 0
    attention: str = "chunkwise"
    offload_kv: bool = False

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods must be some of {', '.join(METHODS)}; got {', '.join(self.methods) or 'none'}")
        if not self.lengths or any(length < 2 for length in self.lengths):
            raise ValueError(f"lengths must be integers >= 2, got {list(self.lengths)}")
        if self.max_memory is not None and self.max_memory <= 0:
            raise ValueError(f"max_memory must be a positive number of bytes, got {self.max_memory}")
        if self.memory_cap is not None and self.memory_cap <= 0:
            raise ValueError(f"memory_cap must be a positive number of bytes, got {self.memory_cap}")
        self.case("full", 2)  # checks the per-case fields (chunk size, budget, dtype, repeats, ...)

    def case(self, method: str, seq_len: int, **overrides) -> BenchCase:
        fields = {name: getattr(self, name) for name in BenchCase.__dataclass_fields__ if hasattr(self, name)}
        return BenchCase(**{**fields, "method": method, "seq_len": seq_len, **overrides})


@dataclass
class MemorySearch:
    """The longest sequence one method trains within a memory budget.

    Attributes:
        method: the method.
        budget_bytes: the budget, bytes above the baseline.
        longest: the longest length that fit (a multiple of the chunk size), or 0 if none did.
        probes: every length tried, in order, with its result.
        at_limit: the search stopped at the length limit while still fitting: the true answer is longer.
    """

    method: str
    budget_bytes: int
    longest: int
    probes: list[CaseResult]
    at_limit: bool = False


@dataclass
class BenchReport:
    """Everything one `chunkwise bench` run measured, with the machine it ran on."""

    machine: dict
    settings: BenchSettings
    results: list[CaseResult]
    searches: list[MemorySearch] = field(default_factory=list)

    def result(self, method: str, seq_len: int) -> CaseResult | None:
        return next((r for r in self.results if r.case.method == method and r.case.seq_len == seq_len), None)

    @property
    def model_info(self) -> dict:
        probes = [p for s in self.searches for p in s.probes]
        return next((r.model_info for r in self.results + probes if r.model_info), {})

    def to_dict(self) -> dict:
        return {
            "machine": self.machine,
            "settings": asdict(self.settings),
            "model": self.model_info,
            "results": [r.to_dict() for r in self.results],
            "max_memory": [
                {
                    "method": s.method,
                    "budget_bytes": s.budget_bytes,
                    "longest": s.longest,
                    "at_limit": s.at_limit,
                    "probes": [p.to_dict() for p in s.probes],
                }
                for s in self.searches
            ],
        }


def describe_machine(device: str) -> dict:
    """The machine the numbers come from: CPU, cores, memory, library versions, accelerator, load."""
    import transformers

    from chunkwise import __version__

    cpu_model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu_model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    machine = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_default_threads": torch.get_num_threads(),  # cases may set their own (settings.threads)
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "chunkwise": __version__,
        "device": device,
        "device_name": torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else cpu_model,
    }
    try:
        with open("/proc/meminfo") as meminfo:
            machine["memory_total_bytes"] = int(next(l for l in meminfo if l.startswith("MemTotal:")).split()[1]) * 1024
    except (OSError, StopIteration):
        pass
    if hasattr(os, "getloadavg"):
        # Other processes on the machine slow every case down; the load average says how busy it was.
        machine["load_average_at_start"] = os.getloadavg()
    machine["chunkwise_source"] = _source_revision()
    return machine


def _source_revision() -> str | None:
    """`git describe --always --dirty` of the chunkwise checkout, so numbers can be tied to code."""
    try:
        proc = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() or None


def _log_result(result: CaseResult, log: Callable[[str], None], prefix: str = "") -> None:
    case = result.case
    if result.ok:
        detail = f"{result.time_s:.3f} s/step, peak +{result.peak_memory_bytes / MiB:.1f} MiB"
    else:
        detail = f"{result.status.upper()}: {result.error}"
    log(f"{prefix}{case.method:>7} @ {case.seq_len:>6} tokens: {detail}")


def run_grid(settings: BenchSettings, *, log: Callable[[str], None] = print) -> list[CaseResult]:
    """Every (method, length) case, shortest lengths first. Once a method runs out of memory, its longer
    lengths are recorded as out of memory without running them (they would need more)."""
    results, oom_at = [], {}
    cases = [(length, method) for length in sorted(set(settings.lengths)) for method in settings.methods]
    for index, (length, method) in enumerate(cases, 1):
        case = settings.case(method, length)
        if method in oom_at:
            result = CaseResult(case, "oom", error=f"not run: out of memory at {oom_at[method]} tokens already")
        else:
            result = run_case(case, timeout_s=settings.timeout_s)
            if result.status == "oom":
                oom_at[method] = length
        results.append(result)
        _log_result(result, log, f"[{index}/{len(cases)}] ")
    return results


def longest_within(
    settings: BenchSettings, method: str, budget_bytes: int, *, log: Callable[[str], None] = print
) -> MemorySearch:
    """The longest sequence `method` trains with a peak of at most `budget_bytes` above the baseline.

    Doubles the length from the shortest grid length (rounded to whole chunks) until a step runs out of
    memory or exceeds the budget, then bisects between the last fit and the first miss down to one chunk.
    Each probe is one step (no warmup, one repeat) under a memory cap a little above the budget, so an
    oversized probe fails fast instead of exhausting the machine; the cap is a guard with some slack
    (address space is not resident memory), and "fits" is decided by the measured peak.
    """
    chunk = settings.chunk_size
    cap = budget_bytes + max(budget_bytes // 4, 64 * MiB)
    probes: list[CaseResult] = []

    def fits(length: int) -> bool:
        result = run_case(settings.case(method, length, warmup=0, repeats=1, memory_cap=cap), timeout_s=settings.timeout_s)
        probes.append(result)
        fit = result.ok and result.peak_memory_bytes <= budget_bytes
        # A probe that fails for another reason than memory ("error", "timeout") counts as a miss; it
        # stays in `probes` for the caller to report.
        _log_result(result, log, f"[max-memory {method}] {'fits' if fit else 'over'}: ")
        return fit

    limit = BENCH_MODELS.get(settings.model, {}).get("max_position_embeddings", 1 << 20)
    limit = min(limit, settings.max_length or limit)
    length = max(chunk, min(settings.lengths) // chunk * chunk)
    fit, miss = 0, None
    while True:  # bracket the answer: double while it fits, halve (down to one chunk) while it does not
        if fits(length):
            fit = length
            if miss is not None or length * 2 > limit:
                break
            length *= 2
        else:
            miss = length
            if fit or length == chunk:
                break
            length = max(chunk, length // 2 // chunk * chunk)
    while fit and miss is not None and miss - fit > chunk:  # bisect to one chunk
        middle = (fit + miss) // 2 // chunk * chunk
        if fits(middle):
            fit = middle
        else:
            miss = middle
    return MemorySearch(method, budget_bytes, fit, probes, at_limit=bool(fit) and miss is None)


def run_benchmark(settings: BenchSettings, *, log: Callable[[str], None] = print) -> BenchReport:
    """Run the grid and, with `max_memory`, the per-method search; return everything measured."""
    report = BenchReport(describe_machine(settings.device), settings, run_grid(settings, log=log))
    if settings.max_memory is not None:
        for method in settings.methods:
            report.searches.append(longest_within(settings, method, settings.max_memory, log=log))
    if hasattr(os, "getloadavg"):
        report.machine["load_average_at_end"] = os.getloadavg()
    return report


# ----- outputs: Markdown table, JSON, plot --------------------------------------------------------------


def _ratio(value: float | None, reference: float | None) -> str:
    return f"{value / reference:.2f}" if value is not None and reference else "–"


def markdown_table(report: BenchReport) -> str:
    """Method × length: step time, peak memory above the baseline, and both as ratios to `full`."""
    s = report.settings
    info = report.model_info
    lines = [
        f"Model `{s.model}` ({info.get('parameters', 0) / 1e6:.1f}M parameters, "
        f"{info.get('trainable_parameters', 0) / 1e6:.1f}M trainable), {s.dtype} on {report.machine['device_name']}; "
        f"batch {s.batch_size}, chunk size {s.chunk_size}, SpaCO budget {s.budget} (uniform), "
        f"{s.attention} attention in the engines{', KV offloaded to the host' if s.offload_kv else ''}; "
        f"median of {s.repeats} step(s) after {s.warmup} warmup step(s).",
        "",
        "| method | length | chunks | step time (s) | time × full | peak memory (MiB) | memory × full |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for length in sorted(set(s.lengths)):
        full = report.result("full", length)
        full_time = full.time_s if full and full.ok else None
        full_memory = full.peak_memory_bytes if full and full.ok else None
        for method in s.methods:
            r = report.result(method, length)
            if r is None:
                continue
            chunks = str(r.num_chunks) if method in CHUNKED else "–"
            if method.startswith("spaco") and r.backprop_chunks is not None:
                chunks = f"{r.backprop_chunks}/{r.num_chunks}"
            if r.ok:
                memory = r.peak_memory_bytes / MiB
                lines.append(
                    f"| {method} | {length} | {chunks} | {r.time_s:.3f} | {_ratio(r.time_s, full_time)} "
                    f"| {memory:.1f} | {_ratio(r.peak_memory_bytes, full_memory)} |"
                )
            else:
                lines.append(f"| {method} | {length} | {chunks} | {r.status.upper()} | – | {r.status.upper()} | – |")
    if report.searches:
        budget = report.searches[0].budget_bytes
        full = next((x.longest for x in report.searches if x.method == "full"), None)
        lines += [
            "",
            f"Longest sequence within {budget / MiB:.0f} MiB above the baseline (to {s.chunk_size}-token granularity):",
            "",
            "| method | longest length | × full | probes |",
            "|---|---:|---:|---:|",
        ]
        for search in report.searches:
            longest = str(search.longest) if search.longest else f"< {s.chunk_size}"
            if search.at_limit:
                longest = f"≥ {search.longest} (search limit)"
            lines.append(f"| {search.method} | {longest} | {_ratio(search.longest, full)} | {len(search.probes)} |")
    return "\n".join(lines) + "\n"


def plot(report: BenchReport, path: Path) -> None:
    """Peak memory and step time against sequence length, one line per method (log-log)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    figure, (memory_axis, time_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in report.settings.methods:
        points = [r for r in report.results if r.case.method == method and r.ok]
        points.sort(key=lambda r: r.case.seq_len)
        if not points:
            continue
        lengths = [r.case.seq_len for r in points]
        memory_axis.plot(lengths, [r.peak_memory_bytes / MiB for r in points], marker="o", label=method)
        time_axis.plot(lengths, [r.time_s for r in points], marker="o", label=method)
    lengths = sorted(set(report.settings.lengths))
    for axis, label in ((memory_axis, "peak memory above baseline (MiB)"), (time_axis, "step time (s)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(lengths, [str(length) for length in lengths])
        axis.minorticks_off()
        axis.set_yscale("log")
        axis.set_xlabel("sequence length (tokens)")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    s = report.settings
    figure.suptitle(f"{s.model}, {s.dtype}, {report.machine['device_name']}, chunk {s.chunk_size}, SpaCO budget {s.budget}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_outputs(report: BenchReport, directory: Path) -> dict[str, Path]:
    """Write `bench.md`, `bench.json` and `bench.png` into `directory`; return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"table": directory / "bench.md", "json": directory / "bench.json", "plot": directory / "bench.png"}
    paths["table"].write_text(markdown_table(report))
    paths["json"].write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    plot(report, paths["plot"])
    return paths


# ----- the child process entry point -----------------------------------------------------------------


def _child_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m chunkwise.tools.bench.runner", description="Measure one benchmark case.")
    parser.add_argument("--case", required=True, help="the BenchCase as JSON")
    case = BenchCase(**json.loads(parser.parse_args(argv).case))
    result = measure_case(case)
    print(RESULT_MARKER + json.dumps(result.to_dict()), flush=True)
    return 0


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    sys.exit(_child_main(sys.argv[1:]))
