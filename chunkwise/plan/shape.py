"""The planner's inputs: the model's sizes read from its config (`ModelShape`), and how a step trains (`Training`).

    shape = ModelShape.from_name("meta-llama/Llama-3.1-8B")          # config.json only, no weights
    training = Training.from_precision("bfloat16", device_type="cuda", lora_r=8)
"""

from __future__ import annotations

from dataclasses import dataclass

from chunkwise.models.quantize import NO_QUANTIZATION, Quantization, check_quantized_training

# Architectures whose decoder layer `chunkwise.plan.layers` follows op by op (q/k norms included).
DERIVED_TYPES = ("llama", "mistral", "qwen2", "qwen3")
PRECISIONS = ("float32", "float64", "bfloat16", "float16")


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
        quantization: a 4-bit / 8-bit base (bitsandbytes): its linears (all but the LM head) take
            `Quantization.weight_bytes` each, and one of them at a time is dequantized for its matmuls.
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
    quantization: Quantization = NO_QUANTIZATION

    def __post_init__(self):
        if self.batch_size < 1 or self.lora_r < 0:
            raise PlanError(f"batch size must be >= 1 and LoRA rank >= 0 (got {self.batch_size}, {self.lora_r})")
        if self.attention not in ("chunkwise", "model"):
            raise PlanError(f"attention must be chunkwise or model, got {self.attention!r}")
        if self.device_type not in ("cuda", "cpu"):
            raise PlanError(f"the planner knows devices cuda and cpu, got {self.device_type!r}")
        try:
            check_quantized_training(self.quantization, lora_rank=self.lora_r)
        except ValueError as error:
            raise PlanError(str(error)) from None

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
    def compute_bytes(self) -> int:
        """Element size a quantized layer computes (dequantizes) in: the given compute dtype, else autocast's, else the weights'."""
        given = self.quantization.bnb_4bit_compute_dtype
        if given is not None:
            return 4 if given == "float32" else 2
        return self.autocast_bytes or self.frozen_bytes

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
