"""How long each interaction takes to settle in the browser, on synthetic 100k-image stores.

Serves the stores with ``streamlit run`` on a free loopback port and drives Debian's
Chromium (Playwright) through what a user does: open every page (a new document, and a
click in the sidebar from the explorer), page through the
explorer's grid, switch its views, move the thumbnail-size slider, open and close a
flyout, sort the table, pick labels in the class view, build a cohort with the filter
builder, switch to a saved cohort, change the model, and (detection) move the IoU and
score thresholds on the explorer and the model overview.

Each interaction is timed from the action (goto, click, key) until the app has settled:
the script has run (``stApp`` ``data-test-script-state`` went to running and back to
``notRunning``), no element is stale or a skeleton, and nothing reran for ``QUIET_MS``
afterwards (a callback's ``st.rerun`` is part of the interaction). A probe in the page
(installed before any of the app's scripts) records those times on the browser's own
clock, so Playwright's polling adds nothing. Printed per interaction: the first run,
the median of ``--repeat`` further runs, and the median's ratio to the 1000 ms target
(issue 6: "on a 100k-image store every interaction settles in <= 1 s"). Repeats change
what they ask for where the app would otherwise answer from its cache (a different
grid page, sort column, label, threshold), so the median is what a user meets. First of
all, the floor in the same run: the same Streamlit opening and rerunning an app that does
nothing, timed the same way.

    .venv/bin/python benchmarks/browser_latency.py [--data /tmp/scale] [--tasks multiclass,detection]
        [--repeat 3] [--only REGEX] [--shots DIR]

``--data`` holds ``<task>-100k/synthetic-<task>-100k.duckdb`` (built with
``core.synthetic`` when missing, as ``benchmarks/scale.py`` lays them out). The app is
served from a temporary folder of links to the stores' files, so their saved cohorts and
review statuses (``NAME.state.sqlite``) are this run's own. Timings depend on the
machine's load: the load average is printed at start and end.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.nav import PAGES  # noqa: E402
from core.cohorts import Cohort, Filter  # noqa: E402
from core.state import StateDB  # noqa: E402
from core.store import StorePaths  # noqa: E402
from core.synthetic import build_synthetic_store  # noqa: E402
from serving import serve  # noqa: E402

TARGET_MS = 1000.0
N_IMAGES = 100_000
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-gpu"]
QUIET_MS = 400  # no rerun for this long after settling: the interaction is over
NO_RERUN_MS = 1500  # an action that starts no script run within this (after it ends) is timed as it stands
TIMEOUT_MS = 300_000
STARTUP_S = 120
SAVED_COHORT = Cohort((Filter("brightness", "lt", 0.4), Filter("camera", "in", ("phone", "webcam"))))

# Runs in every document before the app's own scripts; polls the app's state every frame.
PROBE = """
(() => {
  const probe = {mark: 0, acted: 0, sawRunning: false, settledAt: null, reset() {
    this.mark = this.acted = performance.now(); this.sawRunning = false; this.settledAt = null; }};
  window.__vlProbe = probe;
  const visible = (selector) => [...document.querySelectorAll(selector)].some((e) => e.getClientRects().length);
  const tick = () => {
    const app = document.querySelector('[data-testid="stApp"]');
    const state = app && app.getAttribute('data-test-script-state');
    if (state && state !== 'notRunning' && state !== 'initial') probe.sawRunning = true;
    const busy = !app || state !== 'notRunning' || visible('[data-testid="stSkeleton"]')
      || visible('[data-stale="true"]');
    if (busy) probe.settledAt = null;
    else if (probe.settledAt === null) probe.settledAt = performance.now();
  };
  setInterval(tick, 10);
})();
"""

SETTLED = f"""() => {{
  const p = window.__vlProbe;
  if (!p || p.settledAt === null) return false;
  const now = performance.now();
  const done = p.sawRunning ? now - p.settledAt >= {QUIET_MS} : now - p.acted >= {NO_RERUN_MS};
  return done && [p.settledAt - p.mark, p.sawRunning];
}}"""


# --------------------------------------------------------------------------- stores and server


def store_path(data: Path, task: str) -> Path:
    return data / f"{task}-100k" / f"synthetic-{task}-100k.duckdb"


def ensure_store(path: Path, task: str) -> None:
    if not path.exists():
        started = time.perf_counter()
        build_synthetic_store(path, task=task, n_images=N_IMAGES)
        print(f"built {path} in {time.perf_counter() - started:.1f}s", flush=True)


def serving_folder(paths: list[Path], folder: Path) -> list[str]:
    """Links to each store's base (and parts) in ``folder``; its state database will live there."""
    names = []
    for path in paths:
        source = StorePaths.of(path)
        target = StorePaths.of(folder / source.base.name)
        target.base.symlink_to(source.base)
        if source.parts.is_dir():
            target.parts.symlink_to(source.parts)
        StateDB.for_store(target.base).create_cohort("dark phones", SAVED_COHORT)
        names.append(source.name)
    return names


