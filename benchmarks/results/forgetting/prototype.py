import os, sys; os.environ.setdefault("KERAS_BACKEND","jax")
import numpy as np, keras, scipy.linalg as sl
from keras_lora.recipes import pretrain, data, quality, training, tokenization
from keras_lora.embedding import LoraEmbedding
from keras_lora.layer import LoraLayer
k = int(os.environ.get("K", 2)); lr = float(os.environ.get("LR", 5e-3)); steps = int(os.environ.get("STEPS", 120))
mode = os.environ.get("MODE", "frozen")
cfg = quality.QualityConfig(out="/tmp/fg/o", runs=("lora",), embedding_rank=k, lora_learning_rate=lr,
    lora_rank=int(os.environ.get("R",1)), lora_alpha=float(os.environ.get("A",16)), embedding_alpha=float(os.environ.get("EALPHA",1)))
base = pretrain.load_pretrained(128); tok = base.preprocessor.tokenizer
code_train, code_held = data.python_code_split(); doc_train, doc_held = data.docstring_split()
keras.utils.set_random_seed(0)
lm = pretrain.load_pretrained(128, with_preprocessor=False)
quality._inject(lm, cfg)
bb = lm.backbone
feat = keras.Model(bb.inputs, bb.output)
def H(texts, n):
    r = tokenization.token_windows(texts, tok, 129, max_rows=n)
    x, _ = pretrain.as_inputs(r); x = {kk: x[kk] for kk in ("token_ids","padding_mask")}
    h = feat.predict(x, batch_size=16, verbose=0); return h[x["padding_mask"].astype(bool)].astype(np.float64)
hd, hc = H(doc_train, 256), H(code_train, 256)
Cd, Cc = hd.T@hd/len(hd), hc.T@hc/len(hc)
w, V = sl.eigh(Cc, Cd + 1e-6*np.trace(Cd)/128*np.eye(128))
top = V[:, ::-1][:, :k].T; top = top/np.linalg.norm(top,axis=1,keepdims=True)*np.sqrt(128)
emb = [l for l in lm._flatten_layers() if isinstance(l, LoraEmbedding)][0]
projs = [l for l in lm._flatten_layers() if isinstance(l, LoraLayer) and not isinstance(l, LoraEmbedding)]
def gen_top(xd, xc, r):
    n = xd.shape[1]; Cd = xd.T@xd/len(xd); Cc = xc.T@xc/len(xc)
    w, V = sl.eigh(Cc, Cd + 1e-6*np.trace(Cd)/n*np.eye(n)); return V[:, ::-1][:, :r], w[::-1][:r]
if mode.startswith("both"):
    rec = {}
    _lcall = LoraLayer.call
    def lcall(self, inputs, *a, **kw):
        if isinstance(self, LoraLayer) and not isinstance(self, LoraEmbedding):
            v = np.asarray(inputs); rec.setdefault(id(self), []).append(v.reshape(-1, int(np.prod(self.lora_a.shape[:-1]))))
        return _lcall(self, inputs, *a, **kw)
    LoraLayer.call = lcall
    def acts(texts):
        rec.clear(); r = tokenization.token_windows(texts, tok, 129, max_rows=64)
        x, _ = pretrain.as_inputs(r); x = {kk: x[kk] for kk in ("token_ids","padding_mask")}
        for i in range(0, len(r), 16): bb({kk: v[i:i+16] for kk, v in x.items()})
        return {kk: np.concatenate(v).astype(np.float64) for kk, v in rec.items()}
    ad, ac = acts(doc_train), acts(code_train)
    LoraLayer.call = _lcall
    for p in projs:
        r = p.lora_a.shape[-1]
        V, w = gen_top(ad[id(p)], ac[id(p)], r)
        pass
        V = V/np.linalg.norm(V, axis=0, keepdims=True)*float(os.environ.get("ANORM", 0.577))
        p.lora_a.assign(V.reshape(p.lora_a.shape).astype("float32"))
        if mode == "both": p.lora_a.trainable = False
if mode != "base":
    emb.lora_b.assign(top.astype("float32")); emb.lora_b.trainable = False
if os.environ.get("HEAD_ONLY"):
    _c0 = LoraEmbedding.call
    def _ho(self, inputs, reverse=False, training=None):
        if reverse: return _c0(self, inputs, reverse=True)
        return self.original_layer(inputs)
    LoraEmbedding.call = _ho
opt, loss = training.optimizer_and_loss(lr); lm.compile(optimizer=opt, loss=loss)
windows = tokenization.token_windows(code_train, tok, 129, shuffle_seed=0)
order = np.random.default_rng(0).integers(0, len(windows), size=steps * 8)
ch = tokenization.token_windows(code_held, tok, 129, max_rows=64); dh = tokenization.token_windows(doc_held, tok, 129, max_rows=64)
ev = lambda r: quality._evaluate(lm, r, 8)
c0, d0 = ev(ch), ev(dh)
x, y = pretrain.as_inputs(windows[order])
lm.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
def report(tag):
    c, d = ev(ch), ev(dh)
    print(f"DEC {tag}: code {c:.3f} rec {(c0-c)/1.22:.0%} doc +{d-d0:.3f} forget {(d-d0)/1.269:.2f}x", flush=True)
report(f"all k={k} lr={lr} mode={mode}")
sa = emb.lora_a.numpy(); emb.lora_a.assign(np.zeros_like(sa)); report("projections only"); emb.lora_a.assign(sa)
sb = [p.lora_b.numpy() for p in projs]
for p in projs: p.lora_b.assign(np.zeros_like(p.lora_b.numpy()))
report("embedding only")
for p, b in zip(projs, sb): p.lora_b.assign(b)
_call = LoraEmbedding.call
def call(self, inputs, reverse=False, training=None):
    if reverse: return _call(self, inputs, reverse=True)
    return self.original_layer(inputs)
LoraEmbedding.call = call; lm.compile(optimizer=opt, loss=loss); report("no lookup side")
LoraEmbedding.call = _call
print("names", [p.name for p in projs][:6])
