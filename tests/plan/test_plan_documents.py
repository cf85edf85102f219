"""`chunkwise plan --documents`: the arithmetic of packed rows (attention pairs, FLOPs, the keys a chunk reads) and its refusals."""

from __future__ import annotations

import json

import pytest

from chunkwise.cli.main import main
from chunkwise.plan import ModelShape, PlanError, Training, build_report, method_plan
from chunkwise.plan.compute import attention_pairs, first_visible_key, step_flops

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def shape() -> ModelShape:
    return ModelShape.from_name("tiny-llama")  # 2 layers, hidden 64, 4 heads of 16, vocabulary 128


def test_attention_pairs_are_the_sum_of_each_documents_causal_triangle():
    assert attention_pairs(4) == 10  # 1 + 2 + 3 + 4
    assert attention_pairs(8, (4, 4)) == 20
    assert attention_pairs(32768, (4096,) * 8) == 8 * 4096 * 4097 // 2
    # Eight equal documents: an eighth of the pairs, up to the diagonal's share.
    assert attention_pairs(32768, (4096,) * 8) / attention_pairs(32768) == pytest.approx(4097 / 32769)


def test_first_visible_key_is_the_document_start():
    documents = (3, 5, 2)
    assert [first_visible_key(documents, p) for p in range(10)] == [0, 0, 0, 3, 3, 3, 3, 3, 8, 8]
    assert first_visible_key(None, 7) == 0


def test_step_flops_count_linears_per_token_and_attention_per_visible_pair(shape):
    layers, hidden, heads, head_dim, vocab = shape.layers, shape.hidden, shape.heads, shape.head_dim, shape.vocab
    layer_weights = sum(i * o for name, i, o in shape.linears if name != "lm_head")
    plain = step_flops(shape, "full", seq_len=64)
    # full: three forwards of the layers and the head; attention 4 * heads * head_dim per pair and layer.
    assert plain.linear == 3 * (2 * layer_weights * 64 + 2 * hidden * vocab * 64)
    assert plain.attention == 3 * 4 * heads * head_dim * layers * (64 * 65 // 2)
    packed = step_flops(shape, "full", seq_len=64, documents=(16,) * 4)
    assert packed.linear == plain.linear and packed.attention == plain.attention * (4 * 16 * 17 // 2) / (64 * 65 // 2)
    # seco: stage 1 forwards the layers once more, without the head.
    seco = step_flops(shape, "seco", seq_len=64, chunk_size=16)
    assert seco.linear == plain.linear + 2 * layer_weights * 64 and seco.attention == plain.attention * 4 / 3
    assert packed.attention_share < plain.attention_share
    with pytest.raises(PlanError, match="add up to 60 tokens, not the row's 64"):
        step_flops(shape, "seco", seq_len=64, documents=(30, 30))


def test_a_chunk_of_a_packed_row_keeps_only_the_keys_of_its_documents(shape):
    def plans(attention: str, method: str = "seco"):
        training = Training.from_precision("float32", device_type="cpu", attention=attention)
        plain = method_plan(shape, training, method, seq_len=2048, chunk_size=256)
        packed = method_plan(shape, training, method, seq_len=2048, chunk_size=256, documents=(256,) * 8)
        return plain, packed

    # The model's attention keeps past-sized tensors (a mask, repeated keys): a chunk reading only its own
    # document keeps less. The KV cache and its gradient still span the row.
    plain, packed = plans("model")
    assert packed.sizes["activations"] < plain.sizes["activations"] and packed.peak < plain.peak
    assert packed.sizes["kv_cache"] == plain.sizes["kv_cache"] and packed.sizes["kv_gradient"] == plain.sizes["kv_gradient"]
    # Documents of one chunk each: every chunk reads what a row of one chunk reads.
    training = Training.from_precision("float32", device_type="cpu", attention="model")
    assert packed.sizes["activations"] == method_plan(shape, training, "seco", seq_len=256, chunk_size=256).sizes["activations"]
    # chunkwise attention keeps nothing sized by the past for backward: a packed row saves time, not memory.
    plain, packed = plans("chunkwise")
    assert packed.peak == plain.peak
    # A packed row of one document is the plain row.
    training = Training.from_precision("float32", device_type="cpu")
    assert method_plan(shape, training, "seco", seq_len=2048, chunk_size=256, documents=(2048,)) == plain
    # Full backprop over a packed row needs transformers' per-document mask: more memory, not less.
    plain, packed = plans("chunkwise", "full")
    assert packed.peak > plain.peak


def test_report_puts_the_cross_document_flops_beside(shape):
    training = Training.from_precision("float32", device_type="cpu")
    report = build_report(shape, training, seq_len=None, chunk_size=128, budget=None, documents=(512, 256, 256))
    assert report.seq_len == 1024 and [f.method for f in report.flops] == [p.method for p in report.plans]
    for own, cross in zip(report.flops, report.cross_flops):
        assert own.linear == cross.linear and own.attention < cross.attention
    assert report.as_dict()["documents"] == [512, 256, 256]


def test_plan_command_with_documents(capsys):
    assert main(["plan", "--model", "tiny-llama", "--device", "cpu", "--documents", "512x2,1024", "--chunk-size", "256",
                 "--memory", "1GiB", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["seq_len"] == 2048 and report["documents"] == [512, 512, 1024]
    shares = {f["method"]: f["attention_share"] for f in report["flops"]}
    cross = {f["method"]: f["attention_share"] for f in report["cross_document_flops"]}
    assert all(shares[m] < cross[m] for m in shares)
    assert main(["plan", "--model", "tiny-llama", "--device", "cpu", "--documents", "256x4", "--chunk-size", "256"]) == 0
    assert "per-document attention reads 25.1% of the query-key pairs" in capsys.readouterr().out.replace("\n", " ")


def test_documents_that_do_not_fill_the_row_are_refused_in_one_line(capsys):
    assert main(["plan", "--model", "tiny-llama", "--device", "cpu", "--documents", "512x2", "--seq-len", "2048"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("chunkwise plan: error: the documents' lengths add up to 1024 tokens, not the row's 2048") and "\n" not in error


@pytest.mark.parametrize("value", ["512x0", "big", "512,,x2"])
def test_malformed_documents_are_refused_by_the_parser(capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "--model", "tiny-llama", "--device", "cpu", "--documents", value])
    assert exit_info.value.code == 2
    assert f"argument --documents: must be document lengths such as 4096x8 (8 documents of 4096 tokens) or 1024,2048,4096; got {value!r}" in capsys.readouterr().err
