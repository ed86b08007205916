"""anomalyncd: discover the types of defects in industrial images (AnomalyNCD)."""

__version__ = "0.1.0"
