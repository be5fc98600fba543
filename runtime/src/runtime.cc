#include "kvtier/runtime.h"

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstring>
#include <mutex>
#include <shared_mutex>

#include "absl/cleanup/cleanup.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/inlined_vector.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "head_cache.h"
#include "kvtier/allocator/device_arena.h"
#include "kvtier/backend.h"
#include "kvtier/kernels/hash.h"
#include "kvtier/offload/block_store.h"
#include "kvtier/offload/counting_tier.h"
#include "kvtier/offload/host_tier.h"
#include "kvtier/offload/nvme_tier.h"
#include "oneapi/tbb/parallel_for.h"

namespace kvtier {
namespace {

struct Sequence {
  explicit Sequence(SequenceId id) : id(id) {}
  const SequenceId id;
  std::mutex mu;         // serialises calls on the sequence
  bool removed = false;  // guarded by mu
  void* chunk = nullptr;
  std::vector<std::unique_ptr<HeadCache>> heads;  // [layer][kv_head]
};

// Deterministic standard normals (Box-Muller over splitmix64), so SimHash
// planes are the same on every platform for a seed.
void FillGaussian(uint64_t seed, std::vector<float>& out) {
  uint64_t state = seed;
  auto next = [&] {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (static_cast<double>(z >> 11) + 0.5) * (1.0 / 9007199254740992.0);  // (0, 1)
  };
  for (size_t i = 0; i < out.size(); i += 2) {
    const double r = std::sqrt(-2.0 * std::log(next()));
    const double t = 2.0 * M_PI * next();
    out[i] = static_cast<float>(r * std::cos(t));
    if (i + 1 < out.size()) out[i + 1] = static_cast<float>(r * std::sin(t));
  }
}

}  // namespace

class Runtime::Impl {
 public:
  Options options;
  BudgetPlan plan;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<DeviceArena> arena;
  std::unique_ptr<HostTier> host_tier;
  std::shared_ptr<Tier> disk_tier;      // the caller's, the NVMe tier, or null
  std::unique_ptr<BlockStore> store;    // declared after the tiers: destroyed before them
  HeadContext ctx;
  float scale = 1.0f;

  mutable std::shared_mutex map_mu;
  absl::flat_hash_map<SequenceId, std::shared_ptr<Sequence>> sequences;  // guarded by map_mu

  std::atomic<int64_t> attends{0};
  std::atomic<int64_t> exact{0}, from_sketch{0}, dropped{0};
  std::atomic<int64_t> appended{0};
  mutable std::mutex retired_mu;
  RecallStats retired_recall;  // of removed sequences

  int heads_per_layer() const { return options.shape.kv_heads; }
  int64_t q_row_bytes() const { return options.shape.head_dim * static_cast<int64_t>(DTypeSize(options.shape.dtype)); }

  // A live sequence, locked for the caller.
  struct Locked {
    std::shared_ptr<Sequence> seq;
    std::unique_lock<std::mutex> lock;
  };

  absl::StatusOr<Locked> Acquire(SequenceId id) const {
    std::shared_ptr<Sequence> seq;
    {
      std::shared_lock lock(map_mu);
      auto it = sequences.find(id);
      if (it != sequences.end()) seq = it->second;
    }
    if (seq == nullptr) return absl::NotFoundError(absl::StrFormat("sequence %d not found", id));
    std::unique_lock lock(seq->mu);
    // Removed between the lookup and the lock.
    if (seq->removed) return absl::NotFoundError(absl::StrFormat("sequence %d not found", id));
    return Locked{std::move(seq), std::move(lock)};
  }

  std::vector<std::shared_ptr<Sequence>> All() const {
    std::shared_lock lock(map_mu);
    std::vector<std::shared_ptr<Sequence>> out;
    for (const auto& [id, seq] : sequences) out.push_back(seq);
    return out;
  }

  absl::Status CheckLayer(int layer) const {
    if (layer < 0 || layer >= options.shape.layers) {
      return absl::InvalidArgumentError(
          absl::StrFormat("layer %d is outside [0, %d)", layer, options.shape.layers));
    }
    return absl::OkStatus();
  }

  absl::Status CheckHead(int layer, int kv_head) const {
    if (absl::Status st = CheckLayer(layer); !st.ok()) return st;
    if (kv_head < 0 || kv_head >= options.shape.kv_heads) {
      return absl::InvalidArgumentError(
          absl::StrFormat("KV head %d is outside [0, %d)", kv_head, options.shape.kv_heads));
    }
    return absl::OkStatus();
  }

