import os, sys, json
from keras_lora.recipes import quality
r = quality.quality(quality.QualityConfig(out=sys.argv[1], runs=("lora", "full")))
s = r["summary"]
print("DIAL", r["backend"], {k: round(v * 100, 1) for k, v in s["recovery_per_run"].items()}, {k: round(v, 3) for k, v in s["forgetting_ratio_per_run"].items()})
for k, pts in s["weighted_update"].items():
    print("DIAL", r["backend"], k, [(p["weight"], round(p["recovery"] * 100, 1), round(p["forgetting_ratio"], 3)) for p in pts])
