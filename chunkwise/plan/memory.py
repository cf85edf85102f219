"""The predicted peak of each method's training step, from shapes alone (`method_plan`, one function per method).

    plans = plan_memory(shape, training, seq_len=32768, chunk_size=1024)   # shape, training: chunkwise.plan.shape

Everything is counted from shapes (docs/plan.md derives each term and validates them against peaks
measured by `chunkwise bench`):

* weights, gradients and optimizer state: parameter counts (from the model built on the meta device,
  which allocates nothing) times the element sizes of the precision `chunkwise train` uses;
* the KV cache and its gradient (SeCO/SpaCO): `ChunkCache` keeps, for every layer, keys and values of the
  whole sequence and a gradient buffer of the same shape;
* activations: what autograd keeps for backward, traced op by op through a decoder layer
  (`chunkwise.plan.layers`);
* logits and loss: three float32 `[tokens, vocab]` tensors meet in the loss's backward.

The peak of a method is the largest of the moments (phases) where memory piles up: the loss's backward
with every activation still held, the attention's backward over the whole past, the optimizer step.
The layer trace is exact for the Llama family (Llama, Mistral, Qwen2, Qwen3); other architectures get
the Llama layer as an approximation and the plan says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from chunkwise.models.quantize import quantized_linears
from chunkwise.plan.compute import check_documents, first_visible_key
from chunkwise.plan.layers import LayerCost, head_input_bytes
from chunkwise.plan.shape import ModelShape, PlanError, Training
from chunkwise.utils.memory import format_bytes

METHODS = ("full", "ckpt", "seco", "spaco", "seco+offload")
CHUNKED_METHODS = ("seco", "spaco", "seco+offload")
# What the planner reports, in this order (bytes alive at the method's peak).
PARTS = ("weights", "weight_copies", "dequantization", "gradients", "optimizer", "kv_cache", "kv_gradient", "activations",
         "logits_loss", "attention_backward", "optimizer_step")



def has_fused_kernel(shape: ModelShape, training: Training) -> bool:
    """Whether `chunkwise.attention.kernels` has a fused part kernel for this device, dtype and head dim (its table,
    `PartKernel.supports`; the first-use self-check is assumed to pass). Without one, attention is blocked."""
    import torch

    from chunkwise.attention.kernels import KERNELS

    size = training.autocast_bytes or training.hidden_bytes
    dtype = {2: torch.bfloat16, 4: torch.float32, 8: torch.float64}[size]
    device = torch.device(training.device_type)
    return any(kernel.supports(device, dtype, shape.head_dim) for kernel in KERNELS)


def attention_kinds(shape: ModelShape, training: Training, method: str, seq_len: int, chunk_size: int, *,
                    packed: bool = False) -> list[str]:
    """The attention code path of each layer for the chunk that attends to the longest past.

    full/ckpt: "sdpa" (transformers' SDPA over the whole sequence; "masked" where a sliding window is
    shorter than it, and for a `packed` row of several documents: transformers builds a per-document mask). seco/spaco: `chunkwise.attention.chunk` on a fused kernel ("split"; "offloaded" for
    seco+offload), or "blocked" where no kernel takes the dtype and head dim (`has_fused_kernel`); a layer
    whose window is shorter than the past, and every layer with attention="model", falls back to SDPA
    with a mask ("masked"), or, with attention="model" and no past, to SDPA without one ("cached").
    """
    if not has_fused_kernel(shape, training):
        chunkwise = "blocked"
    else:
        chunkwise = "offloaded" if method == "seco+offload" else "split"
    kinds = []
    for window in shape.windows:
        windowed = window is not None and seq_len > window
        if method in ("full", "ckpt"):
            kinds.append("masked" if windowed or packed else "sdpa")
        elif chunk_size >= seq_len and not windowed:  # one chunk: no past
            kinds.append("cached" if training.attention == "model" else chunkwise)
        elif training.attention == "model" or windowed:
            kinds.append("masked")
        else:
            kinds.append(chunkwise)
    return kinds


# ----- the plan of each method --------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodPlan:
    """One method's predicted peak, broken down by what holds the memory at that moment.

    Attributes:
        method: one of `METHODS`.
        seq_len, chunk_size: the step (chunk_size None for full/ckpt).
        parts: bytes alive at the peak by `PARTS` name; the gradients are absent where the peak comes
            before backward allocates them (full, ckpt).
        phase: the moment of the peak ("loss backward", "attention backward", "optimizer step", ...).
        host: bytes in host memory (seco+offload: the KV cache and its gradient).
        sizes: the full size of each part whether or not it is alive at the peak (for display).
    """

    method: str
    seq_len: int
    chunk_size: int | None
    parts: dict[str, int]
    phase: str
    host: int = 0
    sizes: dict[str, int] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        """Device bytes at the peak."""
        return sum(self.parts.values())

    @property
    def step_peak(self) -> int:
        """The peak above the loaded model without optimizer state: what `chunkwise bench` measures."""
        return self.peak - self.parts.get("weights", 0) - self.parts.get("optimizer", 0)

    def total(self, device_type: str) -> int:
        """What must fit in the device's memory: on a CPU the host part is the same memory."""
        return self.peak + (self.host if device_type == "cpu" else 0)



