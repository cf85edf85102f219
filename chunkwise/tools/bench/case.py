"""What a benchmark measures: one case (`BenchCase`), a whole run (`BenchSettings`), and one case's result.

The options a case runs with (model, chunk, dtype, device, repeats, ...) are declared once, in `StepOptions`;
a case adds the method and length it measures, a run the methods and lengths of its grid and its search.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

import torch

METHODS = ("forward", "full", "ckpt", "seco", "spaco", "spaco-est")
CHUNKED = ("seco", "spaco", "spaco-est")
DEFAULT_METHODS = ("forward", "full", "ckpt", "seco", "spaco")  # what a run measures unless told otherwise
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MODEL = "llama-56m"  # a `chunkwise.models.presets.BENCH_MODELS` name: the CPU default
# The child prints its result on one stdout line that starts with this marker; anything else the model
# or a library prints is ignored.
RESULT_MARKER = "CHUNKWISE_BENCH_RESULT "


@dataclass(frozen=True, kw_only=True)
class StepOptions:
    """How every case of a run steps: the options `BenchCase` and `BenchSettings` share (declared here only)."""

    model: str = DEFAULT_MODEL
    """A `chunkwise.models.presets.BENCH_MODELS` name, a tiny preset name, or a local model directory."""
    chunk_size: int = 512
    """Tokens per chunk (seco, spaco)."""
    budget: int = 8
    """Chunks backpropagated per step (spaco)."""
    dtype: str = "float32"
    """A `DTYPES` name."""
    device: str = "cpu"
    """"cpu", "cuda", "cuda:1", ..."""
    lora_r: int = 0
    """LoRA rank on q_proj/v_proj; 0 trains all parameters."""
    batch_size: int = 1
    """Sequences per step."""
    repeats: int = 3
    """Measured steps per case; the reported time is their median."""
    warmup: int = 1
    """Unmeasured steps before them."""
    memory_cap: int | None = None
    """Bytes a case may use above its baseline (CPU: address-space limit, CUDA: allocator limit); None for
    no cap beyond the CPU's safety limit."""
    threads: int | None = None
    """CPU threads for torch in each case (None: torch's default, one per core)."""
    seed: int = 0
    """Seeds the weights, the tokens and SpaCO's sampler."""
    attention: str = "chunkwise"
    """The engines' `attention` option (seco, spaco): "chunkwise" or "model"."""
    offload_kv: bool = False
    """The engines' `offload_kv` option (seco, spaco)."""
    documents: tuple[int, ...] | None = None
    """A packed row: its documents' lengths in row order (they fill the row), passed as `position_ids` restarting
    at 0 at each, so attention stays inside each document; None: one document per row (attention across it all)."""

    def check_options(self, *, counts: tuple[str, ...] = ()) -> None:
        """ValueError naming the first bad option; `counts` are the caller's own fields that must be >= 1."""
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose from {', '.join(DTYPES)}")
        if self.attention not in ("chunkwise", "model"):
            raise ValueError(f"unknown attention {self.attention!r}; choose chunkwise or model")
        for name in (*counts, "chunk_size", "budget", "batch_size", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.lora_r < 0:
            raise ValueError("warmup and lora_r must be >= 0")
        if self.documents is not None:
            object.__setattr__(self, "documents", tuple(self.documents))  # a list, read back from JSON
            if not self.documents or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.documents):
                raise ValueError(f"documents must be positive lengths, got {list(self.documents)}")


@dataclass(frozen=True, kw_only=True)
class BenchCase(StepOptions):
    """One measurement: a method on a sequence length, with everything the child process needs."""

    method: str
    """One of `METHODS`."""
    seq_len: int
    """Tokens per sequence."""

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        self.check_options(counts=("seq_len",))
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2 (one token predicts the next), got {self.seq_len}")
        if self.documents is not None and sum(self.documents) != self.seq_len:
            raise ValueError(f"the documents' lengths add up to {sum(self.documents)} tokens, not the row's {self.seq_len}")


