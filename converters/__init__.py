"""Model conversion and training for SHE (needs torch for torch inputs and training)."""

from .convert import ConversionReport, convert, save_atomically

__all__ = ["ConversionReport", "convert", "save_atomically"]
