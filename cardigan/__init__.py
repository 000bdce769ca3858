"""Cardigan: keeps a visual-search index of product images live."""

__version__ = "0.1.0"
