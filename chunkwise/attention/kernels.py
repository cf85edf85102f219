"""Fused attention kernels for the two parts of a chunk's attention, chosen per device and checked on first use.

`chunkwise.attention.chunk` splits a chunk's attention into a past part (no mask) and an own part (causal) and
merges them by log-sum-exp (see its docstring). Each part is one call of a *part kernel*: softmax
attention of `Sq` queries over `Sk` keys with as many key heads as query heads, returning the output
and the log-sum-exp (LSE) of each query's scores, and a backward that takes the *merged* output and LSE.
PyTorch's own fused kernels do exactly this; they differ in argument lists and in how they lay out the
LSE. Facts below were read in torch 2.13's `torch/_meta_registrations.py` (the shapes each op returns)
and in the ops' schemas (`torch.ops.aten.<op>.default._schema`); the schema-driven call below tolerates
arguments that other releases add or rename (the GPU machine has torch 2.11):

    kernel          op (+ `_backward`)                                      LSE as returned
    cpu-flash       aten._scaled_dot_product_flash_attention_for_cpu        [B, H, Sq], computation dtype
                                                                            (float32 for 16-bit inputs,
                                                                            float64 for float64), strides
                                                                            of a [B, Sq, H] tensor
    cuda-flash      aten._scaled_dot_product_flash_attention                float32 [B, H, Sq]
    cuda-efficient  aten._scaled_dot_product_efficient_attention            float32 [B, H, ceil(Sq/32)·32]
                    (compute_log_sumexp=True)                               (padded; [B, H, Sq] on ROCm)
    cuda-cudnn      aten._scaled_dot_product_cudnn_attention                float32 [B, H, Sq, 1]
                    (compute_log_sumexp=True)

Every kernel hands the engine the LSE as `[B, H, Sq]` in at least float32 (`PartKernel.forward`) and
takes it back in that form (`PartKernel.backward`), which puts it back into the kernel's own layout
(padded again for the efficient kernel, with the trailing axis for cuDNN). An empty key set would give
+inf: the engine never calls a kernel without keys (chunk 0 has no past part).

A kernel that was never run on this machine must not be trusted blindly: `select_kernel` runs each
candidate once per (device, dtype, head dim) and process on a small random problem with grouped heads,
with a past and without (`self_check`), compares output and q/k/v gradients with float64 math attention, and on
disagreement beyond `CHECK_TOLERANCE` (or an error) warns once, saying which kernel failed and by how
much, and moves on to the next candidate. When none passes, `select_kernel` returns None and the engine
uses its plain-ops blocked attention.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

aten = torch.ops.aten


class KernelUnavailable(RuntimeError):
    """The installed torch lacks the op, or its schema needs an argument this module does not know."""


# ----- calling an aten op by its schema ------------------------------------------------------------------


def _overload(name: str):
    packet = getattr(aten, name, None)
    return None if packet is None else getattr(packet, "default", None)


def call_by_schema(op, known: dict) -> dict:
    """Call `op` with every argument by keyword, taking values from `known` by argument name.

    Arguments the schema has but `known` lacks keep their default, or get None where they are optional;
    a required argument nobody knows raises `KernelUnavailable` (a release that added one we cannot
    guess). Values in `known` the schema does not take are left out. Returns the outputs by return name
    (unnamed returns as "0", "1", ...; positions are also kept under their index as int keys).
    """
    if op is None:
        raise KernelUnavailable("this torch build has no such op")
    arguments = {}
    for argument in op._schema.arguments:
        if argument.name in known:
            arguments[argument.name] = known[argument.name]
        elif argument.has_default_value():
            continue
        elif isinstance(argument.type, torch._C.OptionalType):
            arguments[argument.name] = None
        else:
            raise KernelUnavailable(f"{op._schema.name} needs argument {argument.name!r}, unknown to chunkwise")
    outputs = op(**arguments)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    named: dict = {}
    for index, (value, returned) in enumerate(zip(outputs, op._schema.returns)):
        named[index] = value
        named[returned.name or str(index)] = value
    return named


# ----- the part kernels ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartKernel:
    """A fused softmax-attention kernel with the LSE, in the engine's calling convention.

    Attributes:
        name: how warnings and benchmark reports call it.
        device_type: "cpu" or "cuda".
        dtypes: input dtypes it takes.
        head_dim_multiple, max_head_dim: head dims it takes (`D % multiple == 0 and D <= max`).
        run_forward: `(query [B, H, Sq, D], key [B, H, Sk, D], value [B, H, Sk, Dv], causal, scale)` ->
            `(output [B, H, Sq, Dv], lse [B, H, Sq] float32 or wider, state for backward)`. Causal means
            query t sees keys 0..t (the engine uses it only with Sq == Sk).
        run_backward: `(grad_output, query, key, value, output, lse [B, H, Sq], state, causal, scale)` ->
            `(grad_query, grad_key, grad_value)`, where output and lse are the merged ones.
    """

    name: str
    device_type: str
    dtypes: tuple[torch.dtype, ...]
    run_forward: Callable = field(repr=False)
    run_backward: Callable = field(repr=False)
    head_dim_multiple: int = 1
    max_head_dim: int = 1 << 30

    def supports(self, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
        return (
            device.type == self.device_type
            and dtype in self.dtypes
            and head_dim % self.head_dim_multiple == 0
            and head_dim <= self.max_head_dim
        )

    def forward(self, query, key, value, *, causal: bool, scale: float):
        return self.run_forward(query, key, value, causal, scale)

    def backward(self, grad_output, query, key, value, output, lse, state, *, causal: bool, scale: float):
        return self.run_backward(grad_output, query, key, value, output, lse, state, causal, scale)


def _backward_values(grad_output, query, key, value, output, lse, state, causal, scale) -> dict:
    """Every argument name the CUDA backward ops take, with its value (dropout is always 0)."""
    return {
        "grad_out": grad_output,
        "grad_out_": grad_output,  # the efficient kernel's name for it
        "query": query,
        "key": key,
        "value": value,
        "out": output,
        "logsumexp": lse,
        "dropout_p": 0.0,
        "is_causal": causal,
        "scale": scale,
        "attn_bias": None,
        "grad_input_mask": [True, True, True, False],
        **state,
    }


def _forward_state(returned: dict) -> dict:
    """What the CUDA backward ops need back from their forward, by the backward's argument names."""
    state = {}
    for name in ("cum_seq_q", "cum_seq_k", "max_q", "max_k"):
        if name in returned:
            state[name] = returned[name]
    # flash returns its RNG state as `rng_state`/`unused`; the others as `philox_seed`/`philox_offset`.
    state["philox_seed"] = returned.get("philox_seed", returned.get("rng_state"))
    state["philox_offset"] = returned.get("philox_offset", returned.get("unused"))
    return state


