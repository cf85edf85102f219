"""The GPU suite's jobs, run in its child process (`python -m chunkwise.tools.gpu_suite --child ...`).

Each job prints one result line (`RESULT_MARKER` + JSON) that the parent (`chunkwise.tools.gpu_suite`) reads;
what each measures is in that module's docstring.
"""

from __future__ import annotations

import json
import statistics
import time

import torch

from chunkwise.tools.bench.case import RESULT_MARKER, BenchCase
from chunkwise.tools.bench.measure import build_case_model, build_model, measure_case
from chunkwise.utils.memory import is_out_of_memory


def not_run(job: dict, failed: dict) -> dict | None:
    """A job that would fail as a shorter one of the same label did (out of memory, out of time, error)."""
    label, length = job.get("label"), job.get("case", {}).get("seq_len")
    if label in failed and length is not None and length > failed[label]["length"]:
        status = failed[label]["status"]
        return {"status": status, "error": f"not run: {label} ended with {status} at {failed[label]['length']} tokens already"}
    return None


def note(job: dict, result: dict, failed: dict) -> None:
    length = job.get("case", {}).get("seq_len")
    if result["status"] != "ok" and length is not None and job["label"] not in failed:
        failed[job["label"]] = {"status": result["status"], "length": length}


def _emit(status: str, **fields) -> dict:
    """Print a job's result line (the child's only output the parent reads); return it."""
    result = {"job": True, "status": status, **fields}
    print(RESULT_MARKER + json.dumps(result, default=str), flush=True)
    return result


_models: dict = {}  # the speed jobs' model, built once for the jobs that share it


def _cached_model(case: BenchCase, device: torch.device) -> torch.nn.Module:
    """The model of `case`, reused when the previous case had the same (model, dtype, LoRA)."""
    key = (case.model, case.dtype, case.lora_r, case.seed)
    if key not in _models:
        _models.clear()
        _free(device)
        _models[key] = build_case_model(case, device)
    return _models[key]


def _speed_job(params: dict) -> dict:
    """Measure one bench case (see `chunkwise.tools.bench.measure.measure_case`) on a model built once for the cases sharing it."""
    result = measure_case(BenchCase(**params["case"]), build=_cached_model)
    _free(torch.device(result.case.device))
    return _emit(result.status, result=result.to_dict(), error=result.error)


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    scale = reference.abs().max().item()
    difference = (result.double() - reference.double()).abs().max().item()
    return difference / scale if scale > 0 else difference


