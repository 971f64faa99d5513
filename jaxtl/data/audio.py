"""Labeled audio sources: waveforms from NumPy arrays or a folder of WAV files.

A source returns :class:`AudioSplits`: train / validation / test mono waveforms (1-D float32
arrays of any length) at one ``sampling_rate``, with integer labels. :func:`encode` turns them
into an audio model's inputs (``input_values`` and, where the checkpoint's feature extractor
returns one, ``attention_mask``) as transformers' ``Wav2Vec2FeatureExtractor`` prepares them,
reading what it does from the model's ``extras["audio_preprocessing"]``
(:func:`jaxtl.models.wav2vec2.audio_preprocessing`).

WAV files are read with ``scipy.io.wavfile`` (PCM 8/16/24/32/64-bit and 32/64-bit float);
no embedded audio task ships with jaxtl, because no installed package carries labeled audio.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxtl.data.images import stratified_split
from jaxtl.data.labels import labels_for_head
from jaxtl.data.sources import SPLITS, check_split_sizes, split_indices

AUDIO_EXTENSIONS = (".wav",)
# Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm's epsilon (added to the variance).
NORM_EPS = 1e-7


@dataclasses.dataclass
class AudioSplits:
    """Mono waveforms and labels per split; ``label_names[i]`` names label ``i``.

    ``max_seconds`` caps the clips :func:`encode` feeds the model: a longer clip is cut to its
    first ``max_seconds`` (and counted); ``None`` keeps every clip whole.
    """

    train: tuple[list[np.ndarray], np.ndarray]
    validation: tuple[list[np.ndarray], np.ndarray]
    test: tuple[list[np.ndarray], np.ndarray]
    sampling_rate: int
    label_names: list[str] | None = None
    name: str = "audio"
    max_seconds: float | None = None
    skipped: list[str] = dataclasses.field(default_factory=list)  # corrupt files left out

    def sizes(self) -> dict[str, int]:
        return {s: len(getattr(self, s)[1]) for s in SPLITS}


def from_arrays(
    waveforms: Any,
    labels: Any,
    *,
    sampling_rate: int,
    label_names: Sequence[str] | None = None,
    num_labels: int | None = None,
    task: str = "classification",
    seed: int = 0,
    max_seconds: float | None = None,
    name: str = "audio",
) -> AudioSplits:
    """Waveforms with their labels, split 80/10/10 by ``seed``
    (:func:`~jaxtl.data.sources.split_indices`).

    Args:
      waveforms: a list of 1-D arrays (one mono clip each, any lengths), or one 2-D array
        ``[N, samples]`` of equal-length clips. Floats are read as they are (usually in
        [-1, 1]); integer PCM is scaled by its type's range as a WAV file's is
        (:func:`pcm_to_float`).
      labels: one per clip: integer class ids or class-name strings (mapped to ids in sorted
        order); finite numbers for ``task="regression"``.
      sampling_rate: the clips' rate in Hz; :func:`encode` resamples them to the model's.
      label_names: names of class ids ``0, 1, ...``.
      num_labels: the head's width; class ids must lie in ``[0, num_labels)`` (default:
        inferred).
      task: ``"classification"`` or ``"regression"``.
      seed: the split's permutation.
      max_seconds: see :class:`AudioSplits`.
      name: the dataset's name in reports.

    Raises:
      ValueError: a clip that is not 1-D (stereo: average its channels first), empty, not
        numbers, or holding NaN or inf; waveforms and labels of different lengths; labels that
        are not one class id per clip or lie outside ``[0, num_labels)``; too few clips to
        split; a sampling rate or ``max_seconds`` that is not positive. Each names the first
        bad clip.

    Example:
      >>> clips = [np.zeros(100 + i, np.float32) for i in range(20)]
      >>> data = from_arrays(clips, [0, 1] * 10, sampling_rate=16000)
      >>> data.sizes(), data.train[0][0].dtype
      ({'train': 16, 'validation': 2, 'test': 2}, dtype('float32'))
    """
    _check_rate(sampling_rate, "sampling_rate")
    _check_max_seconds(max_seconds)
    if isinstance(waveforms, np.ndarray) and waveforms.dtype != object:
        if waveforms.ndim != 2:
            raise ValueError(
                f"{name}: waveforms of shape {waveforms.shape}; pass one array [N, samples] of "
                "equal-length mono clips, or a list of 1-D clips (stereo [N, samples, 2]: "
                "average the channels, waveforms.mean(axis=-1))."
            )
        waveforms = list(waveforms)
    clips = [_checked_clip(x, i, name) for i, x in enumerate(waveforms)]
    if len(clips) == 0:
        raise ValueError(f"The dataset {name!r} is empty: there is nothing to train on.")
    if labels is None or len(labels) != len(clips):
        count = "no" if labels is None else len(labels)
        raise ValueError(f"{name}: {len(clips)} clips but {count} labels; pass one per clip.")
    if task not in ("classification", "regression"):
        raise ValueError(f"task must be 'classification' or 'regression' for audio, got {task!r}.")
    labels, label_names = labels_for_head(
        labels,
        task,
        num_labels,
        f"of {name!r}",
        label_names=label_names,
        fix_shape="pass one class id per clip (e.g. one_hot.argmax(-1))",
        fix_type="pass integer class ids or class-name strings",
    )
    check_split_sizes(len(clips), name, "clips")
    parts = split_indices(len(clips), seed)
    return AudioSplits(
        *((([clips[i] for i in part]), labels[part]) for part in parts),
        sampling_rate=int(sampling_rate),
        label_names=label_names,
        name=name,
        max_seconds=max_seconds,
    )


def _checked_clip(x: Any, i: int, name: str) -> np.ndarray:
    """Clip ``i`` as 1-D float32, or an error naming it and the fix."""
    clip = np.asarray(x)
    if clip.dtype.kind not in "uif":
        raise ValueError(f"{name}: clip {i} holds {clip.dtype}, not numbers; pass waveforms.")
    if clip.ndim != 1:
        fix = "pass each clip as a 1-D array of samples"
        if clip.ndim == 2 and clip.shape[1] <= 8:
            fix = "it looks like [samples, channels]: average them to mono (clip.mean(axis=-1))"
        elif clip.ndim == 2 and clip.shape[0] <= 8:
            fix = "it looks like [channels, samples]: average them to mono (clip.mean(axis=0))"
        raise ValueError(f"{name}: clip {i} has shape {clip.shape}, not [samples]; {fix}.")
    if clip.size == 0:
        raise ValueError(f"{name}: clip {i} is empty (0 samples); drop it.")
    clip = pcm_to_float(clip)
    if not np.isfinite(clip).all():
        where = int(np.flatnonzero(~np.isfinite(clip))[0])
        raise ValueError(
            f"{name}: clip {i} holds {clip[where]} at sample {where}; waveforms must be finite "
            "(fix or drop that clip)."
        )
    return clip


def pcm_to_float(samples: np.ndarray) -> np.ndarray:
    """Samples as float32, integer PCM scaled to [-1, 1): signed ``intN`` divided by
    ``2**(N-1)`` (scipy reads 24-bit PCM as int32 with the samples in the top bytes, so it
    scales the same), unsigned 8-bit (WAV's) centered at 128 first; floats unchanged.

    Example:
      >>> pcm_to_float(np.array([-32768, 0, 16384], np.int16)).tolist()
      [-1.0, 0.0, 0.5]
      >>> pcm_to_float(np.array([0, 128, 192], np.uint8)).tolist()
      [-1.0, 0.0, 0.5]
    """
    samples = np.asarray(samples)
    if samples.dtype == np.uint8:
        return ((samples.astype(np.float32) - 128.0) / 128.0).astype(np.float32)
    if samples.dtype.kind == "i":
        scale = float(2 ** (8 * samples.dtype.itemsize - 1))
        return (samples.astype(np.float64) / scale).astype(np.float32)
    if samples.dtype.kind == "u":
        half = float(2 ** (8 * samples.dtype.itemsize - 1))
        return ((samples.astype(np.float64) - half) / half).astype(np.float32)
    return samples.astype(np.float32)


def read_wav(path: str) -> tuple[np.ndarray, int]:
    """A WAV file as a mono float32 waveform and its sampling rate.

    Integer PCM is scaled to [-1, 1) (:func:`pcm_to_float`), float WAVs are kept as they are,
    and the channels of a multi-channel file are averaged.

    Raises:
      ValueError: a file scipy cannot read as WAV (another format, corrupt or truncated),
        or one with no samples; the message names the file.
    """
    from scipy.io import wavfile

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", wavfile.WavFileWarning)
        try:
            rate, data = wavfile.read(path)
        except (ValueError, EOFError, OSError) as e:
            raise ValueError(f"Cannot read {path!r} as a WAV file ({e}).") from e
    for w in caught:
        # A data chunk shorter than its header says is a cut-off file. Other WavFileWarnings
        # are chunks scipy does not know (metadata), which it skips: harmless.
        if issubclass(w.category, wavfile.WavFileWarning) and "EOF" in str(w.message):
            raise ValueError(f"Cannot read {path!r} as a WAV file: it is truncated ({w.message}).")
        if not issubclass(w.category, wavfile.WavFileWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    samples = pcm_to_float(data)
    if samples.ndim == 2:
        samples = samples.mean(axis=1, dtype=np.float64).astype(np.float32)
    if samples.size == 0:
        raise ValueError(f"{path!r} holds no samples.")
    return samples, int(rate)


def resample(waveform: np.ndarray, rate: int, target: int) -> np.ndarray:
    """``waveform`` at ``rate`` Hz resampled to ``target`` Hz with ``scipy.signal.resample_poly``
    (a polyphase filter, up by ``target / g`` and down by ``rate / g``, ``g`` their gcd):
    ``ceil(len * target / rate)`` float32 samples.

    Example:
      >>> resample(np.zeros(100, np.float32), 8000, 16000).shape
      (200,)
    """
    if rate == target:
        return waveform
    from scipy.signal import resample_poly

    g = math.gcd(int(rate), int(target))
    return resample_poly(waveform, target // g, rate // g).astype(np.float32)


def from_folder(
    path: str,
    *,
    seed: int = 0,
    fractions: tuple[float, float] = (0.8, 0.1),
    sampling_rate: int | None = None,
    max_seconds: float | None = None,
    skip_corrupt: bool = False,
) -> AudioSplits:
    """A folder of WAV files with one subfolder per class, split stratified 80/10/10 by
    ``seed`` (as :func:`jaxtl.data.images.from_folder` splits images).

    Class ids follow the sorted subfolder names. Each file is read as a mono float32 waveform
    (:func:`read_wav`: integer PCM scaled to [-1, 1), channels averaged). Files at another rate
    than ``sampling_rate`` are resampled to it (:func:`resample`); by default it is the files'
    own rate, or the highest of their rates when they differ (no file loses bandwidth here;
    :func:`encode` then resamples once more to the model's rate, so passing the model's rate,
    16000 for the published wav2vec2 checkpoints, resamples each file once).

    Args:
      skip_corrupt: skip files that do not read as WAV, and count them in ``name``; otherwise
        the first one is an error that names it.
      max_seconds: see :class:`AudioSplits`.

    Raises:
      FileNotFoundError: ``path`` is not a directory.
      ValueError: no class subfolders, a class without WAV files, or a corrupt file.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"Audio folder not found: {path!r}. Pass a directory with one subfolder per class."
        )
    if sampling_rate is not None:
        _check_rate(sampling_rate, "sampling_rate")
    _check_max_seconds(max_seconds)
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if not classes:
        raise ValueError(
            f"{path!r} has no class subfolders: put the WAV files of each class in "
            "PATH/<class name>/."
        )
    clips, rates, labels, skipped = [], [], [], []
    for label, name in enumerate(classes):
        folder = os.path.join(path, name)
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(AUDIO_EXTENSIONS))
        if not files:
            raise ValueError(
                f"Class folder {folder!r} holds no WAV files (*.wav); jaxtl reads WAV only: "
                "convert other formats first (e.g. ffmpeg -i clip.mp3 clip.wav)."
            )
        for f in files:
            file = os.path.join(folder, f)
            try:
                clip, rate = read_wav(file)
            except ValueError as e:
                if not skip_corrupt:
                    raise ValueError(
                        f"{e} Remove it, or skip corrupt files (skip_corrupt=True / "
                        "--skip-corrupt) and count them."
                    ) from e
                skipped.append(file)
                continue
            clips.append(clip)
            rates.append(rate)
            labels.append(label)
    if not clips:
        raise ValueError(f"{path!r}: every file is corrupt ({len(skipped)} skipped).")
    target = sampling_rate or max(rates)
    clips = [resample(c, r, target) for c, r in zip(clips, rates, strict=True)]
    labels = np.asarray(labels, np.int32)
    parts = stratified_split(labels, seed, fractions)
    note = f", {len(skipped)} corrupt skipped" if skipped else ""
    return AudioSplits(
        *(([clips[i] for i in part], labels[part]) for part in parts),
        sampling_rate=int(target),
        label_names=classes,
        name=f"{os.path.basename(os.path.normpath(path))} ({len(labels)} clips{note})",
        max_seconds=max_seconds,
        skipped=skipped,
    )