# cpu-flash: the fused CPU kernel SDPA uses on CPU. Its LSE is [B, H, Sq] already (with other strides).

def _cpu_flash_forward(query, key, value, causal, scale):
    out = call_by_schema(
        _overload("_scaled_dot_product_flash_attention_for_cpu"),
        {"query": query, "key": key, "value": value, "dropout_p": 0.0, "is_causal": causal, "scale": scale},
    )
    return out[0], out[1], {}


def _cpu_flash_backward(grad_output, query, key, value, output, lse, state, causal, scale):
    known = _backward_values(grad_output, query, key, value, output, lse, state, causal, scale)
    out = call_by_schema(_overload("_scaled_dot_product_flash_attention_for_cpu_backward"), known)
    return out[0], out[1], out[2]


# cuda-flash: LSE float32 [B, H, Sq].

def _flash_forward(query, key, value, causal, scale):
    known = {"query": query, "key": key, "value": value, "dropout_p": 0.0, "is_causal": causal,
             "return_debug_mask": False, "scale": scale}
    out = call_by_schema(_overload("_scaled_dot_product_flash_attention"), known)
    return out[0], out[1], _forward_state(out)


def _flash_backward(grad_output, query, key, value, output, lse, state, causal, scale):
    known = _backward_values(grad_output, query, key, value, output, _at_least_float32(lse), state, causal, scale)
    out = call_by_schema(_overload("_scaled_dot_product_flash_attention_backward"), known)
    return out[0], out[1], out[2]


