"""Credentials never reach a message: Azure connection strings, URL-encoded secrets, signed URLs."""

from __future__ import annotations

import pytest

from storage.redact import Redactor, display_url, secret_values

ACCOUNT_KEY = "Zm9v+YmFy/YmF6cXV4==" * 2
CONNECTION = f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={ACCOUNT_KEY};EndpointSuffix=core.windows.net"


def test_an_azure_connection_string_is_a_secret_whole_and_in_parts():
    redact = Redactor(secret_values({"connection_string": CONNECTION, "account_name": "acct"}))

    assert secret_values({"connection_string": CONNECTION}) == (CONNECTION,)
    assert redact(f"bad options {CONNECTION}") == "bad options ***"
    assert redact(f"403 for key {ACCOUNT_KEY} (account acct)") == "403 for key *** (account acct)"


def test_an_account_key_in_any_text_is_hidden_without_being_known():
    text = f"ValueError: Connection string is invalid: ...;AccountKey={ACCOUNT_KEY};EndpointSuffix=x"
    assert Redactor()(text) == "ValueError: Connection string is invalid: ...;AccountKey=***;EndpointSuffix=x"


@pytest.mark.parametrize(
    "spelled",
    ["Zm9v%2BYmFy%2FYmF6cXV4%3D%3D", "Zm9v%2bYmFy%2fYmF6cXV4%3d%3d"],
    ids=["upper-escapes", "lower-escapes"],
)
def test_a_url_encoded_secret_is_hidden(spelled):
    redact = Redactor(secret_values({"secret": "Zm9v+YmFy/YmF6cXV4=="}))
    assert redact(f"GET /bucket?X-Token={spelled}&part=1 failed") == "GET /bucket?X-Token=***&part=1 failed"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "https://acct.blob.core.windows.net/c/ckpt/metadata.json?sv=2022-11-02&se=2026&sig=q%2BAbC%3D&sp=r",
            "https://acct.blob.core.windows.net/c/ckpt/metadata.json?sv=2022-11-02&se=2026&sig=***&sp=r",
        ),
        (
            "https://h/b/k?X-Amz-Credential=AKIA%2F2026&X-Amz-Signature=abcdef0123&X-Amz-Expires=60",
            "https://h/b/k?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Expires=60",
        ),
        ("az://c/ckpt?sig=abcd", "az://c/ckpt?sig=***"),
        ("s3://bucket/signal=1/ckpt", "s3://bucket/signal=1/ckpt"),
    ],
    ids=["azure-sas", "s3-presigned", "fsspec-url", "not-a-signature"],
)
def test_signatures_in_urls_are_hidden(url, shown):
    assert display_url(url) == shown
    assert Redactor()(f"failed: {url}") == f"failed: {shown}"
