"""The demo's background steps, without torch: the app polls them on every rerun.

A build (``visionlens demo``) and the explanation sample (``visionlens demo --explain``)
each run in a process of their own session, hold an exclusive lock file in the data
folder while they run, and append their progress to a status file that pages read.
``read_plan`` / ``explanation_progress`` count the stored maps of the sample against
the plan ``core.demo.plan_explanations`` wrote. Importing this module costs no torch, so
pages that show progress stay small.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

EXPLAIN_IMAGES = 50
PLAN_FILE = "demo-explanations.json"
PLAN_KEYS = ["model_id", "method", "image_id", "target"]

# Files the demo's background steps keep in the data folder (dot files: not stores).
BUILD_LOCK, BUILD_STATUS, BUILD_LOG = ".demo-build.lock", ".demo-build.status", ".demo-build.log"
EXPLAIN_LOCK, EXPLAIN_STATUS, EXPLAIN_LOG = ".demo-explain.lock", ".demo-explain.status", ".demo-explain.log"
# A task's build stages in order ("done" is reported once its store is written).
BUILD_STAGES = ("rendering scenes", "training baseline", "predicting baseline", "training candidate",
                "predicting candidate", "metadata", "models", "writing", "label review", "done")
STATUS_INTERVAL_S = 0.5
# The folder holding the ``core`` package: child processes run ``python -m core.cli`` from it.
PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def read_plan(out_dir: str | Path) -> dict | None:
    """The plan ``plan_explanations`` wrote, or None when there is none (or it cannot be read)."""
    try:
        return json.loads((Path(out_dir) / PLAN_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


@dataclass(frozen=True)
class ExplanationProgress:
    """Stored vs planned maps of the demo sample, per store; whether a process is computing them."""

    stores: dict[str, tuple[int, int]]  # store name → (maps stored, maps planned)
    running: bool
    error: str | None  # why the last run stopped, when it failed

    @property
    def done(self) -> int:
        return sum(done for done, _ in self.stores.values())

    @property
    def planned(self) -> int:
        return sum(planned for _, planned in self.stores.values())


def explanation_progress(out_dir: str | Path, open_store: Callable | None = None) -> ExplanationProgress | None:
    """How far the explanation sample in ``out_dir`` is (None without a plan).

    ``open_store(path)`` gives a ``Store`` (the app passes its cached, refreshed one);
    without it each store is opened and closed here.
    """
    from .store import Store

    plan = read_plan(out_dir)
    if plan is None:
        return None
    out = Path(out_dir)
    counts = {}
    for name, spec in plan["stores"].items():
        base = out / f"{name}.duckdb"
        if not base.is_file():
            continue
        store = open_store(base) if open_store else Store(base)
        try:
            stored = store.query('SELECT DISTINCT model_id, method, image_id, target FROM "explanations" '
                                 "WHERE image_id = ANY(?)", [spec["image_ids"]])
        finally:
            if not open_store:
                store.close()
        planned = pd.DataFrame(spec["maps"], columns=PLAN_KEYS)
        stored = stored.astype({"model_id": str, "method": str, "image_id": np.int64, "target": np.int64})
        counts[name] = (len(planned.merge(stored, on=PLAN_KEYS)), len(planned))
    status = read_status(out / EXPLAIN_STATUS)
    return ExplanationProgress(counts, lock_held(out / EXPLAIN_LOCK),
                               status.error if status.state == "failed" else None)


# --------------------------------------------------------------------------- background steps


class DemoLock:
    """An exclusive ``flock`` on a file in the data folder: one build, one explanation run.

    The operating system drops the lock when the last process holding its file
    descriptor ends, however it ends, so a killed build never leaves a stale lock. A child
    started with ``pass_fds=(lock.fileno(),)`` holds it on after this process releases it.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self, wait_s: float = 1.0) -> bool:
        """Take the lock; False when another holder keeps it for ``wait_s`` (probes by
        ``lock_held`` hold it for microseconds, so a short wait sees past them)."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                time.sleep(0.05)
        self._fd = fd
        self.record(os.getpid())
        return True

    @classmethod
    def adopt(cls, path: str | Path, fd: int) -> "DemoLock":
        """The lock a parent took and passed to this process as descriptor ``fd``."""
        lock = cls(path)
        lock._fd = fd
        return lock

    def record(self, pid: int) -> None:
        """Write the holder's process id into the file (for people and tests)."""
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{pid}\n".encode(), 0)

    def fileno(self) -> int:
        if self._fd is None:
            raise RuntimeError("the lock is not held")
        return self._fd

    def release(self) -> None:
        """Close this process's descriptor (the lock stays while a child holds a copy)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def lock_held(path: str | Path) -> bool:
    """Whether some process holds the lock at ``path`` now."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's shared lock


def lock_holder(path: str | Path) -> int | None:
    """The process id recorded in a held lock, or None."""
    try:
        return int(Path(path).read_text().strip()) if lock_held(path) else None
    except (OSError, ValueError):
        return None


