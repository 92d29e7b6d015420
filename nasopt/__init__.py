"""nasopt: neural architecture search with compression objectives."""
__version__ = "0.1.0"
