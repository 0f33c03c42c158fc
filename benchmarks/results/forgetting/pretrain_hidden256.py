import os, json; os.environ.setdefault("KERAS_BACKEND","jax")
from keras_lora.recipes import pretrain
card = pretrain.pretrain(pretrain.PretrainConfig(out="/tmp/fg/base256", hidden=256, intermediate=1024, heads=4))
json.dump(card, open("/tmp/fg/base256_card.json", "w"), indent=1)
print("DONE", card["parameters"], card["heldout_loss"], card["final_train_loss"], card["train_seconds"])
