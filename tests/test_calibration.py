"""Calibration rows: file formats, the built-in mix, the held-out boundary and every error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from exl2rs import calibration
from exl2rs.calibration import (
    DEFAULT_MEASUREMENT_MIX,
    DEFAULT_MIX,
    WIKI_CALIBRATION_CHARS,
    calibration_hash,
    default_mix,
    load_rows,
    wiki_calibration_articles,
)
from exl2rs.errors import CalibrationError, Exl2Error
from exl2rs.fixtures import DOC_TAG, cal_data_dir

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


def encode(tokenizer: Any, text: str) -> list[int]:
    ids: list[int] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids


# -- file formats ----------------------------------------------------------------------------


def test_text_file_is_chopped_into_consecutive_rows(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "cal.txt"
    path.write_text(TEXT)
    rows = load_rows(path, tokenizer, 3, 50)
    assert rows.dtype == torch.long and rows.shape == (3, 50)
    assert rows.flatten().tolist() == encode(tokenizer, TEXT)[:150]


def test_directory_concatenates_files_in_sorted_order(tmp_path: Path, tokenizer: Any) -> None:
    (tmp_path / "b.txt").write_text("second file " * 30)
    (tmp_path / "a.md").write_text("first file " * 30)
    (tmp_path / "notes.bin").write_bytes(b"\x00\x01")  # unsupported files are not read
    want = encode(tokenizer, "first file " * 30) + encode(tokenizer, "second file " * 30)
    rows = load_rows(tmp_path, tokenizer, 2, 40)
    assert rows.flatten().tolist() == want[:80]


def test_jsonl_text_field(tmp_path: Path, tokenizer: Any) -> None:
    records = [{"text": f"record number {i} " * 5, "id": i} for i in range(20)]
    path = tmp_path / "cal.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    want = [t for r in records for t in encode(tokenizer, r["text"])]
    assert load_rows(path, tokenizer, 4, 30).flatten().tolist() == want[:120]
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(json.dumps({"body": r["text"]}) for r in records))
    assert load_rows(other, tokenizer, 4, 30, column="body").flatten().tolist() == want[:120]


def test_parquet_text_column(tmp_path: Path, tokenizer: Any) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"parquet row {i} holds some words " * 3 for i in range(30)]
    path = tmp_path / "cal.parquet"
    pq.write_table(pa.table({"content": texts, "n": list(range(30))}), path)
    want = [t for text in texts for t in encode(tokenizer, text)]
    rows = load_rows(path, tokenizer, 5, 40, column="content")
    assert rows.flatten().tolist() == want[:200]


def test_token_arrays(tmp_path: Path) -> None:
    ids = np.arange(600, dtype=np.int32).reshape(3, 200)
    np.save(tmp_path / "ids.npy", ids)
    rows = load_rows(tmp_path / "ids.npy", None, 4, 100)
    assert rows.flatten().tolist() == list(range(400))
    save_file({"input_ids": ids.astype(np.int64)}, str(tmp_path / "cal_data.safetensors"))
    rows = load_rows(tmp_path / "cal_data.safetensors", None, 3, 200)
    assert rows.tolist() == ids.tolist()
    save_file({"a": ids, "b": ids + 1}, str(tmp_path / "two.safetensors"))
    assert load_rows(tmp_path / "two.safetensors", None, 1, 5, column="b").tolist() == [
        [1, 2, 3, 4, 5]
    ]


# -- errors ----------------------------------------------------------------------------------


def test_too_little_text_names_file_and_counts(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "short.txt"
    path.write_text(TEXT)
    available = len(encode(tokenizer, TEXT))
    with pytest.raises(CalibrationError) as info:
        load_rows(path, tokenizer, 10, 2048)
    message = str(info.value)
    assert "short.txt" in message and "20480 tokens needed" in message
    assert f"{available} available" in message


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".parquet", ".npy"])
def test_empty_file(tmp_path: Path, tokenizer: Any, suffix: str) -> None:
    path = tmp_path / f"empty{suffix}"
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)
    elif suffix == ".npy":
        np.save(path, np.zeros(0, dtype=np.int64))
    else:
        path.write_text("\n  \n" if suffix == ".txt" else "")
    with pytest.raises(CalibrationError, match=rf"empty{suffix}: calibration file is empty"):
        load_rows(path, tokenizer, 1, 8)


def test_missing_column(tmp_path: Path, tokenizer: Any) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "cal.parquet"
    pq.write_table(pa.table({"content": ["abc"], "n": [1]}), path)
    with pytest.raises(
        CalibrationError, match=r"cal\.parquet: no column 'text' \(columns: content, n\)"
    ):
        load_rows(path, tokenizer, 1, 8)
    with pytest.raises(CalibrationError, match="column 'n' is int64, expected strings"):
        load_rows(path, tokenizer, 1, 8, column="n")
    jsonl = tmp_path / "cal.jsonl"
    jsonl.write_text('{"text": "fine"}\n{"body": "no text here"}\n')
    with pytest.raises(CalibrationError, match=r"cal\.jsonl:2: record has no 'text' field"):
        load_rows(jsonl, tokenizer, 1, 8)
    save_file(
        {"x": np.zeros(4, np.int64), "y": np.zeros(4, np.int64)}, str(tmp_path / "t.safetensors")
    )
    with pytest.raises(CalibrationError, match=r"t\.safetensors: no tensor 'input_ids'"):
        load_rows(tmp_path / "t.safetensors", tokenizer, 1, 4)


def test_unknown_extension_and_missing_paths(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "cal.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(CalibrationError, match=r"cal\.csv: unknown calibration file type '\.csv'"):
        load_rows(path, tokenizer, 1, 8)
    with pytest.raises(CalibrationError, match="does not exist"):
        load_rows(tmp_path / "nope.txt", tokenizer, 1, 8)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(CalibrationError, match="directory holds no calibration files"):
        load_rows(empty_dir, tokenizer, 1, 8)


def test_malformed_inputs(tmp_path: Path, tokenizer: Any) -> None:
    np.save(tmp_path / "neg.npy", np.array([5, -1, 7]))
    with pytest.raises(CalibrationError, match=r"neg\.npy: token ids must lie in \[0, 49152\)"):
        load_rows(tmp_path / "neg.npy", tokenizer, 1, 3)
    np.save(tmp_path / "float.npy", np.ones(8, dtype=np.float32))
    with pytest.raises(CalibrationError, match="must be integers, got dtype float32"):
        load_rows(tmp_path / "float.npy", tokenizer, 1, 3)
    (tmp_path / "bad.jsonl").write_text("{not json}\n")
    with pytest.raises(CalibrationError, match=r"bad\.jsonl:1: invalid JSON"):
        load_rows(tmp_path / "bad.jsonl", tokenizer, 1, 3)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 10)
    with pytest.raises(CalibrationError, match=r"latin1\.txt: not UTF-8"):
        load_rows(tmp_path / "latin1.txt", tokenizer, 1, 3)
    (tmp_path / "ok.txt").write_text(TEXT)
    for rows, length in [(0, 8), (2, -1)]:
        with pytest.raises(CalibrationError, match="must be positive integers"):
            load_rows(tmp_path / "ok.txt", tokenizer, rows, length)


def test_calibration_error_is_an_exl2_error() -> None:
    assert issubclass(CalibrationError, Exl2Error)


# -- the built-in mix ------------------------------------------------------------------------


def test_default_mix_tables() -> None:
    assert default_mix(19) == list(DEFAULT_MEASUREMENT_MIX)
    assert default_mix(115) == list(DEFAULT_MIX)
    assert sum(n for _, n in DEFAULT_MIX) == 115


@given(st.integers(min_value=1, max_value=2000))
@settings(max_examples=200, deadline=None)
def test_default_mix_apportions_exactly(rows: int) -> None:
    mix = default_mix(rows)
    assert sum(n for _, n in mix) == rows
    assert [name for name, _ in mix] == [name for name, _ in DEFAULT_MIX]
    if rows != 19:
        # Largest remainder: every share within one row of its exact quota.
        for (_, n), (_, weight) in zip(mix, DEFAULT_MIX, strict=True):
            assert abs(n - rows * weight / 115) < 1


def test_default_rows(tokenizer: Any) -> None:
    rows = load_rows("default", tokenizer, 19, 256)
    assert rows.shape == (19, 256) and rows.dtype == torch.long
    assert int(rows.min()) >= 0 and int(rows.max()) < len(tokenizer)
    assert torch.equal(rows, load_rows("default", tokenizer, 19, 256))  # deterministic
    other_seed = load_rows("default", tokenizer, 19, 256, seed=1)
    # Rows in mix order: c4 2, wiki 4, code 3, tiny 2, multilingual 3, shuffled 1, random 2, ...
    fixed = list(range(0, 14)) + [17, 18]
    seeded = [14, 15, 16]
    assert torch.equal(rows[fixed], other_seed[fixed])
    assert not torch.equal(rows[seeded], other_seed[seeded])
    bos = tokenizer.bos_token_id
    wiki = rows[2:6]
    # exllamav2's alignment: the first half of the wiki rows start right after a BOS, the
    # second half with the BOS of an article.
    assert [int(r[0]) == bos for r in wiki] == [False, False, True, True]
    c4_text = calibration._c4_text()
    assert rows[0].tolist() == encode(tokenizer, c4_text[:20000])[:256]


def test_wiki_articles_bound_is_exact() -> None:
    raw = '<doc id="1" title="A">\nA\n\nalpha text\n</doc>\n<doc id="2">\nB\n\nbeta text\n</doc>\n'
    stripped = DOC_TAG.sub("", raw)
    for limit in range(len(stripped) + 2):
        articles = wiki_calibration_articles(raw, limit)
        # Every article is a slice of stripped[:limit], in order.
        pos = 0
        prefix = stripped[:limit]
        for article in articles:
            found = prefix.find(article, pos)
            assert found >= 0, (limit, article)
            pos = found + len(article)
    assert wiki_calibration_articles(raw) == ["A\n\nalpha text\n", "B\n\nbeta text\n"]


def _raw_with_heldout_replaced(raw: str, junk: str) -> str:
    """``raw`` whose stripped text keeps [0, WIKI_CALIBRATION_CHARS) and is junk afterwards."""
    kept = 0
    pos = 0
    for match in DOC_TAG.finditer(raw):
        segment = match.start() - pos
        if kept + segment >= WIKI_CALIBRATION_CHARS:
            break
        kept += segment
        pos = match.end()
    cut = pos + (WIKI_CALIBRATION_CHARS - kept)
    return raw[:cut] + junk


def test_default_wiki_rows_never_read_the_heldout_region(
    tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = (cal_data_dir() / "wiki.utf8").read_text(encoding="utf-8")
    original = calibration._cal_file
    rows = calibration._default_source_rows("wiki", tokenizer, 8, 1024, 0)

    def patched(name: str) -> str:
        if name == "wiki.utf8":
            return _raw_with_heldout_replaced(raw, "</doc>\n<doc id='x'>\nZZZ junk\n" * 5000)
        return original(name)

    monkeypatch.setattr(calibration, "_cal_file", patched)
    assert (
        DOC_TAG.sub("", patched("wiki.utf8"))[:WIKI_CALIBRATION_CHARS]
        == DOC_TAG.sub("", raw)[:WIKI_CALIBRATION_CHARS]
    )
    assert torch.equal(calibration._default_source_rows("wiki", tokenizer, 8, 1024, 0), rows)


def test_default_wiki_runs_out_at_the_boundary(tokenizer: Any) -> None:
    # The first 1M characters hold ~246k tokens, the whole file ~461k: 150 rows of 2048 fit
    # the file but not the calibration part, so this must fail rather than read held-out text.
    with pytest.raises(CalibrationError, match="'wiki'.*ran out of documents"):
        calibration._default_source_rows("wiki", tokenizer, 150, 2048, 0)


def test_calibration_hash() -> None:
    a = torch.arange(12).view(3, 4)
    assert calibration_hash(a) == calibration_hash(a.clone())
    assert calibration_hash(a) != calibration_hash(a.view(4, 3))
    b = a.clone()
    b[2, 3] += 1
    assert calibration_hash(a) != calibration_hash(b)
    assert len(calibration_hash(a)) == 64
