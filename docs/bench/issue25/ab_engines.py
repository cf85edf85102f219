"""docs/benchmarks.md, issue 25. Run from the repository root: OMP_NUM_THREADS=1 python docs/bench/issue25/ab_engines.py
(env: SHAPE=small|m56, T, ROUNDS, ONLY=forward,full,seco_new,spaco_new,seco_old,spaco_old).

Interleaved A/B: old engine (5f414c4, imported as chunkwise_old) vs this worktree's chunkwise, one process."""
import importlib.util, sys, time, os, statistics, json
import torch

def load(name, path):
    spec = importlib.util.spec_from_file_location(name, os.path.join(path, "__init__.py"), submodule_search_locations=[path])
    mod = importlib.util.module_from_spec(spec); sys.modules[name] = mod; spec.loader.exec_module(mod); return mod

new = load("chunkwise", os.environ.get("NEW", "chunkwise"))  # this checkout's package
old = load("chunkwise_old", os.environ.get("OLD", "/tmp/old5f/chunkwise"))  # git worktree add /tmp/old5f 5f414c4
from transformers import AutoModelForCausalLM, LlamaConfig
from chunkwise.core.loss import chunk_loss_sum, shift_labels
torch.set_num_threads(1)
shape = dict(
    small=dict(vocab_size=8000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
    m56=dict(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4),
)[os.environ.get("SHAPE", "small")]
T = int(os.environ.get("T", 8192)); rounds = int(os.environ.get("ROUNDS", 5))
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(LlamaConfig(**shape, max_position_embeddings=131072, tie_word_embeddings=False), dtype=torch.float32, attn_implementation="sdpa")
ids = torch.randint(shape["vocab_size"], (1, T), generator=torch.Generator().manual_seed(0))
def seq_loss():
    t = shift_labels(ids); return chunk_loss_sum(model(input_ids=ids, use_cache=False).logits, t) / (t != -100).sum()
def fwd():
    with torch.no_grad(): seq_loss()
def full():
    seq_loss().backward()
steps = {"forward": fwd, "full": full}
for tag, m in (("new", new), ("old", old)):
    se = m.SeCO(model, chunk_size=256); sp = m.SpaCO(model, chunk_size=128, budget=8, sampling="uniform", seed=0)
    steps[f"seco_{tag}"] = lambda se=se: se.backward(ids)
    steps[f"spaco_{tag}"] = lambda sp=sp: sp.backward(ids)
only = os.environ.get("ONLY")
if only: steps = {k: v for k, v in steps.items() if k in only.split(",")}
full_ids = ids
ids = full_ids[:, :512]  # warm on a short input (first-use self-checks, thread pools), then the real length
for f in steps.values():
    f(); model.zero_grad(set_to_none=True)
ids = full_ids
times = {k: [] for k in steps}
cpu = {k: [] for k in steps}
for r in range(rounds):
    order = list(steps) if r % 2 == 0 else list(reversed(steps))
    for k in order:
        c0 = time.process_time(); t0 = time.perf_counter(); steps[k](); times[k].append(time.perf_counter() - t0); cpu[k].append(time.process_time() - c0); model.zero_grad(set_to_none=True)
    print(r, "wall", {k: round(v[-1], 3) for k, v in times.items()}, "cpu", {k: round(v[-1], 3) for k, v in cpu.items()}, flush=True)
med = {k: statistics.median(v) for k, v in times.items()}
print("median", {k: round(v, 3) for k, v in med.items()})
for tag in ("new", "old"):
    if f"seco_{tag}" in med and "full" in med: print(f"SeCO/full {tag}: {med[f'seco_{tag}']/med['full']:.3f}")
    if f"spaco_{tag}" in med and "forward" in med: print(f"SpaCO/forward {tag}: {med[f'spaco_{tag}']/med['forward']:.3f}")
    # per-round ratios (paired)
    if f"spaco_{tag}" in times and "forward" in times:
        print(f"  per-round SpaCO/forward {tag}:", [round(a/b, 3) for a, b in zip(times[f'spaco_{tag}'], times['forward'])])
    if f"seco_{tag}" in times and "full" in times:
        print(f"  per-round SeCO/full {tag}:", [round(a/b, 3) for a, b in zip(times[f'seco_{tag}'], times['full'])])

print("--- CPU time (process_time, 1 thread: not counting preemption by other jobs)")
mc = {k: statistics.median(v) for k, v in cpu.items()}
mn = {k: min(v) for k, v in cpu.items()}
print("median cpu", {k: round(v, 3) for k, v in mc.items()}, "min cpu", {k: round(v, 3) for k, v in mn.items()})
for tag in ("new", "old"):
    if f"spaco_{tag}" in mc and "forward" in mc:
        print(f"CPU SpaCO/forward {tag}: median {mc[f'spaco_{tag}']/mc['forward']:.3f}  min {mn[f'spaco_{tag}']/mn['forward']:.3f}",
              "per-round", [round(a/b, 3) for a, b in zip(cpu[f'spaco_{tag}'], cpu['forward'])])
    if f"seco_{tag}" in mc and "full" in mc:
        print(f"CPU SeCO/full {tag}: median {mc[f'seco_{tag}']/mc['full']:.3f}  min {mn[f'seco_{tag}']/mn['full']:.3f}",
              "per-round", [round(a/b, 3) for a, b in zip(cpu[f'seco_{tag}'], cpu['full'])])
