"""Test Connection: probe a draft provider configuration and judge it against the product's model requirements."""