# The floor: the same Streamlit serving an app that does nothing, timed the same way.
REFERENCE_APP = """import streamlit as st

st.button("Rerun", key="vl_reference_rerun")
st.write("reference")
"""


# --------------------------------------------------------------------------- timing


@dataclass
class Timing:
    ms: float
    reran: bool  # False: the action started no script run (a browser-only change)
    exceptions: int


class Driver:
    """One browser page on the app, with the probe installed."""

    def __init__(self, browser, base: str, shots: Path | None):
        self.context = browser.new_context(viewport={"width": 1440, "height": 1000})
        self.context.add_init_script(PROBE)
        self.page = self.context.new_page()
        self.base = base
        self.shots = shots

    def settle(self) -> Timing:
        # The settle time and the run flag are read in the same tick that saw the app settled.
        elapsed, reran = self.page.wait_for_function(SETTLED, timeout=TIMEOUT_MS, polling=50).json_value()
        exceptions = self.page.locator('[data-testid="stException"]').count()
        return Timing(elapsed, reran, exceptions)

    def goto(self, path: str) -> Timing:
        """Open ``path``: timed from navigation start (the new document's clock origin)."""
        self.page.goto(self.base + path)
        return self.settle()

    def act(self, action: Callable[[], None]) -> Timing:
        self.page.evaluate("() => window.__vlProbe.reset()")
        action()
        # A slow action (typing into a box) may end after the grace for "no rerun" began.
        self.page.evaluate("() => { window.__vlProbe.acted = performance.now(); }")
        return self.settle()

    def pick(self, label: str, option: str, scope=None) -> Timing:
        """Choose ``option`` in the selectbox or multiselect labelled ``label``: timed from the click
        on the option (the list is opened and filtered by typing first: a long option list renders
        only the options in view)."""
        (scope or self.page).get_by_role("combobox", name=label, exact=True).click()
        self.page.keyboard.type(option)
        return self.act(lambda: self.page.get_by_role("option", name=option, exact=True).click())

    def shot(self, name: str) -> None:
        if self.shots is not None:
            self.shots.mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(self.shots / f"{re.sub(r'[^A-Za-z0-9._-]+', '-', name)}.png"),
                                 full_page=True)


@dataclass
class Interaction:
    """``setup(driver, i)`` brings the page to where the action starts (untimed); ``action(driver,
    i)`` is timed and returns its timings by step name ("" for a one-step action). ``i`` numbers
    the runs: 0 first, then 1..repeat, so a setup can start each run somewhere not yet cached."""

    name: str
    setup: Callable[[Driver, int], None] | None
    action: Callable[[Driver, int], dict[str, Timing]]


# --------------------------------------------------------------------------- what a user does

GRID = ".vl-card"
TABLE = '[data-testid="stDataFrame"]'
DIALOG = '[role="dialog"]'


