"""The Copernica simulator, unchanged, plus a record of when each API call arrived.

The simulator keeps only the largest number of calls it saw in any one second since it
started (`max_rps` in /_sim/state). A benchmark that seeds requests fast and then measures a
rate-limited phase needs that figure for the phase alone, so this wrapper adds two control
routes (under /_sim/, so they are neither counted nor authenticated):

- `GET /_sim/bench/calls` → `{"times": [...], "max_rps": N, "api_calls": N, "deliveries": N}`:
  the monotonic arrival time of every API call since the last reset (CLOCK_MONOTONIC, the
  same clock as `time.monotonic()` in any process of this machine);
- `POST /_sim/bench/reset` forgets those times and restarts the simulator's own `max_rps`
  window, keeping its requests.

    python bench/simulator.py --port P --access-token T [--ready-after S] [--payload-size B]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.simulator.app import SIM_STATE, SimState, SimulatorConfig, create_simulator_app


class RecordingState(SimState):
    def reset(self) -> None:
        super().reset()
        self.call_times: list[float] = []

    def count_call(self) -> None:
        super().count_call()
        self.call_times.append(time.monotonic())

    def restart_rate(self) -> None:
        self.call_times = []
        self.max_rps = 0
        self._window.clear()


def _state(request: web.Request) -> RecordingState:
    state = request.app[SIM_STATE]
    assert isinstance(state, RecordingState)
    return state


async def calls(request: web.Request) -> web.Response:
    state = _state(request)
    return web.json_response(
        {
            "times": state.call_times,
            "max_rps": state.max_rps,
            "api_calls": state.api_calls,
            "deliveries": len(state.deliveries),
        }
    )


async def restart(request: web.Request) -> web.Response:
    _state(request).restart_rate()
    return web.json_response({"status": "reset"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--access-token", default="dev-token")
    parser.add_argument("--ready-after", type=float, default=2.0)
    parser.add_argument("--payload-size", type=int, default=20_000)
    args = parser.parse_args()
    config = SimulatorConfig(
        access_token=args.access_token,
        ready_after=args.ready_after,
        payload_size=args.payload_size,
        control=True,
    )
    app = create_simulator_app(config)
    app[SIM_STATE] = RecordingState(config)
    app.router.add_get("/_sim/bench/calls", calls)
    app.router.add_post("/_sim/bench/reset", restart)
    web.run_app(app, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
