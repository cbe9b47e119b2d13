"""Path confinement: `bastion.safepath.confine` and every data source inside allowed_roots."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from bastion.config.schema import DataConfig
from bastion.data.sources import iter_documents, resolve_sources
from bastion.errors import DataError
from bastion.safepath import Roots, confine, is_within


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """root/ (allowed) with data, and outside/ (not allowed) with a secret."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "data").mkdir(parents=True)
    outside.mkdir()
    (root / "data" / "a.txt").write_text("inside")
    (outside / "secret.txt").write_text("secret")
    return {"root": root, "outside": outside}


# ---- confine -----------------------------------------------------------------------------


def test_inside_paths_resolve(tree, monkeypatch) -> None:
    root = tree["root"]
    assert confine(root / "data" / "a.txt", [root], "x", must_exist=True) == (root / "data" / "a.txt").resolve()
    assert confine(root, [root], "x") == root.resolve()  # the root itself is inside
    monkeypatch.chdir(root)
    assert confine("data/a.txt", ["."], "x") == (root / "data" / "a.txt").resolve()  # relative to cwd
    assert confine("./data/./a.txt", [str(root)], "x") == (root / "data" / "a.txt").resolve()


@pytest.mark.parametrize("rel", ["../outside/secret.txt", "data/../../outside/secret.txt", "data/../a.txt", ".."])
def test_dotdot_refused_even_when_it_would_land_inside(tree, monkeypatch, rel: str) -> None:
    monkeypatch.chdir(tree["root"])
    with pytest.raises(DataError, match=r"data\.sources? .*'\.\.' component"):
        confine(rel, ["."], "data.source")
    with pytest.raises(DataError, match=r"'\.\.'"):
        confine(tree["root"] / rel, [tree["root"]], "data.source")


def test_absolute_escape_refused(tree) -> None:
    with pytest.raises(DataError, match=r"data\.output_dir /etc/passwd is outside the allowed roots .*allowed_roots = \["):
        confine("/etc/passwd", [tree["root"]], "data.output_dir")
    with pytest.raises(DataError, match="outside the allowed roots"):
        confine(tree["outside"] / "secret.txt", [tree["root"]], "x")


def test_symlinked_file_escape_refused(tree) -> None:
    link = tree["root"] / "data" / "link.txt"
    link.symlink_to(tree["outside"] / "secret.txt")
    with pytest.raises(DataError, match=r"link\.txt leads outside the allowed roots through a symlink .*secret\.txt"):
        confine(link, [tree["root"]], "x")
    dangling = tree["root"] / "dangling.txt"
    dangling.symlink_to(tree["outside"] / "not-yet.txt")  # would be created outside on write
    with pytest.raises(DataError, match="through a symlink"):
        confine(dangling, [tree["root"]], "x")


def test_symlinked_directory_escape_refused(tree) -> None:
    (tree["root"] / "dirlink").symlink_to(tree["outside"], target_is_directory=True)
    for path in [tree["root"] / "dirlink", tree["root"] / "dirlink" / "secret.txt", tree["root"] / "dirlink" / "new" / "out"]:
        with pytest.raises(DataError, match="through a symlink"):
            confine(path, [tree["root"]], "x")


def test_symlinks_inside_the_roots_are_fine(tree) -> None:
    link = tree["root"] / "alias.txt"
    link.symlink_to(tree["root"] / "data" / "a.txt")
    assert confine(link, [tree["root"]], "x") == (tree["root"] / "data" / "a.txt").resolve()
    # a root that is itself a symlink is resolved once, so paths through its target are inside
    root_link = tree["outside"] / "root-link"
    root_link.symlink_to(tree["root"], target_is_directory=True)
    assert confine(tree["root"] / "data" / "a.txt", [root_link], "x").name == "a.txt"