  absl::Status CheckPosition(const HeadCache& head, int layer, int64_t position) const {
    if (position < 0 || position >= head.length()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("position %d is outside [0, %d) of layer %d", position, head.length(), layer));
    }
    return absl::OkStatus();
  }

  // The proxy of RankVague / RecallTop: the configured one, else the sketch.
  RecallProxy RankingProxy() const {
    return options.recall_proxy == RecallProxy::kNone ? RecallProxy::kSketch : options.recall_proxy;
  }

  // The query heads of one KV head in q ([q_heads][head_dim]); null for a null q.
  const void* QueryGroup(const void* q, int kv_head) const {
    if (q == nullptr) return nullptr;
    return static_cast<const char*>(q) + static_cast<int64_t>(kv_head) * options.shape.group() * q_row_bytes();
  }

  absl::Status CheckQuery(const void* q) const {
    if (options.plan_only) return absl::OkStatus();  // ranking by weight: no query
    if (q == nullptr) return absl::InvalidArgumentError("q must not be null");
    return CheckFinite(q, static_cast<int64_t>(options.shape.q_heads) * options.shape.head_dim, "q");
  }

  absl::Status CheckFinite(const void* data, int64_t n, const char* what) const {
    const int64_t bad = backend->kernels().CountNonFinite(data, n, options.shape.dtype);
    if (absl::Status st = backend->kernels().error(); !st.ok()) return st;
    if (bad > 0) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s holds %d non-finite values (NaN or infinity) among %d", what, bad, n));
    }
    return absl::OkStatus();
  }

  HeadCache& Head(Sequence& s, int layer, int kv_head) const {
    return *s.heads[static_cast<size_t>(layer) * options.shape.kv_heads + kv_head];
  }

  // Fills the per-call fields of one head's attention.
  void FillAttend(Sequence& s, int layer, int h, const void* q, void* out, DType out_dtype,
                  kernels::AttendParams& p) const {
    const ModelShape& sh = options.shape;
    Head(s, layer, h).FillAttend(p);
    p.head_dim = sh.head_dim;
    p.group = sh.group();
    p.dtype = sh.dtype;
    p.out_dtype = out_dtype;
    p.scale = scale;
    p.q = static_cast<const char*>(q) + static_cast<int64_t>(h) * sh.group() * q_row_bytes();
    p.out = static_cast<char*>(out) + static_cast<int64_t>(h) * sh.group() * sh.head_dim * DTypeSize(out_dtype);
  }

  absl::StatusOr<AttendCounts> FinishAttend(Sequence& s, int layer) {
    AttendCounts counts;
    for (int h = 0; h < heads_per_layer(); ++h) {
      HeadCache& head = Head(s, layer, h);
      if (absl::Status st = head.AfterAttend(); !st.ok()) return st;
      counts += head.Served();
    }
    attends.fetch_add(1, std::memory_order_relaxed);
    exact.fetch_add(counts.exact, std::memory_order_relaxed);
    from_sketch.fetch_add(counts.from_sketch, std::memory_order_relaxed);
    dropped.fetch_add(counts.dropped, std::memory_order_relaxed);
    return counts;
  }

  // The ranking kernels of prepared heads (HeadCache::RankPrepare): one
  // call per kind for all of them.
  absl::Status RankScores(std::span<HeadCache::RankWork> work) {
    std::vector<kernels::SketchScoreParams> sketch;
    std::vector<kernels::BoundScoreParams> bounds;
    for (const HeadCache::RankWork& w : work) {
      if (w.sketch_call) sketch.push_back(w.sketch);
      if (w.bound_call) bounds.push_back(w.bounds);
    }
    kernels::KernelSet& k = backend->kernels();
    if (!sketch.empty()) k.SketchScores(sketch);
    if (!bounds.empty()) k.BoundScores(bounds);
    return k.error();
  }

  absl::Status CheckAttendable(Sequence& s, int layer) const {
    if (Head(s, layer, 0).length() == 0) {
      return absl::FailedPreconditionError(
          absl::StrFormat("sequence %d has no tokens in layer %d to attend to", s.id, layer));
    }
    return absl::OkStatus();
  }
};

