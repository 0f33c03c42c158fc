"""The quality part's settings: which runs, their labels, `QualityConfig`.

`recipes.quality` runs them and `recipes.quality_report` reports them.
"""

from __future__ import annotations

import dataclasses

from keras_lora.families import GPT2

PROMPTS = ("def __init__(self, ", "    for key, value in ", "class ")
RUNS = ("lora", "full", "builtin", "peft")
LABELS = {
    "lora": "keras-lora",
    "full": "full fine-tuning",
    "builtin": "keras-hub enable_lora",
    "peft": "HF PEFT (torch)",
}
# All six projections of every block at rank 1 and the tied token
# embedding at rank 4 (alpha 1): 26,112 parameters, 1.96% of the base.
# The projections alone (rank 2, 18,432 parameters) recovered a third of
# full fine-tuning's gain: most of it is the code's token frequencies, which
# reach the logits through the tied output head (README, "The main job").
LORA_TARGETS = (*GPT2.roles, GPT2.embedding)
WEIGHTED = "weighted_update"  # quality.json: losses with the update times w.


@dataclasses.dataclass(frozen=True)
class QualityConfig:
    """What the quality part runs; checked when made.

    Args:
        out: directory for quality.json, the loss plot and the adapter.
        steps: training steps of each run.
        batch: rows per step.
        seq: tokens per row (at most the base's 128).
        runs: which of `RUNS` to run (lora and full always run: the
            summary compares them).
        lora_rank, lora_alpha, lora_targets: keras-lora's LoRA settings;
            the targets are `inject_lora` targets (GPT-2 roles and the
            token embedding, "token_embedding").
        embedding_rank, embedding_alpha: rank and alpha of the token
            embedding's update when "token_embedding" is a target (None:
            `lora_rank`, `lora_alpha`); its table is vocabulary x hidden,
            so it may want another rank than the projections.
        lora_learning_rate, full_learning_rate, builtin_learning_rate,
        peft_learning_rate: each run's AdamW rate.
        eval_every: steps between held-out evaluations (the curve).
        eval_rows: held-out rows of each domain to evaluate on.
        max_length: generation length (tokens, prompt included).
        prompts: prompts of the new domain for the greedy generations.
        seed: seeds the row order and the LoRA factors.
        update_weights: after training, the keras-lora and full runs are
            evaluated again with their learned update weighted by each of
            these (in (0, 1)): the adapter re-weighted by
            `add_weighted_adapter`, full fine-tuning's weights interpolated
            between the base's and its own (WiSE-FT). Empty: none.
    """

    out: str
    steps: int = 120
    batch: int = 8
    seq: int = 128
    runs: tuple[str, ...] = RUNS
    lora_rank: int = 1
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    embedding_rank: int | None = 4
    embedding_alpha: float | None = 1.0
    # Each run's rate is the best held-out loss of those measured at the
    # default settings (README, "The main job"): LoRA 5e-3 (2e-2: worse),
    # full 1e-3 (5e-4 and 2e-3: worse); enable_lora scales its update by 1,
    # not alpha/rank = 8, so it needs a larger rate; PEFT computes what
    # keras-lora does.
    lora_learning_rate: float = 5e-3
    full_learning_rate: float = 1e-3
    builtin_learning_rate: float = 2e-2
    peft_learning_rate: float = 5e-3
    eval_every: int = 20
    eval_rows: int = 64
    max_length: int = 48
    prompts: tuple[str, ...] = PROMPTS
    seed: int = 0
    update_weights: tuple[float, ...] = (0.8, 0.7, 0.6)

    def __post_init__(self):
        for name in ("steps", "batch", "seq", "lora_rank", "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in (
            "lora_alpha",
            "lora_learning_rate",
            "full_learning_rate",
            "builtin_learning_rate",
            "peft_learning_rate",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.embedding_rank is not None and (
            isinstance(self.embedding_rank, bool)
            or not isinstance(self.embedding_rank, int)
            or self.embedding_rank < 1
        ):
            raise ValueError(
                f"embedding_rank must be a positive integer or None, got "
                f"{self.embedding_rank!r}"
            )
        if self.embedding_alpha is not None and not self.embedding_alpha > 0:
            raise ValueError("embedding_alpha must be positive or None")
        if not 2 <= self.eval_rows:
            raise ValueError("eval_rows must be at least 2")
        if isinstance(self.lora_targets, str):
            raise ValueError(
                "lora_targets must be a sequence of targets, e.g. "
                f"('query', 'value'), not the string {self.lora_targets!r}"
            )
        bad = [r for r in self.runs if r not in RUNS]
        if bad:
            raise ValueError(f"unknown quality run {bad}: choose from {RUNS}")
        runs = ("lora", "full", *(r for r in RUNS[2:] if r in self.runs))
        object.__setattr__(self, "runs", runs)
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        object.__setattr__(self, "prompts", tuple(self.prompts))
        weights = self.update_weights
        if not isinstance(weights, (list, tuple)) or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and 0 < w < 1
            for w in weights
        ):
            raise ValueError(
                "update_weights must be numbers in (0, 1), e.g. (0.8, 0.7, 0.6); "
                f"got {weights!r}"
            )
        object.__setattr__(self, "update_weights", tuple(float(w) for w in weights))

    def learning_rate(self, run: str) -> float:
        """The AdamW learning rate of `run`."""
        return getattr(self, f"{run}_learning_rate")
