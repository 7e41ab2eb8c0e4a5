"""Fused CPU path of the EDL solver: the same arithmetic as ``_EDLMixin.solve`` with the input
normalisation, in one autograd node whose elementwise stages are C loops (``_fused_cpu.c``).

Why our own kernels: on CPU, eager PyTorch gives every elementwise op of the solver a full memory
pass, forward and backward, and at T = 2 those passes cost 20-40% on top of the three convolutions
(benchmarks/layer_speed.py). torch.compile does not help: inductor leaves the convolutions to
oneDNN and cannot fuse across them, and the hand-written backward below needs no graph capture.
The convolutions and matrix products stay PyTorch's (``aten.convolution_backward`` for their
gradients).

The C source is compiled once per machine with the system C compiler (``$CC``, default ``gcc``)
into ``$EDL_TIMM_CACHE`` (default ``~/.cache/edl_timm``) and loaded with ctypes; it links no torch
headers, so the build takes about a second. Where no compiler is found the layers run the eager
path, after one warning. ``EDL_TIMM_FUSED=0`` turns the fused path off.

Used for float32 CPU tensors in NCHW or channels_last (NHWC) layout, non-negative codes, without
BPDA, and outside TorchScript, fx tracing, torch.compile and autocast; everything else runs the
eager solver, which is the reference the tests compare this path against.
"""
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
from torch.autograd.function import once_differentiable
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

_SOURCE = Path(__file__).with_name("_fused_cpu.c")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_lock = threading.Lock()
_lib = None
_load_failed: Optional[str] = None
_enabled = True

_p = ctypes.c_void_p
_i64 = ctypes.c_int64
_f = ctypes.c_float
_SIGNATURES = {
    "edl_first": (None, [_p, _i64, _i64, _f, _f, ctypes.c_int, _p, _p]),
    "edl_residual": (None, [_p, _p, _p, _i64, _i64, _f, _f, ctypes.c_int]),
    "edl_code": (None, [_p, _p, _p, _i64, _i64, _f, _f, _p]),
    "edl_out_grad": (None, [_p, _p, _p, _i64, _i64, _f, _p, _p, _p]),
    "edl_reweight_grad": (ctypes.c_double, [_p, _p, _i64, _f, _f]),
    "edl_mask_sub": (None, [_p, _p, _p, _i64, _f]),
    "edl_first_grad": (ctypes.c_double, [_p, _p, _p, _p, _p, _i64, _i64, _f, _f, ctypes.c_int]),
    "edl_dict": (None, [_p, _i64, _i64, ctypes.c_int, _p, _p]),
    "edl_dict_grad": (ctypes.c_double, [_p, _p, _i64, _i64, _f, ctypes.c_int, _p, _i64, _p, _i64, _p]),
}


def _cpu_signature() -> str:
    """What -march=native depends on: a cached build is reused only on the same kind of CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("EDL_TIMM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "edl_timm")
    return Path(root)


def _build(compiler: str) -> Path:
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(_FLAGS).encode(), compiler.encode(), _cpu_signature().encode()]))
    target = _cache_dir() / f"edl_fused_cpu-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent processes (torchrun, pytest-xdist) each
    # produce a complete file, and a reader never sees a half-written one.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def library():
    """The loaded kernel library, or None (after one warning) where it cannot be built."""
    global _lib, _load_failed
    if _lib is not None or _load_failed is not None:
        return _lib
    with _lock:
        if _lib is not None or _load_failed is not None:
            return _lib
        if os.environ.get("EDL_TIMM_FUSED", "1") == "0":
            _load_failed = "EDL_TIMM_FUSED=0"
            return None
        compiler = os.environ.get("CC", "gcc")
        try:
            if shutil.which(compiler) is None:
                raise RuntimeError(f"no C compiler {compiler!r} on PATH (set CC, or install gcc)")
            # torch is imported first, so libgomp.so.1 resolves to the OpenMP runtime torch
            # already loaded: one thread pool, sized by torch.set_num_threads.
            path = _build(compiler)
            try:
                lib = ctypes.CDLL(str(path))
            except OSError:  # a damaged cache entry (a disk filled mid-copy, say): build it again
                path.unlink(missing_ok=True)
                lib = ctypes.CDLL(str(_build(compiler)))
            for name, (restype, argtypes) in _SIGNATURES.items():
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = restype, argtypes
        except Exception as err:  # any failure means: run the eager solver, which is always correct
            _load_failed = str(err)
            warnings.warn(
                f"edl_timm: fused CPU kernels unavailable ({err}); EDL layers run the slower eager "
                "PyTorch path on CPU. To use them, set CC to a C compiler and EDL_TIMM_CACHE to a "
                "writable folder; EDL_TIMM_FUSED=0 silences this.",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        _lib = lib
        return _lib


@contextmanager
def eager():
    """Run EDL layers on the eager solver inside this block: the reference the tests compare the
    fused path against, and the path for second-order gradients (``create_graph=True``), which
    the fused node does not provide. Public as ``edl_timm.eager_solver``."""
    global _enabled
    before, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = before


def usable(layer, x: torch.Tensor) -> bool:
    """Whether ``layer``'s forward on ``x`` can take the fused path."""
    if not _enabled or is_fx_symbolic_tracing():  # first: under fx, x is a Proxy
        return False
    w = layer.weight
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and w.dtype == torch.float32
        and layer.nonneg
        and not layer.bpda
        and x.numel() > 0
        and _layout(x) is not None
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and library() is not None
    )


