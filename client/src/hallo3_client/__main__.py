"""``python -m hallo3_client`` is the ``hallo3`` command."""

import sys

from hallo3_client.cli import main

sys.exit(main())
