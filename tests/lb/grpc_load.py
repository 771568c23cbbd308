"""Continuous PutSealed and GetToken through a load balancer, as a gRPC client configured with
deploy/grpc-service-config.json (its retry policy, exactly as shipped) would make them.

Used by tests/it/load_balancer.rs, which seals the requests (the messages are passed as their
protobuf bytes, so this client needs no generated code) and checks what was acknowledged:

    python grpc_load.py TARGET CA_FILE SERVICE_CONFIG REQUESTS_JSONL GET_REQUEST_B64

REQUESTS_JSONL holds one {"id": ..., "put": base64 PutSealedRequest} per line; credentials come
from TOKENVAULT_INGEST_TOKEN and TOKENVAULT_WORKER_TOKEN. Prints "ready" once a write has been
acknowledged, runs until its standard input closes, then prints one JSON line: the ids whose
PutSealed succeeded, the number of GetToken calls that succeeded, and every failed call with its
status code.
"""

import base64
import json
import os
import sys
import threading

import grpc


def main() -> None:
    target, ca_file, config_file, requests_file, get_b64 = sys.argv[1:6]
    with open(config_file, encoding="utf-8") as f:
        service_config = f.read()
    with open(ca_file, "rb") as f:
        ca = f.read()
    channel = grpc.secure_channel(
        target,
        grpc.ssl_channel_credentials(root_certificates=ca),
        options=[("grpc.service_config", service_config), ("grpc.enable_retries", 1)],
    )
    same = lambda b: b  # noqa: E731 - the messages travel as bytes
    put = channel.unary_unary(
        "/tokenvault.v1.Ingest/PutSealed", request_serializer=same, response_deserializer=same
    )
    get = channel.unary_unary(
        "/tokenvault.v1.Broker/GetToken", request_serializer=same, response_deserializer=same
    )
    ingest = (("authorization", "Bearer " + os.environ["TOKENVAULT_INGEST_TOKEN"]),)
    worker = (("authorization", "Bearer " + os.environ["TOKENVAULT_WORKER_TOKEN"]),)
    with open(requests_file, encoding="utf-8") as f:
        requests = [json.loads(line) for line in f]
    get_request = base64.b64decode(get_b64)

    stop = threading.Event()

    def until_stdin_closes() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=until_stdin_closes, daemon=True).start()
    lock = threading.Lock()
    state = {"next": 0, "gets": 0, "ready": False}
    acked: list[str] = []
    failed: list[dict[str, str]] = []

    def run() -> None:
        while not stop.is_set():
            with lock:
                i = state["next"]
                state["next"] += 1
            if i < len(requests):
                request = requests[i]
                try:
                    put(base64.b64decode(request["put"]), metadata=ingest, timeout=15)
                    with lock:
                        acked.append(request["id"])
                        if not state["ready"]:
                            state["ready"] = True
                            print("ready", flush=True)
                except grpc.RpcError as e:
                    with lock:
                        failed.append(
                            {"call": "PutSealed", "code": e.code().name, "details": e.details() or ""}
                        )
            try:
                get(get_request, metadata=worker, timeout=15)
                with lock:
                    state["gets"] += 1
            except grpc.RpcError as e:
                with lock:
                    failed.append({"call": "GetToken", "code": e.code().name, "details": e.details() or ""})
            # Paced: the daemons, the database and the balancer share the machine's cores.
            stop.wait(0.005)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"acked": acked, "gets": state["gets"], "failed": failed}), flush=True)


if __name__ == "__main__":
    main()
