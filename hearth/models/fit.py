"""Will it fit? Memory for a model at a context length and number of parallel slots.

need = weights + KV cache + compute buffers + runtime overhead.

- weights: the GGUF's tensor bytes (the file size; llama.cpp maps the file).
- KV cache: cells x layers x kv_heads x (key_len + value_len) x bytes per
  element of the KV type. cells = ctx x parallel (llama.cpp gives each slot its
  own stream). Sliding-window layers (Gemma 2/3, Cohere2, gpt-oss) need only
  `window x parallel + ubatch` cells when the SWA cache is not full-size;
  llama.cpp's library default (which hearth's in-box engine uses) is a
  full-size SWA cache, llama-server's is not: `swa_full` picks.
  Encoder-only embedding models (BERT family) have no KV cache.
- compute: on a CPU only the touched part of llama.cpp's reserved graph
  buffer becomes resident (activations for one micro-batch plus the logits
  of each slot); on a GPU the whole reservation (including
  ubatch x vocab logits) is allocated, so that figure is used for VRAM.
- overhead: the worker process (Python, libllama) and the tokenizer tables.

Calibrated against RSS measured on Gemma 3 270M (tests/test_fit.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from hearth.models.gguf_meta import GGUFInfo
from hearth.models.hardware import Hardware

MB = 1_000_000
PROCESS_BYTES = 60 * MB
TOKEN_TABLE_BYTES = 170  # per vocabulary entry, llama.cpp's tokenizer structures
KV_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32,
            "q4_1": 20 / 32, "q4_0": 18 / 32}
SWA_PATTERN = {"gemma2": 2, "gemma3": 6, "cohere2": 4, "gpt-oss": 2, "gemma3n": 5}
ENCODERS = {"bert", "nomic-bert", "jina-bert-v2", "nomic-bert-moe", "t5encoder", "modern-bert"}
# bits per weight of common quantizations, biggest first (for "a smaller quant" advice)
QUANT_BPW = {"F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.56, "Q5_K_M": 5.69,
             "Q5_K_S": 5.54, "Q4_K_M": 4.85, "Q4_K_S": 4.58, "Q4_0": 4.55, "IQ4_XS": 4.25,
             "Q3_K_M": 3.91, "Q3_K_S": 3.5, "Q2_K": 3.35}
ADVICE_QUANTS = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"]


@dataclass(slots=True)
class Shape:
    """The numbers of a model that decide its memory (from a GGUF header or the catalog)."""

    architecture: str
    weights_bytes: int
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_k: int
    head_v: int
    n_vocab: int
    n_ff: int = 0
    n_ctx_train: int = 0
    swa_window: int = 0
    quantization: str = ""

    @classmethod
    def from_gguf(cls, info: GGUFInfo, file_size: int) -> Shape:
        n_embd = int(info.arch("embedding_length", 0) or 0)
        n_head = _scalar(info.arch("attention.head_count", 1)) or 1
        head_k = int(info.arch("attention.key_length", 0) or 0) or n_embd // n_head
        head_v = int(info.arch("attention.value_length", 0) or 0) or head_k
        return cls(
            architecture=info.architecture, weights_bytes=file_size,
            n_layer=int(info.arch("block_count", 0) or 0), n_embd=n_embd, n_head=n_head,
            n_head_kv=_scalar(info.arch("attention.head_count_kv", n_head)) or n_head,
            head_k=head_k, head_v=head_v,
            n_vocab=info.array_lengths.get("tokenizer.ggml.tokens", 0) or int(info.arch("vocab_size", 0) or 0),
            n_ff=_scalar(info.arch("feed_forward_length", 0)), n_ctx_train=info.context_length,
            swa_window=int(info.arch("attention.sliding_window", 0) or 0), quantization=info.quantization,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Shape:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def _scalar(value: Any) -> int:
    """Per-layer arrays (some GGUFs) -> their largest value."""
    if isinstance(value, list):
        return int(max(value)) if value else 0
    return int(value or 0)


@dataclass(slots=True)
class Estimate:
    """Bytes a model needs at one configuration."""

    ctx: int
    parallel: int
    kv_type: str
    weights: int
    kv_cache: int
    compute: int
    compute_gpu: int
    overhead: int
    kv_per_cell: float = 0.0

    @property
    def total(self) -> int:
        """What the process holds in RAM when everything runs on the CPU."""
        return self.weights + self.kv_cache + self.compute + self.overhead

    @property
    def total_gpu(self) -> int:
        """What a GPU must hold to run it fully offloaded."""
        return self.weights + self.kv_cache + self.compute_gpu


def kv_cells(shape: Shape, ctx: int, parallel: int, ubatch: int, swa_full: bool) -> tuple[int, int, int]:
    """(full-attention layers, sliding-window layers, cells per SWA layer)."""
    cells = ctx * parallel
    pattern = SWA_PATTERN.get(shape.architecture, 0)
    if not shape.swa_window or not pattern:
        return shape.n_layer, 0, cells
    n_full = shape.n_layer // pattern
    swa_cells = cells if swa_full else min(cells, _pad(shape.swa_window * parallel + ubatch))
    return n_full, shape.n_layer - n_full, swa_cells


def _pad(n: int, to: int = 256) -> int:
    return (n + to - 1) // to * to


def estimate(shape: Shape, ctx: int, parallel: int = 1, *, kv_type: str = "f16", ubatch: int = 512,
             swa_full: bool = True) -> Estimate:
    """Memory for `parallel` slots of `ctx` tokens each."""
    if shape.n_ctx_train:
        ctx = min(ctx, shape.n_ctx_train)
    per_token_layer = shape.n_head_kv * (shape.head_k + shape.head_v) * KV_BYTES.get(kv_type.lower(), 2.0)
    if shape.architecture in ENCODERS:
        kv, per_cell = 0, 0.0
    else:
        n_full, n_swa, swa_cells = kv_cells(shape, ctx, parallel, ubatch, swa_full)
        kv = int(per_token_layer * (n_full * ctx * parallel + n_swa * swa_cells))
        per_cell = per_token_layer * (n_full + (n_swa if swa_full or swa_cells == ctx * parallel else 0))
    act = ubatch * 4 * (6 * shape.n_embd + 2 * shape.n_ff + 2 * shape.n_head * shape.head_k)
    logits = shape.n_vocab * 4 * parallel
    return Estimate(
        ctx=ctx, parallel=parallel, kv_type=kv_type, weights=shape.weights_bytes, kv_cache=kv,
        compute=act + logits, compute_gpu=act + ubatch * shape.n_vocab * 4,
        overhead=PROCESS_BYTES + shape.n_vocab * TOKEN_TABLE_BYTES, kv_per_cell=per_cell,
    )


@dataclass(slots=True)
class Verdict:
    """Does it fit, where, and what to change if not."""

    fits: bool
    where: str  # gpu | split | cpu | none
    need: int
    available: int
    estimate: Estimate
    advice: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["estimate"]["total"] = self.estimate.total
        d["estimate"]["total_gpu"] = self.estimate.total_gpu
        return d

    def summary(self) -> str:
        return (f"needs {gb(self.need)} ({gb(self.estimate.weights)} weights + {gb(self.estimate.kv_cache)} "
                f"KV cache for {self.estimate.parallel} x {self.estimate.ctx} tokens + "
                f"{gb(self.estimate.compute + self.estimate.overhead)} buffers), {gb(self.available)} available")


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def _budget(hw: Hardware) -> tuple[int, int]:
    """(GPU bytes usable, RAM bytes usable)."""
    unified = [g for g in hw.gpus if g.unified]
    ram = hw.ram_available
    if unified:
        return 0, min(ram, sum(g.memory_free for g in unified)) or ram
    return int(hw.vram_free * 0.95), ram


def place(est: Estimate, hw: Hardware) -> tuple[str, int, int]:
    """(where, bytes needed on the limiting device, bytes available there)."""
    vram, ram = _budget(hw)
    if vram and est.total_gpu <= vram:
        return "gpu", est.total_gpu, vram
    if vram:
        offloaded = min(vram - est.compute_gpu + est.compute, est.weights + est.kv_cache)
        need_ram = est.total - max(offloaded, 0)
        if need_ram <= ram:
            return "split", need_ram, ram
    return ("cpu" if est.total <= ram else "none"), est.total, ram


def check(shape: Shape, hw: Hardware, ctx: int, parallel: int = 1, *, kv_type: str = "f16",
          ubatch: int = 512, swa_full: bool = True) -> Verdict:
    """Where the model runs at this configuration, or what to change so that it does."""
    est = estimate(shape, ctx, parallel, kv_type=kv_type, ubatch=ubatch, swa_full=swa_full)
    where, need, have = place(est, hw)
    verdict = Verdict(fits=where != "none", where=where, need=need, available=have, estimate=est)
    if not verdict.fits:
        verdict.advice = advise(shape, hw, est, kv_type=kv_type, ubatch=ubatch, swa_full=swa_full)
    return verdict


def advise(shape: Shape, hw: Hardware, est: Estimate, **kw: Any) -> list[str]:
    """Options that would fit: a shorter context, fewer slots, a smaller quantization."""
    _, ram = _budget(hw)
    have = max(ram, _budget(hw)[0])
    out: list[str] = []
    fixed = est.total - est.kv_cache
    if est.kv_per_cell > 0 and have > fixed:
        cells = int((have - fixed) / est.kv_per_cell)
        ctx_max = cells // est.parallel // 256 * 256
        if 256 <= ctx_max < est.ctx:
            out.append(f"a shorter context: --ctx {ctx_max} with {est.parallel} slot(s)")
        slots_max = cells // est.ctx
        if est.parallel > 1 and 1 <= slots_max < est.parallel:
            out.append(f"fewer parallel slots: --parallel {slots_max} at {est.ctx} tokens")
    bpw = QUANT_BPW.get(shape.quantization.upper())
    for quant in ADVICE_QUANTS:
        if bpw and QUANT_BPW[quant] < bpw:
            smaller = Shape.from_dict({**asdict(shape), "quantization": quant,
                                       "weights_bytes": int(shape.weights_bytes * QUANT_BPW[quant] / bpw)})
            if place(estimate(smaller, est.ctx, est.parallel, **kw), hw)[0] != "none":
                out.append(f"a smaller quantization: {quant} (about {gb(smaller.weights_bytes)} of weights)")
                break
    if not out:
        out.append("a smaller model (`hearth models pick ROLE` chooses one for this machine) or more memory")
    return out
