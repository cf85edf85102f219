"""`transformers.Trainer` integration: train with SeCO/SpaCO by changing one class name.

    from chunkwise.hf import ChunkwiseConfig, ChunkwiseTrainer

    trainer = ChunkwiseTrainer(model=model, args=training_args, train_dataset=train, eval_dataset=dev,
                               chunkwise=ChunkwiseConfig(method="seco", chunk_size=1024))
    trainer.train()

Everything around the step stays Trainer's: data loading, gradient accumulation, clipping, the
optimizer and scheduler, logging, checkpoints, DDP through accelerate. Only the step itself changes:
`training_step` calls `engine.backward(...)` (which fills `.grad`) where Trainer would compute the loss
and call `accelerator.backward(loss)`; and `prediction_step` computes the eval loss chunk by chunk under
`torch.no_grad()`, so evaluation sequences as long as the training ones fit too.

Several processes: DDP (torchrun / `accelerate launch`), DeepSpeed ZeRO-1/2/3 (`TrainingArguments(deepspeed=...)`)
and FSDP2 (a model sharded at load time, or accelerate's `fsdp_version: 2`) reduce the gradients once per
optimizer step (see `chunkwise.core.sync`). Trainer options that cannot work chunk-wise (fp16 with a
GradScaler, gradient checkpointing, DeepSpeed without ZeRO, FSDP1, torch.compile, ...) are refused when the
trainer is built, each with the reason and the fix.
"""

from __future__ import annotations

import json
import logging
import os

import torch
from transformers import Trainer, TrainingArguments

from chunkwise.core.batch import default_labels
from chunkwise.core.config import ChunkwiseConfig
from chunkwise.core.engine import ChunkwiseOutput, SeCO
from chunkwise.core.handle import inspect_causal_lm, unwrap_causal_lm
from chunkwise.core.inference import chunked_loss_sum
from chunkwise.core.loss import IGNORE_INDEX, count_targets
from chunkwise.core.quantized import KBIT_CHECKPOINTING_FIX, is_quantized
from chunkwise.utils.memory import parse_bytes

logger = logging.getLogger(__name__)

SAMPLER_STATE_NAME = "chunkwise_sampler.pt"  # written into each checkpoint folder (SpaCO only)



def plan_for_model(model: torch.nn.Module, optimizer, config: ChunkwiseConfig, *, batch_size: int, seq_len: int,
                   autocast: bool, device: torch.device):
    """The planner's step for a loaded model (`chunk_size="auto"`): the largest chunk that fits
    (`chunkwise.plan.auto_chunk_plan`, the same decision `chunkwise train --chunk-size auto` makes).

    What trains (LoRA rank and targets, or everything) and the element sizes are read from the model's
    parameters; the budget is the device's free memory plus what the parameters, gradients and optimizer
    state already hold (the plan counts them), or `config.memory`.
    """
    from chunkwise.plan import Training, auto_chunk_plan

    named = list(model.named_parameters())
    trained = [p for _, p in named if p.requires_grad]
    frozen = [p for _, p in named if not p.requires_grad] or trained
    adapters = [(name, p) for name, p in named if ".lora_A." in name]
    lora = {}
    if adapters:  # "...layers.0.self_attn.q_proj.lora_A.default.weight": rank 8 on q_proj
        lora = dict(lora_r=adapters[0][1].shape[0], lora_targets=tuple({name.split(".lora_A.")[0].rsplit(".", 1)[-1] for name, _ in adapters}))
    training = Training(param_bytes=trained[0].element_size(), frozen_bytes=frozen[0].element_size(),
                        autocast_bytes=2 if autocast else None, batch_size=batch_size, attention=config.attention,
                        device_type=device.type, **lora)
    held = {t.data_ptr(): t.nbytes for _, p in named for t in (p, p.grad) if t is not None}
    for state in getattr(optimizer, "state", {}).values():
        held.update({t.data_ptr(): t.nbytes for t in state.values() if isinstance(t, torch.Tensor)})
    memory = None if config.memory is None else parse_bytes(str(config.memory), "ChunkwiseConfig.memory")
    lm = unwrap_causal_lm(model)
    return auto_chunk_plan(lm.config, name=type(lm).__name__, training=training, seq_len=seq_len, method=config.method,
                           offload_kv=config.offload_kv, device=device, memory=memory, held=0 if memory else sum(held.values()))


