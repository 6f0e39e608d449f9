"""``python -m stm_fast.eval``: see ``stm_fast.eval``."""

import sys

from .cli import main

sys.exit(main())
