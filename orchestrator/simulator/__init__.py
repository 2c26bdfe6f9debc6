"""A local SAE change-order API: the demo's backend, every test's and benchmark's target.

Speaks the official SDK's wire protocol for AbortAndRollbackChangeOrder, DescribeChangeOrder,
ListChangeOrders and DescribeApplicationStatus (plus the seed's legacy v5 abort path), verifies
ACS3-HMAC-SHA256 signatures, keeps apps and change orders in a state machine, and takes
``/_sim/*`` control calls to create orders, make apps busy and inject faults. See ``app.py`` for
the HTTP surface, ``state.py`` for the rules, ``faults.py`` for fault modes, ``auth.py`` for the
gateway checks.
"""

from orchestrator.simulator.app import (
    ACTIONS,
    DEFAULT_ACCESS_KEY_ID,
    DEFAULT_ACCESS_KEY_SECRET,
    DEMO_APP_ID,
    SimulatorServer,
    build_app,
    seed_demo,
    serve_forever,
)
from orchestrator.simulator.faults import Fault, FaultBook
from orchestrator.simulator.state import CallBudget, ChangeOrder, CoStatus, SimState

__all__ = [
    "ACTIONS",
    "DEFAULT_ACCESS_KEY_ID",
    "DEFAULT_ACCESS_KEY_SECRET",
    "DEMO_APP_ID",
    "CallBudget",
    "ChangeOrder",
    "CoStatus",
    "Fault",
    "FaultBook",
    "SimState",
    "SimulatorServer",
    "build_app",
    "seed_demo",
    "serve_forever",
]