Runtime::Runtime(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

Runtime::~Runtime() {
  // Return every sequence's host blocks before the tier goes.
  std::unique_lock lock(impl_->map_mu);
  for (auto& [id, seq] : impl_->sequences) {
    for (auto& head : seq->heads) head->Release().IgnoreError();
  }
}

absl::StatusOr<std::unique_ptr<Runtime>> Runtime::Create(const Options& options) {
  if (absl::Status st = options.Validate(); !st.ok()) return st;
  absl::StatusOr<std::unique_ptr<Backend>> backend = CreateBackend(options.backend);
  if (!backend.ok()) return backend.status();
  return Create(options, std::move(*backend));
}

absl::StatusOr<std::unique_ptr<Runtime>> Runtime::Create(const Options& options, std::unique_ptr<Backend> backend) {
  if (backend == nullptr) return absl::InvalidArgumentError("Runtime::Create: the backend is null");
  absl::StatusOr<BudgetPlan> plan = PlanBudget(options);
  if (!plan.ok()) return plan.status();
  auto impl = std::make_unique<Impl>();
  impl->options = options;
  impl->plan = *plan;
  impl->backend = std::move(backend);
  if (absl::Status st = impl->backend->kernels().Supports(options.shape.head_dim, options.shape.group()); !st.ok()) {
    return st;
  }

  const ModelShape& sh = options.shape;
  const HeadLayout layout = ComputeHeadLayout(sh, options.max_context, *plan);
  absl::StatusOr<std::unique_ptr<DeviceArena>> arena = DeviceArena::Create(
      *impl->backend, {.prefix_bytes = plan->shared_bytes,
                       .chunk_bytes = plan->per_sequence_bytes,
                       .chunk_count = options.max_sequences});
  if (!arena.ok()) return arena.status();
  impl->arena = std::move(*arena);

  const int64_t row_bytes = sh.head_dim * static_cast<int64_t>(DTypeSize(sh.dtype));
  const int64_t block_bytes = plan->block_tokens * sh.HeadTokenBytes();
  absl::StatusOr<std::unique_ptr<HostTier>> host =
      HostTier::Create(*impl->backend, {.block_bytes = block_bytes,
                                        .capacity_bytes = options.host_tier_bytes,
                                        .accounting_only = options.plan_only});
  if (!host.ok()) return host.status();
  impl->host_tier = std::move(*host);
  BlockStore::Options store_options;
  store_options.high_watermark = options.demote_high;
  store_options.low_watermark = options.demote_low;
  store_options.content_free = options.plan_only;
  if (options.plan_only && (options.disk_tier != nullptr || !options.nvme_dir.empty())) {
    // The disk tier's capacity, without its contents.
    const int64_t cap = options.disk_tier != nullptr ? options.disk_tier->Stats().capacity_bytes : options.nvme_bytes;
    absl::StatusOr<std::unique_ptr<CountingTier>> disk = CountingTier::Create(block_bytes, cap);
    if (!disk.ok()) return disk.status();
    impl->disk_tier = std::move(*disk);
  } else if (options.disk_tier != nullptr) {
    if (options.disk_tier->block_bytes() != block_bytes) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "options.disk_tier has blocks of %d bytes; the plan's blocks are %d tokens x %d bytes = %d",
          options.disk_tier->block_bytes(), plan->block_tokens, sh.HeadTokenBytes(), block_bytes));
    }
    impl->disk_tier = options.disk_tier;
  } else if (!options.nvme_dir.empty()) {
    absl::StatusOr<std::unique_ptr<NvmeTier>> disk =
        NvmeTier::Create({.directory = options.nvme_dir,
                          .capacity_bytes = options.nvme_bytes,
                          .block_bytes = block_bytes,
                          .queue_depth = options.io_queue_depth});
    if (!disk.ok()) return disk.status();
    // Host chunks become io_uring fixed buffers as the pool grows.
    store_options.on_new_host_chunk = [nvme = disk->get()](char* base, int64_t bytes) {
      nvme->RegisterBuffer(base, bytes).IgnoreError();  // unregistered buffers still work, unfixed
    };
    impl->disk_tier = std::move(*disk);
  }
  absl::StatusOr<std::unique_ptr<BlockStore>> store =
      BlockStore::Create(*impl->host_tier, impl->disk_tier.get(), *impl->backend, store_options);
  if (!store.ok()) return store.status();
  impl->store = std::move(*store);

  if (plan->sketch_kind == SketchKind::kCentroid && plan->compressed) {
    const int bits = std::countr_zero(static_cast<unsigned>(plan->sketch_width));
    std::vector<float> planes(static_cast<size_t>(plan->sketch_rows) * bits * sh.head_dim);
    FillGaussian(options.seed ^ 0x5eedf00dull, planes);
    if (absl::Status st = impl->backend->Copy(impl->arena->prefix(), planes.data(),
                                              static_cast<int64_t>(planes.size() * sizeof(float)),
                                              CopyKind::kHostToDevice);
        !st.ok())
      return st;
    impl->ctx.planes = static_cast<const float*>(impl->arena->prefix());
  }
  impl->ctx.layout = layout;
  impl->ctx.backend = impl->backend.get();
  impl->ctx.store = impl->store.get();
  impl->ctx.row_bytes = row_bytes;
  impl->scale = options.attention_scale > 0 ? static_cast<float>(options.attention_scale)
                                            : 1.0f / std::sqrt(static_cast<float>(sh.head_dim));
  // Pointers into impl itself: set once impl sits at its final address.
  impl->ctx.options = &impl->options;
  impl->ctx.plan = &impl->plan;
  return std::unique_ptr<Runtime>(new Runtime(std::move(impl)));
}

