"""Long-context probes: chunked generation equals transformers' generate; probes built with the model's
own tokenizer (a BPE one trained here, and the demo's word-level one); `chunkwise eval --task` end to end."""

from __future__ import annotations

import json
import re

import pytest
import torch
from tokenizer_fixtures import bpe_tokenizer

from chunkwise.cli.main import main
from chunkwise.core.handle import inspect_causal_lm
from chunkwise.core.inference import greedy_generate
from chunkwise.data.probes import English, Probe, RecallWords, build_probe, probe_language
from chunkwise.data.synthetic import DEMO_TASK
from chunkwise.models.presets import build_tiny_model


@pytest.fixture(scope="module")
def bpe():
    return bpe_tokenizer()


@pytest.fixture(scope="module")
def bpe_model_dir(tmp_path_factory, bpe):
    """A tiny random Llama with the BPE tokenizer, saved as a user's model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("bpe-model")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=4096)
    LlamaForCausalLM(config).save_pretrained(folder)
    bpe.save_pretrained(folder)
    return folder


# ----- generation --------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-mistral", "tiny-gemma3"])
def test_chunked_greedy_generation_equals_transformers_generate(preset):
    model = build_tiny_model(preset, dtype=torch.float64, seed=0).eval()
    prompt = torch.randint(0, 128, (2, 45), generator=torch.Generator().manual_seed(1))
    expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                              pad_token_id=0)[:, 45:]
    generation = greedy_generate(inspect_causal_lm(model), prompt, chunk_size=16, max_new_tokens=6)
    assert torch.equal(generation.tokens, expected)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    # keys and values of every layer for 45 + 6 slots, float64
    assert generation.kv_cache_bytes == config.num_hidden_layers * 2 * 2 * config.num_key_value_heads * 51 * head_dim * 8


# ----- building probes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["passkey", "needle"])
def test_probes_with_a_bpe_tokenizer(bpe, task):
    assert isinstance(probe_language(bpe, "bpe"), English)
    positions = []
    for depth in (0.0, 0.5, 1.0):
        probe = build_probe(bpe, English(), task=task, length=600, depth=depth, seed=3)
        prompt = bpe.decode(probe.input_ids)
        assert 600 - 40 <= len(probe.input_ids) + probe.max_new_tokens <= 600  # filled to within a sentence or two
        assert re.fullmatch(r"\d{5}" if task == "passkey" else r"\d{7}", probe.answer)
        assert prompt.startswith(English.INSTRUCTION) and prompt.count(probe.answer) == (2 if task == "passkey" else 1)
        assert prompt.endswith("The pass key is" if task == "passkey" else "mentioned in the provided text is")
        needle_text = bpe.decode(probe.input_ids[probe.needle_token :])
        assert needle_text.lstrip().startswith("The pass key is" if task == "passkey" else "One of the special magic numbers")
        positions.append((probe.needle_token, len(probe.input_ids)))
    instruction = len(bpe(English.INSTRUCTION)["input_ids"])  # depth 0: right after it; 1: right before the question
    (first, _), (middle, middle_length), (last, _) = positions
    assert first == instruction and 0.4 < middle / middle_length < 0.6
    # depth 1: nothing but the needle's own sentences between it and the question
    assert bpe.decode(probe.input_ids[last:]).count(".") == (3 if task == "passkey" else 1)
    # Same seed, same probe; another seed, another answer.
    assert build_probe(bpe, English(), task=task, length=600, depth=0.5, seed=3) == build_probe(bpe, English(), task=task, length=600, depth=0.5, seed=3)
    assert build_probe(bpe, English(), task=task, length=600, depth=0.5, seed=4).answer != probe.answer


def test_probes_with_the_demo_tokenizer():
    tokenizer = DEMO_TASK.tokenizer()
    language = probe_language(tokenizer, "demo")
    assert isinstance(language, RecallWords)
    passkey = build_probe(tokenizer, language, task="passkey", length=300, depth=0.0, seed=0)
    words = tokenizer.convert_ids_to_tokens(passkey.input_ids)
    key = words[-1]
    # As the demo trains: <bos>, the pair four times, fillers, "? key"; the answer is the pair's value.
    assert words[0] == "<bos>" and words[1:9] == [key, passkey.answer] * 4 and words[-2] == "?"
    assert all(re.fullmatch(r"f\d+", w) for w in words[9:-2]) and len(words) + passkey.max_new_tokens == 300
    needle = build_probe(tokenizer, language, task="needle", length=300, depth=1.0, seed=0)
    words = tokenizer.convert_ids_to_tokens(needle.input_ids)
    assert words[needle.needle_token : needle.needle_token + 2] == [words[-1], needle.answer] and words.count(needle.answer) == 1
    assert needle.needle_token == len(words) - 4  # depth 1: the needle right before the question


def test_an_answer_is_the_first_word_of_the_continuation():
    probe = Probe("needle", 100, 0.5, [1], "v1", 3, 0)
    assert probe.is_answered_by("v1") and probe.is_answered_by(" v1 f3") and not probe.is_answered_by("v17")
    assert not probe.is_answered_by("v3 v1")  # a later guess does not count
    probe = Probe("passkey", 100, 0.5, [1], "12345", 8, 0)
    assert probe.is_answered_by(" 12345. Remember") and probe.is_answered_by(": 12345") and not probe.is_answered_by("123456")


def test_unspellable_tokenizer_and_too_short_length(bpe):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "a": 1}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    with pytest.raises(ValueError, match="spells neither English nor the synthetic task's words"):
        probe_language(PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>"), "odd")
    with pytest.raises(ValueError, match=r"a passkey probe needs at least \d+ tokens with this tokenizer .*--seq-len 40 is too short"):
        build_probe(bpe, English(), task="passkey", length=40, depth=0.5, seed=0)


# ----- `chunkwise eval --task` ---------------------------------------------------------------------------


def test_eval_task_on_a_model_folder_writes_table_heat_map_and_json(tmp_path, bpe_model_dir, capsys):
    output = tmp_path / "probes"
    code = main(["eval", "--model", str(bpe_model_dir), "--task", "needle", "--seq-len", "512,256", "--depths", "0,1",
                 "--num-probes", "2", "--chunk-size", "32", "--output", str(output)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "english probes, 2 per length and depth" in printed and "peak memory" in printed and "KV cache" in printed
    report = json.loads((output / "needle.json").read_text())
    assert [(c["length"], c["depth"], c["total"]) for c in report["cells"]] == [(256, 0.0, 2), (256, 1.0, 2), (512, 0.0, 2), (512, 1.0, 2)]
    assert all(0 <= c["accuracy"] <= 1 and max(c["prompt_tokens"]) <= c["length"] for c in report["cells"])
    # 2 layers x K,V x 2 KV heads x head dim 8 x float32, for the longest probe of each length plus its answer
    assert [c["kv_cache_bytes"] % (2 * 2 * 2 * 8 * 4) for c in report["costs"]] == [0, 0]
    assert report["costs"][0]["kv_cache_bytes"] < report["costs"][1]["kv_cache_bytes"] <= 512 * 2 * 2 * 2 * 8 * 4
    assert (output / "needle.png").stat().st_size > 5000


def test_eval_task_on_a_run_directory_uses_the_demo_vocabulary(tmp_path, capsys):
    run = tmp_path / "demo"
    assert main(["train", "--output", str(run), "--steps", "1", "--seq-len", "64", "--chunk-size", "32", "--batch-size", "1",
                 "--eval-every", "0", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(run), "--task", "passkey", "--seq-len", "100", "--depths", "0.5", "--num-probes", "3",
                 "--chunk-size", "32", "--output", str(tmp_path / "p"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["language"] == "recall-task words" and report["cells"][0]["total"] == 3
    outputs = report["cells"][0]["outputs"]  # the continuations, in the demo's words
    assert len(outputs) == 3 and all(output.split() and set(output.split()) <= set(DEMO_TASK.vocabulary) for output in outputs)


@pytest.mark.parametrize(
    "arguments, expected",
    [
        # (issue 23: the tiny presets have a byte tokenizer now; a folder saved without one has none)
        (["--model", "NO_TOKENIZER", "--task", "passkey"], "has no tokenizer"),
        (["--task", "passkey", "--seq-len", "20"], "needs at least"),
        (["--task", "passkey", "--depths", "0,1.5"], "--depths must be fractions between 0 and 1"),
        (["--seq-len", "128,256"], "--seq-len takes one length unless --task is passkey or needle"),
        (["--depths", "0,1"], "--depths, --num-probes and --output apply to --task passkey or needle"),
        (["--task", "needle", "--data", "x.txt"], "--data do not apply to --task needle"),
    ],
)
def test_bad_probe_options_get_one_line(tmp_path, capsys, bpe_model_dir, arguments, expected):
    arguments = arguments if "--model" in arguments else ["--model", str(bpe_model_dir), *arguments]
    if "NO_TOKENIZER" in arguments:
        build_tiny_model("tiny-llama").save_pretrained(tmp_path / "bare")
        arguments[arguments.index("NO_TOKENIZER")] = str(tmp_path / "bare")
        capsys.readouterr()  # save_pretrained's progress bar
    if "--task" in arguments:
        arguments += ["--output", str(tmp_path / "p")]
    assert main(["eval", *arguments]) == 2
    error = capsys.readouterr().err.strip()
    assert expected in error and len(error.splitlines()) == 1, error
