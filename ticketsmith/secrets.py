"""Keep credentials out of params, tags, logs and reports.

`redact` masks the values of secret-bearing environment variables wherever they appear,
plus the usual credential shapes (connection-string keys, SAS signatures, passwords in URIs).
"""
from __future__ import annotations

import os
import re

SECRET_ENV = (
    "AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_ACCESS_KEY", "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_CLIENT_SECRET", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
    "AWS_SECRET_ACCESS_KEY", "GOOGLE_APPLICATION_CREDENTIALS_JSON", "DATABASE_URL",
)
_PATTERNS = [
    # key=value pairs in connection strings and query strings
    re.compile(r"(?i)\b(AccountKey|SharedAccessSignature|SharedAccessKey|sig|password|pwd|"
               r"token|secret|client_secret)=([^;&\s'\"]+)"),
    # user:password@ in URIs
    re.compile(r"(://[^/:@\s]+:)([^@/\s]+)(@)"),
]
MASK = "***"


def redact(text: str) -> str:
    """`text` with every known secret replaced by ***."""
    if not text:
        return text
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, MASK)
    text = _PATTERNS[0].sub(lambda m: f"{m.group(1)}={MASK}", text)
    return _PATTERNS[1].sub(lambda m: f"{m.group(1)}{MASK}{m.group(3)}", text)
