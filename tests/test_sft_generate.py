"""[sft] generations and the merged model: greedy answers before and after
training in report.json, `keras-lora generate --model --chat`, and
`--merged-hf`, on a tiny Llama directory; transformers is the oracle (its
greedy `generate` on the same rendered prompts, the PEFT adapter's logits).
"""

from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np
import pytest

from keras_lora.cli import main
from keras_lora.recipes.sft.config import SftConfig
from keras_lora.recipes.sft.data import Example
from keras_lora.recipes.sft.encode import Encoded
from keras_lora.recipes.sft.generation import (
    EvalGenerations,
    encode_prompt,
    generate,
    stop_token_ids,
    turn_end_token,
)
from keras_lora.recipes.sft.run import load_causal_lm
from keras_lora.recipes.sft.tokenizer import load_tokenizer
from tests import sft_fixtures as fx

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOKENS = 6  # new tokens per generation


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("gen") / "llama")
    return fx.save_tiny_llama(fx.build_model_dir("llama3", path))


@pytest.fixture(scope="module")
def trained(llama, tmp_path_factory):
    """One `sft` run with generations and --merged-hf: (OUT, merged, report,
    stdout)."""
    work = tmp_path_factory.mktemp("run")
    rows = fx.CONVERSATIONAL_PROMPT_COMPLETION
    data = fx.write_jsonl(str(work / "train.jsonl"), rows)
    out, merged = str(work / "out"), str(work / "merged")
    argv = ["sft", "--model", llama, "--data", data, "--out", out]
    flags = ["--steps", "2", "--batch", "2", "--learning-rate", "0.05"]
    gen = ["--generate-prompts", "2", "--generate-tokens", str(TOKENS)]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main([*argv, *flags, *gen, "--merged-hf", merged]) == 0
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    return out, merged, report, stdout.getvalue()


def hf_greedy(model, ids: list[int], stops, tokens: int = TOKENS) -> list[int]:
    """transformers' greedy new tokens for one prompt."""
    with torch.no_grad():
        output = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=tokens,
            eos_token_id=list(stops) or None,
            pad_token_id=0,
        )
    return output[0, len(ids) :].tolist()


def answer_text(tokenizer, ids: list[int], stops) -> str:
    """The answer as the report writes it: decoded without the stop token."""
    if ids and ids[-1] in stops:
        ids = ids[:-1]
    return tokenizer.tokenizer.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize(
    "family, turn_end, stops",
    [
        ("llama3", "<|eot_id|>", ["<|eot_id|>"]),
        ("qwen2", "<|im_end|>", ["<|im_end|>"]),
        ("gemma", "<end_of_turn>", ["<end_of_turn>", "<eos>"]),
    ],
)
def test_stop_tokens_are_the_templates_turn_end_and_eos(
    tmp_path, family, turn_end, stops
):
    tokenizer = load_tokenizer(fx.build_model_dir(family, str(tmp_path / family)))
    assert turn_end_token(tokenizer) == turn_end
    ids = stop_token_ids(tokenizer)
    assert [tokenizer.tokenizer.id_to_token(i) for i in ids] == stops


def test_eval_prompts_are_the_rendered_prompts_of_the_eval_examples(tmp_path):
    tokenizer = load_tokenizer(fx.build_model_dir("qwen2", str(tmp_path / "q")))
    chat = fx.MESSAGES[1]["messages"]
    examples = [
        Example(line=1, prompt="2 + 2 =", completion=" 4"),
        Example(line=2, messages=chat),
        Example(line=3, prompt="dropped", completion="x"),
        Example(line=4, prompt="not asked", completion="y"),
    ]
    held = [Encoded([1], [1], line=n) for n in (1, 2, 4)]
    config = SftConfig("m", "d.jsonl", "o", generate_prompts=2, generate_tokens=5)
    gens = EvalGenerations.of(config, examples, held, tokenizer)
    # Plain strings with the tokenizer's special tokens, as TRL encodes them;
    # a conversation up to its last assistant turn, with the template.
    assert [p.text for p in gens.prompts] == [
        "2 + 2 =",
        tokenizer.template.render(chat[:3], add_generation_prompt=True),
    ]
    assert gens.prompts[0].ids == tokenizer.encode("2 + 2 =").ids
    assert gens.max_new_tokens == 5
    off = SftConfig("m", "d.jsonl", "o", generate_prompts=0)
    assert EvalGenerations.of(off, examples, held, tokenizer).records() == []


def test_generations_equal_transformers_greedy_and_stop_at_a_stop_id(llama):
    tokenizer = load_tokenizer(llama)
    hf = transformers.AutoModelForCausalLM.from_pretrained(llama).eval()
    questions = ["What is the capital of France?", "Hello!"]
    prompts = [
        encode_prompt(tokenizer, [{"role": "user", "content": q}]) for q in questions
    ]
    # A stop id that transformers' free run emits first at a later step.
    free = hf_greedy(hf, prompts[0].ids, [], tokens=8)
    step = next(k for k in range(1, 8) if free[k] not in free[:k])
    stops = (free[step],)
    lm = load_causal_lm(llama)
    lm.compile(sampler="greedy")
    found = generate(lm, tokenizer, prompts, max_new_tokens=8, stop_ids=stops)
    assert found[0].ids == free[: step + 1] and found[0].stopped
    assert found[0].text == answer_text(tokenizer, free[: step + 1], stops)
    # The shorter prompt of the batch gets its own greedy tokens.
    assert found[1].ids == hf_greedy(hf, prompts[1].ids, stops, tokens=8)
    assert len(found[1].ids) == 8 or found[1].stopped


