"""The algorithm: SeCO and SpaCO (DESIGN.md §2). Read top to bottom: stage 1, stage 2, the engines.

Stage 1 (`forward_checkpoints`) runs chunks 0..k-2 without autograd through the transformer body
only (no LM head), storing each chunk's KV in its slot of the `ChunkCache` buffers (no graph). The last
chunk's KV is never read by anyone, so it is not run here.

Stage 2 (`backward_chunk`) visits chunks from last to first, rebuilds chunk j's graph on top of the
stored KV of chunks < j, and backpropagates its loss together with its fresh KV, seeded with the
gradient later chunks sent to its stored KV (`cache.relay(j)`) — one `torch.autograd.backward` call.
Parameter gradients accumulate in `.grad`; gradients for earlier chunks' KV accumulate in the cache's
gradient buffers.

SeCO visits every chunk (exact gradient). SpaCO asks its policy, at each chunk of stage 2, whether to visit
it and by what factor to scale its loss and relay (a `StepPlan`, see `chunkwise.core.sampling`): `uniform`
and `bernoulli` drew their answer before stage 1, `adaptive` decides there, from the chunk's targets and
the relay it received.

Packed rows (`position_ids` restarting at 0, `chunkwise.core.documents`): each document attends to itself only.
A chunk reads the past from the first key any of its queries may read (`ChunkedBatch.first_key`), so earlier
chunks are neither computed on nor relayed into; stage 1 skips a chunk whose KV no later chunk reads, and stage 2
one with no target that no later chunk read (its relay is None).

What a chunk backpropagates is the objective's business (`chunkwise.core.objectives`): next-token cross-entropy by
default; a sequence-level objective (DPO, ...) also has stage 1 run the LM head on every chunk to
collect its per-sequence statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from chunkwise.attention.chunk import ATTENTION_CHOICES, chunk_attention
from chunkwise.core.batch import ChunkedBatch, check_chunk_size, chunk_batch
from chunkwise.core.cache import ChunkCache
from chunkwise.core.documents import check_mask_support
from chunkwise.core.gradient_guard import check_gradient_moved, starts_at_zero, trainable_gradients
from chunkwise.core.handle import CausalLMHandle, inspect_causal_lm
from chunkwise.core.objectives import BoundCrossEntropy, BoundObjective, CrossEntropy, Objective, Policy
from chunkwise.core.quantized import KBIT_CHECKPOINTING_FIX, is_quantized, trainable_quantized_layers
from chunkwise.core.sampling import ChunkSampler, FixedPlan, StageTwoState, StepPlan, make_sampler, select_all
from chunkwise.core.sync import GradientSync, gradient_sync


@dataclass(frozen=True)
class ChunkwiseOutput:
    """What one `backward` call reports.

    Attributes:
        loss: detached scalar, the batch's loss: for cross-entropy the token loss summed over all chunks
            and divided by the number of valid targets (or by `num_items`); for another objective, its
            value. For SpaCO too it covers every chunk, not only the backpropagated ones.
        num_targets: valid (non -100) target tokens in the batch.
        num_chunks: chunks the sequence was cut into.
        selected: indices of the chunks whose gradient was backpropagated (all of them for SeCO).
        compensation: factor applied to the selected chunks' losses and KV-gradient relays (with per-chunk
            factors, `adaptive`: the largest; 1.0 if none was selected).
        metrics: the objective's statistics for logs (e.g. DPO's reward margin); empty for cross-entropy.
        factors: each selected chunk's factor, in the order of `selected`.
    """

    loss: torch.Tensor
    num_targets: int
    num_chunks: int
    selected: tuple[int, ...]
    compensation: float
    metrics: dict = field(default_factory=dict)
    factors: tuple[float, ...] = ()


# ----- random state: stage 2 must redraw the dropout masks stage 1 drew -----------------------------


def _rng_devices(model: torch.nn.Module) -> list[torch.device]:
    return sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str)


def _capture_rng(devices: list[torch.device]) -> tuple:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _restore_rng(state: tuple, devices: list[torch.device]) -> None:
    cpu_state, device_states = state
    torch.set_rng_state(cpu_state)
    for device, device_state in zip(devices, device_states):
        torch.cuda.set_rng_state(device_state, device)


# ----- the two stages --------------------------------------------------------------------------------


def _prepare(cache: ChunkCache, batch: ChunkedBatch, chunk: int, *, record: bool) -> None:
    """Set the cache up for `chunk`: its past is the chunks before it, from the first key its queries may read."""
    cache.prepare(num_past=chunk, record=record, first=batch.first_key(chunk))


def _chunk_inputs(batch: ChunkedBatch, chunk: int, handle: CausalLMHandle, cache: ChunkCache) -> dict:
    """Keyword arguments of the model call for one chunk: its tokens, positions (s..e-1 or the caller's), its mask:
    the padding mask [0, e), or for a packed row the per-document mask over keys [first, e)."""
    start, end = batch.bounds[chunk]
    if batch.position_ids is None:
        position_ids = torch.arange(start, end, device=batch.targets.device).unsqueeze(0)
    else:
        position_ids = batch.position_ids[..., start:end]
    if batch.documents is not None:
        mask = batch.documents.model_mask(handle.decoder.config, start, end, batch.first_key(chunk))
    else:
        mask = None if batch.attention_mask is None else batch.attention_mask[:, :end]
    tokens = (
        {"input_ids": batch.input_ids[:, start:end]}
        if batch.inputs_embeds is None
        else {"inputs_embeds": batch.inputs_embeds[:, start:end]}
    )
    return {
        **tokens,
        "position_ids": position_ids,
        "attention_mask": mask,
        handle.cache_kwarg: cache,
        "use_cache": True,
    }


@torch.no_grad()
def forward_checkpoints(
    handle: CausalLMHandle, batch: ChunkedBatch, cache: ChunkCache, *, report_only: set[int], devices: list,
    objective: BoundObjective | None = None, sync: GradientSync | None = None,
) -> tuple[list, dict[int, torch.Tensor]]:
    """Stage 1: store every chunk's KV checkpoint, keeping no activations.

    Args:
        report_only: chunks that stage 2 will not visit but whose loss is reported; they run with the
            LM head (the last chunk too, if it is among them).
        objective: the batch's objective (default: cross-entropy); if it needs every chunk's logits
            (sequence-level losses), all chunks run with the LM head, the last one included, and it observes them.
        sync: says which module runs a chunk (see `chunkwise.core.sync`); default: the model itself, one process.
    Returns:
        The RNG state before each chunk (for stage 2 to redraw the same dropout masks), and the loss
        of each chunk in `report_only`.
    """
    objective = BoundCrossEntropy(batch) if objective is None else objective
    sync = sync or GradientSync(handle)
    rng_states, reported = [], {}
    last = batch.num_chunks - 1
    for chunk in range(batch.num_chunks):
        head = chunk in report_only or objective.needs_stage_1_logits
        rng_states.append(_capture_rng(devices))
        if not head and not batch.kv_is_read(chunk) and (chunk == last or not sync.lockstep):
            # No later chunk reads this chunk's KV (the last chunk; in a packed row, one whose documents all end
            # in it): stage 1 has nothing to store. (Under ZeRO-3 every rank runs the same chunks: other ranks'
            # rows may need theirs.)
            cache.commit(batch.bounds[chunk][1] - batch.bounds[chunk][0])
            continue
        _prepare(cache, batch, chunk, record=True)
        inputs = _chunk_inputs(batch, chunk, handle, cache)
        if head:
            logits = sync.lm(reduce=False)(**inputs).logits
            if objective.needs_stage_1_logits:
                objective.observe(chunk, logits)
            if chunk in report_only:
                reported[chunk] = objective.chunk_loss(chunk, logits)
        else:
            sync.body(inputs)  # the transformer body only: its KV is all stage 2 needs
        cache.commit(batch.bounds[chunk][1] - batch.bounds[chunk][0])
    objective.finish_stage_1()
    return rng_states, reported


def backward_chunk(
    handle: CausalLMHandle,
    batch: ChunkedBatch,
    cache: ChunkCache,
    chunk: int,
    *,
    factor: float,
    sync: GradientSync,
    reduce: bool = False,
    objective: BoundObjective | None = None,
) -> torch.Tensor | None:
    """Stage 2 for one chunk: rebuild its graph on the stored past and backpropagate loss + KV relay.

    The caller restores the RNG state stage 1 saw before this chunk. Returns the chunk's (unscaled)
    loss, or None if the chunk had no target.

    Args:
        factor: SpaCO compensation applied to the loss and the relay (1 for SeCO).
        sync: says which module runs the chunk and how its backward reduces (see `chunkwise.core.sync`).
        reduce: this is the step's last backward, which reduces the gradients every chunk accumulated
            across ranks. It always backpropagates, LM head included, so every parameter takes part.
        objective: gives the scalar the chunk backpropagates, from its logits (default: cross-entropy).
    """
    objective = BoundCrossEntropy(batch) if objective is None else objective
    is_last = chunk == batch.num_chunks - 1
    relay_in = [] if is_last else cache.relay(chunk)
    has_relay = any(g is not None for g in relay_in)
    if not batch.chunk_has_targets[chunk] and not has_relay and not reduce and not sync.lockstep:
        return None  # nothing flows through this chunk: no target, and no later chunk read its KV

    _prepare(cache, batch, chunk, record=False)
    inputs = _chunk_inputs(batch, chunk, handle, cache)
    with torch.enable_grad():
        loss = None
        outputs, seeds = [], []
        if batch.chunk_has_targets[chunk] or reduce:
            loss = objective.chunk_loss(chunk, sync.lm(reduce=reduce)(**inputs).logits)
            outputs.append(loss)
            seeds.append(torch.full_like(loss, factor))
        else:  # no target here: only the KV relay, so skip the LM head
            anchor = sync.body(inputs)
            if anchor is not None:  # see GradientSync.body
                outputs.append(anchor)
                seeds.append(torch.zeros_like(anchor))
        for fresh, grad in zip(cache.fresh_kv(), relay_in):
            # A fresh KV without grad_fn has nothing trainable upstream (e.g. k_proj of the first layer
            # under LoRA on q/v only): its relay would reach no parameter, so it is left out.
            if grad is not None and fresh.requires_grad:
                outputs.append(fresh)
                seeds.append(grad if factor == 1.0 else grad * factor)
        if outputs:
            sync.backward(outputs, seeds, reduce=reduce)
    cache.free(chunk)
    return None if loss is None else loss.detach()


@torch.no_grad()
def score_chunk(handle: CausalLMHandle, batch: ChunkedBatch, cache: ChunkCache, chunk: int, *, sync: GradientSync,
                objective: BoundObjective) -> torch.Tensor:
    """The loss of a chunk that stage 2 skips and stage 1 did not run with the head: a forward on its past."""
    _prepare(cache, batch, chunk, record=False)
    return objective.chunk_loss(chunk, sync.lm(reduce=False)(**_chunk_inputs(batch, chunk, handle, cache)).logits)


# ----- the engines ------------------------------------------------------------------------------------


class SeCO:
    """Sequential Chunk-wise Optimization: exact gradients with one chunk's activation memory.

    Example:
        engine = SeCO(model, chunk_size=128)
        out = engine.backward(input_ids, labels=labels, attention_mask=mask)   # fills .grad
        optimizer.step(); optimizer.zero_grad()

    Args:
        model: a Hugging Face causal LM, or a PEFT model wrapping one.
        chunk_size: tokens per chunk (the last chunk may be shorter).
        attention: "chunkwise" (default): a model using SDPA attention runs `chunkwise.attention.chunk` during
            the step, which keeps neither repeated KV heads nor a mask for backward (less memory per
            token, see docs/benchmarks.md); layers it does not cover (padding, sliding windows, ...)
            keep SDPA. "model": always the model's own attention.
        offload_kv: keep the KV cache and its gradient in host memory; attention streams the past to
            the device a block at a time, so device memory stops growing with the length (only
            layers that fall back to SDPA move their whole past). Gradients are the same. Needs
            attention="chunkwise" and a model loaded with SDPA attention.

    Several processes: pass the wrapper — `DistributedDataParallel`, a DeepSpeed engine (ZeRO 1/2/3) or a
    model sharded with FSDP2's `fully_shard` — and gradients are reduced once per optimizer step, whatever
    the number of chunks (see `chunkwise.core.sync` for each wrapper's gradient-accumulation signal).
    """

    def __init__(self, model: torch.nn.Module, *, chunk_size: int, attention: str = "chunkwise", offload_kv: bool = False):
        if attention not in ATTENTION_CHOICES:
            raise ValueError(f"attention must be one of {', '.join(map(repr, ATTENTION_CHOICES))}; got {attention!r}")
        self.chunk_size = check_chunk_size(chunk_size)
        self.model = model
        self.attention = attention
        self.offload_kv = offload_kv
        self.handle = inspect_causal_lm(model)
        self.sync = gradient_sync(model, self.handle)  # how chunks are called and gradients reduced across ranks
        implementation = getattr(self.handle.decoder.config, "_attn_implementation", None)
        if offload_kv and (attention != "chunkwise" or implementation != "sdpa"):
            raise ValueError(
                f"offload_kv=True streams the host-resident past through chunkwise's attention, which needs "
                f"attention='chunkwise' (got {attention!r}) and a model using SDPA attention (this one uses "
                f"{implementation!r}; load it with attn_implementation='sdpa')."
            )

    def backward(
        self, input_ids=None, *, inputs_embeds=None, labels=None, attention_mask=None, position_ids=None, num_items=None,
        objective: Objective | None = None,
    ) -> ChunkwiseOutput:
        """Accumulate the gradient of the batch's loss into the trainable parameters' `.grad`.

        The loss is the mean token cross-entropy, or `objective`'s (DPO, GRPO, ...: `chunkwise.objectives`).

        Gradients add up across calls, like `loss.backward()`, so gradient accumulation just works.

        Args:
            input_ids: `[B, T]` token ids.
            inputs_embeds: `[B, T, H]` input embeddings instead of `input_ids` (soft prompts, a vision
                tower's output, ...); their gradient flows back into whatever produced them.
                `labels` are then required.
            labels: `[B, T]` labels aligned with `input_ids` (shifted inside, once over the whole
                sequence); -100 is ignored. Default: `input_ids`, with padded positions ignored.
            attention_mask: `[B, T]`, 1 for tokens and 0 for right padding.
            position_ids: `[B, T]` integer positions, for packed rows (`DataCollatorWithFlattening`, TRL's
                padding-free packing): where a position does not continue the previous one by +1 (it must then
                be 0) a new document begins; each document attends only to itself (a sliding window too), and
                its last token predicts nothing. M-RoPE models (Qwen2-VL, Qwen2.5-VL): `[3, B, T]` (documents
                found from the temporal row, which is the text position on text tokens) or transformers' packed
                `[4, B, T]` (text positions first: documents found from them); passed to the model as given. Default: `0..T-1` in every row. Packed rows need a model using 'sdpa' or
                'eager' attention.
            num_items: divide the summed token loss by this instead of the batch's valid-target count
                (what `transformers.Trainer` passes as `num_items_in_batch` for gradient accumulation).
                With an objective: its normaliser in the objective's unit (tokens, sequences, pairs).
            objective: what to train on (default `CrossEntropy()`); checked against the batch before
                any model call.
        """
        batch = self._chunk(input_ids, inputs_embeds, labels, attention_mask, num_items, position_ids)
        bound = self._bind(objective, batch, num_items)
        return self._run(batch, FixedPlan(select_all(batch.num_chunks)), bound, inputs_embeds)

    def _bind(self, objective: Objective | None, batch: ChunkedBatch, num_items) -> BoundObjective:
        objective = CrossEntropy() if objective is None else objective
        if not isinstance(objective, Objective):
            raise TypeError(f"objective must be a chunkwise.objectives.Objective (CrossEntropy, DPO, GRPO, ...), got {type(objective).__name__}")
        if batch.documents is not None and not isinstance(objective, CrossEntropy):
            # Sequence and token objectives score rows (per-row statistics, normalisations, reference passes that
            # know nothing of documents): a packed row would silently be scored as one sequence.
            raise ValueError(f"packed rows (position_ids restarting at 0) train with CrossEntropy; {type(objective).__name__} "
                             "scores whole rows: give it one sequence per row")
        return objective.bind(batch, num_items=num_items, policy=Policy(self.model, self.handle, self.chunk_size))

    def _chunk(self, input_ids, inputs_embeds, labels, attention_mask, num_items, position_ids=None) -> ChunkedBatch:
        if not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError("the model has no trainable parameters (every requires_grad is False); nothing to train")
        if any(getattr(module, "gradient_checkpointing", False) for module in self.handle.lm.modules()):
            # transformers drops the KV cache inside checkpointed layers, which would cut every chunk off
            # from its past: a silently wrong gradient.
            kbit = f" (peft's prepare_model_for_kbit_training turns it on: call {KBIT_CHECKPOINTING_FIX})" if is_quantized(self.handle.lm) else ""
            raise ValueError(
                "gradient checkpointing is enabled on the model; chunk-wise training already keeps only one "
                "chunk's activations and needs the KV cache that checkpointing disables. Call "
                "model.activation_checkpointing_disable(), or drop gradient_checkpointing=True from the training "
                f"arguments{kbit}."
            )
        device = self.handle.lm.get_input_embeddings().weight.device
        config = self.handle.decoder.config
        batch = chunk_batch(
            input_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            attention_mask=attention_mask,
            num_items=num_items,
            position_ids=position_ids,
            chunk_size=self.chunk_size,
            vocab_size=self.handle.vocab_size,
            hidden_size=self.handle.hidden_size,
            device=device,
            max_positions=getattr(config, "max_position_embeddings", None),
        )
        if batch.documents is not None:  # the engine builds the per-document masks: in a format the model reads
            check_mask_support(getattr(config, "_attn_implementation", None))
        return batch

    def _run(self, batch: ChunkedBatch, plan: StepPlan, objective: BoundObjective, inputs_embeds=None, *, full_loss: bool = True) -> ChunkwiseOutput:
        self.sync.check_lockstep(batch.num_chunks)
        if batch.num_targets == 0 and not self.sync.reduces() and not self.sync.lockstep:
            # Nothing to predict: loss 0 and gradients untouched (not NaN from 0/0). When this call ends
            # a distributed step it still runs, adding zero, so that this rank joins the reduction (and under
            # ZeRO-3 always: the other ranks' chunks gather parameters with this one).
            zero = torch.zeros((), device=batch.targets.device)
            compensation = plan.selection.compensation if isinstance(plan, FixedPlan) else 1.0
            return ChunkwiseOutput(zero, 0, batch.num_chunks, (), compensation)
        # Stage 1 and stage 2's first layers run on inputs without grad: a quantized base must not take its
        # inference-only path there (see chunkwise.core.quantized).
        with chunk_attention(self.handle.decoder.config, enabled=self.attention == "chunkwise"), trainable_quantized_layers(self.handle.lm):
            return self._stages(batch, plan, objective, inputs_embeds, full_loss=full_loss)

    def _stages(self, batch: ChunkedBatch, plan: StepPlan, objective: BoundObjective, inputs_embeds, *, full_loss: bool) -> ChunkwiseOutput:
        device = batch.targets.device

        devices = _rng_devices(self.handle.lm)
        cache = ChunkCache(total_length=batch.targets.shape[1], offload=self.offload_kv)
        # Chunks stage 2 may skip still get their loss from stage 1 (with the LM head), unless the caller
        # settles for SpaCO's estimate of the loss (full_loss=False), which needs no extra work. A policy
        # deciding in stage 2 may skip any chunk: stage 1 then runs the head on every chunk with targets but
        # the last (which stage 1 does not run at all; stage 2 scores it if it drops it).
        # An objective whose loss is not a sum over chunks knows it exactly after stage 1.
        # (Under ZeRO-3 also those without targets: all ranks must run the same chunks.)
        report = full_loss and objective.loss_is_chunk_sum
        last = batch.num_chunks - 1
        skippable = {c for c in range(batch.num_chunks) if plan.may_skip(c) and (batch.chunk_has_targets[c] or self.sync.lockstep)} if report else set()
        rng_states, losses = forward_checkpoints(self.handle, batch, cache, report_only=skippable - {last} if plan.online else skippable,
                                                 devices=devices, objective=objective, sync=self.sync)
        # The zero-gradient guard: armed before stage 2 (the gradients start at zero), it checks after stage 2
        # if a chunk with targets was backpropagated with a non-zero factor (whatever decided which chunks).
        guard_armed = self._guard_armed(objective)
        factors = self._stage_two(batch, plan, cache, rng_states, losses, objective, score_last=plan.online and last in skippable)
        if inputs_embeds is not None and inputs_embeds.requires_grad and batch.inputs_embeds.grad is not None:
            # Every chunk's gradient is in the leaf now: walk the caller's graph once.
            inputs_embeds.backward(batch.inputs_embeds.grad.to(inputs_embeds.device, inputs_embeds.dtype))
        if guard_armed and any(batch.chunk_has_targets[c] and f != 0.0 for c, f in factors.items()):
            check_gradient_moved(self.model, num_targets=batch.num_targets, method=type(self).__name__)
        if not objective.loss_is_chunk_sum:
            total = objective.value()
        elif full_loss:
            total = torch.stack(list(losses.values())).sum() if losses else torch.zeros((), device=device)
        else:  # the compensated sum over the selected chunks: an estimate of the full loss
            total = _compensated_loss(losses, factors, device)
        selected = tuple(sorted(factors))
        compensation = plan.selection.compensation if isinstance(plan, FixedPlan) else max(factors.values(), default=1.0)
        return ChunkwiseOutput(total, batch.num_targets, batch.num_chunks, selected, compensation, objective.metrics(),
                               tuple(factors[c] for c in selected))

    def _stage_two(self, batch: ChunkedBatch, plan: StepPlan, cache: ChunkCache, rng_states: list, losses: dict,
                   objective: BoundObjective, *, score_last: bool) -> dict[int, float]:
        """Stage 2: from the last chunk to the first, ask the plan and backpropagate the chunks it keeps.

        Fills `losses` with the visited chunks' losses (and the last chunk's, when `score_last` and the plan
        drops it); returns each kept chunk's factor.
        """
        devices = _rng_devices(self.handle.lm)
        # When this call ends a distributed step, its last backward reduces the gradients across ranks
        # (once per step): the plan's final chunk always runs then, zero-weighted if the plan skips it.
        reduces = self.sync.reduces()
        state = StageTwoState(target_counts=_target_counts(batch), relay_norms=lambda: cache.relay_norms(batch.bounds), agree=self.sync.agree)
        factors: dict[int, float] = {}
        # Stage 2 runs on a forked RNG: afterwards the global RNG is where stage 1 left it.
        with torch.random.fork_rng(devices=devices):
            for chunk in reversed(range(batch.num_chunks)):
                factor = plan.decide(chunk, state)
                final = reduces and chunk == plan.final_chunk
                if factor is None and score_last and chunk == batch.num_chunks - 1:
                    losses[chunk] = score_chunk(self.handle, batch, cache, chunk, sync=self.sync, objective=objective)
                if factor is None and not final:
                    continue
                if factor is not None:
                    factors[chunk] = factor
                if chunk < len(rng_states):
                    _restore_rng(rng_states[chunk], devices)
                loss = backward_chunk(self.handle, batch, cache, chunk, factor=factor or 0.0, sync=self.sync, reduce=final, objective=objective)
                if loss is not None:
                    losses[chunk] = loss
                if final:
                    break
        return factors

    def _guard_armed(self, objective: BoundObjective) -> bool:
        """Whether this step's gradient will be checked for being all zero, if stage 2 backpropagates a chunk
        with targets (`chunkwise.core.gradient_guard` says which steps and why): the objective's gradient cannot
        legitimately vanish, `.grad` is where the gradient lands, and it starts at zero."""
        return objective.zero_gradient_is_error and self.sync.gradients_in_grad and starts_at_zero(trainable_gradients(self.model))


def _target_counts(batch: ChunkedBatch) -> tuple[int, ...]:
    """Valid (non -100) targets in each chunk."""
    valid = (batch.targets != -100).sum(0)
    return tuple(int(valid[start:end].sum()) for start, end in batch.bounds)


def _compensated_loss(losses: dict[int, torch.Tensor], factors: dict[int, float], device) -> torch.Tensor:
    """sum_j f_j * loss_j over the visited chunks with a loss: an unbiased estimate of the full loss."""
    picked = sorted(c for c in factors if c in losses)
    if not picked:
        return torch.zeros((), device=device)
    if len({factors[c] for c in picked}) == 1:  # one factor (uniform, bernoulli): summed, then scaled
        return torch.stack([losses[c] for c in picked]).sum() * factors[picked[0]]
    return torch.stack([losses[c] * factors[c] for c in picked]).sum()


class SpaCO(SeCO):
    """Sparse Chunk-wise Optimization: backpropagates `budget` of the k chunks per step.

    Stage 1 is SeCO's; stage 2 visits only the sampled chunks, compensating so the gradient estimate
    stays unbiased (`bernoulli`, exactly) or nearly so (`uniform`, the paper's policy). Backprop cost
    stops growing with sequence length. With budget >= k it is SeCO exactly.

    Args:
        model: a Hugging Face causal LM, or a PEFT model wrapping one.
        chunk_size: tokens per chunk.
        budget: chunks backpropagated per step (on average, for `bernoulli`; at most on average, for
            `adaptive`); required with a policy name.
        sampling: "uniform", "bernoulli", "adaptive" (decides each chunk in stage 2 from its targets and
            relay: exactly unbiased, and a chunk holding the step's targets is kept; docs/spaco.md), or a
            `ChunkSampler` instance (which then owns budget, max_compensation and seed).
        max_compensation: cap on the compensation factor (the paper uses 2.0); None for no cap.
        seed: seed of the sampler's own generator (default 0).
        full_loss: True (default): `out.loss` is the loss over every chunk; stage 1 runs the LM head on the
            chunks stage 2 skips to get it. False: those chunks skip the head (a cheaper stage 1) and
            `out.loss` is the compensated loss of the selected chunks — an unbiased estimate of the full
            loss when the factor is not capped. The gradient is the same either way. (`adaptive` does not
            know in stage 1 which chunks it will skip: with True its stage 1 runs the head on every chunk
            with targets.)
        attention, offload_kv: as for `SeCO`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        chunk_size: int,
        budget: int | None = None,
        sampling: str | ChunkSampler = "uniform",
        max_compensation: float | None = None,
        seed: int | None = None,
        full_loss: bool = True,
        attention: str = "chunkwise",
        offload_kv: bool = False,
    ):
        self.sampler = make_sampler(sampling, budget=budget, max_compensation=max_compensation, seed=seed)
        super().__init__(model, chunk_size=chunk_size, attention=attention, offload_kv=offload_kv)
        self.full_loss = full_loss

    def backward(
        self, input_ids=None, *, inputs_embeds=None, labels=None, attention_mask=None, position_ids=None, num_items=None,
        objective: Objective | None = None,
    ) -> ChunkwiseOutput:
        """Like `SeCO.backward`, with the gradient estimated from the sampled chunks; see `out.selected`.

        With a sequence-level objective stage 1 runs the LM head on every chunk (its loss is exact); the
        sampled chunks' part of the gradient is compensated as for token losses (`chunkwise.objectives`).
        """
        batch = self._chunk(input_ids, inputs_embeds, labels, attention_mask, num_items, position_ids)
        bound = self._bind(objective, batch, num_items)
        return self._run(batch, self.sampler.plan(batch.num_chunks), bound, inputs_embeds, full_loss=self.full_loss)

    def state_dict(self) -> dict:
        """The sampler's state, for checkpoints: restoring it replays the same selections."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
