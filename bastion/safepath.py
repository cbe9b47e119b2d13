"""Path confinement: every path a config names must resolve inside an allowed root folder.

`confine(path, roots, what)` resolves `path` the way the OS will when it is opened (home
expanded, relative to the current directory, every symlink followed) and refuses, with a
`DataError` naming `what`, the path and the roots:

  * a `..` component in the path as given, even one that would land back inside a root
    (an explicit rule that is simple to explain and to audit),
  * a result outside every root: an absolute path elsewhere, or a symlink anywhere in the
    chain (file or directory, dangling or not) that leads out,
  * a NUL byte, an over-long path or path component, an empty path.

Paths that do not exist yet (an output folder) are fine: the nearest existing parent is
resolved and the rest appended, which is safe because `..` is refused. Containment is
decided with `os.path.commonpath` on resolved paths, never a string prefix (/data2 is not
inside /data).
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from bastion.errors import DataError

MAX_PATH_BYTES = 4096  # Linux PATH_MAX
MAX_NAME_BYTES = 255  # Linux NAME_MAX, per component

PathLike = str | os.PathLike[str]


def check_path_text(path: PathLike, what: str) -> str:
    text = os.fspath(path)
    if not isinstance(text, str):
        raise DataError(f"{what}: path must be text, got {type(text).__name__}")
    if not text:
        raise DataError(f"{what}: empty path")
    if "\x00" in text:
        raise DataError(f"{what}: path contains a NUL byte: {text!r}")
    encoded = os.fsencode(text)
    if len(encoded) > MAX_PATH_BYTES:
        raise DataError(f"{what}: path is {len(encoded)} bytes long, over the limit of {MAX_PATH_BYTES}: {text[:80]!r}...")
    for part in encoded.split(b"/"):
        if len(part) > MAX_NAME_BYTES:
            raise DataError(f"{what}: a component of {text[:80]!r} is {len(part)} bytes long, over {MAX_NAME_BYTES}")
    return text


def _resolve(path: PathLike, strict: bool = False) -> Path:
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = Path.cwd() / p
    return p.resolve(strict=strict)


def is_within(path: PathLike, root: PathLike) -> bool:
    """True if `path` is `root` or inside it, comparing fully resolved paths (symlinks followed)."""
    p, r = str(_resolve(path)), str(_resolve(root))
    try:
        return os.path.commonpath([p, r]) == r
    except ValueError:  # different drives (Windows), or mixed absolute/relative
        return False


class Roots:
    """A set of allowed root folders, resolved once (relative roots against the current
    directory at construction). Reuse one instance when confining many paths."""

    def __init__(self, roots: Iterable[PathLike] | Roots, setting: str = "data.allowed_roots"):
        if isinstance(roots, Roots):
            self.paths: tuple[Path, ...] = roots.paths
            self.setting: str = roots.setting
            return
        if isinstance(roots, (str, os.PathLike)):  # a lone path, not a list of them
            roots = [roots]
        resolved = []
        for root in roots:
            text = check_path_text(root, f"{setting} entry")
            try:
                resolved.append(_resolve(text))
            except (OSError, RuntimeError) as exc:
                raise DataError(f"{setting} entry {text!r} cannot be resolved ({exc})") from None
        self.paths = tuple(dict.fromkeys(resolved))  # de-duplicated, order kept
        self.setting = setting

    def __repr__(self) -> str:
        return f"Roots({[str(p) for p in self.paths]})"

    def describe(self) -> str:
        return f"{self.setting} = [{', '.join(str(p) for p in self.paths)}]"

    def contains(self, resolved: Path) -> bool:
        """Whether an already-resolved absolute path is inside one of the roots."""
        text = str(resolved)
        for root in self.paths:
            r = str(root)
            try:
                if os.path.commonpath([text, r]) == r:
                    return True
            except ValueError:
                continue
        return False

    def confine(self, path: PathLike, what: str, *, must_exist: bool = False) -> Path:
        """The resolved path, or a DataError saying why it is not allowed."""
        text = check_path_text(path, what)
        if not self.paths:
            raise DataError(f"{what} {text} is not allowed: {self.setting} is empty, so no path is")
        given = Path(text).expanduser()
        if ".." in given.parts:
            raise DataError(
                f"{what} {text} contains a '..' component; '..' is refused in paths "
                f"(name the folder directly, inside {self.describe()})"
            )
        lexical = given if given.is_absolute() else Path.cwd() / given
        try:
            resolved = lexical.resolve(strict=must_exist)
        except FileNotFoundError:
            raise DataError(f"{what} not found: {text}") from None
        except (OSError, RuntimeError) as exc:  # symlink loop, permission denied on a parent...
            raise DataError(f"{what} {text} cannot be resolved ({exc})") from None
        if self.contains(resolved):
            return resolved
        if self.contains(Path(os.path.normpath(lexical))):
            raise DataError(
                f"{what} {text} leads outside the allowed roots through a symlink (it resolves to "
                f"{resolved}); {self.describe()}"
            )
        raise DataError(
            f"{what} {text} is outside the allowed roots (resolves to {resolved}); {self.describe()} - "
            f"add its folder to {self.setting} to allow it"
        )


def confine(
    path: PathLike, roots: Iterable[PathLike] | Roots, what: str, *, must_exist: bool = False
) -> Path:
    """Resolve `path` (home expanded, relative to the current directory, symlinks followed)
    and require it inside one of `roots`; see the module docstring for what is refused.

    `what` names the setting in errors (e.g. "data.output_dir"). With `must_exist` a missing
    path is an error too; otherwise the nearest existing parent is resolved.
    """
    return Roots(roots).confine(path, what, must_exist=must_exist)
