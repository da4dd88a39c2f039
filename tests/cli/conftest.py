"""The fault tables' fixtures (`base`, `workspace`), defined once in `tests/cli/faults.py`."""

from tests.cli.faults import base, workspace  # noqa: F401
