"""Reference-model log-probabilities for preference and RL objectives, by a no-grad chunked pass.

DPO-family losses and GRPO's KL term compare the model being trained (the policy) with a frozen
reference. Its per-token log-probabilities come from chunked inference without autograd
(`evaluate.chunked_logits`, the same KV cache and attention as training), so the reference costs one
chunk's activations plus its KV cache, whatever the sequence length. A reference is one of:

* a separate model: a frozen copy of the starting point (it must share the policy's vocabulary);
* `ADAPTER_DISABLED`: the policy itself with its PEFT adapter switched off — the base model, as TRL
  does for LoRA training, at no extra memory;
* a `ReferenceModel(model, context=...)`: any model run inside a context manager (e.g. TRL's
  `use_adapter(model, "ref")` for a separately loaded reference adapter).

Precomputed reference log-probs skip all of this: objectives take them as tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from chunkwise.core.batch import ChunkedBatch
from chunkwise.core.handle import CausalLMHandle, inspect_causal_lm, unwrap_causal_lm
from chunkwise.core.inference import chunked_logits
from chunkwise.core.loss import target_logps

ADAPTER_DISABLED = "adapter-disabled"
"""Reference = the policy with its PEFT adapter disabled (`peft_model.disable_adapter()`)."""


@dataclass(frozen=True)
class ReferenceModel:
    """A reference to run: `model` (a causal LM, or a PEFT model) inside `context()`.

    Attributes:
        model: the reference model, as `inspect_causal_lm` accepts it.
        context: a zero-argument callable returning the context manager the reference pass runs in
            (default: none). `ADAPTER_DISABLED` becomes `ReferenceModel(policy, policy.disable_adapter)`.
    """

    model: torch.nn.Module
    context: Callable[[], AbstractContextManager] = nullcontext


def _peft_wrapper(model: torch.nn.Module):
    """The PEFT model in `model` (looking through DDP), or None."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model if callable(getattr(model, "disable_adapter", None)) else None


def resolve_reference(reference, policy: torch.nn.Module, policy_handle: CausalLMHandle, *, owner: str) -> ReferenceModel:
    """Check a reference against the policy and describe how to run it; runs no model.

    Args:
        reference: a model, `ADAPTER_DISABLED`, or a `ReferenceModel`.
        policy: the model being trained, as the caller gave it to the engine.
        policy_handle: `inspect_causal_lm(policy)`.
        owner: the objective's name, for error messages.
    Raises:
        ValueError / TypeError: one line saying what is wrong and how to fix it.
    """
    if isinstance(reference, str):
        if reference != ADAPTER_DISABLED:
            raise ValueError(f"{owner}: reference={reference!r} is not a reference; give a model, a tensor, or {ADAPTER_DISABLED!r}")
        peft_model = _peft_wrapper(policy)
        if peft_model is None:
            raise ValueError(
                f"{owner}: reference={ADAPTER_DISABLED!r} needs a PEFT (e.g. LoRA) model, whose adapter is switched off "
                f"to get the base model; {type(policy).__name__} has no adapter. Pass a frozen copy of the starting "
                "model as reference instead."
            )
        return ReferenceModel(peft_model, peft_model.disable_adapter)
    if not isinstance(reference, ReferenceModel):
        if not isinstance(reference, torch.nn.Module):
            raise TypeError(
                f"{owner}: reference must be a model, {ADAPTER_DISABLED!r}, a ReferenceModel or a tensor of reference "
                f"log-probs; got {type(reference).__name__}"
            )
        if unwrap_causal_lm(reference) is policy_handle.lm:
            # The reference would move with every optimizer step: a different objective than the caller meant.
            raise ValueError(
                f"{owner}: the reference is the model being trained; pass a frozen copy of the starting model, or "
                f"{ADAPTER_DISABLED!r} for a PEFT model"
            )
        reference = ReferenceModel(reference)
    vocab = inspect_causal_lm(reference.model).vocab_size
    if vocab != policy_handle.vocab_size:
        raise ValueError(
            f"{owner}: the reference model's vocabulary has {vocab} tokens, the trained model's {policy_handle.vocab_size}; "
            "a reference must read the same token ids (use the same base model and tokenizer)"
        )
    return reference


@torch.no_grad()
def reference_token_logps(reference: ReferenceModel, batch: ChunkedBatch, *, chunk_size: int, temperature: float = 1.0) -> torch.Tensor:
    """The reference's log-probability of every target of `batch`, chunk by chunk, without autograd.

    Runs on a forked RNG, so the policy's stage 1 draws the same dropout masks whether the reference is
    computed here or given precomputed.

    Returns:
        `[B, T]` aligned with `batch.targets` (entry t: log p(target t)), 0 at ignored targets, on the
        batch's device.
    """
    if batch.input_ids is None:
        raise ValueError("a reference model reads token ids; with inputs_embeds give precomputed reference log-probs")
    handle = inspect_causal_lm(reference.model)
    device = handle.lm.get_input_embeddings().weight.device
    input_ids = batch.input_ids.to(device)
    mask = None if batch.attention_mask is None else batch.attention_mask.to(device)
    targets = batch.targets.to(device)
    result = torch.zeros(targets.shape, dtype=torch.float64, device=device)
    cuda = sorted({p.device for p in handle.lm.parameters() if p.device.type == "cuda"}, key=str)
    with torch.random.fork_rng(devices=cuda), reference.context():
        for start, end, logits in chunked_logits(handle, {"input_ids": input_ids}, mask, chunk_size=chunk_size):
            result[:, start:end] = target_logps(logits, targets[:, start:end], temperature=temperature)
    return result.to(batch.targets.device)
