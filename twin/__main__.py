"""``python -m twin``: the same as the ``twin`` console script (and ``python -m twin.cli``)."""

import sys

from twin.cli.app import main

sys.exit(main())
