"""evod.gguf: files written by the `gguf` package read by evod (F32, F16,
Q8_0), files published by evod read by the `gguf` package and by `evod
inspect --json`, evod -> evod round trips, mutate and crossover."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

import evod
import evod.gguf as eg
from conftest import run_evod

RNG = np.random.default_rng(7)
W = RNG.normal(size=(3, 64)).astype(np.float32)
H = RNG.normal(size=(2, 32)).astype(np.float16)
Q = RNG.normal(size=(4, 64)).astype(np.float32)


@pytest.fixture
def peer_file(tmp_path):
    """A file written by the gguf package."""
    path = tmp_path / "peer.gguf"
    w = gguf.GGUFWriter(str(path), "evod-test")
    w.add_uint32("t.u32", 7)
    w.add_int64("t.i64", -5)
    w.add_float32("t.f32", 0.25)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo")
    w.add_array("t.arr", [1, 2, 3])
    w.add_tensor("w", W)
    w.add_tensor("h", H)
    qbytes = gguf.quants.quantize(Q, gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("q", qbytes, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, qbytes


def test_open_a_file_the_gguf_package_wrote(peer_file):
    path, qbytes = peer_file
    f = eg.open(path)
    assert f.metadata["general.architecture"] == "evod-test"
    assert f.metadata["t.u32"] == 7 and f.types["t.u32"] == "u32"
    assert f.metadata["t.i64"] == -5 and f.types["t.i64"] == "i64"
    assert f.metadata["t.f32"] == 0.25 and f.types["t.f32"] == "f32"
    assert f.metadata["t.bool"] is True
    assert f.metadata["t.str"] == "héllo"
    assert f.metadata["t.arr"] == [1, 2, 3] and f.types["t.arr"].startswith("array[")
    assert list(f.tensors) == ["w", "h", "q"]

    w = f.tensors["w"]
    assert w.dtype == np.float32 and w.shape == W.shape and np.array_equal(w, W)
    # F32 is a read-only view of the map, kept alive by the array.
    assert not w.flags.writeable and not w.flags.owndata
    with pytest.raises(ValueError):
        w[0, 0] = 1.0
    assert f.tensors.type("w") == "F32"

    h = f.tensors["h"]
    assert h.dtype == np.float32 and np.array_equal(h, H.astype(np.float32))
    assert f.tensors.type("h") == "F16"

    q = f.tensors["q"]
    expected = gguf.quants.dequantize(qbytes, gguf.GGMLQuantizationType.Q8_0)
    assert q.shape == Q.shape and np.array_equal(q, expected.astype(np.float32))
    assert f.tensors.type("q") == "Q8_0"
    raw = f.tensors.raw("q")
    assert raw.type == "Q8_0" and raw.shape == Q.shape
    assert bytes(raw.data) == qbytes.tobytes()
    with pytest.raises(KeyError):
        f.tensors["nope"]


def test_publish_is_read_by_the_gguf_package_and_evod_inspect(tmp_path):
    path = tmp_path / "out.gguf"
    meta = {
        "general.architecture": "evod-test",
        "a.count": np.uint32(3),
        "a.big": 2**63 + 1,
        "a.neg": -2,
        "a.ratio": 0.5,
        "a.flag": False,
        "a.name": "x",
        "a.dims": np.array([4, 16, 2], np.uint32),
        "a.words": ["one", "two"],
    }
    tensors = {"w": W, "h": H, "i": np.arange(6, dtype=np.int32).reshape(2, 3)}
    report = eg.publish(path, meta, tensors)

    r = gguf.GGUFReader(str(path))
    fields = r.fields
    assert fields["a.count"].contents() == 3 and fields["a.count"].types == [gguf.GGUFValueType.UINT32]
    assert fields["a.big"].contents() == 2**63 + 1 and fields["a.big"].types == [gguf.GGUFValueType.UINT64]
    assert fields["a.neg"].contents() == -2 and fields["a.neg"].types == [gguf.GGUFValueType.INT64]
    assert fields["a.ratio"].contents() == 0.5 and fields["a.ratio"].types == [gguf.GGUFValueType.FLOAT64]
    assert fields["a.flag"].contents() is False
    assert fields["a.name"].contents() == "x"
    assert fields["a.dims"].contents() == [4, 16, 2]
    assert fields["a.dims"].types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32]
    assert fields["a.words"].contents() == ["one", "two"]
    by_name = {t.name: t for t in r.tensors}
    assert np.array_equal(by_name["w"].data, W)
    assert by_name["w"].tensor_type == gguf.GGMLQuantizationType.F32
    assert list(by_name["w"].shape) == [64, 3]  # GGUF order
    assert np.array_equal(by_name["h"].data, H) and by_name["h"].tensor_type == gguf.GGMLQuantizationType.F16
    assert np.array_equal(by_name["i"].data, tensors["i"])

    inspect = json.loads(run_evod("inspect", "--json", path).stdout)
    assert inspect["checksum"] == f"{report.checksum:016x}"
    assert inspect["file_size"] == report.bytes == path.stat().st_size
    assert [m["key"] for m in inspect["metadata"]] == list(meta)
    types = {m["key"]: m["type"] for m in inspect["metadata"]}
    assert types["a.count"] == "u32" and types["a.big"] == "u64" and types["a.dims"] == "array"
    assert [(t["name"], t["type"], t["dims"]) for t in inspect["tensors"]] == [
        ("w", "F32", [64, 3]),
        ("h", "F16", [32, 2]),
        ("i", "I32", [3, 2]),
    ]
    assert eg.open(path).checksum == report.checksum


def test_evod_round_trip_keeps_types_and_bytes(peer_file, tmp_path):
    path, _ = peer_file
    f = eg.open(path)
    copy = tmp_path / "copy.gguf"
    eg.publish(copy, f.metadata, f.tensors)
    g = eg.open(copy)
    assert g.metadata == f.metadata and g.types == f.types
    for name in f.tensors:
        assert f.tensors.type(name) == g.tensors.type(name)
        assert bytes(f.tensors.raw(name).data) == bytes(g.tensors.raw(name).data)
    assert g.checksum == f.checksum


def test_mutate_is_deterministic_and_only_touches_what_it_selects(peer_file, tmp_path):
    path, _ = peer_file
    f = eg.open(path)
    a = eg.mutate(f, sigma=0.1, seed=42, only="w")
    b = eg.mutate(f, sigma=0.1, seed=42, only="w")
    c = eg.mutate(f, sigma=0.1, seed=43, only="w")
    assert a["w"].tobytes() == b["w"].tobytes()
    assert a["w"].tobytes() != c["w"].tobytes()
    assert not np.array_equal(a["w"], f.tensors["w"])
    delta = (a["w"] - f.tensors["w"]) / 0.1
    assert 0.5 < float(delta.std()) < 1.5 and np.abs(delta).max() < 3.5
    # Dict order and the other tensors do not change a tensor's noise.
    alone = eg.mutate({"w": np.array(f.tensors["w"])}, sigma=0.1, seed=42)
    assert alone["w"].tobytes() == a["w"].tobytes()
    # A strided view mutates as its C-order copy; inputs are not modified.
    wt = np.array(W.T)
    before = wt.tobytes()
    strided = eg.mutate({"w": wt.T}, sigma=0.1, seed=42)["w"]
    assert strided.tobytes() == eg.mutate({"w": np.ascontiguousarray(wt.T)}, sigma=0.1, seed=42)["w"].tobytes()
    assert wt.tobytes() == before
    # Unselected tensors are written back byte-identical (F16 and Q8_0 too).
    out = tmp_path / "mutated.gguf"
    eg.publish(out, f.metadata, a)
    g = eg.open(out)
    for name in ("h", "q"):
        assert g.tensors.type(name) == f.tensors.type(name)
        assert bytes(g.tensors.raw(name).data) == bytes(f.tensors.raw(name).data)
    assert g.tensors["w"].tobytes() == a["w"].tobytes()
    # Globs; a dequantized tensor can be selected (it is then F32).
    both = eg.mutate(f, sigma=0.1, seed=42, only=["w", "q*"])
    assert both["w"].tobytes() == a["w"].tobytes()
    assert both["q"].dtype == np.float32 and not np.array_equal(both["q"], f.tensors["q"])
    with pytest.raises(evod.InputError):
        eg.mutate({"i": np.zeros(3, np.int32)}, sigma=0.1, seed=1)
    with pytest.raises(evod.InputError):
        eg.mutate({"w": W}, sigma=0.1, seed=-1)


def test_crossover_kinds():
    a = {"x": np.zeros((4, 100), np.float32), "y": np.ones(7, np.float32)}
    b = {"x": np.ones((4, 100), np.float32), "y": np.full(7, 3.0, np.float32)}
    u = eg.crossover(a, b, seed=5, kind="uniform")
    assert set(np.unique(u["x"])) == {0.0, 1.0}
    assert 100 < int(u["x"].sum()) < 300
    assert u["x"].tobytes() == eg.crossover(a, b, seed=5)["x"].tobytes()
    assert u["x"].tobytes() != eg.crossover(a, b, seed=6)["x"].tobytes()

    ar = eg.crossover(a, b, seed=5, kind="arithmetic")
    alpha = 1.0 - ar["x"]  # alpha * 0 + (1 - alpha) * 1
    assert np.all(alpha == alpha.flat[0]) and 0.0 <= alpha.flat[0] < 1.0
    assert np.all((ar["y"] >= 1.0) & (ar["y"] <= 3.0))

    only = eg.crossover(a, b, seed=5, only="y")
    assert only["x"] is a["x"]
    with pytest.raises(evod.ShapeError):
        eg.crossover(a, {"x": b["x"]}, seed=1)
    with pytest.raises(evod.ShapeError):
        eg.crossover(a, {"x": np.ones((4, 99), np.float32), "y": b["y"]}, seed=1)
    with pytest.raises(evod.InputError):
        eg.crossover(a, b, seed=1, kind="blend")


def test_malformed_files_are_gguf_errors(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 20)
    with pytest.raises(evod.GgufError) as e:
        eg.open(bad)
    assert "bad.gguf" in str(e.value) and isinstance(e.value, evod.Error)
    with pytest.raises(evod.GgufError):
        eg.open(tmp_path / "missing.gguf")
    with pytest.raises(evod.InputError):
        eg.publish(tmp_path / "x.gguf", {"k": object()}, {})
    with pytest.raises(evod.InputError):
        eg.publish(tmp_path / "x.gguf", {"k": 300}, {}, types={"k": "u8"})
    with pytest.raises(evod.InputError):
        eg.publish(tmp_path / "x.gguf", {}, {"t": np.zeros(2, np.complex64)})


def test_policy_from_layers_and_tensors_matches_the_model(tmp_path):
    model = tmp_path / "m.gguf"
    run_evod("init", "--task", "cartpole", "--layers", "4,8,2", "--seed", "3", "-o", model)
    f = eg.open(model)
    from_file = evod.Policy(f)
    from_tensors = evod.Policy([4, 8, 2], f.tensors, activation=f.metadata["evod.activation"])
    assert np.array_equal(from_file.params, from_tensors.params)
    obs = RNG.normal(size=(10, 4)).astype(np.float32)
    assert np.array_equal(from_file(obs), from_tensors(obs))
    assert from_file.act(obs[0]) == int(np.argmax(from_file(obs[0])))
    with pytest.raises(evod.ModelError):
        evod.Policy([4, 8, 2], np.zeros(5, np.float32))
    with pytest.raises(evod.ShapeError):
        from_file(np.zeros(3, np.float32))
