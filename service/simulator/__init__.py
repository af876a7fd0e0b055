"""The Copernica simulator: a faithful fake of the data-request API, for tests and demos."""

from .app import (
    COPERNICA_KEY_ID,
    SIM_STATE,
    CopernicaSigner,
    Delivery,
    Faults,
    SimRequest,
    SimState,
    SimulatorConfig,
    SubjectPlan,
    create_simulator_app,
    run_simulator,
    subject_key,
)
from .payloads import (
    PayloadSpec,
    make_events,
    payload_bytes,
    payload_chunks,
    payload_digest,
    payload_size,
)

__all__ = [
    "COPERNICA_KEY_ID",
    "SIM_STATE",
    "CopernicaSigner",
    "Delivery",
    "Faults",
    "PayloadSpec",
    "SimRequest",
    "SimState",
    "SimulatorConfig",
    "SubjectPlan",
    "create_simulator_app",
    "make_events",
    "payload_bytes",
    "payload_chunks",
    "payload_digest",
    "payload_size",
    "run_simulator",
    "subject_key",
]
