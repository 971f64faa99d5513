"""Untrusted weights and bad model directories: each is refused before anything is allocated or
read, with an error naming the file, what was expected, what was found and what to do.

Real files throughout: tiny models saved by transformers, safetensors bytes written by hand
(8-byte little-endian header length + JSON header + data), and a Hugging Face hub cache laid out
as huggingface_hub lays it out (its own resolver and scanner read it back)."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
import struct

import huggingface_hub
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from _tiny import minilm_dir, tiny_config

from jaxtl.weights.loading import load, tokenizer
from jaxtl.weights.paths import UnsafePathError
from jaxtl.weights.state_dict import UnsafeCheckpointError, read_state_dict


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    """A tiny random BertModel (vocab 99) saved by transformers: config.json + model.safetensors."""
    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    transformers.BertModel(tiny_config()).save_pretrained(path)
    return str(path)


def _copy(source: str, tmp_path, name: str = "model"):
    return shutil.copytree(source, tmp_path / name)


def _at(path) -> str:
    """A path as a regex that matches it literally."""
    return re.escape(str(path))


def _safetensors_bytes(header: dict, data: bytes, length: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _write_config(directory, **config) -> None:
    (directory / "config.json").write_text(json.dumps(config))


# --- 1. safetensors headers and sharded indexes ---------------------------------------------------

_ONE_TENSOR = {
    "embeddings.word_embeddings.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
}


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        # data_offsets end at byte 16 of the data, but only 8 bytes follow the header
        (
            _safetensors_bytes(_ONE_TENSOR, bytes(8)),
            r"tensor 'embeddings\.word_embeddings\.weight' claims bytes 0\.\.16 .*only 8 bytes",
        ),
        # the length prefix points past the end of the file
        (
            _safetensors_bytes(_ONE_TENSOR, bytes(16), length=5000),
            r"the header length prefix says 5,000 bytes, but the file holds only \d+ bytes",
        ),
        # a 1 TB header: refused by its length alone, nothing allocated
        (
            _safetensors_bytes(_ONE_TENSOR, bytes(16), length=2**40),
            r"the header length prefix says 1,099,511,627,776 bytes, over safetensors' limit "
            r"of 100,000,000",
        ),
        # a shape whose bytes do not match its range
        (
            _safetensors_bytes(
                {"w": {"dtype": "F32", "shape": [10**6], "data_offsets": [0, 16]}}, bytes(16)
            ),
            r"tensor 'w' is F32 of shape \[1000000\] \(4,000,000 bytes\) but spans 16 bytes",
        ),
    ],
    ids=["offsets-past-end", "length-past-end", "length-over-100MB", "shape-vs-range"],
)
def test_forged_safetensors_header_is_refused_before_reading(tiny_bert, tmp_path, content, pattern):
    model_dir = _copy(tiny_bert, tmp_path)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(content)
    with pytest.raises(ValueError, match=rf"(?s)^{_at(weights)}: {pattern}.*download it again"):
        load(model_dir, task="features")
    with pytest.raises(ValueError, match=rf"(?s){pattern}.*download it again"):
        read_state_dict(weights)  # the single-file reader goes through the same check


@pytest.mark.parametrize(
    ("shard", "error", "pattern"),
    [
        (
            "model-00002-of-00002.safetensors",
            FileNotFoundError,
            r"index\.json names 2 shard\(s\) but 1 are missing: model-00002-of-00002\.safetensors"
            r"\. Download or copy the missing shard files",
        ),
        (
            "../../etc/passwd",
            UnsafePathError,
            r"index\.json names the file '\.\./\.\./etc/passwd', which lies outside .*Get a clean "
            r"copy",
        ),
        (
            "/etc/passwd",
            UnsafePathError,
            r"index\.json names the file '/etc/passwd', which lies outside .*Get a clean copy",
        ),
    ],
    ids=["missing-shard", "dot-dot", "absolute"],
)
def test_index_naming_a_missing_or_outside_shard_is_refused(
    tiny_bert, tmp_path, shard, error, pattern
):
    model_dir = _copy(tiny_bert, tmp_path)
    first = "model-00001-of-00002.safetensors"
    os.rename(model_dir / "model.safetensors", model_dir / first)
    names = list(safetensors.numpy.load_file(model_dir / first))
    weight_map = {name: first for name in names} | {"pooler.dense.weight": shard}
    index = {"metadata": {}, "weight_map": weight_map}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(error, match=pattern):
        load(model_dir, task="features")


def test_modules_json_naming_a_folder_outside_is_refused(tiny_bert, tmp_path):
    model_dir = _copy(tiny_bert, tmp_path)
    modules = [{"idx": 1, "name": "1", "path": "../../outside", "type": "models.Pooling"}]
    (model_dir / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(
        UnsafePathError,
        match=rf"{_at(model_dir / 'modules.json')} names the file "
        r"'\.\./\.\./outside/config\.json', which lies outside .*Get a clean copy",
    ):
        load(model_dir, task="features")


# --- 2. config.json sizes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "key", "value", "bound"),
    [
        ("bert", "vocab_size", 10**12, "1..4,194,304"),
        ("bert", "hidden_size", 10**9, "1..131,072"),
        ("bert", "num_hidden_layers", 10**6, "1..2,048"),
        ("bert", "intermediate_size", -1, "1..131,072"),
        ("bert", "num_attention_heads", 2.5, "1..4,096"),
        ("bert", "max_position_embeddings", "512", "1..1,048,576"),
        ("gpt2", "n_layer", 10**6, "1..2,048"),
        ("vit", "image_size", [224, 10**9], "1..32,768"),
    ],
)
def test_absurd_config_size_is_refused_before_building(tmp_path, family, key, value, bound):
    _write_config(tmp_path, model_type=family, **{key: value})
    (tmp_path / "model.safetensors").write_bytes(b"never read: refused before the weights")
    pattern = (
        rf"{_at(tmp_path / 'config.json')}: {key}={re.escape(repr(value))} is not a size a "
        rf"model has: expected an integer in {bound} \(.*\)\. .*restore config\.json"
    )
    with pytest.raises(ValueError, match=pattern):
        load(tmp_path, task="features")


@pytest.mark.parametrize("content", [b"[1, 2]", b"\xff\xfe not text"], ids=["list", "binary"])
def test_config_that_is_not_a_json_object_is_refused(tmp_path, content):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(
        ValueError, match=rf"{_at(tmp_path / 'config.json')} (holds a JSON list|is not valid JSON)"
    ):
        load(tmp_path, pretrained=False)


def test_config_whose_sizes_multiply_to_an_absurd_model_is_refused(tmp_path):
    # Each size is within its bound; together they describe a 2 TB embedding table. With
    # pretrained=False nothing else stands between the config and the allocation.
    _write_config(
        tmp_path, model_type="bert", vocab_size=2**22, hidden_size=2**17, num_attention_heads=4
    )
    with pytest.raises(
        ValueError,
        match=rf"{_at(tmp_path / 'config.json')} describes a 'bert' model of [\d,]+ params "
        r"\([\d,]+ GiB\), over the 256 GiB .*restore config\.json",
    ):
        load(tmp_path, task="features", pretrained=False)


# --- 3. symlinks ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("link", "target"),
    [
        ("model.safetensors", "elsewhere/model.safetensors"),  # absolute link out
        ("tokenizer.json", "../elsewhere/tokenizer.json"),  # relative link out
        ("1_Pooling", "../elsewhere/pooling"),  # a linked folder
    ],
)
def test_symlink_leading_outside_the_directory_is_refused(tiny_bert, tmp_path, link, target):
    model_dir = _copy(tiny_bert, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "pooling").mkdir(parents=True)
    shutil.copy(model_dir / "model.safetensors", elsewhere / "model.safetensors")
    shutil.copy(os.path.join(minilm_dir(), "tokenizer.json"), elsewhere / "tokenizer.json")
    if link == "model.safetensors":
        os.remove(model_dir / link)
        target = str(tmp_path / target)
    os.symlink(target, model_dir / link)
    pattern = (
        rf"{_at(model_dir / link)} is a symlink to '{re.escape(target)}', which resolves to "
        rf"{_at(os.path.realpath(elsewhere))}.*, outside the checkpoint directory "
        rf"{_at(os.path.realpath(model_dir))}\..*Replace the link with a copy"
    )
    with pytest.raises(UnsafePathError, match=pattern):
        load(model_dir, task="features")
    if link == "tokenizer.json":
        with pytest.raises(UnsafePathError, match=pattern):
            tokenizer(model_dir)


def test_symlink_inside_the_directory_loads(tiny_bert, tmp_path):
    model_dir = _copy(tiny_bert, tmp_path)
    (model_dir / "weights").mkdir()
    os.rename(model_dir / "model.safetensors", model_dir / "weights" / "bert.safetensors")
    os.symlink("weights/bert.safetensors", model_dir / "model.safetensors")
    assert load(model_dir, task="features").report.mismatched == []


def test_hub_cache_snapshot_loads(tiny_bert, tmp_path):
    """A snapshot as huggingface_hub writes one: every file a relative link into the repo's
    blobs (named by content hash), subfolders included; HF's own resolver finds it offline."""
    repo = tmp_path / "hub" / "models--jaxtl--tiny-bert"
    snapshot = repo / "snapshots" / ("0" * 40)
    files = {
        "config.json": os.path.join(tiny_bert, "config.json"),
        "model.safetensors": os.path.join(tiny_bert, "model.safetensors"),
    }
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    contents = {name: pathlib.Path(path).read_bytes() for name, path in files.items()}
    contents["vocab.txt"] = "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "cat", "dog"]).encode()
    contents["1_Pooling/config.json"] = json.dumps({"pooling_mode_mean_tokens": True}).encode()
    for name, content in contents.items():
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        blob.write_bytes(content)
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, (snapshot / name).parent), snapshot / name)

    resolved = huggingface_hub.snapshot_download(
        "jaxtl/tiny-bert", cache_dir=tmp_path / "hub", local_files_only=True
    )
    assert os.path.samefile(resolved, snapshot)
    cached = huggingface_hub.scan_cache_dir(tmp_path / "hub")
    assert {f.file_name for r in cached.repos for v in r.revisions for f in v.files} == {
        "config.json",
        "model.safetensors",
        "vocab.txt",
    }
    model = load(resolved, task="features")
    assert model.report.mismatched == [] and model.extras["pooling"] == "mean"
    assert model.extras["tokenizer"].encode("cat dog").ids == [2, 4, 5, 3]

    # huggingface_hub < 0.23 downloaded with local_dir= by linking large files into the cache.
    local = tmp_path / "local"
    local.mkdir()
    shutil.copy(os.path.join(tiny_bert, "config.json"), local)
    os.symlink(os.path.realpath(snapshot / "model.safetensors"), local / "model.safetensors")
    assert load(local, task="features").report.mismatched == []


