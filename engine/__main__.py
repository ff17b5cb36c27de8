"""`python -m mlxsup.engine`: the engine process (see mlxsup.engine.main)."""

import sys

from .main import main

sys.exit(main())
