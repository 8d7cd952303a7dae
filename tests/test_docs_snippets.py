"""Every ```python block of README.md and docs/*.md runs, so that a snippet that stops working
fails here. The blocks of one file run in order in one namespace (a later block may use what an
earlier one made, as a reader going down the page would), on NumPy, from a folder that holds
the repository's files and a picture, my_cat.jpg (the README's inference names one)."""
import re
import textwrap
from pathlib import Path

import pytest

from minicvt import backend

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^( *)```python\n(.*?)^\1```", re.S | re.M)


def python_blocks(path):
    """[(line number, code)] of the file's ```python blocks, dedented (a block inside a list
    item is indented with it)."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 2, textwrap.dedent(m.group(2))) for m in FENCE.finditer(text)]


PAGES = [p for p in [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md")) if python_blocks(p)]


def test_the_pages_have_snippets():
    assert {p.name for p in PAGES} >= {"README.md", "gradcheck.md", "norm.md", "training.md"}


TRACKED = ("README.md", "checkpoints", "docs", "minicvt", "notebooks", "benchmarks", "tests", "pyproject.toml")


def reader_folder(tmp_path):
    """Where a reader runs the snippets: the repository's own files (linked, not copied; none
    of the reader's: a picture of theirs in the clone must not be written through a link) and
    a picture, my_cat.jpg, which the README's inference lines name. A file a snippet writes
    lands here, not in the repository."""
    import numpy as np
    from PIL import Image

    for name in TRACKED:
        (tmp_path / name).symlink_to(ROOT / name)
    pixels = np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "my_cat.jpg")
    return tmp_path


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_python_blocks_run(page, monkeypatch, tmp_path):
    monkeypatch.chdir(reader_folder(tmp_path))
    previous = backend.get_backend()
    backend.set_backend("numpy")
    namespace = {"__name__": "__snippet__"}
    try:
        for line, code in python_blocks(page):
            try:
                exec(compile(code, f"{page.name}:{line}", "exec"), namespace)
            except Exception as e:
                pytest.fail(f"{page.relative_to(ROOT)}, the python block at line {line}: "
                            f"{type(e).__name__}: {e}")
    finally:
        backend.set_backend(previous)


def test_the_readers_folder_links_only_the_repositorys_own_files(tmp_path):
    """A reader's my_cat.jpg beside the README must never be written through a link."""
    folder = reader_folder(tmp_path)
    assert not (folder / "my_cat.jpg").is_symlink()
    assert sorted(p.name for p in folder.iterdir() if p.is_symlink()) == sorted(TRACKED)
