"""The recipes' building blocks: data, the architecture table, training, configs.

Plus two checks on the layout of the apps layer: imports run one way
(cli -> recipes/bench -> the rest), and no GPT-2 projection name is written
outside `keras_lora.families`.
"""

from __future__ import annotations

import ast
import os

import keras
import numpy as np
import pytest

from keras_lora.bench import compare_config
from keras_lora.families import GPT2
from keras_lora.recipes import data, models, tokenization, training
from keras_lora.recipes.demo import DemoConfig
from keras_lora.recipes.finetune import FinetuneConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "keras_lora")


def test_default_corpus_is_deterministic_prose():
    first = data.default_corpus(max_documents=30)
    assert first == data.default_corpus(max_documents=30)
    assert len(first) == 30 and all(len(d) >= 200 for d in first)
    assert not any(">>>" in d for d in first)
    capped = data.default_corpus(max_chars=5000)
    assert sum(map(len, capped)) == 5000
    assert "standard-library docstrings" in data.corpus_description()


def test_text_corpus_files_and_paragraphs(tmp_path):
    (tmp_path / "a.txt").write_text("First para.\n\nSecond para.\n")
    (tmp_path / "b.md").write_text("Only one.")
    (tmp_path / "skip.bin").write_text("ignored")
    assert data.text_corpus(tmp_path) == ["First para.\n\nSecond para.", "Only one."]
    assert data.text_corpus(tmp_path, split="paragraph") == [
        "First para.",
        "Second para.",
        "Only one.",
    ]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.text_corpus(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="split"):
        data.text_corpus(tmp_path, split="line")


def test_trained_tokenizer_and_dataset_feed_gpt2():
    docs = data.default_corpus(max_documents=20)
    tokenizer = tokenization.train_tokenizer(docs, vocabulary_size=300)
    assert tokenizer.vocabulary_size() <= 300
    assert tokenizer.token_to_id(tokenization.END_OF_TEXT) is not None
    preprocessor = tokenization.make_preprocessor(tokenizer, sequence_length=12)
    batch = next(iter(tokenization.text_dataset(docs, batch_size=4)))
    x, y, w = preprocessor(batch)
    assert tuple(x["token_ids"].shape) == (4, 12)
    text = docs[0][:40]
    ids = tokenizer(text)
    assert tokenizer.detokenize(ids) == text  # Byte-level BPE is lossless.
    with pytest.raises(ValueError, match="at least 257"):
        tokenization.train_tokenizer(docs, vocabulary_size=100)


def test_token_windows_cut_the_tokenized_corpus():
    docs = data.default_corpus(max_documents=20)
    tokenizer = tokenization.train_tokenizer(docs, vocabulary_size=300)
    end = tokenizer.token_to_id(tokenization.END_OF_TEXT)
    rows = tokenization.token_windows(docs, tokenizer, length=33, shuffle_seed=None)
    stream = []
    for doc in docs:
        stream += np.asarray(tokenizer(doc)).tolist() + [end]
    assert rows.dtype == np.int32 and rows.shape == (len(stream) // 33, 33)
    np.testing.assert_array_equal(rows.ravel(), stream[: rows.size])
    shuffled = tokenization.token_windows(docs, tokenizer, length=33, max_rows=5)
    assert shuffled.shape == (5, 33)
    assert {tuple(r) for r in shuffled} <= {tuple(r) for r in rows}
    with pytest.raises(ValueError, match="fewer than one row"):
        tokenization.token_windows(docs[:1], tokenizer, length=10**6)


def test_reddit_tifu_unavailable_offline_is_a_clear_error(tmp_path):
    with pytest.raises(OSError, match="reddit_tifu is unavailable"):
        data.reddit_tifu_dataset(batch_size=2, data_dir=str(tmp_path))


# ------------------------------------------------------------------ models


def test_one_architecture_table_with_gpt2_shapes():
    base = models.architecture("base")
    assert models.architecture("gpt2-base-random") is base
    assert (base.vocabulary_size, base.num_layers, base.hidden_dim) == (50257, 12, 768)
    assert base.intermediate_dim == 4 * base.hidden_dim
    tiny = models.ARCHITECTURES["tiny"].backbone_config()
    assert tiny == dict(
        vocabulary_size=1024, num_layers=2, num_heads=2, hidden_dim=64,
        intermediate_dim=128, max_sequence_length=256,
    )  # fmt: skip
    with pytest.raises(ValueError, match="unknown architecture 'huge'.*tiny"):
        models.architecture("huge")


def test_random_task_checks_tokenizer_and_length():
    tokenizer = tokenization.train_tokenizer(data.default_corpus(max_documents=20), 300)
    lm, config = models.random_task("tiny", tokenizer, 16, seed=0)
    assert config["vocabulary_size"] == 1024
    assert lm.backbone.token_embedding.embeddings.shape == (1024, 64)
    with pytest.raises(ValueError, match="exceeds the tiny architecture"):
        models.random_task("tiny", tokenizer, 512, seed=0)


def test_describe_preset_says_which_weights(tmp_path):
    assert "pretrained" in models.describe_preset("gpt2_base_en")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        models.describe_preset(str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.describe_preset(str(tmp_path))
    (tmp_path / "config.json").write_text('{"n_embd": 8}')
    assert models.describe_preset(str(tmp_path)).startswith("local Hugging Face")


# ------------------------------------------------------------------ training


def _fit_log(steps_per_execution: int) -> training.StepLog:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss="mse",
        steps_per_execution=steps_per_execution,
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 3)).astype("float32")
    y = rng.normal(size=(16, 1)).astype("float32")
    log = training.StepLog()
    model.fit(x, y, batch_size=2, epochs=2, shuffle=False, callbacks=[log], verbose=0)
    return log