def _opened(path: str | Callable[[int], str], wait: str | None = None) -> Callable[[Driver, int], None]:
    """A setup that opens ``path`` (``{i}`` is the run counted from 1, so ``page={i}0`` is a valid page;
    or a function of the run counted from 0) and waits for ``wait``."""
    def setup(d: Driver, i: int) -> None:
        d.goto(path(i) if callable(path) else path.format(i=i + 1))
        if wait:
            d.page.locator(wait).first.wait_for()
    return setup


def _step(fn: Callable[[Driver, int], None]) -> Callable[[Driver, int], dict[str, Timing]]:
    return lambda d, i: {"": d.act(lambda: fn(d, i))}


def _slider(label: str, key: str, sidebar: bool = False) -> Callable[[Driver, int], None]:
    def press(d: Driver, i: int) -> None:
        scope = d.page.locator('[data-testid="stSidebar"]') if sidebar else d.page
        scope.get_by_role("slider", name=label).focus()
        # The thumbnail size is kept per session: move it back and forth.
        d.page.keyboard.press(key if i % 2 == 0 or sidebar else "ArrowLeft")
    return press


def _open_flyout(d: Driver, i: int) -> dict[str, Timing]:
    timing = d.act(lambda: d.page.locator(GRID).nth(i).click())
    d.page.get_by_role("dialog").wait_for()
    return {"": timing}


def _builder(d: Driver, i: int) -> dict[str, Timing]:
    opened = d.act(lambda: d.page.get_by_role("button", name="New", exact=True).click())
    dialog = d.page.get_by_role("dialog").last  # a closing dialog may linger a moment
    dialog.wait_for()
    picked = d.pick("Value", "incorrect", dialog)
    dialog.get_by_text(re.compile("images match")).wait_for()
    applied = d.act(lambda: dialog.get_by_role("button", name="Apply", exact=True).click())
    d.page.locator(".st-key-vl_cohort_bar").get_by_text("Outcome is incorrect").wait_for()
    return {" open (New)": opened, " pick a value": picked, " Apply": applied}


def _pick_model(model: str) -> Callable[[Driver, int], dict[str, Timing]]:
    def pick(d: Driver, i: int) -> dict[str, Timing]:
        d.page.locator('[data-testid="stSidebar"]').get_by_role("combobox", name="Model").click()
        return {"": d.act(lambda: d.page.get_by_role("option").filter(has_text=f"({model})").first.click())}
    return pick


