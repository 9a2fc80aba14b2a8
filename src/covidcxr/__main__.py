"""``python -m covidcxr`` runs the command-line interface."""

import sys

from covidcxr.cli import main

sys.exit(main())
