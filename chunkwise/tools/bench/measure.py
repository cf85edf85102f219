"""One benchmark case measured in this process: the child side of `chunkwise bench` and the GPU suite's speed jobs.

    python -m chunkwise.tools.bench.measure --case '<BenchCase as JSON>'    # prints RESULT_MARKER + the CaseResult

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
  resident set (see `chunkwise.tools.bench.runner.child_environment`). Where clear_refs cannot be written, the peak is VmHWM since
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
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from chunkwise.models.presets import BENCH_MODELS, bench_config
from chunkwise.tools.bench.case import CHUNKED, DTYPES, RESULT_MARKER, BenchCase, CaseResult
from chunkwise.utils.memory import CpuMemory, CudaMemory, is_out_of_memory, limit_memory


def build_model(name: str, *, dtype: torch.dtype, device: torch.device, lora_r: int = 0, seed: int = 0):
    """A benchmark model (a `BENCH_MODELS` name, a tiny preset, or a local path), on `device`.

    Bench models are initialised directly on the device, so an 8B shape never passes through host memory.
    With `lora_r > 0` the model is wrapped in a LoRA adapter on q_proj/v_proj and only the adapter trains.
    """
    from transformers import AutoModelForCausalLM

    from chunkwise.models.loading import add_lora, load_causal_lm

    torch.manual_seed(seed)
    if name in BENCH_MODELS:
        with device:
            model = AutoModelForCausalLM.from_config(bench_config(name), dtype=dtype)
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



# ----- the step of each method -----------------------------------------------------------------------


def packed_inputs(documents: tuple[int, ...] | None, input_ids: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """`({"position_ids": [B, T]} restarting at 0 at each document, or {} for one stream}, labels [B, T])`.

    The labels are the tokens, IGNORE_INDEX on each document's first one, so that no document's last token
    predicts the next document (what the engine does by itself without labels; full backprop needs it said).
    """
    from chunkwise.core.loss import IGNORE_INDEX

    if documents is None:
        return {}, input_ids
    positions = torch.cat([torch.arange(n) for n in documents]).to(input_ids.device).expand_as(input_ids)
    labels = input_ids.masked_fill(positions == 0, IGNORE_INDEX)
    return {"position_ids": positions}, labels


def make_step(case: BenchCase, model: torch.nn.Module) -> Callable[[torch.Tensor], tuple[float, int | None]]:
    """The training (or inference) step of `case.method`; it returns (loss, chunks backpropagated).

    With `case.documents` every method reads the row as packed documents: `position_ids` restarting at each
    (transformers' per-document mask for forward/full/ckpt, the engines' per-document attention for the rest).
    """
    from chunkwise.core.config import ChunkwiseConfig
    from chunkwise.core.loss import sequence_loss

    def full_loss(input_ids: torch.Tensor) -> torch.Tensor:
        # use_cache=False: ordinary training builds no KV cache (and checkpointing refuses one); without a
        # cache and a 2-D mask transformers reads the documents from position_ids.
        packed, labels = packed_inputs(case.documents, input_ids)
        return sequence_loss(model(input_ids=input_ids, use_cache=False, **packed).logits, labels)

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
        packed, _ = packed_inputs(case.documents, input_ids)  # the engine masks each document's last target itself
        out = engine.backward(input_ids, **packed)
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
            start, cpu_start = time.perf_counter(), time.process_time()
            result.loss, result.backprop_chunks = step(input_ids)
            _synchronize(device)
            result.step_times_s.append(time.perf_counter() - start)
            result.step_cpu_s.append(time.process_time() - cpu_start)
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
    prime = replace(case, seq_len=16, chunk_size=4, budget=1, documents=None if case.documents is None else (8, 8))
    make_step(prime, model)(_random_tokens(prime, vocab_size, 16, device))
    return make_step(case, model), _random_tokens(case, vocab_size, case.seq_len, device)


# ----- the child process entry point -----------------------------------------------------------------


def child_main(argv: list[str]) -> int:
    """Measure the case given as JSON (`--case`) and print its result on one `RESULT_MARKER` line."""
    parser = argparse.ArgumentParser(prog="python -m chunkwise.tools.bench.measure", description="Measure one benchmark case.")
    parser.add_argument("--case", required=True, help="the BenchCase as JSON")
    case = BenchCase(**json.loads(parser.parse_args(argv).case))
    result = measure_case(case)
    print(RESULT_MARKER + json.dumps(result.to_dict()), flush=True)
    return 0


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    sys.exit(child_main(sys.argv[1:]))
