"""`python -m keras_lora.cli`: the `keras-lora` command."""

import sys

from keras_lora.cli import main

sys.exit(main())
