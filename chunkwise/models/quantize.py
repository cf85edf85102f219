"""Quantized bases (QLoRA): the bitsandbytes settings, named as TRL's `ModelConfig` names them.

A quantized base is frozen: its 4-bit or 8-bit weights cannot take a gradient, so only LoRA adapters train
on it (`check_quantized_training`). The compute dtype — what bitsandbytes dequantizes each weight to for its
matmul — follows the run's precision unless given: float32 for `--dtype float32`, bfloat16 under bfloat16
autocast, and so on.

bitsandbytes is an optional dependency, imported only when a quantized base is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: the command line checks these options before torch loads
    import torch

QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Quantization:
    """How to quantize the base model's linear layers on load (TRL's `ModelConfig` field names; the command
    line's options are generated from these fields, so each docstring is an option's help)."""

    CHOICES = {"bnb_4bit_quant_type": QUANT_TYPES, "bnb_4bit_compute_dtype": COMPUTE_DTYPES}

    load_in_4bit: bool = False
    """Load the base quantized to 4 bits (bitsandbytes; QLoRA); only LoRA adapters train on it."""
    load_in_8bit: bool = False
    """Load the base quantized to 8 bits (bitsandbytes LLM.int8); only LoRA adapters train on it."""
    bnb_4bit_quant_type: str = "nf4"
    """4-bit data type: "nf4" (normal-float, QLoRA's) or "fp4"."""
    bnb_4bit_use_double_quant: bool = False
    """Quantize the 4-bit block scales too (about 0.4 bit less per weight)."""
    bnb_4bit_compute_dtype: str | None = None
    """What a 4-bit layer computes in: float32, bfloat16 or float16 (default: the run's precision, --dtype)."""

    def __post_init__(self):
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("--load-in-4bit and --load-in-8bit exclude each other; pick one")
        if self.bnb_4bit_quant_type not in QUANT_TYPES:
            raise ValueError(f"--bnb-4bit-quant-type must be one of {', '.join(QUANT_TYPES)}, got {self.bnb_4bit_quant_type!r}")
        if self.bnb_4bit_compute_dtype is not None and self.bnb_4bit_compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"--bnb-4bit-compute-dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.bnb_4bit_compute_dtype!r}")
        if not self.load_in_4bit and (self.bnb_4bit_quant_type != "nf4" or self.bnb_4bit_use_double_quant or self.bnb_4bit_compute_dtype):
            raise ValueError("the --bnb-4bit-* options shape a 4-bit base; add --load-in-4bit or drop them")

    @property
    def enabled(self) -> bool:
        return self.load_in_4bit or self.load_in_8bit

    @property
    def bits(self) -> int | None:
        """4, 8, or None when the base is not quantized."""
        return 4 if self.load_in_4bit else 8 if self.load_in_8bit else None

    @property
    def option(self) -> str:
        """The command-line option that asked for it (for messages)."""
        return "--load-in-4bit" if self.load_in_4bit else "--load-in-8bit"

    def compute_dtype(self, weights: torch.dtype, autocast: torch.dtype | None) -> torch.dtype:
        """The dtype bitsandbytes computes in: the given one, else the run's (autocast's, else the weights')."""
        import torch

        if self.bnb_4bit_compute_dtype is not None:
            return getattr(torch, self.bnb_4bit_compute_dtype)
        dtype = autocast or weights
        if dtype == torch.float64:
            raise ValueError(f"{self.option}: bitsandbytes computes in float32, bfloat16 or float16, not float64; use --dtype float32")
        return dtype

    # ----- sizes, for the planner (chunkwise.plan reads configs only) ------------------------------------

    BLOCKSIZE = 64  # bitsandbytes' 4-bit block (transformers' default): one scale per 64 weights
    NESTED_BLOCKSIZE = 256  # double quantization: the 8-bit scales are themselves scaled per 256

    def weight_bytes(self, out_features: int, in_features: int) -> int:
        """Bytes one quantized `nn.Linear` weight `[out, in]` takes, quantization state included (its bias,
        if any, stays in the model's dtype and is counted with the unquantized parameters).

        * 4-bit: half a byte per weight (two per uint8) + a float32 scale per 64-weight block + the 16-entry
          float32 code; with double quantization an 8-bit scale per block + a float32 scale per 256 blocks
          (+ their 256-entry code and offset).
        * 8-bit: a byte per weight + a float32 scale per output row (LLM.int8's SCB).
        """
        weights = out_features * in_features
        if self.load_in_8bit:
            return weights + 4 * out_features
        blocks = -(-weights // self.BLOCKSIZE)
        packed = -(-weights // 2)
        code = 4 * 16
        if not self.bnb_4bit_use_double_quant:
            return packed + 4 * blocks + code
        return packed + blocks + 4 * -(-blocks // self.NESTED_BLOCKSIZE) + 4 * 256 + 4 + code

    @staticmethod
    def dequantization_bytes(linears, compute_bytes: int) -> int:
        """The workspace of the dequantized weight: bitsandbytes' training matmuls (4-bit, and 8-bit on CPU) turn
        the layer's weight back into a dense `[out, in]` tensor in the compute dtype for each matmul and each
        input-gradient matmul, one layer at a time: the largest quantized linear's, once.

        Args:
            linears: `(name, in features, out features)` of the quantized linears.
        """
        return max((inputs * outputs for _, inputs, outputs in linears), default=0) * compute_bytes

    def bitsandbytes_config(self, compute_dtype: torch.dtype):
        """transformers' `BitsAndBytesConfig` for these settings.

        Raises:
            ImportError: bitsandbytes is not installed (the message says how to install it).
        """
        try:
            import bitsandbytes  # noqa: F401  (transformers needs it to load; fail here with the fix)
        except ImportError:
            raise ImportError(f"{self.option} needs bitsandbytes: pip install bitsandbytes") from None
        from transformers import BitsAndBytesConfig

        if self.load_in_8bit:
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=self.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
        )


NO_QUANTIZATION = Quantization()
QUANTIZATION_FIELDS = ("load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype")


def quantization_of_settings(settings: dict) -> Quantization:
    """The `Quantization` a run's saved settings describe (fields at the top or in one group below); none if absent."""
    flat = dict(settings)
    for group in settings.values():
        if isinstance(group, dict):
            flat.update(group)
    return Quantization(**{name: flat[name] for name in QUANTIZATION_FIELDS if flat.get(name) is not None})


def quantized_linears(linears) -> list[tuple[str, int, int]]:
    """The linears transformers quantizes on load: all but the output embedding (`lm_head`), which it keeps
    in the model's dtype (bitsandbytes' `llm_int8_skip_modules` default)."""
    return [m for m in linears if m[0].split(".")[-1] != "lm_head"]


def check_quantized_training(quantization: Quantization, *, lora_rank: int | None) -> None:
    """Refuse a full fine-tune of a quantized base, in one line with the fix."""
    if quantization.enabled and not lora_rank:
        raise ValueError(
            f"{quantization.option} freezes the base in {quantization.bits}-bit weights, which take no gradient: train LoRA "
            f"adapters on it (--lora-r N, QLoRA), or drop {quantization.option} for a full fine-tune"
        )
