"""The SAM optimizer family: SAM, ASAM and SAM with the AACE perturbation.

Sharpness-Aware Minimization (Foret et al., ICLR 2021) takes two gradients per step. The first,
g, taken at w, defines a perturbation e; the second is taken at w + e and fed to a base
optimizer, which updates w. The perturbation rules:

    "sam"               e =  rho * T^2 g / (||T g|| + eps),   g = grad of cross-entropy
    "aace"              e = -rho * T^2 g,                      g = grad of AACE (no normalization,
                                                               Ratchatorn & Tanaka, ICIP 2024)
    "aace-normalized"   e = -rho * T^2 g / (||T g|| + eps),   g = grad of AACE

T = diag(|w|) with ``adaptive=True`` (ASAM, Kwon et al., ICML 2021), else the identity. The norm
is the global L2 norm over every parameter with a gradient. AACE's perturbation descends its
loss, because AACE is minimized by moving probability away from the true class; that is why its
sign is the opposite of SAM's.

Which loss produced g is the caller's choice: this optimizer only reads ``.grad``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["PERTURBATIONS", "SAM"]

PERTURBATIONS = ("sam", "aace", "aace-normalized")
_NORMALIZED = {"sam": True, "aace": False, "aace-normalized": True}
_SIGN = {"sam": 1.0, "aace": -1.0, "aace-normalized": -1.0}
_FOREACH_DEVICES = ("cpu", "cuda", "mps", "xpu")


def _check_group_options(rho: Any, perturbation: Any, adaptive: Any, perturbation_eps: Any) -> None:
    if not isinstance(rho, (int, float)) or not rho >= 0.0 or rho == float("inf"):
        raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")
    if perturbation not in PERTURBATIONS:
        raise ValueError(
            f"perturbation must be one of {', '.join(PERTURBATIONS)}; got {perturbation!r}"
        )
    if not isinstance(adaptive, bool):
        raise ValueError(f"adaptive must be True or False, got {adaptive!r}")
    if not isinstance(perturbation_eps, (int, float)) or not perturbation_eps >= 0.0:
        raise ValueError(f"perturbation_eps must be a number >= 0, got {perturbation_eps!r}")


class SAM(Optimizer):
    """Sharpness-Aware Minimization around any base optimizer.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim.Optimizer``.
        base_optimizer: the optimizer class (or factory) that makes the update, e.g.
            ``torch.optim.SGD``. It is built on the same ``param_groups``, so learning-rate
            schedulers attached to either object act on both.
        rho: perturbation radius (per-group overridable).
        perturbation: "sam", "aace" or "aace-normalized" (per-group overridable).
        adaptive: ASAM's elementwise scaling by |w| (per-group overridable).
        perturbation_eps: added to the gradient norm of the normalized rules.
        foreach: ``None`` picks the vectorized ``torch._foreach_*`` path for CPU/CUDA/MPS/XPU
            tensors; ``True``/``False`` force it on or off.
        track_stats: after each ``first_step``, keep ``grad_norm``, ``perturbation_norm`` and
            ``perturbation_cosine`` (cosine between this and the previous perturbation; one more
            parameter-sized buffer) as 0-dim tensors, for logging without a host sync.
        **base_kwargs: passed to ``base_optimizer`` (lr, momentum, weight_decay, ...).

    Usage, with the loss of the first pass chosen by the caller::

        loss_fn(model(x), y).backward()       # CE for "sam", AACE for "aace"
        opt.first_step(zero_grad=True)        # w -> w + e
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)       # w + e -> w, then the base update

    ``state_dict()`` is the base optimizer's (momentum buffers included) with the SAM options in
    its param groups; ``load_state_dict`` restores it, so a resumed run takes the same steps.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        base_optimizer: Callable[..., Optimizer],
        rho: float = 0.05,
        perturbation: str = "sam",
        adaptive: bool = False,
        perturbation_eps: float = 1e-12,
        *,
        foreach: bool | None = None,
        track_stats: bool = False,
        **base_kwargs: Any,
    ) -> None:
        _check_group_options(rho, perturbation, adaptive, perturbation_eps)
        if not callable(base_optimizer):
            raise ValueError(
                f"base_optimizer must be an optimizer class such as torch.optim.SGD, "
                f"got {base_optimizer!r}"
            )
        if foreach not in (None, True, False):
            raise ValueError(f"foreach must be None, True or False, got {foreach!r}")
        defaults = dict(
            rho=rho, perturbation=perturbation, adaptive=adaptive, perturbation_eps=perturbation_eps
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_group_options(
                group["rho"], group["perturbation"], group["adaptive"], group["perturbation_eps"]
            )
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        clash = set(defaults) & set(self.base_optimizer.defaults)
        if clash:
            raise ValueError(
                f"base_optimizer {type(self.base_optimizer).__name__} has its own "
                f"hyperparameter(s) {sorted(clash)}, which SAM's param groups also use; "
                "choose another base optimizer"
            )
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.foreach = foreach
        self.track_stats = track_stats
        self.grad_norm: torch.Tensor | None = None
        self.perturbation_norm: torch.Tensor | None = None
        self.perturbation_cosine: torch.Tensor | None = None
        self._previous_norm: torch.Tensor | None = None
        # (parameters, their saved w, foreach) per bucket between first_step and restore.
        self._perturbed: list[tuple[list[torch.Tensor], list[torch.Tensor], bool]] = []

    # -- the two steps -----------------------------------------------------------------------

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move every parameter with a gradient from w to w + e, saving w exactly.

        Passes over parameter-sized memory, for ``perturbation="aace"`` without ``adaptive`` or
        ``track_stats``: copy w into the saved buffer, then ``w += scale * g`` in one fused pass
        (e is never materialized); :meth:`restore` copies w back. The normalized rules, ASAM and
        ``track_stats`` form e in the gradient's memory first (one pass more; the norms read it
        once more), so with ``zero_grad=False`` they copy g first to leave ``.grad`` untouched.
        ``zero_grad=True`` sets the gradients to None at the end.
        """
        if self._perturbed:
            raise RuntimeError("first_step() called twice without second_step() in between")
        buckets = self._buckets()
        if not buckets:
            return
        rules = {group["perturbation"] for group in self.param_groups}
        needs_norm = self.track_stats or any(_NORMALIZED[r] for r in rules)

        # 1. e starts as g, multiplied by |w| once for ASAM: e = T g. A copy of g only where
        #    e is formed in place and the caller keeps .grad.
        for bucket in buckets:
            grads = bucket["grads"]
            in_place = bucket["adaptive"] or self.track_stats or _NORMALIZED[bucket["perturbation"]]
            bucket["e"] = grads if zero_grad or not in_place else [g.clone() for g in grads]
            if bucket["adaptive"]:
                bucket["scale_w"] = self._abs(bucket["params"], bucket["foreach"])
                self._mul_(bucket["e"], bucket["scale_w"], bucket["foreach"])

        # 2. The global norm ||T g|| (one device tensor, no host sync).
        grad_norm = self._global_norm([b["e"] for b in buckets], buckets) if needs_norm else None

        # 3. scale = sign * rho [/ (||T g|| + eps)]; e = scale * T (T g) in place, unless it
        #    is a plain number that step 4 can apply on the fly.
        for bucket in buckets:
            e, params, fe = bucket["e"], bucket["params"], bucket["foreach"]
            if bucket["adaptive"]:
                self._mul_(e, bucket.pop("scale_w"), fe)
            scale: float | torch.Tensor = _SIGN[bucket["perturbation"]] * bucket["rho"]
            if _NORMALIZED[bucket["perturbation"]]:
                scale = scale / (grad_norm.to(params[0].device) + bucket["eps"])
            if self.track_stats or isinstance(scale, torch.Tensor):
                self._mul_(e, scale, fe)
                scale = 1.0
            bucket["alpha"] = scale

        if self.track_stats:
            self._record_stats(buckets, grad_norm)

        # 4. Save w, then w += alpha * e.
        for bucket in buckets:
            e, params, alpha = bucket["e"], bucket["params"], bucket["alpha"]
            saved = [self._saved(p) for p in params]
            if bucket["foreach"]:
                torch._foreach_copy_(saved, params)
                torch._foreach_add_(params, e, alpha=alpha)
            else:
                for w, s, d in zip(params, saved, e):
                    s.copy_(w)
                    w.add_(d, alpha=alpha)
            self._perturbed.append((params, saved, bucket["foreach"]))
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore w bit-for-bit, then step the base optimizer with the gradient at w + e."""
        self.restore()
        self.base_optimizer.step()
        # LR schedulers watch for a call of ``step``; a first/second_step loop counts as one.
        self._opt_called = True
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def plain_step(self, zero_grad: bool = False) -> None:
        """A step without perturbation: the base optimizer's step on the gradient at w, for the
        steps that a schedule (:class:`aace.schedule.SAMSchedule`) makes plain steps. The
        previous perturbation, for ``perturbation_cosine``, stays that of the last SAM step."""
        if self._perturbed:
            raise RuntimeError(
                "plain_step() called between first_step() and second_step(); "
                "call restore() first to abandon the SAM step"
            )
        self.base_optimizer.step()
        self._opt_called = True
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def restore(self) -> None:
        """Undo ``first_step`` (w + e -> w, bit for bit: a copy of the saved w, not w + e - e)
        without updating: for skipping a step whose second-pass gradient is not finite, as
        ``GradScaler`` does. A no-op when no ``first_step`` is pending."""
        for params, saved, foreach in self._perturbed:
            if foreach:
                torch._foreach_copy_(params, saved)
            else:
                for w, s in zip(params, saved):
                    w.copy_(s)
        self._perturbed.clear()

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:  # type: ignore[override]
        """One SAM step. ``.grad`` must already hold the first-pass gradient; ``closure`` must
        zero nothing, recompute the update loss at the perturbed weights, call ``backward()``
        and return the loss, which ``step`` returns."""
        if closure is None:
            raise ValueError(
                "SAM.step needs a closure that runs the second forward-backward pass and "
                "returns its loss, e.g. opt.step(lambda: loss_fn(model(x), y).backward() or ...);"
                " or call first_step() and second_step() yourself"
            )
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        return loss

    def reset_stats(self) -> None:
        """Forget the previous perturbation, so the next ``perturbation_cosine`` is undefined
        (NaN). Call at an epoch boundary to make per-epoch statistics independent of the last."""
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p].pop("previous_e", None)
        self.perturbation_cosine = None
        self._previous_norm = None

    # -- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state (momentum buffers, ...) and the shared param groups; with
        ``track_stats``, also the previous perturbation (under ``"sam_stats"``, until
        :meth:`reset_stats`), so that a run resumed mid-epoch computes the same cosine."""
        state = self.base_optimizer.state_dict()
        params = [p for group in self.param_groups for p in group["params"]]
        previous = {i: self.state[p]["previous_e"] for i, p in enumerate(params)
                    if "previous_e" in self.state[p]}  # fmt: skip
        if previous and self._previous_norm is not None:
            state["sam_stats"] = {"previous_e": previous, "previous_norm": self._previous_norm}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        stats = state_dict.pop("sam_stats", None)
        self.base_optimizer.load_state_dict(state_dict)
        self.reset_stats()
        if stats is not None:
            params = [p for group in self.base_optimizer.param_groups for p in group["params"]]
            for i, previous in stats["previous_e"].items():
                self.state[params[i]]["previous_e"] = previous.to(params[i], copy=True)
            self._previous_norm = stats["previous_norm"].to(params[0].device)
        # The base optimizer rebuilt its group dicts; share them again.
        self.param_groups = self.base_optimizer.param_groups
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def __repr__(self) -> str:
        return f"SAM({self.base_optimizer!r})"

    # -- helpers -----------------------------------------------------------------------------

    def _buckets(self) -> list[dict[str, Any]]:
        """Parameters with a gradient, split by group and by (device, dtype), so each foreach
        call is uniform."""
        buckets = []
        for group in self.param_groups:
            by_key: dict[tuple[torch.device, torch.dtype], tuple[list, list]] = {}
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError("SAM does not support sparse gradients")
                params, grads = by_key.setdefault((p.device, p.dtype), ([], []))
                params.append(p)
                grads.append(g)
            for (device, _), (params, grads) in by_key.items():
                foreach = self.foreach
                if foreach is None:
                    foreach = device.type in _FOREACH_DEVICES
                buckets.append(
                    dict(
                        params=params,
                        grads=grads,
                        foreach=foreach,
                        rho=group["rho"],
                        perturbation=group["perturbation"],
                        adaptive=group["adaptive"],
                        eps=group["perturbation_eps"],
                    )
                )
        return buckets

    def _saved(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        saved = state.get("saved_w")
        if saved is None:
            saved = state["saved_w"] = torch.empty_like(p, memory_format=torch.preserve_format)
        return saved

    @staticmethod
    def _abs(tensors: list[torch.Tensor], foreach: bool) -> list[torch.Tensor]:
        return torch._foreach_abs(tensors) if foreach else [t.abs() for t in tensors]

    @staticmethod
    def _mul_(
        tensors: list[torch.Tensor], other: float | torch.Tensor | list[torch.Tensor], foreach: bool
    ) -> None:
        if foreach:
            torch._foreach_mul_(tensors, other)
        elif isinstance(other, list):
            for t, o in zip(tensors, other):
                t.mul_(o)
        else:
            for t in tensors:
                t.mul_(other)

    @staticmethod
    def _norms(tensors: list[torch.Tensor], foreach: bool) -> list[torch.Tensor]:
        if foreach:
            return list(torch._foreach_norm(tensors))
        return [torch.linalg.vector_norm(t) for t in tensors]

    def _global_norm(
        self, tensor_lists: list[list[torch.Tensor]], buckets: list[dict[str, Any]]
    ) -> torch.Tensor:
        """L2 norm over all tensors of all buckets, accumulated in float32 (or float64) on the
        first bucket's device: the norm of the per-tensor norms, stacked once per bucket."""
        device = buckets[0]["params"][0].device
        per_bucket = []
        for tensors, bucket in zip(tensor_lists, buckets):
            norms = torch.stack(self._norms(tensors, bucket["foreach"]))
            per_bucket.append(
                norms.to(device=device, dtype=torch.promote_types(norms.dtype, torch.float32))
            )
        dtype = (
            torch.float64 if any(n.dtype == torch.float64 for n in per_bucket) else torch.float32
        )
        return torch.linalg.vector_norm(torch.cat([n.to(dtype) for n in per_bucket]))

    def _record_stats(self, buckets: list[dict[str, Any]], grad_norm: torch.Tensor) -> None:
        """grad_norm = ||T g||, perturbation_norm = ||e||, cosine(e, previous e).

        The dot product comes from norms, e . p = (||e||^2 + ||p||^2 - ||p - e||^2) / 2 with p
        the previous e (whose norm is kept), so that it costs two fused passes per bucket
        (p -= e in place, its norm) instead of a kernel and a transfer per parameter; then e is
        copied into p. Evaluated in float64 from the norms: accurate to about the norms' own
        rounding divided by 1 - cosine.
        """
        perturbation_norm = self._global_norm([b["e"] for b in buckets], buckets)
        device = perturbation_norm.device
        have_previous = self._previous_norm is not None
        previous_lists = []
        for bucket in buckets:
            previous = []
            for p in bucket["params"]:
                state = self.state[p]
                if "previous_e" not in state:
                    have_previous = False
                    state["previous_e"] = torch.empty_like(p)
                previous.append(state["previous_e"])
            previous_lists.append(previous)
        if have_previous:
            for previous, bucket in zip(previous_lists, buckets):
                if bucket["foreach"]:
                    torch._foreach_sub_(previous, bucket["e"])
                else:
                    for prev, e in zip(previous, bucket["e"]):
                        prev.sub_(e)
            distance = self._global_norm(previous_lists, buckets).double()
            now, before = perturbation_norm.double(), self._previous_norm.to(device).double()
            cosine = (now * now + before * before - distance * distance) / (2 * now * before)
        else:
            cosine = torch.tensor(float("nan"), device=device, dtype=torch.float64)
        for previous, bucket in zip(previous_lists, buckets):
            if bucket["foreach"]:
                torch._foreach_copy_(previous, bucket["e"])
            else:
                for prev, e in zip(previous, bucket["e"]):
                    prev.copy_(e)
        self.grad_norm = grad_norm
        self.perturbation_norm = perturbation_norm
        self.perturbation_cosine = cosine.to(perturbation_norm.dtype)
        self._previous_norm = perturbation_norm
