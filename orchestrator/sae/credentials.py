"""Credentials for signing SAE calls: the provider protocol, a static source, the default chain.

The client asks its :class:`CredentialsProvider` on **every** call, so a provider that refreshes
STS tokens (RRSA/OIDC, RAM role, ECS metadata) is honoured without the client caching anything.
:class:`DefaultChainCredentials` wraps ``alibabacloud_credentials``' default chain (environment,
RRSA/OIDC, CLI and INI profiles, ECS RAM role, credentials URI), which caches and refreshes
itself. :class:`StaticCredentials` serves a fixed pair (tests, the built-in simulator).

Secrets never leave this module in text form: :class:`Credentials` hides the secret and the
token in ``repr``/``str``, and a failure to obtain credentials is reported without them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from orchestrator.errors import ConfigError

if TYPE_CHECKING:
    from alibabacloud_credentials.client import Client as CredentialClient

__all__ = [
    "Credentials",
    "CredentialsError",
    "CredentialsProvider",
    "DefaultChainCredentials",
    "StaticCredentials",
]

# A library message longer than this is cut: the chain's message lists every provider's failure.
_MAX_DETAIL = 500


class CredentialsError(ConfigError):
    """No usable credentials could be obtained; the message says why, without any secret."""


@dataclass(frozen=True)
class Credentials:
    """One access key pair (and STS token) used to sign a request.

    ``provider_name`` becomes the signed ``x-acs-credentials-provider`` header, as the SDK sends
    it (``static_ak``, ``static_sts``, ``default/env``, ``default/ecs_ram_role`` ...).
    """

    access_key_id: str
    access_key_secret: str = field(repr=False)
    security_token: str | None = field(default=None, repr=False)
    provider_name: str = "static_ak"

    def __repr__(self) -> str:
        token = "yes" if self.security_token else "no"
        return (
            f"Credentials(access_key_id={self.access_key_id!r}, "
            f"provider_name={self.provider_name!r}, security_token={token}, secret=***)"
        )

    __str__ = __repr__

    @property
    def is_sts(self) -> bool:
        """True for temporary STS credentials (they add ``x-acs-security-token``)."""
        return bool(self.security_token)


@runtime_checkable
class CredentialsProvider(Protocol):
    """Where the client gets credentials, once per call."""

    async def get(self) -> Credentials:
        """Current credentials; raises :class:`CredentialsError` when none can be obtained."""
        ...


class StaticCredentials:
    """A fixed key pair, optionally with an STS token (tests and the built-in simulator)."""

    def __init__(
        self, access_key_id: str, access_key_secret: str, security_token: str | None = None
    ) -> None:
        if not access_key_id or not access_key_secret:
            raise CredentialsError("static credentials need a non-empty access key id and secret")
        self._credentials = Credentials(
            access_key_id=access_key_id,
            access_key_secret=access_key_secret,
            security_token=security_token or None,
            provider_name="static_sts" if security_token else "static_ak",
        )

    def __repr__(self) -> str:
        return f"StaticCredentials({self._credentials!r})"

    async def get(self) -> Credentials:
        """The configured credentials."""
        return self._credentials


class DefaultChainCredentials:
    """Credentials from the Alibaba Cloud default chain via ``alibabacloud_credentials``.

    The library client is created on first use (never in the constructor, which does no I/O).
    Pass ``client`` to use a specific ``alibabacloud_credentials.client.Client`` (e.g. one built
    with an explicit provider).
    """

    def __init__(self, client: CredentialClient | None = None) -> None:
        self._client: Any = client

    def __repr__(self) -> str:
        return "DefaultChainCredentials()"

    async def get(self) -> Credentials:
        """Fetch credentials from the chain (it caches and refreshes STS tokens itself)."""
        try:
            if self._client is None:
                # Imported lazily: the library pulls in APScheduler and its own HTTP stack.
                from alibabacloud_credentials.client import Client as CredentialClient

                self._client = CredentialClient()
            model = await self._client.get_credential_async()
        except Exception as exc:
            raise CredentialsError(
                "could not obtain Alibaba Cloud credentials from the default chain "
                "(env ALIBABA_CLOUD_ACCESS_KEY_ID/_SECRET, RRSA/OIDC, ~/.aliyun/config.json, "
                f"~/.alibabacloud/credentials.ini, ECS RAM role): {_detail(exc)}"
            ) from exc
        access_key_id = getattr(model, "access_key_id", None)
        access_key_secret = getattr(model, "access_key_secret", None)
        if not access_key_id or not access_key_secret:
            raise CredentialsError(
                "the Alibaba Cloud credential chain returned no access key id or secret"
            )
        token = getattr(model, "security_token", None)
        provider_name = getattr(model, "provider_name", None) or getattr(model, "type", None)
        return Credentials(
            access_key_id=str(access_key_id),
            access_key_secret=str(access_key_secret),
            security_token=str(token) if token else None,
            provider_name=str(provider_name) if provider_name else "default",
        )


def _detail(exc: BaseException) -> str:
    # The library's messages name providers and files, not secrets; cut them to a sane length.
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."
