"""Errors shown to users."""


class HeadatlasError(Exception):
    """A user-facing error whose one-line message says what to do."""
