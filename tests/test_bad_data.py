"""Bad data input stops before anything compiles, with an error that names the problem, where it
is (file and line, or example) and the fix in the user's terms (argument and flag)."""

import json

import numpy as np
import pytest

from jaxtl.data import from_arrays, from_table, images
from jaxtl.models.preprocessing import ImagePreprocessing

GOOD_CSV = "text,label\n" + "".join(f"word{i},{i % 2}\n" for i in range(20))  # lines 2-21
GOOD_JSONL = "".join(json.dumps({"text": f"word{i}", "label": i % 2}) + "\n" for i in range(20))


def _write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --- 1. CSV structure ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, message",
    [
        # Without a strict reader the open quote swallowed every later row into one field.
        ('"broken,0\n', r"bad\.csv, line 22: a quoted field that starts here .*through line 42"),
        ("word,1,extra\n", r"bad\.csv, line 22: 3 field\(s\), but the header \(line 1\) has 2"),
        ("word\n", r"bad\.csv, line 22: 1 field\(s\), but the header \(line 1\) has 2"),
    ],
)
def test_csv_rows_that_do_not_parse_name_their_line(tmp_path, bad, message):
    path = _write(tmp_path, "bad.csv", GOOD_CSV + bad + GOOD_CSV.split("\n", 1)[1])
    with pytest.raises(ValueError, match=message + r".*write a quote inside a quoted field"):
        from_table(path)


def test_csv_quoted_fields_may_span_lines_and_later_lines_are_counted(tmp_path):
    multiline = '"a text\non two lines",1\n'  # lines 22-23
    data = from_table(_write(tmp_path, "ok.csv", GOOD_CSV + multiline))
    assert "a text\non two lines" in sum((data.train[0], data.validation[0], data.test[0]), [])
    path = _write(tmp_path, "late.csv", GOOD_CSV + multiline + "word,7\n")  # line 24
    with pytest.raises(ValueError, match=r"found \[7\] \(line 24 holds 7\).*--num-labels 8"):
        from_table(path, num_labels=2)


# --- 2. duplicate columns ---------------------------------------------------------------------


def test_csv_column_named_twice_is_refused(tmp_path):
    path = _write(tmp_path, "dup.csv", "text,label,label\n" + "w,0,1\n" * 20)
    with pytest.raises(
        ValueError,
        match=r"dup\.csv, line 1: the header names column 'label' 2 times "
        r"\(columns \[2, 3\]\).*Rename",
    ):
        from_table(path)


# --- 3. JSONL records ---------------------------------------------------------------------------


_ONE_OBJECT = r".*Each line must hold one JSON object"


@pytest.mark.parametrize(
    "lines, message",
    [
        (GOOD_JSONL + "{oops\n", r"line 21: not valid JSON \(.*at column 2\)" + _ONE_OBJECT),
        (
            GOOD_JSONL + "[0, 1]\n",
            r"line 21: a JSON array \(\[0, 1\]\), not an object" + _ONE_OBJECT,
        ),
        (
            GOOD_JSONL + '"word"\n',
            r"line 21: a JSON string \(\"word\"\), not an object" + _ONE_OBJECT,
        ),
        (
            json.dumps([{"text": "w", "label": 0}] * 20),  # a .json file, not JSON Lines
            r"line 1: a JSON array" + _ONE_OBJECT + r".*looks like one JSON array: write one "
            "object per line",
        ),
    ],
)
def test_jsonl_lines_that_are_not_objects_name_their_line(tmp_path, lines, message):
    path = _write(tmp_path, "bad.jsonl", lines)
    with pytest.raises(ValueError, match=r"bad\.jsonl, " + message):
        from_table(path)


# --- 4. texts that are not strings ------------------------------------------------------------


@pytest.mark.parametrize("text, shown", [(None, "null"), (5, "5"), (["a", "b"], r'\["a", "b"\]')])
def test_texts_must_be_strings(tmp_path, text, shown):
    path = _write(tmp_path, "t.jsonl", GOOD_JSONL + json.dumps({"text": text, "label": 0}) + "\n")
    with pytest.raises(
        ValueError,
        match=rf"t\.jsonl, line 21: the text column 'text' holds {shown}, not a "
        r"string\..*text_column= \(--text-column\)",
    ):
        from_table(path)


