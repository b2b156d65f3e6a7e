"""`python -m salf` == the `salf` command (so `torchrun -m salf` / `accelerate launch -m salf` work)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
