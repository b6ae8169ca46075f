"""--base-optimizer sgd|adamw: SAM's update by AdamW against a hand-written reference, resume
keeps Adam's moments, presets unchanged, and the configuration errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aace import aace_loss, bisam_loss
from aace.cli import main
from aace.sam import SAM
from aace.training.build import build_optimizer
from aace.training.checkpoint import load_checkpoint
from aace.training.config import PRESETS, ConfigError, RunConfig, preset
from aace.training.metrics import TIMING_FIELDS
from aace.training.step import TrainStep
from aace.training.trainer import Trainer
from conftest import Killed

LR, BETAS, EPS, WD, RHO = 0.01, (0.8, 0.99), 1e-8, 0.1, 0.3


def _reference_adamw_sam(optimizer: str, w, b, batches):
    """SAM (every rule) around AdamW, written out: the perturbation of Foret et al. / Kwon et al.
    / Ratchatorn & Tanaka, then Loshchilov & Hutter's AdamW with bias correction."""
    params = [w.clone(), b.clone()]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]

    def logits(ps, x):
        return x.flatten(1) @ ps[0].T + ps[1]

    def grads(ps, loss_fn, x, y):
        ps = [p.detach().requires_grad_() for p in ps]
        return torch.autograd.grad(loss_fn(logits(ps, x), y), ps)

    def update_loss(z, y):
        return F.cross_entropy(z, y, label_smoothing=0.1)

    for t, (x, y) in enumerate(batches, start=1):
        if optimizer == "sgd":  # no SAM: plain AdamW
            g = grads(params, update_loss, x, y)
        else:
            uses_aace = optimizer in ("sam-aace", "sam-aace-normalized")
            first_loss = bisam_loss if optimizer == "sam-bisam" else update_loss
            g = grads(params, aace_loss if uses_aace else first_loss, x, y)
            # ASAM's operator (Kwon et al. 2021): |w| + 0.01 on weight matrices, 1 on biases.
            asam = optimizer == "asam"
            scale = [p.abs() + 0.01 if asam and p.ndim > 1 else torch.ones_like(p) for p in params]
            tg = [s * gi for s, gi in zip(scale, g)]
            norm = torch.sqrt(sum((u**2).sum() for u in tg))
            if optimizer == "sam-aace":
                e = [-RHO * s * u for s, u in zip(scale, tg)]
            else:
                sign = -1.0 if optimizer == "sam-aace-normalized" else 1.0
                e = [sign * RHO * s * u / (norm + 1e-12) for s, u in zip(scale, tg)]
            g = grads([p + ei for p, ei in zip(params, e)], update_loss, x, y)
        for i, (p, gi) in enumerate(zip(params, g)):
            p = p * (1 - LR * WD)
            m[i] = BETAS[0] * m[i] + (1 - BETAS[0]) * gi
            v[i] = BETAS[1] * v[i] + (1 - BETAS[1]) * gi**2
            m_hat, v_hat = m[i] / (1 - BETAS[0] ** t), v[i] / (1 - BETAS[1] ** t)
            params[i] = p - LR * m_hat / (v_hat.sqrt() + EPS)
    return params, m, v


