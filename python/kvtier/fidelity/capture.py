"""Capture of a run's real Q/K/V, for replay instead of generated content.

Format (docs/capture.md): a directory holding manifest.json and, for each
captured layer L, three raw files layerL.q.f16, layerL.k.f16, layerL.v.f16:
little-endian IEEE binary16 in C order, q [tokens][q_heads][head_dim], k and v
[tokens][kv_heads][head_dim]; q and k after RoPE, exactly what the runtime's
Append and Attend receive. Row t is the token at position t of the text.
"""

from __future__ import annotations

import json
import os

import numpy as np

FORMAT = "kvtier-capture"
VERSION = 1


class Capture:
    """on_layer callback of Model.prefill that writes the chosen layers."""

    def __init__(self, directory, layers, config, token_ids, prefill_tokens):
        bad = [l for l in layers if not 0 <= l < config.layers]
        if bad:
            raise ValueError(f"capture layers {bad} outside [0, {config.layers})")
        os.makedirs(directory, exist_ok=True)
        self.dir = directory
        self.layers = sorted(set(layers))
        self.config = config
        self.token_ids = [int(t) for t in token_ids]
        self.prefill_tokens = int(prefill_tokens)
        self.files = {}

    def __call__(self, layer, q, k, v):
        if layer not in self.layers:
            return
        names = {}
        for name, a in (("q", q), ("k", k), ("v", v)):
            fname = f"layer{layer}.{name}.f16"
            np.ascontiguousarray(a, dtype="<f2").tofile(os.path.join(self.dir, fname))
            names[name] = fname
        self.files[str(layer)] = names

    def finish(self):
        c = self.config
        manifest = dict(
            format=FORMAT, version=VERSION, model="SmolLM2-135M-Instruct",
            model_layers=c.layers, q_heads=c.q_heads, kv_heads=c.kv_heads, head_dim=c.head_dim,
            dtype="f16", byte_order="little", tokens=len(self.token_ids),
            prefill_tokens=self.prefill_tokens, layers=self.layers, files=self.files,
            rope="applied to q and k (adjacent pairs), base %g" % c.rope_base,
            token_ids=self.token_ids)
        with open(os.path.join(self.dir, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)


def load(directory):
    """manifest, {layer: (q, k, v)} as float16 arrays (memory-mapped)."""
    with open(os.path.join(directory, "manifest.json")) as f:
        m = json.load(f)
    if m.get("format") != FORMAT or m.get("version") != VERSION:
        raise ValueError(f"{directory}: not a {FORMAT} v{VERSION} capture")
    T = m["tokens"]
    out = {}
    for layer in m["layers"]:
        names = m["files"][str(layer)]
        shp = {"q": (T, m["q_heads"], m["head_dim"]), "k": (T, m["kv_heads"], m["head_dim"]),
               "v": (T, m["kv_heads"], m["head_dim"])}
        arrs = []
        for name in ("q", "k", "v"):
            path = os.path.join(directory, names[name])
            expect = int(np.prod(shp[name])) * 2
            got = os.path.getsize(path)
            if got != expect:
                raise ValueError(f"{path}: {got} bytes, expected {expect} for shape {shp[name]} f16")
            arrs.append(np.memmap(path, dtype="<f2", mode="r", shape=shp[name]))
        out[layer] = tuple(arrs)
    return m, out
