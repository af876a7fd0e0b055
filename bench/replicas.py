"""Replica scaling behind nginx, and startup to ready.

1. **Replicas.** The same bounded load of small (~2 KB) valid callbacks, sent from this process
   (a separate one from every server) with an aiohttp client, goes three ways against the same
   moto S3 server in one run: straight to one replica (no load balancer), through nginx
   (deploy/nginx.conf, upstreams and listen port replaced by loopback ones exactly as
   tests/test_nginx.py does) to one replica, and through nginx to two replicas. The requests
   are real: a separate *filer* replica files them through the operator API
   (`POST /v1/data-requests`) while the simulator holds them back (ready in an hour, so it
   never delivers a callback itself); then the filer stops, and the callbacks go to the
   `report` addresses it gave Copernica (read back from the simulator), with the measured
   replicas' address in place of the public one: the production path, whose subject digest
   and token are in the address, so no replica reads a record. For each way and
   concurrency: req/s, p50/p99, CPU per callback summed over every service process, nginx
   (master and worker) and moto (and, apart, this load generator), how many cores that kept
   busy, moto's own share of a core, and S3 calls per callback (the replicas' /metrics,
   listings excepted); then 2 replicas / 1 replica and
   nginx / direct ratios. Every answer must be 200, and at the end the archive prefix must
   hold exactly one object per request.
2. **Startup.** `python -m service serve` (the same settings) is spawned several times; the
   time to its first `200` from `GET /readyz` is split into "listening" and "ready", beside
   the interpreter alone (`python -c pass`), `import service.app` alone and
   `python -X importtime`'s heaviest top-level imports. Target: < 1 s.

    .venv/bin/python bench/replicas.py [--count N] [--starts N]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.callbacks import drive, s3_calls, s3_calls_between
from bench.stack import ROOT, Stack, append_results, cpu_seconds, free_port, sized_body
from deploy.local_nginx import Nginx

DEFAULT_COUNT = 300
ROUNDS = 2
BODY_BYTES = 2_000
CONCURRENCY = (16, 64)
DEFAULT_STARTS = 5
FILING_CONCURRENCY = 32
SUBJECT = "bench@example.com"
PREFIX = "copernica/"
# Every service process of this benchmark: no drain period on SIGTERM (nothing routes to a
# stopping replica here), so a stop or restart takes no seconds of its own.
SERVICE_ENV = {"SHUTDOWN_DRAIN_SECONDS": "0"}
# The first steps of a start, each timed from inside the process (wall clock since the epoch,
# to compare with the spawn time, and CPU): interpreter start-up, `import service.app`, and
# creating the process's S3 client (aiobotocore loads botocore's S3 model then).
PHASES = """
import json, time
t0, c0 = time.time(), time.process_time()
import service.app
t1, c1 = time.time(), time.process_time()
import asyncio
from aiobotocore.session import get_session
async def main():
    async with get_session().create_client("s3", endpoint_url="{endpoint}"):
        t2, c2 = time.time(), time.process_time()
    print(json.dumps([t0, c0, t1, c1, t2, c2]))
