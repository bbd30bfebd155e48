"""Provider fakes for the broker tests."""

from tests.fakes.fixtures import _isolated_cloud_sdks, fake_aws, fake_azure, fake_ollama, fake_vertex  # noqa: F401
