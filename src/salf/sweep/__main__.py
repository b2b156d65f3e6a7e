"""`python -m salf.sweep SPEC`: run the cell a spec file describes, as a sweep's cell subprocess
does (salf.sweep.runner.run_cell_subprocess); its result goes to OUT/cells/<key>.json."""

import sys

from ..errors import SalfError
from .runner import cell_main, die_with_parent

if __name__ == "__main__":
    die_with_parent()
    try:
        raise SystemExit(cell_main(sys.argv[1]))
    except SalfError as e:
        print(f"salf: error: {e}", file=sys.stderr)
        raise SystemExit(2)
