"""``python -m trainables.serving``: see :mod:`trainables.serving.cli`."""

import sys

from trainables.serving.cli import main

sys.exit(main())
