"""`LoraSettings`: one adapter's settings, validated once, defaults in one place.

`LoraLayer`, `LoraEmbedding`, `inject_lora` and `wrap_layers` take these
settings as keyword arguments; their defaults are this dataclass's fields.
An adapter record (`keras_lora.adapter_record.Adapter`) holds one, so its
rank, alpha and scale are read from here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from keras_lora.initialization import check_init, rewrites_kernel


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """How one adapter is built; raises `ValueError` for a bad setting.

    Args:
        rank: rank of the update, a positive integer.
        alpha: scaling numerator, a positive number.
        dropout: dropout rate on the LoRA path's input, in [0, 1).
        use_rslora: scale by `alpha / sqrt(rank)` (rank-stabilised LoRA)
            instead of `alpha / rank`.
        seed: seed for the factors' initialisation and the dropout.
        init: how the factors start (see `keras_lora.initialization`).
        use_dora: add DoRA's magnitude (see `keras_lora.dora`).

    Example:

    >>> LoraSettings(rank=4, alpha=8.0).scale
    2.0
    >>> LoraSettings(rank=0)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: `rank` must be a positive integer (e.g. rank=4). Received: rank=0
    """

    rank: int = 4
    alpha: float = 32.0
    dropout: float = 0.0
    use_rslora: bool = False
    seed: int | None = None
    init: str = "kaiming"
    use_dora: bool = False

    def __post_init__(self) -> None:
        rank, alpha, dropout = self.rank, self.alpha, self.dropout
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise ValueError(
                "`rank` must be a positive integer (e.g. rank=4). "
                f"Received: rank={rank!r}"
            )
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
            raise ValueError(
                "`alpha` must be a positive number (the update is scaled by "
                f"alpha / rank; e.g. alpha=32.0). Received: alpha={alpha!r}"
            )
        if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(
                "`dropout` must be a rate in [0, 1) (0 disables it). "
                f"Received: dropout={dropout!r}"
            )
        check_init(self.init)
        # Stored as the types the records and configs carry.
        object.__setattr__(self, "rank", int(rank))
        object.__setattr__(self, "alpha", float(alpha))
        object.__setattr__(self, "dropout", float(dropout))
        object.__setattr__(self, "use_rslora", bool(self.use_rslora))
        object.__setattr__(self, "use_dora", bool(self.use_dora))

    @property
    def scale(self) -> float:
        """The update's factor: `alpha / rank`, or `alpha / sqrt(rank)`."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def rewrites_kernel(self) -> bool:
        """Whether `init` moves part of the kernel into the factors (PiSSA,
        OLoRA)."""
        return rewrites_kernel(self.init)

    @classmethod
    def of(cls, options: Mapping) -> LoraSettings:
        """The settings among `options` (other keys, such as `adapter_name`
        or `adapt_head`, are left out); defaults for the rest.

        Args:
            options: keyword arguments of `LoraLayer` or `wrap_layers`, or
                a `LoraSettings` (returned as it is).
        """
        if isinstance(options, LoraSettings):
            return options
        return cls(**{k: options[k] for k in FIELDS if k in options})


# The setting names, in order.
FIELDS = tuple(field.name for field in dataclasses.fields(LoraSettings))


class SettingField:
    """A read-only attribute that reads the same-named field of the owner's
    `settings` (a `LoraSettings`), so an object holding settings exposes
    `rank`, `alpha`, ... without copying them.

    Example:

    >>> class Holder:
    ...     rank = SettingField()
    ...     settings = LoraSettings(rank=2)
    >>> Holder().rank
    2
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        self.__doc__ = f"`settings.{name}` (see `LoraSettings`)."

    def __get__(self, instance, owner: type | None = None):
        if instance is None:
            return self
        return getattr(instance.settings, self.name)


class SettingsAttributes:
    """Mixin: read-only `rank`, `alpha`, `scale`, ... of `self.settings`,
    for the classes that hold a `LoraSettings` (an adapter record, and a
    `LoraLayer` for its first adapter)."""

    rank = SettingField()
    alpha = SettingField()
    scale = SettingField()
    dropout = SettingField()
    use_rslora = SettingField()
    seed = SettingField()
    init = SettingField()
    use_dora = SettingField()
