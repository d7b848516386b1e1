"""``python -m lora_unlearn.cli ...``: the ``lora-unlearn`` command (e.g. under ``accelerate launch -m``)."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
