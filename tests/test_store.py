"""The inspection store: records, labels, kept images, the spill file, the API, the CLI, and that no
answered verdict is lost or recorded twice — against a real SQLite file and a real PostgreSQL server
(tests/postgres.py starts one), never a mock of either."""
from __future__ import annotations

import csv
import os
import sqlite3
import subprocess
import sys
import threading
import uuid
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
import requests
from postgres import PostgresServer
from servers import LIMITS, free_port, live_server, png, wait_for, wait_until_serving

from anomalyvfm.cli.main import main
from anomalyvfm.demo import textured_image
from anomalyvfm.errors import UserInputError
from anomalyvfm.service.app import create_app
from anomalyvfm.store import Filters, Inspection, Recorder, UnknownInspection, open_store
from anomalyvfm.store.images import ImageKeeper
from anomalyvfm.store.spill import Spill

SRC = str(Path(__file__).resolve().parents[1] / "src")
RNG = np.random.default_rng(23)
IMAGES = [png(textured_image(RNG, 112, 154)) for _ in range(3)]


@pytest.fixture(autouse=True)
def own_state_folder(tmp_path, monkeypatch) -> None:
    """A PostgreSQL store's spill file lives under $XDG_STATE_HOME: one per test, never the user's."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "results.db")
    return request.getfixturevalue("postgres").new_database(f"t{uuid.uuid4().hex[:10]}")


def record(n: int, **values) -> Inspection:
    fields = dict(source=f"part_{n}.png", sha256=f"{n:064x}", size_bytes=100 + n, model_name="m",
                  model_version="v1", score=float(n), image_threshold=2.5, pixel_threshold=1.0,
                  is_anomalous=n > 2.5, outlined_fraction=0.0, request_id=f"r{n}")
    return Inspection.new(**{**fields, **values})


def post_image(base: str, data: bytes, name: str = "part.png", request_id: str | None = None,
               headers: dict[str, str] | None = None) -> requests.Response:
    headers = {**(headers or {}), **({"X-Request-ID": request_id} if request_id else {})}
    return requests.post(base + "/predict", files={"file": (name, data, "image/png")}, headers=headers, timeout=120)


# -- the store itself, on both databases ---------------------------------------------------------------
def test_records_filters_labels_and_labelled_images(store_url, tmp_path):
    store = open_store(store_url, keep_images=tmp_path / "kept")
    recorder = Recorder(store)
    try:
        digests = [store.keep(data) for data in IMAGES]
        records = [record(n, sha256=digests[n % 3]) for n in range(5)]
        assert {recorder.record(r) for r in records} == {"stored"}
        store.add(records[:2])  # a replay of records already there changes nothing
        page, total = store.find(limit=2)
        assert total == 5 and [p["id"] for p in page] == [r.id for r in records[::-1][:2]]  # newest first
        assert {"id", "time", "source", "score", "is_anomalous", "model_version", "label"} <= set(page[0])
        assert store.find(Filters(verdict="anomalous"))[1] == 2
        assert store.find(Filters(since=records[3].time))[1] == 2 and store.find(Filters(until=records[1].time))[1] == 1
        assert store.find(Filters(model_version="other"))[1] == 0
        labelled = store.set_label(records[4].id, "good", "reflection, not a scratch", "anna")
        assert (labelled["label"], labelled["label_by"], labelled["label_note"]) == ("good", "anna", "reflection, not a scratch")
        store.set_label(records[0].id, "defect")
        assert store.find(Filters(label="none"))[1] == 3 and store.find(Filters(label="good"))[1] == 1
        (good,) = store.labelled("good")
        assert (good.id, good.score, good.is_anomalous, good.model_version) == (records[4].id, 4.0, True, "v1")
        assert good.image_path is not None and good.image_path.read_bytes() == IMAGES[4 % 3]
        with pytest.raises(UnknownInspection):
            store.set_label("no-such-id", "good")
        with pytest.raises(UserInputError, match="label must be 'good' or 'defect'"):
            store.set_label(records[1].id, "ok")
        assert store.get(records[1].id)["label"] is None  # nothing changed by the refusals
    finally:
        recorder.close()
        store.close()
    reopened = open_store(store_url, keep_images=None)  # migrations are not run twice; the records are there
    assert reopened.find()[1] == 5 and reopened.labelled("defect")[0].image_path is None
    reopened.close()


def test_spill_replays_in_order_exactly_once_after_a_partial_write(tmp_path):
    """A replay that fails half-way, a record already in the store (written, then the connection broke)
    and a line torn by a kill: every record ends up in the store once, in order."""
    store = open_store(str(tmp_path / "results.db"), keep_images=None)
    spill = Spill(tmp_path / "spill.jsonl")
    records = [record(n) for n in range(7)]
    spill.append([r.to_json() for r in records[:5]])
    store.add(records[1:2])
    calls = []

    def flaky(rows):
        calls.append([row["id"] for row in rows])
        if len(calls) == 2:
            raise OSError("connection lost")
        store.add(Inspection.from_json(row) for row in rows)

    with pytest.raises(OSError):
        spill.replay(flaky, chunk=2)
    assert spill.waiting == 3 and Spill(spill.path).waiting == 3
    with open(spill.path, "ab") as file:
        file.write(b'{"id": "torn')  # an append killed before its fsync returned: never acknowledged
    spill.append([r.to_json() for r in records[5:]])
    assert spill.replay(lambda rows: store.add(Inspection.from_json(row) for row in rows)) == 5
    assert spill.waiting == 0 and spill.path.read_bytes() == b""
    assert [c[0] for c in calls] == [records[0].id, records[2].id]
    rows = list(store.rows())
    assert sorted(r["id"] for r in rows) == sorted(r.id for r in records) and len(rows) == 7
    store.close()


def test_image_cap_deletes_the_oldest_unlabelled_never_a_labelled_one(tmp_path):
    store = open_store(str(tmp_path / "results.db"), keep_images=None)
    keeper = ImageKeeper(tmp_path / "kept", max_bytes=sum(map(len, IMAGES)) - 1, protected=store.labelled_hashes)
    first = keeper.keep(IMAGES[0])
    store.add([rec := record(0, sha256=first)])
    store.set_label(rec.id, "defect")
    second = keeper.keep(IMAGES[1])
    os.utime(keeper.path(first), ns=(1, 1))  # the labelled image is the oldest by far
    os.utime(keeper.path(second), ns=(2, 2))
    third = keeper.keep(IMAGES[2])  # over the cap: the oldest unlabelled one goes
    assert keeper.path(first) is not None and keeper.path(second) is None and keeper.path(third) is not None
    assert keeper.keep(IMAGES[0]) == first and keeper.path(first).suffix == ".png"
    store.close()


# -- bad input: one line, exit 2, nothing changed -------------------------------------------------------
def newer_store(path: Path) -> Path:
    store = open_store(str(path), keep_images=None)
    store.add([record(0)])
    store.close()
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE alembic_version SET version_num = '0099'")
    return path


def content(path: Path) -> list[str] | bytes | None:
    """What a database holds (SQL text: WAL checkpoints move bytes without changing it), else the file's bytes."""
    if not path.exists():
        return None
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
            return list(connection.iterdump())
    except sqlite3.DatabaseError:
        return path.read_bytes()


