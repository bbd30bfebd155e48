"""Pytest fixtures that start each provider fake, and tenant files that point at them."""

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.fakes.azure_openai_server import FakeAzureOpenAI
from tests.fakes.bedrock_server import FakeBedrock, FakeSTS, Keyring
from tests.fakes.ollama_server import FakeOllama
from tests.fakes.vertex_server import FakeVertex, new_key, service_account_json

AWS_KEY_ID = "AKIAFAKETENANT000001"
AWS_SECRET = "tenant-secret-access-key"
WORKER_AWS_KEY_ID = "AKIAFAKEWORKER000001"
WORKER_AWS_SECRET = "worker-secret-access-key"
ROLE_ARN = "arn:aws:iam::111122223333:role/atlas-bedrock"
EXTERNAL_ID = "acme-external-id"
AZURE_KEY = "azure-test-key"
_KEYS: dict[int, rsa.RSAPrivateKey] = {}


def rsa_key(number: int = 0) -> rsa.RSAPrivateKey:
    """Test key `number`; generating a 2048-bit key takes a moment, so each is made once per run."""
    if number not in _KEYS:
        _KEYS[number] = new_key()
    return _KEYS[number]


@pytest.fixture(autouse=True)
def _isolated_cloud_sdks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The SDKs must find nothing of the machine's own cloud setup, and never reach a metadata service."""
    for name in (
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    # The worker's own identity, used only to assume a tenant's role.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", WORKER_AWS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", WORKER_AWS_SECRET)
    monkeypatch.setenv("TEST_AZURE_KEY", AZURE_KEY)
    monkeypatch.setenv("TEST_AWS_KEY_ID", AWS_KEY_ID)
    monkeypatch.setenv("TEST_AWS_SECRET", AWS_SECRET)


@pytest.fixture
async def fake_azure() -> AsyncIterator[FakeAzureOpenAI]:
    fake = FakeAzureOpenAI(api_key=AZURE_KEY)
    await fake.start()
    yield fake
    await fake.close()


@dataclass
class AwsFakes:
    bedrock: FakeBedrock
    sts: FakeSTS
    keyring: Keyring


@pytest.fixture
async def fake_aws() -> AsyncIterator[AwsFakes]:
    keyring = Keyring()
    keyring.add(AWS_KEY_ID, AWS_SECRET)
    keyring.add(WORKER_AWS_KEY_ID, WORKER_AWS_SECRET)
    bedrock = FakeBedrock(
        keyring,
        models={
            "anthropic.claude-3-5-sonnet-20240620-v1:0",
            "eu.anthropic.claude-3-7-sonnet-20250219-v1:0",
            "amazon.titan-text-express-v1",
            "meta.llama3-1-70b-instruct-v1:0",
        },
    )
    sts = FakeSTS(keyring, roles={ROLE_ARN: EXTERNAL_ID})
    await bedrock.start()
    await sts.start()
    yield AwsFakes(bedrock, sts, keyring)
    await bedrock.close()
    await sts.close()


@dataclass
class VertexFake:
    fake: FakeVertex
    service_account: str  # the JSON key, as a tenant stores it


@pytest.fixture
async def fake_vertex(tmp_path: Path) -> AsyncIterator[VertexFake]:
    key = rsa_key()
    fake = FakeVertex(public_key=key.public_key())
    await fake.start()
    yield VertexFake(fake, service_account_json(key, fake.token_uri))
    await fake.close()


@pytest.fixture
async def fake_ollama() -> AsyncIterator[FakeOllama]:
    fake = FakeOllama()
    await fake.start()
    yield fake
    await fake.close()


def provider_toml(kind: str, url: str, *, key_file: Path | None = None, **extra: str) -> str:
    """The `[provider]` table of a tenant file for one of the fakes, secrets as references."""
    lines = {
        "azure_openai": [
            f'endpoint = "{url}"',
            'deployment = "gpt-4o"',
            'api_version = "2024-10-21"',
            'api_key = "env:TEST_AZURE_KEY"',
        ],
        "bedrock": [
            'region = "eu-central-1"',
            'model_id = "anthropic.claude-3-5-sonnet-20240620-v1:0"',
            'access_key_id = "env:TEST_AWS_KEY_ID"',
            'secret_access_key = "env:TEST_AWS_SECRET"',
            f'endpoint_url = "{url}"',
        ],
        "vertex": [
            'project = "acme-prod"',
            'location = "europe-west4"',
            'model = "gemini-2.5-flash"',
            f'service_account = "file:{key_file}"',
            f'base_url = "{url}"',
        ],
        "ollama": [f'base_url = "{url}"', 'model = "llama3.1:8b"', "context_window = 131072"],
        "openai_compatible": [f'base_url = "{url}"', 'model = "fake-model"', 'api_key = "env:TEST_FAKE_OPENAI_KEY"'],
    }[kind]
    overridden = {line.split(" = ")[0]: line for line in lines} | {k: f"{k} = {v}" for k, v in extra.items()}
    return "[provider]\n" + f'kind = "{kind}"\n' + "\n".join(overridden.values()) + "\n"


def write_provider_tenant(directory: Path, tenant_id: str, kind: str, url: str, key_file: Path, **extra: str) -> Path:
    """A complete tenant file for one of the fakes (fail_closed, short timeout)."""
    path = directory / f"{tenant_id}.toml"
    path.write_text(
        f'tenant_id = "{tenant_id}"\n'
        + provider_toml(kind, url, key_file=key_file, **extra)
        + '[fallback]\npolicy = "fail_closed"\n[limits]\ntimeout_s = 10\n'
    )
    return path
