"""The benchmark: full fine-tuning vs keras-lora vs built-in LoRA vs PEFT.

- `engine`: `compare(CompareConfig(...))` plans the runs and starts each in
  its own process (`python -m keras_lora.bench.worker SPEC.json`), so every
  run has its own backend and its own memory peak;
- `worker`: one run, result as JSON;
- `report`: tables, ratios against the targets, charts.
"""
