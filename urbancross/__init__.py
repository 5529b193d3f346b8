"""UrbanCross: cross-domain satellite image-text retrieval on Ray."""

__version__ = "0.1.0"
