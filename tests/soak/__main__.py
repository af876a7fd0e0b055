"""`python -m tests.soak --seconds N [--seed S] [--workdir DIR] [--s3 moto|seaweedfs]`: one
soak run, its table, and exit status 1 on any violated invariant (`make soak`; SOAK_SECONDS,
SOAK_SEED, SOAK_S3)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from .checker import Checker, audit_while_running, table
from .plan import make_plan
from .run import Outcome, play_faults, play_load, settle, summary
from .stack import STORES, Stack


async def soak(seconds: float, seed: int, workdir: Path, store: str = "moto") -> bool:
    plan = make_plan(seconds, seed)
    print(f"plan: {summary(plan)}", flush=True)
    outcome = Outcome(started=time.time())
    async with Stack(plan, workdir, store) as stack:
        print(f"stack up: 3 replicas behind nginx, {store} behind a fault proxy; logs in {workdir}")
        began = outcome.began = time.monotonic()
        stop_audit = asyncio.Event()
        auditor = asyncio.create_task(audit_while_running(stack, outcome, stop_audit))
        faults = asyncio.create_task(play_faults(stack, outcome, began))
        await play_load(stack, outcome, began)
        await faults
        outcome.load_ended = time.time()
        print(f"load and faults done after {time.monotonic() - began:.0f} s; settling", flush=True)
        await settle(stack, outcome, within=max(90.0, plan.retention + 60, plan.expiry + 30))
        print(f"{outcome.settle_state} after {time.monotonic() - began:.0f} s", flush=True)
        stop_audit.set()
        await auditor
        await stack.stop_replicas()  # SIGTERM: part of what is checked
        checker = Checker(stack, outcome)
        rows = await checker.run()
        exits = [f"{code} after {secs:.1f} s" for r in stack.replicas for code, secs in r.terms]
        state = stack.sim_state
        deliveries = Counter(str(d.status) for d in state.deliveries if d.kind == "payload")
        restarts = sum(r.starts - 1 for r in stack.replicas)
        refused = sum(r.refused_starts for r in stack.replicas)
        print(
            "\nfaults applied:\n  " + "\n  ".join(outcome.applied),
            f"\nfilings: {len(outcome.filed)} filed, {outcome.filing_retries} retries;"
            f" replica starts after the first: {restarts} ({refused} refused by the store check)",
            f"\nCopernica: {state.api_calls} API calls, most in one second {state.max_rps};"
            f" callback deliveries by answer: {dict(sorted(deliveries.items()))}",
            f"\nSIGTERM exits: {', '.join(exits)};"
            f" aiohttp's own noise (body writers, shutdown waiter): {checker.library_noise}",
        )
    print("\n" + table(rows))
    broken = [row for row in rows if row.violations]
    for row in broken:
        print(f"\nVIOLATED: {row.name}")
        for line in row.violations[:10]:
            print(f"  {line}")
    verdict = "FAILED" if broken else "all invariants hold"
    print(f"\nseed {seed}, {seconds:g} s on {store}: {verdict}")
    return not broken


def main() -> None:
    # The simulator runs in this process: a replica hanging up on its download (a kill, an
    # S3 fault) is part of the plan, not news; aiohttp would print a traceback for each.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--s3",
        choices=STORES,
        default=os.environ.get("SOAK_S3") or "moto",
        help="the S3 store behind the fault proxy (default: SOAK_S3, else moto)",
    )
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    print(
        f"soak: seed {seed}, {args.seconds:g} s on {args.s3} (again: make soak"
        f" SOAK_SEED={seed} SOAK_SECONDS={args.seconds:g} SOAK_S3={args.s3})",
        flush=True,
    )
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    sys.exit(0 if asyncio.run(soak(args.seconds, seed, workdir, args.s3)) else 1)


if __name__ == "__main__":
    main()
