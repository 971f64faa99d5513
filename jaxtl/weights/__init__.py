"""Reading checkpoints and merging them into model params with a checked load report."""

from jaxtl.weights.merge import LoadReport, Mismatch, merge_checkpoint
from jaxtl.weights.paths import UnsafePathError
from jaxtl.weights.safetensors_io import (
    find_weight_files,
    read_safetensors_dir,
    read_safetensors_file,
)

__all__ = [
    "LoadReport",
    "Mismatch",
    "UnsafePathError",
    "find_weight_files",
    "merge_checkpoint",
    "read_safetensors_dir",
    "read_safetensors_file",
]
