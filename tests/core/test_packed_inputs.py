"""Bad `position_ids` get a one-line error that says what is wrong and how to fix it, before any model work.

"Before any model work" is checked by asserting that no gradient was written when the error is raised.
"""

import pytest
import torch
from packing_reference import packed_rows

from chunkwise import SeCO
from chunkwise.models.presets import build_tiny_model


@pytest.fixture(scope="module")
def model():
    model = build_tiny_model("tiny-llama", dtype=torch.float64)
    model.config.max_position_embeddings = 64  # a limit the test can exceed cheaply
    return model


@pytest.fixture
def engine(model):
    model.zero_grad(set_to_none=True)
    return SeCO(model, chunk_size=4)


IDS, POSITIONS = packed_rows([[6, 4, 2]], seed=0)


def jump(positions):
    positions = positions.clone()
    positions[0, 3] = 5  # 0 1 2 5: neither +1 nor a restart at 0
    return positions


def beyond(positions):
    positions = positions.clone()
    positions[0, :6] = torch.arange(60, 66)
    return positions


@pytest.mark.parametrize(
    "position_ids, attention_mask, error, message",
    [
        (POSITIONS[0], None, ValueError, r"position_ids must have the shape of input_ids \(1, 12\)"),
        (POSITIONS.repeat(2, 1), None, ValueError, "position_ids must have the shape of input_ids"),
        (POSITIONS.float(), None, TypeError, "position_ids must hold integers"),
        (POSITIONS.bool(), None, TypeError, "position_ids must hold integers"),
        (POSITIONS.tolist(), None, TypeError, "position_ids must be a torch.Tensor"),
        (POSITIONS - 1, None, ValueError, "position_ids contains -1"),
        (jump(POSITIONS), None, ValueError, r"position_ids jump from 2 to 5 \(row 0, token 3\).*restart at 0"),
        (beyond(POSITIONS), None, ValueError, r"position_ids contains 65, beyond the model's limit \(max_position_embeddings = 64\)"),
        (POSITIONS, torch.tensor([[0] * 2 + [1] * 10]), ValueError, "left padding, or holes.*packed batch"),
        (POSITIONS, torch.tensor([[1] * 5 + [0] + [1] * 6]), ValueError, "left padding, or holes.*packed batch"),
    ],
    ids=["1-D", "rows", "float", "bool", "list", "negative", "jump", "beyond-limit", "left-padding", "hole"],
)
def test_bad_position_ids_are_refused_before_any_work(model, engine, position_ids, attention_mask, error, message):
    with pytest.raises(error, match=message) as raised:
        engine.backward(IDS, position_ids=position_ids, attention_mask=attention_mask)
    assert "\n" not in str(raised.value)
    assert all(p.grad is None for p in model.parameters())


def test_attention_without_a_mask_format_is_refused(model, engine, monkeypatch):
    monkeypatch.setattr(model.config, "_attn_implementation", "flash_attention_2")
    with pytest.raises(ValueError, match="needs a model using 'sdpa' or 'eager' attention; this one uses 'flash_attention_2'"):
        engine.backward(IDS, position_ids=POSITIONS)
    assert all(p.grad is None for p in model.parameters())


def test_right_padding_with_packing_is_fine(model, engine):
    """Right padding after packed documents: padding predicts nothing and is seen by nothing real."""
    mask = torch.tensor([[1] * 10 + [0] * 2])
    padded_positions = POSITIONS.clone()
    padded_positions[0, 10:] = 0  # collators often give padding position 0; it must not start a document
    out = engine.backward(IDS, position_ids=padded_positions, attention_mask=mask)
    model.zero_grad(set_to_none=True)
    unpadded = engine.backward(IDS[:, :10], position_ids=POSITIONS[:, :10])
    assert out.num_targets == unpadded.num_targets == 8
    torch.testing.assert_close(out.loss, unpadded.loss, rtol=1e-12, atol=0)


def test_objectives_that_score_rows_are_refused(model, engine):
    from chunkwise.objectives import DPO

    ids, positions = packed_rows([[6, 4, 2], [3, 9]], seed=0)
    with pytest.raises(ValueError, match="packed rows .* train with CrossEntropy; DPO scores whole rows"):
        engine.backward(ids, position_ids=positions, objective=DPO(beta=0.1, reference=torch.zeros(2, dtype=torch.float64)))
    assert all(p.grad is None for p in model.parameters())
