"""`secrets.redact`, one row per credential form a user of these clouds holds in a URI, a
connection string, a key file or the environment."""
from __future__ import annotations

import json
from urllib.parse import quote

import pytest

from ticketsmith.base.secrets import redact

PEM = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\nS3CRETPEMBODY\n-----END PRIVATE KEY-----\n"

# (form, text holding the secret, the secret itself)
IN_TEXT = [
    ("azure connection string AccountKey",
     "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=Zm9vYmFy+/KEY1==;"
     "EndpointSuffix=core.windows.net", "Zm9vYmFy+/KEY1=="),
    ("azure connection string SharedAccessSignature",
     "BlobEndpoint=https://acct.blob.core.windows.net/;SharedAccessSignature=sv=2022&sig=SASSIG1",
     "SASSIG1"),
    ("azure SAS sig= in a blob URL",
     "https://acct.blob.core.windows.net/c/f?sv=2022-11-02&ss=b&sig=AbC%2Bd3FgSIG2%3D&se=2030",
     "AbC%2Bd3FgSIG2%3D"),
    ("token= query parameter", "https://storage.example/o?alt=media&token=TOKEN3abc", "TOKEN3abc"),
    ("access_token= query parameter", "https://storage.googleapis.com/b/o?access_token=ya29.TOK4",
     "ya29.TOK4"),
    ("refresh_token= form field", "grant_type=refresh_token&refresh_token=1//REFRESH5",
     "1//REFRESH5"),
    ("password in a postgresql URI", "postgresql://mlflow:PGPASS6@db.internal:5432/mlflow",
     "PGPASS6"),
    ("password in a postgresql+psycopg URI", "postgresql+psycopg2://u:PGPASS7@db/x", "PGPASS7"),
    ("password in an MLflow server URI", "https://admin:MLFPASS8@mlflow.example.com:5000",
     "MLFPASS8"),
    ("password in an http URI", "http://user:HTTPPASS9@10.0.0.1/api", "HTTPPASS9"),
    ("password in a wasbs:// URI", "wasbs://user:WASBPASS10@container.blob.core.windows.net/path",
     "WASBPASS10"),
    ("password with an empty user", "redis://:REDISPASS11@cache:6379/0", "REDISPASS11"),
    ("service-account JSON private_key_id",
     '{"type": "service_account", "private_key_id": "KEYID12abcdef", "client_email": "x@y"}',
     "KEYID12abcdef"),
    ("service-account JSON private_key", json.dumps({"private_key": PEM}), "S3CRETPEMBODY"),
    ("service-account JSON inside a JSON string",
     json.dumps({"creds": json.dumps({"private_key_id": "NESTEDKEYID13"})}), "NESTEDKEYID13"),
    ("PEM block with real line breaks", f"key file:\n{PEM}", "S3CRETPEMBODY"),
    ("OAuth client_secret JSON", '{"client_id": "abc", "client_secret": "CLIENTSECRET14"}',
     "CLIENTSECRET14"),
    ("password= in a connection string", "Server=db;Database=x;User Id=u;Password=SQLPASS15;",
     "SQLPASS15"),
    ("api_key= query parameter", "https://api.example/v1?api_key=APIKEY16", "APIKEY16"),
    ("X-Goog-Signature in a signed URL",
     "https://storage.googleapis.com/b/o?X-Goog-Algorithm=x&X-Goog-Signature=GOOGSIG17",
     "GOOGSIG17"),
]


@pytest.mark.parametrize("form,text,secret", IN_TEXT, ids=[r[0] for r in IN_TEXT])
def test_credential_shapes_are_masked_wherever_they_appear(form, text, secret):
    out = redact(f"error talking to {text} (retrying)")
    assert secret not in out, out
    assert "***" in out
    assert out.startswith("error talking to ") and out.endswith(" (retrying)")


