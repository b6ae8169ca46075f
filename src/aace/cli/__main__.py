"""``python -m aace.cli``, the same as ``python -m aace``."""

import sys

from aace.cli import main

sys.exit(main())
