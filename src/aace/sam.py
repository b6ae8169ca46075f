"""The SAM optimizer family: SAM, ASAM and SAM with the AACE perturbation.

Sharpness-Aware Minimization (Foret et al., ICLR 2021) takes two gradients per step. The first,
g, taken at w, defines a perturbation e; the second is taken at w + e and fed to a base
optimizer, which updates w. The perturbation rules:

    "sam"               e =  rho T^2 g / (||T g|| + eps),   g = grad CE
    "aace"              e = -rho T^2 g,                     g = grad AACE
    "aace-normalized"   e = -rho T^2 g / (||T g|| + eps),   g = grad AACE

CE is the cross-entropy, AACE the perturbation loss of Ratchatorn & Tanaka (ICIP 2024), whose
rule perturbs without normalization. T is the identity, or with ``adaptive=True`` ASAM's
normalization operator (Kwon et al., ICML 2021, Sec. 3, and their code SamsungLabs/ASAM):
T = diag(|w| + eta) on weight tensors (ndim > 1: convolution kernels, linear and embedding
matrices) and T = 1 on the others (biases and normalization parameters). The norm is the global
L2 norm over every perturbed parameter: those with a gradient in groups with rho > 0. AACE's
perturbation descends its loss, because AACE is minimized by moving probability away from the
true class; that is why its sign is the opposite of SAM's.

Which loss produced g is the caller's choice: this optimizer only reads ``.grad``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["PERTURBATIONS", "SAM"]

PERTURBATIONS = ("sam", "aace", "aace-normalized")
"""The perturbation rules of :class:`SAM`, the values of its ``perturbation`` argument."""
_NORMALIZED = {"sam": True, "aace": False, "aace-normalized": True}
_SIGN = {"sam": 1.0, "aace": -1.0, "aace-normalized": -1.0}
_FOREACH_DEVICES = ("cpu", "cuda", "mps", "xpu")
_GROUP_OPTIONS = (
    "rho",
    "perturbation",
    "adaptive",
    "adaptive_eta",
    "perturbation_eps",
    "perturbation_weight_decay",
)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_group_options(
    rho: Any,
    perturbation: Any,
    adaptive: Any,
    adaptive_eta: Any,
    perturbation_eps: Any,
    perturbation_weight_decay: Any,
) -> None:
    if not _is_number(rho) or not rho >= 0.0 or rho == float("inf"):
        raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")
    if perturbation not in PERTURBATIONS:
        raise ValueError(
            f"perturbation must be one of {', '.join(PERTURBATIONS)}; got {perturbation!r}"
        )
    if not isinstance(adaptive, bool):
        raise ValueError(f"adaptive must be True or False, got {adaptive!r}")
    if not _is_number(adaptive_eta) or not adaptive_eta >= 0.0 or adaptive_eta == float("inf"):
        raise ValueError(f"adaptive_eta must be a finite number >= 0, got {adaptive_eta!r}")
    if (
        not _is_number(perturbation_eps)
        or not perturbation_eps >= 0.0
        or perturbation_eps == float("inf")
    ):
        raise ValueError(f"perturbation_eps must be a finite number >= 0, got {perturbation_eps!r}")
    if (
        not _is_number(perturbation_weight_decay)
        or not perturbation_weight_decay >= 0.0
        or perturbation_weight_decay == float("inf")
    ):
        raise ValueError(
            "perturbation_weight_decay must be a finite number >= 0, "
            f"got {perturbation_weight_decay!r}"
        )


class SAM(Optimizer):
    """Sharpness-Aware Minimization around any base optimizer.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim.Optimizer``.
        base_optimizer: the optimizer class (or factory) that makes the update, e.g.
            ``torch.optim.SGD``. It is built on the same ``param_groups``, so learning-rate
            schedulers attached to either object act on both.
        rho: perturbation radius, >= 0 (per-group overridable). A group with ``rho=0`` is
            not perturbed and is left out of the norm (see *Parameter groups*).
        perturbation: "sam", "aace" or "aace-normalized" (per-group overridable).
        adaptive: ASAM's normalization operator T (per-group overridable): the perturbation of
            a weight tensor (ndim > 1) is scaled by ``(|w| + adaptive_eta)`` elementwise before
            and after the norm; biases and normalization parameters (ndim <= 1) are not scaled
            (T = 1), as in Kwon et al., ICML 2021 (Sec. 3, "T_w = diag(|w|) + eta I for
            weights, T = I for biases") and their code (SamsungLabs/ASAM, ``rho=0.5``,
            ``eta=0.01``), whose recommended radius (0.5 on CIFAR-10, 1.0 on CIFAR-100)
            belongs to this operator. One difference with their code, which tells weights by
            the name (``"weight" in name``): it also scales the normalization layers' scale
            gamma (BatchNorm's and LayerNorm's ``weight``, ndim 1), which here gets T = 1 like
            the bias next to it. The rule is read from the tensor because an optimizer holds
            tensors, not names, and names differ between libraries for the same role (timm's
            LayerScale ``gamma`` and ViT's ``pos_embed`` hold no "weight", torchvision's BatchNorm
            gamma does), so a rule by name would perturb one architecture differently depending
            on who wrote it; ndim > 1 is the paper's split of weights from biases and
            normalization parameters for every model. The difference is small: about 2 % in
            ||e|| on a small BatchNorm network (``test_asam_perturbs_zero_biases_by_the_papers_
            formula`` pins T = 1 for gamma). A parameter of ndim > 1 that should not be scaled
            can go into a group of its own with ``adaptive=False``.
        adaptive_eta: ASAM's eta, >= 0 (per-group overridable); with 0, an entry that is exactly
            zero is never perturbed.
        perturbation_eps: added to the gradient norm of the normalized rules, >= 0. Whatever
            its value, a zero gradient gives a zero perturbation (never 0/0).
        perturbation_weight_decay: lambda >= 0 (per-group overridable; default 0, the
            perturbation of davda54/sam and SamsungLabs/ASAM). With lambda > 0 the perturbation
            follows the gradient of the regularized loss, L + lambda/2 ||w||^2, as in
            google-research/sam (``sam_jax/training_utils/flax_training.py``: the first
            gradient is that of CE + l2_reg/2 sum ||w||^2): g is replaced by g + lambda w for
            "sam", and by g - lambda w for the AACE rules, whose e descends their loss, so that
            every rule's e ascends the regularizer. Set it to the base optimizer's
            ``weight_decay`` to reproduce that code's direction; the update is unchanged (the
            base optimizer decays at w, where the reference decays at w + e: a difference of
            lambda e in the update direction).
        foreach: ``None`` picks the vectorized ``torch._foreach_*`` path for CPU/CUDA/MPS/XPU
            tensors; ``True``/``False`` force it on or off.
        track_stats: after each ``first_step``, keep ``grad_norm`` (||T g||),
            ``perturbation_norm`` (||e||) and ``perturbation_cosine`` (cosine between this and
            the previous perturbation; one more parameter-sized buffer) as 0-dim float32 (float64
            for float64 parameters) tensors, for logging without a host sync. Statistics never
            change the step: the perturbed weights are the same bit for bit with and without.
        **base_kwargs: passed to ``base_optimizer`` (lr, momentum, weight_decay, ...).

    Raises:
        ValueError: an option out of range (the message names it, its value and what is
            allowed), or a base optimizer whose hyperparameters clash with SAM's names.

    Usage, with the loss of the first pass chosen by the caller::

        loss_fn(model(x), y).backward()       # CE for "sam", AACE for "aace"
        opt.first_step(zero_grad=True)        # w -> w + e
        F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)       # w + e -> w, then the base update

    **No gradient, no SAM step.** ``first_step`` raises a ``RuntimeError`` when no parameter has
    a gradient (``.grad`` is None everywhere): a step without a first-pass gradient would be
    silently the base optimizer's plain step. A gradient of zeros is a gradient: it gives
    e = 0. ``step(closure)`` follows the contract described there.

    **Parameter groups.** Each group may set its own ``rho``, ``perturbation``, ``adaptive``,
    ``adaptive_eta``, ``perturbation_eps`` and ``perturbation_weight_decay``. Groups with
    ``rho=0`` are not perturbed and do not count in the norm, so perturbing only some layers
    (e.g. only the normalization layers, SAM-ON, Mueller et al., NeurIPS 2023) gives
    ||e|| = rho over what is perturbed. The norm
    ||T g|| is one global norm over every perturbed parameter (groups with rho > 0), and each
    group scales its part by its own rho: e_G = rho_G T^2 g_G / ||T g||, so groups with
    different non-zero radii share one direction's normalization and ||e|| lies between the
    smallest and the largest radius.

    **Precision.** Norms (per tensor and global) are accumulated in float32, or float64 for
    float64 parameters, also for float16 and bfloat16 parameters, whose own range would
    overflow (float16's largest value is 65,504).

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
        adaptive_eta: float = 0.01,
        perturbation_weight_decay: float = 0.0,
        foreach: bool | None = None,
        track_stats: bool = False,
        **base_kwargs: Any,
    ) -> None:
        _check_group_options(
            rho, perturbation, adaptive, adaptive_eta, perturbation_eps, perturbation_weight_decay
        )
        if not callable(base_optimizer):
            # An instance (SAM(params, SGD(params, lr=0.1))) would print its whole repr.
            given = repr(base_optimizer)
            if isinstance(base_optimizer, Optimizer):
                given = f"an instance of {type(base_optimizer).__name__}"
            raise ValueError(
                f"base_optimizer must be an optimizer class such as torch.optim.SGD, got "
                f"{given}; pass the class and its hyperparameters: SAM(params, torch.optim.SGD, "
                "lr=0.1, momentum=0.9)"
            )
        if foreach not in (None, True, False):
            raise ValueError(f"foreach must be None, True or False, got {foreach!r}")
        defaults = dict(
            rho=rho,
            perturbation=perturbation,
            adaptive=adaptive,
            adaptive_eta=adaptive_eta,
            perturbation_eps=perturbation_eps,
            perturbation_weight_decay=perturbation_weight_decay,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_group_options(*(group[key] for key in _GROUP_OPTIONS))
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
        # Per group: (which parameters had a gradient, their buckets), reused while it holds.
        self._layouts: dict[int, tuple[Any, list[dict[str, Any]]]] = {}
        # Set by aace.amp.unscale_ (perturbation pass): a check that raises before first_step
        # moves anything if the gradients were unscaled twice. Called once, then cleared.
        self._before_first_step: Callable[[], None] | None = None

    # -- the two steps -----------------------------------------------------------------------

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move every perturbed parameter from w to w + e, saving w exactly.

        The perturbed parameters are those with a gradient in groups with rho > 0. Passes over
        parameter-sized memory for ``perturbation="aace"`` without ``adaptive``: copy w into
        the saved buffer, then ``w += -rho * g`` in one fused pass (e is never materialized);
        :meth:`restore` copies w back. The normalized rules and ASAM form e in the gradient's
        memory first (one pass more), so with ``zero_grad=False`` they copy g first to leave
        ``.grad`` untouched. ``zero_grad=True`` sets the gradients to None at the end.

        Raises:
            RuntimeError: no parameter has a gradient (nothing was backpropagated, so there
                is no first-pass gradient to perturb with), or ``first_step`` is pending.
            ValueError: the gradients were unscaled twice (:mod:`aace.amp`), before any
                weight moved.
        """
        if self._perturbed:
            raise RuntimeError("first_step() called twice without second_step() in between")
        check, self._before_first_step = self._before_first_step, None
        if check is not None:
            check()
        buckets, any_grad = self._buckets()
        if not any_grad:
            raise RuntimeError(
                "SAM.first_step() found no gradient in any parameter's .grad, so there is no "
                "first-pass gradient to perturb with; backpropagate the perturbation loss first "
                "(F.cross_entropy for perturbation='sam', aace_loss for 'aace'), e.g. "
                "loss_fn(model(x), y).backward(); opt.first_step(zero_grad=True)"
            )
        if buckets:
            self._perturb(buckets, zero_grad)
        if zero_grad:
            self.zero_grad(set_to_none=True)

    def _perturb(self, buckets: list[dict[str, Any]], zero_grad: bool) -> None:
        needs_norm = self.track_stats or any(b["normalized"] for b in buckets)

        # 1. d starts as g (a copy where d is changed in place and the caller keeps .grad),
        #    plus sign * lambda * w with a perturbation weight decay, times T once for ASAM's
        #    scaled tensors: d = T g.
        directions, operators = [], []
        for bucket in buckets:
            grads, fe = bucket["grads"], bucket["foreach"]
            decay = bucket["weight_decay"]
            in_place = bucket["scaled"] or bucket["normalized"] or decay != 0
            d = grads if zero_grad or not in_place else [g.clone() for g in grads]
            if decay != 0:
                self._add_scaled_(d, bucket["params"], _SIGN[bucket["perturbation"]] * decay, fe)
            operator = None
            if bucket["scaled"]:
                operator = self._abs(bucket["params"], fe)
                self._add_(operator, bucket["eta"], fe)
                self._mul_(d, operator, fe)
            directions.append(d)
            operators.append(operator)

        # 2. The global norm ||T g|| (one device tensor, no host sync).
        grad_norm = self._global_norm(directions, buckets) if needs_norm else None

        # 3. d = T^2 g; alpha = sign * rho [/ (||T g|| + eps)]. A tensor alpha (normalized
        #    rules) is applied to d in place, so that step 5 always adds a plain number times d.
        alphas: list[float] = []
        for bucket, d, operator in zip(buckets, directions, operators):
            fe = bucket["foreach"]
            if operator is not None:
                self._mul_(d, operator, fe)
            alpha = _SIGN[bucket["perturbation"]] * bucket["rho"]
            if bucket["normalized"]:
                self._mul_(d, self._normalizer(alpha, grad_norm, bucket), fe)
                alpha = 1.0
            alphas.append(alpha)

        if self.track_stats:
            self._record_stats(buckets, directions, alphas, grad_norm)

        # 4-5. Save w, then w += alpha * d: the same operation with or without statistics.
        for bucket, d, alpha in zip(buckets, directions, alphas):
            params, saved, fe = bucket["params"], bucket["saved"], bucket["foreach"]
            if fe:
                torch._foreach_copy_(saved, params)
                torch._foreach_add_(params, d, alpha=alpha)
            else:
                for w, s, e in zip(params, saved, d):
                    s.copy_(w)
                    w.add_(e, alpha=alpha)
            self._perturbed.append((params, saved, fe))

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
        """One SAM step driven by a closure, for loops that only call ``opt.step(closure)``.

        ``closure`` is the usual one: it zeroes the gradients (or not), computes the update
        loss (cross-entropy) at the current weights, calls ``backward()`` and returns the loss.

        * If some parameter already holds a gradient in ``.grad``, that is the first-pass
          gradient (backpropagate ``aace_loss`` before ``step`` for the AACE rules, the
          cross-entropy for "sam"): ``first_step``, the closure at w + e, ``second_step``.
        * If no parameter has a gradient and every perturbed group's rule is "sam", whose first
          pass is the update loss, the closure is called first at w for the first-pass
          gradient, then as above: a true SAM step, with two calls of the closure.
        * If no parameter has a gradient and a group uses "aace" or "aace-normalized", whose
          first pass is another loss than the closure's, ``ValueError`` says what to do: the
          cross-entropy gradient must never pass for AACE's.

        Returns:
            The closure's loss at the perturbed weights w + e (the loss whose gradient makes
            the update), a 0-dim tensor.

        Raises:
            ValueError: no closure, or no first-pass gradient for an AACE rule.
        """
        if closure is None:
            raise ValueError(
                "SAM.step needs a closure that runs the second forward-backward pass and "
                "returns its loss, e.g. opt.step(lambda: loss_fn(model(x), y).backward() or ...);"
                " or call first_step() and second_step() yourself"
            )
        if not any(p.grad is not None for g in self.param_groups for p in g["params"]):
            rules = sorted({g["perturbation"] for g in self.param_groups if g["rho"] > 0} - {"sam"})
            if rules:
                raise ValueError(
                    f"SAM.step(closure) found no first-pass gradient in .grad, and "
                    f"perturbation={rules[0]!r} perturbs with the gradient of aace_loss, not of "
                    "the closure's loss: call aace_loss(model(x), y).backward() before "
                    "opt.step(closure), or call first_step() and second_step() yourself (under "
                    "Lightning: set self.automatic_optimization = False and call "
                    "aace.integrations.lightning.sam_step)"
                )
            with torch.enable_grad():
                closure()
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
            _check_group_options(*(group[key] for key in _GROUP_OPTIONS))
        self._layouts.clear()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_group_options(*(group[key] for key in _GROUP_OPTIONS))
        base = getattr(self, "base_optimizer", None)
        if base is not None and base.param_groups is not self.param_groups:
            base.add_param_group(group)

    def __repr__(self) -> str:
        return f"SAM({self.base_optimizer!r})"

    # -- helpers -----------------------------------------------------------------------------

    def _buckets(self) -> tuple[list[dict[str, Any]], bool]:
        """(buckets, whether any parameter has a gradient).

        A bucket is a list of parameters of one group with rho > 0 that have a gradient, of
        one device and dtype and, for ASAM, one kind (weights scaled by T or not), so that each
        foreach call is uniform. The split depends only on which parameters of a group have a
        gradient; it is made once and reused while that holds, so that a step costs one pass of
        ``p.grad`` look-ups over the parameters. The group's options are read on every step (a
        scheduler may change rho).
        """
        buckets = []
        any_grad = False
        for index, group in enumerate(self.param_groups):
            params = group["params"]
            grads = [p.grad for p in params]
            present = tuple(g is not None for g in grads)
            if not any_grad and any(present):
                any_grad = True
            rho = group["rho"]
            if rho == 0:
                continue
            adaptive = group["adaptive"]
            key = (present, adaptive, len(params))
            cached = self._layouts.get(index)
            if cached is None or cached[0] != key:
                cached = (key, self._layout(params, grads, adaptive))
                self._layouts[index] = cached
            perturbation = group["perturbation"]
            for layout in cached[1]:
                buckets.append(
                    dict(
                        layout,
                        grads=[grads[i] for i in layout["indices"]],
                        rho=rho,
                        perturbation=perturbation,
                        normalized=_NORMALIZED[perturbation],
                        eps=group["perturbation_eps"],
                        eta=group["adaptive_eta"],
                        weight_decay=group["perturbation_weight_decay"],
                    )
                )
        return buckets, any_grad

    def _layout(
        self, params: list[torch.Tensor], grads: list[torch.Tensor | None], adaptive: bool
    ) -> list[dict[str, Any]]:
        by_key: dict[tuple[torch.device, torch.dtype, bool], list[int]] = {}
        for i, (p, g) in enumerate(zip(params, grads)):
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError("SAM does not support sparse gradients")
            by_key.setdefault((p.device, p.dtype, adaptive and p.ndim > 1), []).append(i)
        layouts = []
        for (device, _, scaled), indices in by_key.items():
            foreach = self.foreach
            if foreach is None:
                foreach = device.type in _FOREACH_DEVICES
            bucket_params = [params[i] for i in indices]
            layouts.append(
                dict(
                    indices=indices,
                    params=bucket_params,
                    saved=[self._saved(p) for p in bucket_params],
                    foreach=foreach,
                    scaled=scaled,
                )
            )
        return layouts

    def _saved(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        saved = state.get("saved_w")
        if saved is None or saved.shape != p.shape or saved.dtype != p.dtype:
            saved = state["saved_w"] = torch.empty_like(p, memory_format=torch.preserve_format)
        return saved

    @staticmethod
    def _normalizer(alpha: float, grad_norm: torch.Tensor, bucket: dict[str, Any]) -> torch.Tensor:
        """alpha / (||T g|| + eps) on the bucket's device, and 0 where that is not a finite
        number: a zero gradient (with eps = 0) gives e = 0, never 0 * inf = NaN. A norm so small
        that alpha over it overflows (below |alpha| / 3.4e38 in float32) counts as zero too."""
        norm = grad_norm.to(bucket["params"][0].device) + bucket["eps"]
        largest = torch.finfo(norm.dtype).max
        return torch.where(norm * largest > abs(alpha), alpha / norm, torch.zeros_like(norm))

    @staticmethod
    def _abs(tensors: list[torch.Tensor], foreach: bool) -> list[torch.Tensor]:
        return torch._foreach_abs(tensors) if foreach else [t.abs() for t in tensors]

    @staticmethod
    def _add_(tensors: list[torch.Tensor], value: float, foreach: bool) -> None:
        if value == 0:
            return
        if foreach:
            torch._foreach_add_(tensors, value)
        else:
            for t in tensors:
                t.add_(value)

    @staticmethod
    def _add_scaled_(
        tensors: list[torch.Tensor], others: list[torch.Tensor], alpha: float, foreach: bool
    ) -> None:
        if foreach:
            torch._foreach_add_(tensors, others, alpha=alpha)
        else:
            for t, o in zip(tensors, others):
                t.add_(o, alpha=alpha)

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
    def _norms(tensors: list[torch.Tensor], foreach: bool) -> torch.Tensor:
        """The L2 norm of each tensor, computed and returned in float32 (float64 for float64
        tensors), stacked: a float16 tensor's norm may exceed float16's range."""
        dtype = torch.promote_types(tensors[0].dtype, torch.float32)
        if foreach:
            return torch.stack(torch._foreach_norm(tensors, 2, dtype=dtype))
        return torch.stack([torch.linalg.vector_norm(t, dtype=dtype) for t in tensors])

    def _global_norm(
        self,
        tensor_lists: list[list[torch.Tensor]],
        buckets: list[dict[str, Any]],
        scales: list[float] | None = None,
    ) -> torch.Tensor:
        """sqrt(sum over buckets b of (|scales[b]| * ||tensor_lists[b]||)^2), accumulated in
        float32 (float64 if any bucket is float64) on the first bucket's device."""
        device = buckets[0]["params"][0].device
        per_bucket = [
            self._norms(tensors, bucket["foreach"]).to(device)
            for tensors, bucket in zip(tensor_lists, buckets)
        ]
        dtype = torch.float64 if any(n.dtype == torch.float64 for n in per_bucket) else None
        if dtype is not None:
            per_bucket = [n.to(dtype) for n in per_bucket]
        if scales is not None:
            per_bucket = [n * abs(s) if s != 1 else n for n, s in zip(per_bucket, scales)]
        return torch.linalg.vector_norm(torch.cat(per_bucket))

    def _record_stats(
        self,
        buckets: list[dict[str, Any]],
        directions: list[list[torch.Tensor]],
        alphas: list[float],
        grad_norm: torch.Tensor,
    ) -> None:
        """grad_norm = ||T g||, perturbation_norm = ||e||, cosine(e, previous e), with
        e = alpha * d per bucket, read without forming e in the weights' path.

        The dot product comes from norms, e . p = (||e||^2 + ||p||^2 - ||p - e||^2) / 2 with p
        the previous e (whose norm is kept), so that it costs two fused passes per bucket
        (p -= alpha * d in place, its norm) instead of a kernel and a transfer per parameter;
        then e is written into p. Evaluated in float64 from the norms: accurate to about the
        norms' own rounding divided by 1 - cosine.
        """
        perturbation_norm = self._global_norm(directions, buckets, alphas)
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
            for previous, d, alpha, bucket in zip(previous_lists, directions, alphas, buckets):
                if bucket["foreach"]:
                    torch._foreach_add_(previous, d, alpha=-alpha)
                else:
                    for prev, e in zip(previous, d):
                        prev.add_(e, alpha=-alpha)
            distance = self._global_norm(previous_lists, buckets).double()
            now, before = perturbation_norm.double(), self._previous_norm.to(device).double()
            cosine = (now * now + before * before - distance * distance) / (2 * now * before)
        else:
            cosine = torch.tensor(float("nan"), device=device, dtype=torch.float64)
        for previous, d, alpha, bucket in zip(previous_lists, directions, alphas, buckets):
            fe = bucket["foreach"]
            if fe:
                torch._foreach_copy_(previous, d)
            else:
                for prev, e in zip(previous, d):
                    prev.copy_(e)
            if alpha != 1:
                self._mul_(previous, alpha, fe)
        self.grad_norm = grad_norm
        self.perturbation_norm = perturbation_norm
        self.perturbation_cosine = cosine.to(perturbation_norm.dtype)
        self._previous_norm = perturbation_norm
