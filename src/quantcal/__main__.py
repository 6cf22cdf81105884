"""``python -m quantcal`` runs the command-line interface."""

import sys

from quantcal.cli import main

sys.exit(main())
