"""Runs test bodies on several CPU processes joined by a gloo process group, with a deadline.

RankPool(world_size) spawns world_size processes that join one gloo group (file:// rendezvous
in a fresh temporary directory, so no port can clash) and then serve tasks:
pool.run(body, *args) calls body(rank, world_size, *args) on every rank and returns the values in
rank order, or raises AssertionError with every failing rank's traceback, or, when ranks do not
report by the deadline (a hang), with the ranks that were stuck. Starting processes (importing
torch) is the slow part, so one pool serves many bodies. After a failure the pool restarts its
processes before the next body, so a broken group cannot leak into later tests. body must be a
module-level function (the processes import it by name).
"""
import datetime
import os
import queue
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _serve(rank, world_size, init_method, collective_timeout_s, tasks, results):
    torch.set_num_threads(1)  # several processes share few cores
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=collective_timeout_s))
    try:
        while True:
            task = tasks.get()
            if task is None:
                return
            number, body, args = task
            try:
                results.put((number, rank, True, body(rank, world_size, *args)))
            except BaseException:  # reported to the parent, which fails the test with it
                results.put((number, rank, False, traceback.format_exc()))
    finally:
        dist.destroy_process_group()
        # Skip the interpreter's teardown (seconds per process with torch loaded, on a busy machine)
        # once the reports have been flushed to the parent.
        results.close()
        results.join_thread()
        os._exit(0)


class RankPool:
    def __init__(self, world_size, collective_timeout_s=60):
        self.world_size = world_size
        self.collective_timeout_s = collective_timeout_s
        self.processes = []
        self.task_number = 0

    def _start(self):
        context = mp.get_context("spawn")
        self.directory = tempfile.TemporaryDirectory()
        init_method = "file://" + os.path.join(self.directory.name, "rendezvous")
        self.tasks = [context.Queue() for _ in range(self.world_size)]
        self.results = context.Queue()
        self.processes = [context.Process(target=_serve, daemon=True, args=(
            rank, self.world_size, init_method, self.collective_timeout_s, self.tasks[rank], self.results))
            for rank in range(self.world_size)]
        for process in self.processes:
            process.start()

    def run(self, body, *args, timeout_s=300):
        """body(rank, world_size, *args) on every rank; the values in rank order."""
        if not self.processes:
            self._start()
        self.task_number += 1
        for tasks in self.tasks:
            tasks.put((self.task_number, body, args))
        reports = {}
        deadline = time.monotonic() + timeout_s
        while len(reports) < self.world_size and time.monotonic() < deadline:
            try:
                number, rank, ok, value = self.results.get(timeout=1.0)
            except queue.Empty:
                if not any(process.is_alive() for process in self.processes):  # all died, some silently
                    break
                continue
            if number == self.task_number:
                reports[rank] = (ok, value)
        missing = [rank for rank in range(self.world_size) if rank not in reports]
        failures = [f"rank {rank}:\n{value}" for rank, (ok, value) in sorted(reports.items()) if not ok]
        if missing:
            failures.append(f"ranks {missing} did not report within {timeout_s} s (hung or died; exit codes "
                            f"{[self.processes[rank].exitcode for rank in missing]})")
        if failures:
            self.close()  # the next run starts fresh processes
            raise AssertionError(f"{body.__name__} on {self.world_size} ranks failed:\n" + "\n".join(failures))
        return [reports[rank][1] for rank in range(self.world_size)]

    def close(self):
        """Stops the processes this pool started: politely, then by kill after a grace period."""
        if not self.processes:
            return
        for tasks, process in zip(self.tasks, self.processes):
            if process.is_alive():
                tasks.put(None)
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
        self.processes = []
        self.directory.cleanup()
