"""Text in, token blocks out: fine-tuning rows, a deterministic held-out split, packing, evaluation text.

Sources of rows: ``"quotes"`` (the embedded set, see qlora_core/data/PROVENANCE.md), a local ``.jsonl``/``.json``
file with a named text field, a ``.txt`` file (one row a non-blank line), or ``hub:NAME[:CONFIG]`` through
``datasets``. Evaluation text: a path to a plain-text file (e.g. WikiText-2's ``wiki.test.raw``) or
``wikitext`` through ``datasets`` where the hub is reachable.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import torch

EMBEDDED_QUOTES = Path(__file__).parent / "data" / "quotes.jsonl"
QUOTES = "quotes"
WIKITEXT = "wikitext"


class DatasetError(ValueError):
    """A data source that cannot give what training or evaluation needs."""


def _read_text(path: Path) -> str:
    """The file's text as UTF-8; a binary or otherwise non-UTF-8 file is a ``DatasetError`` naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason})") from None


def _load_from_hub(*args, **kwargs):
    """``datasets.load_dataset(*args, **kwargs)``; an unreachable hub (offline mode, no network) is a
    ``DatasetError`` in one line instead of a long traceback."""
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except ConnectionError as error:  # datasets raises it for HF_HUB_OFFLINE=1 and for network failures
        raise DatasetError(f"{args[0]}: the Hugging Face Hub is unreachable ({error}); pass a local file") from None


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise DatasetError(f"{path}:{number}: not valid JSON ({error.msg})") from error
    return rows


def _read_rows(source: str) -> list[dict]:
    if source == QUOTES:
        return _read_jsonl(EMBEDDED_QUOTES)
    if source.startswith("hub:"):
        name, _, config = source.removeprefix("hub:").partition(":")
        return list(_load_from_hub(name, config or None, split="train"))
    path = Path(source)
    if not path.is_file():
        raise DatasetError(f"{source}: no such file (expected 'quotes', a .jsonl/.json/.txt path or hub:NAME)")
    if path.suffix == ".txt":
        return [{"text": line} for line in _read_text(path).splitlines() if line.strip()]
    if path.suffix == ".json":
        rows = json.loads(_read_text(path))
        if not isinstance(rows, list):
            raise DatasetError(f"{source}: a .json dataset must hold a list of objects")
        return rows
    return _read_jsonl(path)


def load_texts(source: str = QUOTES, text_field: str = "quote") -> list[str]:
    """The non-empty texts of ``source``'s ``text_field`` (``.txt`` files use the field ``text``).

    Raises ``DatasetError`` when the source has no rows, or the field is missing from a row.
    """
    rows = _read_rows(source)
    field = "text" if source.endswith(".txt") else text_field
    if not rows:
        raise DatasetError(f"{source}: the dataset has no rows")
    missing = next((row for row in rows if not isinstance(row, dict) or field not in row), None)
    if missing is not None:
        keys = sorted(missing) if isinstance(missing, dict) else type(missing).__name__
        raise DatasetError(f"{source}: row without text field {field!r} (it has {keys}); pass --text-field")
    texts = [str(row[field]) for row in rows if str(row[field]).strip()]
    if not texts:
        raise DatasetError(f"{source}: field {field!r} is empty in every row")
    return texts


def split_heldout(texts: list[str], heldout_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic (train, held-out) split of whole rows: same texts and seed, same split."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"held-out fraction must be in (0, 1), got {heldout_fraction}")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    n_heldout = max(1, round(len(texts) * heldout_fraction))
    if n_heldout >= len(texts):
        raise DatasetError(f"{len(texts)} rows are too few to hold {n_heldout} out and still train")
    heldout = [texts[i] for i in sorted(order[:n_heldout])]
    train = [texts[i] for i in sorted(order[n_heldout:])]
    return train, heldout


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All texts tokenized and concatenated, each followed by the end-of-sequence token: shape [n_tokens]."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for encoded in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def pack(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """Texts packed into full blocks of ``seq_len`` tokens (no padding; the tail shorter than a block is
    dropped): shape [n_blocks, seq_len]."""
    stream = token_stream(tokenizer, texts)
    n_blocks = stream.numel() // seq_len
    if n_blocks == 0:
        raise DatasetError(f"{stream.numel()} tokens do not fill one block of {seq_len}")
    return stream[: n_blocks * seq_len].view(n_blocks, seq_len)


def check_batch_size(blocks: torch.Tensor, batch_size: int) -> None:
    """Refuse a batch larger than the training data (it could never be filled)."""
    if batch_size > blocks.shape[0]:
        raise DatasetError(
            f"batch size {batch_size} exceeds the {blocks.shape[0]} training blocks of {blocks.shape[1]} tokens"
        )


def batches(blocks: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches [batch_size, seq_len] of ``blocks``, reshuffled each epoch by a seeded generator."""
    check_batch_size(blocks, batch_size)
    return _shuffled_batches(blocks, batch_size, seed)


def _shuffled_batches(blocks: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(blocks.shape[0], generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield blocks[order[start : start + batch_size]]


def rank_rows(batch: torch.Tensor, rank: int, num_processes: int) -> torch.Tensor:
    """Rank ``rank``'s share of a global batch [batch, seq_len] when ``num_processes`` processes train together:
    its contiguous block of ``batch / num_processes`` rows (rank 0 the first), as accelerate's ``split_batches``
    divides a batch, so the ranks together see exactly the batch one process would, and ``batch_size`` keeps
    meaning the global batch. One process gets the whole batch.

    Raises ``ValueError`` when the rows do not divide evenly: unequal shares would weigh the ranks' tokens
    unequally in the averaged gradient, which would no longer be the global batch's.
    """
    if batch.shape[0] % num_processes:
        raise ValueError(f"a batch of {batch.shape[0]} rows does not split evenly over {num_processes} processes")
    rows = batch.shape[0] // num_processes
    return batch[rank * rows : (rank + 1) * rows]


def load_eval_text(source: str) -> str:
    """Evaluation text: ``wikitext`` (WikiText-2 raw test through ``datasets``) or a plain-text file's path.

    Line ends are normalised to ``\\n`` (the shared WikiText-2 copy has CRLF).
    """
    if source == WIKITEXT:
        rows = _load_from_hub("wikitext", "wikitext-2-raw-v1", split="test")
        return "\n\n".join(rows["text"])
    path = Path(source)
    if not path.is_file():
        raise DatasetError(f"{source}: no such evaluation text file (or pass 'wikitext' to use the hub)")
    text = _read_text(path).replace("\r\n", "\n")
    if not text.strip():
        raise DatasetError(f"{source}: the evaluation text is empty")
    return text
