import os, sys; os.environ.setdefault("KERAS_BACKEND","jax")
import numpy as np, keras
from keras_lora.recipes import pretrain, data, quality, training, tokenization
lr = 1e-3
base = pretrain.load_pretrained(128); tok = base.preprocessor.tokenizer
code_train, code_held = data.python_code_split(); doc_train, doc_held = data.docstring_split()
keras.utils.set_random_seed(0)
lm = pretrain.load_pretrained(128, with_preprocessor=False)
opt, loss = training.optimizer_and_loss(lr); lm.compile(optimizer=opt, loss=loss)
windows = tokenization.token_windows(code_train, tok, 129, shuffle_seed=0)
order = np.random.default_rng(0).integers(0, len(windows), size=120 * 8)
ch = tokenization.token_windows(code_held, tok, 129, max_rows=64); dh = tokenization.token_windows(doc_held, tok, 129, max_rows=64)
ev = lambda r: quality._evaluate(lm, r, 8)
c0, d0 = ev(ch), ev(dh)
w0 = [w.numpy() for w in lm.weights]
x, y = pretrain.as_inputs(windows[order])
if os.path.exists("/tmp/fg/full_w.npz"):
    z = np.load("/tmp/fg/full_w.npz"); w1 = [z[f"w1_{i}"] for i in range(len(w0))]
else:
    lm.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    w1 = [w.numpy() for w in lm.weights]
np.savez("/tmp/fg/full_w.npz", **{f"w0_{i}": a for i, a in enumerate(w0)}, **{f"w1_{i}": a for i, a in enumerate(w1)})
paths = [w.path for w in lm.weights]
for i, p in enumerate(paths):
    d = w1[i]-w0[i]
    if d.ndim >= 2 and min(d.shape[0], int(np.prod(d.shape[1:]))) >= 16:
        m = d.reshape(d.shape[0], -1) if "embedding" in p else d.reshape(-1, d.shape[-1]) if d.ndim==2 else d.reshape(d.shape[0], -1)
        s = np.linalg.svd(m, compute_uv=False); e = s**2/np.sum(s**2)
        print("SV", p, d.shape, "energy top1/4/16:", np.round(np.cumsum(e)[[0,3,15]],2), "rel", np.linalg.norm(d)/np.linalg.norm(w0[i]))
def group(p):
    if "token_embedding" in p: return "token_emb"
    if "position_embedding" in p: return "pos_emb"
    if "norm" in p: return "layernorm"
    if "bias" in p: return "bias"
    if "attention" in p: return "attn_kernel"
    return "mlp_kernel"
gs = sorted(set(group(p) for p in paths))
def apply(sel, s=1.0):
    for w, p, a, b in zip(lm.weights, paths, w0, w1):
        w.assign(a + (s * (b - a) if sel(p) else 0 * a))
def rep(tag):
    c, d = ev(ch), ev(dh)
    print(f"GROUP {tag}: code {c:.3f} rec {(c0-c)/1.22:.0%} doc +{d-d0:.3f} forget {(d-d0)/1.269:.2f}x", flush=True)
for g in gs:
    apply(lambda p: group(p) == g); rep(f"only {g}")
    apply(lambda p: group(p) != g); rep(f"all but {g}")
    apply(lambda p: group(p) != g, 0.6); rep(f"all but {g} s0.6")