@dataclass(frozen=True, kw_only=True)
class BenchSettings(StepOptions):
    """What `chunkwise bench` runs: a grid of (method, length) cases and, with `max_memory`, a search."""

    methods: tuple[str, ...] = DEFAULT_METHODS
    """Which of `METHODS` to run."""
    lengths: tuple[int, ...] = (1024, 2048, 4096)
    """Sequence lengths of the grid (tokens)."""
    max_memory: int | None = None
    """If set, also search, per method, the longest sequence whose peak stays within this many bytes above
    the baseline."""
    max_length: int | None = None
    """The search doubles no further than this (None: the model's maximum position)."""
    timeout_s: float | None = None
    """Give up on a case after this many seconds (None: wait)."""

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods must be some of {', '.join(METHODS)}; got {', '.join(self.methods) or 'none'}")
        if not self.lengths or any(length < 2 for length in self.lengths):
            raise ValueError(f"lengths must be integers >= 2, got {list(self.lengths)}")
        if self.max_memory is not None and self.max_memory <= 0:
            raise ValueError(f"max_memory must be a positive number of bytes, got {self.max_memory}")
        if self.memory_cap is not None and self.memory_cap <= 0:
            raise ValueError(f"memory_cap must be a positive number of bytes, got {self.memory_cap}")
        if self.documents is not None:
            if set(self.lengths) != {sum(self.documents)}:
                raise ValueError(f"with documents the row is their sum, {sum(self.documents)} tokens; give that length or none, "
                                 f"not {', '.join(map(str, self.lengths))}")
            if self.max_memory is not None:
                raise ValueError("the longest-sequence search (max_memory) grows rows of one document; drop documents or max_memory")
        self.case("full", self.lengths[0])  # checks the per-case fields (chunk size, budget, dtype, repeats, documents, ...)

    def case(self, method: str, seq_len: int, **overrides) -> BenchCase:
        """The case of `method` at `seq_len` with this run's options (`overrides` replace some)."""
        options = {option.name: getattr(self, option.name) for option in fields(StepOptions)}
        return BenchCase(**{**options, "method": method, "seq_len": seq_len, **overrides})


@dataclass
class CaseResult:
    """What one case measured.

    Attributes:
        case: the case.
        status: "ok", "oom" (out of memory, including a child killed by SIGKILL), "error" or "timeout".
        time_s: median step time over the measured steps (None unless ok).
        step_times_s: every measured step's time.
        step_cpu_s: every measured step's CPU time (this process, all its threads): with one thread, the step's
            work whatever else the machine runs, where wall time grows with the machine's load.
        peak_memory_bytes: peak memory above the baseline over the measured steps (None unless ok).
        step_peaks_bytes: each measured step's peak above the baseline.
        baseline_bytes: memory at the baseline (model loaded, one priming step run, gradients freed).
        memory_method: how memory was read (see the module docstring).
        num_chunks: chunks per sequence (seco, spaco; 1 for the others).
        backprop_chunks: chunks backpropagated in the last step (spaco's sample; all for seco).
        loss: the last step's loss, a sanity check that the step computed something finite.
        model_info: `describe_model` of the loaded model.
        error: the error message when not ok.
        wall_s: the child's whole run time, model building included.
    """

    case: BenchCase
    status: str
    time_s: float | None = None
    step_times_s: list[float] = field(default_factory=list)
    step_cpu_s: list[float] = field(default_factory=list)
    peak_memory_bytes: int | None = None
    step_peaks_bytes: list[int] = field(default_factory=list)
    baseline_bytes: int | None = None
    memory_method: str = ""
    num_chunks: int = 1
    backprop_chunks: int | None = None
    loss: float | None = None
    model_info: dict = field(default_factory=dict)
    error: str | None = None
    wall_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CaseResult:
        return cls(**{**data, "case": BenchCase(**data["case"])})

