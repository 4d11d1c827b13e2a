"""Image loading, pre-processing and dataset layouts."""
from anomalyvfm.data.datasets import LAYOUTS, Dataset, Sample, evenly_spaced, load_dataset
from anomalyvfm.data.images import IMAGE_SUFFIXES, list_images, load_mask, load_rgb

__all__ = ["LAYOUTS", "Dataset", "Sample", "evenly_spaced", "load_dataset", "IMAGE_SUFFIXES", "list_images", "load_mask", "load_rgb"]
