"""fednode.datasets on real SQLite files and real CSV/NPZ files: registration, loading and every refusal."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sqlite3

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedcore.errors import (
    DatasetFileError,
    DatasetFormatError,
    DatasetRegistryError,
    NodeStoreError,
)
from fedcore.plans.data import ArrayDataset
from fedcore.wire import DatasetInfo
from fednode import node_db
from fednode.datasets import DatasetRegistry

CSV = "age,bmi,label,pressure\n63,27.5,1,145\n41,22.0,0,120\n\n57,31.2,1,160\n"
CSV_X = np.array([[63, 27.5, 145], [41, 22.0, 120], [57, 31.2, 160]])
CSV_Y = np.array([1, 0, 1])


@pytest.fixture
def registry(tmp_path):
    return DatasetRegistry(tmp_path / "home" / "node.db")


@pytest.fixture
def csv_file(tmp_path):
    path = tmp_path / "heart.csv"
    path.write_text(CSV)
    return path


def write(tmp_path, text: str, name: str = "data.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------- CSV
def test_csv_add_records_metadata_and_load_returns_the_arrays(registry, csv_file):
    record = registry.add("heart", csv_file, ["tabular", "heart"], target_column="label")
    assert (record.name, record.format, record.target) == ("heart", "csv", "label")
    assert record.tags == ("heart", "tabular")
    assert (record.num_samples, record.shape, record.dtype) == (3, (3, 3), "<f4")
    assert (record.y_shape, record.y_dtype) == ((3,), "<f4")
    assert record.sha256 == hashlib.sha256(csv_file.read_bytes()).hexdigest()
    assert record.size == csv_file.stat().st_size
    assert record.path == csv_file.resolve()
    data = registry.load("heart")
    assert isinstance(data, ArrayDataset)
    np.testing.assert_array_equal(data.X, CSV_X.astype(np.float32))
    np.testing.assert_array_equal(data.y, CSV_Y.astype(np.float32))
    assert data.X.dtype == np.float32 and data.X.flags.c_contiguous


@pytest.mark.parametrize("target", ["label", 2, "2", -2, "-2"])
def test_csv_target_by_name_or_index(registry, csv_file, target):
    record = registry.add("heart", csv_file, target_column=target, dtype="float64")
    assert record.target == "label"
    data = registry.load("heart")
    np.testing.assert_array_equal(data.X, CSV_X)
    np.testing.assert_array_equal(data.y, CSV_Y)


def test_csv_quoted_cells_crlf_and_bom_parse(registry, tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes('\ufeff"a","b"\r\n1,"2.5"\r\n3,4\r\n'.encode())
    registry.add("excel", path, target_column="b", dtype="float64")
    data = registry.load("excel")
    np.testing.assert_array_equal(data.X, [[1.0], [3.0]])
    np.testing.assert_array_equal(data.y, [2.5, 4.0])


@settings(max_examples=25, deadline=None)
@given(hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=6),
                  elements=st.floats(allow_nan=False, allow_infinity=False, width=64)))
def test_csv_round_trips_float64_exactly(tmp_path_factory, table):
    tmp = tmp_path_factory.mktemp("csv")
    header = ",".join(f"c{j}" for j in range(table.shape[1] + 1))
    path = tmp / "t.csv"
    lines = [",".join([repr(float(v)) for v in row] + [str(i)]) for i, row in enumerate(table)]
    path.write_text("\n".join([header, *lines]) + "\n")
    reg = DatasetRegistry(tmp / "node.db")
    reg.add("t", path, target_column=-1, dtype="float64")
    data = reg.load("t")
    np.testing.assert_array_equal(data.X, table)
    np.testing.assert_array_equal(data.y, np.arange(len(table), dtype=np.float64))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", r"line 1 is empty"),
        ("1,2,3\n4,5,6\n", r"line 1 holds only numbers.*header row"),
        ("a,b,label\n", r"header but no data rows"),
        ("a,b,label\n  \n\n", r"header but no data rows"),
        ("label\n1\n2\n", r"only one column"),
        ("a,a,label\n1,2,3\n", r"header names repeated: \['a'\]"),
        ("a,,label\n1,2,3\n", r"header column 1 has no name"),
        ("a,b,label\n1,2,3\n4,5\n", r"line 3 has 2 fields, the header has 3"),
        ("a,sex,label\n1,2,0\n3,M,1\n", r"column 'sex' is not numeric: line 3 holds 'M'"),
        ("a,b,label\n1,2,0\n\n\n3,,1\n", r"column 'b' is not numeric: line 5 holds 'an empty cell'"),
        ("a,b,label\n1,2,0\n3,nan,1\n", r"column 'b' at line 3 holds nan.*NaN and infinite"),
        ("a,b,label\n1,-inf,0\n", r"column 'b' at line 2 holds -inf"),
        ("a,b,label\n1,2,NaN\n", r"column 'label' at line 2 holds nan"),
    ],
)
def test_bad_csv_is_refused_naming_the_problem(registry, tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(DatasetFormatError, match=expected) as info:
        registry.add("bad", path, target_column="label")
    assert str(path) in str(info.value)
    assert registry.list() == []


def test_non_numeric_column_far_down_a_large_file_names_its_line(registry, tmp_path):
    rows = "\n".join(f"{i},{i * 0.5},{i % 2}" for i in range(5000))
    path = write(tmp_path, "a,b,label\n" + rows + "\n4999,oops,1\n")
    with pytest.raises(DatasetFormatError, match=r"column 'b' is not numeric: line 5002 holds 'oops'"):
        registry.add("big", path, target_column="label")


def test_non_utf8_csv_is_refused(registry, tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("a,b,label\n1,2,0\n3,4,caf\xe9\n".encode("latin-1"))
    with pytest.raises(DatasetFormatError, match="not UTF-8"):
        registry.add("latin", path, target_column="label")


def test_csv_needs_a_known_target_column(registry, csv_file):
    with pytest.raises(DatasetRegistryError, match="needs a target column"):
        registry.add("heart", csv_file)
    columns = r"\['age', 'bmi', 'label', 'pressure'\]"
    with pytest.raises(DatasetRegistryError, match=r"'weight' is neither.*" + columns):
        registry.add("heart", csv_file, target_column="weight")
    with pytest.raises(DatasetRegistryError, match=r"index in \[-4, 3\]"):
        registry.add("heart", csv_file, target_column=4)


# ---------------------------------------------------------------------------------------------- NPZ
def test_npz_add_and_load_cast_x_keep_y(registry, tmp_path):
    X = np.arange(24, dtype=np.float64).reshape(4, 2, 3)
    y = np.array([0, 1, 2, 1], dtype=np.int64)
    np.savez(tmp_path / "images.npz", X=X, y=y, extra=np.zeros(2))
    record = registry.add("images", tmp_path / "images.npz", "imaging")
    assert (record.format, record.shape, record.dtype, record.num_samples) == ("npz", (4, 2, 3), "<f4", 4)
    assert (record.y_shape, record.y_dtype, record.target) == ((4,), "<i8", None)
    data = registry.load("images")
    np.testing.assert_array_equal(data.X, X.astype(np.float32))
    np.testing.assert_array_equal(data.y, y)
    assert data.X.dtype == np.float32 and data.y.dtype == np.int64


def test_npz_dtype_none_keeps_the_stored_dtype(registry, tmp_path):
    np.savez(tmp_path / "u8.npz", X=np.arange(6, dtype=np.uint8).reshape(3, 2), y=np.ones(3))
    record = registry.add("u8", tmp_path / "u8.npz", dtype=None)
    assert record.dtype == "|u1"
    assert registry.load("u8").X.dtype == np.uint8


@pytest.mark.parametrize(
    ("arrays", "expected"),
    [
        ({"X": np.ones((4, 2)), "y": np.ones(3)},
         r"X has 4 samples \(shape \(4, 2\)\) but y has 3 \(shape \(3,\)\)"),
        ({"X": np.ones((4, 2))}, r"arrays \['y'\] missing.*holds \['X'\]"),
        ({"features": np.ones((4, 2)), "labels": np.ones(4)}, r"\['X', 'y'\] missing"),
        ({"X": np.ones((0, 2)), "y": np.ones(0)}, "no samples"),
        ({"X": np.float64(1.0), "y": np.ones(1)}, "'X' is 0-d"),
        ({"X": np.array([["a", "b"]]), "y": np.ones(1)},
         r"'X' has dtype <U1, expected bool, integer or float"),
        ({"X": np.array([[1.0, np.nan], [2.0, 3.0]]), "y": np.ones(2)},
         r"array 'X' column 1 \(sample 0\) holds nan"),
        ({"X": np.ones((2, 2)), "y": np.array([1.0, np.inf])}, r"array 'y' at sample 1 holds inf"),
        ({"X": np.ones((2, 2), dtype=complex), "y": np.ones(2)}, r"dtype complex128"),
    ],
)
def test_bad_npz_is_refused_naming_the_problem(registry, tmp_path, arrays, expected):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DatasetFormatError, match=expected):
        registry.add("bad", path)
    assert registry.list() == []


def test_npz_with_pickled_objects_is_refused_without_unpickling(registry, tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, X=np.array([{"a": 1}, None], dtype=object), y=np.ones(2))
    with pytest.raises(DatasetFormatError, match="without pickle"):
        registry.add("objects", path)


def test_a_file_that_is_not_an_npz_is_refused(registry, tmp_path):
    path = tmp_path / "fake.npz"
    path.write_bytes(b"not a zip archive at all")
    with pytest.raises(DatasetFormatError, match="fake.npz"):
        registry.add("fake", path)


def test_npz_takes_no_target_column(registry, tmp_path):
    np.savez(tmp_path / "d.npz", X=np.ones((2, 2)), y=np.ones(2))
    with pytest.raises(DatasetRegistryError, match="CSV only"):
        registry.add("d", tmp_path / "d.npz", target_column="y")


# ---------------------------------------------------------------------------------------------- registry
def test_list_get_remove_and_persistence_across_reopen(tmp_path, csv_file):
    db = tmp_path / "node.db"
    np.savez(tmp_path / "b.npz", X=np.ones((5, 2)), y=np.zeros(5))
    first = DatasetRegistry(db)
    first.add("zeta", csv_file, ["a"], target_column="label")
    first.add("alpha", tmp_path / "b.npz", ["a", "b"])
    reopened = DatasetRegistry(db)
    assert [r.name for r in reopened.list()] == ["alpha", "zeta"]
    assert reopened.get("zeta") == first.get("zeta")
    removed = reopened.remove("zeta")
    assert removed.name == "zeta" and csv_file.exists()  # the file is left alone
    assert [r.name for r in DatasetRegistry(db).list()] == ["alpha"]
    with pytest.raises(DatasetRegistryError, match=r"no dataset named 'zeta'.*registered: \['alpha'\]"):
        reopened.get("zeta")
    with pytest.raises(DatasetRegistryError, match="no dataset named 'zeta'"):
        reopened.remove("zeta")
    with pytest.raises(DatasetRegistryError, match="no dataset named 'zeta'"):
        reopened.load("zeta")


def test_duplicate_name_is_refused_and_the_first_is_kept(registry, csv_file, tmp_path):
    registry.add("heart", csv_file, ["v1"], target_column="label")
    other = write(tmp_path, "x,label\n1,2\n", "other.csv")
    expected = r"'heart' is already registered.*heart\.csv.*dataset remove heart"
    with pytest.raises(DatasetRegistryError, match=expected):
        registry.add("heart", other, ["v2"], target_column="label")
    assert registry.get("heart").tags == ("v1",)
    assert len(registry.list()) == 1


def test_find_by_tags_needs_every_tag(registry, tmp_path):
    for name, tags in (("a", ["mri", "brain"]), ("b", ["mri"]), ("c", ["ct", "brain"])):
        np.savez(tmp_path / f"{name}.npz", X=np.ones((2, 1)), y=np.ones(2))
        registry.add(name, tmp_path / f"{name}.npz", tags)
    assert [r.name for r in registry.find_by_tags(["mri"])] == ["a", "b"]
    assert [r.name for r in registry.find_by_tags("brain")] == ["a", "c"]
    assert [r.name for r in registry.find_by_tags(["mri", "brain"])] == ["a"]
    assert registry.find_by_tags(["mri", "ct"]) == []
    assert [r.name for r in registry.find_by_tags([])] == ["a", "b", "c"]


def test_metadata_for_register_never_carries_the_path(registry, csv_file):
    registry.add("heart", csv_file, ["tabular"], target_column="label")
    (info,) = registry.metadata()
    assert info == DatasetInfo("heart", ("tabular",), 3, (3, 3), "<f4", "csv")
    fields = {f.name for f in dataclasses.fields(DatasetInfo)}
    assert fields == {"name", "tags", "num_samples", "shape", "dtype", "format"}
    assert str(csv_file.parent) not in repr(info)


@pytest.mark.parametrize("name", ["", "has space", "-leading", "a/b", "x" * 129, 7])
def test_invalid_names_are_refused(registry, csv_file, name):
    with pytest.raises(DatasetRegistryError, match="invalid dataset name"):
        registry.add(name, csv_file, target_column="label")


@pytest.mark.parametrize("tags", [["has space"], ["a,b"], [""], [3], 5])
def test_invalid_tags_are_refused(registry, csv_file, tags):
    with pytest.raises(DatasetRegistryError, match="tag"):
        registry.add("heart", csv_file, tags, target_column="label")


def test_format_options_are_checked(registry, tmp_path, csv_file):
    parquet = write(tmp_path, "", "data.parquet")
    with pytest.raises(DatasetRegistryError, match=r"suffix '.parquet'.*\['csv', 'npz'\]"):
        registry.add("p", parquet)
    with pytest.raises(DatasetRegistryError, match="unknown dataset format 'xlsx'"):
        registry.add("p", csv_file, fmt="xlsx")
    with pytest.raises(DatasetRegistryError, match="must be floating.*got int32"):
        registry.add("p", csv_file, target_column="label", dtype="int32")
    with pytest.raises(DatasetRegistryError, match="unknown dtype"):
        registry.add("p", csv_file, target_column="label", dtype="float33")
    renamed = tmp_path / "heart.txt"
    renamed.write_text(CSV)
    assert registry.add("txt", renamed, fmt="csv", target_column="label").format == "csv"


def test_registering_a_missing_file_or_a_directory_is_refused(registry, tmp_path):
    with pytest.raises(DatasetFileError, match="does not exist"):
        registry.add("ghost", tmp_path / "ghost.csv", target_column="label")
    (tmp_path / "dir.npz").mkdir()
    with pytest.raises(DatasetFileError, match="is a directory"):
        registry.add("dir", tmp_path / "dir.npz")


# ---------------------------------------------------------------------------------------------- load checks
def test_load_of_a_missing_file_names_the_path_and_the_fix(registry, csv_file):
    registry.add("heart", csv_file, ["tabular"], target_column="label")
    csv_file.unlink()
    with pytest.raises(DatasetFileError) as info:
        registry.load("heart")
    message = str(info.value)
    assert str(csv_file) in message and "no longer exists" in message
    assert "fednode dataset remove heart" in message
    assert "fednode dataset add heart" in message
    assert "--target label" in message and "--tags tabular" in message


@pytest.mark.parametrize(
    "edit",
    [
        lambda p: p.write_text(CSV + "50,20.0,0,110\n"),  # size changes
        lambda p: p.write_text(CSV.replace("63", "64")),  # same size, other bytes
    ],
)
def test_load_of_a_changed_file_is_refused(registry, csv_file, edit):
    registry.add("heart", csv_file, target_column="label")
    edit(csv_file)
    with pytest.raises(DatasetFileError, match=r"changed since registration.*SHA-256") as info:
        registry.load("heart")
    assert str(csv_file) in str(info.value) and "fednode dataset remove heart" in str(info.value)


def test_load_of_a_file_changed_to_hold_nan_is_refused(registry, csv_file):
    registry.add("heart", csv_file, target_column="label")
    csv_file.write_text(CSV.replace("27.5", "nan"))
    with pytest.raises(DatasetFileError, match="changed since registration"):
        registry.load("heart")


def test_touched_but_identical_file_still_loads(registry, csv_file):
    record = registry.add("heart", csv_file, target_column="label")
    os.utime(csv_file, ns=(record.mtime_ns + 10**9, record.mtime_ns + 10**9))
    assert csv_file.stat().st_mtime_ns != record.mtime_ns
    np.testing.assert_array_equal(registry.load("heart").X, CSV_X.astype(np.float32))


def test_two_handles_on_one_database_see_each_other(tmp_path, csv_file):
    db = tmp_path / "node.db"
    cli, node = DatasetRegistry(db), DatasetRegistry(db)
    cli.add("heart", csv_file, target_column="label")
    assert [r.name for r in node.list()] == ["heart"]
    assert len(node.load("heart")) == 3


# ---------------------------------------------------------------------------------------------- node.db
def test_schema_version_is_recorded_and_a_newer_one_is_refused(tmp_path):
    db = tmp_path / "node.db"
    DatasetRegistry(db)
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == node_db.SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.execute(f"PRAGMA user_version = {node_db.SCHEMA_VERSION + 1}")
    conn.close()
    newer, known = node_db.SCHEMA_VERSION + 1, node_db.SCHEMA_VERSION
    expected = rf"schema version {newer} but this fednode knows versions up to {known}"
    with pytest.raises(NodeStoreError, match=expected):
        DatasetRegistry(db)


def test_a_file_that_is_not_sqlite_is_a_store_error(tmp_path):
    bogus = tmp_path / "node.db"
    bogus.write_bytes(b"garbage" * 1000)
    with pytest.raises(NodeStoreError, match="node.db"):
        DatasetRegistry(bogus)