# (environment variable, value, secret inside the value that must never show)
ENV = [
    ("AZURE_STORAGE_CONNECTION_STRING",
     "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=ENVACCOUNTKEY1+/abc==",
     "ENVACCOUNTKEY1+/abc=="),
    ("AZURE_STORAGE_ACCESS_KEY", "ENVACCESSKEY2+/xyz==", "ENVACCESSKEY2+/xyz=="),
    ("AZURE_STORAGE_SAS_TOKEN", "sv=2022-11-02&ss=b&sig=ENVSASSIG3%2B", "ENVSASSIG3%2B"),
    ("AZURE_CLIENT_SECRET", "ENVCLIENTSECRET4", "ENVCLIENTSECRET4"),
    ("MLFLOW_TRACKING_PASSWORD", "ENVMLFLOWPASS5", "ENVMLFLOWPASS5"),
    ("MLFLOW_TRACKING_TOKEN", "ENVMLFLOWTOKEN6", "ENVMLFLOWTOKEN6"),
    ("AWS_SECRET_ACCESS_KEY", "ENVAWSSECRET7/abc+def", "ENVAWSSECRET7/abc+def"),
    ("DATABASE_URL", "postgresql://u:ENVDBPASS8@db/x", "ENVDBPASS8"),
    ("GOOGLE_APPLICATION_CREDENTIALS_JSON",
     json.dumps({"private_key_id": "ENVGCPKEYID9", "private_key": PEM}), "ENVGCPKEYID9"),
    ("SOME_SERVICE_API_KEY", "ENVOTHERAPIKEY10", "ENVOTHERAPIKEY10"),
]


@pytest.mark.parametrize("name,value,secret", ENV, ids=[r[0] for r in ENV])
def test_secret_environment_values_are_masked_in_every_encoding(name, value, secret, monkeypatch):
    monkeypatch.setenv(name, value)
    for form in (secret, json.dumps(secret)[1:-1], quote(secret, safe="")):
        out = redact(f"value seen: <{form}> and again {form}")
        assert secret not in out and form not in out, (form, out)
    # The bare secret alone (e.g. an account key pasted into a message) is masked too.
    assert secret not in redact(f"key is {secret}.")


# A secret given percent-encoded (in a URI, a SAS query string): both the encoded form and the
# decoded one a library prints after parsing it are secrets.
ENCODED = [
    ("MLFLOW_TRACKING_URI", "https://user:ENCp%40ss1@mlflow.example.com", "ENCp%40ss1",
     "ENCp@ss1"),
    ("DATABASE_URL", "postgresql://u:ENCp%40ss%2Fword2@db/x", "ENCp%40ss%2Fword2",
     "ENCp@ss/word2"),
    ("AZURE_STORAGE_SAS_TOKEN", "sv=2022-11-02&ss=b&sig=ENCabc%2Bdef3%3D", "ENCabc%2Bdef3%3D",
     "ENCabc+def3="),
]


@pytest.mark.parametrize("name,value,encoded,decoded", ENCODED, ids=[r[0] for r in ENCODED])
def test_a_percent_encoded_secret_is_masked_encoded_and_decoded(name, value, encoded, decoded,
                                                                monkeypatch):
    monkeypatch.setenv(name, value)
    for form in (encoded, decoded):  # alone: no key= or user: before it to give it away
        out = redact(f"rejected {form} (retrying)")
        assert out == "rejected *** (retrying)", (form, out)


def test_password_of_the_tracking_uri_is_masked_where_it_appears_alone(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://user:ALONEPASS1@mlflow.example.com")
    assert "ALONEPASS1" not in redact("auth failed for password ALONEPASS1")


def test_service_account_key_file_contents_are_masked(tmp_path, monkeypatch):
    key = tmp_path / "sa.json"
    key.write_text(json.dumps({"type": "service_account", "private_key_id": "FILEKEYID1abc",
                               "private_key": PEM, "client_email": "sa@p.iam.gserviceaccount.com"}))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
    out = redact("id FILEKEYID1abc; pem " + PEM.replace("\n", "\\n"))
    assert "FILEKEYID1abc" not in out and "S3CRETPEMBODY" not in out, out


@pytest.mark.parametrize("text", [
    "model.name=mlp prune.fraction=0.2", "sqlite:///tmp/mlflow.db", "wasbs://c@acct.blob.core.windows.net/x",
    "file:///home/user/mlruns", "design=foo; keyboard", "http://127.0.0.1:5000/#/experiments/1",
])
def test_harmless_text_is_left_alone(text, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # credential-like name, short value
    assert redact(text) == text
    assert redact("") == "" and redact(None) is None
