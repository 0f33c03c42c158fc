import os, sys; os.environ.setdefault("KERAS_BACKEND","jax")
import numpy as np, keras
from keras_lora.recipes import pretrain, data, quality, training, tokenization
from keras_lora.layer import LoraLayer
from keras_lora.embedding import LoraEmbedding
import json
run = sys.argv[1]; lr = float(sys.argv[2]) if len(sys.argv) > 2 else (5e-3 if run=="lora" else 1e-3)
# BASE: a base made by pretrain_*.py (its card beside it, BASE + "_card.json");
# unset: the shipped base.
D = os.environ.get("BASE"); card = json.load(open(D + "_card.json")) if D else {}
kw = dict(lora_rank=int(os.environ.get("R", 1)))
cfg = quality.QualityConfig(out="/tmp/fg/o", runs=("lora",), lora_learning_rate=lr, **kw)
where = dict(directory=D, digests=card["sha256"]) if D else {}
load = lambda **k: pretrain.load_pretrained(128, **where, **k)
base = load(); tok = base.preprocessor.tokenizer
code_train, code_held = data.python_code_split(); doc_train, doc_held = data.docstring_split()
keras.utils.set_random_seed(0)
lm = load(with_preprocessor=False)
if run == "lora": quality._inject(lm, cfg)
opt, loss = training.optimizer_and_loss(lr); lm.compile(optimizer=opt, loss=loss)
windows = tokenization.token_windows(code_train, tok, 129, shuffle_seed=0)
print("code train windows", len(windows), "trainable", sum(int(np.prod(w.shape)) for w in lm.trainable_weights), lm.count_params())
order = np.random.default_rng(0).integers(0, len(windows), size=120 * 8)
ch = tokenization.token_windows(code_held, tok, 129, max_rows=64); dh = tokenization.token_windows(doc_held, tok, 129, max_rows=64)
dv = tokenization.token_windows(doc_train, tok, 129, max_rows=64)
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
    print(f"BIG {run} lr={lr} R={kw['lora_rank']} s={s}: code {c0:.3f}->{c:.3f} gain {c0-c:.3f} doc {d0:.3f} +{d-d0:.3f}", flush=True)