class StatusFile:
    """Progress of a background step as JSON lines that a page polls.

    A first line ``{"tasks": [...]}``, then ``{"elapsed", "stage", "done", "total"}`` on
    each stage change (and at most every ``STATUS_INTERVAL_S`` within a stage), and last
    ``{"state": "done"}`` or ``{"state": "failed", "error": ...}``. A process killed
    outright writes no last line; ``read_status`` then reports it running, and the
    caller tells a dead run by its released lock.
    """

    def __init__(self, path: str | Path, tasks: Sequence[str]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self._written: dict[str, float] = {}
        self.path.write_text(json.dumps({"tasks": list(tasks)}) + "\n")

    def _append(self, record: dict) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps({"elapsed": round(time.monotonic() - self.started, 1), **record}) + "\n")

    def progress(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._written.get(stage, -STATUS_INTERVAL_S) < STATUS_INTERVAL_S and done < total:
            return
        self._written[stage] = now
        self._append({"stage": stage, "done": int(done), "total": int(total)})

    def finish(self) -> None:
        self._append({"state": "done"})

    def fail(self, error: str) -> None:
        self._append({"state": "failed", "error": error})


@dataclass(frozen=True)
class StepStatus:
    """What a status file says: each task's latest stage, and how the step ended."""

    state: str  # 'none' (no file), 'running' (no last line yet), 'done' or 'failed'
    tasks: tuple[str, ...] = ()
    stages: dict[str, tuple[str, int, int]] | None = None  # task → (stage, done, total)
    error: str | None = None
    elapsed: float = 0.0

    def build_fraction(self) -> float:
        """Share of the build done: each task's stage index plus its progress within the stage."""
        if self.state == "done":
            return 1.0
        if not self.tasks:
            return 0.0
        total = 0.0
        for task in self.tasks:
            stage, done, of = (self.stages or {}).get(task, (None, 0, 1))
            if stage in BUILD_STAGES:
                total += (BUILD_STAGES.index(stage) + min(done / max(of, 1), 1.0)) / len(BUILD_STAGES)
        return min(total / len(self.tasks), 1.0)


def read_status(path: str | Path) -> StepStatus:
    """Parse a ``StatusFile``; a half-written last line is ignored."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return StepStatus("none")
    tasks: tuple[str, ...] = ()
    stages: dict[str, tuple[str, int, int]] = {}
    state, error, elapsed = "running", None, 0.0
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict):
            continue
        elapsed = float(record.get("elapsed", elapsed))
        if "tasks" in record:
            tasks = tuple(record["tasks"])
        if "stage" in record:
            task, _, stage = str(record["stage"]).partition(": ")
            stages[task] = (stage, int(record.get("done", 0)), int(record.get("total", 1)))
        if "state" in record:
            state, error = str(record["state"]), record.get("error")
    return StepStatus(state, tasks, stages, error, elapsed)


def start_build_process(out_dir: str | Path, lock: DemoLock, args: Sequence[str] = ()) -> subprocess.Popen:
    """``visionlens demo --out DIR --then-explain`` in a child process that adopts ``lock``
    (``BUILD_LOCK``, taken by the caller) and holds it until it ends; its output goes to
    ``BUILD_LOG``.

    The child is started in a session of its own, so a build outlives a stopped app, and
    the demo's memory goes back to the system when it ends.
    """
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # Until the child writes its own, this status says a build started: a child that dies
    # before its first line (a bad argument) shows as a failed build, not as none at all.
    StatusFile(out / BUILD_STATUS, ())
    command = [sys.executable, "-m", "core.cli", "demo", *args, "--out", str(out), "--then-explain",
               "--lock-fd", str(lock.fileno())]
    with open(out / BUILD_LOG, "w") as log:
        child = subprocess.Popen(command, cwd=PACKAGE_ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT, pass_fds=(lock.fileno(),), start_new_session=True)
    lock.record(child.pid)
    return child


def start_explain_process(out_dir: str | Path, n_images: int = EXPLAIN_IMAGES, workers: int | None = None,
                          lock: DemoLock | None = None) -> subprocess.Popen:
    """``visionlens demo --explain`` in a background process of its own session; output to
    ``EXPLAIN_LOG``.

    With ``lock`` (``EXPLAIN_LOCK``, taken by the caller) the child adopts it, so the step
    counts as running from this moment on; without, the child takes the lock itself and
    ends at once when another run holds it.
    """
    out = Path(out_dir).resolve()
    command = [sys.executable, "-m", "core.cli", "demo", "--explain", "--out", str(out),
               "--explain-images", str(n_images), *(["--workers", str(workers)] if workers else []),
               *(["--lock-fd", str(lock.fileno())] if lock else [])]
    with open(out / EXPLAIN_LOG, "w") as log:
        child = subprocess.Popen(command, cwd=PACKAGE_ROOT, stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT, pass_fds=(lock.fileno(),) if lock else (),
                                 start_new_session=True)
    if lock:
        lock.record(child.pid)
    return child


def start_explaining(out_dir: str | Path, n_images: int = EXPLAIN_IMAGES,
                     workers: int | None = None) -> subprocess.Popen | None:
    """Take ``EXPLAIN_LOCK`` and hand it to a new ``start_explain_process``: the step counts
    as running from this moment on. None when another run holds the lock."""
    lock = DemoLock(Path(out_dir) / EXPLAIN_LOCK)
    if not lock.acquire():
        return None
    try:
        return start_explain_process(out_dir, n_images, workers, lock)
    finally:
        lock.release()
