"""The one exception family the core raises for problems a user can fix."""


class GeoCateError(ValueError):
    """Bad input or settings: ``problem`` says what is wrong, ``fix`` what to do.

    The provider turns it into a ``QgsProcessingException``; the dock shows it
    as a message. ``str(error)`` is both, in one readable paragraph.
    """

    def __init__(self, problem, fix=""):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} {fix}".strip())


class Cancelled(GeoCateError):
    """The user cancelled the run; nothing was written."""

    def __init__(self):
        super().__init__("The run was cancelled.", "Nothing was written.")


class MissingDependency(GeoCateError):
    """A Python package the estimation needs is not installed."""

    def __init__(self, package, pip_name=None):
        pip_name = pip_name or package
        super().__init__(
            f"The Python package '{package}' is not installed in the Python that runs QGIS.",
            f"Install it with: python3 -m pip install \"{pip_name}\" \"numpy<2\" "
            "(see the README, 'Installing in QGIS desktop').",
        )


def require(module_name, pip_name=None):
    """Import ``module_name`` or raise :class:`MissingDependency` naming the fix."""
    import importlib

    try:
        return importlib.import_module(module_name)
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise MissingDependency(module_name.split(".")[0], pip_name) from exc
