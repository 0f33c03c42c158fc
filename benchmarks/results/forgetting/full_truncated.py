import os, sys; os.environ.setdefault("KERAS_BACKEND","jax")
import numpy as np, keras
from keras_lora.recipes import pretrain, data, quality, training, tokenization
base = pretrain.load_pretrained(128); tok = base.preprocessor.tokenizer
code_train, code_held = data.python_code_split(); doc_train, doc_held = data.docstring_split()
lm = pretrain.load_pretrained(128, with_preprocessor=False)
opt, loss = training.optimizer_and_loss(1e-3); lm.compile(optimizer=opt, loss=loss)
ch = tokenization.token_windows(code_held, tok, 129, max_rows=64); dh = tokenization.token_windows(doc_held, tok, 129, max_rows=64)
ev = lambda r: quality._evaluate(lm, r, 8)
z = np.load("/tmp/fg/full_w.npz"); n = len(lm.weights)
w0 = [z[f"w0_{i}"] for i in range(n)]; w1 = [z[f"w1_{i}"] for i in range(n)]
paths = [w.path for w in lm.weights]
c0, d0 = 6.281, 6.113
def trunc(d, r, p):
    m = d.reshape(d.shape[0], -1)
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return ((u[:, :r] * s[:r]) @ vt[:r]).reshape(d.shape)
def build(emb_r, proj_r, extra=()):
    out = []
    for p, a, b in zip(paths, w0, w1):
        d = b - a
        if "token_embedding" in p: d = trunc(d, emb_r, p) if emb_r else 0 * d
        elif "kernel" in p and "norm" not in p: d = trunc(d, proj_r, p) if proj_r else 0 * d
        elif any(e in p for e in extra): pass
        else: d = 0 * d
        out.append(d)
    return out
def rep(tag, deltas, s):
    for w, a, d in zip(lm.weights, w0, deltas): w.assign(a + s * d)
    c, d = ev(ch), ev(dh)
    print(f"TRUNC {tag} s={s}: code {c:.3f} rec {(c0-c)/1.22:.0%} forget {(d-d0)/1.269:.2f}x", flush=True)
for er, pr, ex in [(1,0,()),(4,0,()),(16,0,()),(4,1,()),(4,2,()),(4,4,()),(4,1,("norm",)),(4,4,("norm","bias"))]:
    ds = build(er, pr, ex)
    for s in (1.0, 0.8, 0.6):
        rep(f"emb{er} proj{pr} {ex}", ds, s)