def test_texts_given_as_bytes_are_read_as_utf8_or_named():
    # TFDS gives tf.string texts as bytes; the tokenizer would refuse them with a TypeError.
    texts = [f"caf\u00e9 {i}".encode() for i in range(20)]
    data = from_arrays(texts, [0, 1] * 10)
    assert sorted(data.train[0] + data.validation[0] + data.test[0]) == sorted(
        t.decode() for t in texts
    )
    texts[3] = "caf\u00e9".encode("latin-1")
    with pytest.raises(
        ValueError, match=r"arrays: text 3 is bytes that are not UTF-8 .*b'caf\\xe9'"
    ):
        from_arrays(texts, [0, 1] * 10)


# --- 5. labels that are no class ids --------------------------------------------------------------

_RANGE = r"must be in \[0, 2\) .*found \[2\] \({} holds 2\)\. Pass num_labels=3 \(--num-labels 3\)"
_NEGATIVE = r"negative class ids \[-1\] \({} holds -1\).*drop"
_FRACTION = (
    r"not integer class ids; .*\({} holds {}; class ids are whole numbers.*For a numeric target, "
    r"pass task='regression' \(--task regression\)"
)
_ONE_HOT = r"one class id per example, but {} holds \[0, 1\].*argmax"


@pytest.mark.parametrize(
    "label, message",
    [
        (2, _RANGE),
        ("-1", _NEGATIVE),
        (1.5, _FRACTION.format("{}", "1.5")),  # never truncated to class 1
        ("0.7", _FRACTION.format("{}", "0.7")),
        ([0, 1], _ONE_HOT),
        (None, r"{} has no label\. Fill it in or drop it"),
    ],
)
def test_file_labels_that_are_no_class_ids_name_their_line(tmp_path, label, message):
    row = json.dumps({"text": "word", "label": label}) + "\n"
    path = _write(tmp_path, "l.jsonl", GOOD_JSONL + row)
    with pytest.raises(ValueError, match=r"Labels in .*l\.jsonl.*" + message.format("line 21")):
        from_table(path, num_labels=2)


@pytest.mark.parametrize(
    "labels, message",
    [
        ([0, 1] * 9 + [2, 1], _RANGE),
        ([0, 1] * 9 + [-1, 1], _NEGATIVE),
        ([0.0, 1.0] * 9 + [1.5, 1.0], r"float64, " + _FRACTION.format("{}", "1.5")),
        (["0", "1"] * 9 + ["0.7", "1"], _FRACTION.format("{}", "0.7")),
        ([0, 1] * 9 + [None, 1], r"{} has no label"),
    ],
)
def test_array_labels_that_are_no_class_ids_name_their_example(labels, message):
    with pytest.raises(
        ValueError, match=r"Labels 'labels' of arrays.*" + message.format("example 18")
    ):
        from_arrays(np.zeros((20, 4, 4), np.uint8), labels, num_labels=2)


def test_whole_float_labels_are_class_ids(tmp_path):
    data = from_arrays(np.zeros((20, 4, 4), np.uint8), [0.0, 1.0] * 10)
    assert data.train[1].dtype == np.int32 and set(data.train[1].tolist()) == {0, 1}
    path = _write(
        tmp_path, "f.csv", "text,label\n" + "".join(f"w{i},{i % 2}.0\n" for i in range(20))
    )
    assert from_table(path).label_names is None  # ids, not the class names "0.0" and "1.0"


def test_a_file_read_without_num_labels_takes_the_head_width_from_its_labels(tmp_path):
    # As from_arrays does; a fixed default of 2 refused every file with more classes.
    names = ("neg", "pos", "meh")
    path = _write(
        tmp_path, "n.csv", "text,label\n" + "".join(f"w{i},{names[i % 3]}\n" for i in range(30))
    )
    assert from_table(path).label_names == ["meh", "neg", "pos"]
    with pytest.raises(
        ValueError, match=r"has 3 distinct labels .* Pass num_labels=3 \(--num-labels 3\)"
    ):
        from_table(path, num_labels=2)
    path = _write(tmp_path, "i.csv", "text,label\n" + "".join(f"w{i},{i % 5}\n" for i in range(30)))
    data = from_table(path)
    ids = np.concatenate([data.train[1], data.validation[1], data.test[1]])
    assert data.label_names is None and sorted(set(ids.tolist())) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"must be in \[0, 4\) for a 4-way head; found \[4\]"):
        from_table(path, num_labels=4)


