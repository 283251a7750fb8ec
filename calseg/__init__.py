"""CalSeg: calcium-active cell segmentation for epithelial GECI recordings."""

__version__ = "0.1.0"