def encode(
    extras: Mapping[str, Any], data: AudioSplits
) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
    """Every split as the model's inputs, ``{split: {"input_values", ["attention_mask"],
    "label"}}``, and facts to log.

    ``extras`` is the model's (``model.extras``); its ``"audio_preprocessing"`` says what the
    checkpoint's feature extractor does. Each clip is resampled to the model's rate when
    ``data`` is at another (:func:`resample`), cut to ``data.max_seconds``, normalized when
    ``do_normalize`` (zero mean and unit variance over its own samples, epsilon
    :data:`NORM_EPS`, as ``Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm``), and padded with
    ``padding_value`` to the longest clip of all splits (one length, so the model compiles once
    for training and once for evaluation): float32 ``input_values [N, T]``.

    ``attention_mask`` (int32 ``[N, T]``, 1 on real samples) is returned only when the feature
    extractor returns one (``return_attention_mask``), as transformers feeds models:
    ``feat_extract_norm="group"`` checkpoints (wav2vec2-base) were pretrained on zero-padded
    input without a mask, so they read none, and their head averages over every frame.

    This equals transformers' ``Wav2Vec2FeatureExtractor(...)(clips, padding=True,
    return_attention_mask=True)``. Without the mask, transformers' batched call would compute
    each clip's mean and variance over its padding too, so a clip's input would change with the
    length of the longest clip beside it; here each clip is normalized alone, as the feature
    extractor does for one unpadded clip, and then padded (zeros, as its documentation says
    such models should be fed).

    Returns:
      ``(arrays, facts)``: facts hold ``sizes``, ``length`` (padded samples), ``seconds``,
      ``truncated`` (clips cut to ``max_seconds``), ``sampling_rate``, ``attention_mask``
      (whether it is fed) and, when resampled, ``resampled_from``.

    Raises:
      ValueError: a model without audio preprocessing, an empty split, waveforms and labels of
        different counts, or a clip shorter than one frame of the model (its receptive field);
        each says what to do.
    """
    prep = extras.get("audio_preprocessing")
    if prep is None:
        raise ValueError(
            f"{data.name!r} is audio, but the model reads no audio (its extras have no "
            "'audio_preprocessing'); load an audio model such as wav2vec2."
        )
    rate = int(prep["sampling_rate"])
    field = int(extras.get("receptive_field", 1))
    limit = None if data.max_seconds is None else max(1, int(round(data.max_seconds * rate)))
    clips, truncated = {}, 0
    for split in SPLITS:
        waveforms, labels = getattr(data, split)
        if len(labels) == 0:
            raise ValueError(
                f"The {split} split of {data.name!r} is empty (sizes {data.sizes()}); every "
                "split needs examples: add clips."
            )
        if len(waveforms) != len(labels):
            raise ValueError(
                f"The {split} split has {len(waveforms)} clips but {len(labels)} labels."
            )
        out = []
        for i, clip in enumerate(waveforms):
            clip = resample(np.asarray(clip, np.float32), data.sampling_rate, rate)
            if limit is not None and len(clip) > limit:
                clip, truncated = clip[:limit], truncated + 1
            if len(clip) < field:
                raise ValueError(
                    f"The {split} split of {data.name!r}: clip {i} has {len(clip)} samples at "
                    f"{rate} Hz, fewer than one frame of the model ({field} samples, "
                    f"{1000 * field / rate:g} ms); drop it, or pad it with silence."
                )
            out.append(normalized(clip) if prep["do_normalize"] else clip)
        clips[split] = out
    length = max(len(c) for split in SPLITS for c in clips[split])
    masked = bool(prep["return_attention_mask"])
    arrays = {}
    for split in SPLITS:
        values, mask = padded(clips[split], length, float(prep["padding_value"]))
        arrays[split] = {"input_values": values}
        if masked:
            arrays[split]["attention_mask"] = mask
        arrays[split]["label"] = np.asarray(getattr(data, split)[1])
    facts = {
        "sizes": data.sizes(),
        "length": int(length),
        "seconds": round(length / rate, 3),
        "truncated": truncated,
        "sampling_rate": rate,
        "attention_mask": masked,
    }
    if data.sampling_rate != rate:
        facts["resampled_from"] = data.sampling_rate
    return arrays, facts


