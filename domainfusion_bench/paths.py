"""Where things live by default. Torch-free, so specs, launchers and the data layer can read it."""

from __future__ import annotations

import os

# `--data_dir` when none is given: the DFBENCH_DATA environment variable, else ./datasets.
DEFAULT_DATA_DIR = os.environ.get("DFBENCH_DATA", "datasets")