# ----- options that cannot work chunk-wise ----------------------------------------------------------


def _deepspeed_zero_stage(args) -> int | None:
    """ZeRO stage of the DeepSpeed setup in `args` (or accelerate's environment); None without DeepSpeed."""
    plugin = getattr(args, "deepspeed_plugin", None)
    if plugin is not None:
        return int(getattr(plugin, "zero_stage", 0) or 0)
    config = getattr(args, "deepspeed", None)
    if not config:
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes"):
            return int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2))  # accelerate's default stage
        return None
    if isinstance(config, str):
        try:
            with open(config) as f:
                config = json.load(f)
        except (OSError, ValueError):
            return 0  # unreadable here; DeepSpeed is configured all the same
    stage = config.get("zero_optimization", {}).get("stage", 0)
    return stage if isinstance(stage, int) else 0


def _deepspeed_problem(args) -> str | None:
    stage = _deepspeed_zero_stage(args)
    if stage is None:
        return None
    from transformers.integrations.deepspeed import is_deepspeed_available

    if not is_deepspeed_available():
        return (
            "DeepSpeed is configured (TrainingArguments.deepspeed or ACCELERATE_USE_DEEPSPEED) but the `deepspeed` "
            "package is not installed: pip install 'chunkwise[deepspeed]'."
        )
    if stage == 0:
        return (
            "DeepSpeed without ZeRO (zero_optimization.stage 0) reduces gradients inside its own backward, which "
            "chunk-wise training replaces with one backward per chunk; set zero_optimization.stage to 1, 2 or 3, or "
            "drop the DeepSpeed config for DistributedDataParallel."
        )
    return None


def _fsdp_version(args) -> int:
    config = getattr(args, "fsdp_config", None) or {}
    return int(config.get("version", 2))  # transformers' default is FSDP2


def _parallelism_problem(config) -> str | None:
    if config is None:
        return None
    sizes = {name: getattr(config, name, None) or 1 for name in ("tp_size", "cp_size", "sp_size", "dp_shard_size")}
    split = {name: size for name, size in sizes.items() if size > 1}
    if not split:
        return None
    return (
        f"parallelism_config splits the model or the sequence across ranks ({split}); chunkwise cuts the sequence "
        "into chunks itself and trains whole parameters on each rank. Use plain data parallelism (DDP) only."
    )


