"""``python -m timer_sdk.bench`` runs the benchmark."""

import sys

from . import main

sys.exit(main())
