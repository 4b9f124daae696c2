"""``python -m cupysyncbn.demo``: run the demo (see :mod:`cupysyncbn.demo.run`)."""

import sys

from .run import main

sys.exit(main())
