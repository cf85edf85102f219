"""`python -m chunkwise ...`: the `chunkwise` command."""

import sys

from chunkwise.cli.main import main

sys.exit(main())
