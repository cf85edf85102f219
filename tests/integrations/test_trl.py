"""TRL drop-in: one step of `ChunkwiseDPOTrainer` / `ChunkwiseGRPOTrainer` has TRL's gradient (float64).

The chunk-wise side is the trainer's whole `training_step` (Trainer's step around the mixin's
`compute_loss`) on a batch TRL built (its collator; for GRPO its own generation, rewards and
advantages). The reference is TRL's objective computed on the same batch from one plain float64
full-sequence forward, with the loss formulas copied from TRL 1.16's `_compute_loss` (normalisations
and gradient-accumulation scaling included): equal within 1e-10.

TRL's own `compute_loss` is checked too, but only to 1e-5: its fused LM head computes log-softmax in
float32 even for a float64 model (measured: 4e-7 relative), so it cannot be a float64 reference. For
GRPO the reference runs each row without its padding (see `unpadded_completion_logps`).

GRPO: before the step the policy is perturbed, so TRL's old log-probs differ from the current ones and
the clip is active. TRL pads GRPO prompts on the left; the mixin re-packs rows with right padding,
which rotary position embeddings do not see.
"""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from reference import loss_and_gradients, max_relative_error, trainable_grads  # noqa: E402
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


def compare(trainer, model, inputs, plain_loss, trl_loss):
    """The chunk-wise training_step's gradient vs the plain float64 reference (1e-10) and TRL's own (1e-5)."""
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps  # as Trainer's loop sets it
    expected_loss, expected = loss_and_gradients(model, plain_loss)
    trl_value, trl_grads = loss_and_gradients(model, trl_loss)
    model.zero_grad(set_to_none=True)
    reported = trainer.training_step(model, inputs, None)  # as the loop calls it (GRPO requires the argument)
    error = max_relative_error(trainable_grads(model), expected)
    assert error <= TOL, f"gradient error {error:.3g} against the float64 reference"
    assert max_relative_error(trl_grads, expected) <= 1e-5 and trl_value.item() == pytest.approx(expected_loss.item(), rel=1e-5)
    return reported, expected_loss.item()


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
    reported, expected = compare(trainer, model, inputs, plain_loss, trl_loss)
    assert reported.item() == pytest.approx(expected, rel=TOL)  # Trainer's logged value: loss / steps
    trl_margin, margin = trainer._metrics["train"]["rewards/margins"]  # logged by TRL's compute_loss, then by ours
    assert margin != 0.0 and margin == pytest.approx(trl_margin, rel=1e-5)


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
    reported, expected = compare(trainer, model, inputs, plain_loss, trl_loss)
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
