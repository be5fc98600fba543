"""Tests of the kvtier Python module (run by tools/run-tests after `pip install .`)."""

import ctypes
import gc
import threading

import numpy as np
import pytest

import kvtier

# Tolerances against the float64 reference computed from the same (rounded)
# inputs:
# - fp32 output: only fp32 arithmetic separates the two: products and sums of
#   a few hundred terms (2^-24 relative each) and the kernels' exp, on outputs
#   of magnitude < 1 here. Measured max abs error ~4e-7; 1e-5 leaves 25x.
F32_ATOL = 1e-5
# - fp16 output: the fp32 result rounded to the nearest fp16, i.e. at most
#   half an ulp, 2^-11 relative (subnormals: 2^-25 absolute), plus the fp32
#   error above.
F16_RTOL = 2.0**-11


def reference_attention(k, v, q, scale=None):
    """Exact softmax attention in float64. k, v: [T, kv_heads, d]; q: [q_heads, d]."""
    k, v, q = (np.asarray(a, dtype=np.float64) for a in (k, v, q))
    t, kv_heads, d = k.shape
    group = q.shape[0] // kv_heads
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    out = np.empty((q.shape[0], d))
    for h in range(q.shape[0]):
        logits = k[:, h // group, :] @ q[h] * scale
        p = np.exp(logits - logits.max())
        out[h] = (p / p.sum()) @ v[:, h // group, :]
    return out


def random_kv(rng, n, shape, dtype=np.float16):
    k = rng.standard_normal((n, shape.kv_heads, shape.head_dim)).astype(dtype)
    v = rng.standard_normal((n, shape.kv_heads, shape.head_dim)).astype(dtype)
    return k, v


def small_shape(dtype="f16"):
    return kvtier.ModelShape(layers=2, q_heads=8, kv_heads=2, head_dim=64, dtype=dtype)


def exact_runtime(max_sequences=1, dtype="f16", max_context=256):
    opts = kvtier.Options(shape=small_shape(dtype), device_budget_fraction=1.0, max_context=max_context,
                          max_sequences=max_sequences)
    return kvtier.Runtime(opts)


def assert_close_f32(out, ref):
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=0, atol=F32_ATOL)


def assert_close_f16(out, ref):
    assert out.dtype == np.float16
    err = np.abs(out.astype(np.float64) - ref)
    bound = np.abs(ref) * F16_RTOL + F32_ATOL
    assert (err <= bound).all(), f"max error {err.max()} beyond fp16 rounding"


# ---- Shapes and options ----------------------------------------------------


def test_model_shape_attributes_and_repr():
    s = kvtier.ModelShape(layers=30, q_heads=9, kv_heads=3, head_dim=64, dtype="f16")
    assert (s.layers, s.q_heads, s.kv_heads, s.head_dim, s.dtype) == (30, 9, 3, 64, "f16")
    assert s.group == 3
    assert s.head_token_bytes == 2 * 64 * 2
    assert s.token_bytes == 256 * 30 * 3
    assert repr(s) == "ModelShape(layers=30, q_heads=9, kv_heads=3, head_dim=64, dtype='f16')"
    assert kvtier.ModelShape.smollm2_135m() == s
    assert kvtier.ModelShape.smollm2_135m(dtype="bf16").dtype == "bf16"
    s.dtype = "f32"
    assert s.dtype == "f32"


def test_options_every_field_is_a_keyword_and_attribute():
    values = dict(device_budget_bytes=1 << 20, device_budget_fraction=0.5, max_context=1024, max_sequences=2,
                  sink_tokens=8, recent_tokens=32, candidate_tokens=16, staging_tokens=8, recent_share=0.3,
                  candidate_share=0.3, staging_share=0.2, sketch_share=0.2, score_decay=0.8,
                  sketch_kind="count-sketch", sketch_rows=2, sketch_width=64, vague_policy="estimate",
                  recall_proxy="sketch", recall_tokens=4, recall_replace="outranked", recall_wait_us=10,
                  summary_tokens=32,
                  summary_share=0.1, block_tokens=16, host_tier_bytes=1 << 24, attention_scale=0.2,
                  nvme_dir="/tmp/x", nvme_bytes=1 << 26, io_queue_depth=8, demote_high=0.95, demote_low=0.5,
                  seed=7, backend="cpu")
    opts = kvtier.Options(shape=small_shape(), **values)
    for name, value in values.items():
        assert getattr(opts, name) == value, name
    defaults = kvtier.Options()
    for name, value in values.items():
        setattr(defaults, name, value)
        assert getattr(defaults, name) == value, name
    text = repr(opts)
    assert text.startswith("Options(shape=ModelShape(layers=2")
    assert "sketch_kind='count-sketch'" in text and "max_context=1024" in text
    # Defaults are C++'s: only the shape shows.
    assert repr(kvtier.Options()) == ("Options(shape=ModelShape(layers=0, q_heads=0, kv_heads=0, head_dim=0, "
                                      "dtype='f16'))")
    assert kvtier.Options().device_budget_fraction == 0.10
    assert kvtier.Options().sketch_kind == "centroid"
    assert kvtier.Options().recall_proxy == "block-bounds"
    assert kvtier.Options().recall_replace == "unused"
    assert kvtier.Options().score_decay == 0.9


@pytest.mark.parametrize("field,accepted", [
    ("sketch_kind", "'none', 'count-sketch', 'centroid'"),
    ("vague_policy", "'drop', 'estimate', 'shrink'"),
    ("recall_proxy", "'none', 'sketch', 'block-bounds'"),
    ("recall_replace", "'unused', 'outranked'"),
    ("backend", "'auto', 'cpu', 'cuda'"),
])
def test_unknown_enum_name_lists_the_accepted_ones(field, accepted):
    with pytest.raises(kvtier.InvalidArgumentError, match=f"{field} must be one of {accepted}; got 'bogus'"):
        kvtier.Options(**{field: "bogus"})
    opts = kvtier.Options()
    with pytest.raises(ValueError, match=accepted):
        setattr(opts, field, "bogus")
    with pytest.raises(ValueError, match="dtype must be one of 'f32', 'f16', 'bf16'; got 'f8'"):
        kvtier.ModelShape(layers=1, q_heads=1, kv_heads=1, head_dim=64, dtype="f8")


# ---- Exact attention -------------------------------------------------------


def test_full_budget_attend_equals_exact_attention():
    rng = np.random.default_rng(1)
    rt = exact_runtime()
    assert rt.backend_name == "cpu"
    plan = rt.plan
    assert plan["compressed"] is False and "holds every token" in plan["explain"]
    rt.add_sequence(3)
    shape = rt.shape
    ks, vs = [], []
    for layer in range(shape.layers):
        k, v = random_kv(rng, 150, shape)  # a prefill chunk
        rt.append(3, layer, k, v)
        ks.append([k])
        vs.append([v])
    for step in range(4):
        for layer in range(shape.layers):
            k, v = random_kv(rng, 1, shape)
            rt.append(3, layer, k[0], v[0])  # one decode token as [kv_heads, head_dim]
            ks[layer].append(k)
            vs[layer].append(v)
            q = (1.5 * rng.standard_normal((shape.q_heads, shape.head_dim))).astype(np.float16)
            ref = reference_attention(np.concatenate(ks[layer]), np.concatenate(vs[layer]), q)
            out32, counts = rt.attend_with_counts(3, layer, q, out_dtype="f32")
            assert_close_f32(out32, ref)
            assert counts == {"exact": (151 + step) * shape.kv_heads, "from_sketch": 0, "dropped": 0}
            assert_close_f16(rt.attend(3, layer, q), ref)
    assert rt.length(3, 0) == 154
    rt.check_invariants()


def test_out_is_written_in_place():
    rng = np.random.default_rng(2)
    rt = exact_runtime()
    rt.add_sequence(1)
    k, v = random_kv(rng, 40, rt.shape)
    rt.append(1, 0, k, v)
    q = rng.standard_normal((8, 64)).astype(np.float16)
    expected = rt.attend(1, 0, q)

    out = np.full((8, 64), np.nan, dtype=np.float16)
    address = out.__array_interface__["data"][0]
    got = rt.attend(1, 0, q, out=out)
    assert got is out and np.shares_memory(got, out)
    assert out.__array_interface__["data"][0] == address
    np.testing.assert_array_equal(out, expected)

    # The output dtype follows `out` (here f32) when out_dtype is not given.
    out32 = np.zeros((8, 64), dtype=np.float32)
    assert rt.attend(1, 0, q, out=out32) is out32
    assert_close_f32(out32, reference_attention(k, v, q))
    # A row of a larger buffer is a C-contiguous view: written through.
    big = np.zeros((3, 8, 64), dtype=np.float16)
    assert rt.attend(1, 0, q, out=big[1]) is not None
    np.testing.assert_array_equal(big[1], expected)
    assert not big[0].any() and not big[2].any()


def test_attend_batch_equals_per_sequence_attend():
    rng = np.random.default_rng(3)
    rt = exact_runtime(max_sequences=3)
    ids = [11, 5, 42]
    for i, sid in enumerate(ids):
        rt.add_sequence(sid)
        k, v = random_kv(rng, 30 + 25 * i, rt.shape)
        rt.append(sid, 1, k, v)
    qs = rng.standard_normal((3, 8, 64)).astype(np.float16)
    singles = np.stack([rt.attend(sid, 1, qs[i]) for i, sid in enumerate(ids)])
    batch = rt.attend_batch(1, ids, qs)
    assert batch.shape == (3, 8, 64) and batch.dtype == np.float16
    # Full budget: attend changes no state that enters the output, so equal bits.
    np.testing.assert_array_equal(batch, singles)

    outs = np.zeros((3, 8, 64), dtype=np.float32)
    got, counts = rt.attend_batch_with_counts(1, np.array(ids, dtype=np.uint64), qs, outs=outs)
    assert got is outs
    np.testing.assert_allclose(outs, singles.astype(np.float32), rtol=F16_RTOL, atol=1e-6)
    assert counts == {"exact": (30 + 55 + 80) * 2, "from_sketch": 0, "dropped": 0}
    with pytest.raises(kvtier.InvalidArgumentError, match=r"qs must be .*\[2, 8, 64\].*got float16 of shape \[3, 8, 64\]"):
        rt.attend_batch(1, ids[:2], qs)
    with pytest.raises(kvtier.InvalidArgumentError, match="sequence 5 twice"):
        rt.attend_batch(1, [5, 5, 11], qs)


# ---- A compressed budget ---------------------------------------------------


def test_compressed_budget_counts_add_up():
    rng = np.random.default_rng(4)
    shape = kvtier.ModelShape(layers=2, q_heads=9, kv_heads=3, head_dim=64)
    opts = kvtier.Options(shape=shape, device_budget_fraction=0.1, max_context=2048, sketch_kind="count-sketch")
    rt = kvtier.Runtime(opts)
    plan = rt.plan
    assert plan["compressed"] and plan["sketch_kind"] == "count-sketch" and plan["sketch_width"] > 0
    assert plan["total_bytes"] <= plan["budget_bytes"] == int(0.1 * plan["full_cache_bytes"])
    assert plan["slots"] == sum(plan[f"{r}_tokens"] for r in ("sink", "recent", "candidate", "staging"))
    rt.add_sequence(9)
    for layer in range(2):
        for _ in range(3):
            k, v = random_kv(rng, 500, shape)
            rt.append(9, layer, k, v)
    served = {"exact": 0, "from_sketch": 0, "dropped": 0}
    for step in range(5):
        for layer in range(2):
            k, v = random_kv(rng, 1, shape)
            rt.append(9, layer, k, v)
            q = rng.standard_normal((9, 64)).astype(np.float16)
            out, counts = rt.attend_with_counts(9, layer, q)
            assert np.isfinite(out.astype(np.float32)).all()
            length = rt.length(9, layer)
            assert length == 1501 + step
            # Every token of every KV head is served exactly or from the sketch.
            assert counts["exact"] + counts["from_sketch"] == length * shape.kv_heads
            assert counts["dropped"] == 0 and counts["from_sketch"] > 0
            for key in served:
                served[key] += counts[key]
    regions = rt.regions(9)
    assert regions["total"] == 2 * 1505 * 3
    assert regions["vague"] > regions["resident"] > 0
    assert regions["resident"] == sum(regions[r] for r in ("sink", "recent", "candidate", "recalled"))
    rt.drain()
    stats = rt.stats()
    assert stats["sequences"] == 1
    assert stats["served"] == served
    assert stats["attends"] == 10
    assert stats["appended_tokens"] == 2 * 1505
    assert {k: stats["regions"][k] for k in regions} == rt.regions(9)
    assert stats["recall"]["requested"] > 0
    assert stats["recalled_tokens"] == stats["recall"]["exact_hits"] + stats["recall"]["late_arrivals"]
    assert stats["device_reserved"]["total"] <= stats["device_budget_bytes"]
    assert stats["host_tier"]["bytes_in_use"] == stats["host_tier"]["blocks_in_use"] * stats["host_tier"]["block_bytes"]
    assert stats["disk_tier"]["bytes_in_use"] == 0
    assert set(stats["store"]) >= {"blocks", "demotions", "checksum_failures"}
    assert "recall" in rt.stats_text()
    rt.check_invariants()


def test_tokens_recall_and_introspection():
    rng = np.random.default_rng(5)
    shape = small_shape()
    opts = kvtier.Options(shape=shape, device_budget_fraction=0.2, max_context=1024, recall_proxy="none")
    rt = kvtier.Runtime(opts)
    assert rt.plan["recall_tokens"] == 0 and rt.plan["staging_tokens"] > 0
    rt.add_sequence(2)
    k, v = random_kv(rng, 800, shape)
    rt.append(2, 0, k, v)
    assert rt.token_region(2, 0, 0, 0) == "sink"
    assert rt.token_region(2, 0, 1, 799) == "recent"
    q = rng.standard_normal((8, 64)).astype(np.float16)
    top = rt.rank_vague(2, 0, 1, q, 5)
    assert top.dtype == np.int64 and top.shape == (5,)
    assert all(rt.token_region(2, 0, 1, int(p)) == "vague" for p in top)

    # A vague token: exact K/V from the host tier, an estimate from the sketch.
    pos = int(top[0])
    rk, rv = rt.read_token(2, 0, 1, pos)
    np.testing.assert_array_equal(rk, k[pos, 1])
    np.testing.assert_array_equal(rv, v[pos, 1])
    ek, ev = rt.estimate_token(2, 0, 1, pos)
    assert ek.dtype == np.float32 and ek.shape == (64,) and np.isfinite(ek).all() and np.isfinite(ev).all()

    assert rt.recall(2, 0, 1, top[:3]) == 3
    assert [rt.token_region(2, 0, 1, int(p)) for p in top[:3]] == ["recalled"] * 3
    with pytest.raises(kvtier.Error, match="not vague") as info:
        rt.estimate_token(2, 0, 1, pos)
    assert info.value.code == "FAILED_PRECONDITION" and not isinstance(info.value, ValueError)
    assert rt.recall_top(2, 0, q, 2) == 2 * shape.kv_heads
    assert rt.regions(2)["recalled"] == 3 + 2 * shape.kv_heads
    rt.check_invariants()
    rt.remove_sequence(2)
    with pytest.raises(kvtier.NotFoundError):
        rt.length(2, 0)


def test_append_with_scores_picks_heavy_hitters():
    rng = np.random.default_rng(6)
    shape = small_shape()
    opts = kvtier.Options(shape=shape, device_budget_fraction=0.5, max_context=512, sink_tokens=4,
                          recent_tokens=16, candidate_tokens=8, staging_tokens=0, recall_proxy="none",
                          max_sequences=2)
    rt = kvtier.Runtime(opts)
    rt.add_sequence(1)
    k, v = random_kv(rng, 200, shape)
    # Scores per token and KV head: head 0 favours 50..57, head 1 favours 100..107.
    scores = np.zeros((200, 2), dtype=np.float32)
    scores[50:58, 0] = 100.0
    scores[100:108, 1] = 100.0
    rt.append(1, 0, k, v, scores=scores)
    region = lambda h, p: rt.token_region(1, 0, h, p)  # noqa: E731
    assert [region(0, p) for p in range(50, 58)] == ["candidate"] * 8
    assert [region(1, p) for p in range(100, 108)] == ["candidate"] * 8
    assert region(0, 100) == "vague" and region(1, 50) == "vague"
    # Without scores every older token ties at 0 and the most recent ones stay.
    rt.add_sequence(2)
    rt.append(2, 0, k, v)
    assert rt.token_region(2, 0, 0, 50) == "vague" and rt.token_region(2, 0, 0, 183) == "candidate"
    # A single token takes [kv_heads] scores.
    rt.append(1, 0, k[0], v[0], scores=np.array([1.0, 2.0], dtype=np.float32))
    with pytest.raises(kvtier.InvalidArgumentError, match=r"scores\[1\] = -1"):
        rt.append(1, 0, k[:2], v[:2], scores=np.array([[0, -1], [0, 0]], dtype=np.float32))
    with pytest.raises(ValueError, match=r"scores must be .*float32.*\[3, 2\].*got float64 of shape \[3, 2\]"):
        rt.append(1, 0, k[:3], v[:3], scores=np.zeros((3, 2)))
    assert rt.length(1, 0) == 201
    rt.check_invariants()


# ---- Tensors: dtypes, DLPack, the array interface --------------------------


class DLPackOnly:
    """Exposes a numpy array through DLPack only (no buffer protocol)."""

    def __init__(self, array):
        self._array = array

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()


class ArrayInterfaceOnly:
    """Exposes a numpy array through __array_interface__ only."""

    def __init__(self, array):
        self._array = array
        self.__array_interface__ = array.__array_interface__


def test_dlpack_only_and_array_interface_objects_work_without_copies():
    rng = np.random.default_rng(7)
    rt = exact_runtime()
    rt.add_sequence(1)
    k, v = random_kv(rng, 20, rt.shape)
    rt.append(1, 0, DLPackOnly(k), ArrayInterfaceOnly(v))
    q = rng.standard_normal((8, 64)).astype(np.float16)
    expected = rt.attend(1, 0, q)
    for wrap in (DLPackOnly, ArrayInterfaceOnly):
        out = np.zeros((8, 64), dtype=np.float16)
        wrapped = wrap(out)
        assert rt.attend(1, 0, wrap(q), out=wrapped) is wrapped
        np.testing.assert_array_equal(out, expected)  # written into the wrapped memory
    with pytest.raises(TypeError, match="k must be an array"):
        rt.append(1, 0, [[0.0] * 64] * 2, v[0])


# DLPack structs, to hand over a bfloat16 tensor, which numpy cannot make.
class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


class BFloat16DLPack:
    """A DLPack bfloat16 (code 4) tensor over the bits in a uint16 array."""

    def __init__(self, bits):
        assert bits.dtype == np.uint16 and bits.flags.c_contiguous
        self._bits = bits
        self._shape = (ctypes.c_int64 * bits.ndim)(*bits.shape)
        self._tensors = []

    def __dlpack__(self, **kwargs):
        t = _DLManagedTensor()
        t.dl_tensor.data = self._bits.ctypes.data
        t.dl_tensor.device = _DLDevice(1, 0)
        t.dl_tensor.ndim = self._bits.ndim
        t.dl_tensor.dtype = _DLDataType(4, 16, 1)
        t.dl_tensor.shape = self._shape
        self._tensors.append(t)  # alive as long as this object
        return _capsule_new(ctypes.addressof(t), b"dltensor", None)

    def __dlpack_device__(self):
        return (1, 0)


def test_bf16_takes_uint16_bits_or_dlpack_bfloat16():
    rng = np.random.default_rng(8)
    rt = exact_runtime(dtype="bf16")
    rt.add_sequence(1)
    k32 = rng.standard_normal((60, 2, 64)).astype(np.float32)
    v32 = rng.standard_normal((60, 2, 64)).astype(np.float32)
    k, v = kvtier.f32_to_bf16(k32), kvtier.f32_to_bf16(v32)
    rt.append(1, 0, k, BFloat16DLPack(v))
    q = kvtier.f32_to_bf16(rng.standard_normal((8, 64)))
    ref = reference_attention(kvtier.bf16_to_f32(k), kvtier.bf16_to_f32(v), kvtier.bf16_to_f32(q))
    out32 = rt.attend(1, 0, BFloat16DLPack(q), out_dtype="f32")
    assert_close_f32(out32, ref)
    out = rt.attend(1, 0, q)
    assert out.dtype == np.uint16
    # bf16 rounding: half an ulp, 2^-8 relative.
    err = np.abs(kvtier.bf16_to_f32(out) - ref)
    assert (err <= np.abs(ref) * 2.0**-8 + F32_ATOL).all()
    rk, _ = rt.read_token(1, 0, 1, 7)
    np.testing.assert_array_equal(rk, k[7, 1])
    with pytest.raises(ValueError, match=r"bfloat16 \(or uint16 holding bf16 bits\).*got float16"):
        rt.attend(1, 0, q.view(np.float16))


# ---- Errors ----------------------------------------------------------------


def test_tensor_errors_name_expected_and_given():
    rt = exact_runtime()
    rt.add_sequence(1)
    k = np.zeros((5, 2, 64), dtype=np.float32)
    with pytest.raises(kvtier.InvalidArgumentError,
                       match=r"k must be a C-contiguous float16 array of shape \[n, 2, 64\] or \[2, 64\] in CPU "
                             r"memory; got float32 of shape \[5, 2, 64\]") as info:
        rt.append(1, 0, k, k)
    assert isinstance(info.value, ValueError) and info.value.code == "INVALID_ARGUMENT"
    with pytest.raises(ValueError, match=r"v must be .*got float16 of shape \[5, 2, 32\]"):
        rt.append(1, 0, k.astype(np.float16), np.zeros((5, 2, 32), np.float16))
    with pytest.raises(ValueError, match=r"k and v must have the same shape; got \[5, 2, 64\] and \[4, 2, 64\]"):
        rt.append(1, 0, k.astype(np.float16), np.zeros((4, 2, 64), np.float16))
    strided = np.zeros((5, 2, 128), np.float16)[:, :, ::2]
    with pytest.raises(ValueError, match=r"not C-contiguous \(strides in elements \[256, 128, 2\]"):
        rt.append(1, 0, strided, strided)
    rt.append(1, 0, np.zeros((2, 64), np.float16), np.zeros((2, 64), np.float16))
    q = np.zeros((4, 64), np.float16)
    with pytest.raises(ValueError, match=r"q must be .*\[8, 64\].*got float16 of shape \[4, 64\]"):
        rt.attend(1, 0, q)
    q = np.zeros((8, 64), np.float16)
    with pytest.raises(ValueError, match=r"out must be .*float32 array of shape \[8, 64\].*got float32 of shape \[64, 8\]"):
        rt.attend(1, 0, q, out=np.zeros((64, 8), np.float32))
    with pytest.raises(ValueError, match="out must be float32, float16 or bfloat16.*got int32"):
        rt.attend(1, 0, q, out=np.zeros((8, 64), np.int32))
    with pytest.raises(ValueError, match=r"out must be a C-contiguous float32 array.*got float16"):
        rt.attend(1, 0, q, out=np.zeros((8, 64), np.float16), out_dtype="f32")
    read_only = np.zeros((8, 64), np.float16)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writable"):
        rt.attend(1, 0, q, out=read_only)
    with pytest.raises(ValueError, match="out_dtype must be one of 'f32', 'f16', 'bf16'; got 'f64'"):
        rt.attend(1, 0, q, out_dtype="f64")
    nan = q.copy()
    nan[3, 5] = np.nan
    with pytest.raises(kvtier.InvalidArgumentError, match="q"):
        rt.attend(1, 0, nan)
    rt.check_invariants()


def test_status_errors_map_to_python_exceptions():
    rt = exact_runtime(max_sequences=2, max_context=64)
    rt.add_sequence(1)
    with pytest.raises(kvtier.Error, match="sequence 1 already exists") as info:
        rt.add_sequence(1)
    assert info.value.code == "ALREADY_EXISTS" and isinstance(info.value, RuntimeError)
    rt.add_sequence(2)
    with pytest.raises(kvtier.ResourceExhaustedError, match="cannot add sequence 3: all max_sequences = 2") as info:
        rt.add_sequence(3)
    assert isinstance(info.value, MemoryError) and info.value.code == "RESOURCE_EXHAUSTED"

    q = np.zeros((8, 64), np.float16)
    with pytest.raises(kvtier.NotFoundError, match="sequence 7") as info:
        rt.attend(7, 0, q)
    assert isinstance(info.value, KeyError) and info.value.code == "NOT_FOUND"
    assert str(info.value).startswith("sequence 7")  # no KeyError quotes
    try:
        rt.remove_sequence(7)
    except KeyError as e:  # idiomatic excepts work
        assert "7" in str(e)
    else:
        pytest.fail("remove_sequence of an unknown sequence did not raise")

    with pytest.raises(kvtier.Error) as info:
        rt.attend(1, 0, q)  # nothing appended yet
    assert info.value.code == "FAILED_PRECONDITION"
    with pytest.raises(kvtier.InvalidArgumentError, match="layer 5"):
        rt.length(1, 5)
    k = np.zeros((65, 2, 64), np.float16)
    with pytest.raises(MemoryError, match="appending 65 tokens .* max_context 64"):
        rt.append(1, 0, k, k)
    assert rt.length(1, 0) == 0  # a failed call changes nothing
    with pytest.raises(TypeError):
        rt.add_sequence(-1)


def test_bad_options_and_impossible_budget_raise_with_the_numbers():
    with pytest.raises(kvtier.InvalidArgumentError, match="device_budget_fraction must be in .*got 1.5"):
        kvtier.Runtime(kvtier.Options(shape=small_shape(), device_budget_fraction=1.5))
    with pytest.raises(ValueError, match="max_sequences must be in \\[1, 65536\\], got 0"):
        kvtier.Runtime(kvtier.Options(shape=small_shape(), max_sequences=0))
    with pytest.raises(ValueError, match="head_dim"):
        kvtier.Runtime(kvtier.Options(shape=kvtier.ModelShape(layers=1, q_heads=2, kv_heads=2, head_dim=7)))
    with pytest.raises(ValueError, match="head_dim"):
        kvtier.ModelShape(layers=1, q_heads=2, kv_heads=2, head_dim=7).validate()
    with pytest.raises(ValueError, match="vague_policy must be drop when sketch_kind is none"):
        kvtier.Options(shape=small_shape(), sketch_kind="none").validate()
    with pytest.raises(kvtier.InvalidArgumentError,
                       match=r"device budget of 4096 bytes .* cannot hold 1 sequence\(s\) x 2 layers x 2 KV heads"):
        kvtier.Runtime(kvtier.Options(shape=small_shape(), device_budget_bytes=4096))
    with pytest.raises(TypeError):
        kvtier.Options(max_context=1.5)
    with pytest.raises(TypeError):
        kvtier.Options(no_such_option=1)


# ---- Lifetimes and threads -------------------------------------------------


def test_objects_outlive_the_runtime_in_any_order():
    rng = np.random.default_rng(9)
    opts = kvtier.Options(shape=small_shape(), device_budget_fraction=1.0, max_context=128)
    shape = opts.shape  # refers into opts, which it keeps alive
    rt = kvtier.Runtime(opts)
    del opts
    gc.collect()
    assert shape.layers == 2
    rt.add_sequence(1)
    k, v = random_kv(rng, 10, small_shape())
    rt.append(1, 0, k, v)
    del k  # the runtime holds its own copy of the K/V
    gc.collect()
    out = rt.attend(1, 0, np.ones((8, 64), np.float16))
    kept = (rt.options, rt.plan, rt.stats(), rt.read_token(1, 0, 0, 3), rt.regions(1), out)
    del rt
    gc.collect()
    options, plan, stats, (rk, rv), regions, out = kept
    assert options.max_context == 128 and "ModelShape" in repr(options)
    assert plan["compressed"] is False and stats["attends"] == 1 and regions["total"] == 20
    assert np.isfinite(out.astype(np.float32)).all() and rk.shape == (64,) and rv.dtype == np.float16
    # The options copy makes a new runtime.
    assert kvtier.Runtime(options).plan == plan


def test_threads_drive_sequences_in_parallel():
    rng = np.random.default_rng(10)
    rt = exact_runtime(max_sequences=4)
    qs = rng.standard_normal((4, 8, 64)).astype(np.float16)
    data = [random_kv(rng, 64, rt.shape) for _ in range(4)]
    for sid in range(4):
        rt.add_sequence(sid)
    results, errors = {}, []

    def run(sid):
        try:
            for chunk in range(4):
                rt.append(sid, 0, data[sid][0][16 * chunk:16 * (chunk + 1)], data[sid][1][16 * chunk:16 * (chunk + 1)])
            results[sid] = rt.attend(sid, 0, qs[sid], out_dtype="f32")
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(sid,)) for sid in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for sid in range(4):
        assert_close_f32(results[sid], reference_attention(data[sid][0], data[sid][1], qs[sid]))
    rt.check_invariants()
