"""Does writing the environment crash a process that has started and shut down Ray clusters?

Ray 2.60's driver leaves threads of each session running after ``ray.shutdown`` (its metrics
exporter among them, which keeps trying its dead node), and they read the process's environment.
``os.environ[...] = ...`` calls ``setenv``, which is not safe against a ``getenv`` in another
thread. This script starts and shuts down ``--sessions`` one-CPU clusters, each running one task,
then sets and deletes four variables of up to 5,000 characters in a loop for ``--seconds``. It
prints how many rounds it survived, or the process dies of a segmentation fault (exit 139).

    python -m workloads.ray_env_race --sessions 12 --seconds 60

This is why the suite's environment fuzz tests patch ``os.environ`` instead of writing it
(tests/unit/test_fuzz_inputs.py), and why ``./run test`` runs the suite in a few processes.
"""

from __future__ import annotations

import argparse
import os
import random
import time

import ray


def start_and_stop(sessions: int) -> None:
    """Starts and shuts down ``sessions`` local clusters, each running one task."""
    for _ in range(sessions):
        ray.init(num_cpus=1, object_store_memory=80 * 1024**2, include_dashboard=False, log_to_driver=False)
        try:
            ray.get(ray.remote(lambda: 1).remote())
        finally:
            ray.shutdown()


def write_environment(seconds: float, seed: int = 0) -> int:
    """Sets and deletes four variables in a loop for ``seconds``, saying every 5 s how far it
    got (the last line before a crash tells when it came); returns the rounds done."""
    rng = random.Random(seed)
    names = [f"TRIMS_RAY_ENV_RACE_{i}" for i in range(4)]
    started = time.monotonic()
    said = started
    rounds = 0
    while (now := time.monotonic()) < started + seconds:
        for name in names:
            os.environ[name] = "9" * rng.randint(0, 5000)
        for name in names:
            del os.environ[name]
        rounds += 1
        if now - said >= 5.0:
            print(f"ray_env_race: {rounds} rounds in {now - started:.0f} s", flush=True)
            said = now
    return rounds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=12, help="Ray sessions to start and shut down first")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to write the environment")
    args = parser.parse_args(argv)
    if args.sessions < 0 or args.seconds <= 0:
        parser.error("--sessions must be >= 0 and --seconds > 0")
    started = time.monotonic()
    start_and_stop(args.sessions)
    print(f"ray_env_race: {args.sessions} Ray session(s) started and shut down in {time.monotonic() - started:.0f} s", flush=True)
    started = time.monotonic()
    rounds = write_environment(args.seconds)
    print(f"ray_env_race: survived {rounds} rounds in {time.monotonic() - started:.1f} s", flush=True)


if __name__ == "__main__":
    main()
