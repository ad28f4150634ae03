"""schemathesis hooks for the ingest's batch endpoint (scripts/check-openapi.sh).

The document describes one logical body for POST /v1/notifications/batch, a list of
notification objects, in three media types. schemathesis serializes JSON itself; these
teach it the other two, so generated batches reach the ingest as a producer would send
them: NDJSON (one item object per line) and postcard (gapless_shared::batch::PostcardBatch,
variant V1 = 0, then the items: user and payload as length-prefixed strings, the payload
being the item's JSON text, and the idempotency key as an Option).
"""

import json

import schemathesis


@schemathesis.serializer("application/x-ndjson")
def ndjson(ctx, value):
    if not isinstance(value, list):
        return json.dumps(value).encode()
    return "".join(json.dumps(item) + "\n" for item in value).encode()


def _varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _string(s):
    raw = s.encode("utf-8", "surrogatepass") if isinstance(s, str) else json.dumps(s).encode()
    return _varint(len(raw)) + raw


@schemathesis.serializer("application/x-postcard")
def postcard(ctx, value):
    # Anything that is not a list of objects is sent as JSON bytes: the ingest must refuse
    # it as malformed postcard with a 400, which the document says.
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        return json.dumps(value).encode()
    out = bytearray(_varint(0))  # PostcardBatch::V1
    out += _varint(len(value))
    for item in value:
        user = item.get("user")
        out += _string(user if isinstance(user, str) else json.dumps(user))
        out += _string(json.dumps(item.get("payload")))
        key = item.get("idempotency_key")
        if key is None:
            out += b"\x00"
        else:
            out += b"\x01" + _string(key if isinstance(key, str) else json.dumps(key))
    return bytes(out)