asyncio.run(main())
"""


def log(text: str) -> None:
    print(text, flush=True)


@dataclass
class Row:
    """One way at one concurrency, summed over its rounds."""

    way: str
    concurrency: int
    n: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    # CPU seconds by part: service (all replicas), nginx (master + worker), moto, load (this
    # process), machine (every process on the machine, from /proc/stat)
    cpu: dict[str, float] = field(default_factory=dict)
    calls: float = 0.0  # S3 calls made by the replicas (listings excepted)

    def add(self, n: int, seconds: float, latencies: list[float], cpu: dict[str, float]) -> None:
        self.n += n
        self.seconds += seconds
        self.latencies += latencies
        for part, value in cpu.items():
            self.cpu[part] = self.cpu.get(part, 0.0) + value

    @property
    def rate(self) -> float:
        return self.n / self.seconds

    def ms_per_cb(self, *parts: str) -> float:
        return sum(self.cpu[part] for part in parts) / self.n * 1000

    @property
    def servers_ms(self) -> float:
        """CPU per callback of everything that serves it: replicas + nginx + moto."""
        return self.ms_per_cb(*SERVERS)

    def cores(self, *parts: str) -> float:
        """How many cores these parts kept busy on average."""
        return sum(self.cpu[part] for part in parts) / self.seconds

    def pct(self, q: int) -> float:
        return statistics.quantiles(self.latencies, n=100)[q - 1] * 1000


SERVERS = ("service", "nginx", "moto")


def total_cpu(pids: list[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def machine_cpu() -> float:
    """CPU seconds all processes on the machine spent (not idle, not waiting), from /proc/stat;
    steal counts as busy: that time was not ours to use."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle, iowait = fields[3], fields[4]
    return (sum(fields[:8]) - idle - iowait) / os.sysconf("SC_CLK_TCK")


def small_body(size: int = BODY_BYTES) -> bytes:
    return sized_body(SUBJECT, size)


async def replica_s3_calls(http: aiohttp.ClientSession, admin_url: str) -> float:
    """A replica's S3 calls so far, listings excepted."""
    calls, _ = s3_calls_between({}, await s3_calls(http, admin_url))
    return calls


def archive_ids(stack: Stack) -> list[str]:
    """The request id of every object under the archive prefix (with repeats, if any)."""
    import botocore.session

    s3 = botocore.session.get_session().create_client(
        "s3", endpoint_url=stack.endpoint, region_name="us-east-1"
    )
    ids: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=stack.bucket, Prefix=f"{PREFIX}archive/"
    ):
        ids.extend(Path(item["Key"]).stem for item in page.get("Contents", []))
    return ids


async def measure(
    http: aiohttp.ClientSession,
    row: Row,
    base: str,
    target: str,
    replicas: list[str],
    counted: dict[str, list[int]],
    reports: list[str],
) -> None:
    """One round: a callback to each of the `reports` addresses (public base URL `base`)
    through `target`, added to `row`."""
    urls = [report.replace(base, target, 1) for report in reports]

    async def healthz() -> None:
        async with http.get(f"{target}/healthz") as answer:
            await answer.read()
            assert answer.status == 200, answer.status

    # Warm the connections (client to nginx, nginx to the replicas) before the clock starts.
    for _ in range(2):
        await asyncio.gather(*(healthz() for _ in range(row.concurrency)))
    calls_before = sum([await replica_s3_calls(http, url) for url in replicas])
    before = {part: total_cpu(pids) for part, pids in counted.items()}
    load_before, machine_before = time.process_time(), machine_cpu()
    took, latencies = await drive(http, urls, small_body(), row.concurrency)
    cpu = {part: total_cpu(pids) - before[part] for part, pids in counted.items()}
    cpu["load"] = time.process_time() - load_before
    cpu["machine"] = machine_cpu() - machine_before
    row.calls += sum([await replica_s3_calls(http, url) for url in replicas]) - calls_before
    row.add(len(reports), took, latencies, cpu)


