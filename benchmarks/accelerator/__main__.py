"""`python -m benchmarks.accelerator [--tiny] [--budget_s S] --out DIR` (see the package doc)."""

import sys

from benchmarks.accelerator import driver

sys.exit(driver.main())