def test_step_log_losses_give_back_the_running_means():
    log = _fit_log(1)
    assert log.steps == [1] * 16
    for epoch in range(2):  # Keras's running mean restarts every epoch.
        losses = log.losses[8 * epoch : 8 * epoch + 8]
        means = log.running_means[8 * epoch : 8 * epoch + 8]
        expected = np.cumsum(losses) / np.arange(1, 9)
        np.testing.assert_allclose(expected, means, rtol=1e-5, atol=1e-6)
    assert len(set(np.round(log.losses, 5))) > 8  # Real per-step values.
    assert all(t > 0 for t in log.step_times)


@pytest.mark.skipif(
    keras.backend.backend() == "torch",
    reason="Keras's torch backend requires steps_per_execution=1",
)
def test_step_log_is_right_with_steps_per_execution():
    """With 2 steps per execution each entry is the mean of its 2 steps.

    Reading the running mean by batch index as if each call were one step
    (the old `_StepLosses`) doubled the first entry here.
    """
    single, double = _fit_log(1), _fit_log(2)
    assert single.steps == [1] * 16 and double.steps == [2] * 8
    pairs = np.asarray(single.losses).reshape(8, 2).mean(axis=1)
    np.testing.assert_allclose(double.losses, pairs, rtol=1e-4, atol=1e-5)
    assert len(double.step_times) == len(double.cpu_times) == 8
    # The running mean restarts every epoch: entry 4 is epoch 2's first.
    assert double.losses[4] == pytest.approx(double.running_means[4], rel=1e-6)


def test_optimizer_matches_the_keras_io_example():
    optimizer, loss = training.optimizer_and_loss(1e-3)
    assert isinstance(optimizer, keras.optimizers.AdamW)
    assert float(optimizer.learning_rate) == pytest.approx(1e-3)
    assert optimizer.global_clipnorm == 1.0 and optimizer.epsilon == 1e-6
    assert isinstance(loss, training.TokenCrossEntropy)
    bias = keras.Variable(np.zeros(2), name="bias")
    kernel = keras.Variable(np.zeros(2), name="kernel")
    # Keras 3.16 asks for a built optimizer here.
    optimizer.build([bias, kernel])
    assert optimizer._use_weight_decay(kernel)
    assert not optimizer._use_weight_decay(bias)
    plain, _ = training.optimizer_and_loss(1e-3, exclude_from_decay=False)
    plain.build([bias, kernel])
    assert plain._use_weight_decay(bias)


def test_token_cross_entropy_equals_keras_sparse_cross_entropy(tmp_path):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 7)).astype("float32")
    labels = rng.integers(0, 7, (3, 5))
    weights = rng.uniform(size=(3, 5)).astype("float32")
    keras_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    ours = training.TokenCrossEntropy()
    for args in ((labels, logits), (labels, logits, weights)):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(ours(*args)),
            keras.ops.convert_to_numpy(keras_loss(*args)),
            rtol=1e-6,
        )
    # A compiled model saves it and loads it back (registered class).
    model = keras.Sequential([keras.Input((5,)), keras.layers.Embedding(7, 7)])
    model.compile(optimizer="sgd", loss=ours)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.loss, training.TokenCrossEntropy)
    x = labels.astype("int32")
    assert loaded.evaluate(x, labels, verbose=0) == pytest.approx(
        model.evaluate(x, labels, verbose=0), rel=1e-6
    )


