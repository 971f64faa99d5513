"""The audio data source (jaxtl.data.audio): WAV folders and arrays in, wav2vec2 inputs out.

``encode`` is checked against transformers' ``Wav2Vec2FeatureExtractor`` (the reference), the
WAV reader against files written by ``scipy.io.wavfile`` and the standard library's ``wave``,
and one fine-tuning run goes from waveforms to a trained tiny wav2vec2 through
``jaxtl.finetune``. No real labeled audio ships with any installed package, so the clips here
are synthetic tones (:func:`tones`).
"""

from __future__ import annotations

import json
import os
import wave

import numpy as np
import pytest
import torch
import transformers
from _tiny import tiny_wav2vec2_config
from scipy.io import wavfile

import jaxtl
from jaxtl.data import audio
from jaxtl.models import wav2vec2

TOL = 1e-6  # float32; never loosened to make a test pass
RATE = 8000  # the tiny checkpoint's feature extractor rate


def tones(n: int, seed: int = 0, rate: int = RATE, lengths=(300, 480)) -> tuple[list, np.ndarray]:
    """Synthetic, not real audio: ``n`` noisy pure tones of random lengths, class 0 at
    300-500 Hz and class 1 at 1500-2000 Hz (random phase, amplitude and noise), seeded. Only
    for tests: no installed package ships labeled audio to embed."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    clips = []
    for label in labels:
        t = np.arange(rng.integers(*lengths)) / rate
        hz = rng.uniform(1500, 2000) if label else rng.uniform(300, 500)
        tone = rng.uniform(0.2, 0.9) * np.sin(2 * np.pi * hz * t + rng.uniform(0, 2 * np.pi))
        clips.append((tone + 0.05 * rng.standard_normal(len(t))).astype(np.float32))
    return clips, labels


def peak_hz(clip: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(clip))
    return float(np.fft.rfftfreq(len(clip), 1 / rate)[np.argmax(spectrum)])


def preprocessing(**overrides) -> dict:
    facts = dict(sampling_rate=16000, do_normalize=True, return_attention_mask=True)
    facts.update(padding_value=0.0, source="test")
    return {"audio_preprocessing": {**facts, **overrides}, "receptive_field": 32}


def extractor(**overrides) -> transformers.Wav2Vec2FeatureExtractor:
    return transformers.Wav2Vec2FeatureExtractor(
        **{"sampling_rate": 16000, "return_attention_mask": True, **overrides}
    )


def all_clips(data: audio.AudioSplits) -> list[np.ndarray]:
    return [c for split in ("train", "validation", "test") for c in getattr(data, split)[0]]


def write_24bit(path, samples: np.ndarray, rate: int) -> None:
    """A 24-bit PCM WAV via the standard library (scipy writes no 24-bit files)."""
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(3)
        w.setframerate(rate)
        w.writeframes(b"".join(int(v).to_bytes(3, "little", signed=True) for v in samples))


# ---- reading WAV files --------------------------------------------------------------------


def test_read_wav_scales_each_sample_format_to_unit_range(tmp_path):
    cases = {
        "int16": (np.array([-32768, 0, 16384, 32767], np.int16), [-1.0, 0.0, 0.5, 32767 / 32768]),
        "int32": (np.array([-(2**31), 2**30], np.int32), [-1.0, 0.5]),
        "uint8": (np.array([0, 128, 192, 255], np.uint8), [-1.0, 0.0, 0.5, 127 / 128]),
        "float32": (np.array([-0.25, 0.75], np.float32), [-0.25, 0.75]),
    }
    for kind, (samples, expected) in cases.items():
        wavfile.write(tmp_path / f"{kind}.wav", 11025, samples)
        clip, rate = audio.read_wav(str(tmp_path / f"{kind}.wav"))
        assert rate == 11025 and clip.dtype == np.float32, kind
        np.testing.assert_array_equal(clip, np.float32(expected), err_msg=kind)
    write_24bit(tmp_path / "pcm24.wav", [0, 2**22, -(2**23)], 8000)
    clip, rate = audio.read_wav(str(tmp_path / "pcm24.wav"))
    assert rate == 8000 and clip.tolist() == [0.0, 0.5, -1.0]


def test_read_wav_averages_stereo_to_mono(tmp_path):
    left = np.array([0.5, -1.0, 0.25], np.float32)
    right = np.array([0.0, 1.0, 0.75], np.float32)
    wavfile.write(tmp_path / "stereo.wav", 16000, np.stack([left, right], axis=1))
    clip, _ = audio.read_wav(str(tmp_path / "stereo.wav"))
    assert clip.tolist() == [0.25, 0.0, 0.5]


def _folder(root, rate_of=lambda i: 16000) -> dict[str, dict[str, tuple[np.ndarray, int]]]:
    """``root/<class>/<file>.wav``, classes created out of order, formats mixed: int16 mono,
    float32 stereo; each file a distinct length so a test can find it after the split."""
    clips, _ = tones(20, seed=1, rate=16000)
    written: dict[str, dict[str, tuple[np.ndarray, int]]] = {}
    for cls, offset in (("zebra", 0), ("aardvark", 10)):
        os.makedirs(root / cls)
        for i in range(10):
            clip = clips[offset + i][: 200 + offset + i]
            name = f"{i:02d}.wav"
            rate = rate_of(offset + i)
            if i % 2:
                data = np.stack([clip, clip * 0.5], axis=1)  # stereo float32
            else:
                data = np.round(clip * 32767).astype(np.int16)
            wavfile.write(root / cls / name, rate, data)
            written.setdefault(cls, {})[name] = (data, rate)
    (root / "zebra" / "notes.txt").write_text("not audio")
    return written


def test_folder_round_trip_sorts_classes_and_resamples(tmp_path):
    # Every third file at 8 kHz: read at 16 kHz, it is resampled to twice its samples.
    written = _folder(tmp_path, rate_of=lambda i: 8000 if i % 3 == 0 else 16000)
    data = audio.from_folder(str(tmp_path), sampling_rate=16000)
    assert data.label_names == ["aardvark", "zebra"] and data.sampling_rate == 16000
    assert sum(data.sizes().values()) == 20 and min(data.sizes().values()) >= 2
    by_length = {len(c): c for c in all_clips(data)}
    labels = np.concatenate([getattr(data, s)[1] for s in ("train", "validation", "test")])
    assert sorted(np.bincount(labels).tolist()) == [10, 10]
    for cls, files in written.items():
        for name, (samples, rate) in files.items():
            expected = len(samples) * 16000 // rate
            clip = by_length[expected]
            if rate == 16000:
                mono = samples.mean(axis=1) if samples.ndim == 2 else samples / 32768
                np.testing.assert_allclose(clip, mono, atol=TOL, err_msg=f"{cls}/{name}")
            else:  # resampled: the tone stays at its frequency
                original = samples / 32768 if samples.ndim == 1 else samples.mean(axis=1)
                assert abs(peak_hz(clip, 16000) - peak_hz(original, rate)) < 50, name


def test_folder_of_mixed_rates_defaults_to_the_highest(tmp_path):
    _folder(tmp_path, rate_of=lambda i: 8000 if i < 5 else 16000)
    data = audio.from_folder(str(tmp_path))
    assert data.sampling_rate == 16000
    # zebra/00-04 (200-204 samples at 8 kHz) are upsampled to twice their samples.
    lengths = sorted(len(c) for c in all_clips(data))
    assert lengths == [*range(205, 220), *(2 * n for n in range(200, 205))]


def test_corrupt_and_truncated_files_are_named_or_skipped(tmp_path):
    _folder(tmp_path)
    bad = tmp_path / "zebra" / "99.wav"
    bad.write_bytes(b"this is not a RIFF file at all")
    with pytest.raises(ValueError, match=r"99\.wav.*skip_corrupt=True"):
        audio.from_folder(str(tmp_path))
    data = audio.from_folder(str(tmp_path), skip_corrupt=True)
    assert data.skipped == [str(bad)] and "1 corrupt skipped" in data.name
    assert sum(data.sizes().values()) == 20
    bad.unlink()
    whole = (tmp_path / "zebra" / "00.wav").read_bytes()
    (tmp_path / "zebra" / "00.wav").write_bytes(whole[: len(whole) - 100])
    with pytest.raises(ValueError, match=r"00\.wav.*truncated"):
        audio.from_folder(str(tmp_path))


@pytest.mark.parametrize(
    "layout, error, message",
    [
        (None, FileNotFoundError, "Audio folder not found"),
        ({}, ValueError, "no class subfolders"),
        ({"dog": ["bark.mp3"]}, ValueError, r"dog' holds no WAV files.*ffmpeg"),
    ],
)
def test_folder_errors_say_what_to_do(tmp_path, layout, error, message):
    root = tmp_path / "data"
    if layout is not None:
        root.mkdir()
        for cls, files in layout.items():
            (root / cls).mkdir()
            for f in files:
                (root / cls / f).write_bytes(b"x")
    with pytest.raises(error, match=message):
        audio.from_folder(str(root))


# ---- arrays ---------------------------------------------------------------------------------


def test_from_arrays_splits_80_10_10_and_keeps_each_clip():
    clips, labels = tones(40)
    data = audio.from_arrays(clips, labels, sampling_rate=RATE, label_names=["low", "high"])
    assert data.sizes() == {"train": 32, "validation": 4, "test": 4}
    assert data.label_names == ["low", "high"] and data.sampling_rate == RATE
    train, val, test = jaxtl.data.sources.split_indices(40, 0)
    for split, index in zip(("train", "validation", "test"), (train, val, test), strict=True):
        got, got_labels = getattr(data, split)
        assert got_labels.tolist() == labels[index].tolist()
        assert all(np.array_equal(g, clips[i]) for g, i in zip(got, index, strict=True))
    same = audio.from_arrays(np.stack([c[:300] for c in clips]), labels, sampling_rate=RATE)
    assert same.sizes() == data.sizes() and len(same.train[0][0]) == 300


def test_integer_arrays_are_scaled_like_pcm():
    data = audio.from_arrays(
        [np.array([16384, -32768], np.int16)] * 10, [0, 1] * 5, sampling_rate=16000
    )
    assert data.train[0][0].tolist() == [0.5, -1.0]


@pytest.mark.parametrize(
    "clips, labels, kwargs, message",
    [
        ([np.zeros((300, 2))] * 10, [0] * 10, {}, r"clip 0 has shape \(300, 2\).*mean\(axis=-1\)"),
        ([np.zeros(3)] + [np.zeros((2, 300))] * 9, [0] * 10, {},
         r"clip 1 has shape \(2, 300\).*mean\(axis=0\)"),
        ([np.zeros(3)] * 9 + [np.zeros(0)], [0] * 10, {}, "clip 9 is empty"),
        ([np.zeros(3)] * 4 + [np.array([0, np.nan])] + [np.zeros(3)] * 5, [0] * 10, {},
         "clip 4 holds nan at sample 1"),
        ([np.zeros(3)] * 10, [0] * 9, {}, "10 clips but 9 labels"),
        ([np.zeros(3)] * 10, [0] * 9 + [3], {"num_labels": 2},
         r"must be in \[0, 2\).*example 9 holds 3"),
        ([np.zeros(3)] * 10, [0] * 10, {"sampling_rate": 0}, "sampling_rate must be"),
        ([np.zeros(3)] * 10, [0] * 10, {"max_seconds": -1}, "max_seconds must be"),
        ([np.zeros(3)] * 5, [0] * 5, {}, "too few to split"),
        (np.zeros((4, 3, 2)), [0] * 4, {}, r"shape \(4, 3, 2\).*mean\(axis=-1\)"),
    ],
)  # fmt: skip
def test_bad_arrays_name_the_clip_and_the_fix(clips, labels, kwargs, message):
    kwargs = {"sampling_rate": 16000, **kwargs}
    with pytest.raises(ValueError, match=message):
        audio.from_arrays(clips, labels, **kwargs)


# ---- encode against transformers' feature extractor -----------------------------------------


def _splits(clips, labels, rate=16000, max_seconds=None) -> audio.AudioSplits:
    return audio.AudioSplits(
        train=(clips[:6], labels[:6]),
        validation=(clips[6:8], labels[6:8]),
        test=(clips[8:], labels[8:]),
        sampling_rate=rate,
        max_seconds=max_seconds,
    )


def _joined(arrays: dict, key: str) -> np.ndarray:
    return np.concatenate([arrays[s][key] for s in ("train", "validation", "test")])


def test_encode_equals_the_feature_extractor_with_attention_mask():
    clips, labels = tones(10, seed=3, rate=16000)
    arrays, facts = audio.encode(preprocessing(), _splits(clips, labels))
    theirs = extractor()(clips, sampling_rate=16000, padding=True, return_tensors="np")
    assert theirs["input_values"].shape == _joined(arrays, "input_values").shape
    np.testing.assert_allclose(_joined(arrays, "input_values"), theirs["input_values"], atol=TOL)
    np.testing.assert_array_equal(_joined(arrays, "attention_mask"), theirs["attention_mask"])
    assert arrays["train"]["input_values"].dtype == np.float32
    assert arrays["train"]["attention_mask"].dtype == np.int32
    assert _joined(arrays, "label").tolist() == labels.tolist()
    longest = max(map(len, clips))
    assert facts == {
        "sizes": {"train": 6, "validation": 2, "test": 2},
        "length": longest,
        "seconds": round(longest / 16000, 3),
        "truncated": 0,
        "sampling_rate": 16000,
        "attention_mask": True,
    }


def test_encode_without_mask_normalizes_each_clip_alone_then_pads_zeros():
    """A model pretrained without a mask (feat_extract_norm="group") is fed no mask: each clip
    is what the feature extractor gives for that clip alone, zero-padded."""
    clips, labels = tones(10, seed=4, rate=16000)
    ours, facts = audio.encode(preprocessing(return_attention_mask=False), _splits(clips, labels))
    assert "attention_mask" not in ours["train"] and facts["attention_mask"] is False
    fe = extractor(return_attention_mask=False)
    values = _joined(ours, "input_values")
    for i, clip in enumerate(clips):
        alone = fe(clip, sampling_rate=16000, return_tensors="np")["input_values"][0]
        np.testing.assert_allclose(values[i, : len(clip)], alone, atol=TOL)
        assert not values[i, len(clip) :].any()


def test_encode_without_normalization_pads_the_raw_clips():
    clips, labels = tones(10, seed=5, rate=16000)
    arrays, _ = audio.encode(preprocessing(do_normalize=False), _splits(clips, labels))
    theirs = extractor(do_normalize=False)(
        clips, sampling_rate=16000, padding=True, return_tensors="np"
    )
    np.testing.assert_allclose(_joined(arrays, "input_values"), theirs["input_values"], atol=TOL)


def test_max_seconds_cuts_and_counts_as_truncation_does():
    clips, labels = tones(10, seed=6, rate=16000)
    limit = 350  # samples: max_seconds * 16000
    data = _splits(clips, labels, max_seconds=limit / 16000)
    arrays, facts = audio.encode(preprocessing(), data)
    theirs = extractor()(
        clips, sampling_rate=16000, padding="longest", max_length=limit, truncation=True,
        return_tensors="np",
    )  # fmt: skip
    assert facts["length"] == limit and facts["truncated"] == sum(len(c) > limit for c in clips)
    assert facts["truncated"] > 0
    np.testing.assert_allclose(_joined(arrays, "input_values"), theirs["input_values"], atol=TOL)
    np.testing.assert_array_equal(_joined(arrays, "attention_mask"), theirs["attention_mask"])


def test_encode_resamples_to_the_model_rate():
    clips, labels = tones(10, seed=7, rate=8000)
    arrays, facts = audio.encode(preprocessing(), _splits(clips, labels, rate=8000))
    assert facts["resampled_from"] == 8000 and facts["sampling_rate"] == 16000
    mask = _joined(arrays, "attention_mask")
    assert mask.sum(axis=1).tolist() == [2 * len(c) for c in clips]
    first = _joined(arrays, "input_values")[0, : 2 * len(clips[0])]
    assert abs(peak_hz(first, 16000) - peak_hz(clips[0], 8000)) < 30


@pytest.mark.parametrize(
    "extras, data_change, message",
    [
        ({}, {}, "reads no audio"),
        (preprocessing(), {"test": ([], np.zeros(0, np.int32))}, "test split .* is empty"),
        (preprocessing(), {"validation": ([np.zeros(20, np.float32)] * 2, np.zeros(2, int))},
         r"clip 0 has 20 samples at 16000 Hz, fewer than one frame of the model \(32 samples"),
    ],
)  # fmt: skip
def test_encode_errors_say_what_to_do(extras, data_change, message):
    clips, labels = tones(10, rate=16000)
    data = _splits(clips, labels)
    for key, value in data_change.items():
        setattr(data, key, value)
    with pytest.raises(ValueError, match=message):
        audio.encode(extras, data)


# ---- the checkpoint's feature extractor, and fine-tuning ------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random wav2vec2 classifier (layer-norm feature extractor, pre-norm blocks) and
    its feature extractor at 8 kHz with an attention mask, saved by transformers."""
    torch.manual_seed(0)
    config = tiny_wav2vec2_config(stable=True, num_labels=2)
    directory = tmp_path_factory.mktemp("wav2vec2-audio")
    transformers.Wav2Vec2ForSequenceClassification(config).save_pretrained(directory)
    extractor(sampling_rate=RATE).save_pretrained(directory)
    return directory