def scaling_tables(rows: list[Row]) -> list[str]:
    lines = [
        "| way | conc | req/s | p50/p99 ms | CPU ms/cb replicas+nginx+moto | "
        "= replicas / nginx / moto | load gen ms/cb | moto ms per S3 call | moto % of a core | "
        "cores busy: ours / machine | S3 calls/cb |",
        "|" + " --- |" * 11,
    ]
    for row in rows:
        lines.append(
            f"| {row.way} | {row.concurrency} | {row.rate:.1f} | "
            f"{row.pct(50):.0f}/{row.pct(99):.0f} | {row.servers_ms:.1f} | "
            f"{row.ms_per_cb('service'):.1f} / {row.ms_per_cb('nginx'):.2f} / "
            f"{row.ms_per_cb('moto'):.1f} | {row.ms_per_cb('load'):.1f} | "
            f"{row.cpu['moto'] / row.calls * 1000:.2f} | {row.cores('moto') * 100:.0f} | "
            f"{row.cores(*SERVERS, 'load'):.2f} / {row.cores('machine'):.2f} | "
            f"{row.calls / row.n:.2f} |"
        )
    lines += [
        "",
        "| conc | comparison | req/s ratio | p50 ratio | CPU/cb ratio (replicas+nginx+moto) |",
        "| --- | --- | --- | --- | --- |",
    ]
    by = {(row.way, row.concurrency): row for row in rows}
    for concurrency in CONCURRENCY:
        for name, top, bottom in (
            ("2 replicas / 1 replica (both via nginx)", WAYS[2], WAYS[1]),
            ("nginx / direct (1 replica)", WAYS[1], WAYS[0]),
        ):
            a, b = by[(top, concurrency)], by[(bottom, concurrency)]
            lines.append(
                f"| {concurrency} | {name} | {a.rate / b.rate:.2f} | "
                f"{a.pct(50) / b.pct(50):.2f} | {a.servers_ms / b.servers_ms:.2f} |"
            )
    return lines


def explanation(rows: list[Row]) -> list[str]:
    """Why it scales as it does, in the run's own figures."""
    cores = os.cpu_count() or 1
    n = sum(row.n for row in rows)
    seconds = sum(row.seconds for row in rows)
    spent = {part: sum(row.cpu[part] for row in rows) for part in (*SERVERS, "load", "machine")}
    per_cb = {part: value / n * 1000 for part, value in spent.items()}
    everything = sum(per_cb[part] for part in (*SERVERS, "load"))
    calls = sum(row.calls for row in rows)
    moto_call = spent["moto"] / calls * 1000
    ours = sum(spent[part] for part in (*SERVERS, "load")) / seconds
    machine = spent["machine"] / seconds
    best = max(rows, key=lambda row: row.rate)
    by = {(row.way, row.concurrency): row for row in rows}

    def ratios(top: str, bottom: str) -> str:
        return ", ".join(
            f"{by[(top, c)].rate / by[(bottom, c)].rate:.2f} (conc {c})" for c in CONCURRENCY
        )

    def cpu_ratios(top: str, bottom: str) -> str:
        return ", ".join(
            f"{by[(top, c)].servers_ms / by[(bottom, c)].servers_ms:.2f}" for c in CONCURRENCY
        )

    return [
        "Why it scales as it does (figures of this run):",
        "",
        f"- One callback costs {everything:.1f} ms of CPU in all: replicas "
        f"{per_cb['service']:.1f}, nginx {per_cb['nginx']:.2f}, moto {per_cb['moto']:.1f} "
        f"({calls / n:.1f} S3 calls at {moto_call:.1f} ms each), load generator "
        f"{per_cb['load']:.1f}. All of it runs on the same {cores} cores, so even perfectly "
        f"parallel this machine cannot pass about {cores * 1000 / everything:.0f} callbacks/s, "
        "however many replicas share those cores; with the "
        f"{ours:.2f} cores this benchmark actually got (below), about "
        f"{ours * 1000 / everything:.0f}/s; the ways measured "
        f"{min(row.rate for row in rows):.0f} to {max(row.rate for row in rows):.0f}/s.",
        f"- moto is a single Python process: with a whole core to itself it could serve at most "
        f"~{1000 / moto_call:.0f} S3 calls/s = ~{1000 / per_cb['moto']:.0f} callbacks/s "
        f"(CPU alone; its threads also contend for one GIL). The best way here reached "
        f"{best.rate:.0f} callbacks/s = {best.rate * best.calls / best.n:.0f} S3 calls/s "
        f"({best.way}, conc {best.concurrency}), with moto at {best.cores('moto') * 100:.0f}% "
        "of a core. A second replica adds a process, not a core and not S3 capacity: it "
        "takes over replica work that was not the limit, so 2 / 1 replicas = "
        f"{ratios(WAYS[2], WAYS[1])}. Spreading the same load over two event loops "
        f"tends to cost a little more CPU per callback ({cpu_ratios(WAYS[2], WAYS[1])}): "
        "each loop wakes up for fewer requests at a time, and two S3 connection pools mean "
        "more connections (and moto threads) for the same calls.",
        f"- nginx itself costs {per_cb['nginx']:.2f} ms CPU per callback (one worker, "
        "keepalive to the replicas) — under a tenth of a replica's cost — plus one more "
        f"loopback hop; nginx / direct = {ratios(WAYS[1], WAYS[0])}: within the noise "
        "of a shared machine.",
        f"- The machine was {machine:.2f} of {cores} cores busy on average while measuring; "
        f"this benchmark's processes used {ours:.2f} and other processes on the machine "
        f"{max(0.0, machine - ours):.2f}"
        + (
            ", so the figures are bound by contention for the cores, and ratios between ways "
            "vary by ~±20% from run to run."
            if machine - ours > 0.3
            else "."
        ),
        f"- With real S3 (its CPU not ours) and a core per replica, a replica's own "
        f"{per_cb['service']:.1f} ms/callback (~{1000 / per_cb['service']:.0f} callbacks/s per "
        "core) would be the limit, and that does grow with replicas; this machine cannot show "
        "it.",
    ]


