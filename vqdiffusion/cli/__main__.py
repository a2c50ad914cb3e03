"""``python -m vqdiffusion.cli``."""

import sys

from . import main

sys.exit(main())
