"""The embedded default model's cache: checksum refusal, atomic conversion, reuse of a finished folder."""

from __future__ import annotations

import hashlib
import os

import pytest

from qlora_core import default_model
from qlora_core.default_model import (
    FOLDER_NAME,
    GGUF_SHA256,
    ChecksumError,
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