def normalized(clip: np.ndarray) -> np.ndarray:
    """``(clip - mean) / sqrt(var + 1e-7)`` over the clip's samples, float32, as
    ``Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm`` (in float32, as it computes).

    Example:
      >>> normalized(np.array([1.0, 3.0], np.float32)).round(4).tolist()
      [-1.0, 1.0]
    """
    clip = np.asarray(clip, np.float32)
    return ((clip - clip.mean()) / np.sqrt(clip.var() + NORM_EPS)).astype(np.float32)


def padded(
    clips: Sequence[np.ndarray], length: int, value: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Clips padded at the end to ``length``: float32 ``[N, length]`` values and the int32
    mask, 1 on each clip's samples."""
    values = np.full((len(clips), length), value, np.float32)
    mask = np.zeros((len(clips), length), np.int32)
    for i, clip in enumerate(clips):
        values[i, : len(clip)] = clip
        mask[i, : len(clip)] = 1
    return values, mask


def _check_rate(rate: Any, name: str) -> None:
    if isinstance(rate, bool) or not isinstance(rate, int | np.integer) or rate < 1:
        raise ValueError(f"{name} must be a whole number of Hz >= 1, got {rate!r}.")


def _check_max_seconds(max_seconds: Any) -> None:
    if max_seconds is not None and (
        isinstance(max_seconds, bool)
        or not isinstance(max_seconds, int | float)
        or not max_seconds > 0
        or not math.isfinite(max_seconds)
    ):
        raise ValueError(f"max_seconds must be a positive number of seconds, got {max_seconds!r}.")
