import jax, jax.numpy as jnp
import keras_lora.remat as R
import os
V = os.environ.get("TIE", "orig")

def _after(saved, cotangents):
    def is_float(x):
        return jnp.issubdtype(x.dtype, jnp.floating)
    floats = [c for c in jax.tree.leaves(cotangents) if is_float(c)]
    if not floats:
        return saved
    if V == "reduce":
        g = floats[0]
        zero = jnp.sum(jnp.where(jnp.isfinite(g), g * 0, 0))
    else:
        first = floats[0].ravel()[0]
        zero = jnp.where(jnp.isfinite(first), first * 0, 0)
    values, tensors = saved
    def tie(x):
        numeric = is_float(x) or jnp.issubdtype(x.dtype, jnp.integer)
        return x + zero.astype(x.dtype) if numeric else x
    if V == "tensors_only":
        ints = lambda x: x if is_float(x) else tie(x)
        return (jax.tree.map(ints, values), jax.tree.map(tie, tensors))
    return jax.tree.map(tie, saved)
if V != "orig":
    R._after = _after
