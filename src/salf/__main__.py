"""`python -m salf` == the `salf` command (so `torchrun -m salf` / `accelerate launch -m salf` work).

Under a launcher every process runs the command; only rank 0 prints its results (the other
ranks' stdout would repeat them). Errors and warnings still reach stderr from every rank.
"""

import os
import sys

from . import distributed
from .cli import main

if __name__ == "__main__":
    if not distributed.is_main():
        sys.stdout = open(os.devnull, "w")
    raise SystemExit(main())
