"""TRL integration: `DPOTrainer` and `GRPOTrainer` trained chunk by chunk (SeCO / SpaCO).

    from trl import DPOConfig
    from chunkwise.hf import ChunkwiseConfig
    from chunkwise.trl_trainers import ChunkwiseDPOTrainer        # = (ChunkwiseDPOMixin, trl.DPOTrainer)

    trainer = ChunkwiseDPOTrainer(model=model, ref_model=ref_model, processing_class=tokenizer,
                                  args=DPOConfig(..., gradient_checkpointing=False),
                                  train_dataset=preferences, chunkwise=ChunkwiseConfig(chunk_size=1024))
    trainer.train()

Everything stays TRL's — data preparation, generation and rewards (GRPO), reference log-probs it
precomputes, logging, the optimizer loop — except the step's backward. TRL computes its loss in
`compute_loss`; the mixins replace that, during training only, by the engine's chunk-wise backward of
the same objective (`chunkwise.objectives.DPO` / `IPO` / `GRPO`), with TRL's normalisation and
gradient-accumulation scaling. The gradient is then already in `.grad`; `compute_loss` returns the
detached loss as a fresh leaf tensor, so the `accelerator.backward` Trainer still calls reaches no
parameter. Evaluation keeps TRL's own `compute_loss`.

The reference is TRL's: precomputed log-probs when `precompute_ref_log_probs=True`, else `ref_model`, else
(PEFT) the policy with its adapter disabled, or its "ref" adapter. GRPO's reference and old log-probs
are still computed by TRL during generation (full-sequence forwards without autograd).

Options whose loss is not implemented chunk-wise are refused when the trainer is built, each naming the
setting. Logged metrics: DPO's rewards and log-probs (`rewards/margins`, ...) as TRL names them; TRL's
per-token statistics that need the whole vocabulary or a full-sequence pass (entropy, logits/*, token
accuracy; GRPO's kl and clip ratios) are not logged during training. `trl` is imported only when
`ChunkwiseDPOTrainer` / `ChunkwiseGRPOTrainer` are used.
"""

from __future__ import annotations

import torch

from chunkwise.core.objectives import DPO, GRPO, IPO
from chunkwise.core.reference import ReferenceModel
from chunkwise.integrations.trainer import ChunkwiseTrainerMixin


class _ChunkwiseLossMixin(ChunkwiseTrainerMixin):
    """Chunk-wise backward inside `compute_loss`, for trainers (TRL's) whose `training_step` does more than
    Trainer's (generation, step counters): their `training_step` and `prediction_step` run unchanged."""

    def training_step(self, *args, **kwargs):
        # Skip ChunkwiseTrainerMixin's step (cross-entropy): the wrapped trainer's own step calls
        # compute_loss, which runs the engine below.
        return super(ChunkwiseTrainerMixin, self).training_step(*args, **kwargs)

    def prediction_step(self, *args, **kwargs):
        return super(ChunkwiseTrainerMixin, self).prediction_step(*args, **kwargs)

    def _check_trainer_setup(self) -> None:
        super()._check_trainer_setup()
        problems = self.chunkwise_unsupported()
        if getattr(self, "is_deepspeed_enabled", False):
            # TRL's training_step hands our detached loss to accelerate's DeepSpeed backward and step, which
            # never see the engine's gradients: the optimizer would not step on them. ChunkwiseTrainer's own
            # step drives DeepSpeed itself; these mixins do not (yet).
            problems.append("DeepSpeed (TrainingArguments.deepspeed): the TRL mixins do not drive DeepSpeed's "
                            "step; train without a DeepSpeed config (one process, or DDP through torchrun / accelerate launch)")
        if problems:
            raise ValueError(f"{type(self).__name__} cannot train these settings chunk-wise:\n- " + "\n- ".join(problems))

    def chunkwise_unsupported(self) -> list[str]:
        """The trainer's settings whose loss is not implemented chunk-wise (each with its fix)."""
        return []

    def chunkwise_step(self, model, inputs: dict, num_items_in_batch) -> tuple[dict, object, float, float]:
        """`(engine.backward keyword arguments, objective, num_items, factor)` for one batch; the loss returned
        to Trainer is `out.loss * factor` (what the wrapped trainer's compute_loss would return)."""
        raise NotImplementedError

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or not (model.training and torch.is_grad_enabled()):
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        batch, objective, num_items, factor = self.chunkwise_step(model, inputs, num_items_in_batch)
        engine = self.chunkwise_engine(model)
        # accelerate's mixed-precision patch covers model.forward only; stage 1 calls the decoder directly.
        with self.accelerator.autocast():
            out = engine.backward(**batch, objective=objective, num_items=num_items)
        self.chunkwise_output = out
        metrics = getattr(self, "_metrics", None)
        if metrics is not None:  # TRL averages these over the logging interval
            for key, value in out.metrics.items():
                metrics["train"][key].append(value)
        # The gradient is in .grad already; Trainer's accelerator.backward on this leaf reaches no parameter.
        return (out.loss * factor).detach().to(self.args.device).requires_grad_(True)


