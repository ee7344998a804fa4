"""Sparsity designs for quantized SwiGLU models: perplexity per byte read, predictor included.

    python benchmarks/sparsity_designs.py [--model PATH] [--tokens 4096] [--designs topk teal-ffn ...]
                                          [--densities 0.3 0.5 0.7] [-o md|json]

Decode at batch 1 is bound by the weight bytes a token reads. With 4-bit weights an int4 shadow of
gate and up costs about as much as gate and up themselves, so the int4 shadow predictor saves nothing
there. This script measures, on the dequantized GGUF model in torch (sparsity simulated by masks:
speed does not matter here, what is counted does), the perplexity of each design against the bytes
per token it would read from the file's own quantized tensors.

Byte accounting. The CPU kernels for quantized weights store each matrix input-major ("column
planes": the quantized values of all rows of one input column are contiguous), so skipping an input
column of a matrix saves exactly that column's bytes (tensor bytes ÷ input width, from the GGUF's
n_bytes per tensor, safetensors' bytes otherwise). Per token:

- a TEAL site (``|a_j| <= threshold`` zeroes input j) reads the kept fraction of its matrices:
  ``qkv`` (q, k, v on the normed hidden state), ``o`` (the attention output), ``gu`` (gate and up on
  the normed hidden state), ``down`` (h = silu(g)·u: down's columns are the neurons), ``head``
  (the final normed state; tied heads read the embedding matrix);
- ``topk``: gate/up dense (or their ``gu`` fraction), down reads the k = round(density·n) columns of
  the top-k |h| of each token;
- a shadow (``sign``, ``int2``, ``int4``) scores |silu(g̃)·ũ| from a low-bit copy of gate and up
  and the top-k neurons are computed exactly. Selecting *rows* of gate/up saves nothing in column
  planes, so these designs need a row-major copy of gate/up: bytes = shadow + k selected gate and
  up rows + k down columns. Shadows: ``sign`` 1 bit a weight and one fp16 scale (mean |w|) per row;
  ``int2`` 2 bits, groups of 32, fp16 scales (2.5 bits a weight); ``int4`` the library's predictor
  format (offload.predict.quant: groups of 32, fp16 scales, 4.5 bits a weight).
- norms and biases always count; the embedding lookup (one row) does not.

Thresholds (TEAL, Liu et al. 2024) are per layer and per matrix input: the (1 - density) quantile of
|a| over the calibration tokens, calibrated in order through the sparsified model (each site sees
the inputs the earlier sites' thresholds produce), then fixed on the evaluation text, where the
kept fraction varies by token and may drift from the target (the achieved density is what counts).
Calibration text: the calibration part of offload.corpus's default corpus (pydoc_data.topics);
perplexity: its held-out evaluation part, 256-token windows.

Designs: a name below, or components joined by ``+``, each ``name[@density]`` (components without
``@`` take the swept density): TEAL sites qkv, o, gu, down, head; top-k selectors topk, sign, int2,
int4 (at most one, and a shadow not with gu).

    dense          nothing skipped (the reference: 1.000)
    topk           exact gate/up, top-k |h| per token, sparse down (the oracle of every predictor)
    teal-down      TEAL on down's input h
    teal-ffn       TEAL on gate/up's input and on h
    teal-all       TEAL on q/k/v, o, gate/up and down inputs
    teal-all-head  teal-all and the head's input
    sign, int2, int4   shadow of gate/up predicting the top-k, row-major gate/up

RESULTS: (filled in below from the runs of this script)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from predictors import fake_quant  # benchmarks/ is on sys.path (the same int2 as predictors.py's study)

from offload.models.common import apply_rope, cached_attention, rope_inv_freq, rope_tables
from offload.sparse import activation, ffn_weights, topk_count, topk_mask

WINDOW = 256
SITES = ("qkv", "o", "gu", "down", "head")  # matmul inputs a TEAL threshold can sparsify
SELECTORS = ("topk", "sign", "int2", "int4")  # top-k per token of the neurons (down's columns)
SHADOW_BITS = {"sign": None, "int2": 2.5, "int4": 4.5}  # bits a weight; sign: 1 + 16/d (fp16 row scale)
ALIASES = {"dense": "", "topk": "topk", "teal-down": "down", "teal-ffn": "gu+down", "teal-all": "qkv+o+gu+down",
           "teal-all-head": "qkv+o+gu+down+head", "sign": "sign", "int2": "int2", "int4": "int4"}
DEFAULT_DESIGNS = ("topk", "teal-down", "teal-ffn", "teal-all", "teal-all-head", "sign", "int2", "int4",
                   "qkv+o+topk", "gu+topk")


# ---------------------------------------------------------------------------- designs
@dataclass(frozen=True)
class Design:
    """What a design sparsifies: TEAL sites → kept fraction, and an optional top-k selector."""

    name: str
    teal: dict = field(default_factory=dict)  # site → kept fraction
    selector: str | None = None
    select_density: float | None = None

    @property
    def layout(self) -> str:
        return "row-major gate/up" if self.selector in SHADOW_BITS else "column planes"


def parse_design(spec: str, density: float) -> Design:
    """A Design from a name or ``a[@d]+b[@d]...`` with ``density`` for components without ``@``."""
    teal, selector, select_density = {}, None, None
    for part in filter(None, ALIASES.get(spec, spec).split("+")):
        name, _, d = part.partition("@")
        d = float(d) if d else density
        if not 0 < d <= 1:
            raise ValueError(f"design {spec!r}: density {d} outside (0, 1]")
        if name in SITES:
            teal[name] = d
        elif name in SELECTORS:
            if selector is not None:
                raise ValueError(f"design {spec!r}: one selector at most ({selector}, {name})")
            selector, select_density = name, d
        else:
            raise ValueError(f"design {spec!r}: unknown component {name!r}; expected one of "
                             f"{', '.join(SITES + SELECTORS)} or a name: {', '.join(ALIASES)}")
    if selector is not None and "down" in teal:
        raise ValueError(f"design {spec!r}: down's input is chosen by {selector}; drop 'down'")
    if selector in SHADOW_BITS and "gu" in teal:
        # the shadow's selected gate/up rows are read row-major: skipped input columns save nothing there
        raise ValueError(f"design {spec!r}: a shadow selector reads gate/up row-major; 'gu' does not combine")
    return Design(spec, teal, selector, select_density)


def shadow_weights(w: torch.Tensor, kind: str) -> torch.Tensor:
    """The dequantized low-bit copy [n, d] of gate or up rows w that a shadow predictor scores with."""
    if kind == "sign":
        return w.sign() * w.abs().mean(1, keepdim=True)  # mean |w| is the L2-best scale for fixed signs
    if kind == "int4":
        from offload.predict.quant import dequantize_int4, quantize_int4

        return dequantize_int4(*quantize_int4(w), w.shape[1])
    return fake_quant(w, 2)


def shadow_bytes(kind: str, n: int, d: int) -> float:
    """Bytes per token of a shadow of gate and up (2·n rows of d weights)."""
    bits = 1 + 16 / d if kind == "sign" else SHADOW_BITS[kind]
    return 2 * n * d * bits / 8


# ---------------------------------------------------------------------------- bytes of the file
def tensor_bytes(ckpt) -> dict[str, int]:
    """Bytes each tensor occupies in the checkpoint file (quantized size for GGUF), by HF name."""
    if ckpt.gguf_file is not None:
        from gguf import GGUFReader

        from offload.gguf_loader import hf_tensor_name

        reader = GGUFReader(next(iter(ckpt.files.values())))
        return {hf_tensor_name(t.name): int(t.n_bytes) for t in reader.tensors}
    from offload.checkpoint import read_safetensors_header

    out = {}
    for path in set(ckpt.files.values()):
        for name, info in read_safetensors_header(path).items():
            if name != "__metadata__":
                begin, end = info["data_offsets"]
                out[name] = end - begin
    return out


@dataclass(frozen=True)
class ByteTable:
    """Per-layer bytes of each matrix group and of what is always read; the head's; dims."""

    qkv: list[int]
    o: list[int]
    gate_up: list[int]
    down: list[int]
    fixed: list[int]  # norms and biases
    head: int
    final: int  # the final norm
    n: int
    d: int

    @property
    def dense_ffn(self) -> int:
        return sum(self.gate_up) + sum(self.down)

    @property
    def dense_model(self) -> int:
        return sum(self.qkv) + sum(self.o) + self.dense_ffn + sum(self.fixed) + self.head + self.final