def describe_parts(plan: MethodPlan) -> str:
    """"weights 14.96 GiB, gradients 13.0 MiB, ..." for messages."""
    names = {"kv_cache": "KV cache", "kv_gradient": "KV gradient", "logits_loss": "logits and loss",
             "weight_copies": "autocast weight copies", "dequantization": "dequantized weight", "attention_backward": "attention backward",
             "optimizer_step": "optimizer step"}
    parts = ", ".join(f"{names.get(name, name)} {format_bytes(count)}" for name, count in plan.parts.items())
    return parts + (f"; host {format_bytes(plan.host)}" if plan.host else "")



def _static_parts(shape: ModelShape, training: Training) -> dict[str, int]:
    """Weights, autocast's weight copies, gradients and optimizer state: counts times element sizes."""
    t = training
    dequantization = 0
    if t.lora:
        modules = shape.lora_modules(t.lora_targets)
        trained = sum(t.lora_r * (inputs + outputs) for _, inputs, outputs in modules)
        weights = shape.parameters * t.frozen_bytes + trained * t.param_bytes
        copied = trained  # autocast caches a low-precision copy of each float32 weight it casts
        if t.quantization.enabled:  # a quantized base: its linears in packed bytes + scales, one dequantized at a time
            quantized = quantized_linears(shape.linears)
            weights -= sum(inputs * outputs for _, inputs, outputs in quantized) * t.frozen_bytes
            weights += sum(t.quantization.weight_bytes(outputs, inputs) for _, inputs, outputs in quantized)
            dequantization = t.quantization.dequantization_bytes(quantized, t.compute_bytes)
    else:
        trained = shape.parameters
        weights = trained * t.param_bytes
        copied = shape.linear_weights
    return {
        "weights": weights,
        "weight_copies": copied * t.autocast_bytes if t.autocast_bytes else 0,
        "dequantization": dequantization,
        "gradients": trained * t.param_bytes,
        "optimizer": t.optimizer_states * trained * t.param_bytes,
        # AdamW's foreach step builds one parameter-sized temporary (no optimizer: no step)
        "optimizer_step": trained * t.param_bytes if t.optimizer_states else 0,
    }


def _loss_bytes(shape: ModelShape, training: Training, tokens: int) -> int:
    """The loss's backward holds log-softmax, its incoming gradient and the logits' gradient: 3 float32 [tokens, V]."""
    size = 8 if training.param_bytes == 8 and not training.autocast_bytes else 4
    return 3 * size * shape.vocab * tokens