# ----- DPO ------------------------------------------------------------------------------------------


DPO_LOSSES = {"sigmoid": DPO, "ipo": IPO}


class ChunkwiseDPOMixin(_ChunkwiseLossMixin):
    """Chunk-wise training for `trl.DPOTrainer`: `class MyTrainer(ChunkwiseDPOMixin, DPOTrainer)`.

    Supports `loss_type` "sigmoid" (DPO) or "ipo" (one of them, any loss weight), with TRL's reference
    handling. Batches are TRL's: chosen rows then rejected rows, right-padded, with a completion mask.
    """

    def chunkwise_unsupported(self) -> list[str]:
        problems = []
        if len(self.loss_types) != 1 or self.loss_types[0] not in DPO_LOSSES:
            problems.append(f"loss_type={self.loss_types}: chunk-wise DPO implements one of {sorted(DPO_LOSSES)}")
        elif not self.loss_weights[0] > 0:
            problems.append(f"loss_weights={self.loss_weights}: the loss weight must be positive")
        if self.f_divergence_type != "reverse_kl":
            problems.append(f"f_divergence_type={self.f_divergence_type!r}: only 'reverse_kl' (standard DPO) is implemented")
        if self.ld_alpha is not None:
            problems.append("ld_alpha (LD-DPO length weighting) is not implemented chunk-wise; set ld_alpha=None")
        if self.use_weighting:
            problems.append("use_weighting (WPO) needs per-token probabilities of the whole vocabulary; set use_weighting=False")
        if self.aux_loss_enabled:
            problems.append("the MoE router auxiliary loss is not computed chunk-wise; set router_aux_loss_coef=0")
        if getattr(self.args, "padding_free", False):
            problems.append("padding_free=True packs rows into one; chunkwise needs right-padded rows")
        return problems

    def chunkwise_reference(self):
        """TRL's reference: precomputed (None here: taken from the batch), `ref_model`, or the PEFT base."""
        if self.ref_model is not None:
            return self.accelerator.unwrap_model(self.ref_model)
        policy = self.accelerator.unwrap_model(self.model)
        adapter = "ref" if "ref" in getattr(policy, "peft_config", {}) else None
        from trl.trainer.utils import use_adapter

        return ReferenceModel(policy, context=lambda: use_adapter(policy, adapter_name=adapter))

    def chunkwise_step(self, model, inputs, num_items_in_batch):
        unknown = sorted(set(inputs) - {"input_ids", "attention_mask", "completion_mask", "ref_chosen_logps", "ref_rejected_logps"})
        if unknown:
            raise ValueError(f"chunk-wise DPO got batch keys it cannot use: {unknown} (vision inputs are not supported)")
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "labels": labels}
        if self.precompute_ref_logps:
            reference = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
        else:
            reference = self.chunkwise_reference()
        objective = DPO_LOSSES[self.loss_types[0]](beta=self.beta, reference=reference)
        # TRL: loss = weight x mean over pairs; Trainer divides it by the accumulation steps.
        steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        num_items = labels.shape[0] // 2 * steps / self.loss_weights[0]
        return batch, objective, num_items, float(steps)


