"""Distributed engines: what the chunk-wise engine asks of whatever wraps the model (DESIGN.md §3).

A data-parallel engine — DistributedDataParallel, a DeepSpeed engine (ZeRO 1/2/3), a model sharded with FSDP2
(`fully_shard`) — reduces the gradients across ranks after a backward. Chunk-wise training runs one backward
per chunk, k per sequence, yet a step's gradient must be reduced once, after the step's last backward: reduced
after every chunk it would cost k reductions (ZeRO-2/3 and FSDP2 do exactly that if left alone), and some
engines would even get it wrong. The engine stays one loop over chunks and asks three questions, answered here
for each wrapper by a `GradientSync`:

* which module do I call for a chunk? (`lm`, `body`)
* how do I run a chunk's backward without reducing? (`backward(..., reduce=False)`)
* how do I let the step's last backward reduce? (`backward(..., reduce=True)`)

and, once per `engine.backward` call, does this micro-batch end the optimizer step (`reduces()`)? Under
gradient accumulation only the step's last micro-batch reduces; each wrapper's own API says which one it is:

    ============  =============================================  =========================================
    wrapper       "this micro-batch is not the last"             the step's last backward reduces by
    ============  =============================================  =========================================
    DDP           `with ddp.no_sync():`                          running through the wrapper (its reducer
                                                                 all-reduces what every chunk accumulated)
    DeepSpeed     `ds.set_gradient_accumulation_boundary(False)`  leaving `ds.coalesce_grad_reduction()`,
                                                                 opened at the step's first backward
    FSDP2         `model.set_requires_gradient_sync(False)`       `set_requires_gradient_sync(True)` and
                                                                 `set_is_last_backward(True)` before it
    ============  =============================================  =========================================

Every rank runs the step's last backward (a rank without targets, or whose SpaCO sample is empty, runs a
zero-weighted chunk), through the LM head, so every trainable parameter has a gradient on every rank and
the collectives line up. Engines that gather parameters in hooks around each module (ZeRO-3, FSDP2) need
two more things: a chunk without targets, which only relays its KV gradient, still passes its backward
through every module's output (`GradientSync.body`); and under ZeRO-3, which gathers parameters each time a
module runs, every rank runs the same chunks (`lockstep`).
"""

from __future__ import annotations

import contextlib
import inspect
import sys

import torch

from chunkwise.core.handle import CausalLMHandle

# ----- finding the wrapper ------------------------------------------------------------------------------------


def _deepspeed_engine_class():
    """`deepspeed.DeepSpeedEngine` if deepspeed was imported (a DeepSpeed engine cannot exist otherwise), else None."""
    module = sys.modules.get("deepspeed")
    return getattr(module, "DeepSpeedEngine", None) if module is not None else None


