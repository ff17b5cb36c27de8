import sys

from mlxsup.cli import main

sys.exit(main())
