"""`python -m improto.conformance --server HOST:PORT --jwt-secret S`."""

import sys

from improto.conformance.runner import main

sys.exit(main())
