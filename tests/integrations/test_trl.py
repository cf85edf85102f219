"""TRL drop-in: one step of `ChunkwiseDPOTrainer` / `ChunkwiseGRPOTrainer` has TRL's gradient (float64).

The chunk-wise side is the trainer's whole `training_step` (Trainer's step around the mixin's
`compute_loss`) on a batch TRL built (its collator; for GRPO its own generation, rewards and
advantages). The reference is TRL's objective computed on the same batch from one plain float64
full-sequence forward, with the loss formulas copied from TRL 1.16's `_compute_loss` (normalisations
and gradient-accumulation scaling included): equal within 1e-10.

TRL's own `compute_loss` is checked too, within what float32 allows: its fused LM head computes log-softmax in
float32 even for a float64 model, and its loss arithmetic runs on those float32 log-probs, so it cannot be a float64
reference. The tolerance is derived from the sizes of the terms TRL computes, not from the result (`TRLFloat32Errors`,
`compare`): a GRPO loss near 0 is a sum of terms ~1e-2 (a flat 1e-5 of the result failed on an Intel Xeon at 2.3e-5,
within float32). For GRPO the reference runs each row without its padding (see `unpadded_completion_logps`).

GRPO: before the step the policy is perturbed, so TRL's old log-probs differ from the current ones and
the clip is active. TRL pads GRPO prompts on the left; the mixin re-packs rows with right padding,
which rotary position embeddings do not see.
"""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from reference import U32, float32_log_softmax_error, loss_and_gradients, max_relative_error, trainable_grads  # noqa: E402
from trl.trainer.utils import use_adapter  # noqa: E402

from chunkwise.data.synthetic import DEMO_TASK  # noqa: E402
from chunkwise.integrations.trainer import ChunkwiseConfig  # noqa: E402
from chunkwise.integrations.trl import ChunkwiseDPOTrainer, ChunkwiseGRPOTrainer, right_padded  # noqa: E402
from chunkwise.models.loading import add_lora  # noqa: E402
from chunkwise.models.presets import build_tiny_model  # noqa: E402

TOL = 1e-10
COMMON = dict(report_to=[], bf16=False, activation_checkpointing=False, save_strategy="no", logging_steps=1,
              use_cpu=True, seed=0, dataloader_num_workers=0)


def words(generator, count, prefix, size):
    return " ".join(f"{prefix}{int(i)}" for i in torch.randint(size, (count,), generator=generator))


def policy_model(lora: bool, seed: int = 0):
    model = build_tiny_model("demo-llama", dtype=torch.float64, seed=seed)
    return add_lora(model, rank=4, alpha=8, random_b=0.1, seed=seed + 7) if lora else model


def perturb(model):
    """Move the trained parameters a little (seeded)."""
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def tokenizer():
    tok = DEMO_TASK.tokenizer()
    tok.padding_side = "left"
    return tok


EXACT_OPS = {"view", "reshape", "unsqueeze", "squeeze", "chunk", "split", "__getitem__", "masked_fill", "masked_scatter",
             "gather", "cat", "stack", "clamp", "min", "max", "minimum", "maximum", "where", "detach", "contiguous",
             "new_zeros", "zeros_like", "expand", "t", "transpose", "permute", "flatten", "narrow", "select", "neg", "__neg__",
             "abs", "clone"}  # exact in float32


