#!/usr/bin/env python3
"""Rooms (/ws) subscriber with the Python `websockets` client and its default compression offer
(`permessage-deflate; client_max_window_bits`), driven by tests/rooms_deflate.rs.

    python3 tests/interop/rooms_client.py URL TOPIC COUNT [KIND]

Connects, expects the `connected` greeting, subscribes to TOPIC and prints
`subscribed seq=S epoch=E` (the Rust test publishes only after that line). Then it receives
COUNT room messages of TOPIC with type KIND (default `tick`), checks that their seq follow S
without gap or duplicate, and prints one line per message:

    message seq=N compressed=0|1 size=BYTES data=<the message's data as compact, sorted JSON>

(`compressed` is the RSV1 bit of the frame, `size` the length of the inflated text), so the
Rust test compares content and compression with what it published. Finally it unsubscribes,
closes with 1000 and prints `result=ok ...`; on any failure `result=FAIL ...` and exit status 1.
Exit status 3 means the `websockets` package is missing (python3 -m pip install websockets==17.4).
"""

import collections
import json
import sys

TIMEOUT = 20  # seconds for any single step; generous for a loaded CI machine

try:
    import websockets
    from websockets.frames import Opcode
    from websockets.sync.client import connect
except ImportError as exc:  # pragma: no cover - reported to the Rust test
    print(
        f"result=FAIL the Python package `websockets` (>= 13) is not importable ({exc}); "
        "install it with: python3 -m pip install websockets==17.4",
        flush=True,
    )
    sys.exit(3)


class Failure(Exception):
    pass


def main():
    if len(sys.argv) not in (4, 5):
        raise Failure("usage: rooms_client.py URL TOPIC COUNT [KIND]")
    url, topic, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    kind = sys.argv[4] if len(sys.argv) == 5 else "tick"

    print(f"client=python websockets={websockets.__version__}", flush=True)
    # The library's default: compression="deflate", which offers
    # `permessage-deflate; client_max_window_bits`.
    with connect(url, max_size=None, open_timeout=TIMEOUT, close_timeout=TIMEOUT) as ws:
        ext = ", ".join(ws.response.headers.get_all("Sec-WebSocket-Extensions"))
        print(f"extensions={ext}", flush=True)
        if not ws.protocol.extensions:
            raise Failure("permessage-deflate was not negotiated")

        # (RSV1, inflated payload) of every data frame decoded from here on. The library may
        # have decoded the greeting before the hook is in place, so messages are matched to
        # their frame by content (room messages are unique by seq), not by position.
        frames = collections.deque()
        for e in ws.protocol.extensions:
            if e.name == "permessage-deflate":
                inner = e.decode

                def decode(frame, *, max_size=None, inner=inner):
                    out = inner(frame, max_size=max_size)
                    if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
                        frames.append((frame.rsv1, bytes(out.data)))
                    return out

                e.decode = decode

        def compressed(text):
            data = text.encode()
            while frames:
                rsv1, payload = frames.popleft()
                if payload == data:
                    return rsv1
            raise Failure(f"no decoded frame holds the message {text[:80]!r}")

        def recv():
            got = ws.recv(timeout=TIMEOUT)
            if not isinstance(got, str):
                raise Failure(f"a binary message ({len(got)} bytes) instead of JSON text")
            return got, json.loads(got)

        _, hello = recv()
        if hello.get("type") != "connected":
            raise Failure(f"first message is not `connected`: {hello}")
        ws.send(json.dumps({"action": "subscribe", "topic": topic, "id": "sub-1"}))
        while True:
            _, m = recv()
            if m.get("id") == "sub-1":
                break
        if m.get("type") != "subscribed":
            raise Failure(f"subscribe answered {m}")
        last = m["seq"]
        print(f"subscribed seq={last} epoch={m['epoch']}", flush=True)

        got = 0
        while got < count:
            text, m = recv()
            if m.get("type") != kind or m.get("topic") != topic:
                continue
            seq = m.get("seq")
            if seq != last + 1:
                raise Failure(f"seq {seq} after {last}: gap, duplicate or disorder")
            last = seq
            data = json.dumps(m.get("data"), separators=(",", ":"), sort_keys=True)
            print(
                f"message seq={seq} compressed={int(compressed(text))} "
                f"size={len(text.encode())} data={data}",
                flush=True,
            )
            got += 1

        ws.send(json.dumps({"action": "unsubscribe", "topic": topic, "id": "unsub-1"}))
        while True:
            _, m = recv()
            if m.get("id") == "unsub-1":
                break
        if m.get("type") != "unsubscribed":
            raise Failure(f"unsubscribe answered {m}")
        ws.close()
        rcvd = ws.protocol.close_rcvd
        if rcvd is None or rcvd.code != 1000:
            raise Failure(f"server closed with {rcvd} instead of echoing 1000")
    print(f"result=ok messages={got}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except Failure as exc:
        print(f"result=FAIL {exc}", flush=True)
        sys.exit(1)
    except Exception as exc:  # connection errors, timeouts, protocol errors
        print(f"result=FAIL {type(exc).__name__}: {exc}", flush=True)
        sys.exit(1)
