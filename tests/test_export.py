"""`geoindex export`: one level of an index as one parquet file whose rows are the index's, in its order."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from geoindex.errors import ConfigError
from geoindex.geometry.tiles import tile_center_array
from geoindex.interfaces.cli import main
from geoindex.storage.export import export_level
from geoindex.storage.store import list_shards, read_embeddings, read_level_columns


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_export_holds_every_row_of_the_level_in_index_order(small_index, tmp_path, dtype):
    out = tmp_path / "z2.parquet"
    done = export_level(small_index, 2, out, dtype=dtype)
    table = pq.read_table(out)
    cols = read_level_columns(small_index, 2, ("x", "y"))
    stored = np.concatenate([read_embeddings(s) for s in list_shards(small_index, 2)])
    assert done.rows == table.num_rows == len(cols["x"]) == 16 and done.dim == stored.shape[1]
    assert table.column("row").to_pylist() == list(range(16)) and set(table.column("z").to_pylist()) == {2}
    assert np.array_equal(table.column("x").to_numpy(), cols["x"]) and np.array_equal(table.column("y").to_numpy(),
                                                                                      cols["y"])
    lat, lon = tile_center_array(cols["x"], cols["y"], zoom=2)
    assert np.allclose(table.column("lat").to_numpy(), lat) and np.allclose(table.column("lon").to_numpy(), lon)
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    assert emb.dtype == np.dtype(dtype) and np.array_equal(emb.astype(np.float16), stored)
    assert table.schema.metadata[b"geoindex.zoom"] == b"2"
    assert not list(tmp_path.glob("*.tmp"))


def test_export_command_writes_the_file_and_says_so(capsys, small_index, tmp_path):
    out = tmp_path / "z3.parquet"
    assert main(["export", "--index", str(small_index), "--zoom", "3", "--out", str(out)]) == 0
    assert pq.read_metadata(out).num_rows == 64
    assert f"wrote {out}: 64 tiles of zoom 3 with" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--zoom", "9"], "has no built level z9; it has [1, 2, 3] (--zoom)"),
    (["--zoom", "2", "--out", "{tmp}/z2.csv"], "name the file *.parquet"),
    (["--zoom", "2", "--out", "{tmp}/missing/z2.parquet"], "does not exist; create it first"),
])
def test_export_refuses_what_it_cannot_do_naming_the_option(capsys, small_index, tmp_path, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "z.parquet")]
    assert main(["export", "--index", str(small_index), *argv]) == 2
    assert message in capsys.readouterr().err


def test_unknown_dtype_is_a_config_error(small_index, tmp_path):
    with pytest.raises(ConfigError, match="--dtype"):
        export_level(small_index, 2, tmp_path / "z.parquet", dtype="int8")