def _layout(x: torch.Tensor) -> Optional[torch.memory_format]:
    """The memory format the kernels can run ``x`` in, or None. The kernels see a sample as a flat
    block, so NCHW and NHWC (channels_last) serve alike: only the bias's layout over a block differs.
    NHWC also spares oneDNN the reorders to and from its blocked layout that it runs around every
    NCHW convolution."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None


def _ptr(t: Optional[torch.Tensor]):
    return None if t is None else t.data_ptr()


def _wanted(ctx, i: int) -> bool:
    """Whether this backward pass needs the gradient of input i. ``needs_input_grad`` only says
    whether the input requires grad; an attack's ``torch.autograd.grad(loss, x)`` wants x alone,
    and skipping the weight gradients there saves a third of the backward convolutions (PyTorch's
    own convolution nodes skip them the same way). Same engine query as torch.utils.checkpoint."""
    if not ctx.needs_input_grad[i]:
        return False
    node = ctx.next_functions[ctx.edges[i]][0]  # next_functions has one edge per tensor input
    if node is None:
        return False
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError):  # an older torch, or no graph task: assume it is needed
        return True


def _ptrs(tensors):
    return (ctypes.c_void_p * max(1, len(tensors)))(*[t.data_ptr() for t in tensors])


def solve(layer, x: torch.Tensor, num_iters: int) -> torch.Tensor:
    """``layer``'s output for ``x`` (code, input normalisation and bias) through the fused node."""
    m, lerp_w = layer._scalars()
    return _FusedSolve.apply(x, layer.weight, m, lerp_w, layer.bias, layer, num_iters)


