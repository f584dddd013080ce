"""EENet's per-exit scoring as one compiled C call (CPU), for a decision at batch 1.

The pure-torch kernel of :class:`~eenet.scores.eenet_stream.EENetStream` runs
about thirty tensor operations per exit; at batch 1 each costs a dispatch of
a microsecond or more, and that overhead is the decision's cost. This module
does the same arithmetic in one call of a small C function (softmax, the top
probabilities, entropy, the history at the answer, the folded scoring MLP and
the in-place update of the packed state), compiled on first use with the
system's C compiler into ``$XDG_CACHE_HOME/eenet`` (default ``~/.cache/eenet``)
and loaded with :mod:`ctypes`. Without a compiler, or with
``EENET_C_KERNEL=0`` set, :func:`load_kernel` returns ``None`` and the torch
kernel serves. Written by hand because no library fuses these steps at batch
1: ``torch.compile``, AOTInductor and ``torch.jit`` leave 30 us or more of
guard and dispatch overhead per call (measured on the bundled network).
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

__all__ = ["kernel_forced_off", "load_kernel", "pack_head", "torch_only"]

logger = logging.getLogger(__name__)

# cfg: the per-exit integer settings, in this order
CFG_FIELDS = ("n_classes", "width", "n_rows", "col_vmax", "col_pred", "col_q", "k", "feed",
              "top_m", "agreement", "n_raw", "hidden", "n_hidden", "has_out")

_SOURCE = r"""
#include <math.h>

enum {N_CLASSES, WIDTH, N_ROWS, COL_VMAX, COL_PRED, COL_Q, K, FEED, TOP_M, AGREEMENT,
      N_RAW, HIDDEN, N_HIDDEN, HAS_OUT};

/* Exit k's score logits out[batch] from logits [batch, n_classes] (row stride
   `stride`); the packed state [batch, width] is updated in place. Weights,
   flat: w_first [n_raw + k, hidden], b_first [hidden], then per hidden layer
   w [hidden, hidden] and b [hidden], then w_out [hidden], b_out [1]. */
