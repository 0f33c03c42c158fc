"""Execute the notebooks on a tiny configuration (offline, a few steps).

Each notebook has a code cell tagged `parameters`; as papermill does, a cell
with the test's values is inserted after it. The kernel inherits this
process's environment, so it runs on the same Keras backend.
"""

from __future__ import annotations

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "notebooks")
TINY = {
    "gpt2_lora_walkthrough.ipynb": dict(
        ARCH="tiny",
        MAX_DOCUMENTS=40,
        BATCH_SIZE=2,
        NUM_BATCHES=2,
        MAX_SEQUENCE_LENGTH=16,
        MAX_GENERATION_LENGTH=10,
    ),
    "lora_from_scratch.ipynb": dict(
        HIDDEN_SIZE=32,
        NUM_FEATURES=20,
        NUM_HIDDEN_1=16,
        NUM_HIDDEN_2=16,
        NUM_SAMPLES=256,
        EPOCHS=1,
    ),
}


def run_notebook(name: str, parameters: dict, workdir: str):
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    index = next(
        i
        for i, cell in enumerate(nb.cells)
        if "parameters" in cell.get("metadata", {}).get("tags", [])
    )
    source = "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
    injected = nbformat.v4.new_code_cell("# Injected by the tests\n" + source)
    injected.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(index + 1, injected)
    # ipykernel's inline matplotlib backend renders plots as PNG outputs,
    # with no display needed.
    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": workdir}},
    )
    client.execute()
    return nb


def outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts.append(output.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def test_gpt2_walkthrough_runs_tiny(tmp_path):
    name = "gpt2_lora_walkthrough.ipynb"
    nb = run_notebook(name, TINY[name], str(tmp_path))
    text = outputs_text(nb)
    if os.environ.get("KERAS_BACKEND"):  # The kernel ran on this backend.
        assert f"Keras backend: {os.environ['KERAS_BACKEND']}" in text
    assert "RANDOM weights, GPT-2 tiny architecture" in text
    assert "standard-library docstrings" in text
    assert "trainable params: 2,048" in text
    assert "LoRA layers left: 0" in text
    assert (tmp_path / "lora_adapter" / "adapter_config.json").is_file()
    assert any(
        "image/png" in output.get("data", {})
        for cell in nb.cells
        for output in cell.get("outputs", [])
    )


def test_from_scratch_runs_tiny(tmp_path):
    name = "lora_from_scratch.ipynb"
    nb = run_notebook(name, TINY[name], str(tmp_path))
    text = outputs_text(nb)
    assert "accuracy on the new task with LoRA" in text
    assert "['Dense', 'Dense', 'Dense']" in text
