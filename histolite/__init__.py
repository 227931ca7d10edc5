"""histolite: small, accurate, deployable classifiers for H&E histology images."""

__version__ = "0.1.0"

__all__ = ["__version__"]
