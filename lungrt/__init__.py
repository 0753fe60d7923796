"""lungrt: lung-segmentation U-Nets for chest X-rays, from PyTorch to fast, verified deployment."""

__version__ = "0.1.0"
