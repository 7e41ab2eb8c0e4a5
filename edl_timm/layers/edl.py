"""Elastic Dictionary Learning (EDL) layers: `EDLConv2d` and `EDLLinear`.

Hou, Gao, Krim, Liu, "Boosting Adversarial Robustness and Generalization with Structural Prior",
arXiv:2502.00834 (2025); the unrolled sparse-coding layer follows SDNet (Sun et al., NeurIPS 2022).

An EDL layer keeps a convolution's (or linear layer's) weight ``W`` but reads it as a dictionary:
synthesis ``A*(z)`` is the transposed convolution (``z @ W`` for linear) and analysis ``A(r)`` its
adjoint, the convolution itself (``r @ W.T``). The output is the code ``z`` that approximately
minimises the elastic objective

    F(z) = beta/2 ||x - A*z||_2^2 + (1-beta)/2 ||x - A*z||_1 + lam ||z||_1

computed by T unrolled reweighted-ISTA (RISTA) steps from z_0 = 0::

    r_t     = x - A*(z_t)
    a_t*r_t = beta * r_t + (1-beta)/2 * r_t / max(|r_t|, eps)
    z_{t+1} = S_{lam*tau}(z_t + tau * A(a_t*r_t))          S: soft-threshold (relu(v - lam*tau) if nonneg)

Choices where the method note is silent (each with its reason; see docs/method.md):

* ``num_iters`` T = 2: SDNet's choice; one residual-feedback step on top of the first analysis,
  at 3 convolution-sized operations (the floor 2T-1).
* ``lam`` = 0.1: SDNet's value; with unit-norm atoms it is a threshold relative to the input scale.
* ``nonneg`` = True: SDNet's non-negative codes; the code then replaces conv + ReLU-like sparsity.
* atoms normalised to unit l2 norm before every forward (``normalize_atoms=True``): lam and eps keep
  their meaning whatever the weight's scale, so weight decay and initialisation cannot silently
  change the sparsity. The raw ``weight`` parameter is untouched (same shape and state-dict key).
* beta = sigmoid(``beta_logit``): always strictly inside (0, 1) while learned, smooth, and a
  parameter in every mode so the state dict does not change when the mode switches
  (vanilla first, elastic later, as in the paper).
* the input is coded at unit scale (``normalize_input=True``): the layer codes x / s and returns
  s * code, with s the input's RMS per sample (per vector for linear layers). The layer is then
  positively homogeneous like a convolution (EDL(c x) = c EDL(x), c > 0), and eps and lam are
  relative to the feature scale instead of absolute numbers whose meaning changes from layer to
  layer. ``normalize_input=False`` runs the method note's recursion on x itself.
* eps = 0.1: ``r / max(|r|, eps)`` is clamp(r / eps, -1, 1), so the reweighted residual is the
  derivative of a Huber loss: l2 for residuals under eps, l1 (bounded influence) above. With the
  authors' 1e-3 the clamp is a near-step of slope (1-beta)/(2 eps) = 250: the network becomes an
  almost discontinuous function of its input (fp32 and fp64 logits of an elastic WRN differ by 10%
  of their scale), gradients are spikes or zeros, and training fails (benchmarks/learnability.py).
  At 0.1 of the input's RMS only the residuals that stand out (outliers, such as a perturbation
  concentrated on a few features) get the l1 treatment, and the network trains as its plain twin.
* step size tau = 0.9 / L with L = ||A||^2 from power iteration on A A* in the input space (SDNet's
  0.9: power iteration approaches L from below, so the margin keeps tau below 1/L). It is a buffer:
  recomputed to convergence at construction and from ``from_conv``/``from_linear``, refined by one
  warm-started power iteration per training forward (at the spatial size of the input), and never
  touched in eval mode. It is treated as a constant by autograd.

Speed: tau, the balance constant of the reweighting and the threshold are folded into the analysis
weight and bias. On CPU in float32, and under CPU autocast to bfloat16, ``forward`` runs the solver
through ``_fused.py``: one autograd node whose elementwise stages are C loops (one memory pass per
stage, forward and backward). Everywhere else (GPU, float64, float16 autocast, BPDA, signed codes,
TorchScript, fx, torch.compile) it runs ``solve`` below, the eager reference, whose reweighting has
a hand-written backward.
"""
import contextlib
import contextvars
import math
import time
import weakref
from typing import List, Optional, Tuple

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import _fused

__all__ = ["EDLConv2d", "EDLLinear", "EDL_MODES", "fit_step_sizes", "is_edl_layer"]

EDL_MODES = ("elastic", "vanilla", "robust")

