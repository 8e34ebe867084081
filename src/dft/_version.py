"""Version of the dft-loss distribution (import name dft): the one place it is written."""

__version__ = "0.2.0"
