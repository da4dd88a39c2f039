"""The `nas` command (`main`) and its training sub-commands (`train`)."""

from nas.cli.main import main

__all__ = ["main"]
