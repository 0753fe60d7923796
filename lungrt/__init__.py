"""lungrt: lung-segmentation U-Nets for chest X-rays, from PyTorch to fast, verified deployment.

    import lungrt
    seg = lungrt.LungSegmenter.load("msag-unet")
    result = seg.predict("chest.png")   # result.mask: bool (H, W) at the image's own size

Importing lungrt is cheap and changes no global state; the API loads its pieces on first use.
"""

from lungrt._version import __version__

__all__ = ["LungSegmenter", "LungResult", "__version__"]


def __getattr__(name: str):
    if name in ("LungSegmenter", "LungResult"):
        from lungrt import api

        return getattr(api, name)
    raise AttributeError(f"module 'lungrt' has no attribute {name!r}")
