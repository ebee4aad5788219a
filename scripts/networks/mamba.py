"""Mamba mixers that scan a token grid in several orders, and the residual blocks built on them.

Every module here holds ``members`` independent parameter sets and processes a stacked input of
shape (members, batch, L, d_model). The two modality streams of ClinicalFMamba (or its two
cross-modal blocks) are two members of one module, so one call runs both, and all directions of
all members go through a single selective-scan call (directions and members are the scan's
channel groups).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from scripts.ssm import causal_conv_silu, gather_directions, merge_directions, selective_scan_time_major

from .scan_orders import NUM_DIRECTIONS, inverse_orders, scan_orders

__all__ = ["CrossMambaBlock", "DirectionalMamba", "MemberLayerNorm", "ResidualMambaBlock", "member_linear"]


def member_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Per-member linear map: x (M, B, L, in), weight (M, out, in), bias (M, out) -> (M, B, L, out)."""
    m, b, length, _ = x.shape
    y = torch.bmm(x.reshape(m, b * length, -1), weight.transpose(1, 2))
    if bias is not None:
        y = y + bias[:, None, :]
    return y.view(m, b, length, -1)


class MemberLayerNorm(nn.Module):
    """LayerNorm over the last dim with a separate affine transform per member; x: (M, B, L, d)."""

    def __init__(self, members: int, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(members, dim))
        self.bias = nn.Parameter(torch.zeros(members, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            return F.layer_norm(x, x.shape[-1:], self.weight[0], self.bias[0], self.eps)
        x = F.layer_norm(x, x.shape[-1:], eps=self.eps)
        return torch.addcmul(self.bias[:, None, None, :], x, self.weight[:, None, None, :])  # one pass


def _uniform(shape: Sequence[int], bound: float) -> torch.Tensor:
    return torch.empty(*shape).uniform_(-bound, bound)


def _inverse_softplus_dt(shape: Sequence[int], dt_min: float, dt_max: float, floor: float) -> torch.Tensor:
    """Mamba's dt bias init: softplus(bias) is log-uniform in [dt_min, dt_max]."""
    dt = torch.exp(torch.rand(*shape) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))


class DirectionalMamba(nn.Module):
    """Mamba mixer scanning in K orders with direction-specific conv, projections, A and D.

    ``order_set`` picks the orders (``identity``: vanilla Mamba; ``cross2d``: row-/column-major,
    forward and reverse; ``triplane``: axial/sagittal/coronal, forward and reverse). The directions
    share ``in_proj`` (and ``in_proj_b``), the output LayerNorm and ``out_proj``. Their outputs are
    put back in row-major token order and averaged, gated by silu(z), normalised (``use_norm``) and
    projected.

    With ``cross_modal=True`` the mixer takes a second input ``extra``: the scanned input x and the
    gate z come from ``x`` while delta, B and C are projected from ``in_proj_b(extra)`` (no conv,
    no activation), so the other modality decides what is selected.

    Args:
        d_model: token channels.
        d_state: SSM state size N.
        d_conv: width of the causal depthwise convolution.
        expand: d_inner = expand * d_model.
        dt_rank: rank of the delta projection, ``"auto"`` = ceil(d_model / 16).
        order_set: name of the scan order set.
        cross_modal: take delta, B, C from a second input.
        use_norm: LayerNorm(d_inner) on the merged output before ``out_proj``.
        members: number of independent parameter sets (stacked leading input dim).
        dt_init_all_directions: Mamba's delta-bias init for every direction (False reproduces the
            released code, where only the first direction gets it).
        dead_a_matrices, dead_norm: allocate the never-used parameters of the released class
            (only so that parameter counts can be compared with the paper).
        scan_backend: selective-scan backend name, None = process default.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 8,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        order_set: str = "identity",
        cross_modal: bool = False,
        use_norm: bool = True,
        members: int = 1,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_init_all_directions: bool = True,
        dead_a_matrices: int = 0,
        dead_norm: bool = False,
        scan_backend: str | None = None,
    ) -> None:
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.order_set, self.cross_modal, self.members = order_set, cross_modal, members
        self.scan_backend = scan_backend
        if order_set not in NUM_DIRECTIONS:
            raise ValueError(f"unknown scan order set {order_set!r}; choose one of {sorted(NUM_DIRECTIONS)}")
        self.num_directions = NUM_DIRECTIONS[order_set]
        m, k, di, n, r = members, self.num_directions, self.d_inner, d_state, self.dt_rank
        groups = m * k

        self.in_proj_weight = nn.Parameter(_uniform((m, 2 * di, d_model), 1 / math.sqrt(d_model)))
        self.in_proj_b_weight = (
            nn.Parameter(_uniform((m, di, d_model), 1 / math.sqrt(d_model))) if cross_modal else None
        )
        self.conv_weight = nn.Parameter(_uniform((groups * di, 1, d_conv), 1 / math.sqrt(d_conv)))
        self.conv_bias = nn.Parameter(_uniform((groups * di,), 1 / math.sqrt(d_conv)))
        self.x_proj_weight = nn.Parameter(_uniform((groups, r + 2 * n, di), 1 / math.sqrt(di)))
        self.dt_proj_weight = nn.Parameter(_uniform((groups, di, r), r**-0.5))
        dt_bias = _inverse_softplus_dt((m, k, di), dt_min, dt_max, dt_init_floor)
        if not dt_init_all_directions:  # released code: extra directions keep PyTorch's Linear default
            dt_bias[:, 1:] = _uniform((m, k - 1, di), 1 / math.sqrt(r))
        self.dt_proj_bias = nn.Parameter(dt_bias.reshape(groups, di))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(groups, di, 1))
        self.D = nn.Parameter(torch.ones(groups, di))
        self.norm = MemberLayerNorm(m, di) if use_norm else None
        self.out_proj_weight = nn.Parameter(_uniform((m, d_model, di), 1 / math.sqrt(di)))
        if dead_a_matrices:
            self.unused_A_log = nn.Parameter(torch.log(torch.arange(1, n + 1.0)).repeat(m, dead_a_matrices, di, 1))
        if dead_norm:
            self.unused_norm = MemberLayerNorm(m, di)
        self._order_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # grid, batch, device -> indices

    def _gather_index(self, grid: Sequence[int], batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat row indices of the direction gather and of the re-alignment, cached per grid and batch.

        ``forward[(l, b, m, k)]`` is the row of (M, B, L) tokens that direction k visits at step l;
        ``backward[(l, b, m, k)]`` is the row of the (L, B, M, K) direction outputs that holds token l.
        """
        key = (tuple(grid), batch, str(device))
        if key not in self._order_cache:
            with torch.inference_mode(False):  # normal tensors: a cache filled under inference_mode serves training too
                self._order_cache[key] = self._build_gather_index(grid, batch, device)
        return self._order_cache[key]

    def _build_gather_index(
        self, grid: Sequence[int], batch: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        orders = scan_orders(self.order_set, grid)
        inverse = inverse_orders(orders)
        k, length = orders.shape
        b = torch.arange(batch).view(1, batch, 1, 1)
        m = torch.arange(self.members).view(1, 1, -1, 1)
        kk = torch.arange(k).view(1, 1, 1, k)
        forward = (m * batch + b) * length + orders.t().reshape(length, 1, 1, k)
        backward = ((inverse.t().reshape(length, 1, 1, k) * batch + b) * self.members + m) * k + kk
        return forward.reshape(-1).to(device), backward.reshape(-1).to(device)

    def _conv_parameters(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The causal convolution's weight (G, P, K) and bias (G, P), one set per member and direction."""
        groups = self.members * self.num_directions
        return self.conv_weight.view(groups, -1, self.d_conv), self.conv_bias.view(groups, -1)

    def forward(self, x: torch.Tensor, grid: Sequence[int], extra: torch.Tensor | None = None) -> torch.Tensor:
        """x, extra: (M, B, L, d_model) with L = prod(grid), tokens row-major -> (M, B, L, d_model)."""
        if self.cross_modal != (extra is not None):
            raise ValueError("a cross-modal mixer needs `extra`; a single-modality mixer takes none")
        m, b, length, _ = x.shape
        if m != self.members or length != math.prod(grid):
            raise ValueError(
                f"mixer expects ({self.members}, B, {math.prod(grid)}, C) tokens for grid {tuple(grid)}, "
                f"got {tuple(x.shape)}"
            )
        forward_index, backward_index = self._gather_index(grid, b, x.device)
        xs, z = member_linear(x, self.in_proj_weight).split(self.d_inner, dim=-1)
        extra = member_linear(extra, self.in_proj_b_weight) if self.cross_modal else None
        A = -torch.exp(self.A_log.to(torch.promote_types(self.A_log.dtype, torch.float32)))
        y = self.scan_directions(xs, z, extra, A, forward_index, backward_index)
        return member_linear(y, self.out_proj_weight)

    def scan_directions(
        self,
        xs: torch.Tensor,
        z: torch.Tensor,
        extra: torch.Tensor | None,
        A: torch.Tensor,
        forward_index: torch.Tensor,
        backward_index: torch.Tensor,
    ) -> torch.Tensor:
        """The mixer between its projections: xs, z, extra (M, B, L, d_inner) -> (M, B, L, d_inner).

        Every direction's sequence (the gather ``forward_index``) goes through ``silu(causal conv)``; delta, B and C
        are projected from it (or, cross-modal, from ``extra``); the scan runs all members and directions as channel
        groups; the outputs go back to token order (``backward_index``), averaged, gated by ``silu(z)`` and
        normalised (``use_norm``).
        """
        n, r = self.d_state, self.dt_rank
        u = causal_conv_silu(xs, *self._conv_parameters(), forward_index, backend=self.scan_backend)  # (L, B, G, P)
        source = gather_directions(extra, forward_index) if extra is not None else u
        dt, b_sel, c_sel = torch.einsum("lbgp,gcp->lbgc", source, self.x_proj_weight).split([r, n, n], dim=-1)
        y = selective_scan_time_major(
            u, dt, A, b_sel, c_sel, self.D, delta_bias=self.dt_proj_bias, delta_softplus=True,
            backend=self.scan_backend, delta_proj_weight=self.dt_proj_weight,
        )  # fmt: skip
        y = merge_directions(y, backward_index, z, backend=self.scan_backend)
        return y if self.norm is None else self.norm(y)


class ResidualMambaBlock(nn.Module):
    """Pre-norm residual block ``x + mixer(LayerNorm(x))``; x: (M, B, L, d_model)."""

    def __init__(self, d_model: int, members: int = 1, **mixer_kwargs) -> None:
        super().__init__()
        self.norm = MemberLayerNorm(members, d_model)
        self.mixer = DirectionalMamba(d_model, members=members, **mixer_kwargs)

    def forward(self, x: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        return x + self.mixer(self.norm(x), grid)


class CrossMambaBlock(nn.Module):
    """Cross-modal residual block ``x + mixer(LN(x), extra=LN'(other))``; x, other: (M, B, L, d_model)."""

    def __init__(self, d_model: int, members: int = 1, **mixer_kwargs) -> None:
        super().__init__()
        self.norm = MemberLayerNorm(members, d_model)
        self.norm_extra = MemberLayerNorm(members, d_model)
        self.mixer = DirectionalMamba(d_model, members=members, cross_modal=True, **mixer_kwargs)

    def forward(self, x: torch.Tensor, other: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        return x + self.mixer(self.norm(x), grid, extra=self.norm_extra(other))
