"""Per-step cost of the zero-gradient guard (chunkwise.core.gradient_guard): SeCO steps with and without it,
interleaved, and the guard alone. Run: OMP_NUM_THREADS=1 .venv/bin/python docs/zero_gradient_guard_cost.py"""
import time, torch, statistics
from transformers import LlamaConfig, AutoModelForCausalLM
from chunkwise import SeCO
from chunkwise.models.loading import add_lora
from chunkwise.core.gradient_guard import starts_at_zero, check_gradient_moved, trainable_gradients
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
ids = torch.randint(0, 2048, (1, 1024))
for mode in ("lora", "full"):
    model = AutoModelForCausalLM.from_config(cfg)
    if mode == "lora": model = add_lora(model, rank=8, random_b=0.1)
    engine = SeCO(model, chunk_size=256)
    on, off = [], []
    orig = SeCO._guard_armed
    for i in range(12):
        for guard, bucket in ((True, on), (False, off)):
            SeCO._guard_armed = orig if guard else (lambda self, *a: False)
            model.zero_grad(set_to_none=True)
            t = time.perf_counter(); engine.backward(ids); bucket.append(time.perf_counter() - t)
    SeCO._guard_armed = orig
    alone = []
    for i in range(50):
        t = time.perf_counter(); grads = trainable_gradients(model); starts_at_zero([None]); check_gradient_moved(model, num_targets=1, method="x"); alone.append(time.perf_counter() - t)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad); k = sum(1 for p in model.parameters() if p.requires_grad)
    on, off = on[2:], off[2:]
    print(f"{mode}: {k} trainable tensors, {n/1e6:.2f}M params; step median with guard {statistics.median(on)*1e3:.1f} ms, without {statistics.median(off)*1e3:.1f} ms; guard alone median {statistics.median(alone)*1e3:.3f} ms ({statistics.median(alone)/statistics.median(off)*100:.2f}% of a step)")
