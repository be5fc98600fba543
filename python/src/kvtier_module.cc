// kvtier._kvtier — the Python binding of the kvtier runtime (nanobind).
//
// Tensors cross without copies: every K/V/Q/output argument must already be a
// C-contiguous CPU array of the exact dtype the shape names, taken through
// DLPack, the buffer protocol or the array interface; anything else is an
// InvalidArgumentError (a ValueError) naming the expected and the given shape
// and dtype. bf16 has no numpy dtype: bf16 tensors are DLPack bfloat16
// tensors, or uint16 arrays holding the bf16 bits (outputs the module
// allocates are such uint16 arrays).
//
// The GIL is released around every call into the runtime (Runtime is
// thread-safe), so Python threads can drive different sequences in parallel.
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/string_view.h>
#include <nanobind/stl/vector.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "kvtier/budget.h"
#include "kvtier/dtype.h"
#include "kvtier/model_shape.h"
#include "kvtier/options.h"
#include "kvtier/runtime.h"
#include "kvtier/stats.h"

namespace nb = nanobind;

namespace kvtier::python {
namespace {

// ---------------------------------------------------------------------------
// Errors: a non-OK absl::Status becomes kvtier.Error or one of its subclasses.
// ---------------------------------------------------------------------------

// The exception classes, created once at import; the module's attributes hold
// the references, so these stay valid as long as the module does.
PyObject* g_error = nullptr;
PyObject* g_invalid_argument = nullptr;
PyObject* g_not_found = nullptr;
PyObject* g_resource_exhausted = nullptr;

PyObject* ErrorClass(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kInvalidArgument: return g_invalid_argument;
    case absl::StatusCode::kNotFound: return g_not_found;
    case absl::StatusCode::kResourceExhausted: return g_resource_exhausted;
    default: return g_error;
  }
}

// Raises the Python exception for a non-OK status (the GIL must be held).
[[noreturn]] void Raise(const absl::Status& status) {
  PyObject* cls = ErrorClass(status.code());
  nb::object exc = nb::borrow(cls)(nb::str(status.message().data(), status.message().size()));
  exc.attr("code") = nb::str(absl::StatusCodeToString(status.code()).c_str());
  PyErr_SetObject(cls, exc.ptr());
  throw nb::python_error();
}

[[noreturn]] void RaiseInvalid(const std::string& message) { Raise(absl::InvalidArgumentError(message)); }

void Check(const absl::Status& status) {
  if (!status.ok()) Raise(status);
}

template <class T>
T Value(absl::StatusOr<T>&& result) {
  if (!result.ok()) Raise(result.status());
  return *std::move(result);
}

// Creates `name` in the module: a subclass of `bases` with `code` as its
// class-level default (instances raised by the module carry their own).
PyObject* MakeErrorClass(nb::module_& m, const char* name, nb::tuple bases, const char* code, const char* doc) {
  nb::dict ns;
  ns["__module__"] = "kvtier";
  ns["__doc__"] = doc;
  ns["code"] = code;
  // KeyError quotes its message in str(); every kvtier error prints it as is.
  ns["__str__"] = nb::borrow(PyExc_BaseException).attr("__str__");
  nb::object cls = nb::borrow(reinterpret_cast<PyObject*>(&PyType_Type))(name, bases, ns);
  m.attr(name) = cls;
  return cls.ptr();
}

// ---------------------------------------------------------------------------
// Names of enums and dtypes.
// ---------------------------------------------------------------------------

// Parses one of the names name(E(0)) .. name(E(count - 1)).
template <class E>
E ParseName(std::string_view field, std::string_view s, std::string_view (*name)(E), int count) {
  std::vector<std::string> accepted;
  for (int i = 0; i < count; ++i) {
    const E e = static_cast<E>(i);
    if (name(e) == s) return e;
    accepted.push_back(absl::StrCat("'", std::string(name(e)), "'"));
  }
  RaiseInvalid(absl::StrFormat("%s must be one of %s; got '%s'", field, absl::StrJoin(accepted, ", "), s));
}

std::string_view DTypeNameFn(DType t) { return DTypeName(t); }
DType ParseDType(std::string_view field, std::string_view s) { return ParseName<DType>(field, s, DTypeNameFn, 3); }

// How an Options field crosses: plain values as they are, enums as their names.
template <class T>
struct Field {
  using Py = T;
  static T From(std::string_view, const T& v) { return v; }
  static T To(const T& v) { return v; }
};
template <class E, std::string_view (*kName)(E), int kCount = 3>
struct EnumField {
  using Py = std::string;
  static E From(std::string_view field, const std::string& s) { return ParseName<E>(field, s, kName, kCount); }
  static std::string To(E e) { return std::string(kName(e)); }
};
template <> struct Field<SketchKind> : EnumField<SketchKind, SketchKindName> {};
template <> struct Field<VaguePolicy> : EnumField<VaguePolicy, VaguePolicyName> {};
template <> struct Field<RecallProxy> : EnumField<RecallProxy, RecallProxyName> {};
template <> struct Field<RecallReplace> : EnumField<RecallReplace, RecallReplaceName, 2> {};
template <> struct Field<BackendKind> : EnumField<BackendKind, BackendKindName> {};
#define KVTIER_FIELD(name) Field<decltype(Options::name)>

// Every scalar field of kvtier::Options, in declaration order, with its doc.
#define KVTIER_OPTION_FIELDS(X)                                                                                    \
  X(device_budget_bytes, "Total device bytes; 0 (default): use device_budget_fraction.")                          \
  X(device_budget_fraction,                                                                                        \
    "Used when device_budget_bytes is 0: fraction of the full cache of max_sequences sequences at max_context "     \
    "tokens, in (0, 1]; 1.0 holds every token exactly. Default 0.10.")                                             \
  X(max_context, "Longest sequence in tokens, in [1, 2^30]. Default 8192.")                                        \
  X(max_sequences, "Sequences held at once, in [1, 65536]; the budget is split evenly. Default 1.")                \
  X(sink_tokens, "Attention-sink tokens kept at the start, in [0, 1024]. Default 4.")                              \
  X(recent_tokens, "Recent window; 0 (default): derived from recent_share, else >= 16.")                           \
  X(candidate_tokens, "Heavy-hitter candidates; -1 (default): derived from candidate_share; 0 disables.")          \
  X(staging_tokens, "Staging slots for recalled tokens; -1 (default): derived from staging_share.")                \
  X(recent_share, "Share of the budget for a derived recent window, in [0, 1]. Default 0.25.")                     \
  X(candidate_share, "Share for derived candidates, in [0, 1]. Default 0.35.")                                     \
  X(staging_share, "Share for derived staging, in [0, 1]. Default 0.15.")                                          \
  X(sketch_share, "Share for a derived sketch, in [0, 1]. Default 0.10.")                                          \
  X(score_decay, "Accumulated-attention decay per step, in (0, 1]. Default 0.9.")                                  \
  X(sketch_kind, "'none', 'count-sketch' or 'centroid' (default).")                                                \
  X(sketch_rows, "Sketch hash rows, in [0, 8]; 0 (default): 1.")                                                   \
  X(sketch_width, "Sketch buckets per row; 0 (default): derived from sketch_share. In [0, 65536].")                \
  X(vague_policy, "What attention does with vague tokens: 'drop', 'estimate' or 'shrink' (default).")              \
  X(recall_proxy, "How recall ranks vague tokens: 'none', 'sketch' or 'block-bounds' (default).")                  \
  X(recall_tokens, "Vague tokens recalled per KV head after each attend; -1 (default): derived; 0: none.")         \
  X(recall_replace, "Installed tokens automatic recall may replace: 'unused' (default) or 'outranked'.")           \
  X(recall_wait_us, "How long an attend waits for recalls in flight, in [0, 10^7] us. Default 0.")                 \
  X(summary_tokens, "block-bounds: vague tokens per key-bounds summary; 0 (default): derived.")                    \
  X(summary_share, "block-bounds: share of the budget for summaries, in (0, 1). Default 0.05.")                    \
  X(block_tokens, "Tokens per host-tier block (a multiple of 4096 bytes); 0 (default): derived.")                  \
  X(host_tier_bytes, "Cap on host-tier bytes; 0 (default): no cap.")                                               \
  X(attention_scale, "Logit scale; 0 (default): 1/sqrt(head_dim).")                                                \
  X(nvme_dir, "Directory of the disk tier's file; empty (default): no disk tier. Needs host_tier_bytes > 0.")      \
  X(nvme_bytes, "Cap on the disk tier's bytes; required (> 0) with nvme_dir.")                                     \
  X(io_queue_depth, "io_uring queue depth of the disk tier, in [1, 4096]. Default 32.")                            \
  X(demote_high, "Demote host blocks to disk above this fraction of the host cap. Default 0.9.")                   \
  X(demote_low, "... down to this fraction; 0 < demote_low <= demote_high <= 1. Default 0.8.")                     \
  X(seed, "Seed of the sketch hashes and SimHash planes.")                                                         \
  X(backend, "'cpu' (default). The module passes numpy (host) arrays, so it runs on the CPU backend only.")

template <class T>
std::string ReprOf(const T& v) {
  return nb::cast<std::string>(nb::repr(nb::cast(v)));
}

std::string ShapeRepr(const ModelShape& s) {
  return absl::StrFormat("ModelShape(layers=%d, q_heads=%d, kv_heads=%d, head_dim=%d, dtype='%s')", s.layers,
                         s.q_heads, s.kv_heads, s.head_dim, DTypeName(s.dtype));
}

// ---------------------------------------------------------------------------
// Tensors.
// ---------------------------------------------------------------------------

using InArray = nb::ndarray<nb::ro>;  // accepts read-only memory
using OutArray = nb::ndarray<>;       // writable memory only

std::string DlpackDTypeName(nb::dlpack::dtype dt) {
  using C = nb::dlpack::dtype_code;
  std::string base;
  switch (static_cast<C>(dt.code)) {
    case C::Int: base = absl::StrCat("int", dt.bits); break;
    case C::UInt: base = absl::StrCat("uint", dt.bits); break;
    case C::Float: base = absl::StrCat("float", dt.bits); break;
    case C::Bfloat: base = absl::StrCat("bfloat", dt.bits); break;
    case C::Complex: base = absl::StrCat("complex", dt.bits); break;
    case C::Bool: return "bool";
    default: base = absl::StrFormat("dtype(code=%d, bits=%d)", dt.code, dt.bits); break;
  }
  if (dt.lanes != 1) absl::StrAppend(&base, "x", dt.lanes);
  return base;
}

// Element types a tensor argument may have.
enum class Elem { kF16, kBF16, kF32, kI64 };

Elem ElemOf(DType t) {
  switch (t) {
    case DType::kF16: return Elem::kF16;
    case DType::kBF16: return Elem::kBF16;
    case DType::kF32: return Elem::kF32;
  }
  return Elem::kF32;
}

std::string ElemName(Elem e) {
  switch (e) {
    case Elem::kF16: return "float16";
    case Elem::kBF16: return "bfloat16 (or uint16 holding bf16 bits)";
    case Elem::kF32: return "float32";
    case Elem::kI64: return "int64";
  }
  return "?";
}

// numpy dtype of arrays the module allocates.
const char* NumpyName(Elem e) {
  switch (e) {
    case Elem::kF16: return "float16";
    case Elem::kBF16: return "uint16";
    case Elem::kF32: return "float32";
    case Elem::kI64: return "int64";
  }
  return "?";
}

bool Matches(nb::dlpack::dtype dt, Elem e) {
  using C = nb::dlpack::dtype_code;
  if (dt.lanes != 1) return false;
  switch (e) {
    case Elem::kF16: return dt.code == uint8_t(C::Float) && dt.bits == 16;
    case Elem::kBF16: return (dt.code == uint8_t(C::Bfloat) || dt.code == uint8_t(C::UInt)) && dt.bits == 16;
    case Elem::kF32: return dt.code == uint8_t(C::Float) && dt.bits == 32;
    case Elem::kI64: return dt.code == uint8_t(C::Int) && dt.bits == 64;
  }
  return false;
}

// Dimension -1 in a pattern accepts any size >= 1 (written as `wildcard`).
struct Pattern {
  std::vector<int64_t> dims;
  std::string wildcard = "n";
};

std::string PatternText(const Pattern& p) {
  std::vector<std::string> parts;
  for (int64_t d : p.dims) parts.push_back(d < 0 ? p.wildcard : absl::StrCat(d));
  return absl::StrCat("[", absl::StrJoin(parts, ", "), "]");
}

template <class A>
std::string ShapeText(const A& a) {
  std::vector<int64_t> s(a.shape_ptr(), a.shape_ptr() + a.ndim());
  return absl::StrCat("[", absl::StrJoin(s, ", "), "]");
}

template <class A>
bool ShapeMatches(const A& a, const Pattern& p) {
  if (a.ndim() != p.dims.size()) return false;
  for (size_t i = 0; i < p.dims.size(); ++i) {
    const int64_t got = static_cast<int64_t>(a.shape(i));
    if (p.dims[i] < 0 ? got < 1 : got != p.dims[i]) return false;
  }
  return true;
}

template <class A>
bool CContiguous(const A& a) {
  int64_t accum = 1;
  for (int64_t i = static_cast<int64_t>(a.ndim()) - 1; i >= 0; --i) {
    if (a.shape(i) != 1 && a.stride(i) != accum) return false;
    accum *= static_cast<int64_t>(a.shape(i));
  }
  return true;
}

// Imports `h` as an array without copying: DLPack or the buffer protocol
// (nanobind), else the array interface through a numpy view of the same memory.
template <class A>
bool Import(nb::handle h, A& out) {
  if (nb::try_cast(h, out, /*convert=*/false)) return true;
  if (nb::hasattr(h, "__array_interface__")) {
    nb::object view = nb::module_::import_("numpy").attr("asarray")(h);
    return nb::try_cast(view, out, /*convert=*/false);
  }
  return false;
}

// Checks a tensor argument (CPU memory, dtype, one of the shapes, C order,
// element alignment) and returns the index of the matching pattern.
template <class A>
size_t CheckArray(std::string_view what, const A& a, Elem elem, const std::vector<Pattern>& patterns) {
  size_t match = patterns.size();
  for (size_t i = 0; i < patterns.size() && match == patterns.size(); ++i) {
    if (ShapeMatches(a, patterns[i])) match = i;
  }
  const int dev = a.device_type();
  const bool on_cpu = dev == nb::device::cpu::value || dev == nb::device::cuda_host::value;
  const bool dtype_ok = Matches(a.dtype(), elem);
  const bool contiguous = match == patterns.size() || CContiguous(a);
  const uintptr_t addr = reinterpret_cast<uintptr_t>(a.data_handle()) + a.byte_offset();
  const bool aligned = a.itemsize() == 0 || addr % a.itemsize() == 0;
  if (on_cpu && dtype_ok && match < patterns.size() && contiguous && aligned) return match;

  std::vector<std::string> shapes;
  for (const Pattern& p : patterns) shapes.push_back(PatternText(p));
  std::string got = absl::StrFormat("%s of shape %s", DlpackDTypeName(a.dtype()), ShapeText(a));
  if (!on_cpu) absl::StrAppend(&got, absl::StrFormat(" on DLPack device type %d", dev));
  if (match < patterns.size() && !contiguous) {
    std::vector<int64_t> strides(a.stride_ptr(), a.stride_ptr() + a.ndim());
    absl::StrAppend(&got, ", not C-contiguous (strides in elements [", absl::StrJoin(strides, ", "),
                    "]; np.ascontiguousarray makes a contiguous copy)");
  }
  if (!aligned) absl::StrAppend(&got, absl::StrFormat(", data not aligned to its %d-byte elements", a.itemsize()));
  RaiseInvalid(absl::StrFormat("%s must be a C-contiguous %s array of shape %s in CPU memory; got %s", what,
                               ElemName(elem), absl::StrJoin(shapes, " or "), got));
}

const void* InData(const InArray& a) { return static_cast<const char*>(a.data_handle()) + a.byte_offset(); }
void* OutData(const OutArray& a) { return static_cast<char*>(a.data_handle()) + a.byte_offset(); }

std::string TypeName(nb::handle h) { return nb::cast<std::string>(nb::type_name(h.type())); }

InArray Input(std::string_view what, nb::handle h) {
  InArray a;
  if (!Import(h, a)) {
    throw nb::type_error(absl::StrFormat("%s must be an array (numpy, DLPack or array interface); got %s", what,
                                         TypeName(h)).c_str());
  }
  return a;
}

OutArray Output(std::string_view what, nb::handle h) {
  OutArray a;
  if (Import(h, a)) return a;
  InArray ro;
  if (Import(h, ro)) RaiseInvalid(absl::StrFormat("%s must be writable; got a read-only %s", what, TypeName(h)));
  throw nb::type_error(absl::StrFormat("%s must be a writable array (numpy, DLPack or array interface); got %s", what,
                                       TypeName(h)).c_str());
}

// A new numpy array of `shape` in `elem`, its memory in *data.
nb::object NewArray(const std::vector<size_t>& shape, Elem elem, void** data) {
  nb::object arr = nb::module_::import_("numpy").attr("empty")(nb::cast(shape), NumpyName(elem));
  OutArray a;
  if (!nb::try_cast(arr, a, false)) throw std::runtime_error("numpy.empty returned no writable array");
  *data = OutData(a);
  return arr;
}

// The Elem of an output array's dtype (f32, f16 or bf16), if any.
std::optional<DType> OutDTypeOf(nb::dlpack::dtype dt) {
  for (DType t : {DType::kF32, DType::kF16, DType::kBF16}) {
    if (Matches(dt, ElemOf(t))) return t;
  }
  return std::nullopt;
}

// ---------------------------------------------------------------------------
// Plain structs as dicts.
// ---------------------------------------------------------------------------

nb::dict ToDict(const RegionCounts& r) {
  nb::dict d;
  d["sink"] = r.sink;
  d["recent"] = r.recent;
  d["candidate"] = r.candidate;
  d["recalled"] = r.recalled;
  d["vague"] = r.vague;
  d["resident"] = r.resident();
  d["total"] = r.total();
  return d;
}

nb::dict ToDict(const DeviceBytes& b) {
  nb::dict d;
  d["sink"] = b.sink;
  d["recent"] = b.recent;
  d["candidate"] = b.candidate;
  d["staging"] = b.staging;
  d["sketch"] = b.sketch;
  d["summary"] = b.summary;
  d["metadata"] = b.metadata;
  d["total"] = b.total();
  return d;
}

nb::dict ToDict(const AttendCounts& c) {
  nb::dict d;
  d["exact"] = c.exact;
  d["from_sketch"] = c.from_sketch;
  d["dropped"] = c.dropped;
  return d;
}

nb::dict ToDict(const TierStats& t) {
  nb::dict d;
  d["block_bytes"] = t.block_bytes;
  d["blocks_in_use"] = t.blocks_in_use;
  d["bytes_in_use"] = t.bytes_in_use;
  d["bytes_reserved"] = t.bytes_reserved;
  d["peak_bytes_in_use"] = t.peak_bytes_in_use;
  d["capacity_bytes"] = t.capacity_bytes;
  d["bytes_written"] = t.bytes_written;
  d["bytes_read"] = t.bytes_read;
  d["writes"] = t.writes;
  d["reads"] = t.reads;
  d["write_errors"] = t.write_errors;
  d["read_errors"] = t.read_errors;
  d["in_flight"] = t.in_flight;
  d["buffered_fallbacks"] = t.buffered_fallbacks;
  d["pinned_bytes"] = t.pinned_bytes;
  d["numa_node"] = t.numa_node;
  return d;
}

nb::dict ToDict(const RecallStats& r) {
  nb::dict d;
  d["requested"] = r.requested;
  d["exact_hits"] = r.exact_hits;
  d["sketch_fallbacks"] = r.sketch_fallbacks;
  d["late_arrivals"] = r.late_arrivals;
  d["wasted_prefetches"] = r.wasted_prefetches;
  d["failed"] = r.failed;
  d["waits"] = r.waits;
  return d;
}

nb::dict ToDict(const StoreStats& s) {
  nb::dict d;
  d["blocks"] = s.blocks;
  d["host_blocks"] = s.host_blocks;
  d["disk_blocks"] = s.disk_blocks;
  d["lost_blocks"] = s.lost_blocks;
  d["bytes_device_to_host"] = s.bytes_device_to_host;
  d["bytes_host_to_device"] = s.bytes_host_to_device;
  d["bytes_host_to_disk"] = s.bytes_host_to_disk;
  d["bytes_disk_to_host"] = s.bytes_disk_to_host;
  d["demotions"] = s.demotions;
  d["promotions"] = s.promotions;
  d["checksum_failures"] = s.checksum_failures;
  d["disk_read_errors"] = s.disk_read_errors;
  d["disk_write_errors"] = s.disk_write_errors;
  d["host_waits"] = s.host_waits;
  return d;
}

nb::dict ToDict(const RuntimeStats& s) {
  nb::dict d;
  d["sequences"] = s.sequences;
  d["regions"] = ToDict(s.regions);
  d["device_budget_bytes"] = s.device_budget_bytes;
  d["device_reserved"] = ToDict(s.device_reserved);
  d["peak_device_bytes"] = s.peak_device_bytes;
  d["host_tier"] = ToDict(s.host_tier);
  d["disk_tier"] = ToDict(s.disk_tier);
  d["store"] = ToDict(s.store);
  d["recall"] = ToDict(s.recall);
  d["attends"] = s.attends;
  d["served"] = ToDict(s.served);
  d["appended_tokens"] = s.appended_tokens;
  d["recalled_tokens"] = s.recalled_tokens;
  return d;
}

nb::dict ToDict(const BudgetPlan& p) {
  nb::dict d;
  d["sink_tokens"] = p.sink_tokens;
  d["recent_tokens"] = p.recent_tokens;
  d["candidate_tokens"] = p.candidate_tokens;
  d["staging_tokens"] = p.staging_tokens;
  d["sketch_kind"] = std::string(SketchKindName(p.sketch_kind));
  d["sketch_rows"] = p.sketch_rows;
  d["sketch_width"] = p.sketch_width;
  d["compressed"] = p.compressed;
  d["block_tokens"] = p.block_tokens;
  d["recall_tokens"] = p.recall_tokens;
  d["summary_tokens"] = p.summary_tokens;
  d["summary_groups"] = p.summary_groups;
  d["slots"] = p.slots();
  d["per_head"] = ToDict(p.per_head);
  d["per_sequence_bytes"] = p.per_sequence_bytes;
  d["shared_bytes"] = p.shared_bytes;
  d["total_bytes"] = p.total_bytes;
  d["budget_bytes"] = p.budget_bytes;
  d["full_cache_bytes"] = p.full_cache_bytes;
  d["explain"] = p.Explain();
  return d;
}

// ---------------------------------------------------------------------------
// Runtime.
// ---------------------------------------------------------------------------

// The Python Runtime owns its kvtier::Runtime; nothing it returns refers back
// to it (arrays, dicts and Options are copies), so objects may die in any order.
struct PyRuntime {
  std::unique_ptr<Runtime> rt;
  ModelShape shape;

