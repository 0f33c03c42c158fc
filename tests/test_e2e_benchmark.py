"""benchmarks/e2e_bleu.py: the split by MR, the scores, the shared base and
data order (the training runs are the sft recipe's, tested there)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = [
    ("name[Aromi], food[Chinese]", "Aromi serves Chinese food."),
    ("name[Aromi], food[Chinese]", "Chinese food is served at Aromi."),
    ("name[Bibimbap], area[riverside]", "Bibimbap is by the riverside."),
    ("name[Bibimbap], area[riverside]", "By the riverside you find Bibimbap."),
    (
        "name[Bibimbap], area[riverside]",
        "Down by the riverside, past the old bridge and the boats, there is a "
        "small and friendly place called Bibimbap that everyone likes to visit.",
    ),
    ("name[Cotto], eatType[pub]", "Cotto is a pub."),
    ("name[Cotto], eatType[pub]", "There is a pub called Cotto."),
    ("name[Zizzi], near[The Sorrento]", "Zizzi is near The Sorrento."),
    ("name[Zizzi], near[The Sorrento]", "Near The Sorrento is Zizzi."),
    ("name[Wildwood], priceRange[cheap]", "Wildwood is cheap."),
]


def load_script():
    """benchmarks/e2e_bleu.py, a script, as a module."""
    path = os.path.join(ROOT, "benchmarks", "e2e_bleu.py")
    spec = importlib.util.spec_from_file_location("e2e_bleu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_csv(path, rows) -> str:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["mr", "ref"])
        writer.writerows(rows)
    return str(path)


def test_split_by_mr_keeps_all_references_of_an_mr_on_one_side(tmp_path):
    e2e = load_script()
    rows = e2e.read_rows(write_csv(tmp_path / "d.csv", ROWS))
    train, held = e2e.split_by_mr(rows, 2, seed=0)
    assert len(held) == 2
    assert not {mr for mr, _ in train} & set(held)
    groups = e2e.group_by_mr(rows)
    assert all(held[mr] == groups[mr] for mr in held)
    assert len(train) + sum(map(len, held.values())) == len(ROWS)
    # Seeded: the same split again, another with another seed.
    assert e2e.split_by_mr(rows, 2, seed=0)[1] == held
    splits = {tuple(sorted(e2e.split_by_mr(rows, 2, seed=s)[1])) for s in range(6)}
    assert len(splits) > 1
    with pytest.raises(ValueError, match="cannot hold out 5 of 5 MRs"):
        e2e.split_by_mr(rows, 5, seed=0)


def test_read_rows_collapses_whitespace_and_names_a_missing_column(tmp_path):
    e2e = load_script()
    path = write_csv(tmp_path / "d.csv", [("name[A],  area[x]", "A  is\tin x. ")])
    assert e2e.read_rows(path) == [("name[A], area[x]", "A is in x.")]
    bad = tmp_path / "bad.csv"
    bad.write_text("meaning,ref\nx,y\n")
    with pytest.raises(ValueError, match="lacks the column.*mr"):
        e2e.read_rows(str(bad))


def test_bleu_scores_against_every_reference_of_a_segment():
    e2e = load_script()
    hyp = ["the pub called cotto is near the river and serves cheap food"]
    other = "a completely different sentence about a coffee shop in the centre"
    assert e2e.corpus_bleu(hyp, [[other, hyp[0]]]) == pytest.approx(100.0)
    assert e2e.corpus_bleu(hyp, [[other]]) < 10.0
    # Ragged references: each segment is scored against its own.
    hyps = [hyp[0], "bibimbap is a cheap restaurant by the riverside in the city"]
    refs = [[hyp[0]], [other, "x", hyps[1]]]
    assert e2e.corpus_bleu(hyps, refs) == pytest.approx(100.0)


def test_rouge_l_is_the_best_lcs_f_score_over_the_references():
    e2e = load_script()
    # LCS of "a b c d" and "a c d e" is 3: precision = recall = 3/4.
    assert e2e.rouge_l(["a b c d"], [["x y", "A c d e"]]) == pytest.approx(75.0)
    assert e2e.rouge_l(["", "a b"], [["a"], ["a b"]]) == pytest.approx(50.0)


def test_lora_rate_and_targets_reach_the_lora_run_only(tmp_path):
    e2e = load_script()
    runs = sys.modules["e2e_runs"]
    argv = ["d.csv", "--out", str(tmp_path)]
    assert e2e.parse_args(argv).lora_learning_rate is None
    args = e2e.parse_args(
        argv + ["--lora-learning-rate", "0.02", "--targets", "all-linear"]
    )
    assert args.lora_learning_rate == 0.02 and args.targets == ["all-linear"]
    assert args.full_freeze is None
    frozen = ["--full-freeze", "token_embedding", "position_embedding"]
    assert e2e.parse_args(argv + frozen).full_freeze == frozen[1:]
    with pytest.raises(SystemExit):  # TRL's run adapts projections only.
        e2e.parse_args(argv + ["--targets", "query", "token_embedding"])
    embedding = ["--runs", "lora", "--targets", "query", "token_embedding"]
    assert e2e.parse_args(argv + embedding).targets == ["query", "token_embedding"]
    spec = dict(base="b", train="t", eval="e", max_length=128, rank=2, alpha=4.0)
    spec |= dict(steps=3, batch=2, learning_rate=1e-3, seed=0)
    assert runs._sft_config(spec, str(tmp_path)).targets is None
    config = runs._sft_config(spec | {"targets": ["all-linear"]}, str(tmp_path))
    assert config.targets == ("all-linear",) and config.learning_rate == 1e-3


def test_base_tokenizer_order_and_losses_are_shared_with_transformers(tmp_path):
    """The benchmark's Hugging Face base: transformers tokenizes as the sft
    recipe does (EOS one token), the order TRL gets is the order the recipe
    trains in, and the decode process's eval loss is the recipe's."""
    import transformers

    from keras_lora.recipes.sft.batches import make_batches
    from keras_lora.recipes.sft.buckets import plan_steps
    from keras_lora.recipes.sft.encode import Encoded
    from keras_lora.recipes.sft.evaluation import eval_loss
    from keras_lora.recipes.sft.inspection import prepare_data
    from keras_lora.recipes.sft.run import load_causal_lm

    e2e = load_script()
    runs = sys.modules["e2e_runs"]
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    rows = e2e.read_rows(write_csv(tmp_path / "d.csv", ROWS))
    train, held = e2e.split_by_mr(rows, 2, seed=0)
    paths = {}
    for name, pairs in (
        ("train", train),
        ("eval", [(m, r) for m in held for r in held[m]]),
    ):
        paths[name] = str(out / "data" / f"{name}.jsonl")
        e2e._write_jsonl(
            paths[name],
            ({"prompt": e2e.prompt_of(m), "completion": r} for m, r in pairs),
        )
    settings = dict(max_length=128, rank=2, alpha=4.0, steps=3, batch=2)
    settings |= dict(learning_rate=1e-3, seed=0)
    base = str(out / "base_hf")
    prep = runs.prepare(base, paths["train"], paths["eval"], str(out), settings)

    hf = transformers.AutoTokenizer.from_pretrained(base)
    eos = hf.convert_tokens_to_ids(runs.EOS)
    prompt, completion = e2e.prompt_of(train[0][0]), train[0][1]
    ids = hf(prompt + completion + runs.EOS)["input_ids"]
    assert ids[-1] == eos and ids.count(eos) == 1

    spec = {"base": base, "train": paths["train"], "eval": paths["eval"], **settings}
    config = runs._sft_config(spec, str(out / "x"))
    _, _, data = prepare_data(config)
    assert data.examples[0].input_ids == ids
    batches = make_batches(data.examples, 2, 3, eos, 0)
    # The sft recipe trains on these very arrays (padding included) with
    # the benchmark's config, so the order handed to TRL is its order.
    trained = plan_steps(config, data.examples, eos).steps
    for step, (x, y, weight) in enumerate(trained):
        rows = slice(2 * step, 2 * step + 2)
        np.testing.assert_array_equal(x["token_ids"], batches.x["token_ids"][rows])
        np.testing.assert_array_equal(y, batches.y[rows])
        np.testing.assert_array_equal(weight, batches.sample_weight[rows])
    records = [json.loads(line) for line in open(paths["train"], encoding="utf-8")]
    for row, line in enumerate(prep["order"]):
        record = records[line - 1]
        expected = hf(record["prompt"] + record["completion"] + runs.EOS)["input_ids"]
        got = batches.x["token_ids"][row][: int(batches.x["padding_mask"][row].sum())]
        assert got.tolist() == expected

    decoded = runs.run_decode(
        spec
        | {
            "out": str(out),
            "max_new_tokens": 3,
            "prompts": [prompt],
            "models": {"base": {}},
        }
    )
    assert len(decoded["generations"]["base"]) == 1
    with open(out / "data" / "eval_encoded.jsonl") as f:
        held_examples = [json.loads(line) for line in f]
    keras_loss = eval_loss(
        load_causal_lm(base),
        [
            Encoded(e["input_ids"], e["labels"], line=i)
            for i, e in enumerate(held_examples)
        ],
        4,
        eos,
    )
    np.testing.assert_allclose(decoded["eval_loss"]["base"], keras_loss, rtol=1e-4)