class _FusedSolve(torch.autograd.Function):
    """s * code(x / s) + bias by T RISTA steps (see ``_EDLMixin.solve`` for the recursion),
    differentiable in x, the raw weight, the analysis scale m and the lerp weight lw (both 0-d, from
    ``_scalars``) and the bias.

    The threshold and the bias are applied by the code-update loop, not by the convolution or
    matrix product: a bias there costs a full copy into the output (addmm) on CPU.

    Saves x, the scales, the dictionaries, each step's analysis input p_t, the codes z_t and the
    output; the residuals r_t are recovered from p_t. The eager path also keeps r_t.
    """

    @staticmethod
    def forward(ctx, x, weight, m, lerp_w, bias, layer, steps):
        lib = library()
        normalize = layer.normalize_input
        eps = float(layer.eps)
        has_rw = lerp_w is not None
        w = float(lerp_w) if has_rw else 1.0
        mf = float(m)
        # D and the weight gradients share the weight's layout: edl_dict and edl_dict_grad read
        # them as O rows, and a row (one atom) is contiguous in NCHW and NHWC alike
        wfmt = _layout(weight) or torch.contiguous_format
        weight = weight.contiguous(memory_format=wfmt)
        O, K = weight.shape[0], weight.numel() // weight.shape[0]
        D = torch.empty_like(weight)
        inv = torch.empty(O, dtype=torch.float32)
        lib.edl_dict(weight.data_ptr(), O, K, int(layer.normalize_atoms), D.data_ptr(), inv.data_ptr())
        thr = layer.lam * float(layer.step_size)

        G = layer._block_size(x)
        N = x.numel() // G
        s = torch.empty(N, dtype=torch.float32) if normalize else None
        if has_rw or normalize:
            p = torch.empty_like(x)
            lib.edl_first(x.data_ptr(), N, G, w, eps, int(has_rw), _ptr(s), p.data_ptr())
        else:
            p = x
        ps, zs = [p], []
        fmt = _layout(x)
        v = layer._analyze(p, D, None).contiguous(memory_format=fmt)
        Gc = v.numel() // N
        bias_block = None if bias is None else layer._bias_block(bias.detach(), v, fmt).contiguous()
        z = None
        for _ in range(1, steps):
            lib.edl_code(v.data_ptr(), _ptr(z), None, N, Gc, mf, thr, None)
            z = v
            q = layer._synthesize(z, D, x).contiguous(memory_format=fmt)
            lib.edl_residual(q.data_ptr(), x.data_ptr(), _ptr(s), N, G, w, eps, int(has_rw))
            zs.append(z)
            ps.append(q)
            v = layer._analyze(q, D, None).contiguous(memory_format=fmt)
        lib.edl_code(v.data_ptr(), _ptr(z), _ptr(s), N, Gc, mf, thr, _ptr(bias_block))
        ctx.layer, ctx.steps, ctx.N, ctx.G, ctx.Gc, ctx.O, ctx.K = layer, steps, N, G, Gc, O, K
        ctx.w, ctx.eps, ctx.m, ctx.has_rw, ctx.has_s = w, eps, mf, has_rw, normalize
        ctx.has_bias, ctx.fmt, ctx.wfmt = bias is not None, fmt, wfmt
        tensor_inputs = [isinstance(a, torch.Tensor) for a in (x, weight, m, lerp_w, bias)]
        ctx.edges = {i: sum(tensor_inputs[:i]) for i, is_tensor in enumerate(tensor_inputs) if is_tensor}
        ctx.save_for_backward(x, v, D, inv, *([s] if normalize else []), *([bias_block] if ctx.has_bias else []), *ps, *zs)
        return v

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        lib = library()
        layer, steps, N, G, Gc, w, eps, has_rw = ctx.layer, ctx.steps, ctx.N, ctx.G, ctx.Gc, ctx.w, ctx.eps, ctx.has_rw
        saved = list(ctx.saved_tensors)
        x, out, D, inv = saved[:4]
        rest = saved[4:]
        s = rest.pop(0) if ctx.has_s else None
        bias_block = rest.pop(0) if ctx.has_bias else None
        ps, zs = rest[:steps], rest[steps:]
        need_x = _wanted(ctx, 0)
        need_lerp = has_rw and _wanted(ctx, 3)
        need_dict = _wanted(ctx, 1) or _wanted(ctx, 2)  # the weight, or m (through beta)

        fmt, wfmt = ctx.fmt, ctx.wfmt
        g = grad.contiguous(memory_format=fmt)
        gv = torch.empty_like(out)
        gs = torch.empty(N, dtype=torch.float32) if s is not None else None
        # gv carries the factor m from here on: it is the gradient of the analysis output A(p_t)
        lib.edl_out_grad(g.data_ptr(), out.data_ptr(), _ptr(s), N, Gc, ctx.m, _ptr(bias_block), gv.data_ptr(), _ptr(gs))
        g_bias = layer._bias_grad(g) if ctx.has_bias and _wanted(ctx, 4) else None
        g_an, g_syn = [], []
        gu = gx = None
        g_w = 0.0
        for t in range(steps - 1, -1, -1):
            need_p = t > 0 or need_x or need_lerp
            gp, gwa = layer._analyze_backward(gv, ps[t], D, need_p, need_dict)
            if need_dict:
                g_an.append(gwa.contiguous(memory_format=wfmt))
            if t > 0:
                z = zs[t - 1]
                gp = gp.contiguous(memory_format=fmt)
                if has_rw:  # gp becomes the residual's gradient
                    g_w += lib.edl_reweight_grad(gp.data_ptr(), ps[t].data_ptr(), gp.numel(), w, eps)
                gz, gws = layer._synthesize_backward(gp, z, D, x, need_dict)
                if need_dict:
                    g_syn.append(gws.contiguous(memory_format=wfmt))
                gu = gp if gu is None else gu.add_(gp)  # r_t = u - A*(z_t): u's gradient sums them all
                gz = gz.contiguous(memory_format=fmt)
                lib.edl_mask_sub(gz.data_ptr(), gv.data_ptr(), z.data_ptr(), gz.numel(), ctx.m)
                gv = gz
            elif need_p:
                gp = gp.contiguous(memory_format=fmt)
                if has_rw or s is not None or gu is not None:
                    g_w += lib.edl_first_grad(
                        gp.data_ptr(), x.data_ptr(), _ptr(s), _ptr(gu), _ptr(gs), N, G, w, eps, int(has_rw)
                    )
                gx = gp if need_x else None
        g_weight = g_m = None
        if need_dict:
            g_weight = torch.empty_like(D)
            dm = lib.edl_dict_grad(
                D.data_ptr(), inv.data_ptr(), ctx.O, ctx.K, ctx.m,
                int(layer.normalize_atoms), _ptrs(g_an), len(g_an), _ptrs(g_syn), len(g_syn), g_weight.data_ptr(),
            )
            g_m = torch.tensor(dm, dtype=torch.float32) if ctx.needs_input_grad[2] else None
            g_weight = g_weight if ctx.needs_input_grad[1] else None
        g_lerp = torch.tensor(g_w, dtype=torch.float32) if need_lerp else None
        return gx, g_weight, g_m, g_lerp, g_bias, None, None
