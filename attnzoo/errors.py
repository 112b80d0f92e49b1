"""Exception types raised by attnzoo.

``InputError`` is raised by validation before any kernel launches; its message names the argument,
what it got and what it needs. ``BackendUnavailableError`` is raised when a forced backend cannot run
(or no backend can): it lists, per backend, why not.
"""


class InputError(ValueError):
    """Bad input to an attnzoo op or module (wrong rank, shape, dtype, device, ...)."""


class BackendUnavailableError(RuntimeError):
    """The requested backend (or every backend, for ``"auto"``) cannot run these inputs."""