def _fsdp2_module_class():
    """FSDP2's `FSDPModule` (the class `fully_shard` mixes into a module), or None in torch builds without it."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:
            return None
    return FSDPModule


def is_fsdp2_module(module: torch.nn.Module) -> bool:
    fsdp = _fsdp2_module_class()
    return fsdp is not None and isinstance(module, fsdp)


def gradient_sync(model: torch.nn.Module, handle: CausalLMHandle) -> "GradientSync":
    """The `GradientSync` for `model` as the user handed it to the engine (`handle` describes the LM inside).

    Raises:
        TypeError: with the reason and the fix, for wrappers that cannot train chunk-wise.
    """
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return DDPSync(handle, model)
    engine_class = _deepspeed_engine_class()
    if engine_class is not None and isinstance(model, engine_class):
        return DeepSpeedSync(handle, model)
    roots = [m for m in (model, handle.lm) if is_fsdp2_module(m)]
    if roots:
        return FSDP2Sync(handle, roots[0])
    if any(is_fsdp2_module(m) for m in handle.lm.modules()):
        raise TypeError(
            "the model's layers are sharded with fully_shard but the model itself is not: FSDP2 reduces the "
            "gradients of the parameters outside the sharded layers (embeddings, final norm, LM head) only when "
            "the root module is sharded too. Call fully_shard(model) after sharding the layers."
        )
    return GradientSync(handle)


# ----- no wrapper ----------------------------------------------------------------------------------------------


class GradientSync:
    """One process, or a model each rank trains on its own: nothing to reduce. The base of the wrappers below."""

    name = "single process"
    # Whether every rank must make the same module calls (the engine then skips no chunk on one rank only).
    lockstep = False
    # Whether each parameter's `.grad` holds this rank's whole gradient after a backward (the zero-gradient
    # guard reads it); not under DeepSpeed (its own partitioned buffers) nor FSDP2 (sharded DTensors).
    gradients_in_grad = True

    def __init__(self, handle: CausalLMHandle):
        self.handle = handle

    def check_lockstep(self, num_chunks: int) -> None:
        """Under `lockstep`, raise on every rank unless all ranks cut their sequences into `num_chunks` chunks."""

    def lm(self, *, reduce: bool) -> torch.nn.Module:
        """The module to call for a chunk with its LM head; `reduce`: its backward is the step's last."""
        return self.handle.lm

    def body(self, inputs: dict) -> torch.Tensor | None:
        """Run a chunk through the transformer body only (its KV is all that is needed; no LM head).

        Returns None, or a tensor that a backward through this chunk must include, seeded with zeros: engines
        that gather parameters in hooks on each module's output (ZeRO-3, FSDP2) need the backward to pass
        through every module's output, while the KV relay alone enters the layers through their keys/values.
        """
        self.handle.decoder(**inputs)
        return None

    def reduces(self) -> bool:
        """Whether this micro-batch ends the optimizer step: its last backward reduces, so every rank runs one."""
        return False

    def agree(self, sums: torch.Tensor, draw: float) -> tuple[torch.Tensor, float]:
        """What a policy deciding in stage 2 decides from, the same on every rank where ranks run in `lockstep`:
        `sums` (`[n]` float64, CPU) summed over ranks and rank 0's `draw`. Elsewhere each rank decides alone."""
        if not self.lockstep:
            return sums, draw
        # One all-reduce per decision: rank 0's draw travels in the sum, the others add zero.
        rank0 = torch.distributed.get_rank() == 0
        device = self.handle.lm.get_input_embeddings().weight.device  # NCCL reduces device tensors only
        packed = torch.cat([sums, sums.new_tensor([draw if rank0 else 0.0])]).to(device)
        torch.distributed.all_reduce(packed)
        packed = packed.cpu()
        return packed[:-1], float(packed[-1])

    def backward(self, outputs: list[torch.Tensor], seeds: list[torch.Tensor], *, reduce: bool) -> None:
        """One chunk's backward of `outputs` seeded with `seeds`; `reduce`: the step's last, which reduces."""
        torch.autograd.backward(outputs, seeds)


# ----- DistributedDataParallel -----------------------------------------------------------------------------------


