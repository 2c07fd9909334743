#!/usr/bin/env python3
"""permessage-deflate interop client (Python `websockets`) for ringgate's /ws/echo.

    python3 tests/interop/client.py URL [--server-no-context-takeover]
        [--client-no-context-takeover] [--server-max-window-bits N]
        [--client-max-window-bits N] [--threshold N]

Offers permessage-deflate with the given parameters, sends a fixed sequence of messages (JSON
text over the server's compression threshold, small text under it, binary, a fragmented
message, a 1 MiB compressible message, a pipelined burst) and checks every echo byte for byte.
It also checks that the server compressed what it should: compressible echoes of --threshold
bytes (the server's, default 256) and more arrive with RSV1 set, shorter echoes without.

Prints `client=...`, `extensions=<Sec-WebSocket-Extensions of the 101>` and a final
`result=ok ...` line; on any mismatch `result=FAIL ...` and exit status 1. Exit status 3 means
the `websockets` package is missing or too old (install: python3 -m pip install websockets==17.4).
"""

import argparse
import json
import random
import sys

TIMEOUT = 20  # seconds for any single step; generous for a loaded CI machine

try:
    import websockets
    from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
    from websockets.frames import Opcode
    from websockets.sync.client import connect
except ImportError as exc:  # pragma: no cover - reported to the Rust test
    print(
        f"result=FAIL the Python package `websockets` (>= 13) is not importable ({exc}); "
        "install it with: python3 -m pip install websockets==17.4",
        flush=True,
    )
    sys.exit(3)


def json_message(i):
    """A JSON-ish text message of ~700 bytes (over the 256-byte threshold), compressible."""
    users = [
        {"id": 1000 + i * 10 + k, "name": f"user-{i}-{k}", "status": ["online", "away"][k % 2]}
        for k in range(8)
    ]
    return json.dumps({"type": "presence", "room": "lobby", "seq": i, "users": users})


def big_text(size):
    """Exactly `size` bytes of ASCII JSON lines: compressible, but not one repeated byte."""
    out, i = [], 0
    total = 0
    while total < size:
        line = f'{{"seq":{i},"topic":"stats","cpu":{i * 37 % 100},"mem":{i * 11 % 97}}}\n'
        out.append(line)
        total += len(line)
        i += 1
    return "".join(out)[:size]


def messages():
    """(payload, fragments, compressible): str = text, bytes = binary; fragments > 1 sends
    the message in that many frames."""
    rnd = random.Random(7)
    seq = []
    for i in range(20):
        seq.append((json_message(i), 1, True))
    seq += [
        ("hi", 1, False),
        ("", 1, False),
        ("héllo wörld €𝄞 日本語", 1, False),
        ("x" * 200, 1, False),
        (bytes(range(64)), 1, False),
        (b"", 1, False),
        (rnd.randbytes(4096), 1, False),  # incompressible
        # Repeats 6 KiB apart: compressible only with a window over 6 KiB, so a server that
        # overran a smaller window it agreed to would refer back too far.
        (rnd.randbytes(6144) * 4, 1, False),
        (bytes(range(256)) * 256, 1, True),  # 64 KiB compressible binary
        (json_message(100) * 4, 3, True),  # fragmented, compressed as one message
        (big_text(1 << 20), 1, True),  # 1 MiB compressible text
    ]
    for i in range(20, 25):
        seq.append((json_message(i), 1, True))
    return seq


def size(payload):
    return len(payload.encode() if isinstance(payload, str) else payload)


def describe(payload):
    kind = "text" if isinstance(payload, str) else "binary"
    return f"{kind} message of {size(payload)} bytes"


class Failure(Exception):
    pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--server-no-context-takeover", action="store_true")
    ap.add_argument("--client-no-context-takeover", action="store_true")
    ap.add_argument("--server-max-window-bits", type=int)
    ap.add_argument("--client-max-window-bits", type=int)
    ap.add_argument("--threshold", type=int, default=256)
    args = ap.parse_args()

    print(f"client=python websockets={websockets.__version__}", flush=True)
    factory = ClientPerMessageDeflateFactory(
        server_no_context_takeover=args.server_no_context_takeover,
        client_no_context_takeover=args.client_no_context_takeover,
        server_max_window_bits=args.server_max_window_bits,
        client_max_window_bits=args.client_max_window_bits or True,
    )
    with connect(
        args.url,
        compression=None,
        extensions=[factory],
        max_size=None,
        open_timeout=TIMEOUT,
        close_timeout=TIMEOUT,
    ) as ws:
        ext = ", ".join(ws.response.headers.get_all("Sec-WebSocket-Extensions"))
        print(f"extensions={ext}", flush=True)

        # Record RSV1 ("compressed") of the first frame of every data message received.
        rsv1 = []
        for e in ws.protocol.extensions:
            if e.name == "permessage-deflate":
                inner = e.decode

                def decode(frame, *, max_size=None, inner=inner):
                    if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
                        rsv1.append(frame.rsv1)
                    return inner(frame, max_size=max_size)

                e.decode = decode
        negotiated = bool(ws.protocol.extensions)

        def send(payload, fragments):
            if fragments == 1:
                ws.send(payload)
            else:
                step = -(-len(payload) // fragments)
                ws.send([payload[k : k + step] for k in range(0, len(payload), step)])

        def check(n, payload, compressible):
            got = ws.recv(timeout=TIMEOUT)
            if type(got) is not type(payload) or got != payload:
                raise Failure(
                    f"message {n} ({describe(payload)}) came back as {describe(got)}, different"
                )
            if not negotiated:
                return
            compressed = rsv1[n]
            if compressible and size(payload) >= args.threshold and not compressed:
                raise Failure(f"message {n} ({describe(payload)}) came back uncompressed")
            if size(payload) < args.threshold and compressed:
                raise Failure(
                    f"message {n} ({describe(payload)}) came back compressed, "
                    f"under the {args.threshold}-byte threshold"
                )
            return compressed

        seq = messages()
        n, compressed = 0, 0
        # One at a time...
        for payload, fragments, compressible in seq:
            send(payload, fragments)
            compressed += bool(check(n, payload, compressible))
            n += 1
        # ...then all in flight at once.
        burst = [m for m in seq if size(m[0]) < 100_000] * 2
        for payload, fragments, _ in burst:
            send(payload, fragments)
        for payload, _, compressible in burst:
            compressed += bool(check(n, payload, compressible))
            n += 1
        ws.close()
        rcvd = ws.protocol.close_rcvd
        if rcvd is None or rcvd.code != 1000:
            raise Failure(f"server closed with {rcvd} instead of echoing 1000")
    print(f"result=ok messages={n} compressed_echoes={compressed}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except Failure as exc:
        print(f"result=FAIL {exc}", flush=True)
        sys.exit(1)
    except Exception as exc:  # connection errors, timeouts, protocol errors
        print(f"result=FAIL {type(exc).__name__}: {exc}", flush=True)
        sys.exit(1)
