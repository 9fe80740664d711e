"""The demo's trainings as jobs over the machine's threads: each job runs in a spawned worker process on its
share of the threads, as soon as the jobs it needs have finished and enough threads are free.

Why: the mini encoders' and the SpeechCLIP head's small matrix products use a second thread poorly (a mini
HuBERT step 1.33x faster on two threads than on one, a mini CLIP step 1.56x), while two one-thread processes
side by side do about 1.7x the work of one (RESULTS.md "demo stages", stop 28). So the demo pre-trains the
mini CLIP and the mini HuBERT side by side, one thread each, trains the control beside the mini HuBERT once
the mini CLIP is done, and gives the pretrained SpeechCLIP run every thread when nothing else is left.

A job's thread count is fixed in advance, never timed by the clock: thread counts change a step's rounding,
so a switch at the moment another job ends would make the model depend on the machine's load. What the clock
decides is only when a job starts.
"""

from __future__ import annotations

import gc
import multiprocessing
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..quiet import quiet_libraries
from .memory import release_free_memory

HEARTBEAT_SECONDS = 60.0  # a line while jobs run: the workers print little of their own


@dataclass
class Job:
    """`function(*args)` in a worker, after the jobs named in `after`; on one lane's share of the threads, or
    on every thread with nothing else running (`whole_machine`)."""

    name: str
    function: Callable[..., Any]
    args: tuple = ()
    after: tuple[str, ...] = ()
    whole_machine: bool = False


@dataclass
class Schedule:
    """What ran: each job's result, its start and end (seconds from the schedule's start), its threads, and
    the jobs that failed or were skipped because a job they needed failed."""

    results: dict[str, Any] = field(default_factory=dict)
    spans: dict[str, tuple[float, float]] = field(default_factory=dict)
    threads: dict[str, int] = field(default_factory=dict)
    failures: dict[str, BaseException] = field(default_factory=dict)

    def raise_first_failure(self) -> None:
        for error in self.failures.values():
            raise error


def _in_worker(threads: int, function: Callable[..., Any], *args) -> Any:
    quiet_libraries()
    torch.set_num_threads(threads)
    try:
        return function(*args)
    finally:  # a worker runs several jobs: hand what this one freed back before the next (the old stages did)
        gc.collect()
        release_free_memory()


def runs_in_workers(threads: int, lanes: int = 2) -> bool:
    """Whether `run_jobs` uses worker processes here (else it runs the jobs one after the other in this one)."""
    return threads >= 2 and lanes >= 2 and not torch.cuda.is_available()


def run_jobs(jobs: list[Job], threads: int, lanes: int = 2) -> Schedule:
    """Run `jobs` (in list order among those ready) on `lanes` worker processes of threads // lanes threads
    each; with fewer than two threads, or on a GPU, one after the other in this process on every thread.
    A failed job is reported at once; the jobs that need it are skipped, the others go on."""
    names = [job.name for job in jobs]
    for job in jobs:
        unknown = [name for name in job.after if name not in names[: names.index(job.name)]]
        if unknown:
            raise ValueError(f"job {job.name!r}: runs after {unknown}, which are not jobs listed before it")
    schedule = Schedule()
    if runs_in_workers(threads, lanes):
        _run_in_workers(jobs, threads, lanes, schedule)
    else:
        _run_in_process(jobs, threads, schedule)
    return schedule


def _blocked_by(job: Job, schedule: Schedule) -> str | None:
    """Why `job` cannot run any more (a job it needs failed), or None."""
    return next((f"{name} failed" for name in job.after if name in schedule.failures), None)


def _skip(job: Job, reason: str, schedule: Schedule) -> None:
    schedule.failures[job.name] = RuntimeError(f"{job.name}: not run, since {reason}")
    print(f"[demo] {job.name}: not run, since {reason}", flush=True)


def _fail(job: Job, error: BaseException, schedule: Schedule) -> None:
    schedule.failures[job.name] = error
    print(f"[demo] {job.name}: failed: {error!r}", flush=True)


def _run_in_process(jobs: list[Job], threads: int, schedule: Schedule) -> None:
    started = time.perf_counter()
    for job in jobs:
        blocker = _blocked_by(job, schedule)
        if blocker:
            _skip(job, blocker, schedule)
            continue
        begin = round(time.perf_counter() - started, 1)
        try:
            schedule.results[job.name] = job.function(*job.args)
        except Exception as error:  # noqa: BLE001 - reported, and the jobs that do not need it go on
            _fail(job, error, schedule)
        finally:
            gc.collect()
            release_free_memory()
        schedule.spans[job.name] = (begin, round(time.perf_counter() - started, 1))
        schedule.threads[job.name] = torch.get_num_threads()


def _run_in_workers(jobs: list[Job], threads: int, lanes: int, schedule: Schedule) -> None:
    """Ready jobs start in list order: one that does not fit yet (a whole-machine job while another runs) holds
    back the jobs after it, so it is not overtaken for ever."""
    share = max(1, threads // lanes)
    pending = list(jobs)
    running: dict[Future, tuple[Job, float]] = {}
    started = time.perf_counter()
    broken = False  # a worker died (killed: out of memory?): the pool takes no more jobs
    with ProcessPoolExecutor(lanes, mp_context=multiprocessing.get_context("spawn")) as pool:
        while pending or running:
            for job in list(pending):
                blocker = _blocked_by(job, schedule) or ("a worker process died" if broken else None)
                if blocker:
                    pending.remove(job)
                    _skip(job, blocker, schedule)
                    continue
                if not all(name in schedule.results for name in job.after):
                    continue
                wanted = threads if job.whole_machine else share
                busy = sum(schedule.threads[j.name] for j, _ in running.values())
                if busy + wanted > threads or len(running) >= lanes:
                    break
                pending.remove(job)
                schedule.threads[job.name] = wanted
                now = round(time.perf_counter() - started, 1)
                print(f"[demo] {job.name}: started at {now:.0f} s on {wanted} thread{'s' * (wanted > 1)}", flush=True)
                running[pool.submit(_in_worker, wanted, job.function, *job.args)] = (job, now)
            if not running:
                if pending:  # cannot happen: every job waits only on jobs listed before it (run_jobs checks)
                    raise RuntimeError(f"jobs {[j.name for j in pending]} can never start")
                break
            done, _ = wait(running, timeout=HEARTBEAT_SECONDS, return_when=FIRST_COMPLETED)
            now = round(time.perf_counter() - started, 1)
            if not done:
                print(f"[demo] {now:.0f} s: running " + ", ".join(j.name for j, _ in running.values()), flush=True)
            for future in done:
                job, begin = running.pop(future)
                schedule.spans[job.name] = (begin, now)
                try:
                    schedule.results[job.name] = future.result()
                    print(f"[demo] {job.name}: done at {now:.0f} s ({now - begin:.0f} s)", flush=True)
                except BrokenProcessPool:
                    broken = True
                    _fail(job, RuntimeError(f"{job.name}: stopped, since a worker process died (killed: out of memory? "
                                            "the demo's peak is about 4.4 GiB)"), schedule)
                except Exception as error:  # noqa: BLE001 - reported, and the jobs that do not need it go on
                    _fail(job, error, schedule)
