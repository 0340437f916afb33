"""Every full profile end to end on a few real-size synthetic cases, timed step by step.

Usage::

    python -m bench.check_full [--pipelines rsna hipmri fracatlas pancreas] [--device auto|cpu|cuda]
        [--work DIR] [--threads N] [--max-minutes 40] [--max-gb 8]

For each pipeline it generates the ``check`` preset of the pipeline's synthetic generator (the
real data's image sizes, a few cases) and runs ``sh train.sh <pipeline> DATA`` with
``PROFILE=full``: the full recipe, step by step, with the overrides of ``CHECKS`` (one epoch,
a few batches, nnU-Net's shortest schedule; all described there). Encoders that the full profile
starts from ImageNet weights get stand-in files of random weights in a private ``WEIGHTS_DIR``:
there is no network here, and the full profile's own loading path (local file, first conv adapted
to the input channels) still runs. A sampler reads ``/proc`` every second; per step of train.sh
(its ``=== [time] N. ...`` lines) it keeps the wall seconds and the peak memory of the step's
process tree: the sum of the processes' proportional set sizes (PSS: pages shared by forked
loader or nnU-Net workers counted once), and the largest single process's RSS.

Prints one table (also written to ``WORK/check_full.md``) and ends with an error line when a
step fails, the whole check runs longer than ``--max-minutes`` (it is stopped there) or a step's
peak memory exceeds ``--max-gb`` (GB = 1e9 bytes). Each pipeline's output goes to
``WORK/logs/<pipeline>.log``. Without ``--work`` everything lives in a temporary folder that is
removed at the end. Results and what the overrides leave out: docs/benchmarks.md.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from utils import cli
from utils.errors import InputError
from utils.io import write_text

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ("rsna", "hipmri", "fracatlas", "pancreas")
SAMPLE_S = 1.0  # sampling period of the memory sampler (a shorter one takes CPU from the check)
STEP_MARK = "=== ["  # how train.sh's step() starts a step's line
GB = 1e9


@dataclass(frozen=True)
class Check:
    """How one pipeline's full profile is cut short: what the overrides change and why.

    ``overrides`` go to every step of train.sh; ``folds`` sets train.sh's FOLDS (None: the
    profile's own); ``generate_args`` extend the generator's command line.
    """

    overrides: tuple[str, ...]
    folds: int | None = None
    generate_args: tuple[str, ...] = ()


# Runtime keys first (nothing a trained run computes changes): train.stop_after=1 ends each fold
# after one epoch, train.grad_checkpointing keeps the timm encoders' training steps inside the
# memory limit. Then what the check cannot afford and says so (docs/benchmarks.md): a capped
# epoch (train.max_train_batches, nnU-Net's nnUNetTrainerCheck or trainer_options), and 2 folds
# where the profile draws 5 (each fold repeats the same per-fold work; the projection scales).
ONE_EPOCH = ("train.stop_after=1",)
CHECKS = {
    "rsna": Check(
        (*ONE_EPOCH, "train.max_train_batches=1", "train.grad_checkpointing=true"),
        folds=2,
        generate_args=("--workers", "2"),
    ),
    "hipmri": Check((*ONE_EPOCH, "train.max_train_batches=2")),
    "fracatlas": Check(
        (
            *ONE_EPOCH,
            "train.max_train_batches=1",
            "train.grad_checkpointing=true",
            "nnunet.trainer=nnUNetTrainerCheck",
        ),
        folds=2,
    ),
    "pancreas": Check(
        (
            "nnunet.trainer_options.epochs=1",
            "nnunet.trainer_options.iterations=2",
            "nnunet.trainer_options.val_iterations=1",
        )
    ),
}


# ---- memory of a process tree -------------------------------------------------------------------
def _parent(pid: int) -> int | None:
    """The parent pid from /proc/<pid>/stat (None when the process is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the name may hold spaces and parentheses


def tree(root: int) -> list[int]:
    """``root`` and every live descendant of it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            parent = _parent(int(entry.name))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def memory_kib(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of one process in KiB from /proc/<pid>/smaps_rollup; (0, 0) when it is gone."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return 0, 0
    fields = {line.split(":")[0]: line.split()[1] for line in lines if line.endswith("kB")}
    return int(fields.get("Pss", 0)), int(fields.get("Rss", 0))


def tree_memory(root: int) -> tuple[int, int]:
    """(sum of PSS, largest RSS) in bytes over ``root``'s process tree."""
    sizes = [memory_kib(pid) for pid in tree(root)]
    return sum(p for p, _ in sizes) * 1024, max((r for _, r in sizes), default=0) * 1024


# ---- steps --------------------------------------------------------------------------------------
@dataclass
class Step:
    """One row of the table: a train.sh step (or the data generation) and what it cost."""

    pipeline: str
    name: str
    start: float = field(default_factory=time.monotonic)
    seconds: float = 0.0
    pss: int = 0  # peak sum of PSS over the step's process tree, bytes
    rss: int = 0  # peak RSS of its largest process, bytes

    def record(self, pss: int, rss: int) -> None:
        self.pss, self.rss = max(self.pss, pss), max(self.rss, rss)


def step_name(line: str) -> str | None:
    """The step of a train.sh marker line ``=== [HH:MM:SS] 3. stage 1 (...)`` -> ``3. stage 1 (...)``."""
    if not line.startswith(STEP_MARK):
        return None
    return line.split("] ", 1)[1].split(":", 1)[0].strip()[:52]


class Sampler(threading.Thread):
    """Polls the memory of a process tree every SAMPLE_S into the step that is current."""

    def __init__(self, root: int, current: list[Step]):
        super().__init__(daemon=True)
        self.root, self.current, self.done = root, current, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            pss, rss = tree_memory(self.root)
            self.current[-1].record(pss, rss)
            self.done.wait(SAMPLE_S)


def run_steps(
    pipeline: str, cmd: Sequence[str], env: dict[str, str], log: Path, deadline: float, first: str
) -> list[Step]:
    """Run ``cmd`` (its own process group), its output to ``log``; one Step per train.sh marker.

    ``first`` names the whole run when it prints no marker (the start-up before the first marker
    belongs to that marker's step). Raises InputError naming the log when the command fails, and
    stops it (the whole process group) at ``deadline`` (time.monotonic()).
    """
    steps, marked = [Step(pipeline, first)], False
    with open(log, "a") as out:
        proc = subprocess.Popen(
            list(cmd),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        sampler = Sampler(proc.pid, steps)
        sampler.start()
        timer = threading.Timer(
            max(deadline - time.monotonic(), 0), os.killpg, (proc.pid, signal.SIGTERM)
        )
        timer.start()
        try:
            for line in proc.stdout:
                out.write(line)
                name = step_name(line)
                if name is not None and not marked:
                    steps[-1].name, marked = name, True
                elif name is not None:
                    _close(steps[-1])
                    steps.append(Step(pipeline, name))
                if name is not None:
                    print(f"  [{pipeline}] {name}", flush=True)
            code = proc.wait()
        finally:
            timer.cancel()
            sampler.done.set()
            sampler.join()
    _close(steps[-1])
    if time.monotonic() >= deadline:
        raise InputError(f"{pipeline}: stopped at the time limit during '{steps[-1].name}' ({log})")
    if code != 0:
        raise InputError(f"{pipeline}: '{steps[-1].name}' failed with code {code}; see {log}")
    return steps


def _close(step: Step) -> None:
    step.seconds = time.monotonic() - step.start


# ---- one pipeline -------------------------------------------------------------------------------
def stand_in_weights(pipeline: str, folder: Path) -> None:
    """Random-initialised stand-ins in ``folder`` for the ImageNet files of the full profile's
    encoders (utils/weights.py reads the folder from WEIGHTS_DIR, set here and in the steps)."""
    import timm

    from utils import weights

    os.environ[weights.WEIGHTS_ENV] = str(folder)
    for backbone in weights.encoders_of(weights.stage_configs(pipeline)):
        if weights.local_weights(backbone) is None:
            model = timm.create_model(backbone, pretrained=False)
            weights.store(backbone, model.state_dict(), "random initialisation (bench.check_full)")


def environment(work: Path, threads: int) -> dict[str, str]:
    """The check's environment: its own weights folder, no download, ``threads`` torch threads."""
    return {
        **os.environ,
        "WEIGHTS_DIR": str(work / "weights"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": str(threads),
        "PYTHON": sys.executable,
        "OUTPUT": str(work / "output"),
        "PYTHONUNBUFFERED": "1",
    }


def check_pipeline(
    pipeline: str, work: Path, device: str, threads: int, deadline: float
) -> list[Step]:
    """Generate the ``check`` preset, then the pipeline's train.sh under the check's overrides."""
    check = CHECKS[pipeline]
    data = work / "data" / pipeline
    log = work / "logs" / f"{pipeline}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    stand_in_weights(pipeline, work / "weights")
    env = environment(work, threads)
    steps = []
    if not data.exists():  # generated into a sibling first, so a folder that exists is complete
        partial = data.with_name(f"{pipeline}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        generate = [sys.executable, "-m", f"utils.{pipeline}.synthetic", "--out", str(partial)]
        generate += ["--preset", "check", "--seed", "0", *check.generate_args]
        steps = run_steps(pipeline, generate, env, log, deadline, "generate")
        partial.rename(data)
    if check.folds is not None:
        env["FOLDS"] = str(check.folds)
    recipe = ["bash", "train.sh", pipeline, str(data), f"device={device}", *check.overrides]
    return steps + run_steps(pipeline, recipe, env, log, deadline, "start")


# ---- the table ----------------------------------------------------------------------------------
def table(steps: Sequence[Step], wall: dict[str, float]) -> str:
    """Markdown table: one row per step, a total row per pipeline."""
    rows = [
        "| pipeline | step | seconds | peak memory GB (PSS, tree) | largest process GB (RSS) |",
        "|---|---|---:|---:|---:|",
    ]
    for pipeline, seconds in wall.items():
        own = [s for s in steps if s.pipeline == pipeline]
        for s in own:
            rows.append(
                f"| {pipeline} | {s.name} | {s.seconds:.0f} | {s.pss / GB:.2f} | {s.rss / GB:.2f} |"
            )
        peak = max((s.pss for s in own), default=0)
        rows.append(f"| {pipeline} | **total** | **{seconds:.0f}** | **{peak / GB:.2f}** | |")
    return "\n".join(rows)


@contextmanager
def work_folder(given: Path | None) -> Iterator[Path]:
    """``given`` (kept), or a temporary folder removed afterwards."""
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="check_full_") as tmp:
        yield Path(tmp)


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.parser(__doc__, cfg=None, overrides=False)
    parser.add_argument("--pipelines", nargs="+", choices=PIPELINES, default=list(PIPELINES))
    parser.add_argument("--device", default="auto", help="device= of every step (auto|cpu|cuda)")
    parser.add_argument("--work", type=Path, help="keep data, products and logs here")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="OMP_NUM_THREADS")
    parser.add_argument("--max-minutes", type=float, default=40.0, help="stop the check here")
    parser.add_argument("--max-gb", type=float, default=8.0, help="peak memory limit per step")
    args = parser.parse_args(argv)
    start = time.monotonic()
    deadline = start + 60 * args.max_minutes
    steps: list[Step] = []
    wall: dict[str, float] = {}
    with cli.running(), work_folder(args.work) as work:
        try:
            for pipeline in args.pipelines:
                t0 = time.monotonic()
                print(f"== {pipeline}", flush=True)
                steps += check_pipeline(pipeline, work, args.device, args.threads, deadline)
                wall[pipeline] = time.monotonic() - t0
        finally:
            text = table(steps, wall)
            total = time.monotonic() - start
            text += f"\n\ntotal wall time {total / 60:.1f} min (limit {args.max_minutes:g} min)"
            print("\n" + text, flush=True)
            write_text(text + "\n", work / "check_full.md")
        worst = max(steps, key=lambda s: s.pss)
        if worst.pss > args.max_gb * GB:
            raise InputError(
                f"{worst.pipeline} '{worst.name}' peaked at {worst.pss / GB:.2f} GB "
                f"(limit {args.max_gb:g} GB)"
            )


if __name__ == "__main__":
    main()