# cuda-efficient: LSE float32 padded on its last axis to a multiple of 32 (ROCm: not padded).

def _efficient_forward(query, key, value, causal, scale):
    known = {"query": query, "key": key, "value": value, "attn_bias": None, "compute_log_sumexp": True,
             "dropout_p": 0.0, "is_causal": causal, "scale": scale}
    out = call_by_schema(_overload("_scaled_dot_product_efficient_attention"), known)
    lse = out[1]
    state = _forward_state(out)
    state["lse_length"] = lse.shape[-1]  # the padded length its backward expects back
    return out[0], lse[..., : query.shape[2]], state


def _at_least_float32(lse: torch.Tensor) -> torch.Tensor:
    return lse.to(torch.promote_types(lse.dtype, torch.float32)).contiguous()


def pad_lse(lse: torch.Tensor, length: int) -> torch.Tensor:
    """`[B, H, Sq]` -> contiguous `[B, H, length]` (float32 or wider); the padding is +inf, as for rows without keys."""
    if lse.shape[-1] == length:
        return _at_least_float32(lse)
    padded = lse.new_full((*lse.shape[:-1], length), math.inf, dtype=torch.promote_types(lse.dtype, torch.float32))
    padded[..., : lse.shape[-1]] = lse
    return padded


def _efficient_backward(grad_output, query, key, value, output, lse, state, causal, scale):
    state = dict(state)
    lse = pad_lse(lse, state.pop("lse_length"))
    known = _backward_values(grad_output, query, key, value, output, lse, state, causal, scale)
    out = call_by_schema(_overload("_scaled_dot_product_efficient_attention_backward"), known)
    return out[0], out[1], out[2]


# cuda-cudnn: LSE float32 [B, H, Sq, 1].

def _cudnn_forward(query, key, value, causal, scale):
    known = {"query": query, "key": key, "value": value, "attn_bias": None, "compute_log_sumexp": True,
             "dropout_p": 0.0, "is_causal": causal, "return_debug_mask": False, "scale": scale}
    out = call_by_schema(_overload("_scaled_dot_product_cudnn_attention"), known)
    lse = out[1]
    return out[0], lse.squeeze(-1) if lse.dim() == 4 else lse, _forward_state(out)


def _cudnn_backward(grad_output, query, key, value, output, lse, state, causal, scale):
    lse = _at_least_float32(lse).unsqueeze(-1)
    known = _backward_values(grad_output, query, key, value, output, lse, state, causal, scale)
    out = call_by_schema(_overload("_scaled_dot_product_cudnn_attention_backward"), known)
    return out[0], out[1], out[2]


_HALF = (torch.float16, torch.bfloat16)
CPU_FLASH = PartKernel("cpu-flash", "cpu", (torch.float64, torch.float32, *_HALF), _cpu_flash_forward, _cpu_flash_backward)
CUDA_FLASH = PartKernel("cuda-flash", "cuda", _HALF, _flash_forward, _flash_backward, head_dim_multiple=8, max_head_dim=256)
CUDA_EFFICIENT = PartKernel(
    "cuda-efficient", "cuda", (torch.float32, *_HALF), _efficient_forward, _efficient_backward, head_dim_multiple=8
)
CUDA_CUDNN = PartKernel("cuda-cudnn", "cuda", _HALF, _cudnn_forward, _cudnn_backward, head_dim_multiple=8, max_head_dim=128)

# In order of preference. cuDNN last: its attention had layout-dependent bugs in past releases, and
# the first-use check uses one small shape. The GPU suite times all three on the engine's chunk shapes.
KERNELS: list[PartKernel] = [CPU_FLASH, CUDA_FLASH, CUDA_EFFICIENT, CUDA_CUDNN]
KERNELS_BY_NAME = {kernel.name: kernel for kernel in KERNELS}


