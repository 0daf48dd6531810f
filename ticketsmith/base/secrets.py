"""Keep credentials out of params, tags, logs and reports.

`redact` masks the values of secret-bearing environment variables wherever they appear (as
is, JSON-escaped or URL-encoded), the secrets inside them (an Azure connection string's key,
a service-account file's private key), plus the usual credential shapes: connection-string
and query-string keys (AccountKey=, sig=, token=, access_token=, ...), passwords in URIs,
JSON fields such as "private_key", and PEM private-key blocks.
"""
from __future__ import annotations

import functools
import json
import os
import re
from urllib.parse import quote, unquote, urlsplit

SECRET_ENV = (
    "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_ACCESS_KEY", "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_SAS_TOKEN", "AZURE_CLIENT_SECRET", "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "GOOGLE_APPLICATION_CREDENTIALS_JSON", "DATABASE_URL", "PGPASSWORD",
)
# Any other variable named like a credential is a secret too (values of 8+ characters, so
# e.g. TOKENIZERS_PARALLELISM=false does not mask every "false").
_SECRET_NAME = re.compile(r"(?:PASSWORD|PASSWD|SECRET|TOKEN|ACCESS_KEY|ACCOUNT_KEY|API_KEY|"
                          r"STORAGE_KEY|CONNECTION_STRING|CREDENTIALS_JSON)$")
# Variables holding a URI whose password is a secret, and the file of a service account.
_URI_ENV = ("MLFLOW_TRACKING_URI", "DATABASE_URL", "MLFLOW_REGISTRY_URI", "OPTUNA_STORAGE")
_KEY_FILE_ENV = "GOOGLE_APPLICATION_CREDENTIALS"
# Fields of a service-account (or OAuth client) JSON whose values are secrets.
_JSON_SECRETS = ("private_key", "private_key_id", "client_secret", "refresh_token")
_SECRET_WORDS = (r"[A-Za-z_-]*(?:token|password|passwd|pwd|secret|key|signature|sig|"
                 r"credential)")
_PATTERNS = (
    # PEM private keys, with real or escaped (\n) line breaks
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----",
                re.DOTALL), lambda m: "***"),
    # "private_key": "...", also JSON inside a JSON string (\"private_key\": \"...\")
    (re.compile(r'(?i)(\\?"(?:' + "|".join(_JSON_SECRETS) + r'|password|secret|token|'
                r'access_token|api_key)\\?"\s*:\s*\\?")((?:[^"\\]|\\(?!")|\\\\)*)(\\?")'),
     lambda m: f"{m.group(1)}***{m.group(3)}"),
    # key=value pairs in connection strings and query strings: AccountKey=, sig=, token=, ...
    (re.compile(r"(?i)(?<![A-Za-z0-9])(" + _SECRET_WORDS + r")=([^;&\s'\"]+)"),
     lambda m: f"{m.group(1)}=***"),
    # user:password@ in any URI (postgresql://, https://, wasbs://, ...)
    (re.compile(r"(://[^/:@\s]*:)([^@/\s]+)(@)"), lambda m: f"{m.group(1)}***{m.group(3)}"),
)
MASK = "***"


def _forms(value: str) -> set[str]:
    """A secret as it may appear: as is, JSON-escaped, URL-encoded and URL-decoded."""
    return {value, json.dumps(value)[1:-1], quote(value, safe=""), unquote(value)}


@functools.lru_cache(maxsize=8)
def _key_file_secrets(path: str, mtime_ns: int) -> tuple[str, ...]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return ()
    return _json_secrets(data)


def _json_secrets(data: object) -> tuple[str, ...]:
    if not isinstance(data, dict):
        return ()
    return tuple(str(data[k]) for k in _JSON_SECRETS if data.get(k))


def _parts(name: str, value: str) -> list[str]:
    """The secrets inside one variable's value: the whole value and what it contains."""
    found = [value]
    found += re.findall(r"(?i)(?:AccountKey|SharedAccessSignature|SharedAccessKey|sig)=([^;&]+)",
                        value)
    if name.endswith("_JSON"):
        try:
            found += _json_secrets(json.loads(value))
        except ValueError:
            pass
    return found


def _snapshot(env: os._Environ | dict[str, str]) -> dict[str, str]:
    """A copy of `env`. MLflow's telemetry thread sets and removes variables while the
    experiment runs; iterating os.environ then raises KeyError for a name removed midway."""
    while True:
        try:
            return dict(env)
        except KeyError:  # changed while copied: copy again
            continue


def secret_values(env: os._Environ | dict[str, str] = os.environ) -> set[str]:
    """Every secret value the environment holds, in every form it may be written in."""
    values: list[str] = []
    for name, value in _snapshot(env).items():
        if name in SECRET_ENV or (_SECRET_NAME.search(name) and len(value) >= 8):
            values += _parts(name, value)
    for name in _URI_ENV:
        password = urlsplit(env.get(name, "")).password if "://" in env.get(name, "") else None
        if password:
            values.append(password)
    path = env.get(_KEY_FILE_ENV)
    if path and os.path.isfile(path):
        values += _key_file_secrets(path, os.stat(path).st_mtime_ns)
    out: set[str] = set()
    for v in values:
        if len(v) >= 4:
            out |= {f for f in _forms(v) if len(f) >= 4}
    return out


def redact(text: str) -> str:
    """`text` with every known secret replaced by ***."""
    if not text:
        return text
    for value in sorted(secret_values(), key=len, reverse=True):  # longest first
        text = text.replace(value, MASK)
    for pattern, mask in _PATTERNS:
        text = pattern.sub(mask, text)
    return text
