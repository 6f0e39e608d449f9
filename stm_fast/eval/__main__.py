"""``python -m stm_fast.eval``: see ``stm_fast.eval``."""

import os
import sys

if not {"--quiet", "--list", "-h", "--help"} & set(sys.argv[1:]) and os.environ.get("RANK", "0") == "0":
    # importing torch takes seconds: say at once that the run has started
    print("stm_fast.eval: starting (importing torch)", flush=True)

from .cli import main  # noqa: E402

sys.exit(main())
