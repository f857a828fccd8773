"""memserve: serve large language models from Python on the memory a machine really has."""

__version__ = "0.1.0"
__all__ = ["__version__"]