# ----- the merge of two parts ---------------------------------------------------------------------------


def merge_parts(output, lse, part_output, part_lse):
    """Softmax-merge two attention results over disjoint key sets, through their log-sum-exps.

    `output`, `part_output`: `[..., Sq, Dv]`; `lse`, `part_lse`: `[..., Sq]`. Returns the merged output in
    the dtype of `lse` (at least float32) and the merged LSE. The `lse - logsigmoid(lse - part_lse)` form
    never exponentiates a large number, whichever part dominates.
    """
    share = torch.sigmoid(part_lse - lse).unsqueeze(-1)  # the part's share of the merged softmax
    output = output.to(lse.dtype)
    merged = output - share * (output - part_output.to(lse.dtype))
    return merged, lse - F.logsigmoid(lse - part_lse)


# ----- first-use self-check -------------------------------------------------------------------------------

# Largest error (max |x - reference| / max |reference|, over the output and the q/k/v gradients) a kernel
# may show on the check problem, with and without its past. Measured with cpu-flash (seeds 0-9, head
# dims 16/64/128): bfloat16 <= 7.8e-3, float16 <= 8.9e-4, float32 <= 1.9e-6, float64 <= 3.3e-15.
# Deliberately broken kernels (LSE in base 2, a wrong scale in backward, K/V gradients swapped, the own
# part not causal) show >= 0.48. The bounds sit 4-6x above the 16-bit errors; float32's allows a kernel
# that multiplies in TF32 (~1e-3).
CHECK_TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 5e-3, torch.float64: 1e-10}
# The check problem: 4 query heads over 2 KV heads, a past of 40 keys before a chunk of 24 (so the
# efficient kernel's LSE is padded on both parts: 48 and 24 rows).
CHECK_SHAPE = dict(batch=1, heads=4, kv_heads=2, chunk=24, past=40)