const Options& Runtime::options() const { return impl_->options; }
const BudgetPlan& Runtime::plan() const { return impl_->plan; }
std::string_view Runtime::backend_name() const { return impl_->backend->name(); }

absl::Status Runtime::AddSequence(SequenceId id) {
  std::unique_lock lock(impl_->map_mu);
  if (impl_->sequences.contains(id)) {
    return absl::AlreadyExistsError(absl::StrFormat("sequence %d already exists", id));
  }
  absl::StatusOr<void*> chunk = impl_->arena->AllocateChunk();
  if (!chunk.ok()) {
    return absl::ResourceExhaustedError(absl::StrFormat("cannot add sequence %d: all max_sequences = %d are live",
                                                        id, impl_->options.max_sequences));
  }
  auto seq = std::make_shared<Sequence>(id);
  seq->chunk = *chunk;
  const ModelShape& sh = impl_->options.shape;
  const int64_t head_bytes = impl_->ctx.layout.bytes;
  seq->heads.reserve(static_cast<size_t>(sh.layers) * sh.kv_heads);
  for (int l = 0; l < sh.layers; ++l) {
    for (int h = 0; h < sh.kv_heads; ++h) {
      char* base = static_cast<char*>(*chunk) + (static_cast<int64_t>(l) * sh.kv_heads + h) * head_bytes;
      seq->heads.push_back(std::make_unique<HeadCache>(impl_->ctx, base, l, h));
      if (absl::Status st = seq->heads.back()->Init(); !st.ok()) {
        impl_->arena->FreeChunk(*chunk).IgnoreError();  // ours, just allocated
        return st;
      }
    }
  }
  impl_->sequences.emplace(id, std::move(seq));
  return absl::OkStatus();
}

absl::Status Runtime::RemoveSequence(SequenceId id) {
  std::shared_ptr<Sequence> seq;
  {
    std::unique_lock lock(impl_->map_mu);
    auto it = impl_->sequences.find(id);
    if (it == impl_->sequences.end()) return absl::NotFoundError(absl::StrFormat("sequence %d not found", id));
    seq = std::move(it->second);
    impl_->sequences.erase(it);
  }
  // Wait for calls in flight on the sequence, then release it.
  std::unique_lock lock(seq->mu);
  seq->removed = true;
  absl::Status result;
  {
    std::lock_guard stats_lock(impl_->retired_mu);
    for (auto& head : seq->heads) impl_->retired_recall += head->recall_stats();
  }
  for (auto& head : seq->heads) result.Update(head->Release());
  seq->heads.clear();
  result.Update(impl_->arena->FreeChunk(seq->chunk));
  return result;
}

absl::StatusOr<int64_t> Runtime::Length(SequenceId id, int layer) const {
  if (absl::Status st = impl_->CheckLayer(layer); !st.ok()) return st;
  absl::StatusOr<Impl::Locked> locked = impl_->Acquire(id);
  if (!locked.ok()) return locked.status();
  Sequence& s = *locked->seq;
  return impl_->Head(s, layer, 0).length();
}

