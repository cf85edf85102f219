"""What one decoder layer keeps for backward, per token, traced op by op from shapes (for `chunkwise.plan`).

The trace runs the Llama-family layer (Llama, Mistral, Qwen2; Qwen3's per-head q/k norms included) on
symbolic tensors that carry only a width, an element size and whether they need a gradient. Each op
records what autograd saves for it, following the rules PyTorch, transformers, peft and
`chunkwise.attention.chunk` follow: which input an op saves, which copies autocast makes (it casts an
activation anew on every call, caching only weights), which copies a dtype promotion makes.
docs/plan.md has the table of rules; tests/plan/test_plan.py checks the trace against `saved_tensors_hooks`.

`shape` is a `chunkwise.plan.ModelShape` and `training` a `chunkwise.plan.Training` (read by attribute,
so this module imports nothing from the planner).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(eq=False)
class _Sym:
    """A tensor in the trace: `width` elements of `size` bytes per token; `grad`: it requires grad."""

    width: int
    size: int
    grad: bool

    @property
    def bytes(self) -> int:
        return self.width * self.size


class _LayerTrace:
    """What one decoder layer's forward leaves alive for backward, per token of the chunk.

    Each op records what autograd saves for it (each tensor once, however many ops save it), with the
    copies autocast, peft and dtype promotions make. `per_key` counts tensors sized by the keys the chunk
    attends to (its past and itself), `per_token_key` the masks sized by both. Derivation: docs/plan.md.
    """

    def __init__(self, shape, training):
        self.shape, self.training = shape, training
        self.saved: dict[int, _Sym] = {}
        self.alive = 0  # bytes held but not saved by autograd: the chunk's fresh keys/values (ChunkCache.fresh)
        self.per_key = 0
        self.per_token_key = 0
        self.state_sizes = (0, 0)  # element sizes of the keys and values the layer makes (and its relay seeds)
        self.kv_sizes = (0, 0)  # element sizes of the keys and values the cache stores (and their gradients)
        self.attention_size = 0  # element size attention computes in

    @property
    def per_token(self) -> int:
        return sum(t.bytes for t in self.saved.values()) + self.alive

    def keep(self, tensor: _Sym) -> None:
        self.saved[id(tensor)] = tensor

    def cast(self, x: _Sym, size: int | None) -> _Sym:
        """`x.to(dtype)`: a new tensor unless it already has that size."""
        return x if size is None or x.size == size else _Sym(x.width, size, x.grad)

    def linear(self, x: _Sym, width: int, name: str) -> _Sym:
        """`nn.Linear` (wrapped by peft when `name` is a LoRA target); saves its input for the weight's gradient."""
        t = self.training
        autocast = t.autocast_bytes
        trained = not t.lora
        base_input = self.cast(x, autocast)  # autocast casts the input on every call: copies are not shared
        if trained:
            self.keep(base_input)
        if t.lora and name in t.lora_targets:
            # peft casts the input to the adapter's dtype, then autocast to its own: lora_A saves the result.
            adapter_input = self.cast(self.cast(x, t.param_bytes), autocast)
            self.keep(adapter_input)
            self.keep(_Sym(t.lora_r, autocast or t.param_bytes, True))  # lora_A's output, saved by lora_B
            trained = True
        weight_size = t.param_bytes if not t.lora else t.frozen_bytes
        return _Sym(width, autocast or max(x.size, weight_size), x.grad or trained)

    def rms_norm(self, x: _Sym, rows: int = 1) -> _Sym:
        """transformers' RMSNorm: float32 `x * rsqrt(mean(x²))` cast back, times the weight.

        `rows` rsqrt values per token (one per head for q/k norms).
        """
        trained = not self.training.lora
        if x.grad:
            self.keep(self.cast(x, 4))  # the float32 input, saved by pow() and the multiplication
            self.keep(_Sym(rows, 4, True))  # rsqrt(mean + eps)
        if trained:
            self.keep(_Sym(x.width, x.size, True))  # the normalised input, saved for the weight's gradient
        weight_size = self.training.param_bytes if trained else self.training.frozen_bytes
        return _Sym(x.width, max(x.size, weight_size), x.grad or trained)

    def rotary(self, x: _Sym) -> _Sym:
        # q·cos + rotate_half(q)·sin: saves cos/sin only (shared by all layers); cos has the hidden dtype.
        return _Sym(x.width, max(x.size, self.training.hidden_bytes), x.grad)

    def unary(self, x: _Sym) -> _Sym:
        """SiLU / GELU: saves the input."""
        if x.grad:
            self.keep(x)
        return _Sym(x.width, x.size, x.grad)

    def mul(self, a: _Sym, b: _Sym) -> _Sym:
        if b.grad:
            self.keep(a)
        if a.grad:
            self.keep(b)
        return _Sym(a.width, max(a.size, b.size), a.grad or b.grad)

    def stored_size(self, x: _Sym) -> int:
        """The element size `ChunkCache` keeps keys/values (and their gradients) in: the autocast dtype where narrower."""
        autocast = self.training.autocast_bytes
        return min(x.size, autocast) if autocast else x.size

    def attention(self, q: _Sym, k: _Sym, v: _Sym, kind: str) -> _Sym:
        """Attention of the chunk's queries over its keys; `kind` is the code path (see `attention_kinds`)."""
        s = self.shape
        autocast = self.training.autocast_bytes
        self.state_sizes = (k.size, v.size)
        self.kv_sizes = (self.stored_size(k), self.stored_size(v))
        if kind in ("sdpa", "cached", "masked"):  # transformers' SDPA
            size = autocast or max(q.size, k.size, v.size)
            self.attention_size = size
            if kind == "sdpa":  # the whole sequence, no mask: grouped heads, q/k/v cast by autocast
                for t in (q, k, v):
                    self.keep(self.cast(t, autocast))
            else:  # over the cache's views of K/V (the fresh ones stay alive in the cache for the relay)
                self.keep(self.cast(q, size))
                self.alive += k.bytes + v.bytes
                if kind == "masked":  # a boolean mask: repeat_kv copies of the keys and values, a float mask
                    self.per_key += 2 * s.heads * s.head_dim * size
                    self.per_token_key += size
            out = _Sym(q.width, size, True)
            self.keep(out)
            self.keep(_Sym(s.heads, 4, True))  # log-sum-exp per head
            return out
        # chunkwise.attention.chunk: computes in the autocast dtype, else the widest of q/k/v, with autocast off
        size = self.attention_size = autocast or max(q.size, k.size, v.size)
        self.alive += k.bytes + v.bytes  # the fresh keys/values, held by the cache for the relay
        if kind == "offloaded":  # the chunk's own K/V, rounded to the cache's dtype, then to `size`: saved
            for fresh, stored in zip((k, v), self.kv_sizes):
                own = self.cast(self.cast(fresh, stored), size)
                if own is not fresh:
                    self.keep(own)
        else:  # the cache's views of the past: `.to(size)` copies the whole past where the cache's dtype differs
            self.per_key += sum(s.kv_heads * s.head_dim * size for stored in self.kv_sizes if stored != size)
        if kind == "blocked":  # no fused kernel: scaled queries and a float32 (or wider) output accumulator
            self.keep(_Sym(q.width, size, True))
            self.keep(_Sym(q.width, max(size, 4), True))
        else:  # "split", "offloaded": the fused kernels' query and merged output
            self.keep(self.cast(q, size))
            self.keep(_Sym(q.width, size, True))
        self.keep(_Sym(s.heads, 4, True))  # log-sum-exp per head
        return _Sym(q.width, size, True)  # a [B, c, H, D] copy for o_proj, saved only if o_proj trains

    def decoder_layer(self, kind: str, input_grad: bool) -> int:
        """Trace a Llama-family layer; returns the bytes per token saved up to and including attention."""
        s = self.shape
        x = _Sym(s.hidden, self.training.hidden_bytes, input_grad)
        normed = self.rms_norm(x)
        q = self.linear(normed, s.heads * s.head_dim, "q_proj")
        k = self.linear(normed, s.kv_heads * s.head_dim, "k_proj")
        v = self.linear(normed, s.kv_heads * s.head_dim, "v_proj")
        if s.qk_norm:
            q, k = self.rms_norm(q, rows=s.heads), self.rms_norm(k, rows=s.kv_heads)
        attended = self.attention(self.rotary(q), self.rotary(k), v, kind)
        up_to_attention = self.per_token
        x = self._add(x, self.linear(attended, s.hidden, "o_proj"))
        normed = self.rms_norm(x)
        gate = self.unary(self.linear(normed, s.intermediate, "gate_proj"))
        product = self.mul(gate, self.linear(normed, s.intermediate, "up_proj"))
        self._add(x, self.linear(product, s.hidden, "down_proj"))
        return up_to_attention

    def head_input(self) -> None:
        """The final norm and the LM head's input (the logits themselves are `logits_loss`)."""
        s = self.shape
        self.linear(self.rms_norm(_Sym(s.hidden, self.training.hidden_bytes, True)), s.vocab, "lm_head")
        self.keep(_Sym(2 * s.head_dim, self.training.hidden_bytes, False))  # RoPE's cos and sin, shared by all layers

    @staticmethod
    def _add(a: _Sym, b: _Sym) -> _Sym:
        return _Sym(a.width, max(a.size, b.size), a.grad or b.grad)


@dataclass(frozen=True)
class LayerCost:
    """Bytes per token one decoder layer keeps for backward (per key: sized by the past; see `_LayerTrace`).

    Attributes:
        state_sizes: element sizes of the keys and values the layer makes (the relay's dtype).
        kv_sizes: element sizes the cache stores them and their gradients in (the autocast dtype where narrower).
        attention_size: element size attention computes in.
    """

    per_token: int
    per_key: int
    per_token_key: int
    up_to_attention: int
    state_sizes: tuple[int, int]
    kv_sizes: tuple[int, int]
    attention_size: int

    @classmethod
    def trace(cls, shape, training, kind: str, *, input_grad: bool = True) -> LayerCost:
        trace = _LayerTrace(shape, training)
        up_to_attention = trace.decoder_layer(kind, input_grad)
        return cls(trace.per_token, trace.per_key, trace.per_token_key, up_to_attention, trace.state_sizes, trace.kv_sizes,
                   trace.attention_size)


def head_input_bytes(shape, training) -> int:
    """Bytes per token the final norm and the LM head keep, plus RoPE's tables."""
    trace = _LayerTrace(shape, training)
    trace.head_input()
    return trace.per_token
