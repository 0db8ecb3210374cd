"""``python -m covrl.scaling``: see :mod:`covrl.scaling.cli`."""

import sys

from covrl.scaling.cli import main

sys.exit(main())
