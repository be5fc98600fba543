"""The KV-cache policies the fidelity harness compares, as decode-time lanes.

A lane holds one sequence's cache under one policy and budget. It starts from
the full-attention prefill (every layer's K/V and the attention each token
received), compresses it to the budget, and then serves every later
attention call: ``attend(layer, q, k, v)`` appends the step's k/v and returns
the attention output for q. K/V are stored in float16 by every lane but the
full-cache reference, as a serving stack stores them.

Policies (``POLICIES``):
  full                  exact cache (the reference)
  sink-recent           StreamingLLM-style eviction: sinks and a recent window
  heavy-hitter          H2O-style: sinks, recent window, heavy-hitter candidates;
                        vague tokens dropped
  kmeans-centroid       RetroInfer-style estimation zone: sinks and a recent
                        window exact; every other token clustered by k-means on
                        its key, each cluster one pseudo-token (centroid key,
                        value sum, count); numpy, for comparison
  oracle-topk           an upper bound, not a cache: exact attention over the
                        budget's worth of tokens with the highest true attention,
                        chosen each step from the full cache
  kvtier-cs             kvtier, Count-Sketch, shrink, no recall
  kvtier-centroid       kvtier, centroid sketch, no recall
  kvtier-cs-recall      kvtier, Count-Sketch, asynchronous recall from the host
                        tier ranked by the sketch's scores
  kvtier-cs-recall-bounds         the same, ranked by per-block key bounds (Quest-style)
  kvtier-centroid-recall          centroid sketch, recall ranked by its scores
  kvtier-centroid-recall-bounds   centroid sketch, recall ranked by key bounds
  kvtier-default        kvtier with every Options default

Every kvtier lane and the baselines run through the same runtime at the same
device budget (a fraction of the full cache at the run's context length);
the eviction baselines are kvtier configurations with no sketch and no
staging, so their regions are sized by the same planner.
"""

from __future__ import annotations

import numpy as np

# name -> ("kvtier", option overrides) | ("kmeans", {}) | ("full", {})
POLICIES: dict[str, tuple[str, dict]] = {
    "full": ("full", {}),
    "sink-recent": ("kvtier", dict(sketch_kind="none", vague_policy="drop", candidate_tokens=0,
                                   staging_tokens=0, recall_proxy="none")),
    "heavy-hitter": ("kvtier", dict(sketch_kind="none", vague_policy="drop", staging_tokens=0,
                                    recall_proxy="none")),
    "kmeans-centroid": ("kmeans", {}),
    "oracle-topk": ("oracle", {}),
    "kvtier-cs": ("kvtier", dict(sketch_kind="count-sketch", vague_policy="shrink", staging_tokens=0,
                                 recall_proxy="none")),
    "kvtier-centroid": ("kvtier", dict(sketch_kind="centroid", staging_tokens=0, recall_proxy="none")),
    "kvtier-cs-recall": ("kvtier", dict(sketch_kind="count-sketch", vague_policy="shrink",
                                        recall_proxy="sketch")),
    "kvtier-cs-recall-bounds": ("kvtier", dict(sketch_kind="count-sketch", vague_policy="shrink",
                                               recall_proxy="block-bounds")),
    "kvtier-centroid-recall": ("kvtier", dict(sketch_kind="centroid", recall_proxy="sketch")),
    "kvtier-centroid-recall-bounds": ("kvtier", dict(sketch_kind="centroid", recall_proxy="block-bounds")),
    "kvtier-default": ("kvtier", {}),
}

DEFAULT_POLICIES = ["sink-recent", "heavy-hitter", "kmeans-centroid", "oracle-topk", "kvtier-cs",
                    "kvtier-centroid", "kvtier-centroid-recall", "kvtier-centroid-recall-bounds"]


def softmax_attend(q, k, v, group, bias=None):
    """q [qh, d], k, v [n, kvh, d] (any float dtype), bias [n, kvh] or None
    -> [qh, d] float32 (one softmax per query head)."""
    d = q.shape[-1]
    kvh = k.shape[1]
    qg = q.reshape(kvh, group, d).astype(np.float32)
    kt = k.astype(np.float32).transpose(1, 2, 0)          # [kvh, d, n]
    logit = np.matmul(qg, kt) / np.float32(np.sqrt(d))    # [kvh, g, n]
    if bias is not None:
        logit += bias.T[:, None, :]
    logit -= logit.max(axis=-1, keepdims=True)
    p = np.exp(logit)
    p /= p.sum(axis=-1, keepdims=True)
    out = np.matmul(p, v.astype(np.float32).transpose(1, 0, 2))  # [kvh, g, d]
    return out.reshape(kvh * group, d)


