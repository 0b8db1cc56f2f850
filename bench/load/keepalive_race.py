"""The HTTP keep-alive race the soak's connection resets point to: `python -m bench.load.keepalive_race`.

uvicorn closes a keep-alive connection after 5 s idle (its `timeout_keep_alive` default, which
`slimtrain serve` keeps); httpx reuses an idle connection for up to 5 s (its `keepalive_expiry`
default). A request sent on a connection the server is closing at that moment gets no answer
(ReadError: the server's close met unread data and reset; or "Server disconnected"). Here N
clients each send a request, wait `idle` seconds and send a second one on the same connection,
for idle just under 5 s and a 2 s control, against the API with uvicorn's default keep-alive
and with a longer one. Rounds interleaved. Writes bench/out/keepalive_race/{table.md,results.json}.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
from pathlib import Path

import httpx

from bench.api.run import TOKEN, start_api
from bench.common import conditions, machine, markdown_table, results_dir, save_json
from bench.load import clients as cl

# Just under httpx's 5 s expiry: idle longer than that and httpx opens a new connection itself.
IDLE = {"4.90-4.99 s": (4.90, 4.99), "2 s (control)": (2.0, 2.0)}
SERVERS = {"uvicorn default (5 s)": (), "--timeout-keep-alive 75": ("--timeout-keep-alive", "75")}


async def pair(url: str, lo: float, hi: float, rng: random.Random) -> str:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with cl.client(base_url=url, headers=headers, timeout=30) as c:
        await c.get("/healthz")
        await asyncio.sleep(rng.uniform(lo, hi))
        try:
            r = await c.get("/healthz")
            return str(r.status_code)
        except httpx.HTTPError as e:
            return type(e).__name__


async def batch(url: str, n: int, lo: float, hi: float, seed: int) -> list[str]:
    rng = random.Random(seed)
    return await asyncio.gather(*(pair(url, lo, hi, rng) for _ in range(n)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    out = results_dir("keepalive_race")
    results: dict[str, dict[str, list[str]]] = {s: {i: [] for i in IDLE} for s in SERVERS}
    with tempfile.TemporaryDirectory(prefix="slimtrain-ka-") as tmp:
        for k, (server, uv_args) in enumerate(SERVERS.items()):
            data = Path(tmp) / str(k)
            data.mkdir()
            proc, url = start_api(data, {"SLIMTRAIN_RUN_SCHEDULER": "false"}, uvicorn_args=uv_args)
            try:
                for r in range(args.rounds):
                    for idle in IDLE if r % 2 == 0 else list(IDLE)[::-1]:
                        got = asyncio.run(batch(url, args.clients, *IDLE[idle], seed=r))
                        results[server][idle] += got
                        bad = sum(g != "200" for g in got)
                        print(f"{server}, idle {idle}, round {r}: {bad} of {len(got)} failed", flush=True)
            finally:
                proc.terminate()
                proc.wait(30)
    rows = []
    for server, by_idle in results.items():
        for idle, got in by_idle.items():
            kinds: dict[str, int] = {}
            for g in got:
                if g != "200":
                    kinds[g] = kinds.get(g, 0) + 1
            bad = sum(kinds.values())
            rows.append(
                [server, idle, len(got), bad, ", ".join(f"{k}: {v}" for k, v in kinds.items()) or "-"]
            )
    table = markdown_table(
        ["server keep-alive", "client idle before reuse", "requests", "failed", "how"], rows
    )
    m = machine()
    note = f"{args.clients} clients x {args.rounds} rounds per cell"
    (out / "table.md").write_text(f"{conditions(m)}\n{note}.\n\n{table}\n")
    save_json(out / "results.json", {"machine": m, "args": vars(args), "results": results})
    print(table)
    print(note)


if __name__ == "__main__":
    main()