def test_plot_losses_writes_a_png(tmp_path):
    path = training.plot_losses([3.0, 2.0, 1.5], str(tmp_path / "l.png"), "t")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ configs


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "exactly one of preset and arch"),
        (dict(arch="tiny", preset="p"), "exactly one of preset and arch"),
        (dict(arch="huge"), "unknown architecture"),
        (dict(arch="tiny", rank=0), "rank must be a positive integer"),
        (dict(arch="tiny", steps=5, epochs=1), "steps or epochs"),
        (dict(arch="tiny", dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(arch="tiny", dtype_policy="int8"), "dtype_policy 'int8'"),
        (dict(arch="tiny", targets="query"), "targets must be a non-empty tuple"),
    ],
)
def test_finetune_config_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FinetuneConfig(out="unused", **kwargs)


def test_configs_normalise_and_default_to_the_family():
    config = FinetuneConfig(out="o", arch="tiny", targets=["key"])
    assert config.targets == ("key",)
    assert FinetuneConfig(out="o", arch="tiny").targets == GPT2.default_targets
    assert DemoConfig(runs=("full", "lora", "full")).runs == ("full", "lora")
    # The quality part always runs LoRA and full fine-tuning, in that order.
    assert DemoConfig(runs=("peft", "full")).quality_config().runs == (
        "lora",
        "full",
        "peft",
    )
    with pytest.raises(ValueError, match="unknown run"):
        DemoConfig(runs=("qlora",))
    compare = compare_config.CompareConfig(
        out="o", backends=("jax", "jax"), runs=("lora", "full"), targets=("all",)
    )
    assert compare.backends == ("jax",)
    assert compare.runs == ("full", "lora")  # Always in compare_config.RUNS order.
    assert compare.targets == GPT2.roles


# ------------------------------------------------------------------ layout


def _modules(*folders):
    for folder in folders:
        for root, _, files in os.walk(os.path.join(PACKAGE, folder)):
            for name in sorted(files):
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    with open(path) as f:
                        yield path, ast.parse(f.read())


def _imports(tree) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_imports_run_one_way():
    """cli -> recipes.demo -> bench -> recipes' building blocks -> the rest."""
    forbidden = {
        "bench": ("keras_lora.cli", "keras_lora.recipes.demo",
                  "keras_lora.recipes.finetune"),
        "recipes": ("keras_lora.cli",),
        "families": ("keras_lora.cli", "keras_lora.recipes", "keras_lora.bench"),
    }  # fmt: skip
    for folder, banned in forbidden.items():
        for path, tree in _modules(folder):
            bad = [n for n in _imports(tree) if n.startswith(banned)]
            assert not bad, (path, bad)
    for name in os.listdir(PACKAGE):  # The core modules.
        if name.endswith(".py"):
            with open(os.path.join(PACKAGE, name)) as f:
                names = _imports(ast.parse(f.read()))
            bad = [
                n
                for n in names
                if n.startswith(("keras_lora.cli", "keras_lora.recipes",
                                 "keras_lora.bench"))
            ]  # fmt: skip
            assert not bad, (name, bad)


def _string_constants(tree):
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(
            node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)
        )
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
        ):
            yield node.value


def test_no_gpt2_projection_names_outside_families():
    """Projection names live in families/gpt2.py; the apps read GPT2.

    "query", "key" and "value" are also ordinary words (a ratio row has a
    "value"), so for them only a tuple or list of roles counts.
    """
    generic = {"query", "key", "value"}
    names = set(GPT2.roles) | set(GPT2.hf_modules)
    names |= {module.rsplit(".", 1)[-1] for module in GPT2.hf_modules}
    scripts = os.path.join(ROOT, "benchmarks")
    trees = list(_modules("cli", "recipes", "bench"))
    for name in sorted(os.listdir(scripts)):
        if name.endswith(".py"):
            with open(os.path.join(scripts, name)) as f:
                trees.append((name, ast.parse(f.read())))
    for path, tree in trees:
        found = [s for s in _string_constants(tree) if s in names - generic]
        for node in ast.walk(tree):
            if isinstance(node, (ast.Tuple, ast.List)) and node.elts:
                values = [getattr(e, "value", None) for e in node.elts]
                if all(v in GPT2.roles for v in values):
                    found.append(values)
        assert not found, (path, found)