def math_attention(query, key, value, scale):
    """Reference: causal attention of the chunk at the end of the keys, from plain ops (GQA by repeat)."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    chunk, length = query.shape[2], key.shape[2]
    mask = torch.ones(chunk, length, dtype=torch.bool, device=query.device).tril(length - chunk)
    scores = (query @ key.transpose(-1, -2) * scale).masked_fill(~mask, -math.inf)
    return scores.softmax(-1) @ value


def check_errors(
    attention: Callable, device: torch.device, dtype: torch.dtype, head_dim: int, *, seed: int = 0, shape: dict | None = None
) -> float:
    """Largest relative error of `attention(query, key, value, scale)` (output and q/k/v gradients)
    against float64 math attention on the check problem (or `shape`, with the keys of `CHECK_SHAPE`).
    Uses its own generator: the global RNG state, which stage 2 replays for dropout, is left alone."""
    shape = shape or CHECK_SHAPE
    batch, heads, kv_heads, chunk, length = (shape[n] for n in ("batch", "heads", "kv_heads", "chunk", "past"))
    length += chunk
    generator = torch.Generator().manual_seed(seed)
    # Rounded to `dtype` first, so that the reference sees exactly the kernel's inputs; laid out as the
    # engine passes them (queries as transformers' transposed `[B, c, H, D]`, K/V time-major as cached).
    query = torch.randn(batch, chunk, heads, head_dim, generator=generator).to(dtype).transpose(1, 2)
    key, value = (
        torch.randn(length, batch, kv_heads, head_dim, generator=generator).to(dtype).permute(1, 2, 0, 3) for _ in range(2)
    )
    grad_output = torch.randn(batch, heads, chunk, head_dim, generator=generator).to(dtype)
    scale = head_dim**-0.5
    with torch.inference_mode(False), torch.enable_grad():
        exact_inputs = [t.to(device, torch.float64).requires_grad_() for t in (query, key, value)]
        exact = math_attention(*exact_inputs, scale)
        exact_grads = torch.autograd.grad(exact, exact_inputs, grad_output.to(device, torch.float64))
        inputs = [t.to(device).requires_grad_() for t in (query, key, value)]
        output = attention(*inputs, scale)
        grads = torch.autograd.grad(output, inputs, grad_output.to(device))
    worst = 0.0
    for result, reference in zip((output, *grads), (exact, *exact_grads)):
        error = ((result.double() - reference).abs().max() / reference.abs().max()).item()
        worst = max(worst, error if math.isfinite(error) else math.inf)
    return worst


@dataclass
class KernelChoice:
    """What `select_kernel` decided for one (device, dtype, head dim): the kernel, or None for blocked."""

    kernel: PartKernel | None
    # name -> the check's error, or the message of the exception it raised
    checks: dict[str, float | str] = field(default_factory=dict)


_choices: dict[tuple[str, torch.dtype, int], KernelChoice] = {}


# `(query, key, value, scale, kernel) -> output`: how the caller runs a part kernel (its split attention).
SplitAttention = Callable[..., torch.Tensor]


def self_check(kernel: PartKernel, device: torch.device, dtype: torch.dtype, head_dim: int, run: SplitAttention) -> float | str:
    """Run `kernel` through `run` on the check problem: its error, or what it raised."""
    attention = lambda q, k, v, scale: run(q, k, v, scale, kernel)  # noqa: E731
    # The check runs inside stage 1 only, so it must not move any random state stage 2 replays for
    # dropout, even if a kernel draws from the device's generator with dropout 0.
    devices = [device] if device.type == "cuda" else []
    try:  # with a past (merge, grouped rows) and without (chunk 0: the own part's output as the kernel made it)
        with torch.random.fork_rng(devices=devices):
            shapes = (CHECK_SHAPE, {**CHECK_SHAPE, "past": 0})
            return max(check_errors(attention, device, dtype, head_dim, shape=shape) for shape in shapes)
    except Exception as error:  # a kernel that cannot run here is a failed check, not a failed step
        return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"


def select_kernel(device: torch.device, dtype: torch.dtype, head_dim: int, *, run: SplitAttention) -> PartKernel | None:
    """The first kernel of `KERNELS` that takes this (device, dtype, head dim) and passes its self-check
    run through `run`, the caller's split attention (so the check covers the merge and the GQA folding).

    Decided once per process and key; every failure is warned about once. None: no kernel passed (the
    caller uses its plain-ops attention).
    """
    key = (str(device), dtype, head_dim)
    choice = _choices.get(key)
    if choice is None:
        choice = _choices[key] = KernelChoice(None)
        tolerance = CHECK_TOLERANCE.get(dtype, CHECK_TOLERANCE[torch.bfloat16])
        for kernel in KERNELS:
            if not kernel.supports(device, dtype, head_dim):
                continue
            result = choice.checks[kernel.name] = self_check(kernel, device, dtype, head_dim, run)
            if isinstance(result, float) and result <= tolerance:
                choice.kernel = kernel
                break
            if isinstance(result, float):
                detail = f"error {result:.3g} > tolerance {tolerance:g} against float64 math attention"
            else:
                detail = f"it raised {result}"
            warnings.warn(
                f"chunkwise: attention kernel {kernel.name} failed its first-use check on {device}, {dtype}, "
                f"head dim {head_dim} ({detail}); not using it",
                RuntimeWarning,
                stacklevel=2,
            )
    return choice.kernel


def kernel_choices() -> dict[str, dict]:
    """Every decision `select_kernel` made in this process (for benchmark reports)."""
    return {
        f"{device} {str(dtype).removeprefix('torch.')} d{head_dim}": {
            "kernel": choice.kernel.name if choice.kernel else "blocked",
            "checks": choice.checks,
        }
        for (device, dtype, head_dim), choice in _choices.items()
    }


def forget_choices() -> None:
    """Drop every cached decision (tests; after changing `KERNELS`)."""
    _choices.clear()