absl::Status Runtime::Append(SequenceId id, int layer, const void* k, const void* v, int64_t n,
                             const AppendOptions& options) {
  Impl& I = *impl_;
  const ModelShape& sh = I.options.shape;
  if (absl::Status st = I.CheckLayer(layer); !st.ok()) return st;
  if (n < 1) return absl::InvalidArgumentError(absl::StrFormat("append of %d tokens: n must be >= 1", n));
  const bool plan_only = I.options.plan_only;
  if (!plan_only && (k == nullptr || v == nullptr)) {
    return absl::InvalidArgumentError("append: k and v must not be null");
  }
  if (n > I.options.max_context) {  // before reading n rows of the caller's buffers
    return absl::ResourceExhaustedError(absl::StrFormat(
        "appending %d tokens to layer %d of sequence %d would exceed max_context %d", n, layer, id,
        I.options.max_context));
  }
  const int64_t elems = n * sh.kv_heads * sh.head_dim;
  if (!plan_only) {
    if (absl::Status st = I.CheckFinite(k, elems, "k"); !st.ok()) return st;
    if (absl::Status st = I.CheckFinite(v, elems, "v"); !st.ok()) return st;
  }
  for (const auto& [values, what] : {std::pair{options.scores, "scores"}, std::pair{options.weights, "weights"}}) {
    if (values == nullptr || (values == options.weights && !plan_only)) continue;
    for (int64_t i = 0; i < n * sh.kv_heads; ++i) {
      if (!std::isfinite(values[i]) || values[i] < 0) {
        return absl::InvalidArgumentError(
            absl::StrFormat("append: %s[%d] = %g; they must be finite and >= 0", what, i, values[i]));
      }
    }
  }
  absl::StatusOr<Impl::Locked> locked = I.Acquire(id);
  if (!locked.ok()) return locked.status();
  Sequence& s = *locked->seq;

  const int64_t len = I.Head(s, layer, 0).length();
  if (len + n > I.options.max_context) {
    return absl::ResourceExhaustedError(
        absl::StrFormat("appending %d tokens to layer %d of sequence %d (length %d) would exceed max_context %d", n,
                        layer, id, len, I.options.max_context));
  }

  // Plan every head, reserve the host blocks, then carry the plans out.
  const int H = sh.kv_heads;
  // The plans live in their heads (reused scratch); H is small.
  absl::InlinedVector<HeadCache::AppendPlan*, 16> plans(H);
  absl::InlinedVector<AppendSource, 16> sources(H);
  absl::InlinedVector<int64_t, 17> first_block(H + 1, 0);
  // Device memory the host cannot read: the rows the host tier will store
  // cross once per append, not once per evicted row.
  std::vector<char> host_k, host_v;
  if (!plan_only && !I.backend->caps().device_memory_host_accessible) {
    const int64_t bytes = elems * static_cast<int64_t>(DTypeSize(sh.dtype));
    host_k.resize(bytes);
    host_v.resize(bytes);
    if (absl::Status st = I.backend->Copy(host_k.data(), k, bytes, CopyKind::kDeviceToHost); !st.ok()) return st;
    if (absl::Status st = I.backend->Copy(host_v.data(), v, bytes, CopyKind::kDeviceToHost); !st.ok()) return st;
  }
  for (int h = 0; h < H; ++h) {
    plans[h] = &I.Head(s, layer, h).plan_scratch();
    sources[h] = AppendSource{plan_only ? nullptr : static_cast<const char*>(k) + h * I.q_row_bytes(),
                              plan_only ? nullptr : static_cast<const char*>(v) + h * I.q_row_bytes(),
                              H * I.q_row_bytes(), options.scores ? options.scores + h : nullptr, H,
                              plan_only && options.weights ? options.weights + h : nullptr,
                              host_k.empty() ? nullptr : host_k.data() + h * I.q_row_bytes(),
                              host_v.empty() ? nullptr : host_v.data() + h * I.q_row_bytes()};
    I.Head(s, layer, h).PlanAppend(n, sources[h], *plans[h]);
    first_block[h + 1] = first_block[h] + I.Head(s, layer, h).BlocksNeeded(*plans[h]);
  }
  absl::InlinedVector<BlockStore::Ref, 16> blocks;
  blocks.reserve(first_block[H]);
  for (int64_t i = 0; i < first_block[H]; ++i) {
    absl::StatusOr<BlockStore::Ref> b = I.store->CreateBlock();
    if (!b.ok()) {
      for (BlockStore::Ref got : blocks) I.store->Delete(got).IgnoreError();
      return absl::ResourceExhaustedError(
          absl::StrFormat("appending %d tokens to layer %d of sequence %d needs %d host-tier blocks: %s", n, layer,
                          id, first_block[H], b.status().message()));
    }
    blocks.push_back(*b);
  }
  absl::InlinedVector<absl::Status, 16> results(H);
  auto apply = [&](int h) {
    results[h] = I.Head(s, layer, h).ApplyAppend(
        *plans[h], sources[h],
        std::span<const BlockStore::Ref>(blocks.data() + first_block[h], first_block[h + 1] - first_block[h]));
  };
  if (n == 1 || H == 1 || plan_only) {  // plan-only work per head is too small to share out
    for (int h = 0; h < H; ++h) apply(h);
  } else {
    tbb::parallel_for(0, H, apply);
  }
  for (const absl::Status& st : results) {
    if (!st.ok()) return absl::InternalError(absl::StrCat("append failed half-way: ", st.message()));
  }
  for (int h = 0; h < H; ++h) I.Head(s, layer, h).SealFullBlocks();
  I.appended.fetch_add(n, std::memory_order_relaxed);
  return absl::OkStatus();
}

