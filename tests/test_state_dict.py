"""Reading single-file state dicts: safetensors, and PyTorch pickles only through
``torch.load(weights_only=True)``, never a fallback to full unpickling."""

from __future__ import annotations

import builtins
import os
import sys

import numpy as np
import pytest
import safetensors.numpy
import torch

from jaxtl.weights.state_dict import UnsafeCheckpointError, read_state_dict


class _WritesAFile:
    """A pickle payload: unpickling it runs ``exec`` which creates ``target``."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        code = f"with open({self.target!r}, 'w') as f: f.write('pwned')"
        return (builtins.exec, (code,))


def _plant(path, target):
    torch.save({"fc.weight": torch.zeros(2, 2), "payload": _WritesAFile(str(target))}, path)


def test_payload_is_live(tmp_path):
    """The planted file really runs code under a plain unpickler, so the refusal below matters."""
    _plant(tmp_path / "evil.pth", tmp_path / "proof")
    torch.load(tmp_path / "evil.pth", weights_only=False)
    assert (tmp_path / "proof").read_text() == "pwned"


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    target = tmp_path / "pwned.txt"
    _plant(tmp_path / "evil.pth", target)
    with pytest.raises(UnsafeCheckpointError, match="weights_only=True.*arbitrary code"):
        read_state_dict(tmp_path / "evil.pth")
    assert not target.exists()


def test_malicious_pickle_through_load_is_refused(tmp_path):
    import jaxtl

    target = tmp_path / "pwned.txt"
    _plant(tmp_path / "evil.pth", target)
    with pytest.raises(UnsafeCheckpointError):
        jaxtl.load(tmp_path / "evil.pth")
    assert not target.exists()


def test_without_torch_no_pickle_is_opened(tmp_path, monkeypatch):
    target = tmp_path / "pwned.txt"
    _plant(tmp_path / "evil.pth", target)
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(ImportError, match=r"jaxtl\[torch\].*never unpickles"):
        read_state_dict(tmp_path / "evil.pth")
    assert not target.exists()


def test_plain_and_wrapped_state_dicts(tmp_path):
    weights = {"conv1.weight": torch.randn(4, 3, 3, 3), "bn1.num_batches_tracked": torch.tensor(7)}
    torch.save(weights, tmp_path / "plain.pth")
    torch.save({"state_dict": weights, "epoch": 3}, tmp_path / "wrapped.pth")
    torch.save(
        {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in weights.items()},
        tmp_path / "bf16.pt",
    )
    for name in ("plain.pth", "wrapped.pth"):
        got = read_state_dict(tmp_path / name)
        assert set(got) == set(weights)
        np.testing.assert_array_equal(got["conv1.weight"], weights["conv1.weight"].numpy())
    bf16 = read_state_dict(tmp_path / "bf16.pt")
    assert bf16["conv1.weight"].dtype == np.float32

    safetensors.numpy.save_file({"a": np.ones((2, 3), np.float32)}, tmp_path / "w.safetensors")
    assert read_state_dict(tmp_path / "w.safetensors")["a"].shape == (2, 3)


@pytest.mark.parametrize(
    ("name", "content", "error", "pattern"),
    [
        ("missing.pth", None, FileNotFoundError, "does not exist"),
        ("weights.h5", b"x", ValueError, "unknown weight file type"),
        ("list.pth", [1, 2], ValueError, "not a state dict"),
    ],
)
def test_bad_files(tmp_path, name, content, error, pattern):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(error, match=pattern):
        read_state_dict(path)


def test_unrecognised_state_dict_names_the_readers(tmp_path):
    import jaxtl

    safetensors.numpy.save_file({"encoder.w": np.ones(2, np.float32)}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="no jaxtl family recognises.*resnet"):
        jaxtl.load(tmp_path / "x.safetensors")
    assert os.path.exists(tmp_path / "x.safetensors")