def byte_table(sizes: dict[str, int], config: dict) -> ByteTable:
    """Group a checkpoint's tensor bytes (tensor_bytes) by the matmul inputs they are read with."""
    layers = int(config["num_hidden_layers"])
    tables = {k: [] for k in ("qkv", "o", "gate_up", "down", "fixed")}
    for i in range(layers):
        p = f"model.layers.{i}."
        mine = {k[len(p):]: v for k, v in sizes.items() if k.startswith(p)}
        groups = {"qkv": [f"self_attn.{x}_proj.weight" for x in "qkv"], "o": ["self_attn.o_proj.weight"],
                  "gate_up": ["mlp.gate_proj.weight", "mlp.up_proj.weight"], "down": ["mlp.down_proj.weight"]}
        for key, names in groups.items():
            tables[key].append(sum(mine.pop(name) for name in names))
        tables["fixed"].append(sum(mine.values()))
    head = sizes.get("lm_head.weight", sizes["model.embed_tokens.weight"])  # a tied head reads the embedding
    return ByteTable(**tables, head=head, final=sizes["model.norm.weight"], n=int(config["intermediate_size"]),
                     d=int(config["hidden_size"]))


def bytes_per_token(table: ByteTable, design: Design, kept: dict[str, list[float]]) -> tuple[float, float]:
    """(FFN bytes, model bytes) per token, given each site's achieved kept fraction per layer
    (``kept[site][layer]``; sites not sparsified are absent and read whole)."""
    def frac(site, i):
        return kept[site][i] if site in kept else 1.0

    ffn = attn = 0.0
    for i in range(len(table.down)):
        if design.selector in SHADOW_BITS:  # shadow, then the selected rows of a row-major gate/up copy
            ffn += shadow_bytes(design.selector, table.n, table.d) + table.gate_up[i] * frac("down", i)
        else:
            ffn += table.gate_up[i] * frac("gu", i)
        ffn += table.down[i] * frac("down", i)
        attn += table.qkv[i] * frac("qkv", i) + table.o[i] * frac("o", i) + table.fixed[i]
    head = table.head * (kept["head"][0] if "head" in kept else 1.0)
    return ffn, ffn + attn + head + table.final


