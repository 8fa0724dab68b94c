"""``python -m timer_sdk`` is the ``timer-sdk`` command."""

import sys

from .tools.cli import main

sys.exit(main())
