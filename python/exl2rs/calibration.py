"""Calibration rows: ``rows × length`` token ids from text, JSONL, parquet or token arrays.

Sources are tokenized in order and the token stream is chopped into consecutive rows, the way
exllamav2's converter treats a custom dataset. ``"default"`` is the built-in mix built from
exllamav2 0.3.2's ``standard_cal_data`` texts (fetched into the fixture cache on first use), with
``wiki.utf8`` restricted to its first 1,000,000 characters after the doc tags are stripped:
characters from there on are the held-out "wiki-ho" evaluation text and are never read here.
Sources and licences: ``exl2rs/data/CALIBRATION_LICENSES.md``.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exl2rs.errors import CalibrationError
from exl2rs.fixtures import DOC_TAG, cal_data_dir

TEXT_SUFFIXES = (".txt", ".text", ".utf8", ".md")
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
TOKEN_SUFFIXES = (".npy", ".safetensors")
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES + TOKEN_SUFFIXES
DEFAULT_TEXT_COLUMN = "text"
DEFAULT_TOKEN_KEY = "input_ids"  # the key exllamav2 uses in cal_data.safetensors

# The wiki-ho protocol: calibration may use characters [0, WIKI_CALIBRATION_CHARS) of the
# stripped wiki text; [WIKI_CALIBRATION_CHARS, ...) is evaluation text.
WIKI_CALIBRATION_CHARS = 1_000_000

# exllamav2 0.3.2's built-in mix (rows per source), in its row order: quantization pass and
# measurement pass. Other row counts are apportioned from the quantization mix.
DEFAULT_MIX: tuple[tuple[str, int], ...] = (
    ("c4", 10),
    ("wiki", 48),
    ("code", 15),
    ("tiny", 10),
    ("multilingual", 15),
    ("multilingual_shuffled", 5),
    ("random", 2),
    ("technical", 10),
)
DEFAULT_MEASUREMENT_MIX: tuple[tuple[str, int], ...] = (
    ("c4", 2),
    ("wiki", 4),
    ("code", 3),
    ("tiny", 2),
    ("multilingual", 3),
    ("multilingual_shuffled", 1),
    ("random", 2),
    ("technical", 2),
)
SHUFFLE_CHUNK = 128  # tokens per chunk of the shuffled multilingual rows
_TEXT_BLOCK_CHARS = 1 << 18  # tokenize large texts in blocks cut at line ends


# -- shared helpers ------------------------------------------------------------------------


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    ids: list[list[int]] = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return ids


def _text_blocks(text: str) -> Iterator[str]:
    start = 0
    while start < len(text):
        end = start + _TEXT_BLOCK_CHARS
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        yield text[start:end]
        start = end


def _take(
    streams: Iterable[list[int]], needed: int, what: str, rows: int, length: int
) -> torch.Tensor:
    """Concatenate token lists until ``needed`` tokens; error naming ``what`` if short."""
    buffer: list[int] = []
    for ids in streams:
        buffer.extend(ids)
        if len(buffer) >= needed:
            return torch.tensor(buffer[:needed], dtype=torch.long)
    raise CalibrationError(
        f"{what}: too little calibration data: {rows} rows × {length} tokens = {needed} "
        f"tokens needed, {len(buffer)} available"
    )


def calibration_hash(ids: torch.Tensor) -> str:
    """SHA-256 of the rows (shape and int64 values): the measurement file's calibration key."""
    digest = hashlib.sha256(repr(tuple(ids.shape)).encode())
    digest.update(np.ascontiguousarray(ids.cpu().numpy().astype("<i8")).tobytes())
    return digest.hexdigest()


# -- file sources --------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"{path}: not UTF-8 text ({exc})") from exc


def _text_file_tokens(path: Path, tokenizer: Any) -> Iterator[list[int]]:
    text = _read_text(path)
    if not text.strip():
        raise CalibrationError(f"{path}: calibration file is empty")
    for block in _text_blocks(text):
        yield from _encode(tokenizer, [block])