class FullLane:
    """The full cache in float32: exact attention over every token."""

    def __init__(self, cache, group):
        self.k = [c[0].copy() for c in cache]
        self.v = [c[1].copy() for c in cache]
        self.group = group

    def attend(self, layer, q, k, v):
        self.k[layer] = np.concatenate([self.k[layer], k[None]])
        self.v[layer] = np.concatenate([self.v[layer], v[None]])
        return softmax_attend(q, self.k[layer], self.v[layer], self.group)

    def close(self):
        pass


def budget_tokens(fraction: float, context: int) -> int:
    """Token-equivalents (K+V of one token, one layer and KV head) of a budget."""
    return max(1, int(fraction * context))


class KMeansLane:
    """RetroInfer-style estimation: exact sinks and recent window, k-means
    clusters for the rest.

    Budget split (per layer and KV head, in token-equivalents of K+V): half to
    the clusters (each stores a centroid key and a value sum: one token's
    bytes), half to the sinks and the recent window. Clusters come from Lloyd's
    k-means on the keys (k-means++-style seeding by a fixed-seed sample, 12
    iterations). A cluster enters attention as one pseudo-token: logit
    q.centroid/sqrt(d) + log(count), value sum/count. During decode, a token
    that leaves the recent window joins its nearest cluster (running-mean
    centroid, value sum, count), as RetroInfer's update does."""

    SINK = 4
    ITERS = 12

    def __init__(self, cache, group, fraction, context, seed=0):
        self.group = group
        total = budget_tokens(fraction, context)
        self.clusters = max(1, total // 2)
        self.recent = max(1, total - self.clusters - self.SINK)
        rng = np.random.default_rng(seed)
        self.layers = []
        for k, v in cache:
            k = k.astype(np.float16).astype(np.float32)
            v = v.astype(np.float16).astype(np.float32)
            n = k.shape[0]
            keep_recent = min(self.recent, max(0, n - self.SINK))
            mid = slice(self.SINK, n - keep_recent)
            st = {
                "sink_k": k[:self.SINK], "sink_v": v[:self.SINK],
                "rec_k": k[n - keep_recent:], "rec_v": v[n - keep_recent:],
            }
            st.update(self._cluster(k[mid], v[mid], rng))
            self.layers.append(st)

    def _cluster(self, k, v, rng):
        n, kvh, d = k.shape
        c = self.clusters
        cent = np.zeros((c, kvh, d), np.float32)
        vsum = np.zeros((c, kvh, d), np.float32)
        count = np.zeros((c, kvh), np.float32)
        if n == 0:
            return {"cent": cent, "vsum": vsum, "count": count}
        for h in range(kvh):
            x = k[:, h, :]
            m = min(c, n)
            init = rng.choice(n, size=m, replace=False)
            cen = x[init].copy()
            for _ in range(self.ITERS):
                dist = (x * x).sum(1)[:, None] - 2 * x @ cen.T + (cen * cen).sum(1)[None, :]
                a = dist.argmin(1)
                cnt = np.bincount(a, minlength=m).astype(np.float32)
                s = np.zeros_like(cen)
                np.add.at(s, a, x)
                nz = cnt > 0
                cen[nz] = s[nz] / cnt[nz, None]
            dist = (x * x).sum(1)[:, None] - 2 * x @ cen.T + (cen * cen).sum(1)[None, :]
            a = dist.argmin(1)
            cnt = np.bincount(a, minlength=m).astype(np.float32)
            vs = np.zeros((m, d), np.float32)
            np.add.at(vs, a, v[:, h, :])
            ks = np.zeros((m, d), np.float32)
            np.add.at(ks, a, x)
            nz = cnt > 0
            cent[:m][nz, h] = ks[nz] / cnt[nz, None]
            vsum[:m, h] = vs
            count[:m, h] = cnt
        return {"cent": cent, "vsum": vsum, "count": count}

    def attend(self, layer, q, k, v):
        st = self.layers[layer]
        k = k.astype(np.float16).astype(np.float32)[None]
        v = v.astype(np.float16).astype(np.float32)[None]
        st["rec_k"] = np.concatenate([st["rec_k"], k])
        st["rec_v"] = np.concatenate([st["rec_v"], v])
        if st["rec_k"].shape[0] > self.recent:
            ok, ov = st["rec_k"][0], st["rec_v"][0]  # [kvh, d]
            st["rec_k"], st["rec_v"] = st["rec_k"][1:], st["rec_v"][1:]
            for h in range(ok.shape[0]):
                live = st["count"][:, h] > 0
                dist = ((st["cent"][:, h, :] - ok[h]) ** 2).sum(1)
                dist[~live] = np.inf if live.any() else 0.0
                j = int(dist.argmin())
                cnt = st["count"][j, h]
                st["cent"][j, h] = (st["cent"][j, h] * cnt + ok[h]) / (cnt + 1)
                st["vsum"][j, h] += ov[h]
                st["count"][j, h] = cnt + 1
        ks = np.concatenate([st["sink_k"], st["rec_k"]])
        vs = np.concatenate([st["sink_v"], st["rec_v"]])
        live = st["count"] > 0                                    # [c, kvh]
        cnt = np.where(live, st["count"], 1.0)
        cent_v = st["vsum"] / cnt[..., None]
        kk = np.concatenate([ks, st["cent"]])
        vv = np.concatenate([vs, cent_v])
        bias = np.concatenate([np.zeros(ks.shape[:2], np.float32),
                               np.where(live, np.log(cnt), -np.inf).astype(np.float32)])
        return softmax_attend(q, kk, vv, self.group, bias)

    def close(self):
        pass


class OracleLane:
    """Not a cache policy: an upper bound for every policy that attends
    exactly over a subset of the tokens. Each step, for each KV head, the
    budget's worth of tokens (budget_tokens) with the highest true attention
    (summed over the group's query heads) is chosen with the full cache's
    knowledge, and attention runs over those only."""

    def __init__(self, cache, group, fraction, context):
        self.full = FullLane(cache, group)
        self.group = group
        self.keep = budget_tokens(fraction, context)

    def attend(self, layer, q, k, v):
        f = self.full
        f.k[layer] = np.concatenate([f.k[layer], k[None]])
        f.v[layer] = np.concatenate([f.v[layer], v[None]])
        K, V = f.k[layer], f.v[layer]
        n, kvh, d = K.shape
        if n <= self.keep:
            return softmax_attend(q, K, V, self.group)
        qg = q.reshape(kvh, self.group, d)
        logit = np.matmul(qg, K.transpose(1, 2, 0)) / np.float32(np.sqrt(d))   # [kvh, g, n]
        p = np.exp(logit - logit.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        imp = p.sum(axis=1)                                                     # [kvh, n]
        drop = np.argpartition(-imp, self.keep, axis=-1)[:, self.keep:]         # [kvh, n - keep]
        bias = np.zeros((n, kvh), np.float32)
        for h in range(kvh):
            bias[drop[h], h] = -np.inf
        return softmax_attend(q, K, V, self.group, bias)

    def close(self):
        pass


class KvtierLane:
    """One kvtier Runtime holding one sequence, at a budget fraction of the
    full cache at `context` tokens."""

    def __init__(self, cache, scores, group, fraction, context, overrides, recall_wait_us):
        import kvtier

        shape = kvtier.ModelShape(layers=len(cache), q_heads=cache[0][0].shape[1] * group,
                                  kv_heads=cache[0][0].shape[1], head_dim=cache[0][0].shape[2],
                                  dtype="f16")
        opts = dict(device_budget_fraction=fraction, max_context=context, recall_wait_us=recall_wait_us)
        opts.update(overrides)
        self.rt = kvtier.Runtime(kvtier.Options(shape=shape, **opts))
        self.rt.add_sequence(1)
        for layer, (k, v) in enumerate(cache):
            self.rt.append(1, layer, np.ascontiguousarray(k, dtype=np.float16),
                           np.ascontiguousarray(v, dtype=np.float16),
                           scores=np.ascontiguousarray(scores[layer], dtype=np.float32))
        self.q_heads = shape.q_heads
        self.head_dim = shape.head_dim

    def attend(self, layer, q, k, v):
        self.rt.append(1, layer, np.ascontiguousarray(k[None], dtype=np.float16),
                       np.ascontiguousarray(v[None], dtype=np.float16))
        out = np.empty((self.q_heads, self.head_dim), np.float32)
        self.rt.attend(1, layer, np.ascontiguousarray(q, dtype=np.float16), out=out, out_dtype="f32")
        return out

    def stats(self):
        return self.rt.stats()

    def plan(self):
        return self.rt.plan

    def close(self):
        self.rt.drain()
        self.rt.remove_sequence(1)


def make_lane(policy, cache, scores, group, fraction, context, recall_wait_us, seed=0,
              overrides=None):
    kind, opts = POLICIES[policy]
    if kind == "full":
        return FullLane(cache, group)
    if kind == "oracle":
        return OracleLane(cache, group, fraction, context)
    if kind == "kmeans":
        return KMeansLane(cache, group, fraction, context, seed=seed)
    opts = dict(opts)
    if overrides:
        opts.update(overrides)
    return KvtierLane(cache, scores, group, fraction, context, opts, recall_wait_us)
