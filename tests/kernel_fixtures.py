"""`kernel_calls`: a fixture counting the attention kernel's calls and the SDPA fallback's (tests/attention import it)."""

from __future__ import annotations

import pytest

import chunkwise.attention.chunk as attention


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls of the kernel and of the SDPA fallback made through `chunk_attention_forward`."""
    calls = {"kernel": 0, "sdpa": 0}
    kernel, fallback = attention.causal_chunk_attention, attention.sdpa_attention_forward

    def counted_kernel(*args, **kwargs):
        calls["kernel"] += 1
        return kernel(*args, **kwargs)

    def counted_fallback(*args, **kwargs):
        calls["sdpa"] += 1
        return fallback(*args, **kwargs)

    monkeypatch.setattr(attention, "causal_chunk_attention", counted_kernel)
    monkeypatch.setattr(attention, "sdpa_attention_forward", counted_fallback)
    return calls
