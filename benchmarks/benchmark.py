"""Old entry point: `python benchmarks/benchmark.py ARGS` = `keras-lora compare`."""

import sys

from keras_lora.cli import main

sys.exit(main(["compare", *sys.argv[1:]]))
