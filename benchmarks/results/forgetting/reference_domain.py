import os, sys, zlib; os.environ.setdefault("KERAS_BACKEND","jax")
import numpy as np, keras
from pydoc_data.topics import topics
from keras_lora.recipes import pretrain, data, quality, training, tokenization
run = sys.argv[1]; lr = float(sys.argv[2]); extra = sys.argv[3] if len(sys.argv) > 3 else ""
kw = dict(lora_learning_rate=lr)
if extra == "proj": kw.update(lora_targets=quality.GPT2.roles, lora_rank=2, embedding_rank=None, embedding_alpha=None)
if extra == "qv": kw.update(lora_targets=("query","value"), lora_rank=4, embedding_rank=None, embedding_alpha=None)
cfg = quality.QualityConfig(out="/tmp/fg/o", runs=("lora",), **kw)
base = pretrain.load_pretrained(128); tok = base.preprocessor.tokenizer
keys = sorted(topics)
held = [topics[k] for k in keys if zlib.crc32(k.encode()) % 6 == 0]
train = [topics[k] for k in keys if zlib.crc32(k.encode()) % 6 != 0]
doc_train, doc_held = data.docstring_split()
keras.utils.set_random_seed(0)
lm = pretrain.load_pretrained(128, with_preprocessor=False)
if run == "lora": quality._inject(lm, cfg)
opt, loss = training.optimizer_and_loss(lr); lm.compile(optimizer=opt, loss=loss)
windows = tokenization.token_windows(train, tok, 129, shuffle_seed=0)
order = np.random.default_rng(0).integers(0, len(windows), size=120 * 8)
ch = tokenization.token_windows(held, tok, 129, max_rows=64); dh = tokenization.token_windows(doc_held, tok, 129, max_rows=64)
print("windows", len(windows), len(ch), len(dh))
ev = lambda r: quality._evaluate(lm, r, 8)
c0, d0 = ev(ch), ev(dh)
w0 = [w.numpy() for w in lm.weights]
x, y = pretrain.as_inputs(windows[order])
lm.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
w1 = [w.numpy() for w in lm.weights]
print(f"TOPICS {run} {extra} lr={lr} trainable={sum(int(np.prod(w.shape)) for w in lm.trainable_weights)} ref before {c0:.3f} doc before {d0:.3f}")
for s in (1.0, 0.8, 0.6):
    for w, a, b in zip(lm.weights, w0, w1):
        if run == "lora":
            if w.name == "lora_b": w.assign(s * b)
        else: w.assign(a + s * (b - a))
    c, d = ev(ch), ev(dh)
    print(f"TOPICS {run} {extra} lr={lr} s={s}: ref {c:.3f} gain {c0-c:.3f} doc +{d-d0:.3f}", flush=True)
