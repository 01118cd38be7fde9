"""Model conversion and training for SHE (needs torch for torch inputs and training)."""

from converters.convert import ConversionReport, Settings, convert, prepare, save_atomically
from converters.search import search

__all__ = ["ConversionReport", "Settings", "convert", "prepare", "save_atomically", "search"]
