"""Dataset layouts (MVTec AD, VisA, plain folder), the synthetic generator, and image/mask decoding."""

from spg_dist.data.folder import read_folder
from spg_dist.data.imageio import IMAGE_EXTENSIONS, ImageDecodeError, image_size, load_image, load_mask
from spg_dist.data.mvtec import read_mvtec
from spg_dist.data.records import ANOMALOUS, NORMAL, UNKNOWN, DatasetError, ImageRecord
from spg_dist.data.spec import DatasetSpec, list_records, parse_dataset_spec, problems, record_problems
from spg_dist.data.synth import DEFECT_KINDS, MVTEC_CATEGORIES, VISA_CATEGORIES, synthesize
from spg_dist.data.visa import read_visa

__all__ = [
    "ANOMALOUS", "NORMAL", "UNKNOWN", "DatasetError", "ImageRecord",
    "DatasetSpec", "parse_dataset_spec", "list_records", "record_problems", "problems",
    "read_mvtec", "read_visa", "read_folder",
    "IMAGE_EXTENSIONS", "ImageDecodeError", "load_image", "load_mask", "image_size",
    "DEFECT_KINDS", "MVTEC_CATEGORIES", "VISA_CATEGORIES", "synthesize",
]
