"""The files a checkpoint directory may lead to: whatever jaxtl reads from it stays inside it.

A checkpoint from an untrusted source is a directory whose file names and links that source
chose. A link ``tokenizer.json -> ~/.ssh/id_rsa``, or an index naming the shard
``../../etc/passwd``, would have jaxtl read (and ``jaxtl.export`` copy beside a model it
writes) a file the checkpoint never shipped. So a file a checkpoint names, and the resolved target
of every link in it, must lie inside the directory.

One exception keeps Hugging Face's own downloads loading: a hub cache snapshot
(``models--ORG--NAME/snapshots/REVISION/``) holds only relative links into the repo's content
store (``models--ORG--NAME/blobs/SHA256``), and ``local_dir`` downloads of huggingface_hub < 0.23
linked their large files into that store from outside the cache. A blob holds nothing but a file
that was downloaded as part of a model repo, so a link whose target is a file directly in a
``models--*/blobs/`` folder is allowed wherever the link lives.
"""

from __future__ import annotations

import os


class UnsafePathError(ValueError):
    """A checkpoint file (a link, or a name in an index) that leads outside its directory."""


def check_links(directory: str | os.PathLike) -> None:
    """Refuses a checkpoint directory holding a symlink whose target lies outside it.

    The whole tree is checked once, up front, rather than each read: jaxtl reads weights,
    config.json, tokenizer, pooling and preprocessing files from it, and ``jaxtl.export`` copies
    some of them. Hidden entries (``.git``, ``.cache``) are skipped: jaxtl reads none of them.

    Raises:
      UnsafePathError: naming the link, its target and what to do.
    """
    directory = os.fspath(directory)
    # followlinks=False: a linked folder is checked as a link here, never walked into.
    for parent, folders, files in os.walk(directory):
        folders[:] = [d for d in folders if not d.startswith(".")]
        for name in (*folders, *files):
            path = os.path.join(parent, name)
            if not name.startswith(".") and os.path.islink(path):
                _check_target(directory, path)


def contained(directory: str | os.PathLike, name: str, named_by: str | None = None) -> str:
    """Returns ``directory/name``, refused when it leads outside ``directory``.

    Args:
      directory: the checkpoint directory.
      name: a relative file name; from the checkpoint itself (a shard an index names) or
        jaxtl's own (``model.safetensors``).
      named_by: the file that names ``name``, when the checkpoint does (for the message).

    Raises:
      UnsafePathError: ``name`` is absolute or climbs out with ``..``, or a link on the way
        resolves outside (see the module docstring for the hub cache exception).
    """
    directory = os.fspath(directory)
    path = os.path.join(directory, name)
    if os.path.isabs(name) or not _within(os.path.abspath(path), os.path.abspath(directory)):
        raise UnsafePathError(
            f"{named_by or 'The checkpoint'} names the file {name!r}, which lies outside "
            f"{directory}. A checkpoint's files must sit in its directory; this one is corrupt or "
            "crafted to read other files. Get a clean copy of the checkpoint."
        )
    _check_target(directory, path)
    return path


def _check_target(directory: str, path: str) -> None:
    """Refuses ``path`` (inside ``directory`` by name) when it resolves outside the directory
    and not into a hub cache's blobs."""
    root = os.path.realpath(directory)
    target = os.path.realpath(path)
    if _within(target, root) or _is_hub_blob(target):
        return
    link = _escaping_link(directory, path, root) or path
    shown = os.readlink(link) if os.path.islink(link) else target
    raise UnsafePathError(
        f"{link} is a symlink to {shown!r}, which resolves to {os.path.realpath(link)}, outside "
        f"the checkpoint directory {root}. jaxtl follows links only within the directory or "
        "into a Hugging Face hub cache's blobs, so that a checkpoint cannot make it read other "
        "files. Replace the link with a copy of the file it should point to, or remove it."
    )


def _escaping_link(directory: str, path: str, root: str) -> str | None:
    """The first link on the way from ``directory`` to ``path`` that leads outside (a linked
    folder, or the file itself)."""
    current = directory
    for part in os.path.relpath(path, directory).split(os.sep):
        current = os.path.join(current, part)
        if os.path.islink(current):
            target = os.path.realpath(current)
            if not (_within(target, root) or _is_hub_blob(target)):
                return current
    return None


def _within(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def _is_hub_blob(target: str) -> bool:
    blobs = os.path.dirname(target)
    return os.path.basename(blobs) == "blobs" and os.path.basename(
        os.path.dirname(blobs)
    ).startswith("models--")
