"""Model conversion and training for SHE (needs torch for torch inputs and training)."""

from .convert import ConversionReport, Settings, convert, save_atomically
from .search import search

__all__ = ["ConversionReport", "Settings", "convert", "save_atomically", "search"]