  Pattern KV(bool single) const {
    return single ? Pattern{{shape.kv_heads, shape.head_dim}} : Pattern{{-1, shape.kv_heads, shape.head_dim}};
  }
  Pattern Q() const { return Pattern{{shape.q_heads, shape.head_dim}}; }
  Elem elem() const { return ElemOf(shape.dtype); }

  void Append(SequenceId id, int layer, nb::handle k_obj, nb::handle v_obj, nb::handle scores_obj) {
    const InArray k = Input("k", k_obj), v = Input("v", v_obj);
    const std::vector<Pattern> kv_shapes = {KV(false), KV(true)};
    const size_t km = CheckArray("k", k, elem(), kv_shapes);
    CheckArray("v", v, elem(), kv_shapes);
    const int64_t n = km == 0 ? static_cast<int64_t>(k.shape(0)) : 1;
    if (k.ndim() != v.ndim() || (km == 0 && static_cast<int64_t>(v.shape(0)) != n)) {
      RaiseInvalid(absl::StrFormat("k and v must have the same shape; got %s and %s", ShapeText(k), ShapeText(v)));
    }
    AppendOptions options;
    InArray scores;
    if (!scores_obj.is_none()) {
      scores = Input("scores", scores_obj);
      std::vector<Pattern> score_shapes = {Pattern{{n, shape.kv_heads}}};
      if (n == 1) score_shapes.push_back(Pattern{{shape.kv_heads}});
      CheckArray("scores", scores, Elem::kF32, score_shapes);
      options.scores = static_cast<const float*>(InData(scores));
    }
    absl::Status st;
    {
      nb::gil_scoped_release release;
      st = rt->Append(id, layer, InData(k), InData(v), n, options);
    }
    Check(st);
  }

