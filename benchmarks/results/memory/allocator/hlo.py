import json, sys, re
import numpy as np
spec = json.load(open(sys.argv[1]))
for kv in sys.argv[2:]:
    k, v = kv.split("="); spec[k] = v
import keras, keras_hub  # noqa
from keras_lora.bench import keras_run as kr
import variants  # noqa
import sliced  # noqa
def rss():
    for l in open("/proc/self/status"):
        if l.startswith("VmRSS"): return int(l.split()[1]) / 2**20
keras.utils.set_random_seed(0)
tokens, labels = kr.token_data(spec)
x = {"token_ids": tokens, "padding_mask": np.ones_like(tokens)}
with kr.remat_scope(spec, keras):
    lm = kr.build_lm(spec)
    if spec.get("quantize_build") == "after" and spec["quantize"] != "none":
        lm.quantize(spec["quantize"])
    kr.prepare_run(lm, spec["run"], spec)
kr.remat_blocks(lm, spec)
model = kr.training_model(lm, spec)
data = ({k: v[:8] for k, v in x.items()}, labels[:8], None)
model._symbolic_build(data_batch=data)
import jax
state = model._get_jax_state(trainable_variables=True, non_trainable_variables=True,
    optimizer_variables=True, metrics_variables=True, purge_model_variables=False)
lowered = jax.jit(model.train_step).lower(state, data)
text = lowered.as_text()
print("stablehlo chars", len(text))
consts = re.findall(r"stablehlo.constant dense<[^>]{200,}", text)
print("big constants in text", len(consts))
shapes = re.findall(r"stablehlo.constant dense<.*?> : tensor<([0-9x]+)x(\w+)>", text)
big = sorted(((np.prod([int(d) for d in s.split("x")]), s, t) for s, t in shapes), reverse=True)[:8]
print("largest constant shapes", big)
r0 = rss(); c = lowered.compile(); r1 = rss()
hlo = c.as_text()
print("optimized hlo chars", len(hlo), "exec rss", round(r1 - r0, 3), "GB", "temp", c.memory_analysis().temp_size_in_bytes/2**30)
print("fusions", hlo.count("fusion("), "while", hlo.count(" while("), "constants", hlo.count(" constant("))
big2 = re.findall(r"= (\w+)\[([0-9,]+)\][^ ]* constant\(", hlo)
sizes = sorted(((np.prod([int(d) for d in s.split(',')]), t, s) for t, s in big2), reverse=True)[:10]
print("largest constants in optimized HLO", sizes)
open("/tmp/fg/opt_hlo_%s.txt" % spec.get("remat"), "w").write(hlo)
