"""The cell result as a typed, versioned model: written once (``cell.py`` assembles it; ``results.write_cell_result``
checks one before writing it), validated on read (``CellResult.from_json``), read by field
(``result.training.timing.median_s``) instead of ``.get`` chains.

Valid is not reportable: a cell of zero steps (status ok, no timing, no loss) is a valid result, which the writers
write, but has no step figure for the report, which skips it (``measurement``'s ``min_items`` and ``reported``).

Each section is a dataclass of ``Section``: its fields are the keys the report, ``compare`` and the reading code
use, typed; a field without a default must be there (a key holding ``null`` is there), the others may be absent.
Keys a section does not declare (a new measurement, a setting added since) are kept in ``extra`` and written back
by ``to_json``, so a result never loses data by going through the model, and a new key never makes a result
unreadable. Which declared keys were absent is kept too: ``to_json(from_json(x)) == x``.

A measurement's table columns are declared on its field (``measurement``, ``Column``): the report's table, CSV,
ratios and ``compare`` take them from there (``table_columns``), so a new measurement adds its field and its
columns in one place.

Versions: ``VERSION`` is the schema's number (``qlora-bench/cell/<VERSION>``). Every published result is version 1;
version 1's writers added sections and keys over time (``memory.before_load``, ``floor``, ``training.hfu``,
``profile``, ...), which are optional here, so older version-1 files read as they are. A later version that renames
or moves a key adds its migration to ``MIGRATIONS`` (from an older version's JSON to the next one's).
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from qlora_core.units import GIB, MIB

VERSION = 1
SCHEMA_PREFIX = "qlora-bench/cell/"
SCHEMA = f"{SCHEMA_PREFIX}{VERSION}"
#: Older schema versions' JSON -> the next version's (``version: migrate``); none yet: every published result is 1.
MIGRATIONS: dict[int, Callable[[dict], dict]] = {}


class ResultError(ValueError):
    """A result (or a section of one) that does not fit the model: the file (when known) and each field that is
    missing or of the wrong type. ``missing`` lists the dotted paths of the missing fields, ``wrong`` the others'
    messages."""

    def __init__(self, missing: list[str], wrong: list[str], source: str | None = None, what: str = "cell result"):
        self.missing, self.wrong, self.source = missing, wrong, source
        parts = ([f"without {', '.join(missing)}"] if missing else []) + wrong
        super().__init__(f"{source + ': ' if source else ''}{what} {'; '.join(parts)}")


# --- columns --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """A column of the report's frame (CSV) and, with a ``header``, of its tables.

    Attributes:
        name: the frame's column, units in the name (``step_ms``).
        header: the table's header; None for a CSV-only column.
        fmt: the table's format of a value.
        scale: what the field's value is multiplied by (bytes -> MiB); ignored with ``read``.
        read: the value from a whole ``CellResult`` where the field alone does not give it; default: the field
            the column is declared on, times ``scale`` (None where the field or its section is None).
        ratio: also shown as a ratio to the baseline mode of the same model.
        compared: ``compare``'s label for the figure; None when ``compare`` leaves it out.
        worse: for ``compare``: +1 when higher is worse, -1 when lower is worse.
        timing: derives from the step time, so a noisy timing makes its change unrankable.
    """

    name: str
    header: str | None
    fmt: str = "{}"
    scale: float = 1.0
    read: Callable[[CellResult], Any] | None = None
    ratio: bool = False
    compared: str | None = None
    worse: int = +1
    timing: bool = False


def measurement(*columns: Column, min_items: int | None = None, reported: bool = False, **kwargs) -> Any:
    """A dataclass field carrying the report's ``columns`` of its value; ``field``'s keywords pass through.

    What a result must hold to be *reportable*, beyond what makes it *valid* (``CellResult.from_json``'s
    ``reportable``): for a list, the fewest items (``min_items``); for a field that may be None, that it is not
    (``reported``). A cell of zero steps is valid, with no timing and no loss, but not reportable."""
    return field(metadata={"columns": columns, "min_items": min_items, "reported": reported}, **kwargs)


def _read_path(result, path: tuple[str, ...]):
    for name in path:
        if result is None:
            return None
        result = getattr(result, name)
    return result


def table_columns(cls: type[Section] | None = None, path: tuple[str, ...] = ()) -> list[tuple[Column, Callable]]:
    """Every ``Column`` declared on the fields of ``cls`` (``CellResult`` by default) and of its sections,
    depth-first in field order (the report's column order), each with the reader of its value from a
    ``CellResult``."""
    cls = cls or CellResult
    found = []
    hints = _hints(cls)
    for item in _declared(cls):
        where = (*path, item.name)
        for column in item.metadata.get("columns", ()):
            found.append((column, column.read or _scaled_reader(where, column.scale)))
        if (section := _section_type(hints[item.name])) is not None:
            found += table_columns(section, where)
    return found


def _scaled_reader(path: tuple[str, ...], scale: float) -> Callable:
    def read(result):
        value = _read_path(result, path)
        return value if value is None or scale == 1.0 else value * scale
    return read


# --- the generic reader and writer ------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Section:
    """A JSON object read into a dataclass: declared keys typed and checked, others kept in ``extra``.

    ``REQUIRED_WITH``: key -> keys that become required when that key is present (a rule across fields)."""

    extra: dict = field(default_factory=dict, repr=False)
    absent: frozenset = field(default=frozenset(), repr=False)

    REQUIRED_WITH: ClassVar[dict[str, tuple[str, ...]]] = {}

    @classmethod
    def parse(cls, data: dict, path: str, problems: Problems):
        """``data`` as this section, problems (under ``path``) added to ``problems``."""
        hints = _hints(cls)
        values, absent = {}, []
        required = {item.name for item in _declared(cls) if _required(item)}
        for key, also in cls.REQUIRED_WITH.items():
            if key in data:
                required.update(also)
        for item in _declared(cls):
            where = f"{path}.{item.name}" if path else item.name
            if item.name not in data:
                absent.append(item.name)
                if item.name in required:
                    problems.missing += _required_leaves(hints[item.name], where)
                continue
            value = _parse(hints[item.name], data[item.name], where, problems)
            if problems.reportable:
                _check_reportable(item, value, where, problems)
            values[item.name] = value
        declared = {item.name for item in _declared(cls)}
        extra = {key: value for key, value in data.items() if key not in declared}
        for item in _declared(cls):  # placeholders for what is absent: the caller raises before using them
            if item.name not in values and _required(item):
                values[item.name] = None
        return cls(**values, extra=copy.deepcopy(extra), absent=frozenset(absent))

    @classmethod
    def from_json(cls, data, source: str | None = None, *, reportable: bool = True):
        """``data`` checked and typed as this section; ``ResultError`` naming ``source`` and each field missing or
        of the wrong type otherwise (``reportable``: also what the report needs, ``measurement``)."""
        problems = Problems(reportable)
        if not isinstance(data, dict):
            raise ResultError([], [f"is {type(data).__name__}, not an object"], source, cls.__name__)
        section = cls.parse(data, "", problems)
        if problems.missing or problems.wrong:
            raise ResultError(problems.missing, problems.wrong, source, cls.__name__)
        return section

    @classmethod
    def only(cls, **values):
        """A section holding just ``values`` (the other declared keys absent, as if read from JSON without them)."""
        return cls(**values, absent=frozenset(item.name for item in _declared(cls)) - set(values))

    def with_values(self, **values):
        """A copy with ``values`` set (and present in ``to_json`` even where they were absent)."""
        return dataclasses.replace(self, **values, absent=self.absent - set(values))

    def to_json(self) -> dict:
        """The section as JSON: declared keys (but those absent when read), then the ``extra`` ones."""
        data = {item.name: _dump(getattr(self, item.name)) for item in _declared(type(self))
                if item.name not in self.absent}
        return {**data, **copy.deepcopy(self.extra)}


class Problems:
    """What a parse found wrong; ``reportable``: check what the report needs too (``measurement``)."""

    def __init__(self, reportable: bool = True):
        self.missing: list[str] = []
        self.wrong: list[str] = []
        self.reportable = reportable


def _check_reportable(item: dataclasses.Field, value, where: str, problems: Problems) -> None:
    """Add to ``problems`` what ``value`` (of field ``item``, at ``where``) lacks for the report."""
    if (least := item.metadata.get("min_items")) and isinstance(value, list) and len(value) < least:
        problems.missing.append(f"{where}[{least - 1}]")
    if item.metadata.get("reported") and value is None:
        _wrong(where, "an object", value, problems)  # said as before valid and reportable were told apart


_HINTS: dict[type, dict] = {}


def _hints(cls: type) -> dict:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _declared(cls: type) -> list[dataclasses.Field]:
    return [item for item in dataclasses.fields(cls) if item.name not in ("extra", "absent")]


def _required(item: dataclasses.Field) -> bool:
    return item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING


def _section_type(hint) -> type[Section] | None:
    """The section a field holds (``X`` of ``X`` or ``X | None``), None for other types."""
    if _is_union(hint):
        sections = [arg for arg in typing.get_args(hint) if _section_type(arg)]
        return sections[0] if sections else None
    return hint if isinstance(hint, type) and issubclass(hint, Section) else None


def _is_union(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _required_leaves(hint, where: str) -> list[str]:
    """A missing field named as the report needs it: a section by its own required fields, others by name."""
    section = _section_type(hint)  # a section that may be None (a zero-step cell's timing) is named by its fields
    if section is None:
        return [where]
    leaves = [leaf for item in _declared(section) if _required(item)
              for leaf in _required_leaves(_hints(section)[item.name], f"{where}.{item.name}")]
    return leaves or [where]


_SCALARS = {float: "a number", int: "an integer", str: "a string", bool: "true or false", dict: "an object",
            list: "a list"}


def _wrong(where: str, expected: str, value, problems: Problems) -> None:
    problems.wrong.append(f"{where} is {type(value).__name__} {_short(value)}, not {expected}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _parse(hint, value, where: str, problems: Problems):
    """``value`` read as ``hint`` says (JSON types, sections, ``list[X]``, ``dict[str, X]``, ``X | None``)."""
    if hint is Any:
        return copy.deepcopy(value)
    if _is_union(hint):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _parse(inner, value, where, problems)
    origin = typing.get_origin(hint)
    if isinstance(hint, type) and issubclass(hint, Section):
        if not isinstance(value, dict):
            _wrong(where, "an object", value, problems)
            return None
        return hint.parse(value, where, problems)
    if origin is list:
        if not isinstance(value, list):
            _wrong(where, "a list", value, problems)
            return None
        (item,) = typing.get_args(hint)
        return [_parse(item, entry, f"{where}[{index}]", problems) for index, entry in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            _wrong(where, "an object", value, problems)
            return None
        _, item = typing.get_args(hint)
        return {key: _parse(item, entry, f"{where}.{key}", problems) for key, entry in value.items()}
    if not _is_a(hint, value):
        _wrong(where, _SCALARS[hint], value, problems)
        return None
    return copy.deepcopy(value)


def _is_a(hint: type, value) -> bool:
    if hint is float:  # JSON writes 2.0 as 2 where Python held an int
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _dump(value):
    if isinstance(value, Section):
        return value.to_json()
    if isinstance(value, list):
        return [_dump(entry) for entry in value]
    if isinstance(value, dict):
        return {key: _dump(entry) for key, entry in value.items()}
    return copy.deepcopy(value)


# --- the sections -----------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Mode(Section):
    """The mode's full description (``modes.Mode.describe``); only its name is read."""
    name: str


@dataclass(kw_only=True)
class Model(Section):
    """The model measured: its table label and provenance (where it came from, and a note for the table)."""
    label: str | None = None
    name_or_path: str | None = None
    provenance: dict | None = None
    model_type: str | None = None
    matmul_params: int | None = None
    attn_implementation: str | None = None  #: transformers' attention the cell ran (None: recorded before it was)


@dataclass(kw_only=True)
class LoraSettings(Section):
    r: int
    alpha: float
    target_modules: Any
    dropout: float | None = None


@dataclass(kw_only=True)
class TrainSettings(Section):
    optimizer: str
    learning_rate: float
    max_steps: int


@dataclass(kw_only=True)
class Settings(Section):
    """The cell's settings (``CellSettings.describe``). Every key is optional (results record what they had);
    one with its training described (``train``) needs what the report's run summary names. Settings added later
    are kept in ``extra`` until declared here."""
    mode: str | None = None
    model: str | None = None
    shape: str | None = None
    path: str | None = None
    seq_len: int | None = None
    batch_size: int | None = None
    timing_warmup: int | None = None
    gradient_checkpointing: bool | None = None
    eval_text: str | None = None
    eval_window: int | None = None
    eval_stride: int | None = None
    eval_max_tokens: int | None = None
    num_processes: int | None = None
    lora: LoraSettings | None = None
    train: TrainSettings | None = None

    REQUIRED_WITH: ClassVar = {"train": ("batch_size", "seq_len", "timing_warmup", "gradient_checkpointing", "lora")}


@dataclass(kw_only=True)
class Weights(Section):
    """The base's weights as stored (``measure.memory.weights_footprint``)."""
    weights_bytes: int = measurement(Column("weights_mib", "weights MiB", "{:.1f}", scale=1 / MIB, ratio=True))
    bits_per_quantized_param: float | None = measurement(Column("bits_per_param", "bits/param", "{:.3f}"))
    quantized_bytes: int | None = None
    quant_constants_bytes: int | None = None
    unquantized_bytes: int | None = None


@dataclass(kw_only=True)
class QuantError(Section):
    relative_l2: float | None = measurement(Column("quant_error", "weight err", "{:.2%}"), default=None)
    n_tensors: int | None = None


@dataclass(kw_only=True)
class MemorySnapshot(Section):
    """One reading (``measure.memory.memory_snapshot``): the CUDA allocator's counters, or the CPU's RSS."""
    kind: str
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    peak_rss_bytes: int | None = None

    @property
    def peak_bytes(self) -> int | None:
        """The peak it holds: allocated bytes on CUDA, RSS on CPU."""
        return self.peak_rss_bytes if self.peak_allocated_bytes is None else self.peak_allocated_bytes


@dataclass(kw_only=True)
class Memory(Section):
    before_load: MemorySnapshot | None = None
    after_load: MemorySnapshot | None = None
    after_setup: MemorySnapshot | None = None
    training_peak: MemorySnapshot


@dataclass(kw_only=True)
class MemoryPass(Section):
    """bench/'s separate memory-pass process before 2026-12 (joined to its cell by ``results``)."""
    memory: Memory | None = None
    settings: Settings | None = None
    load_s: float | None = None


@dataclass(kw_only=True)
class Timing(Section):
    """The timed steps (``measure.timing.step_timing``), in seconds."""
    median_s: float = measurement(Column("step_ms", "step ms", "{:.0f}", scale=1e3, ratio=True,
                                         compared="step ms (median)", worse=+1, timing=True))
    iqr_s: float = measurement(Column("step_iqr_ms", "± IQR ms", "{:.0f}", scale=1e3))
    noisy: bool = measurement(Column("noisy", None))
    rounds: int
    warmup: int


@dataclass(kw_only=True)
class BenchmarkStats(Section):
    """pytest-benchmark's own timing of the same steps (round trip to the worker included), seconds."""
    median_s: float = measurement(Column("bench_step_ms", None, scale=1e3))
    iqr_s: float = measurement(Column("bench_step_iqr_ms", None, scale=1e3))


@dataclass(kw_only=True)
class DeviceState(Section):
    sm_clock_mhz: float
    power_w: float
    temperature_c: float


def _first_loss(result: CellResult) -> float | None:
    return result.training.losses[0] if result.training else None


def _last_loss(result: CellResult) -> float | None:
    return result.training.losses[-1] if result.training else None


@dataclass(kw_only=True)
class Training(Section):
    """The training steps: timing first (the CSV's column order), then throughput, FLOPs and losses. A cell of
    zero steps (``cell.py``) timed none: its timing is None and its losses empty, valid but not reportable."""
    timing: Timing | None = measurement(reported=True)
    benchmark_stats: BenchmarkStats | None = None
    tokens_per_s: float | None = measurement(Column("tokens_per_s", "tokens/s", "{:.0f}", ratio=True,
                                                    compared="tokens/s", worse=-1, timing=True))
    mfu: float | None = measurement(Column("mfu", "MFU", "{:.1%}"))
    # hardware FLOPs utilisation (checkpointing's recompute counted): results made before it existed have none
    hfu: float | None = measurement(Column("hfu", "HFU", "{:.1%}"), default=None)
    losses: list[float] = measurement(Column("loss_first", None, read=_first_loss),
                                      Column("loss_last", None, read=_last_loss), min_items=1)
    step_seconds: list[float] | None = None
    device_states: list[DeviceState | None] | None = None
    step_cuda_mallocs: list[int] | None = None
    tokens_per_step: int | None = None
    flops_per_token: float | None = None
    peak_flops: dict | None = None
    hardware_flops_per_token: float | None = None


@dataclass(kw_only=True)
class PerplexityEntry(Section):
    """One text's perplexity (``measure.perplexity``): the figure and the protocol it was scored with."""
    perplexity: float
    window: int
    stride: int
    n_tokens_scored: int


@dataclass(kw_only=True)
class Floor(Section):
    """The analytic memory floor (``measure.floor``): the keys the report reads; the components
    ``floor.phase_components`` stacks, and those added since, stay in ``extra`` (``to_json`` gives them all)."""
    path: str
    tokens_per_micro_batch: int
    peak_bytes: int
    peak_phase: str
    # floors saved before it existed have none
    true_floor_bytes: int | None = None


@dataclass(kw_only=True)
class FloorComparison(Section):
    """A point of the floor beside what was measured there (None where the allocator cannot observe it)."""
    predicted_bytes: int
    measured_bytes: int | None
    remainder_bytes: int | None
    ratio: float | None
    measured_by: str | None


@dataclass(kw_only=True)
class HostOp(Section):
    name: str
    self_ms_per_call: float


@dataclass(kw_only=True)
class Profile(Section):
    """Where profiled steps' time went (``measure.profile.summarize``); device figures None on CPU."""
    calls: int
    wall_s_per_call: float
    kernel_s_per_call: float | None
    device_busy_share: float | None
    kernels_per_call: float | None
    host_ops_per_call: float
    top_host_ops: list[HostOp]


@dataclass(kw_only=True)
class AliveGroup(Section):
    """Blocks of one size alive at a traced peak (``measure.memory_trace``)."""
    block_bytes: int
    count: int
    bytes: int
    bytes_per_token: float


@dataclass(kw_only=True)
class MemoryAtPeak(Section):
    """What was alive at the peak of a traced step (``measure.memory_trace.alive_at_peak``)."""
    peak_bytes: int
    baseline_bytes: int
    baseline_freed_bytes: int
    events: int
    complete: bool
    tokens: int
    groups: list[AliveGroup]
    other_bytes: int


@dataclass(kw_only=True)
class Compile(Section):
    """How torch.compile handled a compiled cell: graph breaks by reason, and where each broke (source lines;
    results before 2026-12-07 have none), and how many graphs' code came from torch's compile cache
    (``trainer.compile_report``; results before 2026-12-08 do not say)."""
    first_step_s: float | None
    unique_graphs: int
    graph_breaks: dict[str, int]
    graph_break_sites: dict[str, list[str]] = field(default_factory=dict)
    inductor_cache: dict[str, int] | None = None


@dataclass(kw_only=True)
class Int8Outliers(Section):
    share: dict[str, float]


@dataclass(kw_only=True)
class Rank(Section):
    """One training process of a cell trained on several (``cell_ranks.merge_ranks``)."""
    rank: int
    memory: Memory


@dataclass(kw_only=True)
class Gpu(Section):
    name: str
    driver: str | None = None
    cuda: str | None = None


@dataclass(kw_only=True)
class Environment(Section):
    """Machine, libraries and commit (``results.environment``); every key optional (bench/ failures carry
    pytest-benchmark's, which may say less)."""
    gpu: Gpu | None = None
    cpu: str | None = None
    cpu_count: int | None = None
    libraries: dict[str, str | None] | None = None
    commit: str | None = None
    timestamp: str | None = None


def training_peak(result: CellResult) -> tuple[MemorySnapshot, bool]:
    """The training-peak snapshot to report, and whether it was read in a separate memory pass.

    The memory pass (a process of its own that loads, sets up LoRA and trains a few steps, with no evaluation)
    is preferred: the project measures memory apart from time and evaluation. A result without one (a sweep's,
    or a ``bench/`` cell whose pytest-benchmark JSON was lost) falls back to its own process's peak, which
    is reset after set-up and so also covers the training steps only.
    """
    if result.memory_pass is not None and result.memory_pass.memory is not None:
        return result.memory_pass.memory.training_peak, True
    return result.memory.training_peak, False


def _peak_gib(result: CellResult) -> float | None:
    if result.memory is None and (result.memory_pass is None or result.memory_pass.memory is None):
        return None
    peak = training_peak(result)[0].peak_bytes
    return None if peak is None else peak / GIB


#: The evaluation texts a cell scores (keys of its ``perplexity`` entries), as tables and notes name them.
TEXTS = {"heldout": "held-out quotes", "eval_text": "evaluation text"}
#: How the tables name a text in a column header.
TEXT_HEADERS = {"heldout": "quotes", "eval_text": "eval-text"}


def _ppl_reader(when: str, text: str) -> Callable[[CellResult], float | None]:
    def read(result: CellResult) -> float | None:
        entry = (result.perplexity or {}).get(when, {}).get(text)
        return None if entry is None else entry.perplexity
    return read


def _ppl_columns() -> tuple[Column, ...]:
    """Each text's perplexity before and after the LoRA steps; ``compare`` judges the after ones."""
    return tuple(Column(f"ppl_{text}_{when}", f"ppl {TEXT_HEADERS[text]} {when}", "{:.2f}",
                        read=_ppl_reader(when, text), ratio=True,
                        compared=f"ppl {TEXT_HEADERS[text]} {when}" if when == "after" else None)
                 for text in TEXTS for when in ("before", "after"))


@dataclass(kw_only=True)
class CellResult(Section):
    """One (model, mode) cell's result. ``status``, ``mode`` and ``settings`` are always there; a finished cell
    (status ``ok``) also has its model, weights, a training peak (``memory``, or a separate ``memory_pass``),
    training and perplexity (``REQUIRED_WHEN_OK``). Sections are in the order ``cell.py`` writes them."""
    schema: str
    status: str
    mode: Mode
    model: Model | None = None
    settings: Settings
    device: str | None = None
    error: str | None = None
    weights: Weights | None = None
    quant_error: QuantError | None = None
    memory: Memory | None = measurement(Column("peak_gib", "peak GiB", "{:.2f}", read=_peak_gib, ratio=True,
                                               compared="peak GiB", worse=+1), default=None)
    training: Training | None = None
    perplexity: dict[str, dict[str, PerplexityEntry]] | None = measurement(*_ppl_columns(), default=None)
    profile: Profile | None = None
    memory_at_peak: MemoryAtPeak | None = None
    floor: Floor | None = None
    predicted_vs_measured: dict[str, FloorComparison] | None = None
    compile: Compile | None = None
    note: str | None = None
    int8_matmul_dtype: str | None = None
    int8_outliers: Int8Outliers | None = None
    ranks: list[Rank] | None = None
    memory_pass: MemoryPass | None = None
    environment: Environment | None = None

    #: What a finished cell must hold besides (dotted paths; a section stands for its required fields).
    REQUIRED_WHEN_OK: ClassVar = ("model.provenance", "weights", "training", "perplexity")

    @classmethod
    def from_json(cls, data, source: str | None = None, *, reportable: bool = True) -> CellResult:
        """``data`` (a cell result's JSON, any version this code reads) checked and typed; ``ResultError`` naming
        ``source`` (the file, when known) and every field missing or of the wrong type otherwise.

        ``reportable`` (what the report reads): also refuse a finished cell without the step figures the report
        shows (``measurement``'s ``min_items``, ``reported``); False: a valid result, as a writer checks it, which
        a cell of zero steps (status ok, no timing, no loss) is."""
        problems = Problems(reportable)
        if not isinstance(data, dict):
            raise ResultError([], [f"is {type(data).__name__}, not an object"], source)
        data = migrate(data, source)
        result = cls.parse(data, "", problems)
        if not problems.missing and not problems.wrong and result.status == "ok":
            problems.missing += result._missing_when_ok(data)
        if problems.missing or problems.wrong:
            raise ResultError(problems.missing, problems.wrong, source)
        return result

    def _missing_when_ok(self, data: dict) -> list[str]:
        missing = [leaf for path in self.REQUIRED_WHEN_OK if not _holds(data, path)
                   for leaf in _required_leaves(_path_type(CellResult, path), path)]
        if self.memory is None and (self.memory_pass is None or self.memory_pass.memory is None):
            missing += _required_leaves(Memory, "memory")
        return missing

    @property
    def label(self) -> str | None:
        """The model's own label, None where the result has none."""
        return None if self.model is None else self.model.label

    def ppl(self, when: str, text: str) -> PerplexityEntry | None:
        """The perplexity entry of ``text`` (``TEXTS``) at ``when`` (before, after, merged), None if not scored."""
        return (self.perplexity or {}).get(when, {}).get(text)


def _holds(data, path: str) -> bool:
    for key in path.split("."):
        if not isinstance(data, dict) or key not in data:
            return False
        data = data[key]
    return True


def _path_type(cls: type[Section], path: str):
    """The type a dotted path of ``cls`` holds, sections unwrapped from ``| None``."""
    hint = None
    for key in path.split("."):
        hint = _hints(cls)[key]
        cls = _section_type(hint)
    return cls or hint


def migrate(data: dict, source: str | None = None) -> dict:
    """A cell result's JSON brought to ``VERSION`` (``MIGRATIONS``); ``ResultError`` for a schema that is not a
    cell's or is newer than this code."""
    schema = data.get("schema")
    version = schema[len(SCHEMA_PREFIX):] if isinstance(schema, str) and schema.startswith(SCHEMA_PREFIX) else None
    if version is None or not version.isdigit():
        raise ResultError(["schema"] if schema is None else [], [] if schema is None else
                          [f"schema is {schema!r}, not {SCHEMA_PREFIX}<version>"], source)
    number = int(version)
    if number > VERSION:
        raise ResultError([], [f"schema {schema!r} is newer than this version reads ({SCHEMA!r})"], source)
    while number < VERSION:
        data = MIGRATIONS[number](data)
        number += 1
    return data


def as_cells(results: Iterable[CellResult | dict]) -> list[CellResult]:
    """``results`` typed: ``CellResult``s as they are, JSON (as ``cell.run_cell`` returns it) read through
    ``CellResult.from_json``."""
    return [result if isinstance(result, CellResult) else CellResult.from_json(result) for result in results]
