"""docs/benchmarks.md, issue 25: OMP_NUM_THREADS=1 METHOD=spaco|seco python docs/bench/issue25/profile_stages.py

Per-op self time by stage, old (5f414c4) vs new engine, ABBA-interleaved in one process (same model, same ids)."""
import importlib.util, sys, os, time, bisect
from collections import defaultdict
import torch
from torch.profiler import profile, record_function, ProfilerActivity

def load(name, path):
    spec = importlib.util.spec_from_file_location(name, os.path.join(path, "__init__.py"), submodule_search_locations=[path])
    mod = importlib.util.module_from_spec(spec); sys.modules[name] = mod; spec.loader.exec_module(mod); return mod
pk = {"new": load("chunkwise", os.environ.get("NEW", "chunkwise")), "old": load("chunkwise_old", os.environ.get("OLD", "/tmp/old5f/chunkwise"))}
for tag, cw in pk.items():
    eng = sys.modules[cw.__name__ + ".engine"]
    fc, bc = eng.forward_checkpoints, eng.backward_chunk
    def fc_w(*a, _f=fc, **k):
        with record_function("STAGE1"): return _f(*a, **k)
    def bc_w(*a, _f=bc, **k):
        with record_function("STAGE2"): return _f(*a, **k)
    eng.forward_checkpoints, eng.backward_chunk = fc_w, bc_w
from transformers import AutoModelForCausalLM, LlamaConfig
torch.set_num_threads(1)
shape = dict(vocab_size=8000, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(LlamaConfig(**shape, max_position_embeddings=131072, tie_word_embeddings=False), dtype=torch.float32, attn_implementation="sdpa")
T = int(os.environ.get("T", 8192))
ids = torch.randint(8000, (1, T), generator=torch.Generator().manual_seed(0))
method = os.environ.get("METHOD", "spaco")
rounds = int(os.environ.get("ROUNDS", 2))
def engine(cw):
    return cw.SeCO(model, chunk_size=256) if method == "seco" else cw.SpaCO(model, chunk_size=128, budget=8, sampling="uniform", seed=0)
engines = {t: engine(cw) for t, cw in pk.items()}
for e in engines.values():
    e.backward(ids); model.zero_grad(set_to_none=True)
per = {t: {"STAGE1": defaultdict(float), "STAGE2": defaultdict(float)} for t in pk}
wall = {t: [] for t in pk}
stage_tot = {t: defaultdict(float) for t in pk}
for r in range(rounds):
    for tag in (("new", "old", "old", "new") if r % 2 == 0 else ("old", "new", "new", "old")):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter(); engines[tag].backward(ids); wall[tag].append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
        evs = prof.events()
        stages = sorted([(x.name, x.time_range.start, x.time_range.end) for x in evs if x.name in ("STAGE1", "STAGE2")], key=lambda s: s[1])
        starts = [s[1] for s in stages]
        for s in stages: stage_tot[tag][s[0]] += (s[2] - s[1]) / 1e3
        for x in evs:
            if x.name in ("STAGE1", "STAGE2"): continue
            i = bisect.bisect_right(starts, x.time_range.start) - 1
            if i >= 0 and x.time_range.end <= stages[i][2]:
                per[tag][stages[i][0]][x.name] += x.self_cpu_time_total / 1e3
n = 2 * rounds
print(method, "wall per step", {t: [round(v, 2) for v in w] for t, w in wall.items()})
for st in ("STAGE1", "STAGE2"):
    print(f"== {st}: wall ms per step new {stage_tot['new'][st]/n:.0f} old {stage_tot['old'][st]/n:.0f}")
    keys = set(per["new"][st]) | set(per["old"][st])
    rows = sorted(keys, key=lambda k: -(per["new"][st][k] + per["old"][st][k]))[:22]
    for k in rows:
        a, b = per["new"][st][k] / n, per["old"][st][k] / n
        print(f"   new {a:8.1f}  old {b:8.1f}  diff {a-b:+8.1f}  {k[:70]}")
