import torch, time
torch.set_num_threads(1)
op, opb = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
def run(S, layout, rows=256, D=64, H=2, grad=True):
    if layout == "bhsd":
        k = torch.randn(1, H, S, D); v = torch.randn(1, H, S, D)
    else:  # time-major [S, B, H, D] seen as [B, H, S, D]
        k = torch.randn(S, 1, H, D).permute(1, 2, 0, 3); v = torch.randn(S, 1, H, D).permute(1, 2, 0, 3)
    q = torch.randn(1, H, rows, D)
    t0 = time.perf_counter(); out, lse = op(q, k, v, 0.0, False, scale=0.125); t1 = time.perf_counter()
    if grad:
        go = torch.randn_like(out)
        opb(go, q, k, v, out, lse, 0.0, False, scale=0.125); t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) if grad else 0
res = {}
for r in range(6):
    for layout in (("bhsd", "tmaj") if r % 2 == 0 else ("tmaj", "bhsd")):
        for S in (2048, 8064):
            f, b = run(S, layout)
            res.setdefault((layout, S), []).append((f, b))
import statistics
for k, v in sorted(res.items()):
    print(k, "fwd ms %.1f" % (1e3 * statistics.median(x[0] for x in v)), "bwd ms %.1f" % (1e3 * statistics.median(x[1] for x in v)))