  // Resolves the output dtype from out_dtype and an output array's dtype.
  DType OutDType(const std::optional<std::string>& out_dtype, const OutArray* out, std::string_view what) const {
    std::optional<DType> want;
    if (out_dtype) want = ParseDType("out_dtype", *out_dtype);
    if (out != nullptr && !want) {
      want = OutDTypeOf(out->dtype());
      if (!want) {
        RaiseInvalid(absl::StrFormat("%s must be float32, float16 or bfloat16 (uint16 holding bf16 bits); got %s", what,
                                     DlpackDTypeName(out->dtype())));
      }
    }
    return want.value_or(shape.dtype);
  }

  std::pair<nb::object, AttendCounts> AttendImpl(SequenceId id, int layer, nb::handle q_obj, nb::handle out_obj,
                                                 const std::optional<std::string>& out_dtype) {
    const InArray q = Input("q", q_obj);
    CheckArray("q", q, elem(), {Q()});
    nb::object result;
    void* out_data = nullptr;
    OutArray out;
    DType dt;
    if (out_obj.is_none()) {
      dt = OutDType(out_dtype, nullptr, "out");
      result = NewArray({size_t(shape.q_heads), size_t(shape.head_dim)}, ElemOf(dt), &out_data);
    } else {
      out = Output("out", out_obj);
      dt = OutDType(out_dtype, &out, "out");
      CheckArray("out", out, ElemOf(dt), {Q()});
      out_data = OutData(out);
      result = nb::borrow(out_obj);
    }
    AttendOptions options;
    options.out_dtype = dt;
    absl::StatusOr<AttendCounts> counts;
    {
      nb::gil_scoped_release release;
      counts = rt->Attend(id, layer, InData(q), out_data, options);
    }
    return {result, Value(std::move(counts))};
  }