absl::StatusOr<AttendCounts> Runtime::Attend(SequenceId id, int layer, const void* q, void* out,
                                             const AttendOptions& options) {
  AttendItem item{id, q, out};
  return AttendBatch(layer, {&item, 1}, options);
}

absl::StatusOr<AttendCounts> Runtime::AttendBatch(int layer, absl::Span<const AttendItem> items,
                                                  const AttendOptions& options) {
  Impl& I = *impl_;
  const ModelShape& sh = I.options.shape;
  if (absl::Status st = I.CheckLayer(layer); !st.ok()) return st;
  if (items.empty()) return AttendCounts{};
  const DType out_dtype = options.out_dtype.value_or(sh.dtype);
  if (out_dtype != DType::kF32 && out_dtype != DType::kF16 && out_dtype != DType::kBF16) {
    return absl::InvalidArgumentError(absl::StrFormat("attend: out_dtype %d is not f32, f16 or bf16", int(out_dtype)));
  }
  for (const AttendItem& it : items) {
    if (I.options.plan_only) continue;  // no query, no output: the weights decide
    if (it.q == nullptr || it.out == nullptr) {
      return absl::InvalidArgumentError(absl::StrFormat("attend: q and out of sequence %d must not be null", it.sequence));
    }
    if (absl::Status st = I.CheckFinite(it.q, static_cast<int64_t>(sh.q_heads) * sh.head_dim, "q"); !st.ok())
      return st;
  }
  // Lock in id order so concurrent batches cannot deadlock.
  std::vector<size_t> order(items.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return items[a].sequence < items[b].sequence; });
  for (size_t i = 1; i < order.size(); ++i) {
    if (items[order[i]].sequence == items[order[i - 1]].sequence) {
      return absl::InvalidArgumentError(
          absl::StrFormat("attend batch names sequence %d twice", items[order[i]].sequence));
    }
  }
  std::vector<Impl::Locked> held(items.size());
  for (size_t i : order) {
    absl::StatusOr<Impl::Locked> locked = I.Acquire(items[i].sequence);
    if (!locked.ok()) return locked.status();
    held[i] = std::move(*locked);
    if (absl::Status st = I.CheckAttendable(*held[i].seq, layer); !st.ok()) return st;
  }

  const int H = sh.kv_heads;
  // Recalls that arrived become exact for this step (waiting up to the
  // budget); the rest of the vague tokens come from the sketch.
  const absl::Duration wait = absl::Microseconds(I.options.recall_wait_us);
  for (size_t i = 0; i < items.size(); ++i) {
    for (int h = 0; h < H; ++h) {
      if (absl::Status st = I.Head(*held[i].seq, layer, h).PollRecalls(wait); !st.ok()) return st;
    }
  }
  std::vector<kernels::AttendParams> params(items.size() * H);
  for (size_t i = 0; i < items.size(); ++i) {
    for (int h = 0; h < H; ++h) {
      if (I.options.plan_only) {
        I.Head(*held[i].seq, layer, h).FillAttend(params[i * H + h]);  // the ranges AfterAttend reads
      } else {
        I.FillAttend(*held[i].seq, layer, h, items[i].q, items[i].out, out_dtype, params[i * H + h]);
      }
    }
  }
  if (!I.options.plan_only) {
    I.backend->kernels().Attend(params);
    if (absl::Status st = I.backend->kernels().error(); !st.ok()) return st;
  }
  AttendCounts total;
  for (size_t i = 0; i < items.size(); ++i) {
    absl::StatusOr<AttendCounts> c = I.FinishAttend(*held[i].seq, layer);
    if (!c.ok()) return c.status();
    total += *c;
  }
  // Ask for what this step's query ranks highest, for the next step: every
  // head's ranking scores in one call per kind, then each head's selection.
  if (I.plan.recall_tokens > 0) {
    thread_local std::vector<HeadCache::RankWork> work;  // reused: calls may run on several threads at once
    work.resize(items.size() * H);
    for (size_t i = 0; i < items.size(); ++i) {
      for (int h = 0; h < H; ++h) {
        if (absl::Status st = I.Head(*held[i].seq, layer, h)
                                  .RankPrepare(I.options.recall_proxy, I.QueryGroup(items[i].q, h),  // q unused plan-only
                                               I.plan.recall_tokens,
                                               /*score_staged=*/I.options.recall_replace == RecallReplace::kOutranked,
                                               work[i * H + h]);
            !st.ok())
          return st;
      }
    }
    if (absl::Status st = I.RankScores({work.data(), items.size() * H}); !st.ok()) return st;
    for (size_t i = 0; i < items.size(); ++i) {
      for (int h = 0; h < H; ++h) {
        HeadCache& head = I.Head(*held[i].seq, layer, h);
        head.RankFinish(work[i * H + h]);
        if (absl::StatusOr<int> n = head.Prefetch(work[i * H + h]); !n.ok()) return n.status();
      }
    }
  }
  return total;
}