def test_load_reads_the_preprocessor_config(checkpoint, tmp_path):
    model = jaxtl.load(checkpoint, task="features")
    prep = model.extras["audio_preprocessing"]
    assert prep["sampling_rate"] == RATE and prep["return_attention_mask"] is True
    assert prep["do_normalize"] is True and prep["source"].endswith("preprocessor_config.json")
    # Without the file: the published checkpoints' values, a mask only for "layer" models.
    for norm, masked in (("group", False), ("layer", True)):
        defaults = wav2vec2.audio_preprocessing(str(tmp_path), wav2vec2.Wav2Vec2Config(
            feat_extract_norm=norm))  # fmt: skip
        assert defaults["return_attention_mask"] is masked and defaults["sampling_rate"] == 16000
    raw = {"feature_extractor_type": "SeamlessM4TFeatureExtractor", "feature_size": 80}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="SeamlessM4TFeatureExtractor.*raw waveforms"):
        wav2vec2.audio_preprocessing(str(tmp_path), wav2vec2.Wav2Vec2Config())
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"do_normalize": "yes"}))
    with pytest.raises(ValueError, match="do_normalize='yes' must be bool"):
        wav2vec2.audio_preprocessing(str(tmp_path), wav2vec2.Wav2Vec2Config())


def test_finetune_on_tones_beats_chance(checkpoint, tmp_path):
    clips, labels = tones(100, seed=8)
    data = audio.from_arrays(clips, labels, sampling_rate=RATE, label_names=["low", "high"])
    model = jaxtl.load(checkpoint, num_labels=2)
    config = jaxtl.TrainConfig(
        batch_size=16, max_steps=24, learning_rate=3e-3, progress=False, eval_every=12, log_every=4
    )
    result = jaxtl.finetune(model, "full", data, config, str(tmp_path / "run"), verbose=False)
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        losses = [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]
    print(f"tones: train loss {losses[0]:.3f} -> {losses[-1]:.3f}, test {result.test}")
    assert losses[-1] < losses[0] - 0.2
    assert result.test["accuracy"] >= 0.9  # chance is 0.5 on 10 test clips
    with open(tmp_path / "run" / "run.json") as f:
        facts = json.load(f)["data_facts"]
    assert facts["sampling_rate"] == RATE and facts["attention_mask"] is True


