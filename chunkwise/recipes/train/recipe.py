"""The training recipe behind `chunkwise train`: set up → train → save, with checkpoints and resume.

    config = TrainConfig(model="meta-llama/Llama-3.2-1B", data="books.jsonl", seq_len=16384, chunk_size=1024)
    result = train(config)

Without a model and data it is the built-in demo: a small Llama trained from scratch on the synthetic
key→value recall task (`data.RecallTask`), on CPU, in a couple of minutes.

The loop is the engine's caller and nothing else: for each optimizer step it takes the step's
micro-batches, lets SeCO/SpaCO (or ordinary backprop, `method="full"`) fill `.grad`, clips, steps
AdamW and the warm-up + cosine schedule, logs, and now and then writes an atomic checkpoint. Data order
is a pure function of (seed, micro-batch index), and every random state is checkpointed, so a resumed
run continues with exactly the losses of an uninterrupted one.

`TrainRecipe` holds the run's state on itself, as torchtune's recipes do: `setup()` builds everything
(`chunkwise.recipes.train.setup`), `train()` runs the steps (`chunkwise.recipes.train.step`), `save()`
writes a checkpoint (`chunkwise.recipes.train.state`).
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch

from chunkwise.core.handle import inspect_causal_lm
from chunkwise.core.objectives import Policy
from chunkwise.data.sequences import pad_token_id
from chunkwise.data.synthetic import SYNTHETIC, synthetic_task_for
from chunkwise.recipes.checkpoint import latest_checkpoint
from chunkwise.recipes.run import BEST_EVAL, FINAL_MODEL
from chunkwise.recipes.train import distributed
from chunkwise.recipes.train.batches import BatchStream
from chunkwise.recipes.train.config import TrainConfig, TrainingError, TrainResult
from chunkwise.recipes.train.distributed import Distributed, init_distributed, is_lost_rank, lost_rank_error
from chunkwise.recipes.train.heldout import describe_evaluation, evaluate_held_out, synthetic_held_out, write_best
from chunkwise.recipes.train.reporting import (
    LOSS_PLOT,
    METRICS,
    TENSORBOARD,
    MetricsLog,
    TrainingProgress,
    plot_losses,
    require_tensorboard,
)
from chunkwise.recipes.train.setup import (
    build_model,
    check_before_loading,
    check_output,
    check_resume_settings,
    held_out_rows,
    make_engine,
    make_objective,
    start_run_directory,
    tokenizer_for,
    training_sequences,
)
from chunkwise.recipes.train.state import TrainingState, save_model
from chunkwise.recipes.train.step import StepContext, optimizer_step
from chunkwise.utils.precision import training_dtypes


def train(config: TrainConfig, *, log: Callable[[str], None] = print) -> TrainResult:
    """Run (or resume) training as `config` says; see the module docstring."""
    config = config.resolved()
    joined_here = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    dist, device = init_distributed(device=config.device, timeout_s=config.dist_timeout)
    try:
        recipe = TrainRecipe(config, dist=dist, device=device, log=log)
        recipe.setup()
        result = recipe.train()
    except (RuntimeError, torch.distributed.DistError) as error:
        if dist.world_size > 1 and is_lost_rank(error):
            raise lost_rank_error(error, dist, config) from error
        raise
    if dist.world_size > 1 and joined_here:
        # Leave the group we joined explicitly, every rank done, rather than at interpreter exit.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return result


class TrainRecipe:
    """One rank's part of a run: `setup()`, then `train()`, which calls `save()` as the run goes."""

    def __init__(self, config: TrainConfig, *, dist: Distributed, device: torch.device, log: Callable[[str], None]):
        """`config`: resolved (`TrainConfig.resolved`); `log`: where rank 0's messages go (other ranks are silent)."""
        if (config.zero is not None or config.fsdp) and dist.world_size == 1:
            raise ValueError(f"{'--fsdp' if config.fsdp else '--zero'} shards the training state across processes: launch "
                             "with torchrun --nproc_per_node N (N > 1) -m chunkwise.cli train ...")
        self.config, self.dist, self.device = config, dist, device
        self.log = log if dist.is_main else (lambda message: None)
        self.output = check_output(config)
        if config.report_to == "tensorboard" and dist.is_main:
            require_tensorboard()
        self.evaluations: list[dict] = []

    # ----- set-up ---------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Check, read and build everything, cheapest first; the run directory is created last, once all loaded."""
        dist, device = self.dist, self.device
        self.config = config = check_before_loading(self.config, self.output, device, dist, self.log)
        if config.resume and dist.is_main:
            check_resume_settings(config, self.output)
        tokenizer = tokenizer_for(config)
        sequences = training_sequences(config, tokenizer)
        self.held_out = held_out_rows(config, tokenizer)
        torch.manual_seed(config.seed)
        model = build_model(config, device)
        self.handle = inspect_causal_lm(model)
        self.objective = make_objective(config, model, self.handle, device)
        self.data = BatchStream(config, sequences, pad_token_id(tokenizer) if tokenizer is not None else 0, self.handle.vocab_size)
        if self.held_out is None and config.eval_every:  # the synthetic task's own held-out stream
            task = self.data.task or synthetic_task_for(self.handle.vocab_size, config.pair_depth)
            self.held_out = synthetic_held_out(task, batch_size=config.batch_size, seq_len=config.seq_len, seed=config.seed)
        _, self.autocast_dtype = training_dtypes(config.dtype, device, frozen_base=config.lora_r > 0)
        if not config.resume and dist.is_main:
            start_run_directory(config)
        if dist.world_size > 1:
            torch.distributed.barrier()  # the run directory exists before any rank writes or reads it
        self.state = self._build_training_state(model, tokenizer)
        board = self.output / TENSORBOARD if config.report_to == "tensorboard" and dist.is_main else None
        self.metrics = MetricsLog(self.output / METRICS, tensorboard=board)
        if config.resume:
            self.state.load(self.output, dist=dist, log=self.log)
            if dist.is_main:
                self.metrics.truncate_after(self.state.step)
            # A resumed run keeps the evaluations made before its checkpoint (the best step may be among them).
            self.evaluations = [r for r in self.metrics.records() if r["kind"] == "eval"] if dist.is_main else []
        policy = Policy(self.state.backend.engine_model, self.handle, config.chunk_size)
        self.context = StepContext(config, dist, device, self.state, self.data, self.autocast_dtype, self.objective, policy)

    def _build_training_state(self, model: torch.nn.Module, tokenizer) -> TrainingState:
        """Wrap the model for the ranks, and build the engine, optimizer, schedule and loss scaler around it."""
        from transformers import get_cosine_schedule_with_warmup

        config = self.config
        backend = distributed.setup(
            model, lambda parameters: torch.optim.AdamW(parameters, lr=config.lr, betas=(0.9, config.adam_beta2), weight_decay=config.weight_decay),
            world_size=self.dist.world_size, device=self.device, zero=config.zero, fsdp=config.fsdp,
            micro_batch_size=config.batch_size, accumulation=config.grad_accum, max_grad_norm=config.max_grad_norm,
        )
        # Given the wrapper (DDP, DeepSpeed engine, FSDP2 model), the engine reduces the gradients once per step.
        engine = make_engine(config, backend.engine_model)
        scheduler = get_cosine_schedule_with_warmup(backend.optimizer, math.ceil(config.warmup_ratio * config.steps), config.steps)
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)
        return TrainingState(model, tokenizer, backend, scheduler, scaler, engine)

    # ----- the loop -------------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        """Take the steps left (all of them, or those after the checkpoint resumed from); save at the end."""
        config, dist, state = self.config, self.dist, self.state
        self.log(self._describe())
        if state.step == 0:
            self.evaluate(0)
        self.first_loss = self.last_loss = None
        interrupted = None
        started, start_step = time.perf_counter(), state.step
        progress = TrainingProgress(total_steps=config.steps, start_step=state.step, log_every=config.log_every,
                                    enabled=config.progress and dist.is_main)
        with StopRequest() as stop, progress:
            progress.held_out(self.evaluations[-1] if self.evaluations else None)
            while state.step < config.steps:
                step = state.step + 1
                record = optimizer_step(self.context, step)
                state.step = step
                if dist.is_main:
                    self.metrics.append(record)
                    progress.step(record)
                self._count(record)
                if config.eval_every and (step % config.eval_every == 0 or step == config.steps):
                    progress.held_out(self.evaluate(step))
                if self._stop_requested(stop):
                    interrupted = stop.signal or signal.SIGTERM
                    path = self.save()
                    self.log(f"interrupted by {signal.Signals(stop.signal).name if stop.signal else 'another rank'} at step {step}; "
                             f"checkpoint saved to {path}. Continue with the same command and --resume.")
                    break
                if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
                    self.save()
        if not interrupted:
            self.save()
            self.save_final_model()
        self.metrics.close()
        self._finish_plot()
        self._report(time.perf_counter() - started, interrupted, start_step=start_step)
        return TrainResult(self.output, state.step, self.first_loss, self.last_loss, state.skipped, interrupted, self.evaluations)

    def _count(self, record: dict) -> None:
        """Keep the first and last finite loss; count a skipped step, and stop after --max-bad-steps in a row."""
        state = self.state
        if not record["skipped"]:
            state.bad_in_a_row = 0
            self.first_loss = record["loss"] if self.first_loss is None else self.first_loss
            self.last_loss = record["loss"]
            return
        state.bad_in_a_row += 1
        state.skipped += 1
        self.log(f"step {state.step}: non-finite loss or gradient; step skipped "
                 f"({state.bad_in_a_row} in a row, {state.skipped} in all)")
        if state.bad_in_a_row >= self.config.max_bad_steps:
            self._finish_plot()
            kept = latest_checkpoint(self.output)
            raise TrainingError(
                f"{state.bad_in_a_row} steps in a row had a non-finite loss or gradient; stopped at step {state.step} "
                f"without saving. Last good checkpoint: {kept or 'none yet'}. Lower --lr, check the data, or "
                "raise --max-bad-steps."
            )

    def evaluate(self, step: int) -> dict | None:
        """Score the held-out set (if there is one) at `step`; rank 0 logs it and keeps best_eval.json current."""
        if self.held_out is None:
            return None
        record = evaluate_held_out(self.handle, self.held_out, step=step, chunk_size=self.config.chunk_size, device=self.device,
                                   autocast_dtype=self.autocast_dtype)
        self.evaluations.append(record)
        if self.dist.is_main:
            self.metrics.append(record)
            self.log(describe_evaluation(record, write_best(self.output / BEST_EVAL, self.evaluations)))
        return record

    def _stop_requested(self, stop: StopRequest) -> bool:
        """Every rank stops at the same step if any rank got a signal (no rank waits in a collective alone)."""
        (requests,) = self.dist.all_sum([1.0 if stop.signal is not None else 0.0])
        return requests > 0

    # ----- saving ---------------------------------------------------------------------------------------

    def save(self) -> Path | None:
        """A checkpoint of the current step (every rank takes part); its folder on rank 0."""
        return self.state.save(self.output, config=self.config, dist=self.dist)

    def save_final_model(self) -> None:
        """model/: the trained model (or adapter) and tokenizer, loadable with `from_pretrained`."""
        full_state = self.state.backend.model_state()  # gathered from the shards on every rank, kept by rank 0
        if self.dist.is_main:
            save_model(self.output / FINAL_MODEL, self.state.model, self.state.tokenizer, state_dict=full_state)

    def _finish_plot(self) -> None:
        if self.dist.is_main:
            config = self.config
            plot_losses(self.metrics.records(), self.output / LOSS_PLOT, title=f"{config.model}: {config.method}, {config.seq_len} tokens")

    # ----- messages -------------------------------------------------------------------------------------

    def _report(self, elapsed: float, interrupted: int | None, *, start_step: int) -> None:
        """The closing lines. A resumed run counts its time over every session: metrics.jsonl keeps each step's and
        each evaluation's seconds (this session's wall time also holds loading and checkpoints)."""
        if not self.dist.is_main or interrupted:
            return
        step = self.state.step
        steps_time = sum(r["seconds"] for r in self.metrics.records() if r["kind"] == "train")
        evals_time = sum(r["seconds"] for r in self.evaluations)
        if start_step:
            self.log(f"done: {step} steps (steps {start_step + 1}-{step} in this session, {elapsed:.0f} s; the run's steps and "
                     f"evaluations {steps_time + evals_time:.0f} s in all); model in {self.output / FINAL_MODEL}")
        else:
            self.log(f"done: {step} steps in {elapsed:.0f} s; model in {self.output / FINAL_MODEL}")
        if self.evaluations:
            share = evals_time / max(steps_time + evals_time, 1e-9)
            self.log(f"held-out evaluation: {len(self.evaluations)} evaluations, {evals_time:.1f} s in all ({share:.0%} of the "
                     f"run's {steps_time + evals_time:.1f} s of steps and evaluations); best step in {self.output / BEST_EVAL}")

    def _describe(self) -> str:
        """The run's first lines: model, parameters trained, device and ranks, data, method, schedule."""
        config, model, dist = self.config, self.state.model, self.dist
        # Sizes from the model's own shapes: ZeRO-3 leaves each rank a flat shard (`ds_numel` is the whole).
        sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
        trainable = sum(n for n, grad in sizes if grad)
        total = sum(n for n, _ in sizes)
        unit = "sequences" if config.objective == "cross-entropy" else "preference pairs"
        packing = f", --packing {config.packing}" if config.objective == "cross-entropy" else ""
        what = "synthetic key→value recall" if config.data == SYNTHETIC else f"{config.data} ({len(self.data)} {unit}{packing})"
        method = config.method + (f" (budget {config.budget}, {config.sampling})" if config.method == "spaco" else "")
        if config.objective != "cross-entropy":
            reference = "" if config.objective == "simpo" else f", reference {config.ref_model or ('the base model (adapter disabled)' if config.lora_r else 'a frozen copy of --model')}"
            method += f", objective {config.objective} (beta {config.beta:g}{reference})"
        return (
            f"chunkwise train: {config.model} ({trainable:,} of {total:,} parameters trained"
            f"{', LoRA r=' + str(config.lora_r) if config.lora_r else ''}) on {self.device}"
            f"{f' x {dist.world_size} ranks ({self.state.backend.name})' if dist.world_size > 1 else ''}\n"
            f"  data {what}; {config.batch_size} x {config.seq_len} tokens per micro-batch, {config.grad_accum} per step; "
            f"{method}, chunks of {config.chunk_size}; {config.steps} steps, lr {config.lr:g}; run directory {config.output}"
        )


class StopRequest:
    """Ctrl-C / SIGTERM set a flag; the loop finishes the step, checkpoints and exits. A second Ctrl-C stops at once."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def __enter__(self) -> StopRequest:
        for number in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[number] = signal.signal(number, self._handle)
            except ValueError:  # not the main thread: no signal handling
                pass
        return self

    def _handle(self, number, frame) -> None:
        self.signal = number
        signal.signal(number, self._previous.get(number, signal.SIG_DFL))  # the next one is not caught

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
