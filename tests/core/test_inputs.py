"""Bad input gets a clear error naming the problem, raised before any work; degenerate input is handled.

"Before any work" is checked by asserting that no gradient was written when the error is raised.
"""

import pytest
import torch

from chunkwise import SeCO, SpaCO
from chunkwise.models.presets import build_tiny_model

VOCAB = 128


@pytest.fixture(scope="module")
def model():
    return build_tiny_model("tiny-llama", dtype=torch.float64)


@pytest.fixture
def engine(model):
    model.zero_grad(set_to_none=True)
    return SeCO(model, chunk_size=4)


def no_grad_written(model) -> bool:
    return all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5, "8", True, None])
def test_chunk_size_must_be_positive_int(model, chunk_size):
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        SeCO(model, chunk_size=chunk_size)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"budget": 0}, "budget must be a positive integer"),
        ({"budget": -1}, "budget must be a positive integer"),
        ({"budget": 2.5}, "budget must be a positive integer"),
        ({"budget": 2, "sampling": "random"}, "unknown sampling policy 'random'"),
        ({"budget": 2, "max_compensation": 0.5}, "max_compensation must be a number >= 1"),
        ({"budget": 2, "max_compensation": float("nan")}, "max_compensation must be a number >= 1"),
    ],
)
def test_spaco_options_are_checked(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpaCO(model, chunk_size=4, **kwargs)


@pytest.mark.parametrize(
    "input_ids, error, message",
    [
        ([[1, 2, 3]], TypeError, "input_ids must be a torch.Tensor"),
        (torch.tensor([[1.0, 2.0]]), TypeError, "input_ids must hold integers"),
        (torch.tensor([[True, False]]), TypeError, "input_ids must hold integers"),
        (torch.tensor([1, 2, 3]), ValueError, r"must be 2-D.*unsqueeze\(0\)"),
        (torch.ones(1, 2, 3, dtype=torch.long), ValueError, "must be 2-D"),
        (torch.zeros(1, 0, dtype=torch.long), ValueError, "input_ids is empty"),
        (torch.zeros(0, 5, dtype=torch.long), ValueError, "input_ids is empty"),
        (torch.tensor([[1, 2, VOCAB]]), ValueError, rf"token id {VOCAB}, outside the model's vocabulary \[0, {VOCAB}\)"),
        (torch.tensor([[1, -5, 2]]), ValueError, "token id -5, outside"),
    ],
)
def test_bad_input_ids(engine, model, input_ids, error, message):
    with pytest.raises(error, match=message):
        engine.backward(input_ids)
    assert no_grad_written(model)


def test_labels_and_mask_shapes_are_checked(engine, model):
    ids = torch.randint(0, VOCAB, (2, 10))
    with pytest.raises(ValueError, match=r"labels must have the shape of input_ids \(2, 10\), got \(2, 9\)"):
        engine.backward(ids, labels=ids[:, :9])
    with pytest.raises(ValueError, match="attention_mask must have the shape of input_ids"):
        engine.backward(ids, attention_mask=torch.ones(2, 11, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must be token ids in \[0, 128\) or -100"):
        engine.backward(ids, labels=torch.full_like(ids, 200))
    with pytest.raises(ValueError, match="attention_mask must contain only 0"):
        engine.backward(ids, attention_mask=torch.full_like(ids, 2))
    assert no_grad_written(model)


def test_left_padding_is_refused_with_the_fix(engine, model):
    ids = torch.randint(0, VOCAB, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with pytest.raises(ValueError, match=r"right padding only.*padding_side = 'right'"):
        engine.backward(ids, attention_mask=mask)
    empty_row = torch.ones_like(ids)
    empty_row[0] = 0
    with pytest.raises(ValueError, match="row with no real token"):
        engine.backward(ids, attention_mask=empty_row)
    assert no_grad_written(model)


@pytest.mark.parametrize("num_items", [0, -2, float("nan")])
def test_num_items_must_be_positive(engine, model, num_items):
    with pytest.raises(ValueError, match="num_items must be a positive number"):
        engine.backward(torch.randint(0, VOCAB, (1, 10)), num_items=num_items)
    assert no_grad_written(model)


def test_all_ignored_labels_give_zero_loss_and_leave_gradients(engine, model):
    ids = torch.randint(0, VOCAB, (1, 10))
    out = engine.backward(ids, labels=torch.full_like(ids, -100))
    assert out.loss.item() == 0.0 and not torch.isnan(out.loss)
    assert out.num_targets == 0
    assert no_grad_written(model)
    # A single token has nothing to predict either.
    assert engine.backward(ids[:, :1]).loss.item() == 0.0
    assert no_grad_written(model)


def test_frozen_model_is_refused(model):
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with pytest.raises(ValueError, match="no trainable parameters"):
            SeCO(model, chunk_size=4).backward(torch.randint(0, VOCAB, (1, 10)))
    finally:
        for p in model.parameters():
            p.requires_grad_(True)


def test_gradient_checkpointing_is_refused_not_silently_wrong(model):
    # transformers drops the cache inside checkpointed layers; stage 2 would lose every chunk's past.
    model.activation_checkpointing_enable()
    try:
        model.zero_grad(set_to_none=True)
        with pytest.raises(ValueError, match=r"gradient checkpointing is enabled.*activation_checkpointing_disable\(\)"):
            SeCO(model, chunk_size=4).backward(torch.randint(0, VOCAB, (1, 10)))
        assert no_grad_written(model)
    finally:
        model.activation_checkpointing_disable()