@pytest.mark.parametrize(
    "optimizer", ["sgd", "sam", "asam", "sam-aace", "sam-aace-normalized", "sam-bisam"]
)
def test_adamw_update_matches_the_hand_written_reference(optimizer):
    config = RunConfig(
        optimizer=optimizer, base_optimizer="adamw", betas=BETAS, lr=LR, weight_decay=WD,
        rho=RHO, label_smoothing=0.1,
    ).validate()  # fmt: skip
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4)).double()
    w0, b0 = (p.detach().clone() for p in model[1].parameters())
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(8, 3, 2, 2, dtype=torch.float64, generator=g),
         torch.randint(0, 4, (8,), generator=g))
        for _ in range(3)
    ]  # fmt: skip
    opt = build_optimizer(model, config)
    assert isinstance(opt if optimizer == "sgd" else opt.base_optimizer, torch.optim.AdamW)
    step = TrainStep(model, opt, config, torch.device("cpu"))
    for x, y in batches:
        step(x, y)
    expected, m, v = _reference_adamw_sam(optimizer, w0, b0, batches)
    for p, e in zip(model[1].parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-14)
    # The moments live in the state the checkpoint saves (SAM's state_dict is AdamW's).
    state = opt.state_dict()["state"]
    torch.testing.assert_close(state[0]["exp_avg"], m[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(state[1]["exp_avg_sq"], v[1], rtol=1e-12, atol=1e-14)
    assert float(state[0]["step"]) == 3


def test_sam_with_adamw_shares_param_groups_for_schedulers():
    model = nn.Linear(3, 2)
    opt = build_optimizer(model, RunConfig(optimizer="sam", base_optimizer="adamw", lr=0.5))
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    opt._opt_called = True  # as after a step
    scheduler.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)


def test_presets_keep_sgd():
    for name in PRESETS:
        config = RunConfig(**preset(name)).validate()
        assert config.base_optimizer == "sgd"
        opt = build_optimizer(nn.Linear(2, 2), config)
        base = opt.base_optimizer if isinstance(opt, SAM) else opt
        assert type(base) is torch.optim.SGD and base.defaults["momentum"] == config.momentum


def test_resume_keeps_adams_moments(npz_path, tmp_path, interrupt_after):
    def config(out):
        return RunConfig(
            dataset=f"npz:{npz_path}", model="wrn10_1", epochs=2, batch_size=16, lr=1e-3,
            weight_decay=0.05, base_optimizer="adamw", betas=(0.85, 0.99), optimizer="sam-aace",
            schedule="cosine", out=str(out), seed=2,
        )  # fmt: skip

    Trainer(config(tmp_path / "reference"), log=lambda _: None).fit()
    interrupt_after(lambda payload, calls: payload["epoch"] == 1)
    with pytest.raises(Killed):
        Trainer(config(tmp_path / "run"), log=lambda _: None).fit()
    interrupt_after(None)
    middle = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["optimizer"]["state"]
    assert float(middle[0]["step"]) == 3 and middle[0]["exp_avg"].abs().sum() > 0
    Trainer(config(tmp_path / "run"), log=lambda _: None).fit(resume=True)

    final = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    expected = load_checkpoint(tmp_path / "reference" / "checkpoint.pt")
    for key, tensor in expected["model"].items():
        assert torch.equal(final["model"][key], tensor), key
    for index, state in expected["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(final["optimizer"]["state"][index][name], state[name])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    reference = [json.loads(line) for line in (tmp_path / "reference" / "metrics.jsonl").open()]
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rs]  # noqa: E731
    assert strip(rows) == strip(reference)
    # config.json stores betas as a JSON list; the run still resumes (same run, same config).
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["betas"] == [
        0.85,
        0.99,
    ]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--base-optimizer", "adam"], "argument --base-optimizer: invalid choice: 'adam'"),
        (
            ["--betas", "0.9", "0.99"],
            "--betas: got (0.9, 0.99); expected the default (0.9, 0.999) "
            "unless --base-optimizer adamw",
        ),  # fmt: skip
        (
            ["--base-optimizer", "adamw", "--betas", "0.9", "1.5"],
            "--betas: got (0.9, 1.5); expected two numbers in [0, 1)",
        ),  # fmt: skip
        (
            ["--base-optimizer", "adamw", "--nesterov"],
            "--nesterov: got True; expected False unless --base-optimizer sgd",
        ),  # fmt: skip
        (["--betas", "0.9"], "argument --betas: expected 2 arguments"),
        (
            ["--base-optimizer", "adamw", "--momentum", "0.8"],
            "--momentum: got 0.8; it is SGD's, not adamw's",
        ),  # fmt: skip
    ],
)
def test_bad_base_optimizer_flags(argv, message, tmp_path, capsys):
    assert main(["train", *argv, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("aace: error:") and message in err and "Traceback" not in err


def test_config_error_is_a_config_error():
    with pytest.raises(ConfigError, match="--base-optimizer: got 'lion'"):
        RunConfig(base_optimizer="lion").validate()
