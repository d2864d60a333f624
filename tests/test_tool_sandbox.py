"""The file tools' sandbox on a real file system: reading inside the allowed folder works; `..`, absolute
paths outside, symlinks out, hard links to outside files, /proc, FIFOs and devices are refused, each with
a clear message; size and entry caps hold; the tools answer through the registry without raising."""

from __future__ import annotations

import os
import threading

import pytest

from ripelm.assistant_tools.builtin import file_tools
from ripelm.assistant_tools.files import FileSandbox, ToolRefused
from ripelm.assistant_tools.registry import ToolBox


@pytest.fixture
def tree(tmp_path):
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "notes.txt").write_text("buy oat milk\n")
    (allowed / "sub" / "deep.txt").write_text("deep text\n")
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "key.txt").write_text("TOP SECRET\n")
    return allowed, outside


def refused(sandbox: FileSandbox, path: str) -> str:
    with pytest.raises(ToolRefused) as e:
        sandbox.read(path)
    assert "SECRET" not in str(e.value)
    return str(e.value)


def test_reads_and_lists_inside(tree):
    allowed, _ = tree
    sb = FileSandbox([allowed])
    assert sb.read("notes.txt") == "buy oat milk\n"
    assert sb.read("sub/deep.txt") == "deep text\n"
    assert sb.read(str(allowed / "sub" / "deep.txt")) == "deep text\n"  # absolute, inside
    listing = sb.list(".")
    assert "notes.txt  13 bytes" in listing and "sub/" in listing


def test_dotdot_refused_even_back_inside(tree):
    allowed, _ = tree
    sb = FileSandbox([allowed])
    assert "'..' is not allowed" in refused(sb, "../secret/key.txt")
    assert "'..' is not allowed" in refused(sb, "sub/../notes.txt")
    with pytest.raises(ToolRefused, match=r"'\.\.' is not allowed"):
        sb.list("..")


def test_absolute_path_outside_refused(tree):
    allowed, outside = tree
    sb = FileSandbox([allowed])
    assert "outside the allowed folders" in refused(sb, str(outside / "key.txt"))
    assert "outside the allowed folders" in refused(sb, "/etc/passwd")


def test_symlink_out_refused_symlink_inside_allowed(tree):
    allowed, outside = tree
    (allowed / "link.txt").symlink_to(outside / "key.txt")
    (allowed / "linkdir").symlink_to(outside)
    (allowed / "inner.txt").symlink_to(allowed / "notes.txt")
    sb = FileSandbox([allowed])
    assert "symbolic link" in refused(sb, "link.txt")
    assert "symbolic link" in refused(sb, "linkdir/key.txt")
    with pytest.raises(ToolRefused, match="symbolic link"):
        sb.list("linkdir")
    assert sb.read("inner.txt") == "buy oat milk\n"


def test_hard_link_to_outside_file_refused(tree):
    allowed, outside = tree
    os.link(outside / "key.txt", allowed / "hard.txt")
    sb = FileSandbox([allowed])
    assert "hard links" in refused(sb, "hard.txt")


def test_proc_refused_even_when_root_allowed(tmp_path):
    sb = FileSandbox(["/"])
    assert "/proc" in refused(sb, "/proc/self/environ")
    assert "/proc" in refused(sb, "proc/self/status")  # relative to the allowed /
    (tmp_path / "p").symlink_to("/proc/self")
    assert "never read" in refused(FileSandbox([tmp_path]), "p/status")  # a link into /proc


def test_fifo_refused_without_hanging(tree):
    allowed, _ = tree
    os.mkfifo(allowed / "pipe")
    sb = FileSandbox([allowed])
    result: list[str] = []
    t = threading.Thread(target=lambda: result.append(refused(sb, "pipe")), daemon=True)
    t.start()
    t.join(10)
    assert result and "FIFO" in result[0]


def test_device_refused(tmp_path):
    sb = FileSandbox(["/"])
    msg = refused(sb, "/dev/null")
    assert "never read" in msg  # /dev is refused as a tree, before the device check


def test_size_cap_binary_and_entry_cap(tree):
    allowed, _ = tree
    (allowed / "big.txt").write_text("x" * 5000)
    (allowed / "blob.bin").write_bytes(b"\x00\x01\x02" * 10)
    many = allowed / "many"
    many.mkdir()
    for i in range(12):
        (many / f"f{i:02d}").write_text("")
    sb = FileSandbox([allowed], max_bytes=1000, max_entries=5)
    text = sb.read("big.txt")
    assert text.startswith("x" * 1000) and "cut at 1000 of 5000 bytes" in text
    assert "binary file" in refused(sb, "blob.bin")
    listing = sb.list("many")
    assert listing.count("\n") == 5 and "7 more entries not shown" in listing


def test_missing_and_no_folders(tree):
    allowed, _ = tree
    assert "does not exist" in refused(FileSandbox([allowed]), "nope.txt")
    assert "no folders are allowed" in refused(FileSandbox([]), "notes.txt")


def test_tools_answer_refusals_as_results(tree):
    allowed, outside = tree
    box = ToolBox()
    for t in file_tools(FileSandbox([allowed])):
        box.add(t)
    off = box.call("read_file", {"path": "notes.txt"})
    assert not off.ok and "not turned on" in off.content
    box.set("read_file", True)
    ok = box.call("read_file", {"path": "notes.txt"})
    assert ok.ok and ok.content == "buy oat milk\n"
    bad = box.call("read_file", {"path": "../secret/key.txt"})
    assert bad.refused and "'..' is not allowed" in bad.content
    wrong = box.call("read_file", {"file": "notes.txt"})
    assert not wrong.ok and "bad arguments" in wrong.content
