"""XLA's temporaries for one LoRA train step of a small GPT-2, by depth,
with and without `remat_layers` (JAX; run by tests/test_remat_layers.py).

Prints `REMAT_RESULT {"plain": [t2, t4], "remat": [t2, t4]}`: bytes of
temporaries for 2 and 4 blocks, from XLA's buffer assignment of the
compiled step (`memory_analysis()`), without running it.
"""

import json
import os

os.environ["KERAS_BACKEND"] = "jax"

import jax  # noqa: E402
import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

from keras_lora import inject_lora, remat_layers  # noqa: E402


def step_temporaries(num_layers: int, remat: bool) -> int:
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=256,
        num_layers=num_layers,
        num_heads=4,
        hidden_dim=64,
        intermediate_dim=256,
        max_sequence_length=64,
        dropout=0.1,
    )
    lm = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    inject_lora(lm, rank=2, targets=["query", "value"])
    if remat:
        remat_layers(backbone.transformer_layers)
    lm.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
    )
    tokens = np.zeros((4, 64), "int32")
    data = ({"token_ids": tokens, "padding_mask": tokens + 1}, tokens, None)
    lm._symbolic_build(data_batch=data)  # Builds the optimizer's variables.
    state = lm._get_jax_state(True, True, True, True)
    compiled = jax.jit(lm.train_step).lower(state, data).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


if __name__ == "__main__":
    result = {
        name: [step_temporaries(n, remat) for n in (2, 4)]
        for name, remat in (("plain", False), ("remat", True))
    }
    print("REMAT_RESULT " + json.dumps(result))
