"""MetricSearch: deep metric learning and image search."""

__version__ = "0.1.0"
