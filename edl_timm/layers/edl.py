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

Choices where the method note is silent (each with its reason; see README "EDL layer defaults"):

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
* eps (the floor of the smoothed sign) = 1e-3: the authors' earlier robust-layer value.
* step size tau = 0.9 / L with L = ||A||^2 from power iteration on A A* in the input space (SDNet's
  0.9: power iteration approaches L from below, so the margin keeps tau below 1/L). It is a buffer:
  recomputed to convergence at construction and from ``from_conv``/``from_linear``, refined by one
  warm-started power iteration per training forward (at the spatial size of the input), and never
  touched in eval mode. It is treated as a constant by autograd.

Speed: tau, the balance constant of the reweighting and the threshold are folded into the analysis
weight and bias, so a step costs the two convolutions plus four elementwise passes (residual,
hardtanh, lerp, add) and the threshold is fused into the convolution's bias.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["EDLConv2d", "EDLLinear", "EDL_MODES", "is_edl_layer"]

EDL_MODES = ("elastic", "vanilla", "robust")

DEFAULT_NUM_ITERS = 2
DEFAULT_LAM = 0.1
DEFAULT_BETA_INIT = 0.5
DEFAULT_EPS = 1e-3
DEFAULT_NONNEG = True
STEP_FACTOR = 0.9
POWER_ITERS_INIT = 50  # iterations when the step size is computed from scratch


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
        return torch.clamp(r, -eps, eps).lerp_(r, w.to(r.dtype))  # one allocation

    @staticmethod
    def backward(ctx, grad):
        r, w = ctx.saved_tensors
        eps = ctx.eps
        grad_r = grad_w = None
        buf = torch.clamp(r, -eps, eps)
        if ctx.needs_input_grad[1]:
            grad_w = (_dot(grad, r) - _dot(grad, buf)).to(w.dtype)
        if ctx.needs_input_grad[0]:
            # grad where |r| < eps, else 0 (written into buf), then lerp towards grad
            grad_r = torch.ops.aten.hardtanh_backward.grad_input(grad, r, -eps, eps, grad_input=buf)
            grad_r.lerp_(grad, w.to(grad.dtype))
        return grad_r, grad_w, None


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sum of a*b, in one read-only pass when both have the same dense layout."""
    if a.dtype == b.dtype and a.stride() == b.stride() and a.is_contiguous():
        return torch.dot(a.view(-1), b.view(-1)).float()
    return (a.float() * b.float()).sum()


def _reweight(r: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    if torch.jit.is_scripting():
        return torch.lerp(torch.clamp(r, -eps, eps), r, w.to(r.dtype))
    return _Reweight.apply(r, w, eps)


class _EDLMixin:
    """The RISTA solver, shared by the conv and linear layers.

    Subclasses provide ``_analyze(r, weight, bias)``, ``_synthesize(z, weight, like)``,
    ``_check_input(x)`` and ``_power_shape(x)``.
    """

    # set by _init_edl
    mode: str
    num_iters: int
    lam: float
    eps: float
    nonneg: bool
    normalize_atoms: bool

    def _init_edl(self, mode, num_iters, lam, beta_init, eps, nonneg, normalize_atoms):
        _check_edl_args(mode, num_iters, lam, beta_init, eps)
        self.mode = mode
        self.num_iters = int(num_iters)
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
        self.update_step_size()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "step_size"):  # nn.Conv2d/Linear.__init__ call this before _init_edl
            self.update_step_size()

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

    def dictionary(self) -> torch.Tensor:
        """The dictionary used by forward: ``weight`` with each atom scaled to unit l2 norm."""
        w = self.weight
        if not self.normalize_atoms:
            return w
        inv_norm = w.flatten(1).norm(dim=1).clamp_min(1e-12).reciprocal()
        return w * inv_norm.view([-1] + [1] * (w.dim() - 1))

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
        shape = list(input_shape) if input_shape is not None else self._power_shape(None)
        w = self.dictionary().detach()
        w = w.to(torch.promote_types(w.dtype, torch.float32))  # at least fp32, fp64 for fp64 layers
        u = self._power_u
        fresh = u.numel() == 0 or list(u.shape[1:]) != shape
        if fresh:
            # Deterministic start: the step size is a function of the weights, not of a global RNG.
            g = torch.Generator(device="cpu").manual_seed(0)
            u = torch.randn([1] + shape, generator=g, dtype=torch.float64)
            num_iters = num_iters or POWER_ITERS_INIT
        u = u.to(device=w.device, dtype=w.dtype)
        with torch.autocast(device_type=w.device.type, enabled=False):
            for _ in range(num_iters or 1):
                u = u / u.norm().clamp_min(1e-12)
                u = self._synthesize(self._analyze(u, w, None), w, u)
            lip = u.norm()  # ||A*A u|| for the last unit u: the Rayleigh estimate of L
        self._power_u = u / u.norm().clamp_min(1e-12)
        self.step_size.copy_(STEP_FACTOR / lip.clamp_min(1e-12))  # no .item(): no sync, no graph break

    # ----------------------------------------------------------------------------------- solver
    def forward(self, x: torch.Tensor, num_iters: Optional[int] = None) -> torch.Tensor:
        self._check_input(x)
        steps = self.num_iters if num_iters is None else num_iters
        if steps < 1:
            raise ValueError(f"num_iters must be >= 1, got {steps}")
        if self.training:
            self.update_step_size(input_shape=self._power_shape(x))
        z = self.solve(x, steps)
        if self.bias is not None:
            z = z + self._bias_view(self.bias)
        return z

    def solve(self, x: torch.Tensor, num_iters: int) -> torch.Tensor:
        """The T-step RISTA code of ``x`` (no bias), differentiable in x, the weight and beta."""
        w_neg, w_an, lerp_w = self._operators()
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
                r = _reweight(r, lerp_w, self.eps)
            v = self._analyze(r, w_an, an_bias)
            if t > 0:
                v = v.add_(z)
            if self.nonneg:
                z = F.relu_(v)
            else:
                z = v - torch.clamp(v, -thr, thr)
        return z

    def _operators(self) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(negated synthesis dictionary, analysis weight with tau and the reweighting scale folded
        in, lerp weight of the reweighting or None when beta = 1).

        a*r = beta*r + (1-beta)/(2 eps) * hardtanh(r, -eps, eps) = c * lerp(h, r, lw), with
        lw = 2 eps beta / (1 - beta + 2 eps beta) in [0, 1] and c = (1 - beta + 2 eps beta) / (2 eps);
        c, tau and the atoms' norms are one per-atom factor on the weight (one weight-sized pass).
        """
        weight = self.weight
        tau = self.step_size.to(weight.dtype)
        if self.normalize_atoms:
            inv_norm = weight.flatten(1).norm(dim=1).clamp_min(1e-12).reciprocal()
        else:
            inv_norm = torch.ones(weight.shape[0], dtype=weight.dtype, device=weight.device)
        shape = [-1] + [1] * (weight.dim() - 1)
        w_neg = weight * (-inv_norm).view(shape)
        if self.mode == "vanilla":
            return w_neg, weight * (tau * inv_norm).view(shape), None
        beta = self.beta.to(weight.dtype)
        k = 2.0 * self.eps * beta
        denom = 1.0 - beta + k
        scale = tau * denom / (2.0 * self.eps)
        return w_neg, weight * (scale * inv_norm).view(shape), k / denom

    def objective(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Elastic objective F(z) per sample, shape (N,), with this layer's beta, lam and dictionary."""
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
            f"nonneg={self.nonneg}, normalize_atoms={self.normalize_atoms}"
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
        self._init_edl(mode, num_iters, lam, beta_init, eps, nonneg, normalize_atoms)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, **kwargs) -> "EDLConv2d":
        """An EDL layer with ``conv``'s geometry whose dictionary (and bias) start from its weights."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_conv expects an nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(
                f"cannot convert a convolution with padding={conv.padding!r}, padding_mode={conv.padding_mode!r}: "
                "EDL needs zero padding given as integers"
            )
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            bias=conv.bias is not None, dilation=conv.dilation, groups=conv.groups,
            device=conv.weight.device, dtype=conv.weight.dtype, **kwargs,
        )
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        layer.update_step_size()
        return layer

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(
                f"EDLConv2d expects a 4-D input (N, C, H, W), got a {x.dim()}-D tensor of shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(f"EDLConv2d expected {self.in_channels} input channels, got {x.shape[1]}")

    def _power_shape(self, x: Optional[torch.Tensor]) -> List[int]:
        if x is not None:
            return [self.in_channels, x.shape[-2], x.shape[-1]]
        if self._power_u.numel() > 0:
            return list(self._power_u.shape[1:])
        return [self.in_channels, 8, 8]  # a cheap reference until a training input fixes the size

    def _analyze(self, r: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return F.conv2d(r, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _synthesize(self, z: torch.Tensor, weight: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        out_pad = self._output_padding_for(like.shape[-2:], z.shape[-2:])
        return F.conv_transpose2d(z, weight, None, self.stride, self.padding, out_pad, self.groups, self.dilation)

    def _output_padding_for(self, in_hw: List[int], code_hw: List[int]) -> Tuple[int, int]:
        pads: List[int] = []
        for i in range(2):
            base = (code_hw[i] - 1) * self.stride[i] - 2 * self.padding[i] + self.dilation[i] * (self.kernel_size[i] - 1) + 1
            op = in_hw[i] - base
            if op < 0 or op >= max(self.stride[i], self.dilation[i]):
                raise ValueError(
                    f"a code of spatial size {tuple(code_hw)} does not come from an input of size {tuple(in_hw)}"
                )
            pads.append(op)
        return pads[0], pads[1]

    def synthesize(self, z: torch.Tensor, output_size: Optional[List[int]] = None) -> torch.Tensor:
        """A*(z): code (N, C_out, h, w) -> input space (N, C_in, H, W).

        ``output_size`` ((H, W) or a full shape) picks the input size when stride > 1 leaves it
        ambiguous; without it the smallest size is returned.
        """
        w = self.dictionary()
        if output_size is None:
            return F.conv_transpose2d(z, w, None, self.stride, self.padding, 0, self.groups, self.dilation)
        hw = list(output_size)[-2:]
        out_pad = self._output_padding_for(hw, z.shape[-2:])
        return F.conv_transpose2d(z, w, None, self.stride, self.padding, out_pad, self.groups, self.dilation)

    def _bias_view(self, bias: torch.Tensor) -> torch.Tensor:
        return bias.view(1, -1, 1, 1)

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
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_edl(mode, num_iters, lam, beta_init, eps, nonneg, normalize_atoms)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "EDLLinear":
        """An EDL layer whose dictionary (and bias) start from ``linear``'s weights."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        layer = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            device=linear.weight.device, dtype=linear.weight.dtype, **kwargs,
        )
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.update_step_size()
        return layer

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() < 1:
            raise ValueError("EDLLinear expects an input of shape (*, in_features), got a 0-D tensor")
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"EDLLinear expected {self.in_features} input features in the last dimension, "
                f"got {x.shape[-1]} (input shape {tuple(x.shape)})"
            )

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

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self._edl_repr()


def is_edl_layer(module: nn.Module) -> bool:
    return isinstance(module, (EDLConv2d, EDLLinear))
