"""Test Connection from the command line: tenant files loaded and checked as the operator runs them."""

import re
from pathlib import Path

from contracts import ConnectionReport, TenantConfig
from contracts._base import TENANT_ID_PATTERN
from worker.connection_check.probes import check_connection, stored_timeout_s
from worker.providers.egress import EgressPolicy, egress_session
from worker.providers.pool import ProviderPool
from worker.tenants import TenantConfigError, load_tenant_file


class DraftError(Exception):
    """A tenant file given on the command line does not validate."""


def load_draft(path: Path) -> TenantConfig:
    """A tenant file not yet saved, checked by the same validator as `run` and `tenants validate`."""
    try:
        return load_tenant_file(path)
    except TenantConfigError as exc:
        raise DraftError("\n".join(map(str, exc.problems))) from None


def load_stored(tenants_dir: Path, tenant_id: str) -> TenantConfig:
    if not re.fullmatch(TENANT_ID_PATTERN, tenant_id):
        raise DraftError(f"{tenant_id!r} is not a tenant id")
    path = tenants_dir / f"{tenant_id}.toml"
    if not path.exists():
        raise DraftError(f"{path} does not exist")
    try:
        return load_tenant_file(path)
    except TenantConfigError as exc:
        raise DraftError("\n".join(map(str, exc.problems))) from None


async def check_tenant(tenant: TenantConfig, timeout_s: float | None) -> ConnectionReport:
    """Test Connection as the operator runs it: the worker's own network and secrets, the stored-tenant policy."""
    async with egress_session(EgressPolicy()) as session:
        pool = ProviderPool(session)
        return await check_connection(tenant.provider, pool.build, timeout_s or stored_timeout_s(tenant))