# --- 6. NaN and inf ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_in_images_or_targets_is_refused(tmp_path, bad):
    fix = r"\. Replace them \(np\.nan_to_num\) or drop those examples"
    pixels = np.zeros((20, 4, 4), np.float32)
    pixels[3, 1, 2] = bad
    where = rf"arrays: images hold NaN or inf: 1 value\(s\), the first in example 3 \({bad}\)"
    with pytest.raises(ValueError, match=where + fix):
        from_arrays(pixels, [0, 1] * 10)
    targets = [0.5] * 19 + [bad]
    with pytest.raises(
        ValueError, match=rf"Regression labels .*NaN or inf.*example 19 \({bad}\){fix}"
    ):
        from_arrays(np.zeros((20, 4, 4), np.uint8), targets, task="regression")
    path = _write(tmp_path, "r.csv", "text,label\n" + "".join(f"w,{t}\n" for t in targets))
    with pytest.raises(ValueError, match=rf"Regression labels in .*r\.csv.*line 21 \({bad}\)"):
        from_table(path, task="regression")


# --- 7. images that do not match the model --------------------------------------------------------

_PREP = ImagePreprocessing(size=(8, 8))  # 3 channels, uint8 / 255 then ImageNet mean / std


@pytest.mark.parametrize(
    "pixels, message",
    [
        (np.full((20, 6, 6, 3), 200.0, np.float32), r"read as already rescaled to \[0, 1\], "
         r"but these run from 200 to 200; they look like 0\.\.255 pixels: pass them as uint8 "
         r"\(images\.astype\(np\.uint8\)\) or divide them by 255"),
        (np.full((20, 6, 6, 3), -2.0, np.float32), r"run from -2 to -2; they look normalized "
         r"already: pass the raw pixels"),
        (np.full((20, 6, 6, 3), 1000, np.uint16), r"uint16 images hold values 1000 to 1000, but "
         r"integer images are read as 8-bit pixels 0\.\.255\. Scale them to uint8"),
        # Too small for from_arrays to tell [N, C, H, W] from [N, H, W, C]; the model can.
        (np.zeros((20, 3, 4, 4), np.float32), r"Images have 4 channels, the model expects 3\. "
         r"They look channels-first.*np\.moveaxis\(images, 1, -1\)"),
        (np.zeros((20, 6, 6, 4), np.uint8), r"Images have 4 channels, the model expects 3; load "
         r"the model with in_channels=4 \(--in-channels 4\)"),
    ],
)  # fmt: skip
def test_images_the_model_cannot_read_are_refused_before_training(pixels, message):
    with pytest.raises(ValueError, match=message):
        images.encode(_PREP, from_arrays(pixels, [0, 1] * 10))


def test_channels_first_images_in_a_list_are_named():
    pixels = [np.zeros((3, 16, 16), np.uint8)] * 20
    with pytest.raises(ValueError, match=r"image 0 of shape \(3, 16, 16\) looks channels-first"):
        from_arrays(pixels, [0, 1] * 10)


def test_images_of_any_size_are_resized_to_the_model():
    data = from_arrays(np.zeros((20, 5, 7, 3), np.uint8), [0, 1] * 10)  # documented conversion
    out, _ = images.encode(_PREP, data)
    assert out["train"]["pixel_values"].shape == (16, 8, 8, 3)


# --- 8. too few rows to split ---------------------------------------------------------------------


@pytest.mark.parametrize("task", ["classification", "causal_lm"])
def test_too_few_rows_name_how_many_the_split_needs(tmp_path, task):
    path = _write(tmp_path, "small.csv", "text,label\n" + "w,0\nw,1\n" * 2 + "w,0\n")
    with pytest.raises(
        ValueError,
        match=r"small\.csv' has 5 rows, too few to split 80/10/10: the validation "
        r"split would be empty\. It takes at least 10 rows: add rows",
    ):
        from_table(path, task=task)
