"""`python -m worker` is `atlas-worker`."""

import sys

from worker.cli import main

sys.exit(main())
