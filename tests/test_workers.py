"""The torchrun error protocol of :mod:`aace.training.workers`, in one process: the environment
that torchrun sets is set by hand (tests/test_distributed.py runs the real thing)."""

from __future__ import annotations

import signal
import time

import pytest

from aace.training import workers
from aace.training.distributed import on_all_ranks


@pytest.fixture
def torchrun(monkeypatch):
    """Rank 1 of 2 on rank 0's node; SIGTERM's handler is restored afterwards."""
    previous = signal.getsignal(signal.SIGTERM)
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("GROUP_RANK", "0")):
        monkeypatch.setenv(name, value)
    yield monkeypatch
    signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize(
    ("environment", "expected"),
    [({}, (1, 0)), ({"WORLD_SIZE": "4", "RANK": "3"}, (4, 3)), ({"WORLD_SIZE": "x"}, (1, 0))],
)
def test_world_size_and_rank_read_torchrun_s_environment(monkeypatch, environment, expected):
    for name in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert (workers.world_size(), workers.rank()) == expected


def test_without_torchrun_the_error_is_one_line_with_its_status(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    previous = signal.getsignal(signal.SIGTERM)
    assert workers.report_failure(ValueError("x"), "bad --rho", 2, debug=False) == 2
    assert capsys.readouterr().err == "aace: error: bad --rho\n"
    assert signal.getsignal(signal.SIGTERM) is previous  # only torchrun's workers change it


def test_an_error_of_one_rank_names_it_and_ignores_sigterm_afterwards(torchrun, capsys):
    assert workers.report_failure(RuntimeError("x"), "non-finite loss", 3, debug=False) == 3
    assert capsys.readouterr().err == "aace: error: [rank 1] non-finite loss\n"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN


def test_an_error_of_every_rank_is_left_to_rank_zero_on_another_node(torchrun, capsys):
    torchrun.setenv("GROUP_RANK", "1")  # this rank's exit does not stop rank 0
    assert workers.report_failure(on_all_ranks(ValueError("x")), "bad", 2, debug=True) == 2
    assert capsys.readouterr().err == ""


def test_on_rank_zero_s_node_a_rank_waits_for_rank_zero_then_reports_itself(torchrun, capsys):
    torchrun.setattr(workers, "RANK_ZERO_GRACE", 0.2)
    started = time.monotonic()
    assert workers.report_failure(on_all_ranks(ValueError("x")), "bad", 2, debug=False) == 2
    assert time.monotonic() - started >= 0.2  # no SIGTERM came: rank 0 did not end
    assert capsys.readouterr().err == "aace: error: [rank 1] bad\n"


def test_a_sigterm_already_received_means_rank_zero_has_ended(torchrun):
    torchrun.setattr(workers, "RANK_ZERO_GRACE", 30.0)
    torchrun.setattr(workers, "deferred_signal", lambda: signal.SIGTERM)
    started = time.monotonic()
    assert workers.await_rank_zero(2) is False
    assert time.monotonic() - started < 5.0


def test_lost_contact_is_a_failed_collective_under_torchrun(torchrun):
    closed = RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [::1]:5")
    assert workers.lost_contact(closed)
    assert not workers.lost_contact(RuntimeError("CUDA out of memory"))
    torchrun.setenv("WORLD_SIZE", "1")
    assert not workers.lost_contact(closed)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (RuntimeError("[a.cc:5] Connection reset by peer. This may indicate\nmore"),
         "Connection reset by peer"),
        (RuntimeError(""), "RuntimeError"),
    ],
)  # fmt: skip
def test_first_line_is_the_gist_of_an_error(error, expected):
    assert workers.first_line(error) == expected