def check_training_arguments(args) -> None:
    """Refuse `TrainingArguments` that cannot work chunk-wise, each with its reason and its fix.

    Raises:
        ValueError: listing every incompatible option.
    """
    problems = []
    if args.fp16:
        problems.append(
            "fp16=True trains with a GradScaler, which scales the loss before loss.backward(); chunkwise calls "
            "autograd itself chunk by chunk, so the loss would never be scaled (fp16 gradients underflow) while the "
            "scaler still unscales them. Use bf16=True (needs no scaler) or full precision."
        )
    if getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False):
        problems.append(
            "gradient_checkpointing=True (activation_checkpointing): transformers drops the KV cache inside "
            "checkpointed layers, which would cut every chunk off from its past (a silently wrong gradient); and "
            "chunkwise already keeps only one chunk's activations, which is what checkpointing would buy. Set "
            "gradient_checkpointing=False and lower chunk_size to save memory."
        )
    deepspeed = _deepspeed_problem(args)
    if deepspeed:
        problems.append(deepspeed)
    if getattr(args, "fsdp", None) and _fsdp_version(args) < 2:
        problems.append(
            "fsdp with FSDP1: its FullyShardedDataParallel wrapper hides the model's own modules, which chunk-wise "
            "training calls chunk by chunk. Use FSDP2: fsdp_config={'version': 2} (or load the model sharded, "
            "from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=N)))."
        )
    if getattr(args, "torch_compile", False):
        problems.append(
            "torch_compile=True wraps the model in torch.compile's OptimizedModule; chunkwise calls the model's "
            "own modules chunk by chunk (the decoder body in stage 1, the LM in stage 2), which that wrapper "
            "neither covers nor lets it see through. Set torch_compile=False."
        )
    if getattr(args, "label_smoothing_factor", 0) > 0:
        problems.append(
            f"label_smoothing_factor={args.label_smoothing_factor}: chunkwise computes the plain token "
            "cross-entropy of each chunk and does not smooth labels. Set label_smoothing_factor=0."
        )
    optim = getattr(args, "optim", None)
    optim = getattr(optim, "value", optim)  # an OptimizerNames member, or a plain string
    if optim in ("lomo", "adalomo"):
        problems.append(
            f"optim={optim}: LOMO optimizers update the parameters inside the backward pass "
            "(accelerator.backward with a learning rate), but chunkwise runs its own backward per chunk and needs "
            "the gradient of the whole sequence accumulated in .grad first. Use another optimizer, e.g. adamw_torch."
        )
    parallel = _parallelism_problem(getattr(args, "parallelism_config", None))
    if parallel:
        problems.append(parallel)
    if args.n_gpu > 1:
        problems.append(
            f"{args.n_gpu} GPUs are visible to one process, so Trainer would wrap the model in torch.nn.DataParallel, "
            "which re-replicates it on every forward and cannot carry a KV cache from chunk to chunk. Launch one "
            f"process per GPU (torchrun --nproc_per_node {args.n_gpu}, or `accelerate launch`) for "
            "DistributedDataParallel, or expose one GPU (CUDA_VISIBLE_DEVICES=0)."
        )
    label_names = getattr(args, "label_names", None)
    if label_names is not None and len(label_names) != 1:
        problems.append(
            f"label_names={label_names}: a causal LM trains on one label tensor aligned with input_ids; give "
            "exactly one name (default 'labels')."
        )
    if problems:
        raise ValueError("ChunkwiseTrainer cannot use these TrainingArguments:\n- " + "\n- ".join(problems))


# ----- the step ---------------------------------------------------------------------------------------

ENGINE_KEYS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids")
# What padding-free collators (transformers' DataCollatorWithFlattening, TRL's padding_free) add for varlen kernels:
# the document boundaries again, which the engine reads from position_ids. Checked against them, then dropped.
BOUNDARY_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def _check_boundaries(inputs: dict, position_ids: torch.Tensor | None) -> None:
    """The collator's `cu_seq_lens_*` / `max_length_*` / `seq_idx` must describe the documents `position_ids` restart at."""
    given = [key for key in BOUNDARY_KEYS if inputs.get(key) is not None]
    if not given:
        return
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[0] != 1:
        raise ValueError(
            f"the batch has {given} but {'no position_ids' if position_ids is None else 'position_ids of more than one row'}: "
            "chunk-wise training reads document boundaries from one flattened row's position_ids (a padding-free collator)"
        )
    row = position_ids[0].cpu()
    starts = torch.nonzero(row == 0).flatten().tolist()
    starts = starts if starts and starts[0] == 0 else [0, *starts]
    lengths = torch.tensor([*starts[1:], row.numel()]) - torch.tensor(starts)
    expected = {"cu_seq_lens_q": [*starts, row.numel()], "max_length_q": int(lengths.max()),
                "seq_idx": torch.repeat_interleave(torch.arange(len(starts)), lengths).tolist()}
    expected["cu_seq_lens_k"], expected["max_length_k"] = expected["cu_seq_lens_q"], expected["max_length_q"]
    for key in given:
        value = inputs[key]
        value = value.flatten().tolist() if isinstance(value, torch.Tensor) and value.numel() > 1 else int(value)
        if value != expected[key]:
            raise ValueError(
                f"the batch's {key} does not match the documents its position_ids restart at ({key} should be "
                f"{expected[key]}, got {value}); build them from the same documents, or leave them out"
            )


