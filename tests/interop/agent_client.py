"""Drives /ws/agent the way the original product's notes (shared/seeds) show the Python client:
websockets.connect, read the welcome, send a streaming_query without an id and print chunks
until stream_end; then an agent_query, a tool_call, a ping and a cancel, all without ids.

Usage: agent_client.py ws://127.0.0.1:PORT/ws/agent
Prints the streamed text as it comes, then one JSON line with what it received (tests/agent.rs).
"""

import asyncio
import json
import sys

import websockets


async def main(uri):
    report = {}
    async with websockets.connect(uri) as websocket:
        welcome = await websocket.recv()
        print("Received:", welcome)
        report["welcome"] = json.loads(welcome)

        await websocket.send(json.dumps({"type": "streaming_query", "query": "用Python写一个快速排序"}))
        streamed = ""
        while True:
            data = json.loads(await websocket.recv())
            if data["type"] == "stream_chunk":
                print(data["content"], end="", flush=True)
                streamed += data["content"]
            elif data["type"] == "stream_end":
                print("\n✓ Stream completed")
                break
            elif data["type"] == "error":
                raise SystemExit(f"error: {data}")
        report["streamed"] = streamed

        await websocket.send(json.dumps({"type": "agent_query", "query": "你好，请介绍一下你自己"}))
        status = json.loads(await websocket.recv())
        assert status["type"] == "status" and status["status"] == "processing", status
        report["response"] = json.loads(await websocket.recv())

        await websocket.send(
            json.dumps({"type": "tool_call", "tool_name": "calculator", "params": {"expression": "123 + 456"}})
        )
        report["tool"] = json.loads(await websocket.recv())

        await websocket.send(json.dumps({"type": "ping"}))
        report["pong"] = json.loads(await websocket.recv())

        await websocket.send(json.dumps({"type": "cancel"}))
        report["cancelled"] = json.loads(await websocket.recv())
    print(json.dumps(report, ensure_ascii=False))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
