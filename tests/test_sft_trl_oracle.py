"""[sft] the first steps' train losses of `keras-lora sft` equal those of
transformers + PEFT (torch) from the same initial adapter on the same
batches, within 1e-4 absolute.

TRL's `SFTTrainer` draws its own batch order (a seeded sampler over its
own collation), so the oracle is the loop SFTTrainer runs, written out:
`PeftModel` on `LlamaForCausalLM`, transformers' `labels` loss, plain
torch SGD, on exactly the batches keras-lora trained on (rebuilt here by
the recipe's own `make_batches` from the seed). The initial adapter has a
nonzero B, so the first step's loss already goes through the LoRA path;
keras-lora starts from it through `--init-adapter`, PEFT through its
`export_peft` copy.
"""

from __future__ import annotations

import numpy as np
import pytest

from keras_lora import export_peft, inject_lora, lora_layers, save_adapter
from keras_lora.recipes.sft.batches import make_batches
from keras_lora.recipes.sft.config import SftConfig
from keras_lora.recipes.sft.inspection import prepare_data
from keras_lora.recipes.sft.run import load_causal_lm, train
from tests import sft_fixtures as fx

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

STEPS, BATCH, LEARNING_RATE = 3, 2, 1.0
TARGETS = ("query", "value")


# PEFT calls a transformers method deprecated in transformers 5.
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_first_steps_equal_transformers_peft(tmp_path):
    llama = fx.save_tiny_llama(fx.build_model_dir("llama3", str(tmp_path / "m")))
    data = fx.write_jsonl(str(tmp_path / "train.jsonl"), fx.MESSAGES * 3)

    # The initial adapter: keras-lora's factors with B drawn nonzero.
    lm = load_causal_lm(llama)
    inject_lora(lm, targets=TARGETS, rank=4, alpha=8.0, seed=1)
    rng = np.random.default_rng(0)
    for layer in lora_layers(lm):
        b = layer.adapters["default"].lora_b
        b.assign(rng.normal(0.0, 0.2, tuple(b.shape)).astype("float32"))
    init = save_adapter(lm, str(tmp_path / "init"))
    init_peft = export_peft(lm, str(tmp_path / "init_peft"))

    config = SftConfig(
        model=llama,
        data=data,
        out=str(tmp_path / "out"),
        steps=STEPS,
        batch=BATCH,
        optimizer="sgd",
        learning_rate=LEARNING_RATE,
        rank=4,
        alpha=8.0,
        targets=TARGETS,
        init_adapter=init,
        quiet=True,
        generate_prompts=0,
    )
    report = train(config)

    # The same batches; the pad id does not matter (masked, never a target).
    _, _, encoded = prepare_data(config)
    batches = make_batches(encoded.examples, BATCH, STEPS, 0, config.seed)
    mask = batches.sample_weight > 0
    labels = np.full(batches.y.shape, -100, dtype="int64")
    labels[:, 1:] = np.where(mask[:, :-1], batches.y[:, :-1], -100)

    base = transformers.LlamaForCausalLM.from_pretrained(llama)
    model = peft.PeftModel.from_pretrained(base, init_peft, is_trainable=True)
    model.train()
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE
    )
    losses = []
    for step in range(STEPS):
        rows = slice(step * BATCH, (step + 1) * BATCH)
        loss = model(
            input_ids=torch.tensor(batches.x["token_ids"][rows], dtype=torch.long),
            attention_mask=torch.tensor(batches.x["padding_mask"][rows]),
            labels=torch.tensor(labels[rows]),
        ).loss
        losses.append(float(loss.detach()))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    np.testing.assert_allclose(report["train_loss"], losses, rtol=0, atol=1e-4)
    # The steps move the loss far beyond the tolerance: the check has teeth.
    assert abs(losses[-1] - losses[0]) > 100 * 1e-4
