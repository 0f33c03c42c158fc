"""Write the notebooks of this folder from the cell sources below.

    python notebooks/build_notebooks.py

The notebooks are saved without outputs; tests/test_notebooks.py executes
them on a tiny configuration by overriding their "parameters" cell
(papermill's convention: a code cell tagged `parameters`).
"""

from __future__ import annotations

import os
import subprocess

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))


def md(text: str):
    return new_markdown_cell(text.strip())


def code(text: str, parameters: bool = False):
    cell = new_code_cell(text.strip())
    if parameters:
        cell.metadata["tags"] = ["parameters"]
    return cell


GPT2_WALKTHROUGH = [
    md("""
# Parameter-efficient fine-tuning of GPT-2 with LoRA, with keras-lora

The keras.io example (Abheesht Sharma, Matthew Watson) fine-tunes GPT-2 on
Reddit TIFU, first fully, then with LoRA on the query and value projections,
and compares memory and generations. Here the LoRA part is
`keras_lora.inject_lora` / `merge_lora`, on any Keras backend.

Offline by default: the model is a GPT-2 architecture with **random
weights** (set `PRESET` to a keras-hub preset or a local preset / Hugging
Face directory for real weights) and the data is the offline default corpus,
Python standard-library docstrings (set `DATA = "reddit_tifu"` where
tensorflow-datasets has it). Every output below says which was used.
"""),
    code(
        """
# Parameters (tests override this cell).
ARCH = "gpt2-base-random"  # "tiny" or "gpt2-base-random"; ignored with PRESET
PRESET = None  # e.g. "gpt2_base_en" or a local preset / Hugging Face dir
DATA = "default"  # "default", "reddit_tifu" or a text file / folder
MAX_DOCUMENTS = 2000
BATCH_SIZE = 8
NUM_BATCHES = 20
EPOCHS = 1
MAX_SEQUENCE_LENGTH = 128
MAX_GENERATION_LENGTH = 40
RANK = 4
ALPHA = 32.0
LEARNING_RATE = 5e-5
SEED = 0
""",
        parameters=True,
    ),
    code("""
import time

import keras
import matplotlib.pyplot as plt

import keras_lora
from keras_lora.callbacks import GPUMemoryCallback
from keras_lora.recipes import data, models, tokenization, training

print("Keras backend:", keras.backend.backend())
"""),
    md("## Dataset\n\nDocuments only, batched, as in the example."),
    code("""
if DATA == "reddit_tifu":
    train_ds = data.reddit_tifu_dataset(BATCH_SIZE, num_batches=NUM_BATCHES)
    texts = data.dataset_texts(train_ds)
    DATA_LABEL = "reddit_tifu (tensorflow-datasets)"
else:
    if DATA == "default":
        texts = data.default_corpus(max_documents=MAX_DOCUMENTS)
        DATA_LABEL = data.corpus_description()
    else:
        texts = data.text_corpus(DATA)[:MAX_DOCUMENTS]
        DATA_LABEL = f"text {DATA}"
    train_ds = tokenization.text_dataset(texts, BATCH_SIZE, shuffle_seed=SEED).take(
        NUM_BATCHES
    )
print("data:", DATA_LABEL, f"({len(texts)} documents)")
print(texts[0][:300])
"""),
    md("""
## Model and tokenizer

With a preset, its own tokenizer; with a random architecture, a GPT-2-style
byte-level BPE tokenizer trained on the corpus. `build_model()` returns the
same base weights every call, so full fine-tuning and LoRA start equal.
"""),
    code("""
if PRESET is None:
    tokenizer = tokenization.train_tokenizer(
        texts[:2000], vocabulary_size=1024 if ARCH == "tiny" else 8192
    )
    WEIGHTS = f"RANDOM weights, GPT-2 {ARCH} architecture"
    TOKENIZER = f"byte-level BPE trained on the corpus ({tokenizer.vocabulary_size()})"
else:
    WEIGHTS = models.describe_preset(PRESET)
    TOKENIZER = "the preset's"


def build_model():
    if PRESET is None:
        lm, _ = models.random_task(ARCH, tokenizer, MAX_SEQUENCE_LENGTH, SEED)
    else:
        lm, _ = models.load_task(PRESET, MAX_SEQUENCE_LENGTH)
    return lm


def get_optimizer_and_loss():
    # The example's AdamW (weight decay 0.01 except biases and layer norms,
    # epsilon 1e-6, global clipnorm 1.0) and cross-entropy on logits.
    return training.optimizer_and_loss(LEARNING_RATE)


def generate_text(model, input_text, max_length=MAX_GENERATION_LENGTH):
    start = time.time()
    output = model.generate(input_text, max_length=max_length)
    print("\\nOutput:")
    print(output)
    print(f"Total Time Elapsed: {time.time() - start:.2f}s")


print("weights:", WEIGHTS, "| tokenizer:", TOKENIZER)
"""),
    md("## Full fine-tuning"),
    code("""
gpt2_lm = build_model()
keras_lora.print_trainable_parameters(gpt2_lm)
gpu_memory_callback = GPUMemoryCallback(target_batches=[5, 10, 25, 50, 100])
optimizer, loss = get_optimizer_and_loss()
gpt2_lm.compile(optimizer=optimizer, loss=loss, weighted_metrics=["accuracy"])
start = time.time()
gpt2_lm.fit(train_ds, epochs=EPOCHS, callbacks=[gpu_memory_callback])
full_time = time.time() - start
gpt2_lm_memory_usage = gpu_memory_callback.memory_usage
print(f"{full_time:.1f} s; memory ({gpu_memory_callback.device}):",
      gpt2_lm_memory_usage)
"""),
    code("""
generate_text(gpt2_lm, "I like basketball")
del gpt2_lm, optimizer, loss
"""),
    md("""
## LoRA

`inject_lora` wraps every query and value projection (keras-hub
`EinsumDense`, kernel (hidden, heads, head_dim)) with a `LoraLayer`:
A (hidden, r) and B (r, heads, head_dim), B zero at first, and freezes every
other weight. GPT-2 base at r=4: 12 x 2 x 6,144 = 147,456 trainable
parameters, 124,439,808 frozen.
"""),
    code("""
lora_model = build_model()
keras_lora.inject_lora(lora_model, rank=RANK, alpha=ALPHA, targets=("query", "value"))
keras_lora.print_trainable_parameters(lora_model)
gpu_memory_callback = GPUMemoryCallback(target_batches=[5, 10, 25, 50, 100])
optimizer, loss = get_optimizer_and_loss()
lora_model.compile(optimizer=optimizer, loss=loss, weighted_metrics=["accuracy"])
start = time.time()
lora_model.fit(train_ds, epochs=EPOCHS, callbacks=[gpu_memory_callback])
lora_time = time.time() - start
lora_model_memory_usage = gpu_memory_callback.memory_usage
print(f"{lora_time:.1f} s (full fine-tuning {full_time:.1f} s)")
"""),
    code("""
plt.bar(
    ["GPT-2", "LoRA GPT-2"],
    [max(gpt2_lm_memory_usage), max(lora_model_memory_usage)],
    color=["red", "blue"],
)
plt.ylabel(f"Peak memory (GB, {gpu_memory_callback.device})")
plt.title(f"Memory: full fine-tuning vs LoRA\\n{WEIGHTS}")
plt.show()
"""),
    md("""
## Merge and generate

`merge_lora` adds (alpha / r) A·B into each kernel and puts the original
layers back: the merged model computes the same outputs at no extra cost.
"""),
    code("""
import numpy as np

x, _, _ = lora_model.preprocessor(["LoRA is very useful for quick fine-tuning"])
before = keras.ops.convert_to_numpy(lora_model(x))
keras_lora.save_adapter(lora_model, "lora_adapter")
keras_lora.merge_lora(lora_model)
after = keras.ops.convert_to_numpy(lora_model(x))
print("LoRA layers left:", len(keras_lora.lora_layers(lora_model)))
print("max |logits difference| after merge:", float(np.abs(before - after).max()))
assert np.allclose(before, after, atol=1e-3)
"""),
    code("""
generate_text(lora_model, "I like basketball")
generate_text(lora_model, "That Italian restaurant is")
"""),
]