@dataclass(frozen=True)
class _Activations:
    """All layers' activations for one chunk (bytes, whole batch).

    Attributes:
        total: everything the layers keep for backward, `past` included.
        past: the part sized by the keys (copies of the past); it lives with the cache when offloaded.
        last_rest: the last layer's part after its attention, freed before its attention's backward.
        last: the last layer's trace (element sizes of its keys/values, stored and made, and of its attention).
    """

    total: int
    past: int
    last_rest: int
    last: LayerCost


def _activations(shape: ModelShape, training: Training, kinds: list[str], tokens: int, keys: int) -> _Activations:
    """`tokens` chunk tokens over `keys` keys, per sequence."""
    b = training.batch_size
    total = past = 0
    traced: dict[tuple[str, bool], LayerCost] = {}
    for layer, kind in enumerate(kinds):
        key = (kind, layer > 0 or not training.lora)
        if key not in traced:
            traced[key] = LayerCost.trace(shape, training, kind, input_grad=key[1])
        cost = traced[key]
        past += cost.per_key * keys * b
        total += cost.per_token * tokens * b + cost.per_key * keys * b + cost.per_token_key * tokens * keys * b
    return _Activations(total, past, (cost.per_token - cost.up_to_attention) * tokens * b, cost)


def _kv_bytes(shape: ModelShape, kv_sizes: tuple[int, int], tokens: int) -> int:
    return shape.layers * shape.kv_heads * shape.head_dim * sum(kv_sizes) * tokens


def _kv_gradient_bytes(shape: ModelShape, training: Training, kv_sizes: tuple[int, int], tokens: int) -> int:
    """The gradient buffers of the keys/values that depend on a trained weight (allocated on first use).

    Under LoRA the first layer's keys (values) get none unless k_proj (v_proj) is a target: they depend
    on the frozen embedding only.
    """
    per_layer = shape.kv_heads * shape.head_dim * tokens
    total = (shape.layers - 1) * per_layer * sum(kv_sizes)
    for name, size in zip(("k_proj", "v_proj"), kv_sizes):
        if not training.lora or name in training.lora_targets:
            total += per_layer * size
    return total


def _relay_bytes(shape: ModelShape, training: Training, cost: LayerCost, tokens: int, method: str) -> int:
    """The KV relay seeding a chunk's backward (`ChunkCache.relay`), on the device in the dtype the layers
    make K/V in: views of the gradient buffers, or copies where the buffers are narrower (autocast) or in
    host memory on a GPU (offload). SpaCO scales it by its factor: one more copy."""
    host = method == "seco+offload" and training.device_type != "cpu"
    copied = tuple(made if host or made != stored else 0 for made, stored in zip(cost.state_sizes, cost.kv_sizes))
    relay = _kv_gradient_bytes(shape, training, copied, tokens)
    if method == "spaco":
        relay += _kv_gradient_bytes(shape, training, cost.state_sizes, tokens)
    return relay


def _streamed_bytes(shape: ModelShape, cost: LayerCost, past: int, batch: int) -> int:
    """An offloaded past's two device buffers (`chunkwise.offload.BlockStreamer`) of a block of keys and values
    (or of their gradient sums), sized for a past of `past` tokens."""
    return 2 * shape.kv_heads * shape.head_dim * _past_block(past) * batch * sum(cost.kv_sizes)


def _past_block(past: int) -> int:
    """Keys of the largest block of a past `chunkwise.attention.chunk` hands a fused kernel (and streams when offloaded)."""
    from chunkwise.attention.chunk import PAST_BLOCK

    return max(0, min(PAST_BLOCK, past))