def test_sft_reports_generations_equal_to_transformers(llama, trained):
    out, merged, report, stdout = trained
    tokenizer = load_tokenizer(llama)
    stops = stop_token_ids(tokenizer)
    generations = report["generations"]
    assert len(generations) == 2 and report["settings"]["generate_tokens"] == TOKENS
    base = transformers.AutoModelForCausalLM.from_pretrained(llama).eval()
    tuned = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    for example, generation in zip(
        fx.CONVERSATIONAL_PROMPT_COMPLETION, generations, strict=True
    ):
        prompt = encode_prompt(tokenizer, example["prompt"])
        assert generation["prompt"] == prompt.text
        before = hf_greedy(base, prompt.ids, stops)
        after = hf_greedy(tuned, prompt.ids, stops)
        assert generation["before"] == answer_text(tokenizer, before, stops)
        assert generation["after"] == answer_text(tokenizer, after, stops)
        shown = json.dumps(generation["after"], ensure_ascii=False)
        assert f"  after: {shown}" in stdout
    assert "generation 2: " in stdout and f"{merged} (merged)" in stdout


def test_merged_hf_loads_in_transformers_as_the_peft_adapter(llama, trained):
    out, merged, report, _ = trained
    assert report["merged_hf"] == os.path.abspath(merged)
    assert not [n for n in os.listdir(os.path.dirname(merged)) if n.startswith(".")]
    tuned = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(llama).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 12]])
    with torch.no_grad():
        plain = base(ids).logits.numpy()
        reference = peft.PeftModel.from_pretrained(base, os.path.join(out, "peft"))
        expected = reference.eval()(ids).logits.numpy()
        got = tuned(ids).logits.numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert np.abs(expected - plain).max() > 100 * 1e-4  # The adapter matters.
    # The tokenizer and template come along: the same rendered ids.
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(merged)
    chat = fx.CONVERSATIONAL_PROMPT_COMPLETION[0]["prompt"]
    rendered = hf_tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, tokenize=False
    )
    assert rendered == report["generations"][0]["prompt"]


def test_generate_chat_prints_the_answer(llama, trained, capsys):
    out, merged, _, _ = trained
    question = "What is the capital of France?"
    argv = ["generate", "--model", llama, "--adapter", os.path.join(out, "adapter")]
    assert main([*argv, "--chat", question, "--max-new-tokens", str(TOKENS)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"model: {llama}; chat template: chat_template.jinja"
    tokenizer = load_tokenizer(llama)
    stops = stop_token_ids(tokenizer)
    prompt = encode_prompt(tokenizer, [{"role": "user", "content": question}])
    tuned = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    expected = answer_text(tokenizer, hf_greedy(tuned, prompt.ids, stops), stops)
    assert "\n".join(lines[2:]) == expected


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--preset", "p", "--chat", "hi"], "--chat needs --model"),
        (["--model", "m", "--prompt", "x", "--max-length", "9"], "--max-length"),
        (["--model", "m", "--chat", "hi", "--prompt", "x"], "not allowed with"),
    ],
)
def test_generate_flag_errors_exit_2(capsys, argv, fragment):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fragment in err


def test_merged_hf_is_not_written_on_bad_data_or_a_foreign_directory(tmp_path, capsys):
    model = fx.build_model_dir("llama3", str(tmp_path / "llama"))
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 1}\n')
    out, merged = tmp_path / "out", tmp_path / "merged"
    argv = ["sft", "--model", model, "--data", str(data), "--out", str(out)]
    assert main([*argv, "--merged-hf", str(merged)]) == 1
    assert "train.jsonl line 2" in capsys.readouterr().err
    assert not out.exists() and not merged.exists()
    # A directory that holds something else is never replaced.
    (merged / "notes").mkdir(parents=True)
    assert main([*argv, "--merged-hf", str(merged)]) == 1
    assert "holds no model" in capsys.readouterr().err
    assert os.listdir(merged) == ["notes"] and not out.exists()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"generate_prompts": -1}, "generate_prompts must be 0 or more"),
        ({"generate_tokens": 0}, "generate_tokens must be at least 1"),
        ({"merged_hf": "o"}, "directory of its own"),
        ({"merged_hf": "m"}, "directory of its own"),
        ({"merged_hf": "o/peft"}, "directory of its own"),
        ({"merged_hf": "."}, "directory of its own"),
    ],
)
def test_config_rejects_bad_generation_and_merge_options(options, message):
    with pytest.raises(ValueError, match=message):
        SftConfig("m", "d.jsonl", "o", **options)
