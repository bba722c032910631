"""Errors a user can act on: each names the input at fault and the fix."""


class SecureMetricsError(Exception):
    """Base class for every error this package raises on purpose."""


class EnvironmentProblem(SecureMetricsError):
    """The machine lacks something the run needs (a binary, a permission, a free port).

    The message names what is missing and how to supply it; the CLI maps this to exit 2.
    """


class UsageError(SecureMetricsError):
    """An option or input value is invalid; the message names it and lists valid values."""
