import os
import jax, jax.numpy as jnp
from keras import ops
import keras_lora.quantized as Q
S = int(os.environ.get("SLICE", "0"))

def _reverse_int8(layer, inputs, kernel, scale):
    @ops.custom_gradient
    def f(inputs, kernel, scale):
        def grad_fn(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            vocab = kernel.shape[-1]
            n = -(-vocab // S)
            pad = n * S - vocab
            g = jnp.pad(upstream / scale, [(0, 0)] * (upstream.ndim - 1) + [(0, pad)])
            k = jnp.pad(kernel, [(0, 0), (0, pad)])
            def body(i, acc):
                gs = jax.lax.dynamic_slice_in_dim(g, i * S, S, axis=-1)
                ks = jax.lax.dynamic_slice_in_dim(k, i * S, S, axis=-1)
                return acc + gs @ ks.astype(upstream.dtype).T
            acc = jnp.zeros(upstream.shape[:-1] + (kernel.shape[0],), upstream.dtype)
            return jax.lax.fori_loop(0, n, body, acc), None, None
        if layer.inputs_quantizer:
            inputs, inputs_scale = layer.inputs_quantizer(inputs)
        else:
            inputs_scale = ops.ones((1,), dtype=layer.compute_dtype)
        logits = ops.cast(ops.matmul(inputs, kernel), layer.compute_dtype)
        return ops.divide(logits, ops.multiply(inputs_scale, scale)), grad_fn
    return f(inputs, kernel, scale)
if S:
    Q._reverse_int8 = _reverse_int8