def _attention_job(params: dict) -> dict:
    """Errors against float64 math attention, and forward+backward times, per kernel and dtype."""
    from chunkwise.attention import kernels
    from chunkwise.attention.chunk import blocked_attention, causal_chunk_attention, split_attention

    started = time.perf_counter()
    device = torch.device(params["device"])
    shape, check = params["shape"], params["check"]

    def sdpa(query, key, value, scale):  # what transformers' SDPA attention runs on these shapes
        from torch.nn.attention.bias import causal_lower_right
        from transformers.integrations.sdpa_attention import repeat_kv

        groups = query.shape[1] // key.shape[1]
        mask = causal_lower_right(query.shape[2], key.shape[2])
        return torch.nn.functional.scaled_dot_product_attention(
            query, repeat_kv(key, groups), repeat_kv(value, groups), attn_mask=mask, scale=scale
        )

    candidates = {k.name: (lambda k: lambda q, kk, v, s: split_attention(q, kk, v, s, k))(k)
                  for k in kernels.KERNELS if k.device_type == device.type}
    candidates["blocked"] = blocked_attention
    candidates["sdpa"] = sdpa
    candidates["engine"] = causal_chunk_attention
    rows = []
    for dtype_name in params["dtypes"]:
        dtype = getattr(torch, dtype_name)
        check_shape = dict(batch=1, heads=check["heads"], kv_heads=check["kv_heads"], chunk=check["chunk"], past=check["past"])
        errors = {}
        for name, function in candidates.items():
            if name != "engine" and name in kernels.KERNELS_BY_NAME and not kernels.KERNELS_BY_NAME[name].supports(device, dtype, check["head_dim"]):
                errors[name] = "does not take this dtype/head dim"
                continue
            try:
                errors[name] = kernels.check_errors(function, device, dtype, check["head_dim"], shape=check_shape)
            except Exception as error:
                errors[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        for past in shape["pasts"]:
            times = {}
            for name, function in candidates.items():
                if isinstance(errors.get(name), str):
                    times[name] = None
                    continue
                times[name] = _time_attention(function, device, dtype, shape, past, params["repeats"])
            rows.append({"dtype": dtype_name, "past": past, "times_s": times})
        rows.append({"dtype": dtype_name, "errors": errors})
    return _emit("ok", rows=rows, kernel_choices=kernels.kernel_choices(), wall_s=time.perf_counter() - started)


def _time_attention(function, device, dtype, shape, past, repeats) -> float | str:
    """Median forward+backward seconds of `function` on one chunk over `past` keys (inputs as the engine has them)."""
    chunk, heads, kv_heads, dim = shape["chunk"], shape["heads"], shape["kv_heads"], shape["head_dim"]
    generator = torch.Generator().manual_seed(0)
    try:
        query = torch.randn(1, chunk, heads, dim, generator=generator).to(device, dtype).transpose(1, 2).requires_grad_()
        key, value = (
            torch.randn(past + chunk, 1, kv_heads, dim, generator=generator).to(device, dtype).permute(1, 2, 0, 3).requires_grad_()
            for _ in range(2)
        )
        grad = torch.randn(1, heads, chunk, dim, generator=generator).to(device, dtype)
        times = []
        for index in range(repeats + 2):  # two unmeasured calls first
            _sync(device)
            start = time.perf_counter()
            torch.autograd.grad(function(query, key, value, dim**-0.5), (query, key, value), grad)
            _sync(device)
            if index >= 2:
                times.append(time.perf_counter() - start)
        return statistics.median(times)
    except Exception as error:
        if is_out_of_memory(error):
            _free(device)
            return "oom"
        return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gradient_job(params: dict) -> dict:
    """SeCO vs full backprop in bf16 against a float32 full-backprop reference (see the module docstring)."""
    from chunkwise.core.engine import SeCO
    from chunkwise.core.loss import sequence_loss

    started = time.perf_counter()
    device = torch.device(params["device"])
    if device.type == "cuda":  # a float32 reference in float32, not TF32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    model = build_model(params["model"], dtype=torch.float32, device=device)
    model.train()
    vocab = model.config.vocab_size
    input_ids = torch.randint(0, vocab, (1, params["seq_len"]), generator=torch.Generator().manual_seed(0)).to(device)

    def grads() -> dict:
        out = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out

    def full() -> dict:
        sequence_loss(model(input_ids=input_ids, use_cache=False).logits, input_ids).backward()
        return grads()

    def seco(offload: bool) -> dict:
        SeCO(model, chunk_size=params["chunk_size"], offload_kv=offload).backward(input_ids)
        return grads()

    def worst(result: dict, reference: dict) -> float:
        return max(_relative_error(result[n], reference[n]) for n in reference)

    rows = []
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    for setting in ("float32 weights, bf16 autocast", "bf16 weights"):
        if setting == "bf16 weights":
            with torch.no_grad():  # the reference sees exactly the bf16 weights
                for p in model.parameters():
                    p.copy_(p.bfloat16().float())
        reference = full()
        if setting == "bf16 weights":
            model.to(torch.bfloat16)
            runs = {"full": full(), "seco": seco(False), "seco+offload": seco(True)}
        else:
            with autocast:
                runs = {"full": full(), "seco": seco(False), "seco+offload": seco(True)}
        errors = {name: worst(g, reference) for name, g in runs.items()}
        same = all(torch.equal(runs["seco"][n], runs["seco+offload"][n]) for n in runs["seco"])
        rows.append({"setting": setting, "errors": errors, "seco_over_full": errors["seco"] / errors["full"],
                     "offload_bit_identical": same})
        del runs, reference
        _free(device)
    return _emit("ok", rows=rows, wall_s=time.perf_counter() - started)


JOBS = {"attention": _attention_job, "gradient": _gradient_job, "speed": _speed_job}


def child_main(work: dict) -> int:
    """Run `work["jobs"]` in order, one result line each (see `run_jobs`)."""
    import warnings

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    failed = work["failed"]
    for job in work["jobs"]:
        skipped = not_run(job, failed)
        if skipped is not None:
            _emit(**skipped)
            continue
        try:
            result = JOBS[job["kind"]](job)
        except Exception as error:  # recorded, and the next job still runs
            status = "oom" if is_out_of_memory(error) else "error"
            _free(torch.device(job.get("device") or job["case"]["device"]))
            result = _emit(status, error=f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}")
        note(job, result, failed)  # as the parent does, so that both skip the same jobs
    return 0
