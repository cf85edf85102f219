"""`backward(inputs_embeds=...)`: the gradient reaches each chunk's embeddings and what produced them."""

import pytest
import torch
from reference import max_relative_error

from chunkwise import SeCO, SpaCO
from chunkwise.core.loss import chunk_loss_sum, shift_labels
from chunkwise.models.presets import build_tiny_model

SEQ, CHUNK, HIDDEN = 23, 5, 64


class SoftPrompt(torch.nn.Module):
    """A stand-in for a vision tower or soft prompt: learned vectors prepended to the token embeddings."""

    def __init__(self, length: int):
        super().__init__()
        self.features = torch.nn.Parameter(torch.randn(length, 8, dtype=torch.float64))
        self.project = torch.nn.Linear(8, HIDDEN, dtype=torch.float64)

    def forward(self, token_embeds: torch.Tensor) -> torch.Tensor:
        prompt = self.project(self.features).expand(token_embeds.shape[0], -1, -1)
        return torch.cat([prompt, token_embeds], dim=1)


def setup(seed=0):
    torch.manual_seed(seed)
    model = build_tiny_model("tiny-qwen3", dtype=torch.float64, seed=seed)
    prompter = SoftPrompt(length=7)
    ids = torch.randint(0, 128, (2, SEQ - 7))
    labels = torch.cat([torch.full((2, 7), -100), ids], dim=1)  # the prompt is never a target
    return model, prompter, ids, labels


def all_grads(*modules):
    return {f"{i}.{n}": p.grad.clone() for i, m in enumerate(modules) for n, p in m.named_parameters()}


def full_reference(model, prompter, ids, labels):
    embeds = prompter(model.get_input_embeddings()(ids))
    targets = shift_labels(labels)
    loss = chunk_loss_sum(model(inputs_embeds=embeds).logits, targets) / (targets != -100).sum()
    loss.backward()
    return loss.detach(), all_grads(model, prompter)


def test_embedding_gradients_match_full_backprop_into_the_producer():
    model, prompter, ids, labels = setup()
    loss, reference = full_reference(model, prompter, ids, labels)
    model.zero_grad(set_to_none=True)
    prompter.zero_grad(set_to_none=True)

    embeds = prompter(model.get_input_embeddings()(ids))
    out = SeCO(model, chunk_size=CHUNK).backward(inputs_embeds=embeds, labels=labels)

    torch.testing.assert_close(out.loss, loss, rtol=1e-12, atol=0)
    assert max_relative_error(all_grads(model, prompter), reference) < 1e-10
    # Not vacuous: the producer and the embedding table both received a gradient.
    assert prompter.features.grad.abs().sum() > 0 and model.get_input_embeddings().weight.grad.abs().sum() > 0


def test_spaco_with_full_budget_equals_seco_with_embeddings():
    model, prompter, ids, labels = setup(seed=1)
    SeCO(model, chunk_size=CHUNK).backward(inputs_embeds=prompter(model.get_input_embeddings()(ids)), labels=labels)
    seco = all_grads(model, prompter)
    model.zero_grad(set_to_none=True)
    prompter.zero_grad(set_to_none=True)
    SpaCO(model, chunk_size=CHUNK, budget=5).backward(inputs_embeds=prompter(model.get_input_embeddings()(ids)), labels=labels)
    assert all(torch.equal(g, seco[name]) for name, g in all_grads(model, prompter).items())


def test_embedding_input_errors():
    model, prompter, ids, labels = setup()
    engine = SeCO(model, chunk_size=CHUNK)
    embeds = torch.randn(2, SEQ, HIDDEN, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"exactly one of input_ids and inputs_embeds \(both were given\)"):
        engine.backward(ids, inputs_embeds=embeds, labels=labels)
    with pytest.raises(ValueError, match="labels are required with inputs_embeds"):
        engine.backward(inputs_embeds=embeds)
    with pytest.raises(ValueError, match=r"inputs_embeds must be \[batch, seq_len, 64\]"):
        engine.backward(inputs_embeds=embeds[..., :10], labels=labels)
    with pytest.raises(TypeError, match="floating-point"):
        engine.backward(inputs_embeds=ids, labels=labels)
    with pytest.raises(ValueError, match="labels must have the shape of inputs_embeds"):
        engine.backward(inputs_embeds=embeds, labels=labels[:, :5])
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        engine.backward()