# --- 4. pickles -----------------------------------------------------------------------------------


class _RunsAShellCommand:
    """A pickle payload whose unpickling runs ``os.system``."""

    def __init__(self, proof: str):
        self.proof = proof

    def __reduce__(self):
        return (os.system, (f"touch {self.proof}",))


@pytest.mark.parametrize("where", ["state dict file", "hub directory"])
def test_malicious_pickle_is_refused_and_runs_nothing(tiny_bert, tmp_path, where):
    """tests/test_state_dict.py proves such a payload is live under a plain unpickler; here it
    must not run through either way jaxtl.load meets a pickle."""
    proof = tmp_path / "pwned"
    payload = {"conv1.weight": torch.zeros(2, 2), "x": _RunsAShellCommand(str(proof))}
    if where == "state dict file":
        torch.save(payload, tmp_path / "evil.pth")
        with pytest.raises(
            UnsafeCheckpointError,
            match=rf"Refused to load {_at(tmp_path / 'evil.pth')}: "
            r"torch\.load\(weights_only=True\) rejected it .*system.*arbitrary code.*"
            r"Get the weights as \.safetensors",
        ):
            load(tmp_path / "evil.pth")
    else:
        model_dir = _copy(tiny_bert, tmp_path)
        os.remove(model_dir / "model.safetensors")
        torch.save(payload, model_dir / "pytorch_model.bin")
        with pytest.raises(
            FileNotFoundError,
            match=r"(?s)Found pytorch_model\.bin \(a PyTorch pickle\), which jaxtl does not read "
            r"yet\. Convert it to safetensors",
        ):
            load(model_dir)
    assert not proof.exists()