def interactions(task: str, store: str, models: tuple[str, ...], classes: list[str]) -> list[Interaction]:
    q = f"store={store}"
    explorer = f"/explorer?{q}"
    pages = ["", "explorer", "model-overview", "error-analysis", "data-analysis", "slices", "compare", "review",
             "cohorts", "robustness"]
    out = [Interaction(f"open /{p or 'overview'}", None, lambda d, i, p=p: {"": d.goto(f"/{p}?{q}")}) for p in pages]
    # Moving between pages in the app is a click in the sidebar, not a new document: timed from the click.
    out += [Interaction(f"sidebar: explorer -> {spec.title}", _opened(explorer + "&page={i}3", GRID),
                        _step(lambda d, i, t=spec.title: d.page.locator('[data-testid="stSidebar"]').get_by_role(
                            "link", name=t, exact=True).click()))
            for spec in PAGES if spec.url_path != "explorer"]
    sorts = ["Brightness ↓ descending", "Sharpness ↑ ascending", "Noise ↓ descending", "Contrast ↑ ascending"]
    out += [
        Interaction("explorer: next grid page", _opened(explorer + "&page={i}0", GRID),
                    _step(lambda d, i: d.page.get_by_test_id("stPaginationNext").click())),
        Interaction("explorer: deep page (the last)", _opened(explorer + "&page={i}1", GRID),
                    _step(lambda d, i: d.page.get_by_test_id("stPaginationPage").last.click())),
        Interaction("explorer: grid -> table", _opened(explorer + "&page={i}2", GRID),
                    _step(lambda d, i: d.page.get_by_role("radio", name="Table", exact=True).click())),
        Interaction("explorer: table -> class view", _opened(explorer + "&view=table&page={i}3", TABLE),
                    _step(lambda d, i: d.page.get_by_role("radio", name="Class view", exact=True).click())),
        Interaction("explorer: class view -> grid", _opened(explorer + "&view=classes&page={i}4", GRID),
                    _step(lambda d, i: d.page.get_by_role("radio", name="Image grid", exact=True).click())),
        Interaction("explorer: thumbnail size slider", _opened(explorer + "&page={i}5", GRID),
                    _step(_slider("Thumbnail size", "ArrowRight"))),
        Interaction("explorer: per-section count", _opened(explorer + "&page={i}6", GRID),
                    lambda d, i: {"": d.pick("Per section", ("48", "96", "12", "48")[i % 4])}),
        Interaction("explorer: open flyout", _opened(explorer + "&page={i}7", GRID), _open_flyout),
        Interaction("explorer: close flyout", _opened(explorer + "&page={i}7&image={i}", DIALOG),
                    _step(lambda d, i: d.page.keyboard.press("Escape"))),
        Interaction("explorer: table sort", _opened(explorer + "&view=table", TABLE),
                    lambda d, i: {"": d.pick("Sort by", sorts[i % len(sorts)])}),
        Interaction("explorer: table next page", _opened(explorer + "&view=table&page={i}8", TABLE),
                    _step(lambda d, i: d.page.get_by_test_id("stPaginationNext").click())),
        Interaction("explorer: class view add a label", _opened(explorer + "&view=classes", GRID),
                    lambda d, i: {"": d.pick("Labels", classes[3 + i % (len(classes) - 3)])}),
    ]
    if models:
        out += [
            Interaction("explorer: class view incorrect only", _opened(explorer + "&view=classes", GRID),
                        _step(lambda d, i: d.page.get_by_role("radio", name="Incorrect only", exact=True).click())),
            Interaction("cohort bar: filter builder", _opened(explorer + "&page={i}9", GRID), _builder),
        ]
    out += [
        Interaction("cohort bar: switch to the saved cohort", _opened(explorer + "&page={i}1", GRID),
                    lambda d, i: {"": d.pick("Cohort", "dark phones")}),
        Interaction("cohort bar: open a URL with the saved cohort", None,
                    lambda d, i: {"": d.goto(explorer + f"&cohort=1&page={i + 2}")}),
        Interaction("cohort bar: open a URL with a filter", None,
                    lambda d, i: {"": d.goto(explorer + f"&brightness__lt=0.{3 + i}&camera__in=phone,webcam")}),
    ]
    if len(models) > 1:
        out.append(Interaction("explorer: switch model", _opened(explorer + "&page={i}2", GRID),
                               _pick_model(models[1])))
    if task == "detection":
        for where, path in (("explorer", explorer), ("model overview", f"/model-overview?{q}")):
            # Each run starts from another value, so the value moved to is not cached yet.
            out += [
                Interaction(f"{where}: IoU threshold", _opened(lambda i, p=path: f"{p}&iou={0.5 + 0.1 * i:.2f}"),
                            _step(_slider("IoU threshold", "ArrowRight", sidebar=True))),
                Interaction(f"{where}: score threshold", _opened(lambda i, p=path: f"{p}&conf={0.3 + 0.1 * i:.2f}"),
                            _step(_slider("Score threshold", "ArrowRight", sidebar=True))),
            ]
    return out


# --------------------------------------------------------------------------- running


def run(driver: Driver, interaction: Interaction, repeat: int) -> dict[str, list[Timing]]:
    timings: dict[str, list[Timing]] = {}
    for i in range(repeat + 1):
        if interaction.setup is not None:
            interaction.setup(driver, i)
        for step, timing in interaction.action(driver, i).items():
            timings.setdefault(step, []).append(timing)
            if timing.ms > TARGET_MS and i == 0:
                driver.shot(f"{interaction.name}{step}")
    return timings


