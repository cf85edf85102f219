"""`TrainConfig`: the settings of one `chunkwise train` run, each declared once with its docstring.

The command line's `chunkwise train` options are generated from these fields (`chunkwise.cli.options`):
the field's docstring is the option's help, its type the option's type, `TrainConfig.CHOICES` its choices.
Every check lives in `TrainConfig.check` (the engine's own settings in `chunkwise.core.config.check_engine_settings`),
with messages that name the command-line option, as users of both the CLI and the Python API read them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

# Names only (no torch): `chunkwise train` checks its options with this module before anything heavy loads.
from chunkwise.attention.names import ATTENTION_CHOICES
from chunkwise.core.config import OptionNames, check_choice, check_engine_settings
from chunkwise.core.names import OBJECTIVE_NAMES, SAMPLING_POLICIES
from chunkwise.data.names import DEPRECATED_PACKING, PACKING_MODES, PAIR_DEPTHS, SYNTHETIC
from chunkwise.models.names import DEMO_MODEL
from chunkwise.models.quantize import QUANTIZATION_FIELDS, Quantization, check_quantized_training
from chunkwise.utils.precision import PRECISIONS

METHODS = ("seco", "spaco", "full")
REPORT_TO = ("none", "tensorboard")
ZERO_STAGES = (1, 2, 3)

# The demo's settings, tuned to learn the recall task in about two minutes on two CPU cores.
DEMO_SETTINGS = dict(seq_len=2048, chunk_size=512, batch_size=8, steps=400, lr=1e-2, warmup_ratio=0.05, adam_beta2=0.98, eval_every=100)
# Settings a resumed run may change without changing the trajectory of the steps already planned
# (`attention` changes float rounding only, `offload_kv` nothing at all; `output`: the run is identified by the
# id in its chunkwise_run.json, wherever it now lies). Not `steps`: the learning-rate schedule depends on it.
RESUMABLE_CHANGES = {"output", "attention", "offload_kv", "dist_timeout", "memory", "checkpoint_every", "keep_checkpoints", "log_every", "max_bad_steps", "resume", "overwrite", "device", "progress"}
OPTION_NAMES = OptionNames()  # messages name settings as command-line options: `--chunk-size`


class TrainingError(Exception):
    """Training cannot go on (e.g. too many non-finite losses in a row); the message says why."""


@dataclass
class TrainConfig:
    """Settings of one training run. `None` means "the default for this model/data" (resolved by `resolved()`).

    Flat rather than grouped: run.json, the checkpoints' state.json and `--resume`'s comparison of settings
    read it field by field, and a field's name is its option's (`chunk_size` → `--chunk-size`).
    """

    # Each setting with a fixed set of values: the one list that `check` tests and `--help` shows.
    CHOICES = {
        "method": METHODS, "objective": OBJECTIVE_NAMES, "sampling": SAMPLING_POLICIES, "attention": ATTENTION_CHOICES,
        "dtype": PRECISIONS, "packing": PACKING_MODES, "zero": ZERO_STAGES, **Quantization.CHOICES,
        "report_to": REPORT_TO, "pair_depth": PAIR_DEPTHS,
    }

    model: str | None = None
    """Hub id, local directory, or preset: tiny-llama, ... (random weights; they read text with a byte tokenizer built
    in code, nothing downloaded) or a bench shape (llama-1b, llama-8b, ...); None: the demo model (a small Llama,
    trained from scratch)."""
    data: str | None = None
    """.txt file or folder, .jsonl, .json/.csv/.parquet, a `save_to_disk` folder, a hub dataset, or
    "synthetic" (the key→value recall task, generated on the fly; the default)."""
    pair_depth: str = "start"
    """The synthetic task only: where each sequence states its key→value pairs, "start" (right after <bos>; the
    default) or "random" (a uniformly random depth in the filler, drawn per sequence; the question stays at the end)."""
    output: str = "runs/chunkwise"
    """Run directory: metrics.jsonl, loss.png, checkpoints/, model/."""
    method: str = "seco"
    """"seco" (exact gradient), "spaco" (sampled chunks) or "full" (ordinary backprop, for comparison)."""
    objective: str = "cross-entropy"
    """"cross-entropy" (language modelling / instruction tuning), or a preference objective on prompt /
    chosen / rejected data: "dpo", "ipo" (both against a reference model) or "simpo" (reference-free)."""
    beta: float | None = None
    """Preference objectives: β (default 0.1 for dpo and ipo, 2.0 for simpo)."""
    ref_model: str | None = None
    """dpo / ipo: the reference model (hub id, folder or preset). Default: the trained model with its LoRA
    adapter disabled, or, for full fine-tuning, a frozen copy of --model."""
    chunk_size: int | str | None = None
    """Tokens per chunk (default 1024; the demo 512), or "auto": the largest that fits the device's free
    memory less a 10% margin, as `chunkwise plan` predicts it (decided before any weight loads)."""
    memory: str | None = None
    """With chunk_size "auto": plan for this much memory (e.g. 24GiB) instead of the device's free memory."""
    budget: int | None = None
    """SpaCO: chunks backpropagated per step (required with method="spaco")."""
    sampling: str = "uniform"
    """SpaCO selection: "uniform" (the paper's: exactly `budget` chunks), "bernoulli" (exactly unbiased), or "adaptive"
    (decided in stage 2: chunks with targets kept, exactly unbiased; docs/spaco.md)."""
    max_compensation: float | None = None
    """SpaCO: cap on the compensation factor (the paper uses 2.0); None: no cap."""
    attention: str = "chunkwise"
    """seco/spaco: "chunkwise" (the engine's attention for SDPA models: no repeated KV heads or mask kept
    for backward) or "model" (the model's own attention throughout)."""
    offload_kv: bool = False
    """seco/spaco: keep the KV cache and its gradient in host memory, streamed to the device block by block."""
    seq_len: int | None = None
    """Tokens per training sequence (default 4096; the demo 2048)."""
    batch_size: int | None = None
    """Sequences (preference objectives: pairs) per micro-batch (default 1; the demo 8)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (the loss is normalised over all of their targets)."""
    steps: int | None = None
    """Optimizer steps (default 1000; the demo 400)."""
    lr: float | None = None
    """Peak learning rate (default 2e-4 with LoRA, 2e-5 full fine-tuning; the demo 1e-2)."""
    warmup_ratio: float | None = None
    """Fraction of the steps spent warming the learning rate up linearly, then cosine decay to 0 (default 0.05)."""
    weight_decay: float = 0.0
    """AdamW's weight decay (default 0)."""
    adam_beta2: float | None = None
    """AdamW's second-moment decay (default 0.999; the demo 0.98). The first is 0.9."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this (default 1.0; None: no clipping, the norm is still logged)."""
    seed: int = 0
    """Seed of the model's initialisation, the data order, dropout and SpaCO's sampling (default 0)."""
    dtype: str = "auto"
    """"auto" (bfloat16 on a GPU that has it, else float32), "float32", "bfloat16", "float16" (autocast; with
    a loss scaler), or "float64" (for exactness checks)."""
    device: str = "auto"
    """"auto" (a GPU if there is one, else the CPU), "cpu", "cuda" or "cuda:N"."""
    lora_r: int | None = None
    """LoRA rank; 0 trains every parameter. Default 8 with `--model`, 0 for the demo (trained from scratch)."""
    lora_alpha: int | None = None
    """LoRA scaling numerator (default 2 × rank: 16 for r=8, as in the paper)."""
    lora_dropout: float = 0.0
    """LoRA dropout (default 0)."""
    lora_targets: str = "q_proj,v_proj"
    """Comma-separated names of the modules LoRA adapts (default q_proj,v_proj)."""
    load_in_4bit: bool = False
    """Load the base quantized to 4 bits (bitsandbytes; QLoRA): only LoRA adapters train on it."""
    load_in_8bit: bool = False
    """Load the base quantized to 8 bits (bitsandbytes LLM.int8): only LoRA adapters train on it."""
    bnb_4bit_quant_type: str = "nf4"
    """With --load-in-4bit: "nf4" (normal-float, QLoRA's) or "fp4"."""
    bnb_4bit_use_double_quant: bool = False
    """With --load-in-4bit: quantize the block scales too (about 0.4 bit less per weight)."""
    bnb_4bit_compute_dtype: str | None = None
    """With --load-in-4bit: what the 4-bit layers compute in, float32, bfloat16 or float16 (default: --dtype's)."""
    text_field: str = "text"
    """Field of JSONL / dataset records with the text (default text)."""
    prompt_field: str | None = None
    """Instruction data: the field with the prompt, whose tokens are context only (not trained on); it is joined
    to the response with nothing between them but --response-separator. Preference data: the field with the
    prompt (default prompt)."""
    response_field: str | None = None
    """Instruction data: the field with the response, whose tokens are the targets."""
    response_separator: str = ""
    """Instruction data: text put between the prompt and the response, as context (default: none, the two are
    joined as they are; e.g. --response-separator $'\\n' in bash)."""
    messages_field: str | None = None
    """Conversations (TRL's format): the field with a list of {"role", "content"} turns, rendered with the
    tokenizer's chat template; only the assistant turns are trained on. Rows without --text-field but with a
    "messages" field are read so without this option."""
    chosen_field: str = "chosen"
    """Preference data: the field with the preferred response (the prompt is in --prompt-field, default "prompt")."""
    rejected_field: str = "rejected"
    """Preference data: the field with the dispreferred response."""
    split: str = "train"
    """Split of a dataset `data` names (default train)."""
    glob: str = "*.txt"
    """Files read from a --data or --eval-data folder, one document each: comma-separated patterns matched in
    every subfolder (default *.txt; e.g. "*.txt,*.md")."""
    packing: str | None = None
    """"documents" (default for text: several whole documents per row, kept apart: positions restart at 0
    and attention stops at each document start; a document longer than seq_len is cut into pieces, each
    its own document), "concat" (documents concatenated and cut into seq_len blocks: a document attends to
    the ones before it in its row and its positions continue theirs) or "truncate" (one row per document,
    cut at seq_len; default for instruction data). "pack" is the old name of concat (deprecated)."""
    checkpoint_every: int = 100
    """Write a checkpoint every N steps (0: only at the end and on interruption)."""
    keep_checkpoints: int = 1
    """How many of the latest checkpoints to keep (default 1)."""
    eval_every: int | None = None
    """Held-out loss, perplexity and accuracy every N steps (and at the start and end); 0: never. Default:
    100 with `eval_data` or on the demo, else 0."""
    eval_data: str | None = None
    """Held-out data, in any format `data` takes, read like it (tokenizer, fields, seq_len, packing) and
    scored chunk by chunk (`chunkwise.recipes.train.heldout`). None: the synthetic task's held-out stream when training on it."""
    eval_split: str | None = None
    """Split of a dataset `eval_data` names (default: `split`), e.g. "validation"."""
    eval_fraction: float = 0.0
    """Without --eval-data: hold out this fraction of --data's documents (at least one), drawn with --seed, as
    held-out data, and train on the rest. Default 0: off, every document trains."""
    report_to: str = "none"
    """Also send the metrics to "tensorboard" (event files in <output>/tensorboard; pip install tensorboard);
    "none" (default): metrics.jsonl and loss.png only."""
    log_every: int = 10
    """Write a progress line every N steps when the output is not a terminal (default 10)."""
    max_bad_steps: int = 5
    """Stop after this many steps in a row with a non-finite loss or gradient (each is skipped)."""
    allow_extrapolation: bool = False
    """Train on sequences longer than the model's position limit (warn instead of refusing)."""
    zero: int | None = None
    """Under torchrun: DeepSpeed ZeRO stage (1: optimizer state sharded across ranks, 2: gradients too, 3:
    parameters too) instead of DDP; None: DDP. Needs pip install 'chunkwise[deepspeed]'."""
    fsdp: bool = False
    """Under torchrun: shard parameters, gradients and optimizer state with FSDP2 instead of DDP."""
    dist_timeout: float = 1800.0
    """Under torchrun: seconds a rank waits in a collective for the others (a crashed, killed or stuck
    rank) before it stops with an error. It must exceed the longest gap between collectives: one
    optimizer step, or rank 0 writing a checkpoint. 1800 is torch's and Trainer's default."""
    resume: bool = False
    """Continue the run in `output` (wherever it was moved or copied) from its latest checkpoint, with the settings and
    the number of steps it started with."""
    overwrite: bool = False
    """Replace the run in `output`."""
    progress: bool = True
    """A progress bar on a terminal, else a line every `log_every` steps (--no-progress: neither)."""

    def resolved(self) -> TrainConfig:
        """Fill the `None` defaults for this model/data and check every setting; returns a new config."""
        demo = self.model is None and self.data in (None, SYNTHETIC)
        settings = dataclasses.asdict(self)
        if demo:
            for name, value in DEMO_SETTINGS.items():
                if settings[name] is None:
                    settings[name] = value
        lora_r = settings["lora_r"]
        if lora_r is None:
            lora_r = 0 if self.model is None else 8
        defaults = dict(
            model=DEMO_MODEL if self.model is None else self.model,
            data=SYNTHETIC if self.data is None else self.data,
            chunk_size=1024, seq_len=4096, batch_size=1, steps=1000, warmup_ratio=0.05, adam_beta2=0.999,
            eval_every=100 if self.eval_data or self.eval_fraction else 0,
            lr=2e-4 if lora_r else 2e-5, lora_r=lora_r, lora_alpha=2 * lora_r,
            packing="truncate" if self.prompt_field or self.messages_field or self.objective != "cross-entropy" else "documents",
        )
        if settings["packing"] in DEPRECATED_PACKING:
            settings["packing"] = _renamed_packing(settings["packing"])
        if self.objective != "cross-entropy":
            defaults.update(beta=2.0 if self.objective == "simpo" else 0.1, prompt_field="prompt")
        for name, value in defaults.items():
            if settings[name] is None:
                settings[name] = value
        config = TrainConfig(**settings)
        config.check()
        return config

    def check(self) -> None:
        """Raise ValueError naming the option for anything out of range (call on a resolved config)."""
        self._check_numbers()
        # The engine's settings (method, chunk size, SpaCO's, attention, --memory): checked where ChunkwiseConfig's are.
        check_engine_settings(self, names=OPTION_NAMES, methods=METHODS)
        for name in ("dtype", "packing"):
            check_choice(getattr(self, name), self.CHOICES[name], OPTION_NAMES(name))
        if self.offload_kv and self.method == "full":
            raise ValueError("--offload-kv applies to --method seco or spaco (full backprop keeps no KV cache)")
        self._check_sharding()
        if self.eval_data is not None and not self.eval_every:
            raise ValueError("--eval-data needs --eval-every N > 0: how many steps between held-out evaluations")
        if self.eval_every and self.eval_data is None and self.data != SYNTHETIC and not self.eval_fraction:
            raise ValueError(f"--eval-every {self.eval_every} needs held-out data for --data {self.data}: give --eval-data PATH "
                             "or --eval-fraction F")
        self._check_data_options()
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --output and --overwrite replaces it: give only one")
        self._check_objective()
        check_quantized_training(self.quantization(), lora_rank=self.lora_r)

    def _check_data_options(self) -> None:
        """The held-out split, the reporting target and the data-format options that go together."""
        check_choice(self.report_to, self.CHOICES["report_to"], OPTION_NAMES("report_to"))
        check_choice(self.pair_depth, self.CHOICES["pair_depth"], OPTION_NAMES("pair_depth"))
        if self.pair_depth != "start" and self.data != SYNTHETIC:
            raise ValueError(f"--pair-depth places the synthetic task's key→value pairs; --data {self.data} is read as it is: drop --pair-depth")
        if not (isinstance(self.eval_fraction, (int, float)) and 0 <= self.eval_fraction < 1):
            raise ValueError(f"--eval-fraction must be a fraction in [0, 1) of --data's documents, got {self.eval_fraction!r}")
        if self.eval_fraction and self.eval_data is not None:
            raise ValueError("--eval-fraction holds out part of --data and --eval-data names other held-out data: give one")
        if self.eval_fraction and (self.data == SYNTHETIC or self.objective != "cross-entropy"):
            what = "the synthetic task has its own held-out stream" if self.data == SYNTHETIC else "preference pairs are not scored held out"
            raise ValueError(f"--eval-fraction splits file data for cross-entropy training; {what}: drop it")
        if self.eval_fraction and not self.eval_every:
            raise ValueError("--eval-fraction needs --eval-every N > 0: how many steps between held-out evaluations")
        if self.messages_field is not None and self.prompt_field is not None and self.objective == "cross-entropy":
            raise ValueError("--messages-field (conversations) and --prompt-field / --response-field (instruction data) are "
                             "two formats: give one")

    def quantization(self) -> Quantization:
        """The base's quantization (`--load-in-4bit` / `--load-in-8bit` and the `--bnb-4bit-*` options), checked."""
        return Quantization(**{name: getattr(self, name) for name in QUANTIZATION_FIELDS})

    def _check_numbers(self) -> None:
        positive = ("seq_len", "batch_size", "grad_accum", "steps", "keep_checkpoints", "log_every", "max_bad_steps")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{OPTION_NAMES(name)} must be a positive integer, got {value!r}")
        for name in ("checkpoint_every", "eval_every", "lora_r", "lora_alpha", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{OPTION_NAMES(name)} must be an integer >= 0, got {value!r}")
        if self.seq_len < 2:
            raise ValueError(f"--seq-len must be at least 2 (one token predicts the next), got {self.seq_len}")
        if not (self.dist_timeout > 0 and math.isfinite(self.dist_timeout)):
            raise ValueError(f"--dist-timeout must be a positive number of seconds, got {self.dist_timeout}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.adam_beta2 < 1:
            raise ValueError(f"--adam-beta2 must be in [0, 1), got {self.adam_beta2}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"--max-grad-norm must be positive, got {self.max_grad_norm}")

    def _check_sharding(self) -> None:
        if self.zero is None and not self.fsdp:
            return
        option = "--fsdp" if self.fsdp else f"--zero {self.zero}"
        if self.zero is not None and self.fsdp:
            raise ValueError("--zero (DeepSpeed) and --fsdp (FSDP2) are two ways to shard the training state: give one")
        if self.zero is not None and self.zero not in ZERO_STAGES:
            raise ValueError(f"--zero must be 1 (optimizer state sharded), 2 (and gradients) or 3 (and parameters), got {self.zero}")
        if self.method == "full":
            raise ValueError(f"{option} trains chunk-wise: use --method seco or spaco (full backprop runs through DDP)")
        if self.dtype == "float16":
            raise ValueError(f"{option} does not run with float16's loss scaler: use --dtype bfloat16 (or float32)")
        if self.zero is not None and self.dtype == "float64":
            raise ValueError("--zero: DeepSpeed trains in float32 or bfloat16 (its optimizers keep float32 gradients); use --dtype float32")

    def _check_objective(self) -> None:
        check_choice(self.objective, self.CHOICES["objective"], OPTION_NAMES("objective"))
        if self.objective == "cross-entropy":
            if self.beta is not None or self.ref_model is not None:
                raise ValueError("--beta and --ref-model apply to preference objectives (--objective dpo, ipo, simpo)")
            return
        name = f"--objective {self.objective}"
        if self.data == SYNTHETIC:
            raise ValueError(f"{name} trains on preference pairs: give --data with prompt / chosen / rejected fields")
        if self.response_field is not None:
            raise ValueError(f"{name} reads --chosen-field and --rejected-field, not --response-field")
        if self.eval_data is not None:
            raise ValueError(f"{name}: --eval-data scores held-out cross-entropy, not preference pairs; drop --eval-data and --eval-every")
        if self.packing != "truncate":
            raise ValueError(f"{name} keeps each preference pair whole: --packing must be truncate")
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ValueError(f"--beta must be a positive number, got {self.beta}")
        if self.objective == "simpo" and self.ref_model is not None:
            raise ValueError("--objective simpo is reference-free; drop --ref-model")


def _renamed_packing(old: str) -> str:
    """The mode a deprecated --packing name means, with a one-line warning (an old run's run.json may still say it)."""
    new = DEPRECATED_PACKING[old]
    # A logged warning, not `warnings.warn`: on the command line it is one line (no source line under it).
    logging.getLogger(__name__).warning(
        f"--packing {old} is the old name of --packing {new} (documents concatenated, attending across their boundaries); it "
        f"runs as {new}. The default is now documents (kept apart); say --packing {new} or documents")
    return new


@dataclass
class TrainResult:
    """What a run did: its last step, the first and last logged losses, and held-out scores if any."""

    output: Path
    """The run directory."""
    step: int
    """The last step taken."""
    first_loss: float | None
    """The loss of the first step this session took with a finite loss (None: none had one)."""
    last_loss: float | None
    """The loss of the last step with a finite loss."""
    skipped_steps: int
    """Steps skipped for a non-finite loss or gradient."""
    interrupted: int | None
    """The signal that stopped the run early (SIGINT, SIGTERM), or None."""
    evaluations: list[dict]
    """The held-out evaluations' `metrics.jsonl` records, the resumed run's earlier ones included."""
