"""Family data checked against real keras-hub models.

`run_family_test` is the shared check, in the style of keras-hub's
`run_backbone_test`: every family module gets one test that calls it with a
tiny backbone of its family.
"""

from __future__ import annotations

import dataclasses
import os

import keras
import numpy as np
import pytest

from keras_lora import export_peft, import_peft, inject_lora, lora_layers
from keras_lora.families import FAMILIES, GPT2, Family, family_of, layout_map
from keras_lora.families.family import HIDDEN, MODEL
from keras_lora.interop.hf_layout import hf_layout
from keras_lora.kernel_split import split_kernel
from keras_lora.surgery import walk_layers
from tests.family_cases import CASES, VOCAB
from tests.helpers import randomize_lora_b, token_batch


def run_family_test(
    family: Family,
    make_backbone,
    input_data,
    make_task=None,
    tmp_path=None,
) -> None:
    """Check a family's data on a tiny backbone of that family.

    Numbers against transformers and peft are `tests/test_family_peft.py`'s.

    Args:
        family: the `Family` under test.
        make_backbone: builds a tiny backbone, the same weights every call
            (seed Keras before calling it).
        input_data: a batch for the backbone.
        make_task: builds a task model around a backbone, if the family
            has one.
        tmp_path: a directory for the PEFT round trip.
    """
    keras.utils.set_random_seed(0)
    backbone = make_backbone()

    # The family is found for the backbone and for a task model on it.
    assert family_of(backbone) is family
    if make_task is not None:
        assert family_of(make_task(backbone)) is family

    # The data is consistent in itself.
    assert "{block}" in family.block and "{block}" in family.hf_block
    assert len(set(family.roles)) == len(family.roles)
    assert family.default_targets
    assert set(family.default_targets) <= set(family.roles)
    covered = [role for roles in family.hf_modules.values() for role in roles]
    assert sorted(covered) == sorted(family.roles)
    assert family.hf_model_prefixes
    assert set(family.hf_task_types) <= set(family.hf_model_prefixes)

    # Every projection path of every block is a Dense or EinsumDense, and
    # the roles of one fused Hugging Face module read the same input.
    layers = dict(walk_layers(backbone))
    num_blocks = 0
    while family.block.format(block=num_blocks) in layers:
        num_blocks += 1
    assert num_blocks > 0, f"no block at {family.block.format(block=0)!r}"
    splits = {}
    for block in range(num_blocks):
        for projection in family.projections:
            path = f"{family.block.format(block=block)}/{projection.path}"
            assert path in layers, path
            layer = layers[path]
            assert isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)), (
                path
            )
            assert layer.name == projection.role, path
            assert (getattr(layer, "bias", None) is not None) == projection.bias
            split = split_kernel(layer)
            splits[block, projection.role] = (layer, split)
            _check_hf_layout(hf_layout(split, projection.axes, path), split)
        for roles in family.hf_modules.values():
            fan_ins = {splits[block, role][1].fan_in for role in roles}
            assert len(fan_ins) == 1, roles

    # The sharding data names real variables, with one axis per dimension.
    if family.sharding is not None:
        paths = {v.path for v in backbone.weights}
        for path, axes in family.sharding.embeddings.items():
            assert path in paths, path
            variable = next(v for v in backbone.weights if v.path == path)
            assert len(axes) == len(variable.shape), path
        assert set(family.sharding.projections) <= set(family.roles)
        for role, variables in family.sharding.projections.items():
            layer, split = splits[0, role]
            ndims = {
                "kernel": len(layer.kernel.shape),
                "lora_a": len(split.in_shape) + 1,
                "lora_b": len(split.out_shape) + 1,
            }
            for variable, axes in variables.items():
                assert len(axes) == ndims[variable], (role, variable)
                assert set(axes) <= {MODEL, HIDDEN, None}, (role, variable)

    # The default targets and all roles wrap one layer per block each.
    keras.utils.set_random_seed(0)
    default = inject_lora(make_backbone(), rank=2)
    assert len(lora_layers(default)) == num_blocks * len(family.default_targets)
    assert {layer.name for layer in lora_layers(default)} == set(family.default_targets)

    # "all-linear" is every projection of every block, nothing else (the
    # output head is tied to the embedding, or a ReversibleEmbedding).
    keras.utils.set_random_seed(0)
    task = make_backbone() if make_task is None else make_task(make_backbone())
    wrapped = lora_layers(inject_lora(task, rank=2, targets="all-linear"))
    assert len(wrapped) == num_blocks * len(family.roles)
    assert sorted({layer.name for layer in wrapped}) == sorted(family.roles)

    # PEFT exchange through the family data is exact, on every role.
    if tmp_path is not None:
        inject_lora(backbone, rank=2, alpha=4.0, targets=family.roles)
        assert len(lora_layers(backbone)) == num_blocks * len(family.roles)
        if family.sharding is not None:
            # Every variable, LoRA factors included, matches at most one key
            # (a LayoutMap raises otherwise), and the data's own get theirs.
            layouts = layout_map(family, _mesh())
            for variable in backbone.weights:
                layout = layouts[variable.path]
                role = variable.path.split("/")[-2]
                name = variable.path.split("/")[-1]
                data = family.sharding.projections.get(role, {}).get(name)
                if data is not None:
                    assert layout is not None, variable.path
                    assert len(layout.axes) == len(variable.shape), variable.path
        randomize_lora_b(backbone, scale=0.5)
        expected = keras.ops.convert_to_numpy(backbone(input_data))
        keras.utils.set_random_seed(0)
        other = make_backbone()
        base = keras.ops.convert_to_numpy(other(input_data))
        assert np.max(np.abs(expected - base)) > 1e-3  # The adapter matters.
        for prefix_model in family.hf_model_prefixes:
            adapter = export_peft(
                backbone, os.path.join(tmp_path, prefix_model), hf_model=prefix_model
            )
            keras.utils.set_random_seed(0)
            other = import_peft(make_backbone(), adapter)
            actual = keras.ops.convert_to_numpy(other(input_data))
            np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5)

    # A model of no family is refused, naming the known ones.
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError) as error:
        family_of(plain)
    for known in FAMILIES:
        assert known.name in str(error.value)
        assert known.backbone_class in str(error.value)


