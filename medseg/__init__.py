"""medseg: 3D medical image segmentation on MONAI (train, segment, report)."""

__version__ = "0.1.0"
