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

from collections.abc import Iterator

import keras


def walk_layers(model: keras.layers.Layer) -> Iterator[tuple[str, keras.layers.Layer]]:
    """Yield `(path, layer)` for every layer under `model`, depth first.

    A path joins layer names from the model down, without the model's own
    name: "gpt2_backbone/transformer_layer_0/self_attention/query". A layer
    shared by several parents is yielded once. The inside of a `LoraLayer`
    is not visited.
    """
    from keras_lora.layer import LoraLayer

    seen = {id(model)}

    def visit(layer, prefix):
        for child in layer._layers:
            if id(child) in seen:
                continue
            seen.add(id(child))
            path = f"{prefix}{child.name}"
            yield path, child
            if not isinstance(child, LoraLayer):
                yield from visit(child, path + "/")

    yield from visit(model, "")


def _containers(model: keras.layers.Layer) -> list[keras.layers.Layer]:
    """Every layer that may hold a reference to another, untracked ones too
    (a built Sequential keeps its graph in an untracked `_functional`)."""
    found, stack = {}, [model]
    while stack:
        layer = stack.pop()
        if id(layer) in found:
            continue
        found[id(layer)] = layer
        stack.extend(layer._layers)
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
    olds = {}
    for layer in _containers(model):
        if id(layer) in replacements:
            olds[id(layer)] = layer
    for container in _containers(model):
        if id(container) in replacements:
            continue
        for key, old in olds.items():
            _replace_in(container, old, replacements[key])
    for old_id, old in olds.items():
        new = replacements[old_id]
        # Functional graph nodes point at their operation; the new layer
        # takes over the old one's nodes so graph configs still serialise.
        for node in old._inbound_nodes:
            node.operation = new
        new._inbound_nodes = old._inbound_nodes
        new._outbound_nodes = old._outbound_nodes
        old._inbound_nodes = []
        old._outbound_nodes = []
    if keras.backend.backend() == "torch":
        _refresh_torch_params(model)
    # Steps traced before the swap still call the old layers (or the wrappers
    # after a merge, adding the update twice): let Keras trace them again.
    drop_compiled_functions(model)


def drop_compiled_functions(model: keras.layers.Layer) -> None:
    """Forget the train/test/predict steps Keras traced for `model`.

    A traced step holds the layers and variable layouts of its time; after a
    swap or a re-layout Keras must trace it again on the next call.
    """
    for name in ("train_function", "test_function", "predict_function"):
        if getattr(model, name, None) is not None:
            setattr(model, name, None)


def _replace_in(container, old, new) -> None:
    tracker = container._tracker
    was_locked = tracker.locked
    tracker.unlock()
    try:
        if tracker.is_in_store("layers", old):
            tracker.replace_tracked_value("layers", old, new)
        # Attributes (on torch, sublayers live in the module registry).
        attributes = dict(vars(container))
        attributes.update(getattr(container, "_modules", None) or {})
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
        node_keys = vars(container).get("_nodes")
        if isinstance(node_keys, set):
            prefix = f"{id(old)}_ib-"
            for key in [k for k in node_keys if isinstance(k, str)]:
                if key.startswith(prefix):
                    node_keys.remove(key)
                    node_keys.add(f"{id(new)}_ib-{key[len(prefix) :]}")
    finally:
        if was_locked:
            tracker.lock()


def _replace_in_list(items: list, old, new) -> None:
    for i, item in enumerate(items):
        if item is old:
            items[i] = new


def _refresh_torch_params(model) -> None:
    # Each Keras layer on torch keeps a ParameterDict of every variable
    # under it, keyed by path; rebuild the ones that already exist.
    for layer in _containers(model):
        if "_torch_params" in vars(layer) or "_torch_params" in getattr(
            layer, "_modules", {}
        ):
            layer._track_variables()