def reference(browser, folder: Path, repeat: int) -> None:
    """Print the floor every interaction stands on: opening and rerunning an app that does nothing."""
    script = folder / "reference_app.py"
    script.write_text(REFERENCE_APP)
    with serve(folder, script, STARTUP_S) as (base, _):
        driver = Driver(browser, base, None)
        try:
            timings = run(driver, Interaction("reference: open an empty Streamlit app", None,
                                              lambda d, i: {"": d.goto("/")}), repeat)
            report("reference: open an empty Streamlit app", timings[""])
            timings = run(driver, Interaction("reference: rerun it (a button)", None, _step(
                lambda d, i: d.page.get_by_role("button", name="Rerun").click())), repeat)
            report("reference: rerun it (a button)", timings[""])
        finally:
            driver.context.close()


def report(name: str, timings: list[Timing]) -> float:
    first, rest = timings[0], timings[1:]
    median = statistics.median(t.ms for t in rest) if rest else first.ms
    notes = []
    if not any(t.reran for t in timings):
        notes.append("no rerun")
    if any(t.exceptions for t in timings):
        notes.append(f"EXCEPTIONS {max(t.exceptions for t in timings)}")
    flag = "  SLOW" if median > TARGET_MS else ""
    print(f"  {name:52s} first {first.ms:7.0f} ms   median {median:7.0f} ms (n={len(rest)})   "
          f"/ target {median / TARGET_MS:5.2f}{flag}{'   ' + ', '.join(notes) if notes else ''}", flush=True)
    return median


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="/tmp/scale", help="folder of <task>-100k/ store folders (built if missing)")
    parser.add_argument("--tasks", default="multiclass,detection", help="comma-separated: multiclass, detection")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs after the first, per interaction")
    parser.add_argument("--only", help="run only interactions whose name matches this regular expression")
    parser.add_argument("--shots", type=Path, default=ROOT / "out" / "browser-latency",
                        help="screenshots of interactions whose first run is over the target (git-ignored)")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    from core.store import Store

    print(f"machine: {os.cpu_count()} cores, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at start",
          flush=True)
    tasks = args.tasks.split(",")
    paths = [store_path(Path(args.data), task) for task in tasks]
    for task, path in zip(tasks, paths):
        ensure_store(path, task)
    slow: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="vl-latency-") as tmp:
        names = serving_folder(paths, Path(tmp))
        with serve(Path(tmp), startup_s=STARTUP_S) as (base, _), sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            print(f"\n== the floor, first run / median of {args.repeat} ==", flush=True)
            reference(browser, Path(tmp), args.repeat)
            for task, path, name in zip(tasks, paths, names):
                store = Store(path)
                models, classes = tuple(store.model_ids()), [str(c) for c in store.classes]
                store.close()
                print(f"\n== {task}: {name} ({N_IMAGES:,} images), first run / median of {args.repeat} ==", flush=True)
                for interaction in interactions(task, name, models, classes):
                    if args.only and not re.search(args.only, interaction.name):
                        continue
                    driver = Driver(browser, base, args.shots / task)
                    try:
                        timings = run(driver, interaction, args.repeat)
                    except Exception as error:  # noqa: BLE001 - a broken step is reported, the rest still runs
                        driver.shot(f"{interaction.name}-failed")
                        print(f"  {interaction.name:52s} FAILED: {str(error).splitlines()[0]}", flush=True)
                        continue
                    finally:
                        driver.context.close()
                    for step, values in timings.items():
                        median = report(interaction.name + step, values)
                        if median > TARGET_MS:
                            slow.append((f"{task}: {interaction.name}{step}", median))
            browser.close()
    print(f"\n{len(slow)} interaction(s) over {TARGET_MS:.0f} ms (median):")
    for name, median in slow:
        print(f"  {name:64s} {median:7.0f} ms / target {median / TARGET_MS:5.2f}")
    print(f"\nload average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