WAYS = ("direct, 1 replica", "nginx + 1 replica", "nginx + 2 replicas")


async def scaling(stack: Stack, count: int, workdir: Path) -> list[str]:
    n = max(count, max(CONCURRENCY))
    per_round = [n // ROUNDS + (1 if k < n % ROUNDS else 0) for k in range(ROUNDS)]
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=300), connector=aiohttp.TCPConnector(limit=200)
    ) as http:
        started = time.perf_counter()
        reports = await stack.file_requests(
            http, SUBJECT, n * len(WAYS) * len(CONCURRENCY), concurrency=FILING_CONCURRENCY
        )
        ids = list(reports)
        log(
            f"filed {len(ids)} requests through the filer replica in "
            f"{time.perf_counter() - started:.1f} s"
        )
    # The filer stops: the measured replicas neither filed nor polled (cold callbacks).
    stack.stop_service()
    ports, admin_ports = [free_port(), free_port()], [free_port(), free_port()]
    replicas = [
        stack.spawn(
            ["-m", "service", "serve"],
            env=stack.service_environment({"PORT": str(port), "ADMIN_PORT": str(admin)}),
            port=port,
        )
        for port, admin in zip(ports, admin_ports, strict=True)
    ]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    admin_urls = [f"http://127.0.0.1:{port}" for port in admin_ports]
    moto = stack.procs[0]
    rows: list[Row] = []
    unused = list(reports.values())
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=300), connector=aiohttp.TCPConnector(limit=200)
    ) as http:
        for concurrency in CONCURRENCY:
            by_way = {way: Row(way, concurrency) for way in WAYS}
            # Rounds in alternating order (A B C, C B A, ...), so a drift in the machine's
            # background load weighs on every way alike.
            for k, size in enumerate(per_round):
                for way in WAYS if k % 2 == 0 else reversed(WAYS):
                    pool = ports if way == WAYS[2] else ports[:1]
                    proxy = None
                    if way != WAYS[0]:
                        site_dir = Path(tempfile.mkdtemp(dir=workdir))
                        proxy = Nginx(site_dir, pool, free_port()).start()
                    batch, unused = unused[:size], unused[size:]
                    try:
                        counted = {
                            "service": [proc.pid for proc in replicas],  # the idle one too
                            "nginx": proxy.pids if proxy else [],
                            "moto": [moto.pid],
                        }
                        target = proxy.url if proxy else urls[0]
                        await measure(
                            http, by_way[way], stack.url, target, admin_urls, counted, batch
                        )
                    finally:
                        if proxy is not None:
                            proxy.stop()
            for row in by_way.values():
                rows.append(row)
                log(
                    f"  {row.way:20} conc {concurrency:3}: {row.rate:6.1f} req/s, "
                    f"p50/p99 {row.pct(50):.0f}/{row.pct(99):.0f} ms, "
                    f"{row.servers_ms:.1f} CPU ms/cb (replicas {row.ms_per_cb('service'):.1f}, "
                    f"nginx {row.ms_per_cb('nginx'):.2f}, moto {row.ms_per_cb('moto'):.1f}), "
                    f"moto {row.cores('moto') * 100:.0f}% of a core, "
                    f"machine {row.cores('machine'):.2f} cores busy, "
                    f"{row.calls / row.n:.2f} S3 calls/cb"
                )
    assert not unused
    stored = archive_ids(stack)
    assert sorted(stored) == sorted(ids), (
        f"{len(stored)} archive objects ({len(set(stored))} distinct) for {len(ids)} requests"
    )
    return [
        *scaling_tables(rows),
        "",
        f"- Each way and concurrency: {n} callbacks of {len(small_body())} bytes in {ROUNDS} "
        f"rounds (ways alternating), every answer 200. {len(ids)} requests were filed through "
        "the API (`POST /v1/data-requests`, a filer replica stopped before the load; each "
        "callback to the `report` address it gave Copernica); the archive prefix then held "
        "exactly "
        f"{len(stored)} objects, one per request. CPU from /proc/PID/stat; nginx = master + "
        "worker (worker_processes 1, as in tests/test_nginx.py); replicas = both service "
        "processes, the idle one too; machine = /proc/stat, every process on it. CPU is read "
        f"in clock ticks ({1000 // os.sysconf('SC_CLK_TCK')} ms): nginx's figure is a tick or "
        "two per round.",
        "",
        *explanation(rows),
    ]


