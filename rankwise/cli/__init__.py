"""The ``rankwise`` command line: thin typed commands over the library."""

from rankwise.cli.app import app, main

__all__ = ["app", "main"]
