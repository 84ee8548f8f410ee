"""Load test of ``alignkit label serve`` on loopback: LABELERS concurrent labelers (one thread and HTTP client
each) log in with their tokens and submit rankings until SUBMITS are acknowledged (a 2xx answer); then the
database is compared with what was acknowledged. With ``--kill-after K`` the server is killed with SIGKILL once
K submits are acknowledged and restarted on the same database while the labelers keep going (they retry what
failed and, after a 409, reload the page to find their current item, as a browser would).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/label_load.py                   # 20 labelers, 2,000 submits
    .venv/bin/python benchmarks/label_load.py --kill-after 1000                   # SIGKILL + restart midway
    .venv/bin/python benchmarks/label_load.py --labelers 5 --submits 200 --db postgresql://user@host/db

Last line: ``submits=… lost=… duplicated=… stored_unacknowledged=… p95_ms=… seconds=… restarts=…``: lost are
acknowledged submits missing from the database, duplicated two rows for one labeler and item, and
stored_unacknowledged submits that were committed but whose answer the kill cut off (at most one per labeler).
tests/test_label_load.py runs ``run_load`` with smaller numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from alignkit.labeling import storage

RESPONSES = 4  # per item; every ranking names all four


@dataclass
class LoadResult:
    submits: int  # acknowledged (2xx) submits
    lost: int  # acknowledged but not in the database
    duplicated: int  # rows beyond the first for one (labeler, item)
    stored_unacknowledged: int  # in the database, but the client never got the answer (the kill cut it off)
    p95_ms: float  # submit latency (request to answer) over the acknowledged submits
    seconds: float  # wall clock of the load, restarts included
    restarts: int

    def line(self) -> str:
        return (f"submits={self.submits} lost={self.lost} duplicated={self.duplicated} "
                f"stored_unacknowledged={self.stored_unacknowledged} p95_ms={self.p95_ms:.1f} "
                f"seconds={self.seconds:.1f} restarts={self.restarts}")  # fmt: skip


def prepare(workdir: Path, n_items: int, n_labelers: int, url: str | None = None) -> tuple[Path, str, dict]:
    """The input file (n_items prompts with RESPONSES responses), its database and one token per labeler."""
    path = workdir / "load.jsonl"
    path.write_text("".join(
        json.dumps({"prompt": f"prompt {k}", "responses": [f"response {k}.{r}" for r in range(RESPONSES)]}) + "\n"
        for k in range(n_items)))  # fmt: skip
    url = url or storage.default_url(str(path))
    engine = storage.open_db(url)
    storage.load_items(engine, storage.read_input(str(path)))
    tokens = {f"labeler{i:02d}": storage.add_labeler(engine, f"labeler{i:02d}") for i in range(n_labelers)}
    engine.dispose()
    return path, url, tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``alignkit label serve`` as a subprocess (uvicorn) on 127.0.0.1:port."""

    def __init__(self, input_path: Path, url: str, port: int, log: Path):
        self.args = [sys.executable, "-m", "alignkit", "label", "serve", f"input={input_path}", f"db={url}",
                     f"port={port}"]  # fmt: skip
        self.base = f"http://127.0.0.1:{port}"
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> None:
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"label serve exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.base + "/login", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError(f"label serve did not answer within {timeout:.0f} s: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, what is not committed is gone."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


CSRF = re.compile(r'name="csrf" value="([^"]+)"')
ITEM = re.compile(r'name="item_id" value="(\d+)"')


