"""RSS at each stage of the int8 + remat-blocks + chunked LoRA row (JAX)."""
import gc, json, os, sys, ctypes
import numpy as np
spec = json.load(open(sys.argv[1]))
import keras, keras_hub  # noqa
from keras_lora.bench import keras_run as kr
from keras_lora.bench.keras_run import *  # noqa
from keras_lora.callbacks import host_peak_rss_bytes
def rss():
    for l in open("/proc/self/status"):
        if l.startswith("VmRSS"): return int(l.split()[1]) / 2**20
def hw():
    for l in open("/proc/self/status"):
        if l.startswith("VmHWM"): return int(l.split()[1]) / 2**20
def say(what): print(f"STAGE {what:40s} rss {rss():.3f} GB  hwm {hw():.3f}", flush=True)
keras.utils.set_random_seed(0)
kr.set_dtype_policies(spec)
tokens, labels = kr.token_data(spec)
x = {"token_ids": tokens, "padding_mask": np.ones_like(tokens)}
keras.ops.convert_to_numpy(keras.ops.ones((2,)) + 1)
say("baseline")
with kr.remat_scope(spec, keras):
    lm = kr.build_lm(spec)
    kr.prepare_run(lm, spec["run"], spec)
kr.remat_blocks(lm, spec)
model = kr.training_model(lm, spec)
say("built")
batch = {k: v[:8] for k, v in x.items()}
data = (batch, labels[:8], None)
model._symbolic_build(data_batch=data)
say("symbolic build")
import jax
state = model._get_jax_state(trainable_variables=True, non_trainable_variables=True,
    optimizer_variables=True, metrics_variables=True, purge_model_variables=False)
lowered = jax.jit(model.train_step).lower(state, data)
say("lowered")
compiled = lowered.compile()
say("compiled")
ma = compiled.memory_analysis()
print("generated code", ma.generated_code_size_in_bytes / 2**20, "MB; temp", ma.temp_size_in_bytes/2**30)
del lowered; gc.collect(); say("lowered dropped")
out = compiled(state, data); jax.block_until_ready(out); say("one step run (not donated)")
del out; gc.collect(); say("outputs dropped")
del compiled; gc.collect(); jax.clear_caches(); gc.collect(); say("executable dropped")
