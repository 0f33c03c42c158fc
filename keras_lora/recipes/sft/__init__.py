"""Instruction fine-tuning (`keras-lora sft`), as TRL's `SFTTrainer` does it.

- `data`: reading and validating JSONL / JSON / CSV data in TRL's shapes;
- `chat_template`: finding a model's chat template, rendering it as
  transformers does;
- `tokenizer`: the tokenizer of a Hugging Face model directory;
- `encode`: token ids and labels (the loss mask), equal to TRL's;
- `config`: the frozen `SftConfig`;
- `inspection`: `--inspect`, the encoded data and its report on disk;
- `batches`: encoded examples as fixed-shape arrays and sample weights;
- `evaluation`: the eval loss, before and after training and every N steps;
- `generation`: greedy generations (eval prompts before and after,
  `keras-lora generate --model --chat`), stopped at the end of turn;
- `merged_hf`: `--merged-hf`, the merged model for transformers;
- `loss_plot`: `OUT/loss.png` (matplotlib, the "bench" extra);
- `run`: training (keras-hub model, `inject_lora`, `fit`, adapter + PEFT out).

Nothing here parses arguments (`keras_lora.cli.sft` does).
"""