def _check_hf_layout(layout, split) -> None:
    """B_hf @ A_hf is the kernel-shaped update, laid out as Hugging Face's
    (out, in) weight: the factor and kernel maps agree."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=split.in_shape + (3,))
    b = rng.normal(size=(3,) + split.out_shape)
    delta = np.einsum(split.delta_equation(), a, b)
    expected = layout.kernel_to_hf(delta)
    assert expected.shape == (split.fan_out, split.fan_in)
    np.testing.assert_allclose(layout.b_to_hf(b) @ layout.a_to_hf(a), expected)
    np.testing.assert_array_equal(layout.a_from_hf(layout.a_to_hf(a)), a)
    np.testing.assert_array_equal(layout.b_from_hf(layout.b_to_hf(b)), b)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_family(case, tmp_path):
    run_family_test(
        case.family,
        make_backbone=case.make_backbone,
        input_data=token_batch(batch=2, vocab=VOCAB),
        make_task=case.make_task,
        tmp_path=os.fspath(tmp_path),
    )


def test_hf_layout_permutes_axes_hugging_face_orders_differently():
    # A kernel (hidden, head_dim, heads) whose Hugging Face rows are
    # head-major: the rows of B_hf @ A_hf must be the kernel's columns
    # taken heads-first.
    from keras_lora.families.family import KernelAxes
    from keras_lora.kernel_split import KernelSplit

    axes = KernelAxes(
        ("hidden", "head_dim", "heads"), ("heads", "head_dim"), ("hidden",)
    )
    split = KernelSplit("btm", "btdn", "mdn", "m", "dn", (5,), (3, 2))
    layout = hf_layout(split, axes, "query")
    kernel = np.arange(5 * 3 * 2, dtype="float32").reshape(5, 3, 2)
    hf = layout.kernel_to_hf(kernel)
    assert hf[1 * 3 + 2, 4] == kernel[4, 2, 1]  # Row head 1, dim 2; column 4.
    _check_hf_layout(layout, split)
    # Family data that does not fit the layer is refused.
    wrong = KernelAxes(
        ("hidden", "head_dim", "heads"), ("heads",), ("hidden", "head_dim")
    )
    with pytest.raises(ValueError, match="lays this layer out differently"):
        hf_layout(split, wrong, "query")


def _mesh():
    return keras.distribution.DeviceMesh(
        (2, 4), ("batch", "model"), [f"cpu:{i}" for i in range(8)]
    )


def test_layout_map_needs_sharding_data():
    without = dataclasses.replace(GPT2, sharding=None)
    with pytest.raises(ValueError, match="no layout data for GPT-2"):
        layout_map(without, _mesh())


def test_layout_map_follows_the_family_data():
    # A family whose block template differs still gets anchored keys: a
    # block path of another family matches none of them.
    moved = dataclasses.replace(GPT2, block="decoder/layer_{block}")
    layouts = layout_map(moved, _mesh())
    query = "decoder/layer_11/self_attention/query/kernel"
    assert tuple(layouts[query].axes) == (None, "model", None)
    assert layouts["transformer_layer_0/self_attention/query/kernel"] is None
    assert layouts["decoder/layer_x/self_attention/query/kernel"] is None


def test_all_linear_skips_output_layers_and_unfactorable_kernels():
    # PEFT's "all-linear": every Dense/EinsumDense but the output layer.
    # An EinsumDense whose kernel axis is also a batch axis is no single
    # matrix, so it is not "linear" here either.
    inputs = keras.Input((3, 4))
    hidden = keras.layers.Dense(8, name="up")(inputs)
    hidden = keras.layers.EinsumDense("bhi,hio->bho", (3, 5), name="per_head")(hidden)
    hidden = keras.layers.EinsumDense("bhi,io->bho", (3, 4), name="down")(hidden)
    outputs = keras.layers.Dense(2, name="head")(hidden)
    model = keras.Model(inputs, outputs)
    inject_lora(model, rank=2, targets="all-linear")
    assert [layer.name for layer in lora_layers(model)] == ["up", "down"]

    embed_only = keras.Sequential(
        [
            keras.Input((4,), dtype="int32"),
            keras.layers.Embedding(10, 4),
            keras.layers.Dense(2),
        ]
    )
    with pytest.raises(ValueError, match="all-linear"):
        inject_lora(embed_only, targets="all-linear")
