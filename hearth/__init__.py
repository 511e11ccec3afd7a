"""hearth: a private AI server."""

__version__ = "0.1.0"
