"""Attention kernel cost of one layer, 8K tokens, 4 query / 2 KV heads, D 64: full causal vs the engine's chunked parts."""
import torch, time, sys
torch.set_num_threads(1)
op, opb = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
T, c, D = 8192, int(sys.argv[1]), 64
q = torch.randn(1, T, 4, D).transpose(1, 2); k = torch.randn(T, 1, 2, D).permute(1, 2, 0, 3); v = torch.randn(T, 1, 2, D).permute(1, 2, 0, 3)
def full():
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    t0 = time.process_time(); o, l = op(q, kk, vv, 0.0, True, scale=0.125); t1 = time.process_time()
    opb(torch.ones_like(o), q, kk, vv, o, l, 0.0, True, scale=0.125); t2 = time.process_time()
    return t1 - t0, t2 - t1
def chunked():
    f = b = 0.0
    for s in range(0, T, c):
        qc = q[:, :, s:s + c]; ko, vo = k[:, :, s:s + c].repeat_interleave(2, 1), v[:, :, s:s + c].repeat_interleave(2, 1)
        t0 = time.process_time(); o, l = op(qc, ko, vo, 0.0, True, scale=0.125); t1 = time.process_time()
        opb(torch.ones_like(o), qc, ko, vo, o, l, 0.0, True, scale=0.125); t2 = time.process_time()
        f += t1 - t0; b += t2 - t1
        if s:
            qr = qc.reshape(1, 2, 2 * c, D)
            t0 = time.process_time(); o, l = op(qr, k[:, :, :s], v[:, :, :s], 0.0, False, scale=0.125); t1 = time.process_time()
            opb(torch.ones_like(o), qr, k[:, :, :s], v[:, :, :s], o, l, 0.0, False, scale=0.125); t2 = time.process_time()
            f += t1 - t0; b += t2 - t1
    return f, b
res = {}
for r in range(4):
    for name, fn in ((("full", full), ("chunked", chunked)) if r % 2 == 0 else (("chunked", chunked), ("full", full))):
        res.setdefault(name, []).append(fn())
for name, v in res.items():
    fs, bs = sorted(x[0] for x in v), sorted(x[1] for x in v)
    print(f"chunk {c} {name}: forward {fs[1]:.3f} s, backward {bs[1]:.3f} s (CPU time, 2nd best of 4)")
