# -*- test-case-name: tests.test_cli,tests.test_uidl_admin -*-
"""
What the admin commands share on the command line: errors that are one
line, and an argument parser that raises them instead of printing usage.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

__all__ = ["Failed", "OneLineParser", "UsageError"]


class UsageError(Exception):
    """A one-line usage error."""


class Failed(Exception):
    """A one-line reason the command could not do its job."""


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line."""

    def error(self, message: str) -> NoReturn:
        """
        @param message: what argparse found wrong.
        """
        raise UsageError(f"{message} (see {self.prog} --help)")