def test_the_command_line_fine_tunes_on_a_wav_folder_and_evaluates_it_again(
    checkpoint, tmp_path, capsys
):
    """--data DIR of <class>/<clip>.wav for an audio model, length buckets on (the samples
    are cut with their mask), and jaxtl evaluate rebuilding the data from run.json."""
    from jaxtl import cli

    clips, labels = tones(60, seed=3)
    for i, (clip, label) in enumerate(zip(clips, labels, strict=True)):
        folder = tmp_path / "wavs" / ("high" if label else "low")
        folder.mkdir(parents=True, exist_ok=True)
        wavfile.write(folder / f"{i}.wav", RATE, (clip * 20000).astype(np.int16))
    out = str(tmp_path / "out")
    argv = ["finetune", "--model", str(checkpoint), "--data", str(tmp_path / "wavs"),
            "--recipe", "full", "--no-scratch", "--max-steps", "12", "--batch-size", "8",
            "--lr", "3e-3", "--bucket-by-length", "--out", out]  # fmt: skip
    assert cli.main(argv) == 0
    run = f"{out}/pretrained-full"
    with open(f"{run}/run.json") as f:
        info = json.load(f)
    assert info["data"]["kind"] == "audio_folder" and info["label_names"] == ["high", "low"]
    with open(f"{run}/results.json") as f:
        accuracy = json.load(f)["test"]["accuracy"]
    capsys.readouterr()
    assert cli.main(["evaluate", run]) == 0
    assert f"{accuracy:.4f}" in capsys.readouterr().out


def test_export_keeps_the_feature_extractor_config(checkpoint, tmp_path):
    model = jaxtl.load(checkpoint, num_labels=2)
    out = jaxtl.export(model, tmp_path / "export")
    again = jaxtl.load(out, num_labels=2)
    assert again.extras["audio_preprocessing"]["sampling_rate"] == RATE  # not the 16 kHz default
    assert transformers.Wav2Vec2FeatureExtractor.from_pretrained(out).sampling_rate == RATE
