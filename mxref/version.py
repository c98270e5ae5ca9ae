"""The version of mxref (one place: the package, its CLI and its .npz files read it here)."""
__version__ = "0.1.0"