# ---------------------------------------------------------------------------- the simulated forward
class SparseRun:
    """A functional forward of a LLaMA-family model (offload.models.llama) over windows [m, t] (each a
    fresh context) that applies a Design at each matmul input and counts what each input keeps.

    ``thresholds`` None: calibrate (each TEAL site's threshold is set from the inputs it sees, in
    model order, then kept in ``self.thresholds``); else use them."""

    def __init__(self, net, design: Design, thresholds: dict | None = None, shadows: dict | None = None):
        self.net, self.design = net, design
        self.calibrating = thresholds is None
        self.thresholds = {} if thresholds is None else thresholds
        self.shadows = shadows or {}  # layer → (gate, up) dequantized shadow weights
        self.kept: dict[str, list[list[float]]] = {}  # site → per layer [kept, total]

    def _count(self, site: str, layer: int, mask: torch.Tensor) -> None:
        places = 1 if site == "head" else len(self.net.layers)
        rows = self.kept.setdefault(site, [[0.0, 0.0] for _ in range(places)])
        rows[layer][0] += float(mask.sum())
        rows[layer][1] += mask.numel()

    def teal(self, site: str, layer: int, a: torch.Tensor) -> torch.Tensor:
        if site not in self.design.teal:
            return a
        mag = a.abs()
        if self.calibrating:
            flat = mag.reshape(-1)
            k = round((1 - self.design.teal[site]) * flat.numel())
            self.thresholds[(site, layer)] = float(flat.kthvalue(k).values) if k >= 1 else -1.0
        mask = mag > self.thresholds[(site, layer)]
        self._count(site, layer, mask)
        return a * mask

    def neurons(self, layer: int, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """h with only the selected neurons kept (top-k of |h| or of a shadow's score), or TEAL on h."""
        sel = self.design.selector
        if sel is None:
            return self.teal("down", layer, h)
        if sel == "topk":
            score = h.abs()
        else:
            g, u = self.shadows[layer]
            score = activation("swiglu", F.linear(x, g), F.linear(x, u)).abs()
        mask = topk_mask(score, topk_count(self.design.select_density, h.shape[-1]))
        self._count("down", layer, mask)
        return h * mask

    def block(self, i: int, layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        a, b, t = layer.attn, x.shape[0], x.shape[1]
        xa = self.teal("qkv", i, layer.attn_norm(x))
        qkv = a.qkv(xa).view(b, t, a.h + 2 * a.kvh, a.hd).transpose(1, 2)
        qk = apply_rope(qkv[:, : a.h + a.kvh], cos, sin)
        att = cached_attention(qk[:, : a.h], qk[:, a.h:], qkv[:, a.h + a.kvh:], None, i, 0)
        att = att.transpose(1, 2).reshape(b, t, a.h * a.hd)
        x = x + a.o(self.teal("o", i, att))
        w = ffn_weights(layer.mlp)
        xf = self.teal("gu", i, layer.ffn_norm(x))
        g, u = layer.mlp.gate_up(xf).split(w.n, dim=-1)
        h = self.neurons(i, xf, activation(w.kind, g, u))
        return x + F.linear(h, w.down, w.down_bias)

    @torch.inference_mode()
    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """The head's input [m, t, d] (final norm, then the head's TEAL site)."""
        c = self.net.config
        cos, sin = rope_tables(*rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings),
                               ids.shape[1])
        x = self.net.embed(ids)
        for i, layer in enumerate(self.net.layers):
            x = self.block(i, layer, x, cos, sin)
        return self.teal("head", 0, self.net.norm(x))

    @torch.inference_mode()
    def nll(self, wins: torch.Tensor, chunk: int = 4) -> tuple[float, int]:
        """Summed next-token NLL and the count of predicted tokens over windows [m, t]."""
        total, count = 0.0, 0
        for c in range(0, wins.shape[0], chunk):
            ids = wins[c: c + chunk]
            x = self.hidden(ids)
            for j in range(ids.shape[0]):  # one window's logits at a time: a 150K vocabulary is large
                logits = self.net.lm_head(x[j, :-1])
                total += float(F.cross_entropy(logits.float(), ids[j, 1:], reduction="sum"))
                count += ids.shape[1] - 1
        return total, count

    def fractions(self) -> dict[str, list[float]]:
        return {site: [k / t if t else 1.0 for k, t in rows] for site, rows in self.kept.items()}


def make_shadows(net, kind: str) -> dict:
    out = {}
    for i, layer in enumerate(net.layers):
        w = ffn_weights(layer.mlp)
        out[i] = (shadow_weights(w.gate, kind), shadow_weights(w.up, kind))
    return out


def measure(net, table: ByteTable, cal: torch.Tensor, wins: torch.Tensor, specs, densities,
            log=None) -> list[dict]:
    """One row per (design, density): perplexity ÷ dense, FFN and model bytes ÷ dense, achieved
    densities. ``cal``: calibration windows (thresholds), ``wins``: evaluation windows."""
    shadows: dict = {}
    t0 = time.perf_counter()
    dense_nll, count = SparseRun(net, parse_design("dense", 1.0), thresholds={}).nll(wins)
    rows = [{"design": "dense", "density": 1.0, "layout": "column planes", "neuron_density": 1.0,
             "ffn_bytes": 1.0, "model_bytes": 1.0, "ppl": math.exp(dense_nll / count), "ppl_ratio": 1.0,
             "kept": {}, "thresholds": {}, "seconds": time.perf_counter() - t0}]
    if log:
        log(f"dense: ppl {rows[0]['ppl']:.3f} over {count} tokens ({rows[0]['seconds']:.0f} s)")
    for spec in specs:
        for density in (densities if spec != "dense" else ()):
            t0 = time.perf_counter()
            design = parse_design(spec, density)
            if design.selector in SHADOW_BITS and design.selector not in shadows:
                shadows[design.selector] = make_shadows(net, design.selector)
            sh = shadows.get(design.selector)
            thresholds = None
            if design.teal:
                calib = SparseRun(net, design, shadows=sh)
                calib.hidden(cal)
                thresholds = calib.thresholds
            run = SparseRun(net, design, thresholds=thresholds or {}, shadows=sh)
            nll, _ = run.nll(wins)
            kept = run.fractions()
            ffn, model = bytes_per_token(table, design, kept)
            down = kept.get("down")
            row = {"design": spec, "density": density, "layout": design.layout,
                   "neuron_density": sum(down) / len(down) if down else 1.0,
                   "ffn_bytes": ffn / table.dense_ffn, "model_bytes": model / table.dense_model,
                   "ppl": math.exp(nll / count), "ppl_ratio": math.exp((nll - dense_nll) / count),
                   "kept": {s: sum(v) / len(v) for s, v in kept.items()}, "seconds": time.perf_counter() - t0,
                   "thresholds": {s: [thresholds[(s, i)] for i in range(len(kept[s]))] for s in design.teal}}
            rows.append(row)
            if log:
                log(format_row(row))
    return rows


# ---------------------------------------------------------------------------- output
HEADER = ("| design | layout | target density | neurons kept | other inputs kept | FFN bytes ÷ dense | "
          "model bytes ÷ dense | perplexity ÷ dense |")


def format_row(r: dict) -> str:
    others = ", ".join(f"{s} {v:.2f}" for s, v in r["kept"].items() if s != "down") or "-"
    return (f"| {r['design']} | {r['layout']} | {r['density']:.2f} | {r['neuron_density']:.3f} | {others} | "
            f"{r['ffn_bytes']:.3f} | {r['model_bytes']:.3f} | {r['ppl_ratio']:.4f} |")


def format_md(rows: list[dict], title: str) -> str:
    out = [title, "", HEADER, "|" + "---|" * 8]
    out += [format_row(r) for r in rows]
    return "\n".join(out)


def best_under(rows: list[dict], limit: float, key: str = "ffn_bytes") -> dict | None:
    """The row with the fewest bytes (``key``) whose perplexity ratio is at most ``limit``."""
    ok = [r for r in rows if r["ppl_ratio"] <= limit]
    return min(ok, key=lambda r: r[key]) if ok else None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a .gguf file or HF directory (default: the embedded SmolLM2)")
    ap.add_argument("--tokens", type=int, default=4096, help="evaluation tokens (256-token windows)")
    ap.add_argument("--calibration-tokens", type=int, default=4096, help="calibration tokens for the thresholds")
    ap.add_argument("--designs", nargs="+", default=list(DEFAULT_DESIGNS))
    ap.add_argument("--densities", nargs="+", type=float, default=[0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    ap.add_argument("-o", "--output", choices=("md", "json"), default="md")
    args = ap.parse_args(argv)
    for spec in args.designs:  # bad designs fail before the model loads
        parse_design(spec, 0.5)

    from offload.api import load_tokenizer
    from offload.checkpoint import open_checkpoint
    from offload.corpus import load_corpus, tokenize, windows
    from offload.loading import build_model

    t0 = time.perf_counter()
    ckpt = open_checkpoint(args.model)
    net = build_model(ckpt, progress=False)
    if getattr(net.config, "ffn_kind", None) != "swiglu":  # ReLU-family models keep exact sparsity instead
        raise SystemExit("this benchmark is for SwiGLU LLaMA-family models")
    table = byte_table(tensor_bytes(ckpt), ckpt.config)
    tok = load_tokenizer(ckpt)
    corpus = load_corpus(None)
    cal = windows(tokenize(tok, corpus.calibration), WINDOW, args.calibration_tokens)
    wins = windows(tokenize(tok, corpus.evaluation), WINDOW, args.tokens)
    name = os.path.basename(ckpt.source.rstrip("/"))

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    rows = measure(net, table, cal, wins, args.designs, args.densities, log=log)
    info = {"model": name, "tokens": int(wins.shape[0] * (WINDOW - 1)), "calibration_tokens": int(cal.numel()),
            "dense_ppl": rows[0]["ppl"], "dense_ffn_bytes": table.dense_ffn, "dense_model_bytes": table.dense_model,
            "cpu": cpu_name(), "threads": torch.get_num_threads(), "seconds": time.perf_counter() - t0,
            "date": time.strftime("%Y-%m-%d")}
    if args.output == "json":
        print(json.dumps({**info, "rows": rows}, indent=1))
        return 0
    print(format_md(rows, f"{name}: dense perplexity {info['dense_ppl']:.3f} over {info['tokens']} predicted "
                          f"tokens; dense FFN {table.dense_ffn / 2**20:.1f} MiB, model {table.dense_model / 2**20:.1f} "
                          f"MiB per token"))
    for limit in (1.02, 1.05):
        best = best_under(rows[1:], limit)
        if best:
            print(f"\nfewest FFN bytes at perplexity ≤ ×{limit}: {best['design']} at {best['density']:.2f} "
                  f"({best['ffn_bytes']:.3f} FFN, {best['model_bytes']:.3f} model, ×{best['ppl_ratio']:.4f})")
    print(f"\n{info['cpu']}, {info['threads']} torch threads, {info['seconds']:.0f} s, {info['date']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
