"""The run directory of ``aace train`` as a type: its file names, spelled once, and every read
and write of them.

A run directory holds

* ``config.json``: ``{"config": {...}, "resolved_rho": ..., "aace_version": ..., ...}``, the
  resolved :class:`~aace.training.config.RunConfig` as a dict, the perturbation radius the run
  used (``None`` without a perturbation), and the versions and machine it ran on;
* ``metrics.jsonl``: one JSON object per finished epoch (NaN and inf stored as ``null``);
* ``checkpoint.pt``: the latest state (:mod:`aace.training.checkpoint`);
* ``best.pt``: with a validation split, the model of the selected epoch (:func:`selected_row`);
* ``summary.json``: written when the run ends; its presence means *finished*;
* ``sharpness.json``: written by ``aace sharpness``, read by ``aace compare``.

This module knows the format only: it never imports :mod:`aace.training` (``aace.report``
reads runs through it), and configurations are the plain dicts of ``config.json``. Every write
is atomic (:func:`atomic_write`): at each instant a complete file exists. Errors are
:class:`RunError`, a ``ValueError`` whose message names the path.

Typical use::

    run = RunDirectory("runs/demo/sam-s0")
    if run.finished:
        print(run.read_summary()["final_test_acc"])
    rows = run.read_rows()
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

__all__ = [
    "BEST", "CHECKPOINT", "CONFIG", "LEGACY_DEFAULT_RHO", "METRICS", "SHARPNESS", "SUMMARY",
    "RunDirectory", "RunError", "atomic_write", "atomic_write_json", "atomic_write_text",
    "config_differences", "describe_differences", "find_runs", "json_safe", "resolved_rho",
    "selected_row",
]  # fmt: skip

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
SUMMARY = "summary.json"
SHARPNESS = "sharpness.json"

# The rho of a run whose config.json predates "resolved_rho" (aace 0.1.0 wrote only the
# "rho" field, None for the optimizer's default): the defaults of those versions. Frozen:
# a later change of a default does not change what those runs used.
LEGACY_DEFAULT_RHO: dict[str, float | None] = {
    "sgd": None,
    "sam": 0.05,
    "sam-aace": 0.2,
    "sam-aace-normalized": 0.05,
    "asam": 0.5,
    "sam-bisam": 0.05,
}


class RunError(ValueError):
    """A run directory that cannot be used as asked; the message names the path."""


# -- atomic files ------------------------------------------------------------------------------


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not possible on some platforms (Windows); the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(file_object)`` on a temporary file in the same directory, flush and fsync
    it, then rename it over ``path`` (``os.replace`` is atomic on POSIX and Windows) and fsync
    the directory entry."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: str | os.PathLike, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")


# -- rows ----------------------------------------------------------------------------------------


def json_safe(row: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN/inf: they are stored as null."""
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()
    }


