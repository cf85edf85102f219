"""Tiny models the tests build beyond the presets, and the random token ids they are fed.

* `random_ids`: token ids below the tiny presets' vocabulary of 128.
* `lora_model`: a float64 preset with LoRA whose B is not zero (peft starts B at zero, which makes A's
  gradient exactly zero: a gradient check of A would prove nothing).
* `norms_in_model_dtype`: a model whose RMSNorms compute in its own dtype, so a float64 model is float64
  throughout (transformers' norms compute in float32 even there).
"""

from __future__ import annotations

import torch

from chunkwise.models.loading import add_lora
from chunkwise.models.presets import build_tiny_model
from chunkwise.recipes.verify import compute_norms_in_model_dtype

VOCAB = 128  # the tiny presets' vocabulary
SEQ_LEN = 29  # ragged for chunk size 5 (the last chunk has 4 tokens)


def random_ids(batch: int = 1, seq_len: int = SEQ_LEN, *, seed: int = 0) -> torch.Tensor:
    """`[batch, seq_len]` token ids drawn uniformly below VOCAB from a generator seeded `seed`."""
    return torch.randint(0, VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def lora_model(preset: str, *, dropout: float = 0.0, seed: int = 0):
    """Tiny `preset` in float64 (weights seeded `seed`) with LoRA r=4, alpha=8 on q/v; B = 0.1 N(0, 1) seeded
    `seed + 1`. A is peft's draw from the global generator (the caller's seed)."""
    base = build_tiny_model(preset, dtype=torch.float64, seed=seed)
    return add_lora(base, rank=4, alpha=8, dropout=dropout, random_b=0.1, seed=seed + 1)


def norms_in_model_dtype(model):
    """Make every RMSNorm of `model` compute in the model's dtype instead of float32 (same formula); returns it.

    Why: transformers' `LlamaRMSNorm` casts its input to float32 (it is written for half-precision models).
    SeCO vs full backprop does not mind (the same per-token rounding happens in both), but SpaCO's
    compensation multiplies the gradients through the norms by k/t, and float32 rounding of 3·x is not
    3·(rounding of x): exact float64 identities would then hold only to ~1e-7.
    """
    patched, left = compute_norms_in_model_dtype(model)  # the library's, as `chunkwise verify` uses it in float64
    assert patched and not left
    return model
