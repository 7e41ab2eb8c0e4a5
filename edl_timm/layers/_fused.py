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

Used for CPU tensors in NCHW or channels_last (NHWC) layout with a float32 weight: float32
activations, or bfloat16 ones under ``torch.autocast("cpu", dtype=torch.bfloat16)``, where the
convolutions run in bfloat16 as autocast runs nn.Conv2d's and the C passes read and write
bfloat16 with float32 arithmetic and float32/double sums (``_fused_cpu_kernels.h``); non-negative
codes, without BPDA, and outside TorchScript, fx tracing and torch.compile. Everything else
(float16 autocast, float64, GPU) runs the eager solver, which is the reference the tests compare
this path against.
"""
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Optional, Protocol, Tuple, runtime_checkable

import torch
from torch.autograd.function import once_differentiable
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

_SOURCE = Path(__file__).with_name("_fused_cpu.c")
_SOURCES = [_SOURCE, _SOURCE.with_name("_fused_cpu_kernels.h")]  # the .c includes the .h
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
_lock = threading.Lock()
_lib = None
_load_failed: Optional[str] = None
_enabled = True

_p = ctypes.c_void_p
_i64 = ctypes.c_int64
_f = ctypes.c_float
_int = ctypes.c_int
# The activation kernels exist once per activation type, as name_f32 and name_bf16 (see
# _fused_cpu_kernels.h); the argument lists are the same for both.
_ACT_SIGNATURES = {
    "edl_first": (None, [_p, _i64, _i64, _f, _f, _int, _p, _p]),
    "edl_residual": (None, [_p, _p, _p, _i64, _i64, _f, _f, _int]),
    "edl_code": (None, [_p, _p, _p, _i64, _i64, _f, _f, _p]),
    "edl_out_grad": (None, [_p, _p, _p, _i64, _i64, _f, _p, _p, _p]),
    "edl_reweight_grad": (ctypes.c_double, [_p, _p, _i64, _f, _f]),
    "edl_mask_sub": (None, [_p, _p, _p, _i64, _f]),
    "edl_first_grad": (ctypes.c_double, [_p, _p, _p, _p, _p, _i64, _i64, _f, _f, _int]),
    "edl_dict_grad": (ctypes.c_double, [_p, _p, _i64, _i64, _f, _int, _p, _i64, _p, _i64, _p]),
}
_SUFFIX = {torch.float32: "_f32", torch.bfloat16: "_bf16"}
_SIGNATURES = {
    "edl_dict": (None, [_p, _i64, _i64, _int, _p, _p, _p]),
    **{name + suffix: sig for name, sig in _ACT_SIGNATURES.items() for suffix in _SUFFIX.values()},
}


@runtime_checkable
class FusedLayer(Protocol):
    """What the fused path asks of an EDL layer: ``EDLConv2d`` and ``EDLLinear`` implement it, and
    ``solve`` and ``usable`` take it. A new layer type (say a 1-D convolution) provides these and
    gets the fused path; the eager solver needs only ``_analyze``, ``_synthesize``, ``_check_input``
    and ``_power_shape``. ``tests/test_fused.py`` checks that both layers provide every member here
    and that this module touches no member of a layer that is not here.

    The fused node and the eager ``_Reweight`` node also share one convention on their autograd
    context: ``ctx.edges[i]`` is the position of input i among the node's tensor inputs, which
    ``wanted(ctx, i)`` uses to ask the engine whether input i's gradient is needed."""

    weight: torch.Tensor  # the dictionary: the convolution's or linear layer's weight, float32
    bias: Optional[torch.Tensor]
    step_size: torch.Tensor  # 1 / ||D||^2 (power iteration), a buffer
    lam: float  # the l1 weight of the elastic loss
    eps: float  # the Huber floor of the reweighting
    nonneg: bool  # codes clipped at zero (the fused path needs True)
    bpda: bool  # a straight-through backward (the fused path needs False)
    normalize_atoms: bool
    normalize_input: bool
    _analysis_takes_free_bias: bool  # whether _analyze can subtract the threshold as its bias

    def _scalars(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(the analysis scale m, the reweighting's lerp weight), 0-d tensors."""

    def _analyze(self, r: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """D^T r (a convolution, or a matrix product), plus ``bias``."""

    def _synthesize(self, z: torch.Tensor, weight: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """D z, shaped like the input ``like``."""

    def _analyze_backward(self, gv: torch.Tensor, p: torch.Tensor, weight: torch.Tensor, need_input: bool,
                          need_weight: bool) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The gradients of ``_analyze(p, weight)`` in p and weight, given the output's ``gv``."""

    def _synthesize_backward(self, gq: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, like: torch.Tensor,
                             need_weight: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The gradients of ``_synthesize(z, weight, like)`` in z and weight, given the output's ``gq``."""

    def _block_size(self, x: torch.Tensor) -> int:
        """Values per sample (convolution) or per row (linear) that the input RMS is taken over."""

    def _bias_view(self, bias: torch.Tensor) -> torch.Tensor:
        """The bias shaped to broadcast over the output."""

    def _bias_block(self, bias: torch.Tensor, out: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
        """The bias laid out as one output sample in memory format ``fmt``, for the C passes."""

    def _bias_grad(self, g: torch.Tensor) -> torch.Tensor:
        """The bias's gradient from the output's gradient ``g``."""


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
    source = b"\0".join(p.read_bytes() for p in _SOURCES)
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


def available() -> bool:
    """Whether the fused kernels run here (built and loaded; not turned off with EDL_TIMM_FUSED=0).
    Public as ``edl_timm.layers.fused_available``."""
    return library() is not None


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


# ------------------------------------------------------------------------------ instrumentation
_spent: Optional[Dict[str, float]] = None  # the mapping timed_parts() fills, while it runs


@contextmanager
def timed_parts(spent: Dict[str, float]):
    """Add the wall time of the EDL layers' own work to ``spent`` (seconds by part, for example a
    ``collections.Counter``) while this block runs: each C kernel call under its name without
    the activation-type suffix (``edl_code``, ``edl_dict``, ...), and each step-size refresh (a
    power iteration after a weight change) as ``refresh``. What a training step spends beyond
    these parts is its convolutions and PyTorch's bookkeeping (benchmarks/layer_breakdown.py).
    The timing is on the calling thread: not for use across threads. Public as
    ``edl_timm.layers.timed_parts``."""
    global _spent
    before, _spent = _spent, spent
    try:
        yield spent
    finally:
        _spent = before


def record(part: str, seconds: float) -> None:
    """Count ``seconds`` towards ``part`` inside ``timed_parts`` (a no-op outside it)."""
    if _spent is not None:
        _spent[part] = _spent.get(part, 0.0) + seconds


def _kernel(name: str, part: str):
    """The library's function ``name``; inside ``timed_parts`` a wrapper that times it as ``part``."""
    fn = getattr(_lib, name)
    if _spent is None:
        return fn

    def timed(*args):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            record(part, time.perf_counter() - t0)

    return timed


class _Kernels:
    """The activation kernels of one activation type, by their names without the type suffix
    (``kernels(torch.bfloat16).edl_code`` is the C function ``edl_code_bf16``)."""

    def __init__(self, suffix: str):
        self._suffix = suffix

    def __getattr__(self, name):
        return _kernel(name + self._suffix, name)


def kernels(dtype: torch.dtype) -> Optional[_Kernels]:
    """The C kernels for activations of ``dtype`` (float32 or bfloat16), or None where the library
    cannot be built."""
    return _Kernels(_SUFFIX[dtype]) if library() is not None else None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The activations' type in the fused node: bfloat16 under CPU autocast to bfloat16 (the
    convolutions run in it, as autocast runs nn.Conv2d), else the input's own."""
    if torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16:
        return torch.bfloat16
    return x.dtype


def usable(layer: FusedLayer, x: torch.Tensor) -> bool:
    """Whether ``layer``'s forward on ``x`` can take the fused path."""
    if not _enabled or is_fx_symbolic_tracing():  # first: under fx, x is a Proxy
        return False
    w = layer.weight
    autocast = torch.is_autocast_enabled("cpu")
    return (
        x.device.type == "cpu"
        and w.device.type == "cpu"
        and w.dtype == torch.float32
        and (x.dtype == torch.float32 or (autocast and x.dtype == torch.bfloat16))
        and (not autocast or torch.get_autocast_dtype("cpu") == torch.bfloat16)
        and layer.nonneg
        and not layer.bpda
        and x.numel() > 0
        and _layout(x) is not None
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


def wanted(ctx, i: int) -> bool:
    """Whether this backward pass needs the gradient of input i. ``needs_input_grad`` only says
    whether the input requires grad; an attack's ``torch.autograd.grad(loss, x)`` wants x alone,
    and skipping the weight gradients there saves a third of the backward convolutions (PyTorch's
    own convolution nodes skip them the same way). Same engine query as torch.utils.checkpoint.
    ``ctx.edges`` maps input i to its edge (the tensor inputs, in order); the eager solver's
    reweighting node asks it too."""
    if not ctx.needs_input_grad[i]:
        return False
    if torch.compiler.is_compiling():
        # a traced backward has no engine to ask (and no next_functions); the compiled graph drops
        # a gradient nobody uses by itself
        return True
    node = ctx.next_functions[ctx.edges[i]][0]  # next_functions has one edge per tensor input
    if node is None:
        return False
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError):  # an older torch, or no graph task: assume it is needed
        return True


def _ptrs(tensors):
    return (ctypes.c_void_p * max(1, len(tensors)))(*[t.data_ptr() for t in tensors])


def solve(layer: FusedLayer, x: torch.Tensor, num_iters: int) -> torch.Tensor:
    """``layer``'s output for ``x`` (code, input normalisation and bias) through the fused node.
    Under CPU autocast to bfloat16 the input is cast first (as autocast casts a convolution's) and
    the output is bfloat16."""
    m, lerp_w = layer._scalars()
    dtype = compute_dtype(x)
    if dtype == torch.float32 or layer.bias is None:
        return _FusedSolve.apply(x.to(dtype), layer.weight, m, lerp_w, layer.bias, layer, num_iters)
    # In bfloat16 the bias is added outside the node: its backward finds the code's zeros from the
    # stored output, and out - bias in bfloat16 would lose every code below half an ulp of the bias
    code = _FusedSolve.apply(x.to(dtype), layer.weight, m, lerp_w, None, layer, num_iters)
    return code + layer._bias_view(layer.bias).to(dtype)


class _FusedSolve(torch.autograd.Function):
    """s * code(x / s) + bias by T RISTA steps (see ``_EDLMixin.solve`` for the recursion),
    differentiable in x, the raw weight, the analysis scale m and the lerp weight lw (both 0-d, from
    ``_scalars``) and the bias.

    Activations (x, the analysis inputs p_t, the codes z_t, the output and their gradients) are
    float32 or bfloat16, x's type; the convolutions run in that type with the dictionary cast to
    it. The weight, the scales, the bias and all their gradients stay float32.

    The threshold and the bias are applied by the code-update loop, not by the convolution or
    matrix product: a bias there costs a full copy into the output (addmm) on CPU.

    Saves x, the scales, the dictionaries, each step's analysis input p_t, the codes z_t and the
    output; the residuals r_t are recovered from p_t. The eager path also keeps r_t.
    """

    @staticmethod
    def forward(ctx, x, weight, m, lerp_w, bias, layer, steps):
        k = kernels(x.dtype)
        normalize = layer.normalize_input
        eps = float(layer.eps)
        has_rw = lerp_w is not None
        lw = float(lerp_w) if has_rw else 1.0
        mf = float(m)
        # the dictionary and the weight gradients share the weight's layout: edl_dict and
        # edl_dict_grad read them as rows, and a row (one atom) is contiguous in NCHW and NHWC alike
        wfmt = _layout(weight) or torch.contiguous_format
        weight = weight.contiguous(memory_format=wfmt)
        atoms, atom_size = weight.shape[0], weight.numel() // weight.shape[0]
        dictionary = torch.empty_like(weight)
        dict_conv = dictionary if x.dtype == torch.float32 else torch.empty_like(weight, dtype=x.dtype)
        inv_norms = torch.empty(atoms, dtype=torch.float32)
        _kernel("edl_dict", "edl_dict")(weight.data_ptr(), atoms, atom_size, int(layer.normalize_atoms), dictionary.data_ptr(),
                      None if dict_conv is dictionary else dict_conv.data_ptr(), inv_norms.data_ptr())
        thr = layer.lam * float(layer.step_size)

        in_block = layer._block_size(x)  # values per sample (conv) or per row (linear)
        blocks = x.numel() // in_block
        scale = torch.empty(blocks, dtype=torch.float32) if normalize else None
        if has_rw or normalize:
            p = torch.empty_like(x)
            k.edl_first(x.data_ptr(), blocks, in_block, lw, eps, int(has_rw), _ptr(scale), p.data_ptr())
        else:
            p = x
        ps, zs = [p], []
        fmt = _layout(x)
        # bfloat16 convolutions subtract the threshold themselves (thr / m per atom, in oneDNN's
        # float32 accumulator, free in its epilogue): v rounded to bfloat16 first and thresholded
        # after would decide the code's zeros to within 2^-9 of m v instead of 2^-9 of m v - thr,
        # and flip twice as many of them as autocast's own convolution does. Linear layers keep the
        # threshold in the C pass: a bias in addmm costs a copy of the output.
        an_bias = None
        if x.dtype != torch.float32 and layer._analysis_takes_free_bias:
            an_bias = torch.full((atoms,), -thr / mf, dtype=x.dtype)
            thr = 0.0
        v = layer._analyze(p, dict_conv, an_bias).contiguous(memory_format=fmt)
        out_block = v.numel() // blocks
        bias_block = None if bias is None else layer._bias_block(bias.detach(), v, fmt).float().contiguous()
        z = None
        for _ in range(1, steps):
            k.edl_code(v.data_ptr(), _ptr(z), None, blocks, out_block, mf, thr, None)
            z = v
            q = layer._synthesize(z, dict_conv, x).contiguous(memory_format=fmt)
            k.edl_residual(q.data_ptr(), x.data_ptr(), _ptr(scale), blocks, in_block, lw, eps, int(has_rw))
            zs.append(z)
            ps.append(q)
            v = layer._analyze(q, dict_conv, an_bias).contiguous(memory_format=fmt)
        k.edl_code(v.data_ptr(), _ptr(z), _ptr(scale), blocks, out_block, mf, thr, _ptr(bias_block))

        ctx.layer, ctx.steps, ctx.blocks, ctx.in_block, ctx.out_block = layer, steps, blocks, in_block, out_block
        ctx.atoms, ctx.atom_size, ctx.lw, ctx.eps, ctx.m, ctx.has_rw = atoms, atom_size, lw, eps, mf, has_rw
        ctx.fmt, ctx.wfmt = fmt, wfmt
        tensor_inputs = [isinstance(a, torch.Tensor) for a in (x, weight, m, lerp_w, bias)]
        ctx.edges = {i: sum(tensor_inputs[:i]) for i, is_tensor in enumerate(tensor_inputs) if is_tensor}
        # saved by name: ctx.slots maps each name to its place in saved_tensors (None: not saved)
        named = dict(x=x, out=v, dictionary=dictionary, dict_conv=None if dict_conv is dictionary else dict_conv,
                     inv_norms=inv_norms, scale=scale, bias_block=bias_block)
        saved = [t for t in named.values() if t is not None]
        ctx.slots, i = {}, 0
        for name, t in named.items():
            ctx.slots[name] = None if t is None else i
            i += t is not None
        ctx.save_for_backward(*saved, *ps, *zs)
        return v

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        layer, steps, blocks, lw, eps, has_rw = ctx.layer, ctx.steps, ctx.blocks, ctx.lw, ctx.eps, ctx.has_rw
        saved = ctx.saved_tensors
        get = {name: None if i is None else saved[i] for name, i in ctx.slots.items()}
        x, out, dictionary, scale, bias_block = get["x"], get["out"], get["dictionary"], get["scale"], get["bias_block"]
        dict_conv = dictionary if get["dict_conv"] is None else get["dict_conv"]
        n_named = sum(i is not None for i in ctx.slots.values())
        ps, zs = saved[n_named:n_named + steps], saved[n_named + steps:]
        k = kernels(x.dtype)
        need_x = wanted(ctx, 0)
        need_lerp = has_rw and wanted(ctx, 3)
        need_dict = wanted(ctx, 1) or wanted(ctx, 2)  # the weight, or m (through beta)

        fmt, wfmt = ctx.fmt, ctx.wfmt
        g = grad.to(x.dtype).contiguous(memory_format=fmt)
        gv = torch.empty_like(out)
        g_scale = torch.empty(blocks, dtype=torch.float32) if scale is not None else None
        # gv carries the factor m from here on: it is the gradient of the analysis output A(p_t)
        k.edl_out_grad(g.data_ptr(), out.data_ptr(), _ptr(scale), blocks, ctx.out_block, ctx.m, _ptr(bias_block),
                       gv.data_ptr(), _ptr(g_scale))
        g_bias = layer._bias_grad(g) if bias_block is not None and wanted(ctx, 4) else None
        g_an, g_syn = [], []  # the dictionary's gradients from each analysis and each synthesis
        g_u = gx = None
        g_lw = 0.0
        for t in range(steps - 1, -1, -1):
            need_p = t > 0 or need_x or need_lerp
            gp, g_dict = layer._analyze_backward(gv, ps[t], dict_conv, need_p, need_dict)
            if need_dict:
                g_an.append(g_dict.contiguous(memory_format=wfmt))
            if t > 0:
                z = zs[t - 1]
                gp = gp.contiguous(memory_format=fmt)
                if has_rw:  # gp becomes the residual's gradient
                    g_lw += k.edl_reweight_grad(gp.data_ptr(), ps[t].data_ptr(), gp.numel(), lw, eps)
                gz, g_dict = layer._synthesize_backward(gp, z, dict_conv, x, need_dict)
                if need_dict:
                    g_syn.append(g_dict.contiguous(memory_format=wfmt))
                g_u = gp if g_u is None else g_u.add_(gp)  # r_t = u - A*(z_t): u's gradient sums them all
                gz = gz.contiguous(memory_format=fmt)
                k.edl_mask_sub(gz.data_ptr(), gv.data_ptr(), z.data_ptr(), gz.numel(), ctx.m)
                gv = gz
            elif need_p:
                gp = gp.contiguous(memory_format=fmt)
                if has_rw or scale is not None or g_u is not None:
                    g_lw += k.edl_first_grad(gp.data_ptr(), x.data_ptr(), _ptr(scale), _ptr(g_u), _ptr(g_scale), blocks,
                                             ctx.in_block, lw, eps, int(has_rw))
                gx = gp if need_x else None
        g_weight = g_m = None
        if need_dict:
            g_weight = torch.empty_like(dictionary)
            dm = k.edl_dict_grad(
                dictionary.data_ptr(), get["inv_norms"].data_ptr(), ctx.atoms, ctx.atom_size, ctx.m,
                int(layer.normalize_atoms), _ptrs(g_an), len(g_an), _ptrs(g_syn), len(g_syn), g_weight.data_ptr(),
            )
            g_m = torch.tensor(dm, dtype=torch.float32) if ctx.needs_input_grad[2] else None
            g_weight = g_weight if ctx.needs_input_grad[1] else None
        g_lerp = torch.tensor(g_lw, dtype=torch.float32) if need_lerp else None
        return gx, g_weight, g_m, g_lerp, g_bias, None, None
