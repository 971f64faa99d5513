"""Reading checkpoints and merging them into model params with a checked load report."""

from jaxtl.weights.merge import LoadReport, Mismatch, flatten, merge_checkpoint, unflatten
from jaxtl.weights.safetensors_io import (
    find_weight_files,
    read_safetensors_dir,
    read_safetensors_file,
)

__all__ = [
    "LoadReport",
    "Mismatch",
    "find_weight_files",
    "flatten",
    "merge_checkpoint",
    "read_safetensors_dir",
    "read_safetensors_file",
    "unflatten",
]
