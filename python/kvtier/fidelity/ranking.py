"""How well each recall proxy finds the vague tokens attention needs.

    python -m kvtier.fidelity.ranking [--context 2048] [--budget 0.1] [--top 32] [--docs 2]

For each text: full-attention prefill, the cache compressed into a kvtier
runtime at the budget, then for every layer and KV head the query of the next
position asks the runtime's proxy (Runtime.rank_vague) for its `top` best
vague tokens. Compared with the true top `top` vague tokens by attention
(summed over the group's query heads, from the full cache): the overlap, and
the attention mass the proxy's picks carry against the best possible picks.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from kvtier.fidelity.harness import DEFAULT_TEXT_DIR, load_texts, make_docs
from kvtier.fidelity.policies import KvtierLane

PROXIES = {
    "count-sketch": dict(sketch_kind="count-sketch", recall_proxy="sketch"),
    "count-sketch-4rows": dict(sketch_kind="count-sketch", recall_proxy="sketch", sketch_rows=4),
    "centroid": dict(sketch_kind="centroid", recall_proxy="sketch"),
    "block-bounds": dict(sketch_kind="centroid", recall_proxy="block-bounds"),
}


def main(argv=None) -> int:
    from kvtier.fidelity.model import Model

    ap = argparse.ArgumentParser(prog="python -m kvtier.fidelity.ranking", description=__doc__.split("\n\n")[2])
    ap.add_argument("texts", nargs="*", default=[DEFAULT_TEXT_DIR])
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--top", type=int, default=32)
    ap.add_argument("--docs", type=int, default=2)
    args = ap.parse_args(argv)
    model = Model()
    c = model.config
    group = c.q_heads // c.kv_heads
    p_len = args.context - 1
    docs = make_docs(model.tokenizer, load_texts(args.texts), args.context, args.docs)
    queries = {}

    def hook(layer, q, k, v):
        queries[layer] = q[p_len].copy()

    rows = {name: [] for name in PROXIES}
    for name, ids in docs:
        cache, _, scores = model.prefill(ids, on_layer=hook, score_until=p_len)
        cache = [(k[:p_len], v[:p_len]) for k, v in cache]
        scores = [s[:p_len] for s in scores]
        for proxy, opts in PROXIES.items():
            lane = KvtierLane(cache, scores, group, args.budget, args.context, opts, 0)
            overlap, mass, best = [], [], []
            for layer in range(c.layers):
                q = queries[layer]
                q16 = np.ascontiguousarray(q, dtype=np.float16)
                for h in range(c.kv_heads):
                    region = np.array([lane.rt.token_region(1, layer, h, t) for t in range(p_len)])
                    vague = np.flatnonzero(region == "vague")
                    logit = q[h * group:(h + 1) * group] @ cache[layer][0][:, h, :].T / np.sqrt(c.head_dim)
                    p = np.exp(logit - logit.max(-1, keepdims=True))
                    p /= p.sum(-1, keepdims=True)
                    imp = p.sum(0) / group
                    true_top = vague[np.argsort(-imp[vague])[:args.top]]
                    got = lane.rt.rank_vague(1, layer, h, q16, args.top)
                    overlap.append(len(set(got.tolist()) & set(true_top.tolist())) / args.top)
                    mass.append(imp[got].sum())
                    best.append(imp[true_top].sum())
            lane.close()
            rows[proxy].append((np.mean(overlap), np.mean(mass), np.mean(best)))
            print(f"{name}: {proxy}: overlap {np.mean(overlap):.3f}, mass {np.mean(mass):.4f} of "
                  f"{np.mean(best):.4f}", file=sys.stderr, flush=True)
    chance = args.top / max(1, p_len)
    print(f"| proxy | overlap with the true top {args.top} vague tokens | attention mass picked | "
          f"best possible | share of the best |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for proxy, r in rows.items():
        o, m, b = np.mean(r, axis=0)
        print(f"| {proxy} | {o:.1%} | {m:.4f} | {b:.4f} | {m / b:.1%} |")
    print(f"\n{len(docs)} texts of {args.context} tokens, budget {args.budget:.0%}, 30 layers x 3 KV heads; "
          f"a random pick overlaps about {chance:.1%}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
