"""Orthogonal regularization of conv and linear weights, as a loss term or as a closed-form gradient.

Each weight is read as matrices ``W`` of ``rows x cols`` (see :mod:`normswap.regularizers.targets`) and
penalized, times ``strength``, by one of:

* ``offdiag`` (Brock et al., 2019, BigGAN): ``||W W^T * (1 - I)||_F^2``, the squared dot products between
  different rows (filters); their norms are free.
* ``full`` (Saxe et al. / Brock et al., 2017): ``||W W^T - I||_F^2``, rows orthonormal.
* ``srip`` (Bansal et al., 2018, "Can We Gain More from Orthogonality Regularizations..."):
  ``sigma(W^T W - I)^2`` on the smaller Gram side, the spectral norm estimated by power iteration with a
  vector kept from call to call (so one iteration per step suffices, as for ``nn.utils.spectral_norm``);
  the penalty is the Rayleigh quotient ``(v^T (S - I) v)^2`` of that vector, whose gradient is exact.
  SRIP anneals its strength: pass ``strength={0: 1e-1, 20_000: 1e-3, ...}`` or a function of the step.

Gradients (``G = W W^T``, ``C = W^T W``, ``r`` the squared row norms), which :meth:`apply_` adds to
``.grad`` without building a graph, as BigGAN does:

* ``full``: ``4 (G - I) W``, or equally ``4 W (C - I)``: the two penalties differ by the constant
  ``rows - cols``, so the smaller Gram matrix is used.
* ``offdiag``: ``4 (G - diag(r)) W = 4 (W C - diag(r) W)``: again the smaller Gram matrix serves, through
  ``G W = W C``, and the value is ``||C||_F^2 - sum(r^2)``.
* ``srip``: ``4 lambda v (v^T W)`` (or ``4 lambda (W v) v^T`` on the ``C`` side), ``lambda = v^T (S - I) v``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Union

import torch
from torch import Tensor, nn

from ..errors import OptionError, closest
from .targets import Bucket, buckets_of, select_weights

__all__ = ["OrthogonalRegularizer", "FORMS"]

FORMS = ("offdiag", "full", "srip")
_HALF = (torch.float16, torch.bfloat16)

Strength = Union[float, Mapping[int, float], Callable[[int], float]]


def _check_strength_value(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise OptionError(f"OrthogonalRegularizer: {where} must be a finite number >= 0, got {value!r}.")
    return float(value)


def _check_strength(strength: object) -> Strength:
    if isinstance(strength, Mapping):
        if not strength:
            raise OptionError("OrthogonalRegularizer: a strength schedule needs at least one {step: strength}.")
        for step, value in strength.items():
            if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
                raise OptionError(f"OrthogonalRegularizer: schedule steps must be ints >= 0, got {step!r}.")
            _check_strength_value(value, f"strength at step {step}")
        return dict(sorted((int(k), float(v)) for k, v in strength.items()))
    if callable(strength):
        return strength
    return _check_strength_value(strength, "strength")


def _full_form_offset(b: Bucket) -> int:
    """``||W W^T - I||^2 - ||W^T W - I||^2 = rows - cols`` per matrix: added when the cols side is used."""
    return b.count * (b.rows - b.cols) if b.rows > b.cols else 0


class OrthogonalRegularizer:
    """Orthogonal regularization of a model's conv and linear weights (BigGAN off-diagonal, full, SRIP).

    Use it either as a loss term, ``loss = loss + reg()``, or by adding its closed-form gradient after the
    backward pass, ``loss.backward(); reg.apply_()`` (no graph kept; works with any trainer). Both give the
    same gradients. Call one of them once per optimizer step: every call counts as a step for ``every``
    and for a strength schedule.

    Args:
        model: the model whose weights are regularized.
        strength: a number, a ``{step: strength}`` schedule (piecewise constant from each step on), or a
            function ``step -> strength``.
        form: ``"offdiag"`` (default), ``"full"`` or ``"srip"`` (see the module docstring).
        include, exclude: module-path globs. By default every conv / linear weight except the classifier
            head; no biases, norms or embeddings. Convs count filter by filter within each group.
        every: apply on every ``every``-th call only (the others return zero / do nothing), unscaled.
        exclude_head: leave the classifier head out when ``include`` is not given (default True).
        power_iterations: SRIP power iterations per call (default 1, warm-started).
        seed: seeds SRIP's starting vectors, for reproducible runs.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 16), nn.Linear(16, 2))
        >>> reg = OrthogonalRegularizer(model, strength=1e-4, exclude="3")
        >>> loss = model(torch.randn(2, 3, 8, 8)).sum() + reg()
        >>> loss.backward()
    """

    def __init__(
        self,
        model: nn.Module,
        strength: Strength = 1e-4,
        form: str = "offdiag",
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        every: int = 1,
        *,
        exclude_head: bool = True,
        power_iterations: int = 1,
        seed: int = 0,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise OptionError(f"OrthogonalRegularizer: model must be a torch.nn.Module, got {type(model).__name__}.")
        if form not in FORMS:
            raise OptionError(f"OrthogonalRegularizer: unknown form {form!r}; use one of {FORMS}.{closest(str(form), FORMS)}")
        for name, value in (("every", every), ("power_iterations", power_iterations)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise OptionError(f"OrthogonalRegularizer: {name} must be an int >= 1, got {value!r}.")
        self.model = model
        self.form = form
        self.strength = _check_strength(strength)
        self.every = int(every)
        self.power_iterations = int(power_iterations)
        self.weights = select_weights(model, include, exclude, exclude_head, "OrthogonalRegularizer")
        self.buckets: list[Bucket] = buckets_of(self.weights)
        self.step = 0
        self._vectors: list[Tensor] = []
        if form == "srip":
            gen = torch.Generator().manual_seed(seed)
            for b in self.buckets:
                p = b.entries[0].param
                v = torch.randn(b.count, min(b.rows, b.cols), generator=gen, dtype=torch.float32)
                self._vectors.append(nn.functional.normalize(v, dim=1).to(p.device))

    # ------------------------------------------------------------------------------------------------------
    # Public API.
    # ------------------------------------------------------------------------------------------------------

    def strength_at(self, step: int) -> float:
        """The strength in force at ``step`` (a constant, the schedule's value, or the function's).

        Example:
            >>> reg = OrthogonalRegularizer(nn.Linear(4, 4), strength={0: 0.1, 100: 0.001}, exclude_head=False)
            >>> reg.strength_at(50), reg.strength_at(100)
            (0.1, 0.001)
        """
        if isinstance(self.strength, float):
            return self.strength
        if isinstance(self.strength, dict):
            current = 0.0
            for start, value in self.strength.items():
                if step >= start:
                    current = value
            return current
        return _check_strength_value(self.strength(step), f"strength({step})")

    def __call__(self, model: nn.Module | None = None) -> Tensor:
        """The penalty as a differentiable scalar, for ``loss + reg()`` (zero on skipped steps)."""
        if model is not None and model is not self.model:
            raise OptionError("OrthogonalRegularizer: called with another model than the one it was built for; "
                              "build one regularizer per model (after normswap.convert, if you convert).")
        active, strength = self._advance()
        if not active or strength == 0.0:
            return self._zero()
        total = sum(self._penalty(i, b) for i, b in enumerate(self.buckets))
        return total * strength

    @torch.no_grad()
    def apply_(self) -> Tensor | None:
        """Add the penalty's gradient to each weight's ``.grad`` (after ``backward``, before the step).

        Returns the penalty's value (without a graph) for logging, or ``None`` on a skipped step.
        """
        active, strength = self._advance()
        if not active:
            return None
        total = self._zero()
        for i, b in enumerate(self.buckets):
            value, grad = self._closed_form(i, b)
            total = total + value.to(total.device)
            if strength == 0.0:
                continue
            grad.mul_(strength)
            for entry, g in b.split(grad):
                p = entry.param
                g = g.to(p.dtype)
                if p.grad is None:
                    p.grad = g.clone(memory_format=torch.preserve_format) if g.is_contiguous() else g.contiguous()
                else:
                    p.grad.add_(g)
        return total * strength

    def state_dict(self) -> dict:
        """The step count and SRIP's power-iteration vectors, to resume a run exactly."""
        return {"step": self.step, "vectors": [v.clone() for v in self._vectors]}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore what :meth:`state_dict` returned."""
        vectors = list(state.get("vectors", []))
        if len(vectors) != len(self._vectors) or any(a.shape != b.shape for a, b in zip(vectors, self._vectors)):
            raise OptionError("OrthogonalRegularizer.load_state_dict: the saved vectors do not fit this model's "
                              "selected weights (another model, form or include/exclude?).")
        self.step = int(state["step"])
        self._vectors = [v.to(old.device) for v, old in zip(vectors, self._vectors)]

    def __repr__(self) -> str:
        n = sum(b.count for b in self.buckets)
        return (f"OrthogonalRegularizer(form={self.form!r}, strength={self.strength!r}, every={self.every}, "
                f"{len(self.weights)} weights as {n} matrices in {len(self.buckets)} buckets)")

    # ------------------------------------------------------------------------------------------------------
    # Internals.
    # ------------------------------------------------------------------------------------------------------

    def _advance(self) -> tuple[bool, float]:
        step = self.step
        self.step += 1
        active = step % self.every == 0
        return active, (self.strength_at(step) if active else 0.0)

    def _zero(self) -> Tensor:
        return torch.zeros((), device=self.weights[0].param.device)

    def _power_iterate(self, i: int, a: Tensor) -> Tensor:
        """Warm-started power iteration on the symmetric ``a`` ([B, s, s]); returns and keeps unit vectors."""
        v = self._vectors[i]
        for _ in range(self.power_iterations):
            v = nn.functional.normalize(torch.bmm(a, v.unsqueeze(-1)).squeeze(-1), dim=1)
        self._vectors[i] = v
        return v

    @staticmethod
    def _gram(b: Bucket, differentiable: bool) -> tuple[Tensor, Tensor, bool]:
        """The bucket's stacked matrices ``w`` (float32 for half weights), their smaller Gram matrices ``s``
        (rows x rows when ``wide``, cols x cols when tall) and ``wide``."""
        w = b.stack(differentiable)
        if w.dtype in _HALF:
            w = w.float()
        wide = b.rows <= b.cols
        s = torch.bmm(w, w.transpose(1, 2)) if wide else torch.bmm(w.transpose(1, 2), w)
        return w, s, wide

    def _penalty(self, i: int, b: Bucket) -> Tensor:
        """This bucket's penalty, differentiable (the loss-term path)."""
        w, s, _ = self._gram(b, differentiable=True)
        if self.form == "offdiag":
            r = w.pow(2).sum(-1)
            return s.pow(2).sum() - r.pow(2).sum()
        eye = torch.eye(s.shape[-1], device=s.device, dtype=s.dtype)
        if self.form == "full":
            return (s - eye).pow(2).sum() + _full_form_offset(b)
        with torch.no_grad():
            v = self._power_iterate(i, (s - eye).detach())
        lam = torch.einsum("bi,bij,bj->b", v, s - eye, v)
        return lam.pow(2).sum()

    def _closed_form(self, i: int, b: Bucket) -> tuple[Tensor, Tensor]:
        """This bucket's penalty value and its gradient with respect to the stacked matrices (no graph)."""
        w, s, wide = self._gram(b, differentiable=False)
        diag = s.diagonal(dim1=1, dim2=2)
        if self.form == "offdiag":
            r = diag if wide else w.pow(2).sum(-1)
            value = s.pow(2).sum() - r.pow(2).sum()
            if wide:
                diag.zero_()
                grad = torch.bmm(s, w)
            else:  # G W = W C, minus the diagonal's part diag(r) W
                grad = torch.baddbmm(w * r.neg().unsqueeze(-1), w, s)
            return value, grad.mul_(4.0)
        diag.sub_(1.0)  # s is now S - I
        if self.form == "full":
            value = s.pow(2).sum() + _full_form_offset(b)
            grad = torch.bmm(s, w) if wide else torch.bmm(w, s)
            return value, grad.mul_(4.0)
        v = self._power_iterate(i, s)
        sv = torch.bmm(s, v.unsqueeze(-1)).squeeze(-1)
        lam = (v * sv).sum(-1)
        value = lam.pow(2).sum()
        if wide:  # d lambda / dW = 2 v (v^T W)
            grad = torch.bmm(v.unsqueeze(-1), torch.bmm(v.unsqueeze(1), w))
        else:  # d lambda / dW = 2 (W v) v^T
            grad = torch.bmm(torch.bmm(w, v.unsqueeze(-1)), v.unsqueeze(1))
        return value, grad.mul_((4.0 * lam).view(-1, 1, 1))