def _engine_inputs(inputs: dict, label_name: str) -> dict:
    """The batch as `engine.backward` keyword arguments, with `labels` always explicit.

    Args:
        inputs: the collated batch: `input_ids` `[B, T]` (or `inputs_embeds` `[B, T, H]`), optional
            `attention_mask` `[B, T]`, labels `[B, T]` under `label_name`, and for packed / padding-free
            batches `position_ids` `[B, T]` (restarting at 0 where a document begins) with, optionally, the
            varlen keys `cu_seq_lens_q/k`, `max_length_q/k`, `seq_idx` (checked against `position_ids`, then
            dropped: the engine finds the documents from `position_ids`).
    Returns:
        `input_ids`/`inputs_embeds`, `attention_mask`, `position_ids`, `labels` (`[B, T]`; when the batch has
        none, the input ids with padded positions and each document's first token set to -100, so the number
        of valid targets can be counted from them).
    Raises:
        ValueError: for any other key (`token_type_ids`, ...), which chunk-wise training cannot pass on and
            must not silently drop; for varlen keys that disagree with `position_ids`.
    """
    unknown = sorted(set(inputs) - {*ENGINE_KEYS, *BOUNDARY_KEYS, label_name})
    if unknown:
        raise ValueError(
            f"the batch has keys chunk-wise training cannot use: {unknown}. It takes input_ids (or inputs_embeds), "
            f"attention_mask (right padding), position_ids (packed rows) and {label_name!r}. Remove these columns in "
            "the collator, or override ChunkwiseTrainerMixin.chunkwise_inputs to map them."
        )
    _check_boundaries(inputs, inputs.get("position_ids"))
    batch = {key: inputs[key] for key in ENGINE_KEYS if inputs.get(key) is not None}
    labels = inputs.get(label_name)
    if labels is None and "input_ids" in batch:
        labels = default_labels(batch["input_ids"], batch.get("attention_mask"))
        if "position_ids" in batch and batch["position_ids"].shape == labels.shape:
            labels = labels.masked_fill(batch["position_ids"] == 0, IGNORE_INDEX)  # a document's first token is no target
    if labels is None:
        raise ValueError(f"the batch has inputs_embeds but no {label_name!r}: labels are required with embeddings")
    batch["labels"] = labels
    return batch


# ----- the trainer ------------------------------------------------------------------------------------


