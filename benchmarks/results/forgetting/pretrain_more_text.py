import os, json, re; os.environ.setdefault("KERAS_BACKEND","jax")
from keras_lora.recipes import pretrain, data
lib = json.load(open("/tmp/fg/libdocs.json"))
fence = re.compile(r"```.*?```", re.S)
lib = [d for d in (fence.sub("", x).strip() for x in lib) if len(d) >= 200]
orig = data.docstring_split
def split():
    tr, he = orig()
    return tr + lib, he
data.docstring_split = split
print("lib docs", len(lib), sum(map(len, lib)), flush=True)
steps = int(os.environ.get("STEPS", 1500))
card = pretrain.pretrain(pretrain.PretrainConfig(out="/tmp/fg/base_lib", steps=steps))
json.dump(card, open("/tmp/fg/base_lib_card.json", "w"), indent=1)
print("DONE", card["parameters"], card["heldout_loss"], card["final_train_loss"], card["train_seconds"])
