"""Chunked no-grad scoring equals one full forward: loss sum, target count and argmax accuracy."""

from __future__ import annotations

import pytest
import torch

from chunkwise.core.handle import inspect_causal_lm
from chunkwise.core.inference import score_batch
from chunkwise.core.loss import IGNORE_INDEX, chunk_loss_sum, shift_labels
from chunkwise.models.presets import build_tiny_model


def full_forward_scores(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = shift_labels(batch["labels"])
    valid = targets != IGNORE_INDEX
    return float(chunk_loss_sum(logits, targets)), int(valid.sum()), int((logits.argmax(-1)[valid] == targets[valid]).sum())


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-mistral", "tiny-gemma3"])
@pytest.mark.parametrize("chunk_size", [1, 7, 40])
def test_chunked_scores_equal_a_full_forward(preset, chunk_size):
    model = build_tiny_model(preset, dtype=torch.float64, seed=0).eval()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 128, (2, 37), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 30:] = 0  # right padding on the second row
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[0, :5] = IGNORE_INDEX  # an ignored prompt
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    with torch.no_grad():
        loss_sum, targets, correct = full_forward_scores(model, batch)
    scores = score_batch(inspect_causal_lm(model), batch, chunk_size=chunk_size)
    assert targets == 32 + 29  # row 0: labels 5..36; row 1: labels 1..29
    assert scores.num_targets == targets and scores.num_correct == correct
    # float64 both ways; Gemma 3 rounds its RMSNorms to float32 (see test_seco_exactness.GEMMA_F64_TOL): per token
    # the norm sees the same input up to float64 rounding, so its float32 output differs only where that crosses a
    # float32 rounding boundary (2u = 1.2e-7 relative on that element). No float32 sum over tokens enters a no-grad
    # loss sum (chunk_loss_sum is float64), so the loss sum moves by ~u per flipped element, relative: 1e-6 leaves
    # 16 flips' worth (measured below 1e-12 on these seeds). A lost chunk moves it by >= 1/6 of the sum.
    assert scores.loss_sum == pytest.approx(loss_sum, rel=1e-6 if preset == "tiny-gemma3" else 1e-12)
