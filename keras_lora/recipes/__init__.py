"""Fine-tuning recipes built on keras-lora, as plain functions.

- `data`: offline corpora, tokenizers, datasets, token windows;
- `models`: the one architecture table, preset and random-model loading;
- `training`: the optimizer and loss, the step log, the loss plot;
- `finetune`: `finetune(FinetuneConfig(...)) -> report`;
- `adapters`: generate, merge, PEFT export and import around an adapter;
- `demo`: `demo(DemoConfig(...))`, the fine-tune plus the benchmark.

Nothing here parses arguments (`keras_lora.cli` does). The submodules are
imported on use: `demo` needs `keras_lora.bench`, which needs `models`.
"""
