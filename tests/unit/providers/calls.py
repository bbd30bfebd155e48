"""Model calls built from the sample incident exactly as the handler builds them, and the CLI run in-process."""

import argparse
import asyncio
from typing import Any

from contracts import InferenceRequest, TenantConfig
from tests import samples
from worker import cli
from worker.prompting.prompts import build_call
from worker.providers.base import ModelCall


def call_for(task: str, provider: dict[str, Any], **fields: Any) -> ModelCall:
    tenant = TenantConfig.model_validate({"tenant_id": "acme", "provider": provider, "limits": {"timeout_s": 2}})
    request = InferenceRequest.model_validate(samples.request("acme", task, **fields))
    return build_call(request, tenant).call


async def run_test_connection(*argv: str) -> int:
    """`atlas-worker test-connection ARGV` as parsed and run by the CLI, leaving the test process's logging alone.

    The command runs its own event loop, so it runs in a thread, keeping this test's loop free to serve the fakes.
    """
    args: argparse.Namespace = cli.build_parser().parse_args(["test-connection", *argv])
    code: int = await asyncio.to_thread(args.func, args)
    return code