def _jsonl_tokens(path: Path, tokenizer: Any, column: str) -> Iterator[list[int]]:
    records = 0
    batch: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CalibrationError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
            if not isinstance(record, dict) or column not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise CalibrationError(
                    f"{path}:{lineno}: record has no {column!r} field (found {keys})"
                )
            value = record[column]
            if not isinstance(value, str):
                raise CalibrationError(
                    f"{path}:{lineno}: field {column!r} is {type(value).__name__}, "
                    "expected a string"
                )
            records += 1
            batch.append(value)
            if len(batch) == 64:
                yield from _encode(tokenizer, batch)
                batch = []
    if records == 0:
        raise CalibrationError(f"{path}: calibration file is empty (no JSONL records)")
    yield from _encode(tokenizer, batch)


def _parquet_tokens(path: Path, tokenizer: Any, column: str) -> Iterator[list[int]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - pyarrow is a declared extra
        raise CalibrationError(
            f"{path}: reading parquet needs pyarrow (pip install pyarrow)"
        ) from exc
    try:
        pfile = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise CalibrationError(f"{path}: not a readable parquet file ({exc})") from exc
    names = pfile.schema_arrow.names
    if column not in names:
        raise CalibrationError(
            f"{path}: no column {column!r} (columns: {', '.join(names)}); pass column=..."
        )
    field_type = pfile.schema_arrow.field(column).type
    if not (pa.types.is_string(field_type) or pa.types.is_large_string(field_type)):
        raise CalibrationError(f"{path}: column {column!r} is {field_type}, expected strings")
    if pfile.metadata.num_rows == 0:
        raise CalibrationError(f"{path}: calibration file is empty (0 parquet rows)")
    for batch in pfile.iter_batches(batch_size=256, columns=[column]):
        texts = [t for t in batch.column(0).to_pylist() if t]
        yield from _encode(tokenizer, texts)


def _token_array(path: Path, key: str | None) -> np.ndarray[Any, Any]:
    if path.suffix == ".npy":
        try:
            array: np.ndarray[Any, Any] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise CalibrationError(f"{path}: not a readable .npy array ({exc})") from exc
        return array
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise CalibrationError(f"{path}: not a readable safetensors file ({exc})") from exc
    if key is None:
        key = DEFAULT_TOKEN_KEY if DEFAULT_TOKEN_KEY in tensors or len(tensors) != 1 else None
        key = key if key is not None else next(iter(tensors))
    if key not in tensors:
        raise CalibrationError(
            f"{path}: no tensor {key!r} (tensors: {', '.join(sorted(tensors))}); pass column=..."
        )
    return tensors[key]


def _token_file_tokens(path: Path, tokenizer: Any, key: str | None) -> Iterator[list[int]]:
    array = _token_array(path, key)
    if array.size == 0:
        raise CalibrationError(f"{path}: calibration file is empty (0 token ids)")
    if not np.issubdtype(array.dtype, np.integer):
        raise CalibrationError(f"{path}: token ids must be integers, got dtype {array.dtype}")
    flat = array.reshape(-1).astype(np.int64)
    vocab = len(tokenizer) if tokenizer is not None else None
    low, high = int(flat.min()), int(flat.max())
    if low < 0 or (vocab is not None and high >= vocab):
        bound = vocab if vocab is not None else "vocab"
        raise CalibrationError(
            f"{path}: token ids must lie in [0, {bound}), found values in [{low}, {high}]"
        )
    yield flat.tolist()


def _file_tokens(path: Path, tokenizer: Any, column: str | None) -> Iterator[list[int]]:
    suffix = path.suffix.lower()
    if suffix in TOKEN_SUFFIXES:
        return _token_file_tokens(path, tokenizer, column)
    if tokenizer is None:
        raise CalibrationError(f"{path}: a tokenizer is needed to tokenize text")
    if path.stat().st_size == 0:
        raise CalibrationError(f"{path}: calibration file is empty")
    if suffix in TEXT_SUFFIXES:
        return _text_file_tokens(path, tokenizer)
    if suffix in JSONL_SUFFIXES:
        return _jsonl_tokens(path, tokenizer, column or DEFAULT_TEXT_COLUMN)
    if suffix in PARQUET_SUFFIXES:
        return _parquet_tokens(path, tokenizer, column or DEFAULT_TEXT_COLUMN)
    raise CalibrationError(
        f"{path}: unknown calibration file type {path.suffix!r} "
        f"(supported: {', '.join(SUPPORTED_SUFFIXES)})"
    )


def _directory_files(path: Path) -> list[Path]:
    files = sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES
    )
    if not files:
        raise CalibrationError(
            f"{path}: directory holds no calibration files ({', '.join(SUPPORTED_SUFFIXES)})"
        )
    return files


