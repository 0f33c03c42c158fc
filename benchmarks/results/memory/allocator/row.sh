#!/bin/bash
# $1 tag, rest: XLA_FLAGS
tag=$1; shift
XLA_FLAGS="$*" keras-lora compare --arch base --backend jax ${ROWARGS:---runs lora --quantize int8 --quantize-build during --remat blocks --loss chunked} --batch 8 --seq 128 --rank 4 --targets query value --steps 6 --warmup 2 --rounds 1 --inference-runs 1 --out /tmp/fg/mem_$tag > /tmp/fg/mem_$tag.log 2>&1
python - <<PY
import json
r = json.load(open("/tmp/fg/mem_$tag/results.json"))["results"][0]
print("MEM $tag", {k: r.get(k) for k in ("training_increment_gb","process_peak_rss_gb","rss_after_build_gb","baseline_rss_gb","xla_temp_gb","median_step_s","cpu_s_per_step","final_loss")})
PY
