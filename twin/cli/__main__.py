"""``python -m twin.cli``: the same as the ``twin`` console script."""

import sys

from twin.cli.app import main

sys.exit(main())
