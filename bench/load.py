"""A load generator for `fastadapters serve`: real HTTP clients, Poisson arrivals, Zipf adapters, streaming.

    python -m bench.load --url http://localhost:8000 --rate 4 --requests 64 [--api-key KEY] [--out F.json]
    python -m bench.load --demo --rate 4 --requests 32     # starts the demo server in this process first

Each request streams a completion (a prompt of 4-16 words, 8-32 output tokens) for an adapter drawn from a
Zipf law (s = 1.1) over the server's adapters (and the base model), sent at Poisson arrival times of mean
rate --rate per second (open loop: arrivals do not wait for answers). Reports requests/s, output tokens/s
(the servers' usage counts), time to first token and the gaps between streamed text chunks (p50, p99, ms),
and the errors by status.
"""

import argparse
import asyncio
import json
import random
import socket
import sys
import threading
import time

WORDS = "the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9".split()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def one(client, url: str, headers: dict, body: dict, stats: dict) -> None:
    start = time.perf_counter()
    stamps = []
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                await r.aread()
                stats["errors"][str(r.status_code)] = stats["errors"].get(str(r.status_code), 0) + 1
                return
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        stats["tokens"] += chunk["usage"]["completion_tokens"]
                    elif chunk["choices"] and chunk["choices"][0].get("text"):
                        stamps.append(time.perf_counter())
    except Exception as e:  # noqa: BLE001 - a transport failure is counted, the run goes on
        stats["errors"][type(e).__name__] = stats["errors"].get(type(e).__name__, 0) + 1
        return
    stats["done"] += 1
    if stamps:
        stats["ttft"].append(stamps[0] - start)
        stats["itl"] += [b - a for a, b in zip(stamps, stamps[1:])]


async def run(url: str, rate: float, requests: int, api_key: str | None, seed: int) -> dict:
    import httpx

    headers = {} if api_key is None else {"Authorization": f"Bearer {api_key}"}
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=300) as client:
        models = (await client.get(f"{url}/v1/models", headers=headers)).json()["data"]
        names = [m["id"] for m in models]
        weights = [1.0 / (k + 1) ** 1.1 for k in range(len(names))]
        stats = {"done": 0, "tokens": 0, "ttft": [], "itl": [], "errors": {}}
        tasks, start = [], time.perf_counter()
        for _ in range(requests):
            await asyncio.sleep(rng.expovariate(rate))
            body = {
                "model": rng.choices(names, weights)[0],
                "prompt": " ".join(rng.choices(WORDS, k=rng.randint(4, 16))),
                "max_tokens": rng.randint(8, 32),
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            tasks.append(asyncio.create_task(one(client, url, headers, body, stats)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    ms = lambda v: None if v is None else round(v * 1e3, 2)  # noqa: E731
    return {
        "url": url, "rate": rate, "requests": requests, "models": names, "seconds": round(elapsed, 3),
        "requests_per_s": stats["done"] / elapsed, "output_tokens_per_s": stats["tokens"] / elapsed,
        "ttft_p50_ms": ms(percentile(stats["ttft"], 0.5)), "ttft_p99_ms": ms(percentile(stats["ttft"], 0.99)),
        "itl_p50_ms": ms(percentile(stats["itl"], 0.5)), "itl_p99_ms": ms(percentile(stats["itl"], 0.99)),
        "completed": stats["done"], "errors": stats["errors"],
    }  # fmt: skip


def start_demo() -> tuple[str, object]:
    """The demo server in a background thread; returns (url, uvicorn server)."""
    import uvicorn

    from fastadapters.serving.server import build_app, demo_server

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    http = uvicorn.Server(
        uvicorn.Config(build_app(demo_server()), host="127.0.0.1", port=port, log_level="warning")
    )
    threading.Thread(target=http.run, daemon=True).start()
    while not http.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", http


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="the server, e.g. http://localhost:8000")
    parser.add_argument("--demo", action="store_true", help="start the demo server in this process")
    parser.add_argument("--rate", type=float, default=2.0, help="mean arrivals per second (Poisson)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--api-key")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the report as JSON here")
    args = parser.parse_args(argv)
    if not args.url and not args.demo:
        parser.error("give --url or --demo")
    if args.rate <= 0 or args.requests < 1:
        parser.error("--rate must be > 0 and --requests >= 1")
    http = None
    url = args.url
    if args.demo:
        url, http = start_demo()
    report = asyncio.run(run(url, args.rate, args.requests, args.api_key, args.seed))
    if http is not None:
        http.should_exit = True
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0 if report["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