def test_prefix_trick_is_not_containment(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data2").mkdir()
    (tmp_path / "data2" / "x.txt").write_text("x")
    with pytest.raises(DataError, match="outside the allowed roots"):
        confine(tmp_path / "data2" / "x.txt", [tmp_path / "data"], "x")
    assert not is_within(tmp_path / "data2", tmp_path / "data")
    assert not is_within(tmp_path / "data2" / "x.txt", tmp_path / "data")
    assert is_within(tmp_path / "data" / "x", tmp_path / "data")
    assert is_within(tmp_path / "data", tmp_path / "data")
    assert is_within(tmp_path / "data", tmp_path)


def test_is_within_follows_symlinks(tree) -> None:
    (tree["root"] / "out").symlink_to(tree["outside"], target_is_directory=True)
    assert not is_within(tree["root"] / "out" / "x", tree["root"])


@pytest.mark.parametrize(
    ("path", "why"),
    [("data/a\x00.txt", "NUL byte"), ("x" * 5000, "over the limit of 4096"), ("d/" + "y" * 300, "over 255"), ("", "empty path")],
)
def test_malformed_paths_refused(tree, path: str, why: str) -> None:
    with pytest.raises(DataError, match=why):
        confine(path, [tree["root"]], "x")


def test_not_yet_existing_output_inside_passes_outside_refused(tree, monkeypatch) -> None:
    root = tree["root"]
    out = confine(root / "runs" / "new" / "deeper", [root], "data.output_dir")
    assert out == root.resolve() / "runs" / "new" / "deeper" and not out.exists()
    monkeypatch.chdir(root)
    assert confine("prepared/v1", ["."], "data.output_dir") == root.resolve() / "prepared" / "v1"
    with pytest.raises(DataError, match=r"data\.output_dir .* is outside the allowed roots"):
        confine(tree["outside"] / "new", [root], "data.output_dir")
    with pytest.raises(DataError, match=r"tokenizer\.path not found"):
        confine(root / "missing.json", [root], "tokenizer.path", must_exist=True)


def test_symlink_loop_and_empty_roots_are_data_errors(tree) -> None:
    loop = tree["root"] / "loop"
    loop.symlink_to(loop)
    with pytest.raises(DataError):
        confine(loop / "x", [tree["root"]], "x")
    with pytest.raises(DataError, match="allowed_roots is empty"):
        confine(tree["root"] / "data" / "a.txt", [], "x")


def test_roots_resolved_once(tree, monkeypatch) -> None:
    monkeypatch.chdir(tree["root"])
    roots = Roots(["data"])
    monkeypatch.chdir(tree["outside"])  # later cwd changes do not move the roots
    assert roots.paths == ((tree["root"] / "data").resolve(),)
    assert roots.confine(tree["root"] / "data" / "a.txt", "x").name == "a.txt"


# ---- sources -----------------------------------------------------------------------------


def test_sources_outside_roots_refused(tree) -> None:
    with pytest.raises(DataError, match=r"data source .*secret\.txt is outside the allowed roots"):
        resolve_sources([str(tree["outside"] / "secret.txt")], roots=[tree["root"]])
    with pytest.raises(DataError, match=r"'\.\.'"):
        resolve_sources([str(tree["root"] / "data" / ".." / "data" / "a.txt")], roots=[tree["root"]])
    with pytest.raises(DataError, match=r"'\.\.'"):
        resolve_sources([str(tree["root"] / ".." / "*" / "*.txt")], roots=[tree["root"]])


def test_default_roots_are_the_current_directory(tree, monkeypatch) -> None:
    monkeypatch.chdir(tree["root"])
    assert [p.name for p in resolve_sources(["data"])] == ["a.txt"]
    with pytest.raises(DataError, match="outside the allowed roots"):
        resolve_sources([str(tree["outside"])])
    cfg = DataConfig(sources=[str(tree["outside"])])
    with pytest.raises(DataError, match="outside the allowed roots"):
        list(iter_documents(cfg))


def test_folder_walk_refuses_symlinked_file_outside(tree) -> None:
    (tree["root"] / "data" / "b.txt").symlink_to(tree["outside"] / "secret.txt")
    with pytest.raises(DataError, match=r"b\.txt leads outside the allowed roots through a symlink"):
        resolve_sources([str(tree["root"] / "data")], roots=[tree["root"]])


def test_folder_walk_refuses_symlinked_dir_outside(tree) -> None:
    (tree["root"] / "data" / "more").symlink_to(tree["outside"], target_is_directory=True)
    with pytest.raises(DataError, match=r"more leads outside the allowed roots through a symlink"):
        resolve_sources([str(tree["root"] / "data")], roots=[tree["root"]])


def test_folder_walk_follows_file_links_inside(tree) -> None:
    (tree["root"] / "other.txt").write_text("other")
    (tree["root"] / "data" / "z.txt").symlink_to(tree["root"] / "other.txt")
    got = resolve_sources([str(tree["root"] / "data")], roots=[tree["root"]])
    assert [p.name for p in got] == ["a.txt", "other.txt"]


def test_glob_walking_into_symlinked_dir_outside_refused(tree) -> None:
    (tree["outside"] / "nested").mkdir()
    (tree["outside"] / "nested" / "s.txt").write_text("secret")
    (tree["root"] / "data" / "sub").symlink_to(tree["outside"], target_is_directory=True)
    for pattern in ["**/*.txt", "*/*/*.txt", "data/sub/*", "data/*"]:
        with pytest.raises(DataError, match="through a symlink"):
            resolve_sources([str(tree["root"] / pattern)], roots=[tree["root"]])


def test_recursive_glob_does_not_follow_directory_links(tree) -> None:
    # glob.glob follows links under "**": two links to "." would make that exponential
    data = tree["root"] / "data"
    (data / "self1").symlink_to(".", target_is_directory=True)
    (data / "self2").symlink_to(".", target_is_directory=True)
    got = resolve_sources([str(data / "**" / "*.txt"), str(tree["root"] / "**")], roots=[tree["root"]])
    assert [p.name for p in got] == ["a.txt"]
    (tree["root"] / "x.md").write_text("x")
    assert [p.name for p in resolve_sources([str(tree["root"] / "**" / "data" / "**")], roots=[tree["root"]])] == ["a.txt"]
    assert [p.name for p in resolve_sources([str(tree["root"] / "**" / "*.md")], roots=[tree["root"]])] == ["x.md"]


def test_glob_base_must_be_inside_roots(tree) -> None:
    with pytest.raises(DataError, match="the folder a glob starts from .* is outside the allowed roots"):
        resolve_sources([str(tree["outside"] / "*.txt")], roots=[tree["root"]])
    got = resolve_sources([str(tree["root"] / "**" / "*.txt")], roots=[tree["root"]])
    assert [p.name for p in got] == ["a.txt"]


def test_iter_documents_rechecks_files_passed_in(tree) -> None:
    cfg = DataConfig(sources=["unused"], allowed_roots=[str(tree["root"])])
    assert [d.text for d in iter_documents(cfg, [tree["root"] / "data" / "a.txt"])] == ["inside"]
    with pytest.raises(DataError, match="outside the allowed roots"):
        list(iter_documents(cfg, [tree["outside"] / "secret.txt"]))


def test_special_files_are_not_read(tree) -> None:
    fifo = tree["root"] / "data" / "pipe.txt"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match=r"pipe\.txt is not a regular file \(a FIFO"):
        resolve_sources([str(tree["root"] / "data")], roots=[tree["root"]])
    with pytest.raises(DataError, match=r"pipe\.txt is not a regular file or folder"):
        resolve_sources([str(fifo)], roots=[tree["root"]])


# ---- prepare_dataset: output_dir and tokenizer.path ----------------------------------------


def test_prepare_refuses_output_and_tokenizer_outside_roots(tree) -> None:
    from bastion.data import prepare_dataset

    root, outside = tree["root"], tree["outside"]
    (root / "link").symlink_to(outside, target_is_directory=True)
    base = {"sources": [str(root / "data")], "allowed_roots": [str(root)], "val_fraction": 0.0}
    refused = [
        ({"output_dir": str(outside / "prepared")}, r"data\.output_dir .* is outside the allowed roots"),
        ({"output_dir": str(root / "data" / ".." / "prepared")}, r"data\.output_dir .*'\.\.'"),
        ({"output_dir": str(root / "link" / "prepared")}, r"data\.output_dir .* through a symlink"),
        ({"output_dir": str(root / "prepared"), "tokenizer": {"path": str(outside / "tok.json")}},
         r"tokenizer\.path .* is outside the allowed roots"),
    ]
    for extra, match in refused:
        with pytest.raises(DataError, match=match):
            prepare_dataset(DataConfig(**base, **extra))
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]  # nothing written outside
