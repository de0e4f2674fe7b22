"""ubt-ray: find and unlearn backdoors in CLIP models (UBT), scaled with Ray."""

__version__ = "0.1.0"
