"""[sft] the first steps' train losses of `keras-lora sft` equal those of
TRL's `SFTTrainer` (transformers + PEFT, torch) from the same initial
adapter on the same batches, within 1e-4 absolute.

The batches are the recipe's own: `plan_steps` with the run's config,
train examples and pad id (length buckets by default), so the oracle sees
exactly what keras-lora trained on. `SFTTrainer` draws a seeded random
order over its own collation, so the test lays the rows out in step order
and reads them sequentially (`_get_train_sampler`), `batch` rows per step,
through a collator that stacks each step's padded rows with labels -100
wherever keras-lora's sample weight is 0. Everything else is SFTTrainer's:
its loss (summed token cross-entropy over `num_items_in_batch`, the label
tokens of the step, so the mean over them, as keras-lora's normalised
sample weight), its training step, with plain SGD, a constant learning
rate, no clipping and no weight decay. The initial adapter has a nonzero
B, so the first step's loss already goes through the LoRA path;
keras-lora starts from it through `--init-adapter`, PEFT through its
`export_peft` copy, passed to SFTTrainer as the model.
"""

from __future__ import annotations

import numpy as np
import pytest

from keras_lora import export_peft, inject_lora, lora_layers, save_adapter
from keras_lora.recipes.sft.buckets import plan_steps
from keras_lora.recipes.sft.config import SftConfig
from keras_lora.recipes.sft.inspection import prepare_data
from keras_lora.recipes.sft.run import load_causal_lm, train
from tests import sft_fixtures as fx

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")

STEPS, BATCH, LEARNING_RATE = 3, 2, 1.0
TARGETS = ("query", "value")


def _pad_id(tokenizer) -> int:
    # The pad id `train` uses: the pad token's, else the EOS's, else 0.
    for name in ("pad_token", "eos_token"):
        token = tokenizer.special_tokens.get(name)
        if token is not None and tokenizer.token_to_id(token) is not None:
            return tokenizer.token_to_id(token)
    return 0


def _step_rows(config: SftConfig) -> tuple[list[dict], list[int]]:
    """keras-lora's step batches as HF rows in step order, and each step's
    label-token count."""
    tokenizer, _, data = prepare_data(config)
    # No eval split or eval file: `train` trains on all of `data.examples`.
    batches = plan_steps(config, data.examples, _pad_id(tokenizer))
    rows, counts = [], []
    for x, y, weight in batches.steps:
        assert x["token_ids"].shape[0] == BATCH
        # y[:, t] is the target of position t; HF shifts labels by one.
        labels = np.full(y.shape, -100, dtype="int64")
        labels[:, 1:] = np.where(weight[:, :-1] > 0, y[:, :-1], -100)
        assert np.count_nonzero(weight) == np.count_nonzero(labels != -100)
        counts.append(int(np.count_nonzero(weight)))
        for r in range(BATCH):
            rows.append(
                {
                    "input_ids": x["token_ids"][r].astype("int64").tolist(),
                    "attention_mask": x["padding_mask"][r].astype("int64").tolist(),
                    "labels": labels[r].tolist(),
                }
            )
    return rows, counts


def _stack(rows: list[dict]) -> dict:
    # A step's rows share their bucket length: stack them as they are.
    return {k: torch.tensor([row[k] for row in rows]) for k in rows[0]}


class _InOrder(trl.SFTTrainer):
    """SFTTrainer reading its rows in order, recording each training loss
    and its `num_items_in_batch`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.losses: list[float] = []
        self.items: list[int] = []

    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(train_dataset or self.train_dataset)

    def compute_loss(
        self, model, inputs, return_outputs=False, num_items_in_batch=None
    ):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            loss = out[0] if return_outputs else out
            self.losses.append(float(loss.detach()))
            self.items.append(int(num_items_in_batch))
        return out


# PEFT calls a transformers method deprecated in transformers 5.
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_first_steps_equal_trl_sft_trainer(tmp_path):
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

    rows, counts = _step_rows(config)
    base = transformers.LlamaForCausalLM.from_pretrained(llama)
    model = peft.PeftModel.from_pretrained(base, init_peft, is_trainable=True)
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE
    )
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1,
        max_steps=STEPS,
        max_grad_norm=0.0,
        weight_decay=0.0,
        bf16=False,
        activation_checkpointing=False,
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        remove_unused_columns=False,
        dataloader_drop_last=False,
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    trainer = _InOrder(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        data_collator=_stack,
        optimizers=(
            optimizer,
            torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
        ),
    )
    trainer.train()

    # One accumulation step: the loss is the mean over the step's label tokens.
    assert trainer.items == counts
    np.testing.assert_allclose(report["train_loss"], trainer.losses, rtol=0, atol=1e-4)
    # The steps move the loss far beyond the tolerance: the check has teeth.
    assert abs(trainer.losses[-1] - trainer.losses[0]) > 100 * 1e-4