# ----- GRPO -----------------------------------------------------------------------------------------


GRPO_NORMALIZATION = {"grpo": "sequence", "bnpo": "token", "dr_grpo": "fixed", "dapo": "token"}


def right_padded(inputs: dict) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """TRL GRPO's left-padded prompts + completions as right-padded rows for the engine.

    Row b becomes its real prompt tokens, then its completion tokens up to the end of its completion mask,
    then padding. Positions shift by the row's prompt padding, which rotary position embeddings do not see
    (attention depends on relative positions only).

    Returns:
        `{"input_ids", "attention_mask", "labels"}` `[B, T]`; `positions` `[B, C]`, where completion token c
        of row b now sits (for moving per-completion-token tensors); `keep` `[B, C]`, the completion tokens
        kept (completion mask 1).
    """
    prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    trained = completion_mask * inputs["tool_mask"] if "tool_mask" in inputs else completion_mask
    if (completion_mask[:, 1:] > completion_mask[:, :-1]).any():
        raise ValueError("a GRPO completion mask has a hole (1 after 0); chunk-wise GRPO needs each completion's tokens first")
    prompt_lengths, completion_lengths = prompt_mask.sum(1), completion_mask.sum(1)
    rows, width = prompt_ids.shape[0], int((prompt_lengths + completion_lengths).max())
    pad = int(prompt_ids[prompt_mask == 0][0]) if (prompt_mask == 0).any() else 0
    input_ids = torch.full((rows, width), pad, dtype=prompt_ids.dtype, device=prompt_ids.device)
    attention_mask = torch.zeros((rows, width), dtype=torch.long, device=prompt_ids.device)
    labels = torch.full((rows, width), -100, dtype=torch.long, device=prompt_ids.device)
    keep = completion_mask.bool()
    positions = prompt_lengths.unsqueeze(1) + torch.arange(completion_ids.shape[1], device=prompt_ids.device)
    row_index = torch.arange(rows, device=prompt_ids.device).unsqueeze(1).expand_as(positions)
    for row in range(rows):  # prompts: their real tokens are the last prompt_lengths[row] of the row
        length = int(prompt_lengths[row])
        input_ids[row, :length] = prompt_ids[row, prompt_ids.shape[1] - length :]
        attention_mask[row, :length] = 1
    input_ids[row_index[keep], positions[keep]] = completion_ids[keep]
    attention_mask[row_index[keep], positions[keep]] = 1
    labels[row_index[keep], positions[keep]] = torch.where(trained.bool(), completion_ids, -100)[keep]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}, positions, keep


