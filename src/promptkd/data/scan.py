"""Listing class folders and image files on disk, safely with symbolic links.

Folder symlinks are followed (a class folder or a whole dataset may live on another disk), except
those that loop: a link pointing at the folder that holds it or at any of its ancestors would make a
class out of the dataset's own root (holding copies of every other class) or walk forever. Such a
link is skipped with a :class:`SymlinkLoopWarning`. A link whose target does not exist is skipped
with a :class:`DanglingLinkWarning` (``promptkd data check`` lists every one as a problem).

Listings are sorted, so every machine sees the same order. Hidden entries (``.name``) are ignored
as class folders; hidden files are never images.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
MAX_NAMED = 5  # paths named in one warning message (the warning object carries all of them)


class DataScanWarning(UserWarning):
    """A listing skipped some entries; ``paths`` names every one."""

    what = "entries"

    def __init__(self, paths: Iterable[str]):
        self.paths = list(paths)
        shown = ", ".join(self.paths[:MAX_NAMED])
        more = f" and {len(self.paths) - MAX_NAMED} more" if len(self.paths) > MAX_NAMED else ""
        super().__init__(f"skipped {len(self.paths)} {self.what}: {shown}{more}")


class DanglingLinkWarning(DataScanWarning):
    """Symbolic links whose target does not exist (skipped)."""

    what = "broken symbolic link(s) (target missing)"


class SymlinkLoopWarning(DataScanWarning):
    """Folder links pointing at their own folder or an ancestor of it (not followed)."""

    what = "folder link(s) pointing back at an ancestor folder (a loop, not followed)"


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _contains(folder_real: str, path_real: str) -> bool:
    """Whether ``path_real`` is ``folder_real`` or lies inside it (both already resolved)."""
    return os.path.commonpath([folder_real, path_real]) == folder_real


def _loops(link: os.DirEntry, walked: Iterable[str]) -> bool:
    """A folder link loops when its target is, or holds, a folder of the walk that reached it."""
    target = os.path.realpath(link.path)
    return any(_contains(target, folder) for folder in walked)


def _is_dangling(entry: os.DirEntry) -> bool:
    return entry.is_symlink() and not os.path.exists(entry.path)


def _warn(category: type[DataScanWarning], paths: list[str]) -> None:
    if paths:
        warnings.warn(category(sorted(paths)), stacklevel=3)


def subfolders(folder: str | os.PathLike, ignore: Iterable[str] = ()) -> list[str]:
    """Sorted names of the (non-hidden) folders in ``folder``, following links except looping ones."""
    skip = set(ignore)
    here = os.path.realpath(folder)
    names, loops, dangling = [], [], []
    with os.scandir(folder) as entries:
        for e in entries:
            if e.name.startswith(".") or e.name in skip:
                continue
            if e.is_dir():
                if e.is_symlink() and _loops(e, (here,)):
                    loops.append(e.path)
                else:
                    names.append(e.name)
            elif _is_dangling(e):
                dangling.append(e.path)
    _warn(SymlinkLoopWarning, loops)
    _warn(DanglingLinkWarning, dangling)
    return sorted(names)


def images_in(folder: str | os.PathLike, recursive: bool = False) -> list[str]:
    """Sorted image paths in ``folder`` (and, with ``recursive``, every folder below it, following
    folder links except those that loop back to a folder being walked)."""
    found, loops, dangling = [], [], []
    top = os.path.normpath(os.fspath(folder))
    pending: list[tuple[str, tuple[str, ...]]] = [(top, (os.path.realpath(top),))]
    while pending:
        current, walked = pending.pop()  # walked: the real paths of the folders from the top to here
        with os.scandir(current) as entries:
            for e in entries:
                path = e.name if current == "." else os.path.join(current, e.name)  # as Path(current, name)
                if e.is_file():
                    if is_image_file(e.name):
                        found.append(path)
                elif e.is_dir():
                    if not recursive:
                        continue
                    if not e.is_symlink():
                        pending.append((path, (*walked, os.path.join(walked[-1], e.name))))
                    elif _loops(e, walked):
                        loops.append(path)
                    else:
                        pending.append((path, (*walked, os.path.realpath(e.path))))
                elif _is_dangling(e) and not e.name.startswith("."):
                    dangling.append(path)
    _warn(SymlinkLoopWarning, loops)
    _warn(DanglingLinkWarning, dangling)
    return sorted(found)