absl::StatusOr<int> Runtime::Recall(SequenceId id, int layer, int kv_head, absl::Span<const int64_t> positions) {
  Impl& I = *impl_;
  if (absl::Status st = I.CheckHead(layer, kv_head); !st.ok()) return st;
  absl::StatusOr<Impl::Locked> locked = I.Acquire(id);
  if (!locked.ok()) return locked.status();
  return I.Head(*locked->seq, layer, kv_head).Recall({positions.data(), positions.size()});
}

absl::StatusOr<std::vector<int64_t>> Runtime::RankVague(SequenceId id, int layer, int kv_head, const void* q,
                                                        int count) const {
  Impl& I = *impl_;
  if (absl::Status st = I.CheckHead(layer, kv_head); !st.ok()) return st;
  if (absl::Status st = I.CheckQuery(q); !st.ok()) return st;
  absl::StatusOr<Impl::Locked> locked = I.Acquire(id);
  if (!locked.ok()) return locked.status();
  return I.Head(*locked->seq, layer, kv_head).Rank(I.RankingProxy(), I.QueryGroup(q, kv_head), count);
}

absl::StatusOr<int64_t> Runtime::RecallTop(SequenceId id, int layer, const void* q, int per_head) {
  Impl& I = *impl_;
  if (absl::Status st = I.CheckLayer(layer); !st.ok()) return st;
  if (absl::Status st = I.CheckQuery(q); !st.ok()) return st;
  absl::StatusOr<Impl::Locked> locked = I.Acquire(id);
  if (!locked.ok()) return locked.status();
  const int H = I.options.shape.kv_heads;
  std::vector<HeadCache::RankWork> work(H);
  for (int h = 0; h < H; ++h) {
    if (absl::Status st = I.Head(*locked->seq, layer, h).RankPrepare(I.RankingProxy(), I.QueryGroup(q, h), per_head,
                                                                     /*score_staged=*/false, work[h]);
        !st.ok())
      return st;
  }
  if (absl::Status st = I.RankScores(work); !st.ok()) return st;
  int64_t total = 0;
  for (int h = 0; h < H; ++h) {
    HeadCache& head = I.Head(*locked->seq, layer, h);
    head.RankFinish(work[h]);
    if (work[h].out.empty()) continue;
    absl::StatusOr<int> n = head.Recall(work[h].out);
    if (!n.ok()) return n.status();
    total += *n;
  }
  return total;
}

absl::StatusOr<Region> Runtime::TokenRegion(SequenceId id, int layer, int kv_head, int64_t position) const {
  Impl& I = *impl_;
  if (absl::Status st = I.CheckHead(layer, kv_head); !st.ok()) return st;
  absl::StatusOr<Impl::Locked> locked = I.Acquire(id);
  if (!locked.ok()) return locked.status();
  Sequence& s = *locked->seq;
  HeadCache& head = I.Head(s, layer, kv_head);
  if (absl::Status st = I.CheckPosition(head, layer, position); !st.ok()) return st;
  return head.region(position);
}

