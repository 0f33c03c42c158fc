"""`OUT/loss.png` of `keras-lora sft`: train loss per step, eval loss points.

matplotlib comes with the "bench" extra. `plot_available` is asked before
training, so a run without it trains, writes everything else, and says in
its report why there is no chart.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from keras_lora.optional import MissingExtra, require

__all__ = ["LOSS_PLOT", "loss_png", "plot_available"]

LOSS_PLOT = "loss.png"


def plot_available() -> str | None:
    """None when matplotlib can draw `loss.png`, else a one-line note.

    Example:

    >>> plot_available() is None or plot_available().startswith("no loss.png")
    True
    """
    try:
        require("matplotlib", extra="bench")
    except MissingExtra as error:
        return f"no {LOSS_PLOT}: {error}"
    return None


def loss_png(
    train_losses: Sequence[float],
    eval_losses: Sequence[tuple[int, float]],
    title: str,
) -> bytes:
    """The chart as PNG bytes.

    Args:
        train_losses: the loss of each step, step 1 first.
        eval_losses: `(step, loss)` evaluation points; step 0 is before
            training.
        title: the chart's title.

    Returns:
        The PNG file's bytes.

    Raises:
        MissingExtra: without matplotlib (see `plot_available`).
    """
    matplotlib = require("matplotlib", extra="bench")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = range(1, len(train_losses) + 1)
    ax.plot(steps, list(train_losses), marker=".", label="train loss of the step")
    if eval_losses:
        eval_steps = [step for step, _ in eval_losses]
        values = [loss for _, loss in eval_losses]
        ax.plot(eval_steps, values, marker="o", linestyle="--", label="eval loss")
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("cross-entropy (label tokens)")
    ax.set_title(title, fontsize=8)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
