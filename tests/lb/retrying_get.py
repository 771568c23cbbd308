"""One GetToken, as a stock grpcio client configured only with deploy/grpc-service-config.json
makes it: the shipped retry policy and the daemon's `grpc-retry-pushback-ms` (gRFC A6) decide
whether and when it tries again; this client has no retry code of its own.

Used by tests/it/daemon.rs, which passes the request as its protobuf bytes (no generated code):

    python retrying_get.py TARGET SERVICE_CONFIG GET_REQUEST_B64

The worker credential comes from TOKENVAULT_WORKER_TOKEN. Prints one JSON line:
{"ok": true, "response_bytes": N, "elapsed_ms": MS} (the call, retries included) or {"ok": false, "code": NAME, "details": TEXT}.
"""

import base64
import json
import os
import sys
import time

import grpc


def main() -> None:
    target, config_file, get_b64 = sys.argv[1:4]
    with open(config_file, encoding="utf-8") as f:
        service_config = f.read()
    channel = grpc.insecure_channel(
        target,
        options=[("grpc.service_config", service_config), ("grpc.enable_retries", 1)],
    )
    same = lambda b: b  # noqa: E731 - the messages travel as bytes
    get = channel.unary_unary(
        "/tokenvault.v1.Broker/GetToken", request_serializer=same, response_deserializer=same
    )
    worker = (("authorization", "Bearer " + os.environ["TOKENVAULT_WORKER_TOKEN"]),)
    started = time.monotonic()
    try:
        response = get(base64.b64decode(get_b64), metadata=worker, timeout=30)
        elapsed_ms = int((time.monotonic() - started) * 1000)
        print(
            json.dumps({"ok": True, "response_bytes": len(response), "elapsed_ms": elapsed_ms}),
            flush=True,
        )
    except grpc.RpcError as e:
        print(
            json.dumps({"ok": False, "code": e.code().name, "details": e.details() or ""}),
            flush=True,
        )


if __name__ == "__main__":
    main()