class Labeler:
    """One labeler's browser: logs in, then submits random rankings; every claimed submit is retried until a
    2xx answers it (through a server restart) or the page shows it already landed."""

    def __init__(self, base: str, name: str, token: str, seed: int):
        self.client = httpx.Client(base_url=base, timeout=30.0)
        self.name, self.token, self.rng = name, token, random.Random(seed)
        self.csrf, self.item = "", None
        self.acked: list[int] = []  # item ids
        self.latencies_ms: list[float] = []

    def login(self) -> None:
        csrf = self.csrf_of(self.client.get("/login"))
        r = self.client.post("/login", data={"token": self.token, "csrf": csrf})
        if r.status_code != 303:
            raise RuntimeError(f"{self.name}: login answered {r.status_code}: {r.text[:300]}")
        self.reload()

    def reload(self) -> None:
        """The current item from the page (None when all are labeled): after a 409 or a lost answer."""
        r = self.client.get("/")
        found = ITEM.search(r.text)
        if found is None and r.status_code == 200 and "All done" in r.text:
            self.item = None
            return
        self.csrf = self.csrf_of(r)
        self.item = int(found.group(1))

    def csrf_of(self, r: httpx.Response) -> str:
        found = CSRF.search(r.text)
        if r.status_code != 200 or found is None:
            raise RuntimeError(f"{self.name}: GET {r.url.path} answered {r.status_code}: {r.text[:300]}")
        return found.group(1)

    def ranking(self) -> list[list[int]]:
        order = self.rng.sample(range(1, RESPONSES + 1), RESPONSES)
        return [order[:1], order[1:3], order[3:]]  # best, a tie in the middle, worst

    def submit_one(self) -> bool:
        """One acknowledged submit of the current item; False when there is none left."""
        while self.item is not None:
            item = self.item
            data = {"csrf": self.csrf, "item_id": str(item), "action": "ranked", "ranking": json.dumps(self.ranking())}
            start = time.perf_counter()
            try:
                r = self.client.post("/submit", data=data)
            except httpx.TransportError:  # the server is down: wait, then see where we stand
                self.wait_and_reload()
                continue
            if r.status_code == 303:
                self.latencies_ms.append((time.perf_counter() - start) * 1000)
                self.acked.append(item)
                self.item = item + 1  # items come in order: the next unlabeled one
                return True
            if r.status_code == 409:  # the answer to an earlier try was lost, but it landed
                self.wait_and_reload()
                continue
            raise RuntimeError(f"{self.name}: submit of item {item} answered {r.status_code}: {r.text[:300]}")
        return False

    def wait_and_reload(self) -> None:
        self.while_down(self.reload)

    @staticmethod
    def while_down(step, timeout: float = 60.0) -> None:
        """``step()``, retried while the server does not answer (killed, restarting)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return step()
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def stored_labels(url: str) -> tuple[set[tuple[str, int]], int]:
    """(labeler name, item id) of every row in ``labels``, and the row count."""
    engine = storage.open_db(url)
    with Session(engine) as s:
        rows = s.execute(select(storage.Labeler.name, storage.Label.item_id).join(storage.Labeler)).all()
        count = s.scalar(select(func.count()).select_from(storage.Label))
    engine.dispose()
    return {(name, item) for name, item in rows}, count


def run_load(workdir: Path, labelers: int = 20, submits: int = 2000, kill_after: int | None = None,
             url: str | None = None) -> LoadResult:  # fmt: skip
    """The load, then the database checked against the acknowledged submits."""
    # Every labeler walks the items in order; three times the even share leaves room for the faster ones (one
    # that runs out stops, and the others make up the total).
    input_path, url, tokens = prepare(workdir, 3 * math.ceil(submits / labelers), labelers, url)
    server = Server(input_path, url, free_port(), workdir / "serve.log")
    server.start()
    claimed, lock, restarts = 0, threading.Lock(), 0
    errors: list[BaseException] = []

    def claim() -> bool:
        nonlocal claimed
        with lock:
            claimed += 1
            return claimed <= submits

    def work(lab: Labeler) -> None:
        try:
            lab.while_down(lab.login)  # a kill may come before every labeler has logged in
            while claim() and lab.submit_one():
                pass
        except BaseException as e:  # handed to the main thread, which raises it
            errors.append(e)

    clients = [Labeler(server.base, name, token, seed) for seed, (name, token) in enumerate(tokens.items())]
    threads = [threading.Thread(target=work, args=(lab,)) for lab in clients]
    start = time.perf_counter()
    try:
        for t in threads:
            t.start()
        if kill_after is not None:
            while sum(len(c.acked) for c in clients) < kill_after and any(t.is_alive() for t in threads):
                time.sleep(0.01)
            server.kill()
            server.start()
            restarts += 1
        for t in threads:
            t.join()
        seconds = time.perf_counter() - start
    finally:
        server.stop()
        for c in clients:
            c.client.close()
    if errors:
        raise errors[0]
    acked = {(c.name, item) for c in clients for item in c.acked}
    stored, rows = stored_labels(url)
    latencies = sorted(ms for c in clients for ms in c.latencies_ms)
    p95 = latencies[min(len(latencies) - 1, math.ceil(0.95 * len(latencies)) - 1)] if latencies else math.nan
    return LoadResult(
        submits=sum(len(c.acked) for c in clients), lost=len(acked - stored), duplicated=rows - len(stored),
        stored_unacknowledged=len(stored - acked), p95_ms=p95, seconds=seconds, restarts=restarts,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labelers", type=int, default=20)
    parser.add_argument("--submits", type=int, default=2000, help="acknowledged submits in total")
    parser.add_argument("--kill-after", type=int, default=None, help="SIGKILL + restart after this many")
    parser.add_argument("--db", default=None, help="SQLAlchemy URL of an empty database; default SQLite in tmp")
    parser.add_argument("--keep", default=None, help="work in this folder (kept) instead of a temporary one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.keep or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        result = run_load(workdir, args.labelers, args.submits, args.kill_after, args.db)
    db = args.db or "sqlite (WAL, synchronous=FULL)"
    print(f"labelers={args.labelers} db={db} cpus={os.cpu_count()} kill_after={args.kill_after}", flush=True)
    print(result.line(), flush=True)


if __name__ == "__main__":
    main()