void eenet_score_exit(const int *cfg, const float *weights, const float *logits,
                      long stride, float *packed, int batch, float *out)
{
    const int c = cfg[N_CLASSES], h1 = cfg[HIDDEN], k = cfg[K], feed = cfg[FEED];
    const int n_top = cfg[TOP_M] > 2 ? cfg[TOP_M] : 2;
    const int n_in = cfg[N_RAW] + k;
    float p[c], x[n_in], h[h1], h2[h1], top[n_top];
    for (int i = 0; i < batch; i++) {
        const float *l = logits + (long)i * stride;
        float *s = packed + (long)i * cfg[WIDTH];
        float m = l[0], z = 0.0f, ent = 0.0f;
        for (int j = 1; j < c; j++) if (l[j] > m) m = l[j];
        for (int j = 0; j < c; j++) { p[j] = expf(l[j] - m); z += p[j]; }
        int pred = 0;
        for (int j = 0; j < c; j++) {
            p[j] /= z;
            if (p[j] > 0.0f) ent -= p[j] * logf(p[j]);
            if (p[j] > p[pred]) pred = j;
        }
        /* the n_top largest probabilities, decreasing, zero-padded */
        for (int t = 0; t < n_top; t++) top[t] = 0.0f;
        for (int j = 0; j < c; j++) {
            float v = p[j];
            for (int t = 0; t < n_top; t++)
                if (v > top[t]) { float u = top[t]; top[t] = v; v = u; }
        }
        const int rows = cfg[N_ROWS];
        const float count = s[(rows - 1) * c + pred] + 1.0f;
        const float votes = s[cfg[COL_VMAX]] > count ? s[cfg[COL_VMAX]] : count;
        int f = 0;
        if (cfg[TOP_M] == 0) for (int j = 0; j < c; j++) x[f++] = p[j];
        else for (int j = 0; j < feed; j++) x[f++] = top[j];
        x[f++] = top[0]; x[f++] = top[1]; x[f++] = ent; x[f++] = votes;
        if (cfg[AGREEMENT]) {
            x[f++] = s[pred]; x[f++] = s[c + pred];
            x[f++] = s[cfg[COL_PRED]] == (float)(pred + 1) ? 1.0f : 0.0f;
        }
        for (int j = 0; j < k; j++) x[f++] = s[cfg[COL_Q] + j];
        /* the folded scoring head */
        const float *w = weights;
        for (int u = 0; u < h1; u++) h[u] = w[n_in * h1 + u];
        for (int r = 0; r < n_in; r++) {
            const float xr = x[r];
            for (int u = 0; u < h1; u++) h[u] += xr * w[r * h1 + u];
        }
        w += (n_in + 1) * h1;
        float score = h[0];
        if (cfg[HAS_OUT]) {
            for (int u = 0; u < h1; u++) if (h[u] < 0.0f) h[u] = 0.0f;
            for (int layer = 0; layer < cfg[N_HIDDEN]; layer++) {
                for (int u = 0; u < h1; u++) h2[u] = w[h1 * h1 + u];
                for (int r = 0; r < h1; r++)
                    for (int u = 0; u < h1; u++) h2[u] += h[r] * w[r * h1 + u];
                for (int u = 0; u < h1; u++) h[u] = h2[u] > 0.0f ? h2[u] : 0.0f;
                w += (h1 + 1) * h1;
            }
            score = w[h1];
            for (int u = 0; u < h1; u++) score += h[u] * w[u];
        }
        out[i] = score;
        /* the history after exit k */
        if (cfg[AGREEMENT])
            for (int j = 0; j < c; j++) { s[c + j] += p[j]; s[j] = p[j]; }
        s[(rows - 1) * c + pred] = count;
        s[cfg[COL_VMAX]] = votes;
        s[cfg[COL_PRED]] = (float)(pred + 1);
        s[cfg[COL_Q] + k] = 1.0f / (1.0f + expf(-score));
    }
}
"""

# -O3 vectorises the head's inner loops; no -march=native, since a cache folder may be
# shared by machines with different processors
_FLAGS = ("-O3", "-std=c99", "-shared", "-fPIC")
_kernel: ctypes._CFuncPtr | None = None  # type: ignore[name-defined]
_tried = False
_forced_off = False  # inside torch_only()


@contextlib.contextmanager
def torch_only() -> Iterator[None]:
    """Score with the torch kernel inside this block, e.g. for ``torch.utils.flop_counter``,
    which counts torch operators only (the C kernel does the same arithmetic)."""
    global _forced_off
    before, _forced_off = _forced_off, True
    try:
        yield
    finally:
        _forced_off = before


def kernel_forced_off() -> bool:
    """Inside :func:`torch_only`."""
    return _forced_off


def pack_head(w_first: np.ndarray, b_first: np.ndarray,
              hidden: tuple[tuple[np.ndarray, np.ndarray], ...],
              w_out: np.ndarray | None, b_out: np.ndarray | None) -> np.ndarray:
    """One folded head's weights as the flat float32 array the C function reads."""
    parts = [w_first.ravel(), b_first.ravel()]
    for w, b in hidden:
        parts += [w.ravel(), b.ravel()]
    if w_out is not None:
        parts += [w_out.ravel(), np.asarray(b_out).ravel()]
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


def load_kernel():
    """The compiled ``eenet_score_exit`` (a :mod:`ctypes` function), or ``None``.

    Compiled once per source version into the user's cache folder; a failed
    build is logged and not retried in this process.
    """
    global _kernel, _tried
    if _forced_off:
        return None
    if _tried:
        return _kernel
    _tried = True
    if os.environ.get("EENET_C_KERNEL", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.SubprocessError, RuntimeError) as err:
        logger.info("EENet's C kernel is unavailable (%s); scoring with torch", err)
        return None
    fn = lib.eenet_score_exit
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long,
                   ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    _kernel = fn
    return fn


def _build() -> Path:
    """Compile the C source into the cache folder (atomically), or return the built library."""
    digest = hashlib.sha256(" ".join([_SOURCE, *_FLAGS, sys.platform]).encode()
                            ).hexdigest()[:16]
    folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "eenet"
    lib = folder / f"eenet_kernel_{digest}{sysconfig.get_config_var('SHLIB_SUFFIX') or '.so'}"
    if lib.exists():
        return lib
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler found (set CC)")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        src, built = Path(tmp) / "eenet_kernel.c", Path(tmp) / lib.name
        src.write_text(_SOURCE)
        subprocess.run([compiler, *_FLAGS, str(src), "-o", str(built), "-lm"],
                       check=True, capture_output=True, timeout=120)
        os.replace(built, lib)
    return lib
