"""Fixtures live in tests/conftest.py; train_argv is re-exported for the app tests."""

from tests.conftest import train_argv  # noqa: F401
