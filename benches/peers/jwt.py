#!/usr/bin/env python3
"""Mint the access tokens the peers harness sends (stdlib only; RS256/ES256 sign with the openssl CLI).

usage: jwt.py ALG KIND [KEY_PEM]
  ALG   HS256 | RS256 | ES256   (HS256 reads its secret from $JWT_SECRET, never from argv)
  KIND  valid    exp = now + 1 day: must be answered 200
        expired  exp an hour ago: must be refused
        tampered a valid token whose payload was changed after signing: must be refused
        none     "alg": "none" and no signature: must be refused (the algorithm is pinned)
  KEY_PEM  the private key, for RS256 and ES256

The claims are those of an RFC 9068 access token as tokengate issues them, so every target checks
the same token: typ at+jwt, iss https://auth.perf.local, aud perf-api.
"""

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time

ISSUER = "https://auth.perf.local"
AUDIENCE = "perf-api"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(obj: dict) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


def claims(exp_in: int, sub: str = "user-42") -> dict:
    now = int(time.time())
    return {
        "iss": ISSUER,
        "sub": sub,
        "aud": AUDIENCE,
        "iat": now,
        "nbf": now - 5,
        "exp": now + exp_in,
        "scope": "read write",
        "client_id": "perf-client",
        "sid": "AAAAAAAAAAE",
        "jti": "0123456789abcdef",
    }


def ecdsa_der_to_jose(der: bytes, size: int = 32) -> bytes:
    """openssl writes ECDSA-Sig-Value (SEQUENCE of two INTEGERs); JWS wants r || s, fixed width."""
    if der[0] != 0x30:
        raise ValueError("not a DER SEQUENCE")
    pos = 2 if der[1] < 0x80 else 2 + (der[1] & 0x7F)
    out = b""
    for _ in range(2):
        if der[pos] != 0x02:
            raise ValueError("not a DER INTEGER")
        length = der[pos + 1]
        value = der[pos + 2 : pos + 2 + length].lstrip(b"\x00")
        out += value.rjust(size, b"\x00")
        pos += 2 + length
    return out


def sign(alg: str, signing_input: bytes, key_pem: str | None) -> bytes:
    if alg == "HS256":
        secret = os.environ.get("JWT_SECRET")
        if not secret:
            sys.exit("jwt.py: HS256 needs $JWT_SECRET")
        return hmac.new(secret.encode(), signing_input, hashlib.sha256).digest()
    if not key_pem:
        sys.exit(f"jwt.py: {alg} needs KEY_PEM")
    der = subprocess.run(
        ["openssl", "dgst", "-sha256", "-sign", key_pem],
        input=signing_input,
        capture_output=True,
        check=True,
    ).stdout
    return ecdsa_der_to_jose(der) if alg == "ES256" else der


def mint(alg: str, kind: str, key_pem: str | None) -> str:
    if kind == "none":
        return f"{segment({'alg': 'none', 'typ': 'at+jwt'})}.{segment(claims(86400))}."
    header = segment({"alg": alg, "typ": "at+jwt"})
    payload = segment(claims(-3600 if kind == "expired" else 86400))
    signature = b64url(sign(alg, f"{header}.{payload}".encode(), key_pem))
    if kind == "tampered":
        payload = segment(claims(86400, sub="admin"))
    return f"{header}.{payload}.{signature}"


def main() -> None:
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    alg, kind = sys.argv[1], sys.argv[2]
    if alg not in ("HS256", "RS256", "ES256") or kind not in ("valid", "expired", "tampered", "none"):
        sys.exit(__doc__)
    print(mint(alg, kind, sys.argv[3] if len(sys.argv) == 4 else None))


if __name__ == "__main__":
    main()
