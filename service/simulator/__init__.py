"""The Copernica simulator: a faithful fake of the data-request API, for tests and demos."""

from .app import (
    SIM_STATE,
    Faults,
    SimRequest,
    SimState,
    SimulatorConfig,
    create_simulator_app,
    run_simulator,
)
from .payloads import PayloadSpec, make_events, payload_bytes, payload_chunks, payload_digest

__all__ = [
    "SIM_STATE",
    "Faults",
    "PayloadSpec",
    "SimRequest",
    "SimState",
    "SimulatorConfig",
    "create_simulator_app",
    "make_events",
    "payload_bytes",
    "payload_chunks",
    "payload_digest",
    "run_simulator",
]
