"""``python -m aace`` (also what ``torchrun -m aace`` runs)."""

import sys

from aace.cli import main

sys.exit(main())