def phases(endpoint: str) -> dict[str, tuple[float, float]]:
    """One run of PHASES: (wall, CPU) seconds of each step."""
    spawned = time.time()
    done = subprocess.run(
        [sys.executable, "-c", PHASES.format(endpoint=endpoint)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    t0, c0, t1, c1, t2, c2 = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "interpreter start-up": (t0 - spawned, c0),
        "`import service.app`": (t1 - t0, c1 - c0),
        "create the aiobotocore S3 client": (t2 - t1, c2 - c1),
    }


def import_times(top: int = 8) -> tuple[float, list[tuple[str, float]]]:
    """`python -X importtime -c 'import service.app'`: its total, and the import time of each
    top-level package (the self time of all its modules, so the parts add up to the total)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import service.app"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    by_package: dict[str, float] = {}
    total = 0.0
    for line in done.stderr.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)", line)
        if match is None:
            continue
        package = match.group(4).split(".")[0]
        by_package[package] = by_package.get(package, 0.0) + int(match.group(1)) / 1e6
        if match.group(4) == "service.app":
            total = int(match.group(2)) / 1e6
    return total, sorted(by_package.items(), key=lambda item: -item[1])[:top]


def startup_once(stack: Stack) -> tuple[float, float, float]:
    """Spawn the service: seconds to its port accepting and to the first 200 from /readyz, and
    the CPU seconds it had spent by then."""
    port = free_port()
    env = stack.service_environment({"PORT": str(port), "ADMIN_PORT": str(free_port())})
    started = time.perf_counter()
    proc = stack.spawn(["-m", "service", "serve"], env=env)
    listening = None
    try:
        while time.perf_counter() - started < 30:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/readyz")
                if listening is None:
                    listening = time.perf_counter() - started
                status = conn.getresponse().status
                conn.close()
                if status == 200:
                    return listening, time.perf_counter() - started, cpu_seconds(proc.pid)
            except OSError:
                pass
            time.sleep(0.005)
            if proc.poll() is not None:
                raise RuntimeError(f"service exited with {proc.returncode} while starting")
        raise RuntimeError("service not ready within 30 s")
    finally:
        stack.stop_process(proc)


def startup(stack: Stack, starts: int) -> list[str]:
    listen, ready, ready_cpu = [], [], []
    began, machine_before = time.perf_counter(), machine_cpu()
    for k in range(starts):
        to_listen, to_ready, cpu = startup_once(stack)
        listen.append(to_listen)
        ready.append(to_ready)
        ready_cpu.append(cpu)
        log(
            f"  start {k + 1}: listening after {to_listen:.3f} s, ready after {to_ready:.3f} s, "
            f"{cpu:.3f} s CPU"
        )
    busy = (machine_cpu() - machine_before) / (time.perf_counter() - began)
    steps = [phases(stack.endpoint) for _ in range(starts)]
    total, heavy = import_times()
    med = statistics.median

    def line(name: str, values: list[float], cpu: list[float] | None = None) -> str:
        return (
            f"| {name} | {min(values):.3f} | {med(values):.3f} | {max(values):.3f} | "
            f"{f'{med(cpu):.3f}' if cpu else 'n/a'} |"
        )

    median = med(ready)
    wall = {name: [run[name][0] for run in steps] for name in steps[0]}
    spent = {name: [run[name][1] for run in steps] for name in steps[0]}
    rest_wall = median - sum(med(values) for values in wall.values())
    rest_cpu = med(ready_cpu) - sum(med(values) for values in spent.values())
    lines = [
        f"Target: < 1 s from spawn to ready. Wall clock: median {median:.3f} s, max "
        f"{max(ready):.3f} s: {'met' if max(ready) < 1 else 'NOT met'}. CPU spent by the "
        f"process up to ready: median {med(ready_cpu):.3f} s, i.e. about that long on a core "
        f"of its own; the machine was {busy:.2f} of {os.cpu_count()} cores busy during the "
        "starts (a start alone keeps about one busy; more means other processes competed).",
        "",
        f"| {starts} runs each | wall min s | wall median s | wall max s | CPU median s |",
        "| --- | --- | --- | --- | --- |",
        line("spawn `python -m service serve` → first 200 from `/readyz`", ready, ready_cpu),
        *(line(f"- of which: {name}", wall[name], spent[name]) for name in wall),
        f"| - of which: the rest (CLI, settings, app, poller, listener, first `/readyz` with "
        f"its S3 call), by difference | | {rest_wall:.3f} | | {rest_cpu:.3f} |",
        line("spawn → port accepts (the listener is up)", listen),
        "",
        "The steps are timed inside a separate `python -c` process (see PHASES in "
        "bench/replicas.py), the same imports and client as `serve`.",
        "",
        f"`python -X importtime -c 'import service.app'` (one run): {total:.3f} s in all; "
        "by top-level package (self time of all its modules), the heaviest:",
        "",
        "| package | import s | share |",
        "| --- | --- | --- |",
        *(
            f"| {name} | {seconds:.3f} | {seconds / total:.0%} |"
            for name, seconds in heavy
            if total
        ),
    ]
    return lines


async def run(count: int, starts: int) -> None:
    began = time.perf_counter()
    stack = Stack(service_env=SERVICE_ENV).start()  # its service is the filer
    try:
        log(f"startup to ready, {starts} starts:")
        start_lines = startup(stack, starts)
        log("\n".join(start_lines))
        log("replicas:")
        with tempfile.TemporaryDirectory(prefix="bench-nginx-") as workdir:
            lines = await scaling(stack, count, Path(workdir))
    finally:
        stack.stop()
    log("\n".join(lines))
    log(f"whole run: {time.perf_counter() - began:.0f} s")
    append_results("Replicas behind nginx", lines)
    append_results("Startup to ready", start_lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--count", type=int, default=DEFAULT_COUNT, help="callbacks per way and concurrency"
    )
    parser.add_argument("--starts", type=int, default=DEFAULT_STARTS, help="service starts")
    args = parser.parse_args()
    asyncio.run(run(args.count, args.starts))


if __name__ == "__main__":
    main()
