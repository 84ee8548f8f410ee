"""alignkit: align language models with human and AI preferences."""

__version__ = "0.1.0"