def _one_token_logits(lm: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """The whole model on a chunk, its LM head on the last token only: the body's work, every module's output on
    the graph. Models without `logits_to_keep` compute all the logits (correct, slower)."""
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(lm.forward).parameters else {}
    return lm(**inputs, **keep).logits


class DDPSync(GradientSync):
    """DDP all-reduces in the backward of a forward run through the wrapper: only the step's last chunk is.

    Every other chunk calls the module inside, so DDP's reducer sees nothing; the last one, run through the
    wrapper, all-reduces the gradient that all chunks accumulated in `.grad` (bucketed, once per step).
    """

    name = "DistributedDataParallel"

    def __init__(self, handle: CausalLMHandle, ddp: torch.nn.parallel.DistributedDataParallel):
        super().__init__(handle)
        self.ddp = ddp

    def lm(self, *, reduce: bool) -> torch.nn.Module:
        return self.ddp if reduce else self.handle.lm

    def reduces(self) -> bool:
        # `no_sync()` clears require_backward_grad_sync; under torch.no_grad() there is no backward at all.
        return self.ddp.require_backward_grad_sync and torch.is_grad_enabled()


# ----- DeepSpeed ---------------------------------------------------------------------------------------------------


class DeepSpeedSync(GradientSync):
    """A DeepSpeed engine (ZeRO stage 1, 2 or 3): chunks run in one `coalesce_grad_reduction()` block per step.

    Inside the block every backward leaves its gradient on the parameters; leaving it issues one reduction
    (all-reduce for ZeRO-1/2, reduce-scatter for ZeRO-3) of the whole step's gradient. The block opens at the
    step's first chunk backward and closes after its last, spanning micro-batches under gradient accumulation.
    Call `ds.step()` once per optimizer step, after the last micro-batch.

    Chunks call the model inside the engine (`ds.module`), not the engine: `DeepSpeedEngine.forward` scales
    the gradient reaching the model's outputs by 1/gradient_accumulation_steps through hooks, but not the
    gradient reaching the KV cache, which would tilt chunks against each other. The loss normalisation is
    chunkwise's (`num_items`), as for DDP; DeepSpeed still averages over ranks and clips (default 1.0) in
    `ds.step()`. Parameter gathering under ZeRO-3 uses DeepSpeed's own hooks on every submodule.
    """

    name = "DeepSpeed"
    gradients_in_grad = False  # ZeRO moves them into its partitioned buffers

    def __init__(self, handle: CausalLMHandle, engine):
        super().__init__(handle)
        self.engine = engine
        self.stage = int(engine.zero_optimization_stage())
        # ZeRO-3 gathers each module's parameters in a collective when the module runs: every rank must run
        # the same modules in the same order, chunk for chunk.
        self.lockstep = self.stage == 3
        self._coalescing: contextlib.ExitStack | None = None
        problem = self._problem()
        if problem:
            raise TypeError(problem)

    def _problem(self) -> str | None:
        engine = self.engine
        if type(engine).__name__ == "PipelineEngine" or getattr(engine, "pipeline_parallelism", False):
            return ("DeepSpeed pipeline parallelism splits the layers across ranks and runs them micro-batch by "
                    "micro-batch itself; chunk-wise training needs every layer on each rank. Use ZeRO (stage 1-3) "
                    "without a PipelineModule.")
        if not hasattr(engine, "coalesce_grad_reduction"):
            return ("this DeepSpeed release cannot defer the gradient reduction to the step's last backward "
                    "(no engine.coalesce_grad_reduction); chunk-wise training needs it: pip install 'deepspeed>=0.19.8'")
        if self.stage not in (1, 2, 3):
            return ("DeepSpeed without ZeRO (zero_optimization.stage 0) reduces gradients inside engine.backward, "
                    "which chunk-wise training replaces; set zero_optimization.stage to 1, 2 or 3, or use "
                    "DistributedDataParallel.")
        if engine.fp16_enabled():
            return ("DeepSpeed fp16 scales the loss inside engine.backward, which chunk-wise training replaces with "
                    "its own per-chunk backward, so the fp16 gradients would never be scaled. Use bf16 "
                    "(\"bf16\": {\"enabled\": true}) or full precision.")
        return None

    def check_lockstep(self, num_chunks: int) -> None:
        if not self.lockstep:
            return
        counts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(counts, num_chunks)
        if len(set(counts)) > 1:
            raise ValueError(
                f"ZeRO-3 gathers every parameter in a collective each time a chunk runs, so all ranks must train on "
                f"sequences of the same length; here they give {counts} chunks. Pad every batch to the same length "
                "(e.g. padding='max_length', or pad_to_multiple_of=chunk_size with sequences of equal length), or use "
                "ZeRO-2 or FSDP2, which have no such constraint."
            )

    def body(self, inputs: dict) -> torch.Tensor | None:
        if self.stage < 3:
            return super().body(inputs)
        # ZeRO-3 gathers each module's parameters for backward in a hook on its output and releases them after;
        # a module reached only through its keys/values would be released without having been gathered.
        return _one_token_logits(self.handle.lm, inputs)

    def reduces(self) -> bool:
        if not torch.is_grad_enabled():
            return False
        if self.engine.gradient_accumulation_steps() > 1 and self._boundary_set() is None:
            # DeepSpeed counts micro-batches in engine.step(), which must not run inside the coalescing block.
            raise RuntimeError(
                f"the DeepSpeed config has gradient_accumulation_steps={self.engine.gradient_accumulation_steps()}, "
                "and chunk-wise training needs to be told which micro-batch ends the step: call "
                "ds.set_gradient_accumulation_boundary(False) before each micro-batch but the last and "
                "ds.set_gradient_accumulation_boundary(True) before the last, then ds.step() once (this is what "
                "accelerate and transformers.Trainer do)."
            )
        return bool(self.engine.is_gradient_accumulation_boundary())

    def _boundary_set(self) -> bool | None:
        """The boundary flag set with `set_gradient_accumulation_boundary`, None when DeepSpeed counts micro-batches."""
        return getattr(self.engine, "_is_gradient_accumulation_boundary", None)

    def backward(self, outputs, seeds, *, reduce: bool) -> None:
        if self._coalescing is None:
            stack = contextlib.ExitStack()
            try:
                stack.enter_context(self.engine.coalesce_grad_reduction())
            except NotImplementedError as error:
                raise TypeError(f"this DeepSpeed configuration cannot reduce gradients once per step ({error}); "
                                "chunk-wise training needs it. Use ZeRO stage 1-3 with fp32 or bf16.") from None
            self._coalescing = stack
        # What engine.backward runs around each backward: e.g. ZeRO-1 with bf16 weights moves each backward's
        # gradient into its fp32 accumulator, ZeRO-3 releases parameters no post-backward hook released.
        optimizer = self.engine.optimizer
        getattr(optimizer, "backward_prologue", lambda: None)()
        torch.autograd.backward(outputs, seeds)
        getattr(optimizer, "backward_epilogue", lambda: None)()
        if reduce:
            boundary = self._boundary_set()
            stack, self._coalescing = self._coalescing, None
            stack.close()  # DeepSpeed's one reduction of everything accumulated since the block opened
            if boundary is not None:
                # Leaving the block restores the flag it found on entry (the step's first micro-batch: False
                # under accumulation), and ds.step() would then skip the update. Put back this micro-batch's.
                self.engine.set_gradient_accumulation_boundary(boundary)


# ----- FSDP2 ---------------------------------------------------------------------------------------------------------


class FSDP2Sync(GradientSync):
    """A model sharded with FSDP2 (`fully_shard` on the decoder layers and on the model itself).

    Each parameter group is gathered once per step and kept gathered for all its chunks
    (`set_reshard_after_forward(False)`, applied here): one all-gather per group per step, not two per chunk
    (the cost: the whole parameters on each rank during a step). Before each chunk backward the engine sets
    `set_requires_gradient_sync`, `set_is_last_backward` and `set_reshard_after_backward` to "is this the
    step's last backward": gradients accumulate unsharded until then, and the last backward reduce-scatters
    each group once and reshards it.

    Chunks go through the root module (its pre-forward hook gathers the root's own parameters — embeddings,
    final norm, LM head — and FSDP2 takes the first module to run forward as the root): the transformer body
    alone is the whole model asked for the logits of one token (`logits_to_keep=1`), which also puts every
    module's output on the graph of a chunk that only relays KV gradient (see `GradientSync.body`).
    """

    name = "FSDP2"
    gradients_in_grad = False  # sharded DTensors: a rank's shard of the gradient may be legitimately zero

    def __init__(self, handle: CausalLMHandle, root: torch.nn.Module):
        super().__init__(handle)
        if root is not handle.lm:
            raise TypeError(
                f"apply the root fully_shard to the Hugging Face causal LM ({type(handle.lm).__name__}) itself, not to "
                f"the {type(root).__name__} around it (for a PEFT model: fully_shard(model.get_base_model())): "
                "chunkwise calls the causal LM, and FSDP2 gathers the root's parameters only when its root runs."
            )
        self.root = root
        root.set_reshard_after_forward(False)

    def body(self, inputs: dict) -> torch.Tensor:
        return _one_token_logits(self.root, inputs)

    def _user_wants_sync(self) -> bool:
        # FSDP2 has setters only; the flag `set_requires_gradient_sync` sets lives on the root's parameter groups
        # (a list since torch 2.9, one group before). Unreadable, assume it is set: at worst a reduce-scatter per
        # micro-batch instead of per step, never a wrong gradient.
        state = self.root._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:
            group = getattr(state, "_fsdp_param_group", None)
            groups = [group] if group is not None else []
        return all(getattr(group, "reduce_grads", True) for group in groups)

    def reduces(self) -> bool:
        return torch.is_grad_enabled() and self._user_wants_sync()

    def backward(self, outputs, seeds, *, reduce: bool) -> None:
        self.root.set_requires_gradient_sync(reduce)
        self.root.set_is_last_backward(reduce)
        self.root.set_reshard_after_backward(reduce)
        torch.autograd.backward(outputs, seeds)


def shard_fsdp2(model: torch.nn.Module, *, mesh=None) -> torch.nn.Module:
    """Shard `model` with FSDP2 the way chunk-wise training needs: each decoder layer, then the causal LM itself.

    Args:
        model: a Hugging Face causal LM, or a PEFT model wrapping one (its adapters are sharded with their layers).
        mesh: the 1-D device mesh to shard over; default: every rank of the default process group, on the
            model's device type.
    Returns:
        `model`, its parameters now DTensor shards (optimizers built afterwards see the shards).
    """
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard

    from chunkwise.core.handle import unwrap_causal_lm

    lm = unwrap_causal_lm(model)
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(next(lm.parameters()).device.type, (torch.distributed.get_world_size(),))
    layers = getattr(lm.get_decoder(), "layers", None)
    if layers is None:
        raise TypeError(f"{type(lm).__name__}'s decoder has no `layers` list to shard one by one; apply fully_shard to its "
                        "decoder layers yourself, then to the model")
    # Kept gathered from the step's first forward to its last backward (see FSDP2Sync; the engine sets it too).
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=False)
    fully_shard(lm, mesh=mesh, reshard_after_forward=False)
    return model
