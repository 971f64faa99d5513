"""Image folders (one subfolder per class) of real photographs, decoded by PIL, with the bad
inputs a user meets: corrupt files, empty classes, wrong channel counts and ranks."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
from _tiny import read_json
from PIL import Image

from jaxtl.data import from_folder
from jaxtl.models.preprocessing import ImagePreprocessing

PHOTOS = {  # real photographs of different sizes and modes
    "cat": [skimage.data.chelsea(), skimage.data.cat()],
    "cup": [skimage.data.coffee(), skimage.data.coffee()[::2, ::2]],
    "person": [skimage.data.astronaut(), skimage.data.camera()],  # camera() is grayscale
}


def make_folder(root, corrupt: bool = False):
    for name, photos in PHOTOS.items():
        (root / name).mkdir(parents=True)
        for i, photo in enumerate(photos * 5):  # 10 files per class
            suffix = ".png" if i % 2 else ".jpg"
            Image.fromarray(photo).save(root / name / f"{i}{suffix}")
    (root / "cup" / "notes.txt").write_text("not an image, ignored by its extension")
    if corrupt:
        (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 truncated jpeg" * 3)
    return root


def test_folder_reads_classes_and_photos_of_any_size(tmp_path):
    data = from_folder(str(make_folder(tmp_path / "photos")))
    assert data.label_names == ["cat", "cup", "person"]
    assert data.sizes() == {"train": 24, "validation": 3, "test": 3}
    images, labels = data.train
    assert np.bincount(labels).tolist() == [8, 8, 8]
    shapes = {im.shape for im in images}
    assert len(shapes) > 1 and all(s[-1] == 3 for s in shapes)  # grayscale made RGB
    recipe = ImagePreprocessing(size=(32, 32), resize=36)
    pixels = recipe(images)
    assert pixels.shape == (24, 32, 32, 3) and pixels.dtype == np.float32


def test_corrupt_file_is_named_or_skipped_and_counted(tmp_path):
    root = make_folder(tmp_path / "photos", corrupt=True)
    with pytest.raises(ValueError, match="Cannot decode image .*broken.jpg.*skip_corrupt"):
        from_folder(str(root))
    data = from_folder(str(root), skip_corrupt=True)
    assert [p.endswith("broken.jpg") for p in data.skipped] == [True]
    assert "1 corrupt skipped" in data.name
    assert sum(data.sizes().values()) == 30


def test_bad_folders_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Image folder not found"):
        from_folder(str(tmp_path / "missing"))
    (tmp_path / "flat").mkdir()
    Image.fromarray(skimage.data.coffee()).save(tmp_path / "flat" / "a.png")
    with pytest.raises(ValueError, match="no class subfolders"):
        from_folder(str(tmp_path / "flat"))
    root = make_folder(tmp_path / "photos")
    (root / "empty").mkdir()
    with pytest.raises(ValueError, match="Class folder .*empty.* holds no images"):
        from_folder(str(root))


def test_channel_count_and_rank_mismatches_are_named(tmp_path):
    gray = from_folder(str(make_folder(tmp_path / "photos")), channels=1)
    assert {im.shape[-1] for im in gray.train[0]} == {1}
    rgb_model = ImagePreprocessing(size=(16, 16))
    with pytest.raises(
        ValueError, match="Image 0 has shape .*1\\); the model expects \\[H, W, 3\\]"
    ):
        rgb_model(gray.train[0])
    with pytest.raises(ValueError, match="Expected images \\[N, H, W, C\\]"):
        rgb_model(np.zeros((2, 8, 8, 3, 1), np.uint8))
    with pytest.raises(ValueError, match="Images have 4 channels, the model expects 3"):
        rgb_model(np.zeros((2, 8, 8, 4), np.uint8))


def test_text_model_refuses_an_image_folder(tmp_path, minilm_dir, capsys):
    from jaxtl import cli

    root = make_folder(tmp_path / "photos")
    assert cli.main(["finetune", "--model", str(minilm_dir), "--data", str(root)]) == 2
    assert "is a directory (an image or audio folder), but the" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_fine_tunes_an_image_model_on_a_folder(tmp_path, capsys):

    import torch
    import transformers

    from jaxtl import cli

    torch.manual_seed(0)
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 8, 16, 16], depths=[1, 1, 1, 1], layer_type="basic"
    )
    transformers.ResNetModel(config).save_pretrained(tmp_path / "resnet")
    root = make_folder(tmp_path / "photos", corrupt=True)
    out = tmp_path / "run"
    argv = ["finetune", "--model", str(tmp_path / "resnet"), "--data", str(root)]
    argv += ["--num-labels", "3", "--image-size", "32", "--skip-corrupt", "--recipe", "full"]
    argv += ["--no-scratch", "--epochs", "2", "--batch-size", "8", "--lr", "1e-3"]
    argv += ["--augment", "random_resized_crop(0.5),hflip", "--out", str(out)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "1 corrupt skipped" in printed
    (result,) = read_json(out / "summary.json")["results"]
    assert result["steps"] == 6 and result["test"]["examples"] == 3
    run = read_json(out / "pretrained-full" / "run.json")
    assert run["model"]["image_size"] == 32 and run["data"]["kind"] == "folder"
    assert run["config"]["augment"] == "random_resized_crop(0.5),hflip"
    assert cli.main(["evaluate", str(out / "pretrained-full")]) == 0
    assert "| 3 " in capsys.readouterr().out
