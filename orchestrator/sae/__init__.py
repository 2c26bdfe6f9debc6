"""SAE OpenAPI access: V3 request signing, credentials, and the async change-order client.

Modules: ``signer`` (ACS3-HMAC-SHA256, shared with the simulator), ``credentials`` (provider
protocol, static and default-chain sources), ``transport`` (the one aiohttp exchange),
``client`` (``SaeClient``: policy, parsing), ``errors`` (classified failures and the
``is_retryable`` / ``is_ambiguous`` helpers), ``models`` (``CallOutcome`` and typed results).
"""

from orchestrator.sae.client import SaeClient
from orchestrator.sae.credentials import (
    Credentials,
    CredentialsError,
    CredentialsProvider,
    DefaultChainCredentials,
    StaticCredentials,
)
from orchestrator.sae.errors import (
    SaeBusy,
    SaeCallError,
    SaeNotRunning,
    SaePermanentError,
    SaeServerError,
    SaeThrottled,
    SaeTransportError,
    TransportKind,
    classify,
    is_ambiguous,
    is_retryable,
)
from orchestrator.sae.models import (
    TERMINAL_STATUSES,
    AbortResult,
    AppStatus,
    CallOutcome,
    ChangeOrder,
    ChangeOrderPage,
    ChangeOrderStatus,
    ChangeOrderSummary,
    Classification,
    Pipeline,
)

__all__ = [
    "TERMINAL_STATUSES",
    "AbortResult",
    "AppStatus",
    "CallOutcome",
    "ChangeOrder",
    "ChangeOrderPage",
    "ChangeOrderStatus",
    "ChangeOrderSummary",
    "Classification",
    "Credentials",
    "CredentialsError",
    "CredentialsProvider",
    "DefaultChainCredentials",
    "Pipeline",
    "SaeBusy",
    "SaeCallError",
    "SaeClient",
    "SaeNotRunning",
    "SaePermanentError",
    "SaeServerError",
    "SaeThrottled",
    "SaeTransportError",
    "StaticCredentials",
    "TransportKind",
    "classify",
    "is_ambiguous",
    "is_retryable",
]