  std::pair<nb::object, AttendCounts> AttendBatchImpl(int layer, const std::vector<SequenceId>& ids, nb::handle qs_obj,
                                                      nb::handle outs_obj,
                                                      const std::optional<std::string>& out_dtype) {
    const InArray qs = Input("qs", qs_obj);
    const int64_t b = static_cast<int64_t>(ids.size());
    Pattern batch{{b, shape.q_heads, shape.head_dim}};
    CheckArray("qs", qs, elem(), {batch});
    nb::object result;
    char* out_data = nullptr;
    OutArray outs;
    DType dt;
    if (outs_obj.is_none()) {
      dt = OutDType(out_dtype, nullptr, "outs");
      void* p = nullptr;
      result = NewArray({size_t(b), size_t(shape.q_heads), size_t(shape.head_dim)}, ElemOf(dt), &p);
      out_data = static_cast<char*>(p);
    } else {
      outs = Output("outs", outs_obj);
      dt = OutDType(out_dtype, &outs, "outs");
      CheckArray("outs", outs, ElemOf(dt), {batch});
      out_data = static_cast<char*>(OutData(outs));
      result = nb::borrow(outs_obj);
    }
    const int64_t q_bytes = int64_t{shape.q_heads} * shape.head_dim * int64_t(DTypeSize(shape.dtype));
    const int64_t out_bytes = int64_t{shape.q_heads} * shape.head_dim * int64_t(DTypeSize(dt));
    std::vector<AttendItem> items(ids.size());
    for (int64_t i = 0; i < b; ++i) {
      items[i] = AttendItem{ids[i], static_cast<const char*>(InData(qs)) + i * q_bytes, out_data + i * out_bytes};
    }
    AttendOptions options;
    options.out_dtype = dt;
    absl::StatusOr<AttendCounts> counts;
    {
      nb::gil_scoped_release release;
      counts = rt->AttendBatch(layer, items, options);
    }
    return {result, Value(std::move(counts))};
  }
};

// Runs f without the GIL (every Runtime method is thread-safe) and returns its result.
template <class F>
auto Unlocked(F&& f) {
  nb::gil_scoped_release release;
  return f();
}

}  // namespace
}  // namespace kvtier::python

