"""The memory planner behind `chunkwise plan` and `--chunk-size auto`: a step's peak memory, from the config alone.

    shape = ModelShape.from_name("meta-llama/Llama-3.1-8B")          # config.json only, no weights
    training = Training.from_precision("bfloat16", device_type="cuda", lora_r=8)
    plans = plan_memory(shape, training, seq_len=32768, chunk_size=1024)
    plan = fit_chunk_size(shape, training, seq_len=32768, budget=Budget(24 * GiB, "given by --memory"))

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

from chunkwise.plan.layers import LayerCost, head_input_bytes
from chunkwise.utils.memory import format_bytes, host_available_memory

METHODS = ("full", "ckpt", "seco", "spaco", "seco+offload")
# Architectures whose decoder layer `chunkwise.plan.layers` follows op by op (q/k norms included).
DERIVED_TYPES = ("llama", "mistral", "qwen2", "qwen3")
PRECISIONS = ("float32", "float64", "bfloat16", "float16")
# `--chunk-size auto` keeps this share of the budget free: the planner's error on the validation cases
# (docs/plan.md) plus allocator slack.
AUTO_MARGIN = 0.10
MIN_AUTO_CHUNK = 64
# `longest_length` searches no further (16M tokens): an offloaded cache stops device memory from growing.
LONGEST_SEARCH_LIMIT = 1 << 24
# What the planner reports, in this order (bytes alive at the method's peak).
PARTS = ("weights", "weight_copies", "gradients", "optimizer", "kv_cache", "kv_gradient", "activations",
         "logits_loss", "attention_backward", "optimizer_step")


class PlanError(ValueError):
    """The planner cannot answer (bad config or setting) or the length cannot fit; the message says why."""


# ----- the model, from its config -----------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """The sizes the planner needs, read from a config (the model is built on the meta device: no memory).

    Attributes:
        name: what the user called the model.
        model_type: the config's `model_type` ("llama", "qwen3", ...).
        layers, hidden, intermediate, heads, kv_heads, head_dim, vocab: the decoder's dimensions.
        max_positions: `max_position_embeddings`, or None.
        qk_norm: the attention normalises queries and keys per head (Qwen3, Gemma 3).
        windows: each layer's sliding window (None: full attention).
        parameters: all parameters (tied embeddings once).
        linears: `(module name, in features, out features)` of every `nn.Linear` (LoRA targets, autocast casts).
        linear_weights: elements in distinct `nn.Linear` weights (autocast keeps one low-precision copy of each).
        lm_head_weights: elements of the LM head's weight.
    """

    name: str
    model_type: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int | None
    qk_norm: bool
    windows: tuple[int | None, ...]
    parameters: int
    linears: tuple[tuple[str, int, int], ...]
    linear_weights: int
    lm_head_weights: int

    @property
    def derived(self) -> bool:
        """Whether the layer trace follows this architecture op by op (else it is the Llama layer's estimate)."""
        return self.model_type in DERIVED_TYPES

    @classmethod
    def from_name(cls, name_or_path: str) -> ModelShape:
        """From a tiny preset, a model folder or a hub id; only the config is read."""
        from chunkwise.models.loading import load_model_config

        return cls.from_config(load_model_config(name_or_path), name=name_or_path)

    @classmethod
    def from_config(cls, config, *, name: str) -> ModelShape:
        """From a transformers config; PlanError if it does not describe a decoder-only causal LM."""
        import torch
        from transformers import AutoModelForCausalLM

        if getattr(config, "is_encoder_decoder", False):
            raise PlanError(f"{name} ({config.model_type}) is an encoder-decoder model; chunkwise trains decoder-only causal LMs")
        try:
            with torch.device("meta"):  # shapes only: the parameters take no memory
                model = AutoModelForCausalLM.from_config(config)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise PlanError(f"{name}: transformers cannot build a causal LM from its config ({str(error).splitlines()[0]})") from None
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        # GPT-2-style configs name no intermediate size: their MLP is 4 x hidden (approximate anyway).
        dims = {"intermediate_size": getattr(text, "intermediate_size", None) or 4 * (getattr(text, "hidden_size", 0) or 0)}
        for field_name in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"):
            value = dims.get(field_name) or getattr(text, field_name, None)
            if not isinstance(value, int) or value < 1:
                raise PlanError(f"{name}: its config has no usable {field_name} (got {value!r}); is it a decoder-only causal LM?")
            dims[field_name] = value
        heads = dims["num_attention_heads"]
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or dims["hidden_size"] // heads
        layers = dims["num_hidden_layers"]
        window = getattr(text, "sliding_window", None)
        if getattr(text, "use_sliding_window", True) is False:
            window = None
        layer_types = getattr(text, "layer_types", None) or [None] * layers
        windows = tuple(window if kind in (None, "sliding_attention") else None for kind in layer_types)

        linears, seen, linear_weights = [], set(), 0
        for module_name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                linears.append((module_name, module.in_features, module.out_features))
                if id(module.weight) not in seen:
                    seen.add(id(module.weight))
                    linear_weights += module.weight.numel()
        layer_list = getattr(model.get_decoder(), "layers", None)
        first_attention = getattr(layer_list[0], "self_attn", None) if layer_list else None
        return cls(
            name=name,
            model_type=getattr(text, "model_type", type(config).__name__),
            layers=layers,
            hidden=dims["hidden_size"],
            intermediate=dims["intermediate_size"],
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            vocab=dims["vocab_size"],
            max_positions=getattr(text, "max_position_embeddings", None),
            qk_norm=hasattr(first_attention, "q_norm"),
            windows=windows,
            parameters=sum(p.numel() for p in model.parameters()),
            linears=tuple(linears),
            linear_weights=linear_weights,
            lm_head_weights=dims["vocab_size"] * dims["hidden_size"],
        )

    def lora_modules(self, targets: tuple[str, ...]) -> list[tuple[str, int, int]]:
        """The `nn.Linear` modules LoRA wraps for these target names (peft's rule: the name or its last parts)."""
        return [m for m in self.linears if any(m[0] == t or m[0].endswith("." + t) for t in targets)]


# ----- what trains, in which precision ------------------------------------------------------------------


@dataclass(frozen=True)
class Training:
    """How a step runs, as far as memory is concerned (`from_precision` mirrors `chunkwise train`).

    Attributes:
        param_bytes: element size of the trained weights, their gradients and optimizer states.
        frozen_bytes: element size of the frozen base weights under LoRA (= param_bytes without LoRA).
        autocast_bytes: 2 under bfloat16/float16 autocast, None without autocast.
        lora_r: LoRA rank; 0 trains every parameter.
        lora_targets: module names LoRA wraps.
        batch_size: sequences per micro-batch.
        optimizer_states: tensors per trained parameter the optimizer keeps (AdamW: 2).
        attention: the engines' attention option: "chunkwise" or "model".
        device_type: "cuda" or "cpu": which kernel `chunkwise.attention.chunk` runs (they keep different tensors).
    """

    param_bytes: int = 4
    frozen_bytes: int = 4
    autocast_bytes: int | None = None
    lora_r: int = 0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    batch_size: int = 1
    optimizer_states: int = 2
    attention: str = "chunkwise"
    device_type: str = "cuda"

    def __post_init__(self):
        if self.batch_size < 1 or self.lora_r < 0:
            raise PlanError(f"batch size must be >= 1 and LoRA rank >= 0 (got {self.batch_size}, {self.lora_r})")
        if self.attention not in ("chunkwise", "model"):
            raise PlanError(f"attention must be chunkwise or model, got {self.attention!r}")
        if self.device_type not in ("cuda", "cpu"):
            raise PlanError(f"the planner knows devices cuda and cpu, got {self.device_type!r}")

    @classmethod
    def from_precision(cls, precision: str, *, device_type: str, lora_r: int = 0, **options) -> Training:
        """`chunkwise train --dtype`'s regimes: float32/float64 weights, or bfloat16/float16 autocast with
        float32 trained weights (the frozen base stored in the low precision under LoRA)."""
        if precision not in PRECISIONS:
            raise PlanError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if precision in ("float32", "float64"):
            size = 4 if precision == "float32" else 8
            return cls(param_bytes=size, frozen_bytes=size, lora_r=lora_r, device_type=device_type, **options)
        return cls(param_bytes=4, frozen_bytes=2 if lora_r else 4, autocast_bytes=2, lora_r=lora_r, device_type=device_type, **options)

    @property
    def lora(self) -> bool:
        return self.lora_r > 0

    @property
    def hidden_bytes(self) -> int:
        """The residual stream's element size: the embedding's dtype (trained, or the frozen base's)."""
        return self.frozen_bytes if self.lora else self.param_bytes

    @property
    def precision(self) -> str:
        if self.autocast_bytes:
            return "bfloat16/float16 autocast"
        return {4: "float32", 8: "float64", 2: "16-bit"}[self.param_bytes]


def has_fused_kernel(shape: ModelShape, training: Training) -> bool:
    """Whether `chunkwise.attention.kernels` has a fused part kernel for this device, dtype and head dim (its table,
    `PartKernel.supports`; the first-use self-check is assumed to pass). Without one, attention is blocked."""
    import torch

    from chunkwise.attention.kernels import KERNELS

    size = training.autocast_bytes or training.hidden_bytes
    dtype = {2: torch.bfloat16, 4: torch.float32, 8: torch.float64}[size]
    device = torch.device(training.device_type)
    return any(kernel.supports(device, dtype, shape.head_dim) for kernel in KERNELS)


def attention_kinds(shape: ModelShape, training: Training, method: str, seq_len: int, chunk_size: int) -> list[str]:
    """The attention code path of each layer for the chunk that attends to the longest past.

    full/ckpt: "sdpa" (transformers' SDPA over the whole sequence; "masked" where a sliding window is
    shorter than it). seco/spaco: `chunkwise.attention.chunk` on a fused kernel ("split"; "offloaded" for
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
            kinds.append("masked" if windowed else "sdpa")
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


def _static_parts(shape: ModelShape, training: Training) -> dict[str, int]:
    """Weights, autocast's weight copies, gradients and optimizer state: counts times element sizes."""
    t = training
    if t.lora:
        modules = shape.lora_modules(t.lora_targets)
        trained = sum(t.lora_r * (inputs + outputs) for _, inputs, outputs in modules)
        weights = shape.parameters * t.frozen_bytes + trained * t.param_bytes
        copied = trained  # autocast caches a low-precision copy of each float32 weight it casts
    else:
        trained = shape.parameters
        weights = trained * t.param_bytes
        copied = shape.linear_weights
    return {
        "weights": weights,
        "weight_copies": copied * t.autocast_bytes if t.autocast_bytes else 0,
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
    def of(cls, shape: ModelShape, training: Training, method: str, tokens: int, keys: int) -> _Chunk:
        kinds = attention_kinds(shape, training, method, keys, tokens)
        acts = _activations(shape, training, kinds, tokens, keys)
        b = training.batch_size
        backward, backward_past = _attention_backward_bytes(shape, training, kinds[-1], tokens, keys, acts.last)
        return cls(acts, head_input_bytes(shape, training) * tokens * b, _loss_bytes(shape, training, tokens * b), backward, backward_past)


def method_plan(shape: ModelShape, training: Training, method: str, *, seq_len: int, chunk_size: int | None = None) -> MethodPlan:
    """The predicted peak of one method's training step: the largest of the moments below.

    full: the loss's backward (every activation, no gradient yet); the LM head's backward (its gradient
    arrives, one logits-sized tensor left). ckpt: the loss's backward (each layer's input); a recomputed
    layer's backward (all gradients). seco/spaco: stage 2 visits the last chunk first, before any
    gradient or KV-gradient buffer exists, then the one before it with all of them allocated and seeded
    with its KV relay (`_relay_bytes`); for each, its loss's backward and its last layer's attention
    backward over its keys. SpaCO may select those two chunks, and scales the relay by its factor (one
    more copy). All: the optimizer step. seco+offload counts the cache, its gradient and the past-sized
    tensors in host memory, and the streamed blocks of the past on the device (`_streamed_bytes`).
    """
    if method not in METHODS:
        raise PlanError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if seq_len < 2:
        raise PlanError(f"the sequence length must be at least 2, got {seq_len}")
    chunked = method in ("seco", "spaco", "seco+offload")
    if chunked and (chunk_size is None or chunk_size < 1):
        raise PlanError(f"{method} needs a chunk size >= 1, got {chunk_size}")
    b = training.batch_size
    static = _static_parts(shape, training)
    resident = {"weights": static["weights"], "weight_copies": static["weight_copies"], "optimizer": static["optimizer"]}
    gradients = static["gradients"]
    phases: dict[str, dict[str, int]] = {}  # the moment -> bytes alive then, by part
    on_host: dict[str, dict[str, int]] = {}  # seco+offload: the part of each moment in host memory
    kv = kv_gradient = 0

    if not chunked:
        step = _Chunk.of(shape, training, method, seq_len, seq_len)
        acts, head, loss = step.activations.total, step.head, step.loss
        sizes = {"activations": acts + head, "logits_loss": loss}
        if method == "full":
            phases["loss backward"] = {**resident, "activations": acts + head, "logits_loss": loss}
            # after the log-softmax's backward one logits-sized gradient is left, and the LM head's gradient arrives
            lm_head_gradient = 0 if training.lora else shape.lm_head_weights * training.param_bytes
            phases["LM head backward"] = {**resident, "gradients": lm_head_gradient, "activations": acts + head, "logits_loss": loss // 3}
        else:
            # each layer's input, and the boolean [B, 1, T, T] mask they share where a sliding window needs one
            masked = any(window is not None and seq_len > window for window in shape.windows)
            checkpoints = shape.layers * shape.hidden * training.hidden_bytes * seq_len * b + masked * b * seq_len * seq_len
            phases["loss backward"] = {**resident, "activations": checkpoints + head, "logits_loss": loss}
            phases["recomputed layer backward"] = {**resident, "gradients": gradients, "attention_backward": step.backward,
                                                   "activations": checkpoints + acts // shape.layers}
    else:
        chunk = min(chunk_size, seq_len)
        count = -(-seq_len // chunk)
        last = _Chunk.of(shape, training, method, seq_len - (count - 1) * chunk, seq_len)
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
        lm_head_gradient = 0 if training.lora else shape.lm_head_weights * training.param_bytes
        one_layer = (gradients - (0 if training.lora else 2 * lm_head_gradient)) // shape.layers
        visits = [("last chunk's ", last, 0, {"kv_cache": kv + streamed},
                   {"kv_cache": kv + streamed, "gradients": lm_head_gradient + one_layer, "kv_gradient": kv_gradient // shape.layers})]
        if count > 1:  # then the chunk before it, with every gradient buffer allocated, seeded with its relay
            before = _Chunk.of(shape, training, method, chunk, (count - 1) * chunk)
            held = {"kv_cache": kv + streamed + summed, "kv_gradient": kv_gradient, "gradients": gradients}
            visits.append(("", before, _relay_bytes(shape, training, cost, chunk * b, method), held, held))
        for name, visit, relay, at_loss, at_attention in visits:
            acts = visit.activations
            phases[f"{name}loss backward"] = {**resident, **at_loss, "activations": acts.total + visit.head + relay, "logits_loss": visit.loss}
            phases[f"{name}attention backward"] = {**resident, **at_attention, "attention_backward": visit.backward,
                                                   "activations": acts.total - acts.last_rest + relay}
            for moment, held in ((f"{name}loss backward", at_loss), (f"{name}attention backward", at_attention)):
                on_host[moment] = {"kv_cache": kv, "kv_gradient": held.get("kv_gradient", 0), "activations": acts.past}
            on_host[f"{name}attention backward"]["attention_backward"] = visit.backward_past
        sizes = {"kv_cache": kv, "kv_gradient": kv_gradient, "activations": visits[-1][1].activations.total + visits[-1][1].head,
                 "logits_loss": visits[-1][1].loss}
    phases["optimizer step"] = {**resident, "gradients": gradients, "optimizer_step": static["optimizer_step"]}
    if method != "seco+offload":
        on_host = {}
    host = {name: sum(on_host.get(name, {}).values()) for name in phases}
    device = {name: {part: count - on_host.get(name, {}).get(part, 0) for part, count in parts.items()} for name, parts in phases.items()}
    cpu = training.device_type == "cpu"  # host and device are one memory
    peak = max(phases, key=lambda name: sum(device[name].values()) + (host[name] if cpu else 0))
    parts = {part: device[peak][part] for part in PARTS if device[peak].get(part)}
    return MethodPlan(method, seq_len, chunk_size if chunked else None, parts, peak, host[peak], {**static, **sizes})


def plan_memory(shape: ModelShape, training: Training, *, seq_len: int, chunk_size: int, methods=METHODS) -> list[MethodPlan]:
    """`method_plan` of each method (chunk_size applies to seco, spaco and seco+offload)."""
    return [method_plan(shape, training, method, seq_len=seq_len, chunk_size=chunk_size) for method in methods]


# ----- what fits a budget -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """Memory a step may use: `free` bytes less the `AUTO_MARGIN` share (`usable`).

    Attributes:
        free: the device's free memory, or what the user gave (`--memory`).
        source: where `free` comes from, for messages ("--memory", "free on cuda:0", ...).
        host_free: host memory for an offloaded KV cache on a GPU (None: not checked).
    """

    free: int
    source: str
    host_free: int | None = None

    @property
    def usable(self) -> int:
        return int(self.free * (1 - AUTO_MARGIN))

    @property
    def host_usable(self) -> int | None:
        return None if self.host_free is None else int(self.host_free * (1 - AUTO_MARGIN))

    def admits(self, plan: MethodPlan, device_type: str) -> bool:
        if plan.total(device_type) > self.usable:
            return False
        return device_type == "cpu" or self.host_usable is None or plan.host <= self.host_usable

    def describe(self) -> str:
        return f"{format_bytes(self.usable)} usable ({format_bytes(self.free)} {self.source}, less the {AUTO_MARGIN:.0%} margin)"


def device_budget(device, *, memory: int | None = None, held: int = 0) -> Budget:
    """The budget of a step on `device` (a torch.device): `memory` bytes if given, else its free memory
    (CUDA: `torch.cuda.mem_get_info`, which counts other processes; CPU: `host_available_memory`) plus
    `held`, what the step's own tensors (weights, gradients, optimizer state) already occupy there."""
    import torch

    host = host_available_memory()
    if memory is not None:
        return Budget(memory, "given by --memory", host if device.type == "cuda" else None)
    source = " plus what the model already holds" if held else ""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return Budget(free + held, f"free on {device}{source}", host)
    return Budget(host + held, f"of RAM available{source}")


def plan_training_step(model_config, *, name: str, seq_len: int, precision: str, device, method: str, offload_kv: bool = False,
                       memory: int | None = None, **training_options) -> MethodPlan:
    """What `--chunk-size auto` runs: the plan with the largest chunk that fits `device`'s budget (see
    `device_budget`); for method "full" the plan of the step, if it fits.

    Raises:
        PlanError: nothing fits, with the planner's numbers (see `fit_chunk_size`).
    """
    shape = ModelShape.from_config(model_config, name=name)
    training = Training.from_precision(precision, device_type=device.type, **training_options)
    method = "seco+offload" if offload_kv else method
    return fit_chunk_size(shape, training, seq_len=seq_len, budget=device_budget(device, memory=memory), method=method)


def _candidate_chunks(seq_len: int) -> list[int]:
    """The chunk sizes `--chunk-size auto` considers, largest first: the whole sequence (one chunk),
    then powers of two below it, down to `MIN_AUTO_CHUNK`."""
    chunks = [seq_len]
    size = 1 << (seq_len - 1).bit_length() - 1 if seq_len > 1 else 1
    while size >= MIN_AUTO_CHUNK:
        if size < seq_len:
            chunks.append(size)
        size //= 2
    return chunks


def _largest_fitting(shape: ModelShape, training: Training, seq_len: int, budget: Budget, method: str) -> tuple[MethodPlan | None, MethodPlan]:
    """(the fitting plan with the largest candidate chunk or None, the last plan tried)."""
    if method in ("full", "ckpt"):
        plan = method_plan(shape, training, method, seq_len=seq_len)
        return (plan if budget.admits(plan, training.device_type) else None), plan
    for chunk in _candidate_chunks(seq_len):
        plan = method_plan(shape, training, method, seq_len=seq_len, chunk_size=chunk)
        if budget.admits(plan, training.device_type):
            return plan, plan
    return None, plan


def fit_chunk_size(shape: ModelShape, training: Training, *, seq_len: int, budget: Budget, method: str = "seco") -> MethodPlan:
    """The plan with the largest chunk (see `_candidate_chunks`) whose step fits `budget`.

    Raises:
        PlanError: nothing fits; the message has the planner's numbers for the smallest chunk, the
            longest length that fits, and whether offloading the KV cache would.
    """
    plan, tried = _largest_fitting(shape, training, seq_len, budget, method)
    if plan is None:
        raise PlanError(_refusal(shape, training, tried, budget))
    return plan


def longest_length(shape: ModelShape, training: Training, method: str, *, budget: Budget, chunk_size: int | None = None,
                   limit: int = LONGEST_SEARCH_LIMIT) -> MethodPlan | None:
    """The plan of the longest sequence `method` trains within `budget` (None if not even 2 tokens fit).

    With `chunk_size` None the chunk is chosen as `fit_chunk_size` does at each length, so at the limit
    it is the smallest. The search stops at `limit` tokens.
    """

    def fitting(length: int) -> MethodPlan | None:
        if method in ("full", "ckpt"):
            plan = method_plan(shape, training, method, seq_len=length)
            return plan if budget.admits(plan, training.device_type) else None
        if chunk_size is not None:
            plan = method_plan(shape, training, method, seq_len=length, chunk_size=chunk_size)
            return plan if budget.admits(plan, training.device_type) else None
        return _largest_fitting(shape, training, length, budget, method)[0]

    best = fitting(2)
    if best is None:
        return None
    low, high = 2, None
    while high is None:  # double until a length does not fit
        length = min(low * 2, limit)
        plan = fitting(length)
        if plan is None:
            high = length
        else:
            low, best = length, plan
            if length == limit:
                return best
    while high - low > 1:
        middle = (low + high) // 2
        plan = fitting(middle)
        if plan is None:
            high = middle
        else:
            low, best = middle, plan
    return best


def describe_parts(plan: MethodPlan) -> str:
    """"weights 14.96 GiB, gradients 13.0 MiB, ..." for messages."""
    names = {"kv_cache": "KV cache", "kv_gradient": "KV gradient", "logits_loss": "logits and loss",
             "weight_copies": "autocast weight copies", "attention_backward": "attention backward",
             "optimizer_step": "optimizer step"}
    parts = ", ".join(f"{names.get(name, name)} {format_bytes(count)}" for name, count in plan.parts.items())
    return parts + (f"; host {format_bytes(plan.host)}" if plan.host else "")


def _refusal(shape: ModelShape, training: Training, plan: MethodPlan, budget: Budget) -> str:
    """Why a length cannot fit, with the numbers and what would."""
    chunk = f" with {plan.chunk_size}-token chunks" if plan.chunk_size else ""
    lines = [f"{plan.seq_len} tokens x {training.batch_size} do not fit: {plan.method}{chunk} needs "
             f"{format_bytes(plan.total(training.device_type))} ({describe_parts(plan)}; peak at the {plan.phase}) but "
             f"{budget.describe()}."]
    longest = longest_length(shape, training, plan.method, budget=budget)
    if longest is not None:
        lines.append(f"The longest sequence that fits is {longest.seq_len} tokens.")
    if plan.method in ("seco", "spaco"):
        offloaded, _ = _largest_fitting(shape, training, plan.seq_len, budget, "seco+offload")
        if offloaded is not None:
            lines.append(f"With --offload-kv it fits ({offloaded.chunk_size}-token chunks, {format_bytes(offloaded.peak)} on the device, "
                         f"{format_bytes(offloaded.host)} in host memory).")
    return " ".join(lines)


# ----- `chunkwise plan`: the whole answer for one model and setting -------------------------------------


@dataclass
class PlanReport:
    """What `chunkwise plan` prints.

    Attributes:
        shape, training: the model and how it trains.
        seq_len: the length of the breakdown (None: only the longest lengths were asked for).
        plans: each method's plan at `seq_len`.
        budget: the memory the answer is for (None: no --memory and no such device here).
        recommended: the plan `--chunk-size auto` would pick (seco, else seco+offload), or None.
        longest: each method's plan at the longest length within `budget`.
        notes: caveats (approximate architecture, position limit, ...).
    """

    shape: ModelShape
    training: Training
    seq_len: int | None
    plans: list[MethodPlan]
    budget: Budget | None
    recommended: MethodPlan | None
    longest: dict[str, MethodPlan | None]
    notes: list[str]

    def as_dict(self) -> dict:
        def plan_dict(plan: MethodPlan | None) -> dict | None:
            if plan is None:
                return None
            return {"method": plan.method, "seq_len": plan.seq_len, "chunk_size": plan.chunk_size, "peak_bytes": plan.peak,
                    "host_bytes": plan.host, "phase": plan.phase, "parts": plan.parts, "sizes": plan.sizes,
                    "fits": None if self.budget is None else self.budget.admits(plan, self.training.device_type)}

        budget = None if self.budget is None else {"free_bytes": self.budget.free, "usable_bytes": self.budget.usable,
                                                   "source": self.budget.source, "margin": AUTO_MARGIN}
        return {
            "model": {key: value for key, value in vars(self.shape).items() if key != "linears"},
            "training": {**vars(self.training), "precision": self.training.precision},
            "seq_len": self.seq_len,
            "budget": budget,
            "methods": [plan_dict(plan) for plan in self.plans],
            "recommended": plan_dict(self.recommended),
            "longest": {method: plan_dict(plan) for method, plan in self.longest.items()},
            "notes": self.notes,
        }


def build_report(shape: ModelShape, training: Training, *, seq_len: int | None, chunk_size: int | None,
                 budget: Budget | None) -> PlanReport:
    """Plans at `seq_len` (with `chunk_size`, else the recommended chunk, else 1024) and, with a budget,
    the recommended chunk and each method's longest length."""
    if seq_len is None and budget is None:
        raise PlanError("give --seq-len N (the breakdown at that length) or --memory SIZE (the longest length that fits)")
    if training.lora and not shape.lora_modules(training.lora_targets):
        raise PlanError(f"--lora-targets {','.join(training.lora_targets)} match no module of {shape.name}; "
                        f"its linear layers are named like {shape.linears[0][0]}")
    notes = []
    if not shape.derived:
        notes.append(f"{shape.model_type}: activations are estimated with the Llama layer (derived for "
                     f"{', '.join(DERIVED_TYPES)}); expect a larger error")
    if training.device_type == "cuda":
        notes.append("CUDA: derived from the code paths, validated only on CPU so far (docs/plan.md)")
    recommended = None
    if seq_len is not None and shape.max_positions and seq_len > shape.max_positions:
        notes.append(f"{seq_len} tokens is above the model's position limit ({shape.max_positions}); "
                     "chunkwise train needs --allow-extrapolation")
    if seq_len is not None and budget is not None:
        recommended = (_largest_fitting(shape, training, seq_len, budget, "seco")[0]
                       or _largest_fitting(shape, training, seq_len, budget, "seco+offload")[0])
    plans = []
    if seq_len is not None:
        chunk = chunk_size or (recommended.chunk_size if recommended else min(1024, seq_len))
        plans = plan_memory(shape, training, seq_len=seq_len, chunk_size=chunk)
    longest = {}
    if budget is not None:
        longest = {method: longest_length(shape, training, method, budget=budget, chunk_size=chunk_size) for method in METHODS}
    return PlanReport(shape, training, seq_len, plans, budget, recommended, longest, notes)