DEFAULT_NUM_ITERS = 2
DEFAULT_LAM = 0.1
DEFAULT_BETA_INIT = 0.5
DEFAULT_EPS = 0.1
DEFAULT_NONNEG = True
DEFAULT_NORMALIZE_INPUT = True
STEP_FACTOR = 0.9
POWER_ITERS_INIT = 50  # iterations when the step size is computed from scratch at a new input size
POWER_ITERS_CONSTRUCT = 20  # at construction: a rough value (random weights; training refines it)
# Set while from_conv / from_linear build a layer whose random weights they are about to replace:
# the construction's power iteration would be wasted work, and its vector, a warm start for the
# copied weights, would make their step size depend on the global RNG that drew the random ones.
_COPYING_WEIGHTS = contextvars.ContextVar("edl_copying_weights", default=False)


@contextlib.contextmanager
def _copying_weights():
    token = _COPYING_WEIGHTS.set(True)
    try:
        yield
    finally:
        _COPYING_WEIGHTS.reset(token)


def _check_edl_args(mode: str, num_iters: int, lam: float, beta_init: float, eps: float) -> None:
    if mode not in EDL_MODES:
        raise ValueError(f"unknown EDL mode {mode!r}; valid modes are {', '.join(EDL_MODES)}")
    if not isinstance(num_iters, int) or num_iters < 1:
        raise ValueError(f"num_iters must be an integer >= 1, got {num_iters!r}")
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0, got {lam!r}")
    if not 0.0 < beta_init < 1.0:
        raise ValueError(f"beta_init must lie strictly between 0 and 1, got {beta_init!r}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")


class _Reweight(torch.autograd.Function):
    """p = lerp(clamp(r, -eps, eps), r, w): the reweighted residual, up to a folded constant.

    Written by hand because autograd would keep the clamp's output and spend about ten elementwise
    passes in LerpBackward with a tensor weight. This saves only r; its backward is
    dr = lerp(hardtanh_backward(g), g, w) and dw = <g, r> - <g, clamp(r)> (= <g, r - clamp(r)>).
    (clamp, not F.hardtanh/softshrink: same values, but 5x faster on CPU.)
    """

    @staticmethod
    def forward(ctx, r, w, eps: float):
        ctx.save_for_backward(r, w)
        ctx.eps = eps
        ctx.edges = {0: 0, 1: 1}  # for _fused.wanted: both tensor inputs have an edge
        return torch.clamp(r, -eps, eps).lerp_(r, w.to(r.dtype))  # one allocation

    @staticmethod
    def backward(ctx, grad):
        r, w = ctx.saved_tensors
        eps = ctx.eps
        grad_r = grad_w = None
        if torch.is_grad_enabled():  # create_graph=True: the same formulas, differentiable
            wr = w.to(r.dtype)
            inside = (r > -eps) & (r < eps)
            if ctx.needs_input_grad[1]:
                grad_w = (grad * (r - torch.clamp(r, -eps, eps))).sum().to(w.dtype)
            if ctx.needs_input_grad[0]:
                grad_r = torch.where(inside, grad, grad * wr)
            return grad_r, grad_w, None
        buf = torch.clamp(r, -eps, eps)
        # an attack's autograd.grad(loss, x) wants no beta: skip its two reductions there
        if _fused.wanted(ctx, 1):
            if r.dtype in (torch.float32, torch.float64):
                grad_w = (_dot(grad, r) - _dot(grad, buf)).to(w.dtype)
            else:  # autocast's half types: one float32 sum of g (r - clamp(r)); the two dots
                # rounded to 8 bits would cancel to noise where most residuals are inside the clamp
                grad_w = (grad.float() * (r.float() - buf.float())).sum().to(w.dtype)
        if ctx.needs_input_grad[0]:
            # grad where |r| < eps, else 0 (written into buf), then lerp towards grad
            grad_r = torch.ops.aten.hardtanh_backward.grad_input(grad, r, -eps, eps, grad_input=buf)
            grad_r.lerp_(grad, w.to(grad.dtype))
        return grad_r, grad_w, None


# Every EDL layer alive in the process (weakly held), for the optimizer step post-hook below.
_LIVE_LAYERS: "weakref.WeakSet" = weakref.WeakSet()


def _refresh_after_optimizer_step(optimizer, args, kwargs) -> None:
    """Global optimizer step post-hook: refresh the step size of every EDL layer whose weight the
    optimizer holds and just changed. The training forward refreshes it too (a no-op then), but a
    compiled forward cannot; and after the last step of a run the evaluation sees the final weights'
    step size. torch's own hook registry is used so that any training loop, ours or a user's, keeps
    the step size in step with the weights."""
    if not _LIVE_LAYERS:
        return
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for layer in list(_LIVE_LAYERS):
        if id(layer.weight) in held and layer.weight._version != layer._weight_version:
            layer._refresh_step_size()