using namespace kvtier;          // NOLINT
using namespace kvtier::python;  // NOLINT

NB_MODULE(_kvtier, m) {
  m.doc() =
      "kvtier: a tiered KV-cache runtime for LLM serving (the compiled core; import kvtier).\n\n"
      "Tensors cross without copies: C-contiguous CPU arrays (numpy, DLPack or the array\n"
      "interface) in the exact dtype of the model shape: f16 -> float16, f32 -> float32,\n"
      "bf16 -> a DLPack bfloat16 tensor or a uint16 array holding the bf16 bits.";
  m.attr("__version__") = KVTIER_VERSION;

  // ---- Errors ----
  g_error = MakeErrorClass(m, "Error", nb::make_tuple(nb::borrow(PyExc_RuntimeError)), "UNKNOWN",
                           "A kvtier call failed. `code` is the absl status code name (e.g. 'FAILED_PRECONDITION', "
                           "'ALREADY_EXISTS'); the message names the numbers.");
  g_invalid_argument =
      MakeErrorClass(m, "InvalidArgumentError", nb::make_tuple(nb::borrow(g_error), nb::borrow(PyExc_ValueError)),
                     "INVALID_ARGUMENT",
                     "An argument, an option or a tensor is invalid (code 'INVALID_ARGUMENT'); also a ValueError.");
  g_not_found = MakeErrorClass(m, "NotFoundError", nb::make_tuple(nb::borrow(g_error), nb::borrow(PyExc_KeyError)),
                               "NOT_FOUND", "An unknown sequence (code 'NOT_FOUND'); also a KeyError.");
  g_resource_exhausted = MakeErrorClass(
      m, "ResourceExhaustedError", nb::make_tuple(nb::borrow(g_error), nb::borrow(PyExc_MemoryError)),
      "RESOURCE_EXHAUSTED",
      "No sequence slot, the host tier at its cap, or a context beyond max_context (code 'RESOURCE_EXHAUSTED'); "
      "also a MemoryError.");

  // ---- ModelShape ----
  nb::class_<ModelShape>(m, "ModelShape",
                         "The attention shape of the model whose KV cache kvtier holds: layers, query heads, KV heads "
                         "(GQA), head size and the dtype of every K/V/Q/output tensor ('f16', 'bf16' or 'f32').")
      .def(
          "__init__",
          [](ModelShape* self, int layers, int q_heads, int kv_heads, int head_dim, const std::string& dtype) {
            const DType t = ParseDType("dtype", dtype);
            new (self) ModelShape{layers, q_heads, kv_heads, head_dim, t};
          },
          nb::kw_only(), nb::arg("layers"), nb::arg("q_heads"), nb::arg("kv_heads"), nb::arg("head_dim"),
          nb::arg("dtype") = "f16",
          "ModelShape(*, layers, q_heads, kv_heads, head_dim, dtype='f16'). Checked when a Runtime is created "
          "(or by validate()).")
      .def_static(
          "smollm2_135m", [](const std::string& dtype) { return ModelShape::SmolLM2_135M(ParseDType("dtype", dtype)); },
          nb::arg("dtype") = "f16", "SmolLM2-135M: 30 layers, 9 query / 3 KV heads, head_dim 64.")
      .def_rw("layers", &ModelShape::layers, "Layers, >= 1.")
      .def_rw("q_heads", &ModelShape::q_heads, "Query heads, >= 1, a multiple of kv_heads.")
      .def_rw("kv_heads", &ModelShape::kv_heads, "KV heads, >= 1.")
      .def_rw("head_dim", &ModelShape::head_dim, "Head size, a multiple of 8 in [8, 256].")
      .def_prop_rw(
          "dtype", [](const ModelShape& s) { return std::string(DTypeName(s.dtype)); },
          [](ModelShape& s, const std::string& d) { s.dtype = ParseDType("dtype", d); },
          "dtype of every tensor the caller passes: 'f16', 'bf16' or 'f32'.")
      .def_prop_ro("group", &ModelShape::group, "Query heads per KV head.")
      .def_prop_ro("head_token_bytes", &ModelShape::HeadTokenBytes,
                   "Bytes of K and V of one token in one layer and KV head.")
      .def_prop_ro("token_bytes", &ModelShape::TokenBytes, "Bytes of the full cache of one token (all layers, heads).")
      .def(
          "validate", [](const ModelShape& s) { Check(s.Validate()); },
          "Raises InvalidArgumentError naming the offending field and value.")
      .def("__repr__", &ShapeRepr)
      .def("__str__", &ModelShape::ToString)
      .def(
          "__eq__",
          [](const ModelShape& a, const ModelShape& b) {
            return a.layers == b.layers && a.q_heads == b.q_heads && a.kv_heads == b.kv_heads &&
                   a.head_dim == b.head_dim && a.dtype == b.dtype;
          },
          nb::is_operator())
      .def("__copy__", [](const ModelShape& s) { return s; })
      .def("__deepcopy__", [](const ModelShape& s, nb::handle) { return s; }, nb::arg("memo"));

  // ---- Options ----
  const Options defaults;
  nb::class_<Options> options(
      m, "Options",
      "Everything a Runtime is configured with (kvtier::Options). Every scalar field is a keyword argument of the "
      "constructor and a read-write attribute with the same name and default as in C++; enums are strings. "
      "Values are checked when a Runtime is created (or by validate()).");
#define KVTIER_PARAM(name, doc) , KVTIER_FIELD(name)::Py name
#define KVTIER_SET(name, doc) o.name = KVTIER_FIELD(name)::From(#name, name);
#define KVTIER_ARG(name, doc) , nb::arg(#name) = KVTIER_FIELD(name)::To(defaults.name)
  options.def(
      "__init__",
      [](Options* self, std::optional<ModelShape> shape KVTIER_OPTION_FIELDS(KVTIER_PARAM)) {
        Options o;
        if (shape) o.shape = *shape;
        KVTIER_OPTION_FIELDS(KVTIER_SET)
        new (self) Options(std::move(o));
      },
      nb::kw_only(), nb::arg("shape") = nb::none() KVTIER_OPTION_FIELDS(KVTIER_ARG),
      "Options(*, shape=None, **fields): every field keyword-only, defaults as in C++. An unknown enum name "
      "raises InvalidArgumentError listing the accepted ones.");
#undef KVTIER_PARAM
#undef KVTIER_SET
#undef KVTIER_ARG
  options.def_rw("shape", &Options::shape, "The model shape (required).");
#define KVTIER_PROP(name, doc)                                                                   \
  options.def_prop_rw(                                                                           \
      #name, [](const Options& o) { return KVTIER_FIELD(name)::To(o.name); },                    \
      [](Options& o, const KVTIER_FIELD(name)::Py& v) { o.name = KVTIER_FIELD(name)::From(#name, v); }, \
      doc);
  KVTIER_OPTION_FIELDS(KVTIER_PROP)
#undef KVTIER_PROP
  options.def(
      "validate", [](const Options& o) { Check(o.Validate()); },
      "Raises InvalidArgumentError naming the offending field and value (Runtime() also checks the budget).");
  options.def(
      "__repr__",
      [](const Options& o) {
        const Options d;
        std::vector<std::string> parts = {absl::StrCat("shape=", ShapeRepr(o.shape))};
#define KVTIER_REPR(name, doc)                                       \
  if (KVTIER_FIELD(name)::To(o.name) != KVTIER_FIELD(name)::To(d.name)) \
    parts.push_back(absl::StrCat(#name "=", ReprOf(KVTIER_FIELD(name)::To(o.name))));
        KVTIER_OPTION_FIELDS(KVTIER_REPR)
#undef KVTIER_REPR
        return absl::StrCat("Options(", absl::StrJoin(parts, ", "), ")");
      },
      "The shape and every field that differs from its default.");
  options.def("__copy__", [](const Options& o) { return o; });
  options.def("__deepcopy__", [](const Options& o, nb::handle) { return o; }, nb::arg("memo"));

  // ---- Runtime ----
  nb::class_<PyRuntime>(m, "Runtime",
                        "The KV-cache runtime (kvtier::Runtime). Thread-safe: calls on different sequences run in "
                        "parallel (the GIL is released), calls on one sequence are serialised. Positions count "
                        "appended tokens per layer from 0.")
      .def(
          "__init__",
          [](PyRuntime* self, const Options& options) {
            absl::StatusOr<std::unique_ptr<Runtime>> rt = Unlocked([&] { return Runtime::Create(options); });
            if (!rt.ok()) Raise(rt.status());
            if ((*rt)->backend_name() != "cpu") {  // numpy arrays are host memory
              Raise(absl::InvalidArgumentError(
                  absl::StrFormat("the Python module hands the runtime numpy (host) arrays; backend '%s' takes "
                                  "device memory: use backend 'cpu'",
                                  (*rt)->backend_name())));
            }
            new (self) PyRuntime{std::move(*rt), options.shape};
          },
          nb::arg("options"),
          "Runtime(options): validates the options, plans the budget and reserves the device arena. Raises "
          "InvalidArgumentError for invalid options or a budget that cannot hold the minimal regions.")
      .def_prop_ro(
          "options", [](const PyRuntime& r) { return r.rt->options(); }, "A copy of the runtime's options.")
      .def_prop_ro(
          "plan", [](const PyRuntime& r) { return ToDict(r.rt->plan()); },
          "The budget plan as a dict: region sizes per (sequence, layer, KV head), sketch, block and recall sizes, "
          "device bytes ('per_head' by purpose) and 'explain', one line on the sizes chosen and why.")
      .def_prop_ro(
          "backend_name", [](const PyRuntime& r) { return std::string(r.rt->backend_name()); },
          "Name of the backend in use ('cpu', ...).")
      .def_prop_ro(
          "shape", [](const PyRuntime& r) { return r.shape; }, "A copy of the model shape.")
      .def(
          "add_sequence",
          [](PyRuntime& r, SequenceId id) { Check(Unlocked([&] { return r.rt->AddSequence(id); })); },
          nb::arg("seq_id"),
          "Adds an empty sequence. Error (code 'ALREADY_EXISTS') if it exists; ResourceExhaustedError when "
          "max_sequences are live.")
      .def(
          "remove_sequence",
          [](PyRuntime& r, SequenceId id) { Check(Unlocked([&] { return r.rt->RemoveSequence(id); })); },
          nb::arg("seq_id"), "Frees the sequence's device memory and host-tier blocks. NotFoundError if unknown.")
      .def(
          "length",
          [](PyRuntime& r, SequenceId id, int layer) { return Value(Unlocked([&] { return r.rt->Length(id, layer); })); },
          nb::arg("seq_id"), nb::arg("layer"), "Tokens appended to `layer` of the sequence so far.")
      .def("append", &PyRuntime::Append, nb::arg("seq_id"), nb::arg("layer"), nb::arg("k"), nb::arg("v"),
           nb::arg("scores") = nb::none(),
           "Appends n >= 1 tokens' K/V (keys after RoPE) to one layer: k and v of shape [n, kv_heads, head_dim] "
           "(or [kv_heads, head_dim] for one token) in the model dtype. scores: optional float32 [n, kv_heads] "
           "initial accumulated attention of each token (used to pick heavy hitters when a chunk overflows the "
           "recent window), finite and >= 0. A failed call leaves the runtime unchanged.")
      .def(
          "attend",
          [](PyRuntime& r, SequenceId id, int layer, nb::handle q, nb::handle out,
             const std::optional<std::string>& out_dtype) { return r.AttendImpl(id, layer, q, out, out_dtype).first; },
          nb::arg("seq_id"), nb::arg("layer"), nb::arg("q"), nb::arg("out") = nb::none(),
          nb::arg("out_dtype") = nb::none(),
          "One decode step of attention for every query head of `layer`: q [q_heads, head_dim] in the model dtype. "
          "Writes into `out` ([q_heads, head_dim], no copy) and returns it, or returns a new array. The output "
          "dtype is out_dtype ('f16', 'bf16', 'f32'), else that of `out`, else the model dtype (bf16 outputs are "
          "uint16 bits). Then requests the recalls of the next step.")
      .def(
          "attend_with_counts",
          [](PyRuntime& r, SequenceId id, int layer, nb::handle q, nb::handle out,
             const std::optional<std::string>& out_dtype) {
            auto [arr, counts] = r.AttendImpl(id, layer, q, out, out_dtype);
            return nb::make_tuple(arr, ToDict(counts));
          },
          nb::arg("seq_id"), nb::arg("layer"), nb::arg("q"), nb::arg("out") = nb::none(),
          nb::arg("out_dtype") = nb::none(),
          "attend(), returning (out, counts): counts = {'exact', 'from_sketch', 'dropped'} in token-heads.")
      .def(
          "attend_batch",
          [](PyRuntime& r, int layer, const std::vector<SequenceId>& ids, nb::handle qs, nb::handle outs,
             const std::optional<std::string>& out_dtype) {
            return r.AttendBatchImpl(layer, ids, qs, outs, out_dtype).first;
          },
          nb::arg("layer"), nb::arg("seq_ids"), nb::arg("qs"), nb::arg("outs") = nb::none(),
          nb::arg("out_dtype") = nb::none(),
          "attend() for several distinct sequences on one layer, in parallel: qs [B, q_heads, head_dim] for "
          "B = len(seq_ids); writes into `outs` [B, q_heads, head_dim] and returns it, or returns a new array.")
      .def(
          "attend_batch_with_counts",
          [](PyRuntime& r, int layer, const std::vector<SequenceId>& ids, nb::handle qs, nb::handle outs,
             const std::optional<std::string>& out_dtype) {
            auto [arr, counts] = r.AttendBatchImpl(layer, ids, qs, outs, out_dtype);
            return nb::make_tuple(arr, ToDict(counts));
          },
          nb::arg("layer"), nb::arg("seq_ids"), nb::arg("qs"), nb::arg("outs") = nb::none(),
          nb::arg("out_dtype") = nb::none(), "attend_batch(), returning (outs, counts summed over the batch).")
      .def(
          "recall",
          [](PyRuntime& r, SequenceId id, int layer, int kv_head, const std::vector<int64_t>& positions) {
            return Value(Unlocked([&] { return r.rt->Recall(id, layer, kv_head, positions); }));
          },
          nb::arg("seq_id"), nb::arg("layer"), nb::arg("kv_head"), nb::arg("positions"),
          "Synchronous recall: brings the exact K/V of the vague tokens at `positions` of one (layer, KV head) "
          "into staging and waits. Returns how many were installed (resident or in-flight positions are skipped; "
          "at most staging_tokens per call).")
      .def(
          "rank_vague",
          [](PyRuntime& r, SequenceId id, int layer, int kv_head, nb::handle q_obj, int count) {
            const InArray q = Input("q", q_obj);
            CheckArray("q", q, r.elem(), {r.Q()});
            std::vector<int64_t> top =
                Value(Unlocked([&] { return r.rt->RankVague(id, layer, kv_head, InData(q), count); }));
            void* data = nullptr;
            nb::object arr = NewArray({top.size()}, Elem::kI64, &data);
            if (!top.empty()) std::memcpy(data, top.data(), top.size() * sizeof(int64_t));
            return arr;
          },
          nb::arg("seq_id"), nb::arg("layer"), nb::arg("kv_head"), nb::arg("q"), nb::arg("count"),
          "The `count` vague positions of (layer, KV head), not in flight, that the recall proxy ranks highest for "
          "q [q_heads, head_dim], best first, as an int64 array. Error (code 'FAILED_PRECONDITION') without a "
          "proxy.")
      .def(
          "recall_top",
          [](PyRuntime& r, SequenceId id, int layer, nb::handle q_obj, int per_head) {
            const InArray q = Input("q", q_obj);
            CheckArray("q", q, r.elem(), {r.Q()});
            return Value(Unlocked([&] { return r.rt->RecallTop(id, layer, InData(q), per_head); }));
          },
          nb::arg("seq_id"), nb::arg("layer"), nb::arg("q"), nb::arg("per_head"),
          "rank_vague() then recall() of the top `per_head` for every KV head of the layer; returns the token-heads "
          "recalled.")
      .def(
          "token_region",
          [](PyRuntime& r, SequenceId id, int layer, int kv_head, int64_t pos) {
            return std::string(RegionName(Value(Unlocked([&] { return r.rt->TokenRegion(id, layer, kv_head, pos); }))));
          },
          nb::arg("seq_id"), nb::arg("layer"), nb::arg("kv_head"), nb::arg("pos"),
          "Where one token is: 'sink', 'recent', 'candidate', 'recalled' or 'vague'.")
      .def(
          "read_token",
          [](PyRuntime& r, SequenceId id, int layer, int kv_head, int64_t pos) {
            void *k = nullptr, *v = nullptr;
            nb::object ka = NewArray({size_t(r.shape.head_dim)}, r.elem(), &k);
            nb::object va = NewArray({size_t(r.shape.head_dim)}, r.elem(), &v);
            Check(Unlocked([&] { return r.rt->ReadToken(id, layer, kv_head, pos, k, v); }));
            return nb::make_tuple(ka, va);
          },
          nb::arg("seq_id"), nb::arg("layer"), nb::arg("kv_head"), nb::arg("pos"),
          "The exact (k, v) of any token, [head_dim] each in the model dtype (bf16: uint16 bits), from the device "
          "or the host tier.")
      .def(
          "estimate_token",
          [](PyRuntime& r, SequenceId id, int layer, int kv_head, int64_t pos) {
            void *k = nullptr, *v = nullptr;
            nb::object ka = NewArray({size_t(r.shape.head_dim)}, Elem::kF32, &k);
            nb::object va = NewArray({size_t(r.shape.head_dim)}, Elem::kF32, &v);
            Check(Unlocked([&] {
              return r.rt->EstimateToken(id, layer, kv_head, pos, static_cast<float*>(k), static_cast<float*>(v));
            }));
            return nb::make_tuple(ka, va);
          },
          nb::arg("seq_id"), nb::arg("layer"), nb::arg("kv_head"), nb::arg("pos"),
          "The sketch's reconstruction (k, v), float32 [head_dim] each, of a vague token as attention sees it. "
          "Error (code 'FAILED_PRECONDITION') for tokens that are not vague or without a sketch.")
      .def(
          "regions",
          [](PyRuntime& r, SequenceId id) { return ToDict(Value(Unlocked([&] { return r.rt->Regions(id); }))); },
          nb::arg("seq_id"),
          "Token-heads of the sequence per region (over layers and KV heads): sink, recent, candidate, recalled, "
          "vague, and resident and total.")
      .def(
          "stats", [](PyRuntime& r) { return ToDict(Unlocked([&] { return r.rt->Stats(); })); },
          "Every RuntimeStats field as a nested dict: regions, device_reserved, host_tier, disk_tier, store, "
          "recall, served, and the counters.")
      .def(
          "stats_text", [](PyRuntime& r) { return Unlocked([&] { return r.rt->Stats(); }).ToString(); },
          "RuntimeStats as the text kvtier-demo prints.")
      .def(
          "drain", [](PyRuntime& r) { Unlocked([&] { r.rt->Drain(); }); },
          "Waits until every transfer in flight (recalls, demotions) completed.")
      .def(
          "check_invariants", [](PyRuntime& r) { Check(Unlocked([&] { return r.rt->CheckInvariants(); })); },
          "Verifies every internal invariant; Error (code 'INTERNAL') naming the first violation. O(tokens), for "
          "tests, with no other call in flight.")
      .def("__repr__", [](const PyRuntime& r) {
        return absl::StrFormat("Runtime(%s, backend='%s', device bytes %d)", r.shape.ToString(), r.rt->backend_name(),
                               r.rt->plan().total_bytes);
      });
}