def selected_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The row of the epoch a validation split selects: the highest ``val_acc``, the earliest
    of equals (the model a user would keep, saved as ``best.pt``). None without a validation
    split or rows."""
    scored = [r for r in rows if r.get("val_acc") is not None]
    return max(scored, key=lambda r: r["val_acc"]) if scored else None  # max keeps the first


def config_differences(
    saved: dict[str, Any], current: dict[str, Any], ignore: Iterable[str] = ()
) -> list[str]:
    """Names of the configuration fields whose values differ, compared as JSON stores them
    (a tuple equals the list it is written as); a field missing on one side differs."""
    a, b = json.loads(json.dumps(saved)), json.loads(json.dumps(current))
    skip = set(ignore)
    names = list(b) + [k for k in a if k not in b]
    return [k for k in names if k not in skip and a.get(k, _MISSING) != b.get(k, _MISSING)]


_MISSING = object()


# -- the directory -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunDirectory:
    """One run directory (which need not exist yet). Reading methods raise :class:`RunError`
    naming the file when it is missing or unreadable."""

    path: Path

    def __init__(self, path: str | os.PathLike) -> None:
        object.__setattr__(self, "path", Path(path))

    def __str__(self) -> str:
        return str(self.path)

    def __fspath__(self) -> str:
        return str(self.path)

    # -- file paths and states

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS

    @property
    def checkpoint_file(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def best_file(self) -> Path:
        return self.path / BEST

    @property
    def summary_file(self) -> Path:
        return self.path / SUMMARY

    @property
    def sharpness_file(self) -> Path:
        return self.path / SHARPNESS

    @property
    def has_checkpoint(self) -> bool:
        return self.checkpoint_file.is_file()

    @property
    def holds_run(self) -> bool:
        """Whether a run was started here (a config or a checkpoint exists)."""
        return self.config_file.exists() or self.checkpoint_file.exists()

    @property
    def finished(self) -> bool:
        """Whether the run ended (its ``summary.json`` exists)."""
        return self.summary_file.is_file()

    @property
    def is_readable_run(self) -> bool:
        """Whether it has the files a report reads (``config.json`` and ``metrics.jsonl``)."""
        return self.config_file.is_file() and self.metrics_file.is_file()

    # -- reading

    def _json(self, path: Path) -> Any:
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise RunError(f"'{self.path}' has no {path.name}") from None
        except (OSError, ValueError) as error:
            raise RunError(f"'{path}' is not readable JSON ({error})") from error

    def read_record(self) -> dict[str, Any]:
        """The whole ``config.json``: the config, ``resolved_rho`` and the environment."""
        record = self._json(self.config_file)
        if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
            raise RunError(f"'{self.config_file}' has no 'config' object; not an aace run")
        return record

    def read_config(self) -> dict[str, Any]:
        """The run's configuration as saved (the ``config`` object of ``config.json``)."""
        return self.read_record()["config"]

    def resolved_rho(self) -> float | None:
        """The perturbation radius the run used, None for a run without one (plain SGD)."""
        return resolved_rho(self.read_record())

    def read_rows(self, missing_ok: bool = False) -> list[dict[str, Any]]:
        """The metrics rows, one per finished epoch; ``[]`` for a missing file when
        ``missing_ok``."""
        try:
            text = self.metrics_file.read_text()
        except FileNotFoundError:
            if missing_ok:
                return []
            raise RunError(f"'{self.path}' has no {METRICS}") from None
        try:
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as error:
            raise RunError(f"'{self.metrics_file}' is not JSON lines ({error})") from error

    def read_summary(self) -> dict[str, Any]:
        return self._json(self.summary_file)

    def read_sharpness(self) -> dict[str, Any] | None:
        """``sharpness.json`` (``aace sharpness``), or None when the run has none."""
        return self._json(self.sharpness_file) if self.sharpness_file.is_file() else None

    # -- writing (rank 0 of a run only)

    def prepare(self, resume: bool) -> None:
        """Create the directory, check that it is writable, remove temporary files a kill
        left behind, and refuse a directory holding a run unless ``resume``."""
        out = self.path
        if out.exists() and not out.is_dir():
            raise RunError(f"--out: '{out}' exists and is not a directory")
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise RunError(f"--out: cannot write to '{out}' ({error.strerror or error})") from error
        for leftover in out.glob(".*.tmp"):  # from a write that a kill interrupted
            leftover.unlink(missing_ok=True)
        if not resume and self.holds_run:
            raise RunError(
                f"--out: '{out}' already holds a run; pass --resume to continue it "
                "or choose another --out"
            )

    def check_same_run(
        self,
        config: dict[str, Any],
        ignore: Iterable[str] = (),
        saved: dict[str, Any] | None = None,
        where: str | None = None,
    ) -> None:
        """Refuse to resume with ``config`` if it is another run than the one saved here
        (``saved``, by default this directory's ``config.json``; ``where`` names it in the
        message), up to the fields in ``ignore``."""
        if saved is None:
            try:
                saved = self.read_config()
            except RunError as error:
                raise RunError(
                    f"--out: '{self.config_file}' is not a readable aace config"
                ) from error
            where = f"'{self.config_file}'"
        differences = config_differences(saved, config, ignore)
        if differences:
            raise RunError(
                f"--resume: {where or repr(str(self.path))} belongs to a different run "
                f"({describe_differences(saved, config, differences)}); use the same settings "
                "or another --out"
            )

    def write_record(
        self, config: dict[str, Any], resolved_rho: float | None, **environment: Any
    ) -> None:
        """Write ``config.json``: the config, the rho it resolves to, and ``environment``."""
        record = {"config": config, "resolved_rho": resolved_rho, **environment}
        atomic_write_json(self.config_file, record)

    def write_rows(self, rows: list[dict[str, Any]]) -> None:
        """Replace ``metrics.jsonl`` by ``rows`` (on resume: the checkpoint's rows)."""
        atomic_write_text(self.metrics_file, "".join(json.dumps(json_safe(r)) + "\n" for r in rows))

    def append_row(self, row: dict[str, Any]) -> None:
        """Append one epoch's row to ``metrics.jsonl``, flushed and fsynced."""
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(json_safe(row)) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.summary_file, summary)


def describe_differences(
    saved: dict[str, Any], current: dict[str, Any], names: Iterable[str]
) -> str:
    """``"lr: 0.05 there, 0.2 now, ..."`` for the fields ``names``."""
    return ", ".join(
        f"{k}: {_plain(saved.get(k))!r} there, {_plain(current.get(k))!r} now" for k in names
    )


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def resolved_rho(record: dict[str, Any]) -> float | None:
    """The rho of a ``config.json`` record: its ``resolved_rho``, or for a record written
    before that key existed, the ``rho`` field or the default of those versions
    (:data:`LEGACY_DEFAULT_RHO`)."""
    if "resolved_rho" in record:
        return record["resolved_rho"]
    config = record["config"]
    if config.get("rho") is not None and config.get("optimizer") != "sgd":
        return config["rho"]
    return LEGACY_DEFAULT_RHO.get(config.get("optimizer", ""))


def find_runs(path: str | os.PathLike) -> list[RunDirectory]:
    """``path`` itself when it is a run directory, else the run directories below it (a sweep's
    or a tuning's folder), in sorted order; a run directory's own subfolders are not searched.
    Raises :class:`RunError` when there is none."""
    root = Path(path)
    if RunDirectory(root).is_readable_run:
        return [RunDirectory(root)]
    if not root.is_dir():
        raise RunError(f"'{root}' is not an aace run directory: it does not exist or is a file")
    found: list[RunDirectory] = []

    def walk(folder: Path) -> None:
        for child in sorted(p for p in folder.iterdir() if p.is_dir()):
            if RunDirectory(child).is_readable_run:
                found.append(RunDirectory(child))
            else:
                walk(child)

    walk(root)
    if not found:
        raise RunError(
            f"'{root}' is not an aace run directory (expected {CONFIG} and {METRICS} in it) "
            "and holds none"
        )
    return found