# -- the built-in default mix --------------------------------------------------------------


def default_mix(rows: int) -> list[tuple[str, int]]:
    """Rows per built-in source for ``rows`` rows in total.

    19 and 115 rows give exllamav2's measurement and quantization mixes exactly; other counts
    are apportioned from the quantization mix by largest remainder (ties in table order).
    """
    if rows == sum(n for _, n in DEFAULT_MEASUREMENT_MIX):
        return list(DEFAULT_MEASUREMENT_MIX)
    total = sum(n for _, n in DEFAULT_MIX)
    quotas = [rows * n / total for _, n in DEFAULT_MIX]
    counts = [int(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda k: (-(quotas[k] - counts[k]), k))
    for k in by_remainder[: rows - sum(counts)]:
        counts[k] += 1
    return [(name, count) for (name, _), count in zip(DEFAULT_MIX, counts, strict=True)]


def _cal_file(name: str) -> str:
    return _read_text(cal_data_dir() / name)


def wiki_calibration_articles(raw: str, limit: int = WIKI_CALIBRATION_CHARS) -> list[str]:
    """The articles of a raw ``wiki.utf8`` that lie within ``[0, limit)`` of its stripped text.

    Splitting on the doc tags yields pieces whose concatenation is exactly the stripped text
    (``fixtures.wiki_text``), so a running count of their lengths enforces the bound; the last
    article is cut at ``limit``.
    """
    articles = []
    budget = limit
    for piece in DOC_TAG.split(raw):
        if budget <= 0:
            break
        kept = piece[:budget]
        budget -= len(kept)
        body = kept[1:] if kept.startswith("\n") else kept  # rest of the <doc ...> line
        if body.strip():
            articles.append(body)
    return articles


def _document_rows(
    documents: Iterable[str], tokenizer: Any, rows: int, length: int, what: str
) -> torch.Tensor:
    """exllamav2's article-aligned rows: whole documents (BOS + text + EOS) concatenated until
    a row is full; the first half of the rows drops the leading BOS, the second keeps it."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prefix = [bos] if bos is not None else []
    suffix = [eos] if eos is not None else []
    docs = iter(documents)
    out = []
    for r in range(rows):
        drop_bos = bos is not None and r < rows // 2
        target = length + (1 if drop_bos else 0)
        row: list[int] = []
        while len(row) < target:
            try:
                doc = next(docs)
            except StopIteration:
                raise CalibrationError(
                    f"{what}: too little calibration data: ran out of documents at row "
                    f"{r + 1} of {rows} ({length} tokens each)"
                ) from None
            (ids,) = _encode(tokenizer, [doc])
            row.extend(prefix + ids + suffix)
        out.append(row[1 : length + 1] if drop_bos else row[:length])
    return torch.tensor(out, dtype=torch.long).view(rows, length)


def _chopped_rows(text: str, tokenizer: Any, rows: int, length: int, what: str) -> torch.Tensor:
    streams = (ids for block in _text_blocks(text) for ids in _encode(tokenizer, [block]))
    return _take(streams, rows * length, what, rows, length).view(rows, length)


def _c4_text() -> str:
    # exllamav2 joins the lines (each keeping its newline) with blank lines. StringIO splits
    # on "\n" only, like file.readlines(); str.splitlines would also split on \x0c, \u2028...
    return "\n\n".join(io.StringIO(_cal_file("c4.utf8")).readlines())


def _shuffled_rows(tokenizer: Any, rows: int, length: int, seed: int, what: str) -> torch.Tensor:
    text = _cal_file("multilingual.utf8")
    tokens = [t for block in _text_blocks(text) for t in _encode(tokenizer, [block])[0]]
    n_chunks = len(tokens) // SHUFFLE_CHUNK
    if n_chunks == 0:
        raise CalibrationError(f"{what}: too little text for {SHUFFLE_CHUNK}-token chunks")
    rng = random.Random(f"exl2rs:{seed}:multilingual_shuffled")
    out = []
    for _ in range(rows):
        row: list[int] = []
        while len(row) < length:
            k = rng.randrange(n_chunks)
            row.extend(tokens[k * SHUFFLE_CHUNK : (k + 1) * SHUFFLE_CHUNK])
        out.append(row[:length])
    return torch.tensor(out, dtype=torch.long).view(rows, length)


def _random_rows(tokenizer: Any, rows: int, length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, len(tokenizer), (rows, length), generator=generator, dtype=torch.long)


def _default_source_rows(
    name: str, tokenizer: Any, rows: int, length: int, seed: int
) -> torch.Tensor:
    what = f"default calibration source {name!r} ({cal_data_dir()})"
    builders: dict[str, Callable[[], torch.Tensor]] = {
        "c4": lambda: _chopped_rows(_c4_text(), tokenizer, rows, length, what),
        "code": lambda: _chopped_rows(_cal_file("code.utf8"), tokenizer, rows, length, what),
        "multilingual": lambda: _chopped_rows(
            _cal_file("multilingual.utf8"), tokenizer, rows, length, what
        ),
        "technical": lambda: _chopped_rows(
            _cal_file("technical.utf8"), tokenizer, rows, length, what
        ),
        "wiki": lambda: _document_rows(
            wiki_calibration_articles(_cal_file("wiki.utf8")), tokenizer, rows, length, what
        ),
        "tiny": lambda: _document_rows(
            (a.strip() for a in _cal_file("tiny.utf8").split("<|endoftext|>")),
            tokenizer,
            rows,
            length,
            what,
        ),
        "multilingual_shuffled": lambda: _shuffled_rows(tokenizer, rows, length, seed, what),
        "random": lambda: _random_rows(tokenizer, rows, length, seed),
    }
    return builders[name]()


def default_rows(tokenizer: Any, rows: int, length: int, *, seed: int = 0) -> torch.Tensor:
    """The built-in calibration set (see :func:`default_mix`), ``[rows, length]``."""
    if tokenizer is None:
        raise CalibrationError("the default calibration set needs a tokenizer")
    parts = [
        _default_source_rows(name, tokenizer, count, length, seed)
        for name, count in default_mix(rows)
        if count > 0
    ]
    return torch.cat(parts, dim=0)


# -- public entry point --------------------------------------------------------------------


def load_rows(
    source: str | Path,
    tokenizer: Any,
    rows: int,
    length: int,
    *,
    seed: int = 0,
    column: str | None = None,
) -> torch.Tensor:
    """Calibration token ids, a ``LongTensor`` of shape ``[rows, length]``.

    ``source``: ``"default"`` (the built-in mix), a text file (``.txt .text .utf8 .md``), a
    ``.jsonl`` file (``column`` field, default ``"text"``), a ``.parquet`` file (``column``
    column, default ``"text"``), a ``.npy`` / ``.safetensors`` array of token ids (safetensors
    key ``column``, default ``"input_ids"`` or the only tensor), or a directory of such files
    (read recursively in sorted order). Records and files are tokenized without special tokens
    and concatenated; the stream is chopped into consecutive rows. ``seed`` drives the random
    parts of the default mix (random-token rows, shuffled multilingual chunks).
    ``tokenizer`` may be ``None`` for token-id arrays (then ids are only checked to be >= 0).
    """
    if not isinstance(rows, int) or not isinstance(length, int) or rows < 1 or length < 1:
        raise CalibrationError(
            f"rows and length must be positive integers, got rows={rows!r}, length={length!r}"
        )
    if isinstance(source, str) and source == "default":
        ids = default_rows(tokenizer, rows, length, seed=seed)
    else:
        path = Path(source)
        if not path.exists():
            raise CalibrationError(f"{path}: calibration source does not exist")
        files = _directory_files(path) if path.is_dir() else [path]
        streams = (ids for file in files for ids in _file_tokens(file, tokenizer, column))
        ids = _take(streams, rows * length, str(path), rows, length).view(rows, length)
    return ids
