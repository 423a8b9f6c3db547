"""The package version, in one place: ``pyproject.toml`` reads it at build time
(``[tool.setuptools.dynamic]``) and ``rome_edit.__version__`` / ``rome-edit --version`` import it,
so a source checkout reports the version of the code it holds, installed or not."""

__version__ = "0.3.0"