@torch.no_grad()
def fit_step_sizes(model: nn.Module, example: torch.Tensor) -> None:
    """Set every EDL layer's step size for the input size it sees when ``model`` runs ``example``
    (one forward in eval mode, so no running statistics change), as the first training forward
    does in eager mode. A compiled forward cannot (it only records the size, for the refresh after
    the next optimizer step): call this before compiling a model for training."""
    shapes = {}
    layers = [m for m in model.modules() if is_edl_layer(m)]
    handles = [m.register_forward_pre_hook(lambda m, args: shapes.__setitem__(m, m._power_shape(args[0]))) for m in layers]
    was_training = model.training
    try:
        model.eval()(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for layer, shape in shapes.items():
        layer._refresh_step_size(shape)


register_optimizer_step_post_hook(_refresh_after_optimizer_step)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sum of a*b (float32 or float64), in one read-only pass when both have the same dense layout."""
    if a.dtype == b.dtype and a.stride() == b.stride() and a.is_contiguous():
        return torch.dot(a.view(-1), b.view(-1)).float()
    return (a.float() * b.float()).sum()


def _reweight(r: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    if torch.jit.is_scripting():
        return torch.lerp(torch.clamp(r, -eps, eps), r, w.to(r.dtype))
    return _Reweight.apply(r, w, eps)


def _check_conv_input(x: torch.Tensor, in_channels: int) -> None:
    if x.dim() != 4:
        raise ValueError(f"EDLConv2d expects a 4-D input (N, C, H, W), got a {x.dim()}-D tensor of shape {x.shape}")
    if x.shape[1] != in_channels:
        raise ValueError(f"EDLConv2d expected {in_channels} input channels, got {x.shape[1]}")


def _check_linear_input(x: torch.Tensor, in_features: int) -> None:
    if x.dim() < 1:
        raise ValueError("EDLLinear expects an input of shape (*, in_features), got a 0-D tensor")
    if x.shape[-1] != in_features:
        raise ValueError(
            f"EDLLinear expected {in_features} input features in the last dimension, got {x.shape[-1]} "
            f"(input shape {x.shape})"
        )


def _output_padding(
    in_hw: List[int], code_hw: List[int], stride: Tuple[int, int], padding: Tuple[int, int],
    dilation: Tuple[int, int], kernel_size: Tuple[int, int],
) -> List[int]:
    """output_padding that makes conv_transpose2d return ``in_hw`` from a code of size ``code_hw``."""
    pads: List[int] = []
    for i in range(2):
        base = (code_hw[i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (kernel_size[i] - 1) + 1
        op = in_hw[i] - base
        if op < 0 or op >= max(stride[i], dilation[i]):
            raise ValueError(f"a code of spatial size {code_hw} does not come from an input of size {in_hw}")
        pads.append(op)
    return pads


def _conv_synthesize(
    z: torch.Tensor, weight: torch.Tensor, like: torch.Tensor, stride: Tuple[int, int], padding: Tuple[int, int],
    dilation: Tuple[int, int], kernel_size: Tuple[int, int], groups: int,
) -> torch.Tensor:
    """A*(z) = conv_transpose2d sized like ``like``'s spatial dimensions."""
    out_pad = _output_padding(
        [like.shape[-2], like.shape[-1]], [z.shape[-2], z.shape[-1]], stride, padding, dilation, kernel_size
    )
    return F.conv_transpose2d(z, weight, None, stride, padding, out_pad, groups, dilation)


def _floored_rms(norm: torch.Tensor, n: int) -> torch.Tensor:
    """RMS from an l2 norm over n entries, with a floor of 1e-5 added in quadrature so that an
    all-zero input stays finite (a literal: TorchScript reads no module globals)."""
    rms = norm * (1.0 / math.sqrt(n))
    return torch.sqrt(rms * rms + 1e-10)


def _whole_layer(layer: nn.Module, x: torch.Tensor, num_iters: Optional[int]) -> torch.Tensor:
    """The layer's forward, called as one step of an fx graph (see ``_EDLMixin.forward``)."""
    return layer(x, num_iters)


# An fx-traced model must compute what the module computes, bit for bit: a graph traced into the
# solver would run the eager solver where the module runs the fused one. So torch.fx records
# each EDL layer as one call of _whole_layer, which runs the layer itself; timm's feature
# extraction (its own tracer) keeps the layers whole as leaf modules, as it does its own
# non-traceable layers. The wraps below keep the solver traceable for other tracers.
torch.fx.wrap("_whole_layer")
# Shape checks and shape-dependent padding read tensor sizes, and the hand-written backward must
# survive tracing: torch.fx records these as calls instead of tracing into them.
torch.fx.wrap("_reweight")
torch.fx.wrap("_check_conv_input")
torch.fx.wrap("_check_linear_input")
torch.fx.wrap("_conv_synthesize")


class _EDLMixin:
    """The RISTA solver, shared by the conv and linear layers.

    Subclasses provide ``_analyze(r, weight, bias)``, ``_synthesize(z, weight, like)``,
    ``_check_input(x)`` and ``_power_shape(x)`` for the eager solver, and the rest of
    ``_fused.FusedLayer`` (the backwards of the first two, the bias helpers, ``_block_size``) for
    the fused CPU path.
    """

    # set by _init_edl
    mode: str
    num_iters: int
    bpda: bool
    lam: float
    eps: float
    nonneg: bool
    normalize_atoms: bool
    normalize_input: bool

    def _init_edl(self, mode, num_iters, lam, beta_init, eps, nonneg, normalize_atoms, normalize_input):
        _check_edl_args(mode, num_iters, lam, beta_init, eps)
        self.normalize_input = bool(normalize_input)
        self.mode = mode
        self.num_iters = int(num_iters)
        # straight-through (BPDA) backward for the soft-threshold and the reweighting; the masking
        # audit turns it on to attack with gradients that no thresholding can zero
        self.bpda = False
        self.lam = float(lam)
        self.eps = float(eps)
        self.nonneg = bool(nonneg)
        self.normalize_atoms = bool(normalize_atoms)
        w = self.weight
        self.beta_logit = nn.Parameter(
            torch.full((), math.log(beta_init / (1.0 - beta_init)), device=w.device, dtype=w.dtype),
            requires_grad=mode == "elastic",
        )
        self.register_buffer("step_size", torch.ones((), device=w.device, dtype=torch.float32))
        # Power-iteration vector: derived state, kept out of the state dict (its shape follows the
        # input size seen in training).
        self.register_buffer("_power_u", torch.empty(0, device=w.device), persistent=False)
        self._weight_version = -1
        self._compiled_shape: Optional[List[int]] = None  # the input size a compiled forward saw
        if not _COPYING_WEIGHTS.get():
            self.update_step_size(num_iters=POWER_ITERS_CONSTRUCT)
        _LIVE_LAYERS.add(self)

    def __getstate__(self):
        # A copy's weight is a new tensor whose version counter starts again: record whether the
        # step size is up to date with the weight, rather than the counter's value
        state = dict(self.__dict__)
        state["_weight_version"] = self._weight_version == self.weight._version
        return state

    def __setstate__(self, state):
        # copy.deepcopy and unpickling build a layer without __init__: register it for the refresh
        # after optimizer steps, and carry over whether its step size fits its weight
        up_to_date = state.get("_weight_version") is True
        super().__setstate__(state)
        self.__dict__.setdefault("_compiled_shape", None)
        self._weight_version = self.weight._version if up_to_date else -1
        _LIVE_LAYERS.add(self)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "step_size"):  # nn.Conv2d/Linear.__init__ call this before _init_edl
            self.update_step_size(num_iters=POWER_ITERS_CONSTRUCT)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        """Also accepts a plain nn.Conv2d / nn.Linear state dict: beta then keeps its initial value
        and the step size is computed from the loaded weight (a stored one is used as it is)."""
        has_step = prefix + "step_size" in state_dict
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        for key in ("beta_logit", "step_size"):
            if prefix + key in missing_keys:
                missing_keys.remove(prefix + key)
        if not has_step and prefix + "weight" in state_dict:
            # from scratch at the same input size: a function of the loaded weight alone
            shape = self._power_shape(None)
            self._power_u = self._power_u.new_empty(0)
            self.update_step_size(num_iters=POWER_ITERS_INIT, input_shape=shape)

    # ----------------------------------------------------------------------------------- config
    @property
    def beta(self) -> torch.Tensor:
        """The balance beta in [0, 1] used by forward (1: vanilla DL, 0: robust DL)."""
        if self.mode == "vanilla":
            return torch.ones_like(self.beta_logit)
        if self.mode == "robust":
            return torch.zeros_like(self.beta_logit)
        return torch.sigmoid(self.beta_logit)

    def set_mode(self, mode: str) -> None:
        """Switch between elastic / vanilla / robust in place (the state dict is unchanged)."""
        _check_edl_args(mode, self.num_iters, self.lam, 0.5, self.eps)
        self.mode = mode
        self.beta_logit.requires_grad_(mode == "elastic")

    def _inv_atom_norms(self, w: Optional[torch.Tensor] = None) -> torch.Tensor:
        """1 / ||atom|| per output channel of ``w`` (default: the weight; ones without atom
        normalisation), shape (C_out,)."""
        w = self.weight if w is None else w
        if not self.normalize_atoms:
            return torch.ones(w.shape[0], dtype=w.dtype, device=w.device)
        return w.flatten(1).norm(p=2, dim=1).clamp_min(1e-12).reciprocal()

    def dictionary(self) -> torch.Tensor:
        """The dictionary used by forward: ``weight`` with each atom scaled to unit l2 norm."""
        w = self.weight
        if not self.normalize_atoms:
            return w
        return w * self._inv_atom_norms().view([-1] + [1] * (w.dim() - 1))

    # ----------------------------------------------------------------------------- operators
    def analyze(self, r: torch.Tensor) -> torch.Tensor:
        """A(r): input space -> code space (the convolution / ``r @ W.T``)."""
        return self._analyze(r, self.dictionary(), None)

    # -------------------------------------------------------------------------------- step size
    @torch.no_grad()
    def update_step_size(self, num_iters: Optional[int] = None, input_shape: Optional[List[int]] = None) -> None:
        """Re-estimate L = ||A||^2 by power iteration and set ``step_size = 0.9 / L``.

        ``input_shape`` (one sample, without the batch dimension) fixes the operator's input size
        for convolutions; by default the size of the last training input, or an 8x8 reference.
        """
        if self.weight.device.type == "meta":  # no values to iterate on (a model built for its shapes)
            return
        shape = list(input_shape) if input_shape is not None else self._power_shape(None)
        w = self.weight.detach()
        w = w.to(torch.promote_types(w.dtype, torch.float32))  # at least fp32, fp64 for fp64 layers
        # A*A with unit atoms is W* diag(1/|W_o|^2) W: scaling the one-sample code is free, where
        # building the dictionary is a weight-sized pass (0.3 ms of a 2 ms refresh at 512x512x3x3)
        inv_sq = self._bias_view(self._inv_atom_norms(w).square())
        u = self._power_u
        fresh = u.numel() == 0 or list(u.shape[1:]) != shape
        if fresh:
            # Deterministic start: the step size is a function of the weights, not of a global RNG.
            g = torch.Generator(device="cpu").manual_seed(0)
            u = torch.randn([1] + shape, generator=g, dtype=torch.float64)
            num_iters = num_iters or POWER_ITERS_INIT
        u = u.to(device=w.device, dtype=w.dtype)
        if u.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous():
            # the weight's layout, whatever u's: a resumed run (u loaded from a checkpoint, which
            # keeps no strides) must convolve exactly as the uninterrupted one did
            u = u.contiguous(memory_format=torch.channels_last)
        else:
            u = u.contiguous()
        with torch.autocast(device_type=w.device.type, enabled=False):
            for _ in range(num_iters or 1):
                u = u / u.norm().clamp_min(1e-12)
                u = self._synthesize(self._analyze(u, w, None).mul_(inv_sq), w, u)
            lip = u.norm()  # ||A*A u|| for the last unit u: the Rayleigh estimate of L
        self._power_u = u / u.norm().clamp_min(1e-12)
        self.step_size.copy_(STEP_FACTOR / lip.clamp_min(1e-12))  # no .item(): no sync, no graph break

    def _refresh_step_size(self, shape: Optional[List[int]] = None) -> None:
        """One warm-started power iteration per change of the weight (an optimizer step, a load), at
        the input size ``shape`` (one sample; None: the size a compiled forward last recorded, else
        the last one used).

        Keyed on the weight's version counter, so that gradient accumulation and the recomputed
        forward of activation checkpointing see the same step size as the first forward. Called by
        the eager training forward, by ``fit_step_sizes`` and, after every optimizer step, by
        ``_refresh_after_optimizer_step``.
        """
        if shape is None:
            shape = self._compiled_shape or self._power_shape(None)
        self._compiled_shape = None
        if self.weight._version == self._weight_version and list(self._power_u.shape[1:]) == list(shape):
            return
        t0 = time.perf_counter()
        self.update_step_size(input_shape=shape)
        self._weight_version = self.weight._version
        _fused.record("refresh", time.perf_counter() - t0)

    # ----------------------------------------------------------------------------------- solver
    def forward(self, x: torch.Tensor, num_iters: Optional[int] = None) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if is_fx_symbolic_tracing():
                return _whole_layer(self, x, num_iters)  # recorded as one call; runs this forward
        self._check_input(x)
        steps = self.num_iters if num_iters is None else num_iters
        if steps < 1:
            raise ValueError(f"num_iters must be >= 1, got {steps}")
        if not torch.jit.is_scripting():  # a scripted layer keeps the step size as it is
            if self.training:
                if torch.compiler.is_compiling():
                    # No refresh inside a compiled graph: its check reads the weight's version
                    # counter and Python state that changes every optimizer step (a graph break
                    # and a recompile per step and per layer). The optimizer step post-hook
                    # refreshes the step size instead, at the input size recorded here (a plain
                    # attribute write: dynamo replays it after the graph, and guards on nothing).
                    self._compiled_shape = self._power_shape(x)
                else:
                    self._refresh_step_size(self._power_shape(x))
            if _fused.usable(self, x):  # same arithmetic, fused elementwise passes (CPU, float32 or bf16 autocast)
                return _fused.solve(self, x, steps)
        if self.normalize_input:
            scale = self._input_scale(x)
            z = self.solve(x / scale, steps) * scale
        else:
            z = self.solve(x, steps)
        if self.bias is not None:
            z = z + self._bias_view(self.bias)
        if not torch.jit.is_scripting():
            if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
                # autocast keeps the input scale (a norm) in float32, which makes the code float32;
                # give the layers after it the autocast type, as a convolution's output has
                z = z.to(torch.get_autocast_dtype(x.device.type))
        return z

    def solve(self, x: torch.Tensor, num_iters: int) -> torch.Tensor:
        """The T-step RISTA code of ``x`` (no bias), differentiable in x, the weight and beta."""
        w_neg, w_an, lerp_w = self._operators(num_iters > 1)
        tau = self.step_size.to(w_an.dtype)
        thr = self.lam * tau
        # the threshold rides on the convolution's bias when codes are non-negative
        an_bias = (-thr).expand(w_an.shape[0]) if self.nonneg else None
        z = torch.zeros(0)
        for t in range(num_iters):
            # In-place ops below act on fresh outputs of convolutions, whose backward does not need
            # them; they save an allocation (page faults dominate elementwise cost on CPU).
            r = x if t == 0 else self._synthesize(z, w_neg, x).add_(x)  # x - A*(z)
            if lerp_w is not None:
                if self.bpda:  # straight-through: forward value of a*r, backward of the identity
                    r = r + (_reweight(r.detach(), lerp_w, self.eps) - r).detach()
                else:
                    r = _reweight(r, lerp_w, self.eps)
            v = self._analyze(r, w_an, an_bias)
            if t > 0:
                v = v.add_(z)
            if self.bpda:  # straight-through soft-threshold (used only by the masking audit)
                z = v + ((F.relu(v) if self.nonneg else v - torch.clamp(v, -thr, thr)) - v).detach()
            elif self.nonneg:
                z = F.relu_(v)
            else:
                z = v - torch.clamp(v, -thr, thr)
        return z

    @torch.no_grad()
    def residuals(self, x: torch.Tensor, num_iters: Optional[int] = None) -> List[torch.Tensor]:
        """Diagnostics: the residual ``r_t = x - A*(z_t)`` that RISTA step t reweights, for t = 0 .. T-1,
        in the units ``eps`` is measured in (the input divided by its RMS when ``normalize_input``).
        Where ``|r_t| > eps`` the elastic fidelity acts as l1 (bounded influence), below it as l2.
        Eager arithmetic in the weight's dtype, without gradients; no state changes."""
        self._check_input(x)
        steps = self.num_iters if num_iters is None else num_iters
        x = x.to(self.weight.dtype)
        if self.normalize_input:
            x = x / self._input_scale(x)
        w_neg = self._operators(True)[0]
        # z_t by the solver itself, t steps at a time (T is at most a few: the repeated work is cheap)
        return [x.clone()] + [self._synthesize(self.solve(x, t), w_neg, x).add_(x) for t in range(1, steps)]

    def _operators(self, with_synthesis: bool = True) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(negated synthesis dictionary, analysis weight with tau and the reweighting scale folded
        in, lerp weight of the reweighting or None when beta = 1); see ``_scalars``."""
        weight = self.weight
        inv_norm = self._inv_atom_norms()
        shape = [-1] + [1] * (weight.dim() - 1)
        scale, lerp_w = self._scalars()
        # one step (T = 1) never synthesises: skip that weight-sized product and its backward
        w_neg = weight * (-inv_norm).view(shape) if with_synthesis else weight
        return w_neg, weight * (scale * inv_norm).view(shape), lerp_w

    def _scalars(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(m, lw): the analysis scale and the lerp weight of the reweighting (None when beta = 1).

        a*r = beta*r + (1-beta)/(2 eps) * hardtanh(r, -eps, eps) = c * lerp(h, r, lw), with
        lw = 2 eps beta / (1 - beta + 2 eps beta) in [0, 1] and c = (1 - beta + 2 eps beta) / (2 eps);
        m = tau * c (tau alone when beta = 1) multiplies the unit-norm atoms of the analysis weight,
        so tau, c and the atoms' norms cost one weight-sized pass.
        """
        tau = self.step_size.to(self.weight.dtype)
        if self.mode == "vanilla":
            return tau, None
        beta = self.beta.to(self.weight.dtype)
        k = 2.0 * self.eps * beta
        denom = 1.0 - beta + k
        return tau * denom / (2.0 * self.eps), k / denom

    def objective(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Elastic objective F(z) per sample, shape (N,), with this layer's beta, lam and dictionary.

        It is the objective of the recursion on ``x`` as given; with ``normalize_input`` the layer
        runs that recursion on x / rms(x) and rescales the code.
        """
        self._check_input(x)
        w = self.dictionary()
        r = (x - self._synthesize(z, w, x)).flatten(1)
        beta = self.beta.to(r.dtype)
        return (
            0.5 * beta * r.pow(2).sum(1)
            + 0.5 * (1.0 - beta) * r.abs().sum(1)
            + self.lam * z.flatten(1).abs().sum(1)
        )

    def _edl_repr(self) -> str:
        return (
            f"mode={self.mode}, num_iters={self.num_iters}, lam={self.lam}, eps={self.eps}, "
            f"nonneg={self.nonneg}, normalize_atoms={self.normalize_atoms}, normalize_input={self.normalize_input}"
        )


class EDLConv2d(_EDLMixin, nn.Conv2d):
    """Drop-in for ``nn.Conv2d`` whose output is the EDL code of its input.

    Input (N, C_in, H, W) -> code (N, C_out, H_out, W_out), the shapes of the convolution.
    ``padding=None`` pads symmetrically as timm does (``((stride - 1) + dilation * (k - 1)) // 2``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=None,
        bias: bool = False,
        *,
        dilation=1,
        groups: int = 1,
        mode: str = "elastic",
        num_iters: int = DEFAULT_NUM_ITERS,
        lam: float = DEFAULT_LAM,
        beta_init: float = DEFAULT_BETA_INIT,
        eps: float = DEFAULT_EPS,
        nonneg: bool = DEFAULT_NONNEG,
        normalize_atoms: bool = True,
        normalize_input: bool = DEFAULT_NORMALIZE_INPUT,
        device=None,
        dtype=None,
    ):
        k = nn.modules.utils._pair(kernel_size)
        s = nn.modules.utils._pair(stride)
        d = nn.modules.utils._pair(dilation)
        if padding is None:
            padding = tuple(((s[i] - 1) + d[i] * (k[i] - 1)) // 2 for i in range(2))
        if isinstance(padding, str):
            raise ValueError("EDLConv2d needs explicit integer padding (or None for timm's symmetric padding)")
        super().__init__(
            in_channels, out_channels, k, stride=s, padding=padding, dilation=d, groups=groups,
            bias=bias, padding_mode="zeros", device=device, dtype=dtype,
        )
        self._init_edl(mode, num_iters, lam, beta_init, eps, nonneg, normalize_atoms, normalize_input)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **kwargs):
        """An EDL layer with ``conv``'s geometry whose dictionary (and bias) start from its weights."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_conv expects an nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(
                f"cannot convert a convolution with padding={conv.padding!r}, padding_mode={conv.padding_mode!r}: "
                "EDL needs zero padding given as integers"
            )
        with _copying_weights():
            layer = cls(
                conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                bias=conv.bias is not None, dilation=conv.dilation, groups=conv.groups,
                device=conv.weight.device, dtype=conv.weight.dtype, **kwargs,
            )
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        layer.update_step_size(num_iters=POWER_ITERS_INIT)
        return layer

    # the fused path may give _analyze a bias: oneDNN adds it in the convolution's epilogue
    _analysis_takes_free_bias = True

    def _check_input(self, x: torch.Tensor) -> None:
        _check_conv_input(x, self.in_channels)

    def _input_scale(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample RMS of the input, (N, 1, 1, 1)."""
        norm = torch.linalg.vector_norm(x, dim=(1, 2, 3), keepdim=True)
        return _floored_rms(norm, self._block_size(x))

    def _power_shape(self, x: Optional[torch.Tensor]) -> List[int]:
        if x is not None:
            return [self.in_channels, x.shape[-2], x.shape[-1]]
        if self._power_u.numel() > 0:
            return list(self._power_u.shape[1:])
        # a cheap reference size until a training input fixes it (at least two kernel extents)
        hw = [max(8, 2 * (self.dilation[i] * (self.kernel_size[i] - 1) + 1), 2 * self.stride[i]) for i in range(2)]
        return [self.in_channels, hw[0], hw[1]]

    def _analyze(self, r: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return F.conv2d(r, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _synthesize(self, z: torch.Tensor, weight: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _conv_synthesize(z, weight, like, self.stride, self.padding, self.dilation, self.kernel_size, self.groups)

    def synthesize(self, z: torch.Tensor, output_size: Optional[List[int]] = None) -> torch.Tensor:
        """A*(z): code (N, C_out, h, w) -> input space (N, C_in, H, W).

        ``output_size`` ((H, W) or a full shape) picks the input size when stride > 1 leaves it
        ambiguous; without it the smallest size is returned.
        """
        w = self.dictionary()
        if output_size is None:
            return F.conv_transpose2d(z, w, None, self.stride, self.padding, 0, self.groups, self.dilation)
        hw = [int(v) for v in list(output_size)[-2:]]
        out_pad = _output_padding(hw, list(z.shape[-2:]), self.stride, self.padding, self.dilation, self.kernel_size)
        return F.conv_transpose2d(z, w, None, self.stride, self.padding, out_pad, self.groups, self.dilation)

    def _bias_view(self, bias: torch.Tensor) -> torch.Tensor:
        return bias.view(1, -1, 1, 1)

    # A block is what the input scale is taken over (one sample), in both solvers. For the fused
    # path (_fused.py): the bias laid out over one block of the output; gradients of the bias and
    # of the two operators.
    def _block_size(self, x: torch.Tensor) -> int:
        return x.shape[1] * x.shape[2] * x.shape[3]

    def _bias_block(self, bias: torch.Tensor, out: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
        hw = out.shape[2] * out.shape[3]
        return bias.repeat(hw) if fmt == torch.channels_last else bias.repeat_interleave(hw)

    def _bias_grad(self, g: torch.Tensor) -> torch.Tensor:
        return g.sum((0, 2, 3), dtype=torch.float32)

    def _analyze_backward(self, gv: torch.Tensor, p: torch.Tensor, weight: torch.Tensor, need_input: bool, need_weight: bool):
        gi, gw, _ = torch.ops.aten.convolution_backward(
            gv, p, weight, None, self.stride, self.padding, self.dilation, False, [0, 0], self.groups,
            [need_input, need_weight, False],
        )
        return gi, gw

    def _synthesize_backward(
        self, gq: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, like: torch.Tensor, need_weight: bool
    ):
        out_pad = _output_padding(
            [like.shape[-2], like.shape[-1]], [z.shape[-2], z.shape[-1]], self.stride, self.padding, self.dilation,
            self.kernel_size,
        )
        gi, gw, _ = torch.ops.aten.convolution_backward(
            gq, z, weight, None, self.stride, self.padding, self.dilation, True, out_pad, self.groups,
            [True, need_weight, False],
        )
        return gi, gw

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self._edl_repr()


class EDLLinear(_EDLMixin, nn.Linear):
    """Drop-in for ``nn.Linear``: input (*, in_features) -> code (*, out_features)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        mode: str = "elastic",
        num_iters: int = DEFAULT_NUM_ITERS,
        lam: float = DEFAULT_LAM,
        beta_init: float = DEFAULT_BETA_INIT,
        eps: float = DEFAULT_EPS,
        nonneg: bool = DEFAULT_NONNEG,
        normalize_atoms: bool = True,
        normalize_input: bool = DEFAULT_NORMALIZE_INPUT,
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_edl(mode, num_iters, lam, beta_init, eps, nonneg, normalize_atoms, normalize_input)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs):
        """An EDL layer whose dictionary (and bias) start from ``linear``'s weights."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        with _copying_weights():
            layer = cls(
                linear.in_features, linear.out_features, bias=linear.bias is not None,
                device=linear.weight.device, dtype=linear.weight.dtype, **kwargs,
            )
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.update_step_size(num_iters=POWER_ITERS_INIT)
        return layer

    _analysis_takes_free_bias = False  # addmm's bias costs a copy of the output

    def _check_input(self, x: torch.Tensor) -> None:
        _check_linear_input(x, self.in_features)

    def _input_scale(self, x: torch.Tensor) -> torch.Tensor:
        """RMS over the features of each input vector, (*, 1)."""
        return _floored_rms(torch.linalg.vector_norm(x, dim=-1, keepdim=True), self._block_size(x))

    def _power_shape(self, x: Optional[torch.Tensor]) -> List[int]:
        return [self.in_features]

    def _analyze(self, r: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return F.linear(r, weight, bias)

    def _synthesize(self, z: torch.Tensor, weight: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return z.matmul(weight)

    def synthesize(self, z: torch.Tensor, output_size: Optional[List[int]] = None) -> torch.Tensor:
        """A*(z) = z @ W: code (*, out_features) -> input space (*, in_features)."""
        return self._synthesize(z, self.dictionary(), z)

    def _bias_view(self, bias: torch.Tensor) -> torch.Tensor:
        return bias

    def _block_size(self, x: torch.Tensor) -> int:
        return x.shape[-1]

    def _bias_block(self, bias: torch.Tensor, out: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
        return bias

    def _bias_grad(self, g: torch.Tensor) -> torch.Tensor:
        return g.reshape(-1, g.shape[-1]).sum(0, dtype=torch.float32)

    def _analyze_backward(self, gv: torch.Tensor, p: torch.Tensor, weight: torch.Tensor, need_input: bool, need_weight: bool):
        gi = gv.matmul(weight) if need_input else None
        gw = gv.reshape(-1, gv.shape[-1]).t().matmul(p.reshape(-1, p.shape[-1])) if need_weight else None
        return gi, gw

    def _synthesize_backward(
        self, gq: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, like: torch.Tensor, need_weight: bool
    ):
        gi = gq.matmul(weight.t())
        gw = z.reshape(-1, z.shape[-1]).t().matmul(gq.reshape(-1, gq.shape[-1])) if need_weight else None
        return gi, gw

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self._edl_repr()


register_notrace_module(EDLConv2d)  # leaves of timm's fx feature extraction (see _whole_layer)
register_notrace_module(EDLLinear)


def is_edl_layer(module: nn.Module) -> bool:
    return isinstance(module, (EDLConv2d, EDLLinear))


def edl_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, layer) of every EDL layer in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if is_edl_layer(m)]