class ChunkwiseTrainerMixin:
    """Chunk-wise training (SeCO/SpaCO) for any `transformers.Trainer` subclass.

    Put it first in the bases: `class MySFTTrainer(ChunkwiseTrainerMixin, SFTTrainer)` (TRL), or
    `ChunkwiseTrainer` below for plain `Trainer`. It relies only on `Trainer`'s own API (`training_step`,
    `prediction_step`, `_prepare_inputs`, `accelerator`, checkpoint hooks), so it has no dependency on TRL or
    any other library; what it changes:

    * `training_step` runs `engine.backward` instead of `compute_loss` + `accelerator.backward`, so a
      subclass's `compute_loss` is not called during training (its metrics, e.g. TRL's token accuracy, are
      not logged) and a custom loss cannot be used: the loss is the token cross-entropy (TRL's DPO and GRPO
      trainers have their own mixins in `chunkwise.trl_trainers`).
    * The batch may hold only `input_ids` (or `inputs_embeds`), `attention_mask` (right padding), the labels
      and, from packed / padding-free collators (transformers' `DataCollatorWithFlattening`, TRL's
      `padding_free` / `packing=True`), `position_ids` (each document attends to itself only) and the varlen
      keys (`cu_seq_lens_*`, `max_length_*`, `seq_idx`), which must agree with `position_ids`. Override
      `chunkwise_inputs` to adapt another batch layout.
    * TRL's SFTConfig turns gradient checkpointing on by default: pass `gradient_checkpointing=False`.

    Args:
        chunkwise: a `ChunkwiseConfig` (or a dict of its fields); default SeCO with 1024-token chunks.
        *args, **kwargs: everything the wrapped Trainer class takes.
    """

    def __init__(self, *args, chunkwise: ChunkwiseConfig | dict | None = None, **kwargs):
        if chunkwise is None:
            chunkwise = ChunkwiseConfig()
        elif isinstance(chunkwise, dict):
            chunkwise = ChunkwiseConfig(**chunkwise)
        elif not isinstance(chunkwise, ChunkwiseConfig):
            raise TypeError(f"chunkwise must be a ChunkwiseConfig, got {type(chunkwise).__name__}")
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if isinstance(training_args, TrainingArguments):  # (positional index 1 is another argument in TRL's trainers)
            # Before Trainer.__init__, which would set up the refused feature (or fail on it less clearly).
            check_training_arguments(training_args)
        super().__init__(*args, **kwargs)
        self._check_trainer_setup()
        self.chunkwise = chunkwise
        label_names = self.args.label_names
        self.chunkwise_label_name = label_names[0] if label_names else "labels"
        # The trainer owns SpaCO's sampler: engines are rebuilt when the model is re-wrapped, the sampler's
        # state (saved in checkpoints) carries on.
        self.chunkwise_sampler = chunkwise.make_sampler(default_seed=self.args.seed)
        self.chunkwise_output: ChunkwiseOutput | None = None  # what the last training step's engine reported
        self._chunkwise_engine = None
        self._chunkwise_engine_model = None
        self._chunkwise_auto_chunks: dict[tuple[int, int], int] = {}  # chunk_size="auto": (batch, length) -> chunk

    def _check_trainer_setup(self) -> None:
        """Refusals that only the built Trainer can see (accelerate's environment, Trainer arguments, the model)."""
        check_training_arguments(self.args)
        if getattr(self, "compute_loss_func", None) is not None:
            raise ValueError(
                "compute_loss_func is not used by chunk-wise training: the engine computes each chunk's token "
                "cross-entropy itself (labels shifted once, normalised over the whole batch). Remove "
                "compute_loss_func; custom losses are not supported."
            )
        fsdp_plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if fsdp_plugin is not None and getattr(fsdp_plugin, "fsdp_version", 1) < 2:
            # Set up by an accelerate config file / environment rather than TrainingArguments.
            raise ValueError(
                "accelerate is configured for FSDP1, whose FullyShardedDataParallel wrapper hides the model's own "
                "modules, which chunk-wise training calls chunk by chunk; set fsdp_version: 2 in the accelerate config."
            )
        problem = _parallelism_problem(getattr(self.accelerator, "parallelism_config", None))
        if problem:
            raise ValueError(problem)
        if self.model is None:
            return
        inspect_causal_lm(self.model)  # a model that cannot train chunk-wise fails now, not at step 1
        if any(getattr(module, "gradient_checkpointing", False) for module in self.model.modules()):
            lm = unwrap_causal_lm(self.model)
            if is_quantized(lm):
                # peft's prepare_model_for_kbit_training, the standard QLoRA recipe, turns it on by default: the
                # user did not ask for it (TrainingArguments' gradient_checkpointing=True stays refused above).
                lm.activation_checkpointing_disable()
                logger.warning(
                    "chunkwise switched off the gradient checkpointing that prepare_model_for_kbit_training turned on "
                    "(it would cut every chunk off from its past; chunk-wise training keeps one chunk's activations "
                    f"anyway); to silence this, call {KBIT_CHECKPOINTING_FIX}"
                )
                return
            raise ValueError(
                "the model has gradient checkpointing enabled: transformers drops the KV cache inside checkpointed "
                "layers, which would cut every chunk off from its past; chunkwise already keeps only one chunk's "
                "activations. Call model.activation_checkpointing_disable() before building the trainer."
            )

    # ----- training ----------------------------------------------------------------------------------

    def chunkwise_engine(self, model: torch.nn.Module, chunk_size: int | None = None) -> SeCO:
        """The engine for `model` (as Trainer passes it: maybe DDP- or PEFT-wrapped), built on first use
        (and again for another `chunk_size`, which chunk_size="auto" picks per batch shape)."""
        engine = self._chunkwise_engine
        if chunk_size is None and self.chunkwise.chunk_size == "auto":  # the chunk the last batch shape got
            if engine is None:
                raise ValueError("chunk_size='auto' is decided per batch: pass chunkwise_chunk_size(model, batch)")
            chunk_size = engine.chunk_size
        chunk_size = chunk_size or self.chunkwise.chunk_size
        if engine is None or self._chunkwise_engine_model is not model or engine.chunk_size != chunk_size:
            engine = self.chunkwise.make_engine(model, chunk_size=chunk_size, sampler=self.chunkwise_sampler)
            self._chunkwise_engine, self._chunkwise_engine_model = engine, model
        return self._chunkwise_engine

    def chunkwise_chunk_size(self, model: torch.nn.Module, batch: dict) -> int:
        """`ChunkwiseConfig.chunk_size`, or with "auto" the planner's largest chunk that fits this batch's shape.

        Raises:
            chunkwise.plan.PlanError: with "auto", when the batch fits with no chunk size; the message has
                the planner's numbers.
        """
        if self.chunkwise.chunk_size != "auto":
            return self.chunkwise.chunk_size
        tokens = batch["input_ids"] if batch.get("input_ids") is not None else batch["inputs_embeds"]
        key = tuple(tokens.shape[:2])
        if key not in self._chunkwise_auto_chunks:
            plan = plan_for_model(model, self.optimizer, self.chunkwise, batch_size=key[0], seq_len=key[1],
                                  autocast=self.args.bf16, device=tokens.device)
            self._chunkwise_auto_chunks[key] = plan.chunk_size
            logger.info(f"chunk_size='auto': {plan.chunk_size} tokens for batches of {key[0]} x {key[1]}")
        return self._chunkwise_auto_chunks[key]

    def chunkwise_inputs(self, inputs: dict) -> dict:
        """Map a collated batch to `engine.backward` arguments; override for other batch layouts."""
        return _engine_inputs(inputs, self.chunkwise_label_name)

    def _chunkwise_normaliser(self, num_items_in_batch, labels: torch.Tensor, accumulation_steps: int):
        """What the batch's summed token loss is divided by, so gradients and loss match Trainer's.

        * Trainer counted the targets of the whole accumulated step (`num_items_in_batch`): the model divides
          by it and, with `average_tokens_across_devices`, Trainer multiplies the loss by the number of
          processes (the count is global, DDP averages gradients). Hence num_items / processes.
        * It did not: Trainer takes the model's per-batch mean and divides by the accumulation steps. Hence
          (valid targets of this batch) x steps; at least one target so a batch without any stays 0, not NaN.
        """
        if num_items_in_batch is not None:
            if self.args.average_tokens_across_devices:
                return num_items_in_batch / self.accelerator.num_processes
            return num_items_in_batch
        return max(count_targets(labels), 1) * accumulation_steps

    def training_step(self, model: torch.nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        """One micro-batch: SeCO/SpaCO fills `.grad` where Trainer would call `accelerator.backward(loss)`.

        Mirrors `Trainer.training_step` around the backward: train mode, `_prepare_inputs`, the
        gradient-accumulation normalisation, `torch_empty_cache_steps`. Trainer's `no_sync` (DDP, FSDP2) wraps
        this call; the engine reads it from the wrapper. Under DeepSpeed it does what accelerate does around
        `engine.backward(loss)`: marks the step's last micro-batch, and after it lets DeepSpeed clip and step.

        Args:
            model: the model as Trainer passes it (DDP- or PEFT-wrapped, or not); given to the engine as is.
            inputs: the collated batch: `input_ids` `[B, T]`, `attention_mask` `[B, T]`, labels `[B, T]`.
            num_items_in_batch: valid targets of the whole accumulated step, when Trainer counted them.
        Returns:
            The detached loss Trainer logs: the batch's summed token loss over the same normaliser Trainer's
            own loss would have had (so `loss` in the logs is comparable with plain Trainer's).
        """
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()  # schedule-free optimizers
        batch = self.chunkwise_inputs(self._prepare_inputs(inputs))
        steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        num_items = self._chunkwise_normaliser(num_items_in_batch, batch["labels"], steps)
        engine = self.chunkwise_engine(model, self.chunkwise_chunk_size(model, batch))
        deepspeed = model if getattr(self, "is_deepspeed_enabled", False) else None  # Trainer hands the DeepSpeed engine
        if deepspeed is not None:
            deepspeed.set_gradient_accumulation_boundary(self.accelerator.sync_gradients)
        # accelerate's mixed-precision patch covers model.forward only; stage 1 calls the decoder body
        # directly. Autocast around the whole call runs both stages at the same precision.
        with self.compute_loss_context_manager(), self.accelerator.autocast():
            out = engine.backward(**batch, num_items=num_items)
        if deepspeed is not None and self.accelerator.sync_gradients:
            deepspeed.step()  # clipping, the optimizer step and the scheduler's, as accelerate's wrapper does
        self.chunkwise_output = out
        del inputs, batch
        empty_steps = self.args.torch_empty_cache_steps
        if empty_steps is not None and self.state.global_step % empty_steps == 0:
            from accelerate.utils.memory import clear_device_cache

            clear_device_cache()
        return out.loss.to(self.args.device)

    # ----- evaluation --------------------------------------------------------------------------------

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Eval loss chunk by chunk under `torch.no_grad()`, so long eval sequences fit.

        Returns `(loss, None, None)`: the batch's mean token loss, equal (to float rounding) to Trainer's
        unchunked loss, normalised the same way. It never materialises the logits of the whole sequence, so
        it returns no logits and no labels: when those are asked for (`prediction_loss_only=False`, e.g. with
        `compute_metrics`) or the batch has no labels, it falls back to Trainer's full-sequence forward.
        """
        if not prediction_loss_only or inputs.get(self.chunkwise_label_name) is None or self._zero3():
            # (ZeRO-3 gathers parameters collectively module by module: ranks whose batches differ in length
            # would run different numbers of chunks, so evaluation keeps Trainer's one forward per batch.)
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        inputs = self._prepare_inputs(inputs)
        # Trainer counts the eval targets the same way (a collective under DDP: every rank gets here).
        num_items_in_batch = self._get_num_items_in_batch([inputs], self.args.device)
        batch = self.chunkwise_inputs(inputs)
        handle = inspect_causal_lm(model)
        with torch.no_grad(), self.compute_loss_context_manager(), self.accelerator.autocast():
            total = chunked_loss_sum(handle, batch, chunk_size=self.chunkwise_chunk_size(model, batch))
        if num_items_in_batch is None:
            normaliser = count_targets(batch["labels"])  # 0 gives NaN, as Trainer's own mean loss does
        else:
            normaliser = self._chunkwise_normaliser(num_items_in_batch, batch["labels"], 1)
        return (total / normaliser).detach(), None, None

    def _zero3(self) -> bool:
        return getattr(self, "is_deepspeed_enabled", False) and _deepspeed_zero_stage(self.args) == 3

    # ----- checkpoints: SpaCO's sampler state -------------------------------------------------------

    def _save_checkpoint(self, model, trial):
        """Trainer's checkpoint, plus SpaCO's sampler state so a resumed run replays the same selections."""
        super()._save_checkpoint(model, trial)
        if self.chunkwise_sampler is not None and self.args.should_save:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            torch.save(self.chunkwise_sampler.state_dict(), os.path.join(folder, SAMPLER_STATE_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint):
        # Trainer calls this once on every resume from a checkpoint; the sampler is part of the schedule.
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self.chunkwise_sampler is None:
            return
        path = os.path.join(checkpoint, SAMPLER_STATE_NAME)
        if not os.path.isfile(path):
            logger.warning(f"{checkpoint} has no {SAMPLER_STATE_NAME}; SpaCO's chunk selection restarts from its seed")
            return
        self.chunkwise_sampler.load_state_dict(torch.load(path, weights_only=True))


class ChunkwiseTrainer(ChunkwiseTrainerMixin, Trainer):
    """`transformers.Trainer` that trains chunk by chunk (SeCO/SpaCO): a drop-in with one more argument.

    Example:
        trainer = ChunkwiseTrainer(model=model, args=TrainingArguments(..., bf16=True),
                                   train_dataset=train, chunkwise=ChunkwiseConfig(chunk_size=1024))
        trainer.train()

    See `ChunkwiseTrainerMixin` for what changes relative to `Trainer` and `check_training_arguments` for
    the options it refuses.
    """


__all__ = ["ChunkwiseConfig", "ChunkwiseTrainer", "ChunkwiseTrainerMixin", "check_training_arguments"]
