"""Data: loading rows, the held-out split, packing into blocks, seeded batches, evaluation text."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from qlora_core.data import (
    DatasetError,
    batches,
    check_batch_size,
    load_eval_text,
    load_texts,
    pack,
    rank_rows,
    split_heldout,
    token_stream,
)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


# --- load_texts -----------------------------------------------------------------------------------------------------


def test_embedded_quotes():
    texts = load_texts()
    assert len(texts) == 3832  # qlora_core/data/PROVENANCE.md
    assert all(isinstance(t, str) and t.strip() for t in texts)


def test_jsonl_with_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"body": "one"}, {"body": "  "}, {"body": "two"}])
    assert load_texts(path, "body") == ["one", "two"]  # blank rows dropped


def test_json_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"quote": "a"}, {"quote": "b"}]))
    assert load_texts(str(path)) == ["a", "b"]


def test_json_not_a_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"quote": "a"}))
    with pytest.raises(DatasetError, match="list of objects"):
        load_texts(str(path))


def test_txt_one_row_per_nonblank_line(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("first line\n\n   \nsecond line\n", encoding="utf-8")
    assert load_texts(str(path), text_field="ignored-for-txt") == ["first line", "second line"]


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DatasetError, match="no rows"):
        load_texts(str(path))


def test_missing_field_is_named(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "x", "author": "y"}])
    with pytest.raises(DatasetError) as error:
        load_texts(path, "quote")
    message = str(error.value)
    assert "'quote'" in message
    assert "author" in message and "text" in message  # what the row has instead


def test_field_empty_everywhere(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"quote": ""}, {"quote": " "}])
    with pytest.raises(DatasetError, match="empty in every row"):
        load_texts(path)


def test_invalid_json_line_is_located(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"quote": "fine"}\n{"quote": broken\n')
    with pytest.raises(DatasetError, match=r"d\.jsonl:2: not valid JSON"):
        load_texts(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        load_texts(str(tmp_path / "nope.jsonl"))


# --- split_heldout --------------------------------------------------------------------------------------------------

TEXTS = [f"row {i}" for i in range(50)]


def test_split_is_deterministic_disjoint_and_complete():
    train, heldout = split_heldout(TEXTS, 0.2, seed=3)
    assert (train, heldout) == split_heldout(TEXTS, 0.2, seed=3)
    assert len(heldout) == 10
    assert not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(TEXTS)
    # order within each part follows the source
    assert train == sorted(train, key=TEXTS.index) and heldout == sorted(heldout, key=TEXTS.index)


def test_split_depends_on_seed():
    assert split_heldout(TEXTS, 0.2, seed=0)[1] != split_heldout(TEXTS, 0.2, seed=1)[1]


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_split_fraction_bounds(fraction):
    with pytest.raises(ValueError):
        split_heldout(TEXTS, fraction, seed=0)


def test_split_too_few_rows():
    with pytest.raises(DatasetError, match="too few"):
        split_heldout(["only"], 0.5, seed=0)


# --- tokens and packing -----------------------------------------------------------------------------------------------

DOCS = ["the first document", "a second, longer document here", "third"]


def test_token_stream_ends_each_doc_with_eos(tokenizer):
    stream = token_stream(tokenizer, DOCS)
    expected = []
    for doc in DOCS:
        expected += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert stream.tolist() == expected
    assert stream.dtype == torch.long


def test_pack_shape_eos_and_reproducible(tokenizer):
    seq_len = 8
    blocks = pack(tokenizer, DOCS, seq_len)
    stream = token_stream(tokenizer, DOCS)
    assert blocks.shape == (stream.numel() // seq_len, seq_len)
    assert torch.equal(blocks.flatten(), stream[: blocks.numel()])  # no padding, tail dropped
    eos_positions = (blocks.flatten() == tokenizer.eos_token_id).nonzero().flatten().tolist()
    ends, total = [], 0
    for doc in DOCS:
        total += len(tokenizer(doc, add_special_tokens=False)["input_ids"]) + 1
        ends.append(total - 1)
    assert eos_positions == [e for e in ends if e < blocks.numel()]
    assert len(eos_positions) >= 2  # the eos between documents is inside the packed blocks
    assert torch.equal(pack(tokenizer, DOCS, seq_len), blocks)


def test_pack_too_short(tokenizer):
    with pytest.raises(DatasetError, match="do not fill one block"):
        pack(tokenizer, ["hi"], 64)


# --- batches ----------------------------------------------------------------------------------------------------------

BLOCKS = torch.arange(10 * 4).view(10, 4)


def take(iterator, n):
    return torch.stack(list(itertools.islice(iterator, n)))


def test_batches_reproducible_from_seed():
    first = take(batches(BLOCKS, 3, seed=7), 9)
    assert first.shape == (9, 3, 4)
    assert torch.equal(first, take(batches(BLOCKS, 3, seed=7), 9))
    assert not torch.equal(first, take(batches(BLOCKS, 3, seed=8), 9))


def test_each_epoch_is_a_permutation_without_repeats():
    epoch = take(batches(BLOCKS, 2, seed=0), 5).reshape(-1, 4)  # 10 blocks / batch 2 = 5 batches an epoch
    assert sorted(epoch[:, 0].tolist()) == BLOCKS[:, 0].tolist()


def test_batch_larger_than_blocks():
    with pytest.raises(DatasetError, match="exceeds the 10 training blocks"):
        batches(BLOCKS, 11, seed=0)
    with pytest.raises(DatasetError):
        check_batch_size(BLOCKS, 11)
    check_batch_size(BLOCKS, 10)


# --- evaluation text --------------------------------------------------------------------------------------------------


def test_eval_text_normalizes_crlf(tmp_path):
    path = tmp_path / "wiki.test.raw"
    path.write_bytes(b" = Title = \r\n\r\n Body line .\r\n")
    assert load_eval_text(str(path)) == " = Title = \n\n Body line .\n"


def test_eval_text_missing_or_empty(tmp_path):
    with pytest.raises(DatasetError, match="no such evaluation text"):
        load_eval_text(str(tmp_path / "nope.raw"))
    empty = tmp_path / "empty.raw"
    empty.write_text("\r\n \n")
    with pytest.raises(DatasetError, match="empty"):
        load_eval_text(str(empty))


@pytest.mark.parametrize("suffix", [".raw", ".jsonl", ".txt"])
def test_a_binary_file_is_named(tmp_path, suffix):
    path = tmp_path / f"image{suffix}"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe" * 8)
    read = load_eval_text if suffix == ".raw" else load_texts
    with pytest.raises(DatasetError, match="not UTF-8") as error:
        read(str(path))
    assert str(path) in str(error.value)


@pytest.mark.parametrize("read, source", [(load_eval_text, "wikitext"), (load_texts, "hub:someone/rows")])
def test_an_unreachable_hub_is_one_line(read, source):
    """conftest sets HF_HUB_OFFLINE=1, as on machines without the hub."""
    with pytest.raises(DatasetError, match="Hugging Face Hub is unreachable") as error:
        read(source)
    assert "pass a local file" in str(error.value) and "\n" not in str(error.value)


def test_rank_rows_split_a_global_batch_into_contiguous_equal_shares():
    """Rank r of n takes rows r*b/n up to (r+1)*b/n: together the ranks hold the batch, in order."""
    batch = torch.arange(8).view(4, 2)
    shares = [rank_rows(batch, rank, 2) for rank in range(2)]
    assert torch.equal(torch.cat(shares), batch)
    assert all(share.shape == (2, 2) for share in shares)
    assert torch.equal(rank_rows(batch, 0, 1), batch)
    with pytest.raises(ValueError, match="does not split evenly"):
        rank_rows(batch, 0, 3)
