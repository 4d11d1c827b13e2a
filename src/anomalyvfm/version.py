"""The installed package's version, in a leaf module so that any layer can record it."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("anomalyvfm")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+local"