def _place(values: torch.Tensor, shape, positions: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per-completion-token values `[B, C]` moved into `[B, T]` rows (0 elsewhere)."""
    placed = torch.zeros(shape, dtype=values.dtype, device=values.device)
    rows = torch.arange(shape[0], device=values.device).unsqueeze(1).expand_as(positions)
    placed[rows[keep], positions[keep]] = values[keep]
    return placed


class ChunkwiseGRPOMixin(_ChunkwiseLossMixin):
    """Chunk-wise training for `trl.GRPOTrainer`: `class MyTrainer(ChunkwiseGRPOMixin, GRPOTrainer)`.

    Generation, rewards and advantages stay TRL's; the policy-gradient backward of each generated batch
    is chunk-wise. Supports `loss_type` grpo, bnpo, dr_grpo and dapo, token-level importance sampling, the
    KL term (beta > 0, with or without use_bias_correction_kl) and two-sided clipping (delta).
    """

    def chunkwise_unsupported(self) -> list[str]:
        args, problems = self.args, []
        if self.loss_type not in GRPO_NORMALIZATION:
            problems.append(f"loss_type={self.loss_type!r}: chunk-wise GRPO implements {sorted(GRPO_NORMALIZATION)}")
        if self.importance_sampling_level != "token":
            problems.append("importance_sampling_level='sequence' (GSPO) is a sequence-level ratio; use 'token'")
        if self.top_entropy_quantile < 1.0:
            problems.append("top_entropy_quantile < 1 needs each token's entropy over the whole batch first; set it to 1.0")
        if self.off_policy_mask_threshold is not None:
            problems.append("off_policy_mask_threshold (sequence-level masking) is not implemented chunk-wise")
        if self._entropy_bonus_enabled:
            problems.append("the entropy bonus (entropy_coef, use_adaptive_entropy) is not implemented chunk-wise")
        if args.use_vllm and args.vllm_importance_sampling_correction:
            problems.append("vllm_importance_sampling_correction is not implemented chunk-wise; set it to False")
        if self.aux_loss_enabled:
            problems.append("the MoE router auxiliary loss is not computed chunk-wise; set router_aux_loss_coef=0")
        return problems

    def chunkwise_step(self, model, inputs, num_items_in_batch):
        known = {"prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages", "num_items_in_batch",
                 "old_per_token_logps", "ref_per_token_logps", "tool_mask", "sampling_per_token_logps"}
        unknown = sorted(key for key, value in inputs.items() if key not in known and value is not None)
        if unknown:
            raise ValueError(f"chunk-wise GRPO got batch keys it cannot use: {unknown} (multimodal inputs are not supported)")
        batch, positions, keep = right_padded(inputs)
        shape = batch["input_ids"].shape
        advantages = inputs["advantages"]
        if advantages.dim() == 2:
            advantages = _place(advantages, shape, positions, keep)
        old = inputs.get("old_per_token_logps")
        reference = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None
        normalization = GRPO_NORMALIZATION[self.loss_type]
        objective = GRPO(
            advantages=advantages,
            old_logps=None if old is None else _place(old, shape, positions, keep),
            reference=None if reference is None else _place(reference, shape, positions, keep),
            beta=self.beta, epsilon=self.epsilon_low, epsilon_high=self.epsilon_high, delta=self.args.delta,
            kl_ratio_weighted=bool(self.args.use_bias_correction_kl),
            normalization=normalization, max_length=self.max_completion_length if normalization == "fixed" else None,
            temperature=self.temperature, allow_empty_rows=True,
        )
        # TRL's normalisers, gradient accumulation included (its compute_loss already divides by it).
        steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        if self.loss_type == "dapo":
            num_items = float(inputs["num_items_in_batch"].clamp(min=1.0)) / self.accelerator.num_processes * steps / self.args.steps_per_generation
        elif self.loss_type == "bnpo":
            num_items = max(int((batch["labels"][:, 1:] != -100).sum()), 1) * steps
        else:
            num_items = shape[0] * steps
        return batch, objective, num_items, 1.0


def __getattr__(name: str):
    """`ChunkwiseDPOTrainer` / `ChunkwiseGRPOTrainer`, built on first use (importing trl only then)."""
    if name not in ("ChunkwiseDPOTrainer", "ChunkwiseGRPOTrainer"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        import trl
    except ImportError as error:
        raise ImportError(f"{name} needs TRL: pip install 'chunkwise[trl]'") from error
    mixin, base = (ChunkwiseDPOMixin, trl.DPOTrainer) if name == "ChunkwiseDPOTrainer" else (ChunkwiseGRPOMixin, trl.GRPOTrainer)
    cls = type(name, (mixin, base), {"__module__": __name__, "__doc__": f"`trl.{base.__name__}` trained chunk by chunk; see `{mixin.__name__}`."})
    globals()[name] = cls
    return cls


__all__ = ["ChunkwiseDPOMixin", "ChunkwiseGRPOMixin", "ChunkwiseDPOTrainer", "ChunkwiseGRPOTrainer", "right_padded"]