FROM_SCRATCH = [
    md("""
# LoRA from scratch, then with keras-lora

The ideas of three LoRA tutorials (a NumPy walkthrough, a toy language
model, and an MLP step by step), in Keras on any backend. Offline: the MLP
trains on synthetic data (the tutorial's MNIST needs a download).
"""),
    code(
        """
# Parameters (tests override this cell).
D, H, R = 6, 8, 2  # NumPy walkthrough: W is D x H, rank R
HIDDEN_SIZE = 1024  # toy language model
NUM_FEATURES, NUM_HIDDEN_1, NUM_HIDDEN_2, NUM_CLASSES = 784, 128, 256, 10
NUM_SAMPLES = 4096
EPOCHS = 5
SEED = 42
""",
        parameters=True,
    ),
    code("""
import keras
import numpy as np

import keras_lora

keras.utils.set_random_seed(SEED)
rng = np.random.default_rng(SEED)
print("Keras backend:", keras.backend.backend())
"""),
    md("""
## 1. The idea in NumPy

A weight matrix W (d x h) gets a low-rank update A·B with A (d x r) and
B (r x h): r·(d + h) parameters instead of d·h.
"""),
    code("""
W = rng.standard_normal((D, H))
A = rng.standard_normal((D, R))
B = rng.standard_normal((R, H))
print("W:", W.shape, W.size, "| A + B:", A.size + B.size,
      f"= {(A.size + B.size) / W.size * 100:.2f}% of W")
AB = A @ B
print("A·B:", AB.shape, "rank", np.linalg.matrix_rank(AB))
x = rng.standard_normal(D)
# x(W + AB) = xW + xAB: the update can run beside W or be merged into it.
assert np.allclose(x @ (W + AB), x @ W + (x @ A) @ B)
"""),
    md("""
## 2. A toy language model

An embedding, one `Dense` and an LM head over ten colour words. Wrapping
the `Dense` with `keras_lora.LoraLayer` changes nothing at first: B starts
at zero, so the adapter is an exact no-op until trained.
"""),
    code("""
detokenizer = ["red", "orange", "yellow", "green", "blue", "indigo", "violet",
               "magenta", "marigold", "chartreuse"]
toy = keras.Sequential([
    keras.Input((None,), dtype="int32"),
    keras.layers.Embedding(10, HIDDEN_SIZE, name="embedding"),
    keras.layers.Dense(HIDDEN_SIZE, name="linear"),
    keras.layers.Dense(10, name="lm_head"),
])
input_ids = np.array([[0, 1, 2, 3, 4, 5, 6, 7]])


def generate_token(model, input_ids):
    logits = keras.ops.convert_to_numpy(model(input_ids))
    return [detokenizer[i] for i in logits[:, -1, :].argmax(axis=-1)]


print("next token:", generate_token(toy, input_ids))
before = keras.ops.convert_to_numpy(toy(input_ids))
keras_lora.inject_lora(toy, rank=2, alpha=2.0, targets="linear")
layer = keras_lora.lora_layers(toy)[0]
print("A", tuple(layer.lora_a.shape), "B", tuple(layer.lora_b.shape),
      "scale", layer.scale)
keras_lora.print_trainable_parameters(toy)
assert np.allclose(before, keras.ops.convert_to_numpy(toy(input_ids)))
print("next token with a fresh adapter:", generate_token(toy, input_ids))
"""),
    md("""
## 3. An MLP, step by step

Train a three-layer MLP, then adapt all three `Dense` layers with rank 4,
alpha 8 (only the factors train), and merge. The data: a random teacher
network labels random inputs; the LoRA task relabels them with a shifted
teacher, standing in for a new domain.
"""),
    code("""
def make_data(seed):
    g = np.random.default_rng(seed)
    teacher = g.standard_normal((NUM_FEATURES, NUM_CLASSES))
    x = rng.standard_normal((NUM_SAMPLES, NUM_FEATURES)).astype("float32")
    return x, (x @ teacher).argmax(axis=1)


x_train, y_train = make_data(1)
mlp = keras.Sequential([
    keras.Input((NUM_FEATURES,)),
    keras.layers.Dense(NUM_HIDDEN_1, activation="relu", name="dense_1"),
    keras.layers.Dense(NUM_HIDDEN_2, activation="relu", name="dense_2"),
    keras.layers.Dense(NUM_CLASSES, name="dense_3"),
])
mlp.compile(keras.optimizers.Adam(0.005),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"])
mlp.fit(x_train, y_train, epochs=EPOCHS, batch_size=64, verbose=2)
keras_lora.print_trainable_parameters(mlp)
"""),
    code("""
x_new, y_new = make_data(2)  # the new task
print("accuracy on the new task before LoRA:",
      mlp.evaluate(x_new, y_new, verbose=0)[1])
keras_lora.inject_lora(mlp, rank=4, alpha=8.0, targets=r"dense_\\d")
keras_lora.print_trainable_parameters(mlp)
for v in mlp.weights:
    print(f"{v.path}: trainable={v.trainable}")
mlp.compile(keras.optimizers.Adam(0.005),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"])
mlp.fit(x_new, y_new, epochs=EPOCHS, batch_size=64, verbose=2)
lora_accuracy = mlp.evaluate(x_new, y_new, verbose=0)[1]
print("accuracy on the new task with LoRA:", lora_accuracy)
"""),
    md("""
## Merging

x(W + s·A·B) = xW + s·xA·B: `merge_lora` folds the update into the kernels;
the merged MLP predicts the same as the adapted one, with plain `Dense`
layers again.
"""),
    code("""
adapted = keras.ops.convert_to_numpy(mlp(x_new[:256]))
keras_lora.merge_lora(mlp)
merged = keras.ops.convert_to_numpy(mlp(x_new[:256]))
print([type(layer).__name__ for layer in mlp.layers])
print("max |difference|:", float(np.abs(adapted - merged).max()))
assert np.allclose(adapted, merged, atol=1e-4)
"""),
]


def write(name: str, cells) -> str:
    nb = new_notebook(cells=cells)
    for index, cell in enumerate(nb.cells):
        cell.id = f"cell-{index}"  # Stable ids: rebuilding changes nothing.
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    path = os.path.join(HERE, name)
    nbformat.write(nb, path)
    return path


if __name__ == "__main__":
    paths = [
        write("gpt2_lora_walkthrough.ipynb", GPT2_WALKTHROUGH),
        write("lora_from_scratch.ipynb", FROM_SCRATCH),
    ]
    # The checkout is kept ruff-formatted (CI checks it), notebooks included.
    try:
        subprocess.run(["ruff", "format", "-q", *paths], check=True)
    except FileNotFoundError:
        print("(ruff not found: run `ruff format notebooks` before committing)")
    print("\n".join(paths))
