"""Issue 23, item 2: a quoted line break and an over-long line are errors naming the file and
the real line (not the first line of the 1 MiB segment, not pyarrow's "straddling object")."""

from __future__ import annotations

import gzip

import pytest

from torchrec_lowprec.data import OOV_ID, TabularDataset, TabularSchema
from torchrec_lowprec.data.arrow_csv import MAX_LINE_BYTES

SCHEMA = TabularSchema(label="y", dense=("d",), categorical=("c",))


def _rows(n: int) -> list[str]:
    return [f"{i % 2},{i},v{i % 5}" for i in range(n)]


def _write(path, lines: list[str]) -> None:
    data = ("\n".join(lines) + "\n").encode()
    if str(path).endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)


def _scan(path, **kw):
    return TabularDataset(path, SCHEMA, fractions=(1.0, 0.0, 0.0), **kw).scan()


@pytest.mark.parametrize("segment_bytes", [1 << 20, 64, 152, 200])  # 152: line 22 ends a segment
@pytest.mark.parametrize("name", ["rows.csv", "rows.csv.gz"])
def test_a_quoted_line_break_names_its_file_and_line(tmp_path, segment_bytes, name):
    # Line 1 the header, lines 2..21 rows, line 22 opens a quoted field that line 23 closes.
    lines = ["y,d,c", *_rows(20), '1,5,"two', 'lines"', *_rows(30)]
    path = tmp_path / name
    _write(path, lines)
    with pytest.raises(ValueError, match=rf"{name}:22: .*quoted field holds a line break.*not supported"):
        _scan(path, segment_bytes=segment_bytes)
    with pytest.raises(ValueError, match=rf"{name}:22: "):  # fatal with strict=False too
        _scan(path, segment_bytes=segment_bytes, strict=False)


def test_quotes_that_close_on_their_line_still_parse(tmp_path):
    lines = ["y,d,c", '1,2,"a, b"', '0,3,"say ""hi"""', '1,4,ab"c', "0,5,plain"]
    path = tmp_path / "ok.csv"
    _write(path, lines)
    assert _scan(path, segment_bytes=16)["rows"]["train"] == 4


@pytest.mark.parametrize("segment_bytes", [1 << 20, 1 << 23])
def test_an_over_long_line_names_file_line_length_limit_and_option(tmp_path, segment_bytes):
    long_value = "x" * 10_000_000  # pyarrow: "straddling object ... increase block size?"
    path = tmp_path / "wide.csv"
    _write(path, ["y,d,c", *_rows(10), f"1,2,{long_value}", *_rows(5)])
    n = len(f"1,2,{long_value}")
    with pytest.raises(ValueError) as e:
        _scan(path, segment_bytes=segment_bytes)
    msg = str(e.value)
    assert f"wide.csv:12: line of {n} bytes" in msg, msg
    assert f"max_line_bytes={MAX_LINE_BYTES}" in msg and "4 MiB" in msg and len(msg) < 400, msg
    # Raising the limit reads it (a line longer than pyarrow's 4 MiB block included).
    data = TabularDataset(
        path, SCHEMA, fractions=(1.0, 0.0, 0.0), max_line_bytes=16 << 20, segment_bytes=segment_bytes
    )
    assert data.scan()["rows"]["train"] == 16
    assert data.vocabulary.lookup("c", [long_value])[0] != OOV_ID


def test_a_file_without_line_breaks_is_refused_without_reading_it_whole(tmp_path):
    path = tmp_path / "blob.csv"
    path.write_bytes(b"y,d,c\n1,2," + b"z" * (9 << 20))
    with pytest.raises(ValueError, match=r"blob.csv:2: line of \d+ bytes .*max_line_bytes"):
        _scan(path)
    headerless = TabularSchema(label=0, dense=(1,), categorical=(2,), header=False)
    path.write_bytes(b"z" * (9 << 20))
    with pytest.raises(ValueError, match=r"blob.csv:1: line of \d+ bytes .*max_line_bytes"):
        TabularDataset(path, headerless)
    with pytest.raises(ValueError, match=r"blob.csv:1: line of \d+ bytes .*max_line_bytes"):
        TabularDataset(path, SCHEMA)  # the header line
