"""Transformer-XL relative-position attention ops."""
