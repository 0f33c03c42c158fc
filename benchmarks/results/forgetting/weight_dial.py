import os, sys; os.environ.setdefault("KERAS_BACKEND","jax")
import numpy as np, keras
from keras_lora.recipes import pretrain, data, quality, training
from keras_lora.layer import LoraLayer
from keras_lora.embedding import LoraEmbedding
run = sys.argv[1]; lr = float(sys.argv[2]) if len(sys.argv) > 2 else (5e-3 if run=="lora" else 1e-3)
cfg = quality.QualityConfig(out="/tmp/fg/o", runs=("lora",), lora_learning_rate=lr)
base = pretrain.load_pretrained(128); tok = base.preprocessor.tokenizer
code_train, code_held = data.python_code_split(); doc_train, doc_held = data.docstring_split()
keras.utils.set_random_seed(0)
lm = pretrain.load_pretrained(128, with_preprocessor=False)
if run == "lora": quality._inject(lm, cfg)
opt, loss = training.optimizer_and_loss(lr); lm.compile(optimizer=opt, loss=loss)
windows = data.token_windows(code_train, tok, 129, shuffle_seed=0)
print("code train windows", len(windows))
order = np.random.default_rng(0).integers(0, len(windows), size=120 * 8)
ch = data.token_windows(code_held, tok, 129, max_rows=64); dh = data.token_windows(doc_held, tok, 129, max_rows=64)
dv = data.token_windows(doc_train, tok, 129, max_rows=64)
ev = lambda r: quality._evaluate(lm, r, 8)
c0, d0, v0 = ev(ch), ev(dh), ev(dv)
w0 = [w.numpy() for w in lm.weights]
x, y = pretrain.as_inputs(windows[order])
lm.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
w1 = [w.numpy() for w in lm.weights]
for s in (1.0, 0.9, 0.8, 0.75, 0.7, 0.65, 0.6, 0.5):
    for w, a, b in zip(lm.weights, w0, w1):
        if run == "lora":
            if "lora_b" in w.path or w.name == "lora_b": w.assign(s * b)
        else:
            w.assign(a + s * (b - a))
    c, d, v = ev(ch), ev(dh), ev(dv)
    print(f"SCALE {run} lr={lr} s={s}: code {c:.3f} rec {(c0-c)/1.22:.0%} doc +{d-d0:.3f} forget {(d-d0)/1.269:.2f}x  docTrain +{v-v0:.3f}", flush=True)