class TRLFloat32Errors(torch.overrides.TorchFunctionMode):
    """A first-order bound on how far TRL's loss, computed partly in float32, can be from the same formula in exact
    arithmetic on the same float64 model, from the sizes of the quantities it computes (not from the result).

    Two sources, both not ours:
    * TRL's fused LM head (`trl/kernels/chunked_logprob.py`, run on CPU by `_forward_tile`): the float64 hidden
      states are projected in float64, then each logit is rounded to float32, divided by the temperature in float32,
      and the log-softmax is an online log-sum-exp in float32 over the V logits: per token, `delta_t` =
      `reference.float32_log_softmax_error` (its docstring derives it). Its effect on the loss is at most
      sum_t |dL/dlog p_t| delta_t, with dL/dlog p_t read from the autograd graph of TRL's own loss (a reference
      model's log-probs, computed without a graph, enter DPO's loss with the opposite sign of the policy's at the
      same position: the same |dL/dlog p_t|).
    * TRL's loss arithmetic on those float32 log-probs (ratios, clipping, KL, masked sums, means) runs in float32.
      Each elementwise result x is rounded by at most 2u|x| (exp/log/logsigmoid to 1 ulp; +,-,*,/ to u), a sum or
      mean over n terms by at most (n - 1)u sum|terms| (+ u|x|); each contributes |dL/dx| times that. This mode
      records every float32 result with a graph during `trl_loss` and reads dL/dx after its backward. Without a
      graph (a reference model's per-row sums in DPO) the same rule is applied by hand in `bound`.
    Second-order terms are O(u^2 x sizes) and are covered by the factor 2 on the total.
    """

    def __init__(self):
        super().__init__()
        self.results, self.heads = [], []

    def __enter__(self):
        import trl.trainer.utils as trl_utils

        fused, heads = trl_utils._ChunkedLogProbFunction, self.heads

        class Recorded:  # the fused head TRL's forward calls: keep its inputs and its per-token log-probs
            @staticmethod
            def apply(*args):
                out = fused.apply(*args)
                if out[0].requires_grad:
                    out[0].retain_grad()
                heads.append((args, out[0]))
                return out

        self._restore = (trl_utils, fused)
        trl_utils._ChunkedLogProbFunction = Recorded
        return super().__enter__()

    def __exit__(self, *exc):
        module, fused = self._restore
        module._ChunkedLogProbFunction = fused
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.requires_grad and name not in EXACT_OPS:
            first = args[0] if args and isinstance(args[0], torch.Tensor) else None
            terms = None
            if name in ("sum", "mean") and first is not None:  # the same reduction of |terms| (mean: /n included)
                terms = func(first.detach().abs(), *args[1:], **kwargs), first.numel() // max(out.numel(), 1)
            out.retain_grad()
            self.results.append((out, terms))
        return out

    def head_errors(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per fused-head call: (delta_t, TRL's log p_t, exact float64 log p_t of the same hidden states, dL/dlog p_t),
        flat over TRL's positions. A reference model's call (no graph) takes the policy call's |dL/dlog p_t|."""
        out = []
        with torch.no_grad():
            policy = [logps.grad for _, logps in self.heads if logps.grad is not None]
            for args, logps in self.heads:
                hidden, weight, bias, targets, temperature = args[:5]
                logits = hidden.double() @ weight.double().t() + (0 if bias is None else bias.double())
                delta = float32_log_softmax_error(logits, targets, temperature=temperature)
                exact = torch.log_softmax(logits / temperature, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                grad = logps.grad if logps.grad is not None else next(g for g in policy if g.shape == logps.shape)
                out.append((delta.view(grad.shape), logps.detach().double(), exact.view(grad.shape), grad.double()))
        return out

    def bound(self, *, row_length: int, reference_logps: torch.Tensor | None = None) -> float:
        """The bound on |TRL's loss - the exact loss| (see the class). `row_length`: positions per row of TRL's
        log-probs; `reference_logps` `[B, n]`: the reference's float64 log-probs where it ran another layout than
        TRL's (matched to the last n positions of each row)."""
        total = 0.0
        with torch.no_grad():
            for (args, logps), (delta, trl_logps, exact, grad) in zip(self.heads, self.head_errors()):
                total += (grad.abs() * delta).sum().item()
                if logps.grad is None:  # a reference model's log-probs: also their float32 sum over each row
                    row_grad = grad.view(-1, row_length).abs().amax(-1)  # dL/d(row sum), the same along a row
                    total += (row_grad * (row_length - 1) * U32 * trl_logps.view(-1, row_length).abs().sum(-1)).sum().item()
                elif reference_logps is not None:
                    # Same formula and float64 model, another layout (GRPO's reference runs each row unpadded, TRL
                    # left-padded rows, whose shifted positions meet transformers' float32 rotary tables): the exact
                    # difference the layout makes, computed from both layouts' float64 log-probs, not bounded.
                    n = reference_logps.shape[1]
                    shift = exact.view(-1, row_length)[:, -n:] - reference_logps.double()
                    total += (grad.view(-1, row_length)[:, -n:].abs() * shift.abs()).sum().item() / 2  # (x2 below)
            for x, terms in self.results:
                if x.grad is None:
                    continue
                g = x.grad.double().abs()
                total += 2 * U32 * (g * x.detach().double().abs()).sum().item()
                if terms is not None:
                    summed, n = terms
                    total += (n - 1) * U32 * (g * summed.double()).sum().item()
        return 2 * total

    def sum_bound(self, weight: float, row_length: int) -> float:
        """Bound on the float32 error of w x (sums over rows of TRL's log-probs, then a few float32 operations on those
        sums), for a statistic such as DPO's logged reward margin: each scored log-prob enters with weight +-w.
        Per token delta_t + (row_length + 3)u|log p_t| (the row sum, two differences and the mean), times 2."""
        total = 0.0
        for delta, trl_logps, _, grad in self.head_errors():
            scored = grad != 0
            total += weight * (delta[scored].sum() + (row_length + 3) * U32 * trl_logps[scored].abs().sum()).item()
        return 2 * total

    def largest_logprob_error(self) -> float:
        """The largest delta_t over scored tokens: the relative error of TRL's float32 probabilities p_v = exp(log p_v)
        in its backward, so of each seed g_t (1[v = y] - p_v) / T it sends into the float64 model."""
        return max(delta[grad != 0].max().item() for delta, _, _, grad in self.head_errors())


def compare(trainer, model, inputs, plain_loss, trl_loss, reference_logps=None):
    """The chunk-wise training_step's gradient vs the plain float64 reference (1e-10), and TRL's own loss and gradient.

    TRL's loss value: within `TRLFloat32Errors.bound`, derived from the sizes of the float32 quantities TRL computes,
    not from the result (a GRPO loss can sit near 0 while its terms are ~1e-2 each). The bound must also stay below a
    tenth of |loss|, so that a wrong normaliser or a missing factor in `plain_loss` (>= 1e-1 of the loss) still fails:
    measured, the bounds sit at 5e-5..3.3e-2 of |loss| and TRL's errors at 1e-4..1.3e-2 of the bounds.

    TRL's gradient: float64 backprop (the model and the head's matrix products are float64) of the seeds
    dL/dz_tv = g_t (1[v = y] - p_v) / T that TRL's head computes in float32. To first order each seed is off by at most
    eps = max_t delta_t (the error of log p_v, so the relative error of p_v) plus a few u relative; the error of a
    parameter's gradient is then at most eps times sum_tv |seed_tv| |dz_tv/dtheta|, which is that gradient's size when
    the terms do not cancel. eps is computed per case (6.1e-6 here, dominated by the worst case (V - 1)u of the
    float32 sum over V = 77 logits); the tolerance is 10 eps of each tensor's largest entry (a cancellation factor of
    up to 10; measured errors 3.5e-7..5.4e-7, well inside), and must stay <= 1e-3, so a lost chunk, a wrong normaliser
    or a missing factor (>= 1e-1 relative) still fails. (It was a flat 1e-5: below 2 eps, no room for any cancellation.)
    """
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps  # as Trainer's loop sets it
    expected_loss, expected = loss_and_gradients(model, plain_loss)
    with TRLFloat32Errors() as errors:
        trl_value, trl_grads = loss_and_gradients(model, trl_loss)
    model.zero_grad(set_to_none=True)
    reported = trainer.training_step(model, inputs, None)  # as the loop calls it (GRPO requires the argument)
    error = max_relative_error(trainable_grads(model), expected)
    assert error <= TOL, f"gradient error {error:.3g} against the float64 reference"

    if "input_ids" in inputs:  # DPO: TRL scores every position of each row
        row_length = inputs["input_ids"].shape[1] - 1
    else:  # GRPO: prompt and completion
        row_length = inputs["prompt_ids"].shape[1] + inputs["completion_ids"].shape[1] - 1
    with torch.no_grad():
        reference = None if reference_logps is None else reference_logps()
    bound = errors.bound(row_length=row_length, reference_logps=reference)
    value_error = abs(trl_value.item() - expected_loss.item())
    assert value_error <= bound, f"TRL's loss off by {value_error:.3g}, over its float32 bound {bound:.3g}"
    assert bound < 0.1 * abs(expected_loss.item()), f"float32 bound {bound:.3g} too loose to catch a 1e-1 error"
    gradient_tol = 10 * errors.largest_logprob_error()
    assert gradient_tol <= 1e-3 and max_relative_error(trl_grads, expected) <= gradient_tol
    return reported, expected_loss.item(), errors, row_length


def completion_logps(model, input_ids, attention_mask, completion_mask, temperature=1.0):
    """[N, T-1] float64 log-prob of each next token, 0 outside the completion (shifted mask), one plain forward."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1] / temperature
    picked = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return picked * completion_mask[:, 1:]


# ----- DPO ----------------------------------------------------------------------------------------------


def preference_dataset():
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(4):
        key, value = f"k{i}", f"v{i}"
        rows.append({
            "prompt": f"<bos> {key} {value} {words(generator, 9 + 3 * i, 'f', 8)} ? {key}",
            "chosen": f" {value} {words(generator, 1 + i, 'f', 8)}",
            "rejected": f" v{i + 10} {words(generator, 3 - i % 2, 'f', 8)}",
        })
    return Dataset.from_list(rows)


@pytest.mark.parametrize(
    "loss_type, lora, precompute",
    [("sigmoid", False, False), ("ipo", True, False), ("sigmoid", False, True)],
    ids=["dpo-full-ref-model", "ipo-lora-ref-adapter", "dpo-precomputed-ref"],
)
def test_dpo_step_equals_trl_loss_gradient(tmp_path, loss_type, lora, precompute):
    model = policy_model(lora)
    ref_model = None if lora else build_tiny_model("demo-llama", dtype=torch.float64, seed=1)
    args = trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                         beta=0.3, loss_type=[loss_type], max_length=None, precompute_ref_log_probs=precompute, **COMMON)
    trainer = ChunkwiseDPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=preference_dataset(),
                                  processing_class=tokenizer(), chunkwise=ChunkwiseConfig(chunk_size=5))
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert inputs["input_ids"].shape[1] > 10  # several chunks of 5, cutting prompts and responses

    ids, mask, completion = inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
    with torch.no_grad():
        if precompute:  # TRL's reference pass over the dataset, before training: the batch carries its results
            ref = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
            perturb(model)  # the policy has moved away from the reference since
        elif lora:  # TRL keeps a copy of a pre-trained adapter as the "ref" adapter; let the trained one move away
            perturb(model)
            with use_adapter(model, "ref"):
                ref = completion_logps(model, ids, mask, completion).sum(1)
        else:
            ref = completion_logps(ref_model, ids, mask, completion).sum(1)

    def plain_loss():  # TRL 1.16 DPOTrainer._compute_loss, then Trainer's division by the accumulation steps
        chosen, rejected = completion_logps(model, ids, mask, completion).sum(1).chunk(2)
        ref_chosen, ref_rejected = ref.chunk(2)
        delta = (chosen - ref_chosen) - (rejected - ref_rejected)
        if loss_type == "sigmoid":
            loss = -torch.nn.functional.logsigmoid(args.beta * delta)
        else:  # "ipo": log-ratios averaged over the completion tokens
            chosen_mask, rejected_mask = completion.chunk(2)
            average = (chosen - ref_chosen) / chosen_mask.sum(1) - (rejected - ref_rejected) / rejected_mask.sum(1)
            loss = (average - 1 / (2 * args.beta)) ** 2
        return loss.mean() / args.gradient_accumulation_steps

    def trl_loss():
        return trl.DPOTrainer.compute_loss(trainer, model, inputs) / args.gradient_accumulation_steps

    trainer._metrics["train"].clear()
    reported, expected, errors, row_length = compare(trainer, model, inputs, plain_loss, trl_loss)
    assert reported.item() == pytest.approx(expected, rel=TOL)  # Trainer's logged value: loss / steps
    trl_margin, margin = trainer._metrics["train"]["rewards/margins"]  # logged by TRL's compute_loss, then by ours
    # TRL's margin is beta x the mean over pairs of sums of float32 log-probs: each scored log-prob enters with weight
    # beta / pairs; ours is float64. The bound must stay below a tenth of the margin (a 1e-1 error still fails).
    margin_bound = errors.sum_bound(args.beta / (ids.shape[0] // 2), row_length)
    assert margin != 0.0 and abs(margin - trl_margin) <= margin_bound < 0.1 * abs(margin), (margin, trl_margin, margin_bound)


def test_dpo_mixin_refuses_what_it_cannot_train(tmp_path):
    args = trl.DPOConfig(output_dir=str(tmp_path), loss_type=["hinge"], ld_alpha=0.5, **COMMON)
    with pytest.raises(ValueError, match=r"(?s)loss_type=\['hinge'\].*ld_alpha"):
        ChunkwiseDPOTrainer(model=policy_model(False), ref_model=build_tiny_model("demo-llama", dtype=torch.float64, seed=1),
                            args=args, train_dataset=preference_dataset(), processing_class=tokenizer())


def test_trl_mixins_refuse_deepspeed(tmp_path):
    # TRL's training_step would hand the detached loss to accelerate's DeepSpeed backward/step, which never
    # see the engine's gradients: refused rather than silently not training.
    trainer = ChunkwiseDPOTrainer(model=policy_model(False), ref_model=build_tiny_model("demo-llama", dtype=torch.float64, seed=1),
                                  args=trl.DPOConfig(output_dir=str(tmp_path), **COMMON), train_dataset=preference_dataset(),
                                  processing_class=tokenizer())
    trainer._check_trainer_setup()  # as built: accepted
    trainer.is_deepspeed_enabled = True  # what Trainer sets when accelerate holds a DeepSpeed plugin
    with pytest.raises(ValueError, match="DeepSpeed.*train without a DeepSpeed config"):
        trainer._check_trainer_setup()


# ----- GRPO ---------------------------------------------------------------------------------------------


def unpadded_completion_logps(model, inputs, temperature):
    """[B, C] float64 log-probs of each completion token, 0 after the completion: one forward per row over its
    real tokens only. (TRL's own forward runs the left-padded batch, which shifts each row's positions;
    transformers computes rotary tables in float32, so that differs from unpadded rows by ~4e-8.)"""
    rows = []
    for prompt, prompt_mask, completion, completion_mask in zip(
        inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"], inputs["completion_mask"]
    ):
        prompt, completion_length = prompt[prompt_mask.bool()], int(completion_mask.sum())
        tokens = torch.cat([prompt, completion[:completion_length]]).unsqueeze(0)
        logits = model(input_ids=tokens).logits[0, len(prompt) - 1 : -1] / temperature
        picked = torch.log_softmax(logits, dim=-1).gather(-1, completion[:completion_length].unsqueeze(-1)).squeeze(-1)
        rows.append(torch.nn.functional.pad(picked, (0, completion.shape[0] - completion_length)))
    return torch.stack(rows)


def prompt_dataset():
    generator = torch.Generator().manual_seed(1)
    return Dataset.from_list([{"prompt": f"<bos> k{i} v{i} {words(generator, 6 + 5 * i, 'f', 8)} ? k{i}"} for i in range(4)])


def reward(completions, **kwargs):
    return [float(sum(map(ord, text)) % 7) for text in completions]


@pytest.mark.parametrize(
    "loss_type, lora",
    [("grpo", True), ("bnpo", False), ("dr_grpo", True), ("dapo", False)],
)
def test_grpo_step_equals_trl_loss_gradient(tmp_path, loss_type, lora):
    bias_correction = loss_type in ("grpo", "dapo")  # TRL's default; the others without
    model = policy_model(lora)
    if not lora:  # TRL loads the reference from the model's folder: the saved starting point
        model.save_pretrained(tmp_path / "start")
        model = type(model).from_pretrained(tmp_path / "start", dtype=torch.float64)
    # Two accumulation steps (= steps_per_generation): TRL generates for both at once and divides the loss by 2
    # (dapo: by its token count over the generation batch, rescaled to one micro-batch).
    args = trl.GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2,
                          gradient_accumulation_steps=2,
                          max_completion_length=6, beta=0.05, epsilon=0.1, num_iterations=2, loss_type=loss_type,
                          temperature=0.9, use_bias_correction_kl=bias_correction, **COMMON)
    trainer = ChunkwiseGRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=prompt_dataset(),
                                   processing_class=tokenizer(), chunkwise=ChunkwiseConfig(chunk_size=4))
    model.train()
    torch.manual_seed(0)
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert (inputs["prompt_mask"] == 0).any(), "left-padded prompts: the re-packing is exercised"
    assert inputs.get("old_per_token_logps") is not None and inputs.get("ref_per_token_logps") is not None
    perturb(model)  # the policy moves after generation: ratios != 1, some outside the clip range

    with torch.no_grad():
        ratio = torch.exp(unpadded_completion_logps(model, inputs, args.temperature) - inputs["old_per_token_logps"])
    outside = ((ratio - 1).abs() > args.epsilon) & inputs["completion_mask"].bool()
    assert outside.any() and not outside[inputs["completion_mask"].bool()].all(), "the clip is active on some tokens"

    def plain_loss():  # TRL 1.16 GRPOTrainer._compute_loss, token-level importance sampling
        logps = unpadded_completion_logps(model, inputs, args.temperature)
        completion = inputs["completion_mask"].double()
        ratio = torch.exp(logps - inputs["old_per_token_logps"])
        advantages = inputs["advantages"].unsqueeze(1)
        per_token = -torch.min(ratio * advantages, torch.clamp(ratio, 1 - args.epsilon, 1 + args.epsilon) * advantages)
        gap = inputs["ref_per_token_logps"] - logps
        kl = torch.exp(gap) - gap - 1
        per_token = per_token + args.beta * (kl * ratio if args.use_bias_correction_kl else kl)
        steps = args.gradient_accumulation_steps
        if loss_type == "grpo":
            return ((per_token * completion).sum(-1) / completion.sum(-1).clamp(min=1.0)).mean() / steps
        if loss_type == "bnpo":
            return (per_token * completion).sum() / completion.sum().clamp(min=1.0) / steps
        if loss_type == "dr_grpo":
            return (per_token * completion).sum() / (per_token.shape[0] * args.max_completion_length) / steps
        # dapo, one process: num_items_in_batch counts the generation batch's tokens
        return (per_token * completion).sum() / (inputs["num_items_in_batch"].clamp(min=1.0) * steps / args.steps_per_generation)

    def trl_loss():
        return trl.GRPOTrainer.compute_loss(trainer, model, inputs)

    # A later step on this generation (num_iterations=2): TRL's _prepare_inputs hands out the buffered micro-batch
    # _step % steps_per_generation, the one in `inputs`, without generating again.
    assert args.steps_per_generation == 2 and inputs["advantages"].shape[0] == 4
    assert inputs["num_items_in_batch"] > inputs["completion_mask"].sum(), "num_items_in_batch spans the generation batch"
    trainer._step = 2
    reported, expected, _, _ = compare(trainer, model, inputs, plain_loss, trl_loss,
                                       reference_logps=lambda: unpadded_completion_logps(model, inputs, args.temperature))
    assert reported.item() == pytest.approx(expected, rel=TOL)


def test_right_padded_keeps_every_token_in_order():
    inputs = {
        "prompt_ids": torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]]),
        "prompt_mask": torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]),
        "completion_ids": torch.tensor([[11, 12, 0], [13, 0, 0]]),
        "completion_mask": torch.tensor([[1, 1, 0], [1, 0, 0]]),
        "tool_mask": torch.tensor([[1, 0, 1], [1, 1, 1]]),
    }
    batch, positions, keep = right_padded(inputs)
    assert batch["input_ids"].tolist() == [[5, 6, 11, 12, 0], [7, 8, 9, 10, 13]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, -100, 11, -100, -100], [-100, -100, -100, -100, 13]]
