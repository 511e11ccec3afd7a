"""Fit estimates against the measured memory of the bundled model (real llama.cpp loads)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hearth.models.bundled import ensure_bundled
from hearth.models.fit import Shape, estimate
from hearth.models.gguf_meta import read_gguf
from hearth.models.serving import InsufficientMemory, ensure_fits

pytestmark = pytest.mark.model

# Loads the model the way hearth's worker does (native.py: one stream per slot, kv_unified off),
# decodes a full 512-token batch, then reports the process's resident memory.
MEASURE = r"""
import json, sys
import llama_cpp as L
path, n_seq, n_ctx_seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
quiet = L.llama_log_callback(lambda level, text, data: None)
L.llama_log_set(quiet, None)
L.llama_backend_init()
model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
cp = L.llama_context_default_params()
cp.n_ctx = n_ctx_seq * n_seq; cp.n_batch = 512; cp.n_ubatch = 512; cp.n_seq_max = n_seq
cp.n_threads = 2; cp.n_threads_batch = 2; cp.kv_unified = False
ctx = L.llama_init_from_model(model, cp)
batch = L.llama_batch_init(512, 0, 1)
for i in range(512):
    batch.token[i] = 1000 + i; batch.pos[i] = i; batch.n_seq_id[i] = 1; batch.seq_id[i][0] = 0
    batch.logits[i] = i == 511
batch.n_tokens = 512
assert L.llama_decode(ctx, batch) == 0
rss = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))
print(json.dumps({"rss": rss}))
"""


@pytest.fixture(scope="module")
def bundled(models_cache: Path) -> Path:
    return ensure_bundled(models_cache)


def measured_rss(path: Path, n_seq: int, ctx: int) -> int:
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path), str(n_seq), str(ctx)],
                         capture_output=True, text=True, timeout=300, check=True)
    return int(json.loads(out.stdout.strip().splitlines()[-1])["rss"])


@pytest.mark.parametrize(("n_seq", "ctx"), [(1, 2048), (4, 8192)])
def test_estimate_within_15_percent_of_measured(bundled: Path, n_seq: int, ctx: int) -> None:
    shape = Shape.from_gguf(read_gguf(bundled), bundled.stat().st_size)
    predicted = estimate(shape, ctx, n_seq).total
    actual = measured_rss(bundled, n_seq, ctx)
    print(f"gemma3-270m {n_seq}x{ctx}: estimated {predicted / 1e6:.0f} MB, measured {actual / 1e6:.0f} MB "
          f"({(predicted - actual) / actual:+.1%})")
    assert abs(predicted - actual) / actual < 0.15


def test_load_that_cannot_fit_is_refused_with_numbers_and_options(bundled: Path) -> None:
    ensure_fits("gemma3-270m:latest", bundled, 4096, 8)  # the default configuration fits
    with pytest.raises(InsufficientMemory) as err:
        ensure_fits("gemma3-270m:latest", bundled, 32768, 256)
    msg = err.value.message
    assert err.value.status == 507
    assert "KV cache for 256 x 32768 tokens" in msg and "GB available" in msg
    assert "--ctx" in msg and "--parallel" in msg
