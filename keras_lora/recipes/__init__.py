"""Fine-tuning recipes built on keras-lora, as plain functions.

- `data`: offline corpora, tokenizers, datasets, token windows;
- `models`: the one architecture table, preset and random-model loading;
- `training`: the optimizer and loss, the step log, the loss plot;
- `finetune`: `finetune(FinetuneConfig(...)) -> report`;
- `saved_adapter`: generate, merge, PEFT export and import around an adapter;
- `pretrain`: keras-lora's own small pretrained GPT-2 (made, shipped, loaded);
- `quality`, `quality_peft`: that base fine-tuned on Python code by LoRA,
  full fine-tuning, keras-hub's `enable_lora` and PEFT (torch, a child
  process);
- `demo`: `demo(DemoConfig(...))`, the quality part plus the cost table.

Nothing here parses arguments (`keras_lora.cli` does). The submodules are
imported on use: `demo` needs `keras_lora.bench`, which needs `models`.
"""