absl::Status Runtime::ReadToken(SequenceId id, int layer, int kv_head, int64_t position, void* k, void* v) const {
  Impl& I = *impl_;
  if (absl::Status st = I.CheckHead(layer, kv_head); !st.ok()) return st;
  if (k == nullptr || v == nullptr) return absl::InvalidArgumentError("read: k and v must not be null");
  absl::StatusOr<Impl::Locked> locked = I.Acquire(id);
  if (!locked.ok()) return locked.status();
  Sequence& s = *locked->seq;
  HeadCache& head = I.Head(s, layer, kv_head);
  if (absl::Status st = I.CheckPosition(head, layer, position); !st.ok()) return st;
  return head.ReadToken(position, k, v);
}

absl::Status Runtime::EstimateToken(SequenceId id, int layer, int kv_head, int64_t position, float* k,
                                    float* v) const {
  Impl& I = *impl_;
  if (absl::Status st = I.CheckHead(layer, kv_head); !st.ok()) return st;
  if (k == nullptr || v == nullptr) return absl::InvalidArgumentError("estimate: k and v must not be null");
  absl::StatusOr<Impl::Locked> locked = I.Acquire(id);
  if (!locked.ok()) return locked.status();
  Sequence& s = *locked->seq;
  HeadCache& head = I.Head(s, layer, kv_head);
  if (absl::Status st = I.CheckPosition(head, layer, position); !st.ok()) return st;
  return head.EstimateToken(position, k, v);
}

absl::StatusOr<RegionCounts> Runtime::Regions(SequenceId id) const {
  absl::StatusOr<Impl::Locked> locked = impl_->Acquire(id);
  if (!locked.ok()) return locked.status();
  Sequence& s = *locked->seq;
  RegionCounts c;
  for (const auto& head : s.heads) c += head->regions();
  return c;
}

void Runtime::Drain() { impl_->store->Drain(); }

RuntimeStats Runtime::Stats() const {
  const Impl& I = *impl_;
  RuntimeStats st;
  for (const auto& seq : I.All()) {
    std::unique_lock lock(seq->mu);
    if (seq->removed) continue;
    ++st.sequences;
    for (const auto& head : seq->heads) {
      st.regions += head->regions();
      st.recall += head->recall_stats();
    }
  }
  const ModelShape& sh = I.options.shape;
  st.device_budget_bytes = I.plan.budget_bytes;
  st.device_reserved = I.plan.per_head * (static_cast<int64_t>(sh.layers) * sh.kv_heads * st.sequences);
  st.device_reserved.metadata += I.plan.shared_bytes;
  st.peak_device_bytes = I.arena->peak_bytes_in_use();
  {
    std::lock_guard stats_lock(I.retired_mu);
    st.recall += I.retired_recall;
  }
  st.host_tier = I.store->HostStats();
  st.disk_tier = I.store->DiskStats();
  st.store = I.store->Stats();
  st.attends = I.attends.load(std::memory_order_relaxed);
  st.served.exact = I.exact.load(std::memory_order_relaxed);
  st.served.from_sketch = I.from_sketch.load(std::memory_order_relaxed);
  st.served.dropped = I.dropped.load(std::memory_order_relaxed);
  st.appended_tokens = I.appended.load(std::memory_order_relaxed);
  st.recalled_tokens = st.recall.exact_hits + st.recall.late_arrivals;
  return st;
}

absl::Status Runtime::CheckInvariants() const {
  const Impl& I = *impl_;
  int64_t blocks = 0;
  for (const auto& seq : I.All()) {
    std::unique_lock lock(seq->mu);
    if (seq->removed) continue;
    for (const auto& head : seq->heads) {
      if (absl::Status st = head->CheckInvariants(); !st.ok()) {
        return absl::InternalError(absl::StrFormat("sequence %d: %s", seq->id, st.message()));
      }
    }
    for (int l = 0; l < I.options.shape.layers; ++l) {
      const int64_t len = I.Head(*seq, l, 0).length();
      for (int h = 1; h < I.options.shape.kv_heads; ++h) {
        if (I.Head(*seq, l, h).length() != len) {
          return absl::InternalError(absl::StrFormat("sequence %d layer %d: KV heads differ in length", seq->id, l));
        }
      }
    }
    for (const auto& head : seq->heads) blocks += head->blocks();
  }
  const StoreStats store = I.store->Stats();
  if (store.blocks != blocks) {
    return absl::InternalError(absl::StrFormat("the block store holds %d blocks, sequences %d", store.blocks, blocks));
  }
  const int64_t device = I.arena->bytes_in_use();
  if (device > I.plan.budget_bytes) {
    return absl::InternalError(
        absl::StrFormat("device bytes in use %d exceed the budget %d", device, I.plan.budget_bytes));
  }
  return absl::OkStatus();
}

}  // namespace kvtier