@pytest.mark.parametrize("case", ["newer", "not a database", "other tables", "scheme", "unreachable", "no folder"])
def test_a_bad_store_is_one_line_and_changes_nothing(case, tmp_path, capsys, fitted_model):
    path = tmp_path / "results.db"
    if case == "newer":
        newer_store(path)
    elif case == "not a database":
        path.write_bytes(b"just some text, not SQLite\n" * 10)
    elif case == "other tables":
        with sqlite3.connect(path) as connection:
            connection.execute("CREATE TABLE parts (id INTEGER)")
    url = {"scheme": "mysql://user@host/db", "unreachable": f"postgresql://postgres:pw@127.0.0.1:{free_port()}/x",
           "no folder": str(tmp_path / "missing" / "results.db")}.get(case, str(path))
    before = content(path)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "part.png").write_bytes(IMAGES[0])
    code = main(["predict", "--model", str(fitted_model), "--store", url, "--out", str(tmp_path / "out"),
                 str(tmp_path / "in" / "part.png")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("anomalyvfm: error: --store"), err
    assert "pw" not in err and "Traceback" not in err
    expected = {"newer": "schema version 0099 is newer", "not a database": "not a database",
                "other tables": "not an inspection store", "scheme": "unsupported database 'mysql'",
                "unreachable": "cannot open the store", "no folder": "does not exist"}[case]
    assert expected in err
    assert content(path) == before
    assert not (tmp_path / "results-images").exists() and not (tmp_path / "results.db.spill.jsonl").exists()


# -- serve and predict with a store ---------------------------------------------------------------------
def test_service_records_every_verdict_and_takes_labels(fitted_model, tmp_path, data_root):
    store = open_store(str(tmp_path / "results.db"))
    bad = data_root / "demo" / "test_public" / "bad" / "000_regular.png"
    with live_server(create_app(fitted_model, "key", LIMITS, store=store), LIMITS) as base:
        key = {"X-API-Key": "key"}
        answer = post_image(base, IMAGES[0], "a.png", "req-a", headers=key)
        assert answer.status_code == 200
        batch = requests.post(base + "/predict/batch", headers=key, timeout=120,
                              files=[("files", ("b.png", bad.read_bytes(), "image/png")),
                                     ("files", ("c.png", b"not an image", "image/png"))])
        assert [r["status"] for r in batch.json()["results"]] == [200, 422]
        assert requests.get(base + "/inspections", timeout=30).status_code == 401
        listing = requests.get(base + "/inspections", headers=key, timeout=30).json()
        assert listing["total"] == 2 and [i["source"] for i in listing["inspections"]] == ["b.png", "a.png"]
        first = listing["inspections"][1]
        assert first["request_id"] == "req-a" and first["score"] == answer.json()["score"]
        assert first["model_version"] and first["model_version"] == store.find()[0][0]["model_version"]
        assert first["image_threshold"] == answer.json()["threshold"] and first["outlined_fraction"] is not None
        flagged = requests.get(base + "/inspections?verdict=anomalous", headers=key, timeout=30).json()
        assert [i["source"] for i in flagged["inspections"]] == ["b.png"]
        image = requests.get(f"{base}/inspections/{first['id']}/image", headers=key, timeout=30)
        assert image.content == IMAGES[0]
        label = requests.post(f"{base}/inspections/{first['id']}/label", headers=key, timeout=30,
                              json={"label": "defect", "note": "dent"})
        assert label.status_code == 200 and label.json()["label"] == "defect" and label.json()["label_by"] == "127.0.0.1"
        unknown = requests.post(f"{base}/inspections/nope/label", headers=key, json={"label": "good"}, timeout=30)
        wrong = requests.post(f"{base}/inspections/{first['id']}/label", headers=key, json={"label": "ok"}, timeout=30)
        assert unknown.status_code == 404 and "nope" in unknown.json()["detail"]
        assert wrong.status_code == 422 and "label" in wrong.json()["detail"] and "\n" not in wrong.json()["detail"]
        assert requests.get(f"{base}/inspections/{first['id']}", headers=key, timeout=30).json()["label"] == "defect"
        ready = requests.get(base + "/health/ready", timeout=30).json()
        assert (ready["store"], ready["records_waiting"]) == ("ok", 0)
        metrics = requests.get(base + "/metrics", timeout=30).text
        assert "anomalyvfm_store_degraded 0.0" in metrics and "anomalyvfm_store_records_stored 2.0" in metrics
    store.close()


def test_predict_records_and_history_exports(fitted_model, data_root, tmp_path):
    folder = data_root / "demo" / "test_public" / "good"
    db = tmp_path / "results.db"
    assert main(["predict", "--model", str(fitted_model), "--store", str(db), "--out", str(tmp_path / "out"),
                 "--no-images", str(folder)]) == 0
    with open(tmp_path / "out" / "predictions.csv") as file:
        scored = {row["path"]: row for row in csv.DictReader(file)}
    assert main(["history", "--store", str(db), "--out", str(tmp_path / "h.csv")]) == 0
    with open(tmp_path / "h.csv") as file:
        rows = list(csv.DictReader(file))
    assert {r["source"] for r in rows} == set(scored) and len({r["request_id"] for r in rows}) == 1
    assert all(f"{float(r['score']):.6g}" == scored[r["source"]]["score"] for r in rows)
    assert all(Path(tmp_path / "results-images" / r["sha256"][:2]).is_dir() for r in rows)
    assert main(["history", "--store", str(db), "--label", "good", "--out", str(tmp_path / "h.parquet")]) == 0
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "h.parquet").num_rows == 0
    assert main(["history", "--store", str(db), "--out", str(tmp_path / "h.txt")]) == 2
    assert main(["history", "--store", str(tmp_path / "typo.db"), "--out", str(tmp_path / "h.csv")]) == 2
    assert not (tmp_path / "typo.db").exists()


def test_kill_9_under_load_leaves_every_answered_verdict_stored_once(fitted_model, tmp_path):
    db, port = tmp_path / "results.db", free_port()
    process = subprocess.Popen([sys.executable, "-m", "anomalyvfm.cli.main", "serve", "--model", str(fitted_model),
                                "--port", str(port), "--store", str(db)], env={**os.environ, "PYTHONPATH": SRC},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base, answered, failed, lock = f"http://127.0.0.1:{port}", [], [], threading.Lock()

    def client(n: int) -> None:
        for i in range(10_000):
            request_id = f"c{n}-{i}"
            try:
                response = post_image(base, IMAGES[i % 3], request_id=request_id)
            except requests.ConnectionError:
                return  # the server is gone
            with lock:
                (answered if response.status_code == 200 else failed).append(request_id)

    try:
        wait_until_serving(process, base)
        clients = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(2)]
        for thread in clients:
            thread.start()
        wait_for(lambda: len(answered) >= 8 or failed, "8 verdicts answered")
        process.kill()  # SIGKILL: no shutdown, no flush, requests in flight cut off
        process.wait(60)
        for thread in clients:
            thread.join(60)
    finally:
        if process.poll() is None:
            process.kill()
    assert not failed, failed
    store = open_store(str(db), keep_images=None)
    stored = Counter(row["request_id"] for row in store.rows())
    store.close()
    assert set(answered) <= set(stored), sorted(set(answered) - set(stored))
    assert max(stored.values()) == 1  # every request id once (a request in flight at the kill: once or not at all)


def test_postgresql_outage_mid_run_loses_nothing_and_writes_nothing_twice(fitted_model, postgres):
    """The server stops (fast shutdown: connections cut) while clients keep sending; every request is still
    answered, readiness and metrics say the store is degraded and how many records wait; once the server is
    back, the spill file empties into it: each answered verdict exactly once."""
    store = open_store(postgres.new_database("outage"), keep_images=None)
    answered, failed, stop, lock = [], [], threading.Event(), threading.Lock()
    with live_server(create_app(fitted_model, limits=LIMITS, store=store), LIMITS) as base:
        def load() -> None:
            while not stop.is_set() and not failed:
                request_id = uuid.uuid4().hex
                response = post_image(base, IMAGES[len(answered) % 3], request_id=request_id)
                with lock:
                    if response.status_code == 200:
                        answered.append(request_id)
                    else:
                        failed.append(f"{response.status_code} {response.text}")

        def count(n: int) -> Callable[[], bool]:
            return lambda: len(answered) >= n or bool(failed)

        def ready() -> dict:
            return requests.get(base + "/health/ready", timeout=30).json()

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        try:
            wait_for(count(5), "5 verdicts before the outage")
            postgres.stop()
            wait_for(lambda: ready()["store"] == "degraded" or failed, "the store reported degraded")
            during = len(answered)
            wait_for(count(during + 5), "5 verdicts during the outage")
            state = ready()
            assert state["status"] == "ready" and state["records_waiting"] >= 5 and state["last_error"]
            assert "anomalyvfm_store_degraded 1.0" in requests.get(base + "/metrics", timeout=30).text
        finally:
            postgres.start()
        after = len(answered)
        wait_for(count(after + 5), "5 verdicts after the restart")
        stop.set()
        loader.join(120)
        assert not failed, failed
        wait_for(lambda: ready()["records_waiting"] == 0, "the spill file replayed")
        assert ready()["store"] == "ok"
    stored = Counter(row["request_id"] for row in store.rows())
    store.close()
    assert sorted(stored) == sorted(answered) and set(stored.values()) == {1}
