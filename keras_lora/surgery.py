"""Finding layers in a model and swapping one layer object for another.

Keras tracks a sublayer in several places, and a swap must update all of
them or the old layer's weights stay in `model.weights` (or the new layer is
never called):

- the parent's attribute (`attention._query_dense`) and any list or dict
  attribute holding it (keras-hub's `transformer_layers`);
- the parent's tracked layer list (`_layers`, via its tracker);
- a functional graph's operations, its nodes and its node keys (which hold
  the operation's id), in a `Functional` and in the `Functional` a built
  `Sequential` runs;
- on the torch backend, the parent's torch module registry (`_modules`)
  and every ancestor's parameter dict (`torch_params`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import keras

from keras_lora import _keras_internals
from keras_lora.layer import LoraLayer


def walk_layers(model: keras.layers.Layer) -> Iterator[tuple[str, keras.layers.Layer]]:
    """Yield `(path, layer)` for every layer under `model`, depth first.

    A path joins layer names from the model down, without the model's own
    name: "gpt2_backbone/transformer_layer_0/self_attention/query". A layer
    shared by several parents is yielded once. The inside of a `LoraLayer`
    is not visited.

    Example:

    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")])
    >>> [path for path, _ in walk_layers(model)]
    ['input_layer...', 'd']
    """
    yield from _walk_below(model, "", {id(model)})


def _walk_below(layer, prefix, seen):
    def visit(layer, prefix):
        for child in _keras_internals.sublayers(layer):
            if id(child) in seen:
                continue
            seen.add(id(child))
            path = f"{prefix}{child.name}"
            yield path, child
            if not isinstance(child, LoraLayer):
                yield from visit(child, path + "/")

    yield from visit(layer, prefix)


class LayerIndex:
    """Every layer under a model by path, from one `walk_layers` walk.

    One operation (`inject_lora`, `load_adapter`, ...) builds one index and
    hands it to every helper (`target_layers`, `wrap_layers`,
    `freeze_non_lora`, ...), instead of each walking the whole tree again.
    `swap` replaces layers in the model and updates the index to match; an
    index is otherwise a snapshot, so build a new one after any other
    change to the model.

    Args:
        model: the model (or layer) to index.

    Example:

    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")])
    >>> index = LayerIndex(model)
    >>> index.paths(), index["d"].units
    (['input_layer...', 'd'], 2)
    """

    def __init__(self, model: keras.layers.Layer):
        self.model = model
        self._by_path: dict[str, keras.layers.Layer] = dict(walk_layers(model))

    def __getitem__(self, path: str) -> keras.layers.Layer:
        return self._by_path[path]

    def __len__(self) -> int:
        return len(self._by_path)

    def get(self, path: str, default=None):
        return self._by_path.get(path, default)

    def items(self) -> list[tuple[str, keras.layers.Layer]]:
        """`(path, layer)` pairs in walk order."""
        return list(self._by_path.items())

    def paths(self) -> list[str]:
        return list(self._by_path)

    def layers(self) -> list[keras.layers.Layer]:
        return list(self._by_path.values())

    def by_id(self) -> dict[int, keras.layers.Layer]:
        """`id(layer) -> layer` for every indexed layer."""
        return {id(layer): layer for layer in self._by_path.values()}

    def lora_layers(self) -> list[LoraLayer]:
        """The `LoraLayer`s, in walk order."""
        return [v for v in self._by_path.values() if isinstance(v, LoraLayer)]

    def check_model(self, model: keras.layers.Layer) -> None:
        """Raise `ValueError` unless this index was built for `model`."""
        if model is not self.model:
            raise ValueError(
                f"This LayerIndex was built for '{self.model.name}', not for "
                f"'{model.name}'. Pass `LayerIndex(model)` for the model you "
                "are changing."
            )

    def swap(self, replacements: dict[int, keras.layers.Layer]) -> None:
        """`replace_layers(self.model, replacements)`, keeping the index current.

        A swapped layer keeps its path. What was indexed below it goes (a
        `LoraLayer`'s inside is never indexed); what is below the new layer
        comes in, so the index equals a fresh walk.
        """
        replace_layers(self.model, replacements)
        swapped = [p for p, v in self._by_path.items() if id(v) in replacements]

        def below_swapped(path: str) -> bool:
            return any(path.startswith(s + "/") for s in swapped)

        kept = {p: v for p, v in self._by_path.items() if not below_swapped(p)}
        # A layer yielded once stays yielded once, as in `walk_layers`.
        seen = {id(self.model)} | {id(v) for v in kept.values()}
        rebuilt: dict[str, keras.layers.Layer] = {}
        for path, layer in kept.items():
            new = replacements.get(id(layer))
            rebuilt[path] = layer if new is None else new
            if new is not None and not isinstance(new, LoraLayer):
                seen.add(id(new))
                rebuilt.update(_walk_below(new, path + "/", seen))
        self._by_path = rebuilt


def containers(model: keras.layers.Layer) -> list[keras.layers.Layer]:
    """Every layer that may hold a reference to another, untracked ones too
    (a built Sequential keeps its graph in an untracked `_functional`).

    Args:
        model: the layer or model whose tree is scanned, itself included.

    Returns:
        The layers, each once.
    """
    found, stack = {}, [model]
    while stack:
        layer = stack.pop()
        if id(layer) in found:
            continue
        found[id(layer)] = layer
        stack.extend(_keras_internals.sublayers(layer))
        stack.extend(
            v
            for v in vars(layer).values()
            if isinstance(v, keras.layers.Layer) and id(v) not in found
        )
    return list(found.values())


def replace_layers(
    model: keras.layers.Layer, replacements: dict[int, keras.layers.Layer]
) -> None:
    """Swap layers in place: `replacements` maps `id(old)` to the new layer.

    Only the references that Keras keeps are rewritten; the model's config
    (for a Sequential or functional model) follows because the new layer is
    called through the same graph nodes.
    """
    # One scan of the tree serves the search, the rewrite and the torch
    # refresh below.
    scanned = containers(model)
    olds = {id(c): c for c in scanned if id(c) in replacements}
    for container in scanned:
        if id(container) in replacements:
            continue
        for key, old in olds.items():
            _replace_in(container, old, replacements[key])
    for old_id, old in olds.items():
        # Functional graph nodes point at their operation; the new layer
        # takes over the old one's nodes so graph configs still serialise.
        _keras_internals.move_graph_nodes(old, replacements[old_id])
    if keras.backend.backend() == "torch":
        # The tree after the swap: the new layers' subtrees instead of the
        # old layers (a wrapped layer comes back, inside its wrapper).
        after = {id(c): c for c in scanned if id(c) not in olds}
        for new in replacements.values():
            after.update((id(c), c) for c in containers(new))
        refresh_torch_params(after.values())
    # Steps traced before the swap still call the old layers (or the wrappers
    # after a merge, adding the update twice): let Keras trace them again.
    drop_compiled_functions(model)


def drop_compiled_functions(model: keras.layers.Layer) -> None:
    """Forget the train/test/predict steps Keras traced for `model`.

    A traced step holds the layers and variable layouts of its time; after a
    swap or a re-layout Keras must trace it again on the next call.
    """
    # keras-hub's causal LMs cache a traced `generate_function` too.
    for name in (
        "train_function",
        "test_function",
        "predict_function",
        "generate_function",
    ):
        if getattr(model, name, None) is not None:
            setattr(model, name, None)


def _replace_in(container, old, new) -> None:
    with _keras_internals.unlocked_tracker(container):
        _keras_internals.replace_tracked_layer(container, old, new)
        # Attributes (on torch, sublayers live in the module registry).
        attributes = dict(vars(container))
        attributes.update(_keras_internals.torch_modules(container))
        for name, value in attributes.items():
            if value is old:
                setattr(container, name, new)
            elif isinstance(value, list):
                _replace_in_list(value, old, new)
            elif isinstance(value, dict):
                for item in value.values():
                    if isinstance(item, list):
                        _replace_in_list(item, old, new)
                for item_key, item in list(value.items()):
                    if item is old:
                        value[item_key] = new
        # A functional graph keys its nodes by the id of their operation.
        _keras_internals.rekey_graph_nodes(container, old, new)


def _replace_in_list(items: list, old, new) -> None:
    for i, item in enumerate(items):
        if item is old:
            items[i] = new


def refresh_torch_params(layers: Iterable[keras.layers.Layer]) -> None:
    """Rebuild the torch parameter dicts of `layers` after variables or
    sublayers under them changed (no-op for layers without one).

    Each Keras layer on torch keeps a ParameterDict of every variable under
    it, keyed by path; only the ones that already exist are rebuilt.

    Args:
        layers: the layers to refresh, usually `containers(model)`.
    """
    for layer in layers:
        _keras_internals.refresh_torch_params(layer)