def _attention_backward_bytes(shape: ModelShape, training: Training, kind: str, tokens: int, keys: int, cost: LayerCost) -> tuple[int, int]:
    """(transient bytes of one layer's attention backward over `keys` keys, the part of it sized by the keys).

    split: the past blocks' key/value gradients, then their concatenation with the chunk's. offloaded:
    one past block's key/value gradients and their time-major copies for the host (the past's stay in
    host memory). blocked: full-length key/value gradients (allocated where the cache lives) and a few
    float32 score blocks. SDPA: the gradients of the keys/values repeated per head.
    """
    b = training.batch_size
    size = cost.attention_size
    kv = shape.kv_heads * shape.head_dim * keys * size * b
    if kind == "split":
        return 4 * kv, 4 * kv
    if kind == "offloaded":
        block = shape.kv_heads * shape.head_dim * _past_block(keys - tokens) * b
        return block * (2 * size + sum(cost.kv_sizes)), 0
    if kind == "blocked":
        block = max(128, (1 << 25) // max(1, b * shape.heads * tokens))
        return 2 * kv + 3 * 4 * b * shape.heads * tokens * min(block, keys), 2 * kv
    if kind == "masked":
        repeated = 2 * shape.heads * shape.head_dim * keys * size * b
        return repeated + 2 * kv, repeated + 2 * kv
    return 2 * kv + shape.heads * shape.head_dim * tokens * size * b, 2 * kv  # sdpa over the whole sequence


@dataclass(frozen=True)
class _Chunk:
    """What one forward of `tokens` tokens attending to `keys` keys holds (bytes, whole batch)."""

    activations: _Activations
    head: int  # the final norm's and the LM head's inputs, RoPE's tables
    loss: int  # logits and loss in the loss's backward
    backward: int  # one layer's attention backward, transient
    backward_past: int  # the part of `backward` sized by the keys

    @classmethod
    def of(cls, shape: ModelShape, training: Training, method: str, tokens: int, keys: int, *, packed: bool = False) -> _Chunk:
        kinds = attention_kinds(shape, training, method, keys, tokens, packed=packed)
        acts = _activations(shape, training, kinds, tokens, keys)
        b = training.batch_size
        backward, backward_past = _attention_backward_bytes(shape, training, kinds[-1], tokens, keys, acts.last)
        return cls(acts, head_input_bytes(shape, training) * tokens * b, _loss_bytes(shape, training, tokens * b), backward, backward_past)



# ----- the moments of each method's step ----------------------------------------------------------------


@dataclass
class _Moments:
    """The moments of one step where memory piles up.

    Attributes:
        phases: moment name -> bytes alive then, by `PARTS` name (device and host together), in the order
            the step reaches them (the first of equal peaks wins).
        sizes: the full size of each step-dependent part, alive at the peak or not (for display).
        on_host: seco+offload: the part of each moment that lives in host memory.
    """

    phases: dict[str, dict[str, int]]
    sizes: dict[str, int]
    on_host: dict[str, dict[str, int]] = field(default_factory=dict)


def _resident(static: dict[str, int]) -> dict[str, int]:
    """What the whole step holds: weights, autocast's copies and the optimizer state."""
    return {"weights": static["weights"], "weight_copies": static["weight_copies"], "dequantization": static["dequantization"],
            "optimizer": static["optimizer"]}


def _lm_head_gradient(shape: ModelShape, training: Training) -> int:
    """The LM head's weight gradient (none under LoRA: the head is frozen)."""
    return 0 if training.lora else shape.lm_head_weights * training.param_bytes


def _full_moments(shape: ModelShape, training: Training, seq_len: int, static: dict[str, int], packed: bool) -> _Moments:
    """Ordinary backprop: the loss's backward (every activation, no gradient yet); the LM head's backward
    (its gradient arrives, one logits-sized tensor left after the log-softmax's backward)."""
    step = _Chunk.of(shape, training, "full", seq_len, seq_len, packed=packed)
    acts, head, loss = step.activations.total, step.head, step.loss
    resident = _resident(static)
    phases = {
        "loss backward": {**resident, "activations": acts + head, "logits_loss": loss},
        "LM head backward": {**resident, "gradients": _lm_head_gradient(shape, training), "activations": acts + head,
                             "logits_loss": loss // 3},
    }
    return _Moments(phases, {"activations": acts + head, "logits_loss": loss})


def _ckpt_moments(shape: ModelShape, training: Training, seq_len: int, static: dict[str, int], packed: bool) -> _Moments:
    """Layer-level activation checkpointing: the loss's backward (each layer's input kept); a recomputed
    layer's backward (all gradients allocated by then)."""
    b = training.batch_size
    step = _Chunk.of(shape, training, "ckpt", seq_len, seq_len, packed=packed)
    acts, head, loss = step.activations.total, step.head, step.loss
    resident = _resident(static)
    # each layer's input, and the boolean [B, 1, T, T] mask they share where a sliding window needs one
    masked = packed or any(window is not None and seq_len > window for window in shape.windows)
    checkpoints = shape.layers * shape.hidden * training.hidden_bytes * seq_len * b + masked * b * seq_len * seq_len
    phases = {
        "loss backward": {**resident, "activations": checkpoints + head, "logits_loss": loss},
        "recomputed layer backward": {**resident, "gradients": static["gradients"], "attention_backward": step.backward,
                                      "activations": checkpoints + acts // shape.layers},
    }
    return _Moments(phases, {"activations": acts + head, "logits_loss": loss})


def _chunked_moments(shape: ModelShape, training: Training, method: str, seq_len: int, chunk: int,
                     static: dict[str, int], documents: tuple[int, ...] | None = None) -> _Moments:
    """seco, spaco, seco+offload: stage 2 visits the last chunk first, before any gradient or KV-gradient
    buffer exists, then the one before it with all of them allocated and seeded with its KV relay
    (`_relay_bytes`); for each, its loss's backward and its last layer's attention backward over its keys.
    SpaCO may select those two chunks, and scales the relay by its factor (one more copy). seco+offload
    counts the cache, its gradient and the past-sized tensors in host memory, and the streamed blocks of
    the past on the device (`_streamed_bytes`). In a packed row (`documents`) a chunk reads only the keys
    from its first query's document start on (`first_visible_key`), and the chunk before the last is the one
    that reads the most of them (the cache and its gradient still span the row)."""
    b = training.batch_size
    resident, gradients = _resident(static), static["gradients"]
    count = -(-seq_len // chunk)
    last = _Chunk.of(shape, training, method, seq_len - (count - 1) * chunk, seq_len - first_visible_key(documents, (count - 1) * chunk))
    cost = last.activations.last
    kv = _kv_bytes(shape, cost.kv_sizes, seq_len * b)
    kv_gradient = _kv_gradient_bytes(shape, training, cost.kv_sizes, seq_len * b)
    # The device's blocks of an offloaded past (seco+offload on a fused kernel), kept for the step: the
    # streamer's two buffers of keys and values, and of the KV-gradient sums from the third-last chunk on.
    streamed = summed = 0
    if "offloaded" in attention_kinds(shape, training, method, seq_len, chunk):
        streamed = _streamed_bytes(shape, cost, (count - 1) * chunk, b)
        summed = _streamed_bytes(shape, cost, (count - 2) * chunk, b)
    # The last chunk's backward allocates the gradients as it goes: by its last layer's attention, the LM
    # head's and one layer's, and that layer's KV-gradient buffer.
    lm_head_gradient = _lm_head_gradient(shape, training)
    one_layer = (gradients - (0 if training.lora else 2 * lm_head_gradient)) // shape.layers
    visits = [("last chunk's ", last, 0, {"kv_cache": kv + streamed},
               {"kv_cache": kv + streamed, "gradients": lm_head_gradient + one_layer, "kv_gradient": kv_gradient // shape.layers})]
    if count > 1:  # then the chunk before it, with every gradient buffer allocated, seeded with its relay
        keys = max((j + 1) * chunk - first_visible_key(documents, j * chunk) for j in range(count - 1))
        before = _Chunk.of(shape, training, method, chunk, keys)
        held = {"kv_cache": kv + streamed + summed, "kv_gradient": kv_gradient, "gradients": gradients}
        visits.append(("", before, _relay_bytes(shape, training, cost, chunk * b, method), held, held))
    moments = _Moments({}, {})
    for name, visit, relay, at_loss, at_attention in visits:
        acts = visit.activations
        moments.phases[f"{name}loss backward"] = {**resident, **at_loss, "activations": acts.total + visit.head + relay,
                                                  "logits_loss": visit.loss}
        moments.phases[f"{name}attention backward"] = {**resident, **at_attention, "attention_backward": visit.backward,
                                                       "activations": acts.total - acts.last_rest + relay}
        for moment, held in ((f"{name}loss backward", at_loss), (f"{name}attention backward", at_attention)):
            moments.on_host[moment] = {"kv_cache": kv, "kv_gradient": held.get("kv_gradient", 0), "activations": acts.past}
        moments.on_host[f"{name}attention backward"]["attention_backward"] = visit.backward_past
    if method != "seco+offload":
        moments.on_host = {}
    final = visits[-1][1]
    moments.sizes = {"kv_cache": kv, "kv_gradient": kv_gradient, "activations": final.activations.total + final.head,
                     "logits_loss": final.loss}
    return moments


def method_plan(shape: ModelShape, training: Training, method: str, *, seq_len: int, chunk_size: int | None = None,
                documents: tuple[int, ...] | None = None) -> MethodPlan:
    """The predicted peak of one method's training step: the largest of its moments (`_full_moments`,
    `_ckpt_moments`, `_chunked_moments`) and, for all, the optimizer step.

    `documents`: a packed row's document lengths, in row order (they add up to `seq_len`); None: one stream.

    Raises:
        PlanError: an unknown method, a length under 2, a chunked method without a chunk size, or
            documents that do not fill the row.
    """
    if method not in METHODS:
        raise PlanError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if seq_len < 2:
        raise PlanError(f"the sequence length must be at least 2, got {seq_len}")
    chunked = method in CHUNKED_METHODS
    if chunked and (chunk_size is None or chunk_size < 1):
        raise PlanError(f"{method} needs a chunk size >= 1, got {chunk_size}")
    check_documents(documents, seq_len)
    packed = documents is not None and len(documents) > 1
    static = _static_parts(shape, training)
    if method == "full":
        moments = _full_moments(shape, training, seq_len, static, packed)
    elif method == "ckpt":
        moments = _ckpt_moments(shape, training, seq_len, static, packed)
    else:
        moments = _chunked_moments(shape, training, method, seq_len, min(chunk_size, seq_len), static, documents if packed else None)
    moments.phases["optimizer step"] = {**_resident(static), "gradients": static["gradients"], "optimizer_step": static["optimizer_step"]}
    return _peak_plan(moments, training, method, seq_len, chunk_size if chunked else None, static)


def _peak_plan(moments: _Moments, training: Training, method: str, seq_len: int, chunk_size: int | None,
               static: dict[str, int]) -> MethodPlan:
    """The plan at the moment with the most bytes on the device (on a CPU, host and device are one memory)."""
    on_host = moments.on_host
    host = {name: sum(on_host.get(name, {}).values()) for name in moments.phases}
    device = {name: {part: count - on_host.get(name, {}).get(part, 0) for part, count in parts.items()}
              for name, parts in moments.phases.items()}
    cpu = training.device_type == "cpu"
    peak = max(moments.phases, key=lambda name: sum(device[name].values()) + (host[name] if cpu else 0))
    parts = {part: device[peak][part] for part in PARTS if device[peak].get(part)}
    return MethodPlan(method, seq_len, chunk_size, parts, peak, host[peak], {**static, **moments.sizes})


def plan_memory(shape: ModelShape, training: Training, *, seq_len: int, chunk_size: int, methods=METHODS,
                documents: tuple[int, ...] | None = None) -> list[MethodPlan]:
    """`method_plan` of each method (chunk_size applies to seco, spaco and seco+offload; `documents` to all)."""
    return [method_plan(shape, training, method, seq_len=seq_len, chunk_size=chunk_size, documents=documents) for method in methods]
