"""kernel_split: how a Dense/EinsumDense kernel splits into A and B, the
update's einsum, the call plan, and the equations LoRA cannot factor."""

import keras
import numpy as np
import pytest

from keras_lora.kernel_split import split_kernel


def einsum_layer(equation, output_shape, input_shape, name="proj"):
    layer = keras.layers.EinsumDense(equation, output_shape, name=name)
    layer.build(input_shape)
    return layer


# (equation, output shape, input shape, in_axes, out_axes, in_shape, out_shape)
SPLITS = {
    "gpt2_query": (
        "abc,cde->abde",
        (None, 12, 64),
        (None, None, 768),
        "c",
        "de",
        (768,),
        (12, 64),
    ),
    "gpt2_attention_output": (
        "abcd,cde->abe",
        (None, 768),
        (None, None, 12, 64),
        "cd",
        "e",
        (12, 64),
        (768,),
    ),
    "gemma_query": (
        "btd,ndh->btnh",
        (None, 8, 256),
        (None, None, 2048),
        "d",
        "nh",
        (2048,),
        (8, 256),
    ),
}


@pytest.mark.parametrize("case", SPLITS)
def test_einsum_splits_of_the_module_table(case):
    equation, output_shape, input_shape, in_axes, out_axes, in_shape, out_shape = (
        SPLITS[case]
    )
    split = split_kernel(einsum_layer(equation, output_shape, input_shape))
    assert (split.in_axes, split.out_axes) == (in_axes, out_axes)
    assert (split.in_shape, split.out_shape) == (in_shape, out_shape)
    assert split.fan_in == int(np.prod(in_shape))
    assert split.fan_out == int(np.prod(out_shape))


def test_dense_is_the_einsum_of_its_kernel():
    dense = keras.layers.Dense(5)
    dense.build((None, 7))
    split = split_kernel(dense)
    assert (split.in_shape, split.out_shape) == ((7,), (5,))
    assert split.delta_equation() == "aA,Ab->ab"


def test_delta_equation_rebuilds_the_kernel_shape():
    split = split_kernel(einsum_layer("abcd,cde->abe", (None, 6), (None, 3, 2, 4)))
    a = np.ones(split.in_shape + (3,), "float32")
    b = np.ones((3,) + split.out_shape, "float32")
    assert np.einsum(split.delta_equation(), a, b).shape == (2, 4, 6)


def test_call_plan_moves_contracted_axes_last():
    # Output axes out of kernel order ("adb"), and a contracted axis in the
    # middle of the input ("abc" contracts "c", keeps "a", "b").
    split = split_kernel(einsum_layer("abc,cd->adb", (9, None), (2, 5, 6)))
    assert split.call_plan(3) == ((), 2, (0, 2, 1))
    split = split_kernel(einsum_layer("...b,bc->...c", (7,), (2, 3, 5)))
    assert split.call_plan(3) == ((), 2, ())
    split = split_kernel(einsum_layer("abc,bd->acd", (None, 4), (2, 3, 5)))
    assert split.call_plan(3) == ((0, 2, 1), 2, ())
    with pytest.raises(ValueError, match="rank 3"):
        split.call_plan(4)


@pytest.mark.parametrize(
    "equation, output_shape, input_shape, message",
    [
        ("abc,bc->abc", (3, 4), (2, 3, 4), "kernel axis 'b' appears in both"),
        ("ab,b->a", (), (2, 3), "no output kernel axis"),
        ("abc,cd->ad", (4,), (2, 3, 5), "input axis 'b' is summed"),
    ],
)
def test_equations_lora_cannot_factor(equation, output_shape, input_shape, message):
    with pytest.raises(ValueError, match=message):
        split_kernel(einsum_layer(equation, output_shape, input_shape))