# --- 5. no weights --------------------------------------------------------------------------------


def test_directory_with_only_config_lists_what_was_looked_for(tiny_bert, tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copy(os.path.join(tiny_bert, "config.json"), model_dir)
    with pytest.raises(
        FileNotFoundError,
        match=rf"No safetensors weights in {_at(model_dir)}: expected model\.safetensors or "
        r"model\.safetensors\.index\.json\. Pass pretrained=False",
    ):
        load(model_dir)


# --- 6. weights of another family -----------------------------------------------------------------


def test_gpt2_weights_beside_a_bert_config_are_refused(tiny_bert, tmp_path):
    gpt2_dir = tmp_path / "gpt2"
    torch.manual_seed(0)
    gpt2 = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=64, bos_token_id=None,
        eos_token_id=None,
    )  # fmt: skip
    transformers.GPT2Model(gpt2).save_pretrained(gpt2_dir)
    model_dir = _copy(tiny_bert, tmp_path)
    shutil.copy(gpt2_dir / "model.safetensors", model_dir / "model.safetensors")
    with pytest.raises(
        ValueError,
        match=rf"(?s)None of the \d+ tensors in {_at(model_dir / 'model.safetensors')} is a "
        rf"param of the 'bert' model that {_at(model_dir / 'config.json')} describes: it "
        r"expects e\.g\. \['bert/.*the weights hold e\.g\. \['h\.0\.attn.*"
        r"put the config\.json saved with these weights beside them",
    ):
        load(model_dir, task="features")


# --- 7. tokenizer larger than the embedding table -------------------------------------------------


def test_tokenizer_past_the_embedding_table_is_refused(tiny_bert, tmp_path):
    model_dir = _copy(tiny_bert, tmp_path)  # vocab_size 99
    shutil.copy(os.path.join(minilm_dir(), "tokenizer.json"), model_dir)  # 30522 tokens
    with pytest.raises(
        ValueError,
        match=rf"{_at(model_dir / 'tokenizer.json')} produces token ids up to 30521 "
        r"\(30522 tokens\), but the model's embedding table has 99 rows \(vocab_size in "
        rf"{_at(model_dir / 'config.json')}\).*use the tokenizer saved with these weights, or "
        r"resize",
    ):
        load(model_dir, task="features", pretrained=False)
    assert np.asarray(tokenizer(model_dir).encode("hello").ids).max() >= 99
