"""SAMSchedule against hand computations; plain steps inside SAM runs against a reference loop;
schedules through the trainer (metrics, resume), the CLI and DDP."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aace import SAM, aace_loss, frozen_batchnorm_stats
from aace.cli import main
from aace.schedule import SAMSchedule, squared_grad_norm
from aace.training.build import build_optimizer, build_schedule
from aace.training.checkpoint import load_checkpoint
from aace.training.config import ConfigError, RunConfig
from aace.training.metrics import TIMING_FIELDS
from aace.training.step import TrainStep
from aace.training.trainer import Trainer
from conftest import Killed, read_rows, tiny_config

# -- the schedule alone ----------------------------------------------------------------------


def kinds(schedule: SAMSchedule, steps: int) -> list[bool]:
    return [schedule.sam_step() for _ in range(steps)]


def test_every_k_and_start_step_by_hand():
    assert kinds(SAMSchedule(), 4) == [True] * 4
    assert kinds(SAMSchedule(every=3), 8) == [1, 0, 0, 1, 0, 0, 1, 0]
    assert kinds(SAMSchedule(start_step=3), 6) == [0, 0, 0, 1, 1, 1]
    assert kinds(SAMSchedule(every=2, start_step=3), 8) == [0, 0, 0, 1, 0, 1, 0, 1]
    schedule = SAMSchedule(every=5)
    kinds(schedule, 11)
    assert (schedule.steps, schedule.sam_steps) == (11, 3)  # steps 0, 5, 10


def test_adaptive_rule_by_hand():
    # c = 1, d = 0.5. Step 0 is a SAM step. Observations (kind, ||g||^2) and the statistics of
    # that kind afterwards, worked out on paper:
    #   SAM  4:  first SAM value: mu 4, var 0; 4 >= 4 + 0             -> next SAM
    #   SAM  2:  mu 3, var 0.5 * (2 - 3)^2 = 0.5; 2 < 3 + 0.707         -> next plain
    #   plain 10: first plain value: mu 10, var 0; 10 >= 10           -> next SAM
    #   SAM  8:  mu 5.5, var 0.25 + 0.5 * 2.5^2 = 3.375; 8 >= 7.337    -> next SAM
    #   SAM  5:  mu 5.25, var 1.6875 + 0.5 * 0.0625 = 1.71875; 5 < 6.56 -> next plain
    schedule = SAMSchedule(adaptive=1.0, decay=0.5)
    taken = []
    for value in (4.0, 2.0, 10.0, 8.0, 5.0):
        taken.append(schedule.sam_step())
        schedule.observe(torch.tensor(value))
    taken.append(schedule.sam_step())
    assert taken == [True, True, False, True, True, False]
    state = schedule.state_dict()
    assert state["counts"] == [1, 4]
    torch.testing.assert_close(state["mean"], torch.tensor([10.0, 5.25]))
    torch.testing.assert_close(state["var"], torch.tensor([0.0, 1.71875]))


def reference_adaptive(values_by_step, c, d):
    """The adaptive rule in plain Python floats, written from the formulas of aace.schedule."""
    mean, var, count = [0.0, 0.0], [0.0, 0.0], [0, 0]
    sam, taken = True, []
    for value in values_by_step:
        taken.append(sam)
        k = int(sam)
        s = value(sam)
        if count[k] == 0:
            mean[k], var[k] = s, 0.0
        else:
            mean[k] = d * mean[k] + (1 - d) * s
            var[k] = d * var[k] + (1 - d) * (s - mean[k]) ** 2
        count[k] += 1
        sam = s >= mean[k] + c * math.sqrt(var[k])
    return taken


@pytest.mark.parametrize("c", [-0.5, 0.0, 1.0])
def test_adaptive_rule_equals_a_float_reference_on_a_long_sequence(c):
    rng = np.random.default_rng(3)
    # The kinds' values live on different scales (as AACE's and CE's gradients do).
    values = [(float(rng.gamma(2.0, 1.0)), float(rng.gamma(2.0, 10.0))) for _ in range(300)]
    value_fns = [lambda sam, v=v: v[1] if sam else v[0] for v in values]
    expected = reference_adaptive(value_fns, c, 0.9)
    schedule = SAMSchedule(adaptive=c)
    taken = []
    for fn in value_fns:
        sam = schedule.sam_step()
        taken.append(sam)
        schedule.observe(torch.tensor(fn(sam), dtype=torch.float64))
    assert taken == expected
    assert 0.1 < sum(taken) / len(taken) < 0.9  # both kinds occur: the comparison has teeth


def test_non_finite_observation_keeps_the_statistics_and_asks_for_sam():
    schedule = SAMSchedule(adaptive=0.0)
    schedule.sam_step()
    schedule.observe(torch.tensor(3.0))
    schedule.sam_step()
    schedule.observe(torch.tensor(1.0))  # below the mean: next plain
    before = schedule.state_dict()
    assert schedule.sam_step() is False
    schedule.observe(torch.tensor(float("nan")))
    after = schedule.state_dict()
    assert torch.equal(after["mean"], before["mean"]) and torch.equal(after["var"], before["var"])
    assert schedule.sam_step() is True


def test_state_dict_round_trip_takes_the_same_decisions():
    rng = np.random.default_rng(0)
    values = [float(v) for v in rng.gamma(2.0, 1.0, 60)]
    full = SAMSchedule(adaptive=0.0)
    reference = []
    for v in values:
        reference.append(full.sam_step())
        full.observe(torch.tensor(v))
    first = SAMSchedule(adaptive=0.0)
    taken = []
    for v in values[:25]:
        taken.append(first.sam_step())
        first.observe(torch.tensor(v))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = SAMSchedule(adaptive=0.0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for v in values[25:]:
        taken.append(resumed.sam_step())
        resumed.observe(torch.tensor(v))
    assert taken == reference
    step_count = SAMSchedule(every=3)
    kinds(step_count, 7)
    again = SAMSchedule(every=3)
    again.load_state_dict(step_count.state_dict())
    assert kinds(again, 3) == [False, False, True]  # steps 7, 8, 9


def test_squared_grad_norm_equals_the_flat_formula():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model(torch.randn(5, 3)).square().sum().backward()
    flat = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(squared_grad_norm(model.parameters()), flat.dot(flat))
    with pytest.raises(ValueError, match="no parameter has a gradient"):
        squared_grad_norm(nn.Linear(2, 2).parameters())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(every=0), "every must be an integer >= 1, got 0"),
        (dict(every=2.0), "every must be an integer >= 1, got 2.0"),
        (dict(start_step=-1), "start_step must be an integer >= 0, got -1"),
        (dict(adaptive=float("nan")), "adaptive must be a finite number or None, got nan"),
        (dict(adaptive=0.0, every=2), "adaptive=0.0 cannot be combined with every=2"),
        (dict(adaptive=0.0, decay=1.0), "decay must be a number in [0, 1), got 1.0"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SAMSchedule(**kwargs)


def test_observe_needs_a_decided_step():
    schedule = SAMSchedule(adaptive=0.0)
    with pytest.raises(RuntimeError, match="observe\\(\\) must follow sam_step\\(\\)"):
        schedule.observe(torch.tensor(1.0))


# -- plain steps inside a SAM run --------------------------------------------------------------


def test_plain_step_is_the_base_optimizer_step_and_refuses_a_pending_perturbation():
    torch.manual_seed(0)
    model_a = nn.Linear(3, 2)
    model_b = nn.Linear(3, 2)
    model_b.load_state_dict(model_a.state_dict())
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    sam = SAM(model_a.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9)
    sgd = torch.optim.SGD(model_b.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        F.cross_entropy(model_a(x), y).backward()
        sam.plain_step(zero_grad=True)
        F.cross_entropy(model_b(x), y).backward()
        sgd.step()
        sgd.zero_grad()
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)
    F.cross_entropy(model_a(x), y).backward()
    sam.first_step()
    with pytest.raises(RuntimeError, match="plain_step\\(\\) called between"):
        sam.plain_step()


def test_train_step_with_every_2_equals_a_reference_loop_bit_for_bit():
    """Step 0: SAM+AACE (BatchNorm frozen in the second pass); step 1: a plain SGD step
    (BatchNorm statistics updated as by SGD); step 2: SAM+AACE again."""
    from aace.models import create_model

    config = RunConfig(optimizer="sam-aace", rho=0.3, label_smoothing=0.1, lr=0.05, sam_every=2)
    torch.manual_seed(0)
    model_a = create_model("wrn10_1", 4, 3)
    model_b = create_model("wrn10_1", 4, 3)
    model_b.load_state_dict(model_a.state_dict())
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 4, (8,), generator=gen))
               for _ in range(3)]  # fmt: skip
    step = TrainStep(
        model_a, build_optimizer(model_a, config), config, torch.device("cpu"),
        schedule=build_schedule(config, total_steps=3),
    )  # fmt: skip
    taken = [step(x, y).sam_step for x, y in batches]
    assert taken == [True, False, True]
    # track_stats as in the trainer (it forms e explicitly: the same bits as the trainer's).
    opt = SAM(model_b.parameters(), torch.optim.SGD, rho=0.3, perturbation="aace", lr=0.05,
              momentum=0.9, weight_decay=5e-4, track_stats=True)  # fmt: skip
    for i, (x, y) in enumerate(batches):
        if i == 1:
            F.cross_entropy(model_b(x), y, label_smoothing=0.1).backward()
            opt.base_optimizer.step()
            opt.zero_grad(set_to_none=True)
            continue
        aace_loss(model_b(x), y).backward()
        opt.first_step(zero_grad=True)
        with frozen_batchnorm_stats(model_b):
            F.cross_entropy(model_b(x), y, label_smoothing=0.1).backward()
        opt.second_step(zero_grad=True)
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(a, b), name


# -- through the trainer and the CLI -----------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, fractions",
    [
        # 3 steps per epoch, 9 in all.
        (dict(sam_every=2), [2 / 3, 1 / 3, 2 / 3]),  # steps 0, 2 | 4 | 6, 8
        (dict(sam_start=0.5), [0.0, 1 / 3, 1.0]),  # from step ceil(4.5) = 5 on
        (dict(sam_every=2, amp="fp16", accumulate=2), [2 / 3, 1 / 3, 2 / 3]),
    ],
)
def test_sam_step_fraction_and_sam_statistics_over_sam_steps_only(npz_path, tmp_path, overrides,
                                                                   fractions):  # fmt: skip
    out = tmp_path / "run"
    Trainer(tiny_config(npz_path, out, optimizer="sam", **overrides), log=lambda _: None).fit()
    rows = read_rows(out)
    assert [r["sam_step_fraction"] for r in rows] == pytest.approx(fractions)
    for row, fraction in zip(rows, fractions):
        if fraction == 0:
            assert row["grad_norm"] is None and row["perturbation_norm"] is None
        else:
            # SAM's rule makes ||e|| = rho at every SAM step: a mean over all steps would be
            # rho times the fraction.
            assert row["perturbation_norm"] == pytest.approx(0.05, rel=1e-5)


def test_adaptive_run_resumes_mid_epoch_to_the_uninterrupted_result(npz_path, tmp_path,
                                                                    interrupt_after):  # fmt: skip
    # 3 steps per epoch; checkpoints at global steps 2, 3 (epoch end) and 4, where it dies.
    overrides = dict(optimizer="sam-aace", epochs=4, sam_adaptive=0.0, checkpoint_every=2)
    reference = tmp_path / "reference"
    Trainer(tiny_config(npz_path, reference, **overrides), log=lambda _: None).fit()
    fractions = [r["sam_step_fraction"] for r in read_rows(reference)]
    assert 0 < sum(fractions) / len(fractions) < 1  # both kinds of step were taken

    out = tmp_path / "interrupted"
    interrupt_after(3)
    with pytest.raises(Killed):
        Trainer(tiny_config(npz_path, out, **overrides), log=lambda _: None).fit()
    interrupt_after(None)
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    assert (checkpoint["epoch"], checkpoint["step_in_epoch"]) == (1, 1)
    state = checkpoint["sam_schedule"]
    assert state["steps"] == 4 and state["mean"] is not None
    Trainer(tiny_config(npz_path, out, **overrides), log=lambda _: None).fit(resume=True)

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]

    assert strip(read_rows(out)) == strip(read_rows(reference))
    final, expected = (
        load_checkpoint(out / "checkpoint.pt"),
        load_checkpoint(reference / "checkpoint.pt"),
    )
    for key, tensor in expected["model"].items():
        assert torch.equal(final["model"][key], tensor), key
    assert final["sam_schedule"]["steps"] == 12
    assert torch.equal(final["sam_schedule"]["mean"], expected["sam_schedule"]["mean"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--sam-every", "0"], "--sam-every: got 0; expected an integer >= 1"),
        (["--sam-start", "1.0"], "--sam-start: got 1.0; expected a number in [0, 1)"),
        (["--sam-adaptive", "inf"], "--sam-adaptive: got inf; expected a finite number"),
        (["--optimizer", "sgd", "--sam-every", "2"], "--sam-every 2: schedules SAM steps, but"),
        (["--sam-adaptive", "0", "--sam-start", "0.5"], "--sam-adaptive: got 0.0 together with"),
    ],
)
def test_cli_rejects_bad_schedules_in_one_line(flags, message, tmp_path, capsys):
    status = main(["train", "--dataset", "digits", "--out", str(tmp_path / "r"), *flags])
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_cli_flags_reach_the_config(npz_path, tmp_path):
    out = tmp_path / "cli"
    status = main(["train", "--dataset", f"npz:{npz_path}", "--model", "wrn10_1", "--epochs", "1",
                   "--batch-size", "16", "--optimizer", "sam-aace", "--sam-every", "3",
                   "--sam-start", "0.25", "--out", str(out)])  # fmt: skip
    assert status == 0
    config = json.loads((out / "config.json").read_text())["config"]
    assert (config["sam_every"], config["sam_start"], config["sam_adaptive"]) == (3, 0.25, None)
    # 3 steps, start ceil(0.75) = 1: steps 1 (SAM), 2 (plain).
    assert read_rows(out)[0]["sam_step_fraction"] == pytest.approx(1 / 3)


def test_config_refuses_schedules_that_cannot_apply():
    with pytest.raises(ConfigError, match="--sam-start: got -0.1"):
        RunConfig(sam_start=-0.1).validate()
    assert build_schedule(RunConfig(optimizer="sam"), 100) is None  # every step: no schedule
    assert build_schedule(RunConfig(optimizer="sam", sam_start=0.8), 100).start_step == 80


# -- DDP: every rank takes the same kind of step -----------------------------------------------


def _schedule_worker(rank: int, out: Path) -> None:
    from aace.training import step as step_module
    from aace.training.distributed import Distributed, wrap_model
    from test_distributed import WORLD, small_model

    local, observed = [], []
    real_norm, real_observe = step_module.squared_grad_norm, SAMSchedule.observe

    def recording_norm(params):
        value = real_norm(params)
        local.append(value.clone())
        return value

    def recording_observe(self, value):
        observed.append(value.clone())
        real_observe(self, value)

    step_module.squared_grad_norm = recording_norm
    SAMSchedule.observe = recording_observe
    config = RunConfig(optimizer="sam-aace", rho=0.2, lr=0.1, sam_adaptive=0.0, accumulate=2,
                       perturbation_sync="local")  # fmt: skip
    model, ddp = wrap_model(small_model(), Distributed(rank, WORLD), torch.device("cpu"))
    schedule = build_schedule(config, total_steps=10)
    step = TrainStep(ddp, build_optimizer(model, config), config, torch.device("cpu"), ddp=ddp,
                     schedule=schedule)  # fmt: skip
    gen = torch.Generator().manual_seed(4)
    taken = []
    for _ in range(10):
        x = torch.randn(WORLD * 4, 3, 6, 6, dtype=torch.float64, generator=gen)
        y = torch.randint(0, 4, (WORLD * 4,), generator=gen)
        taken.append(step(x[rank * 4 : (rank + 1) * 4], y[rank * 4 : (rank + 1) * 4]).sam_step)
    torch.save(
        dict(model=model.state_dict(), taken=taken, local=local, observed=observed,
             schedule=schedule.state_dict()),
        out / f"rank{rank}.pt",
    )  # fmt: skip


def test_adaptive_rule_under_ddp_with_local_perturbation_agrees_across_ranks(tmp_path):
    from test_distributed import WORLD, spawn

    spawn(_schedule_worker, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    assert r0["taken"] == r1["taken"] and True in r0["taken"] and False in r0["taken"]
    for key, tensor in r0["model"].items():
        assert torch.equal(tensor, r1["model"][key]), key
    for name in ("mean", "var", "next_sam"):
        assert torch.equal(r0["schedule"][name], r1["schedule"][name]), name
    # The statistic is the max over ranks of each rank's own ||g||^2 ...
    for a, b, seen0, seen1 in zip(r0["local"], r1["local"], r0["observed"], r1["observed"]):
        assert torch.equal(seen0, torch.maximum(a, b)) and torch.equal(seen0, seen1)
    # ... which differ on the SAM steps, whose perturbation pass is not all-reduced.
    sam_steps = [i for i, sam in enumerate(r0["taken"]) if sam]
    assert all(not torch.equal(r0["local"][i], r1["local"][i]) for i in sam_steps)
    plain_steps = [i for i, sam in enumerate(r0["taken"]) if not sam]
    assert all(torch.equal(r0["local"][i], r1["local"][i]) for i in plain_steps)


@pytest.mark.parametrize("overrides", [dict(sam_every=2), dict(sam_start=0.5)])
def test_step_count_rules_add_no_host_sync_to_the_step(overrides, monkeypatch):
    """Reading a tensor on the host (bool, item, tolist) is refused during the steps: the step
    itself has none without --nonfinite skip and fp16, and the step-count rules add none. The
    adaptive rule's one read per step is caught, as documented."""
    from aace.models import create_model

    def refuse(*args, **kwargs):
        raise AssertionError("host sync in the training step")

    def run(config):
        torch.manual_seed(0)
        model = create_model("wrn10_1", 4, 3)
        step = TrainStep(model, build_optimizer(model, config), config, torch.device("cpu"),
                         schedule=build_schedule(config, total_steps=4))  # fmt: skip
        x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
        with monkeypatch.context() as patch:
            for name in ("__bool__", "item", "tolist"):
                patch.setattr(torch.Tensor, name, refuse)
            return [step(x, y).sam_step for _ in range(4)]

    taken = run(RunConfig(optimizer="sam-aace", **overrides))
    assert True in taken and False in taken
    with pytest.raises(AssertionError, match="host sync"):
        run(RunConfig(optimizer="sam-aace", sam_adaptive=0.0))
