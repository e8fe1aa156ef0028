"""The uploader against a local recording HTTP server on 127.0.0.1 (never the real service)."""

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from atlas.neuronpedia import API_DIR, export_neuronpedia
from scripts import neuronpedia_upload
from tests.np_fixtures import build_store

KEY = "np-test-key-7f3a91c2"


class Recorder(ThreadingHTTPServer):
    """Records every request; `script[path]` lists statuses to answer first (then 200)."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[dict] = []
        self.script: dict[str, list] = {}
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/api"

    def posts(self, path: str) -> list[dict]:
        return [r for r in self.requests if r["path"] == path]


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with self.server.lock:
            self.server.requests.append({"path": self.path, "headers": dict(self.headers),
                                         "body": json.loads(body)})
            queue = self.server.script.get(self.path, [])
            status = queue.pop(0) if queue else 200
        headers = {}
        if isinstance(status, tuple):
            status, headers = status
        payload = json.dumps({"ok": status == 200} if status != 400 else
                             {"error": "index 3: explanation type 'x' does not exist"}).encode()
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = Recorder()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("npu")
    store = build_store(root / "features.duckdb", n_top=3, per_bin=1)
    export_neuronpedia(store, root / "export", quiet=True)
    return root / "export"


@pytest.fixture
def export(pristine, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_ATLAS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NEURONPEDIA_API_KEY", KEY)
    shutil.copytree(pristine, tmp_path / "export")
    return tmp_path / "export"


def run(export, server, *flags):
    return neuronpedia_upload.main([str(export), "--api-url", server.url, "--retry-delay",
                                    "0.01", *flags])


def ledger_lines(tmp_path):
    path = tmp_path / "cache" / "neuronpedia_ledger.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_dry_run_sends_nothing(export, server, tmp_path, capsys):
    assert run(export, server) == 0
    out = capsys.readouterr()
    assert server.requests == []
    assert "DRY RUN" in out.out and "NEURONPEDIA_API_KEY is set" in out.out
    assert "POST feature/upload-batch" in out.out and "78 features to send" in out.out
    assert KEY not in out.out + out.err
    assert ledger_lines(tmp_path) == []


def test_upload_sends_the_plan_in_batches_with_the_key(export, server, tmp_path, capsys):
    assert run(export, server, "--yes", "--batch-size", "16") == 0
    paths = [r["path"] for r in server.requests]
    assert paths == ["/api/model/new", "/api/source-set/new"] + ["/api/feature/upload-batch"] * 6
    for r in server.requests:
        headers = {k.lower(): v for k, v in r["headers"].items()}
        assert headers["x-api-key"] == KEY
        assert headers["content-type"] == "application/json"
    assert server.requests[0]["body"] == {"id": "nanochat-d20", "layers": 20,
                                          "displayName": "nanochat d20"}
    assert server.requests[1]["body"]["name"] == "atlas-res-40"
    batches = [r["body"] for r in server.posts("/api/feature/upload-batch")]
    assert [len(b["features"]) for b in batches] == [16, 16, 7, 16, 16, 7]
    for source in ("4-atlas-res-40", "10-atlas-res-40"):
        sent = [f["index"] for b in batches if b["source"] == source for f in b["features"]]
        assert sent == list(range(39))  # every live feature once; 39 is dead
    feature = batches[0]["features"][0]
    assert set(feature) == {"index", "density", "topLogits", "bottomLogits", "explanations",
                            "activations"}
    assert batches[0]["modelId"] == "nanochat-d20"
    ledger = ledger_lines(tmp_path)
    assert [e["kind"] for e in ledger] == ["model", "source-set"] + ["features"] * 6
    assert all(e["api"] == server.url for e in ledger)
    out = capsys.readouterr()
    assert KEY not in out.out + out.err
    assert KEY not in (tmp_path / "cache" / "neuronpedia_ledger.jsonl").read_text()

    # a rerun sends nothing: the ledger has it all
    assert run(export, server, "--yes") == 0
    assert len(server.requests) == 8
    assert "78 features already sent" in capsys.readouterr().out


def test_partial_ledger_resumes_where_it_stopped(export, server, tmp_path):
    ledger = tmp_path / "cache" / "neuronpedia_ledger.jsonl"
    ledger.parent.mkdir(parents=True)
    entries = [{"api": server.url, "kind": "model", "modelId": "nanochat-d20"},
               {"api": server.url, "kind": "source-set", "modelId": "nanochat-d20",
                "name": "atlas-res-40"},
               {"api": server.url, "kind": "features", "modelId": "nanochat-d20",
                "source": "4-atlas-res-40", "indices": list(range(10))},
               {"api": "https://elsewhere.example/api", "kind": "features",  # other server
                "modelId": "nanochat-d20", "source": "10-atlas-res-40", "indices": [0, 1]}]
    ledger.write_text("".join(json.dumps(e) + "\n" for e in entries) + '{"api": "tor')
    assert run(export, server, "--yes") == 0
    assert [r["path"] for r in server.requests] == ["/api/feature/upload-batch"] * 2
    first, second = (r["body"] for r in server.requests)
    assert [f["index"] for f in first["features"]] == list(range(10, 39))
    assert [f["index"] for f in second["features"]] == list(range(39))


@pytest.mark.parametrize("status", [503, 500, (429, {"Retry-After": "0"})])
def test_retries_transient_failures(export, server, tmp_path, status):
    server.script["/api/feature/upload-batch"] = [status]
    assert run(export, server, "--yes") == 0
    batches = server.posts("/api/feature/upload-batch")
    assert len(batches) == 3  # the first one twice
    assert batches[0]["body"] == batches[1]["body"]
    assert [e["kind"] for e in ledger_lines(tmp_path)] == ["model", "source-set", "features",
                                                           "features"]


def test_gives_up_after_max_retries(export, server, tmp_path, capsys):
    server.script["/api/source-set/new"] = [503] * 10
    assert run(export, server, "--yes", "--max-retries", "2") == 1
    assert len(server.posts("/api/source-set/new")) == 3
    assert server.posts("/api/feature/upload-batch") == []
    err = capsys.readouterr().err
    assert "gave up on POST source-set/new" in err and "after 3 attempts (HTTP 503)" in err
    assert [e["kind"] for e in ledger_lines(tmp_path)] == ["model"]


@pytest.mark.parametrize("path,status", [("/api/model/new", 401),
                                         ("/api/feature/upload-batch", 403)])
def test_stops_at_once_on_a_refused_key(export, server, tmp_path, capsys, path, status):
    server.script[path] = [status] * 10
    assert run(export, server, "--yes") == 1
    assert server.requests[-1]["path"] == path
    assert len(server.posts(path)) == 1  # never retried
    err = capsys.readouterr().err
    assert f"Neuronpedia refused the API key (HTTP {status})" in err
    assert KEY not in err
    kinds = [e["kind"] for e in ledger_lines(tmp_path)]
    assert kinds == ([] if path == "/api/model/new" else ["model", "source-set"])


def test_other_client_errors_stop_with_the_server_message(export, server, capsys):
    server.script["/api/feature/upload-batch"] = [400]
    assert run(export, server, "--yes") == 1
    assert len(server.posts("/api/feature/upload-batch")) == 1
    assert "explanation type 'x' does not exist" in capsys.readouterr().err


def test_redirects_are_not_followed(export, server, capsys):
    server.script["/api/model/new"] = [(307, {"Location": "/elsewhere"})]
    assert run(export, server, "--yes") == 1
    assert [r["path"] for r in server.requests] == ["/api/model/new"]
    assert "redirects (HTTP 307)" in capsys.readouterr().err


def test_refusals_before_anything_is_sent(export, server, monkeypatch, capsys):
    monkeypatch.delenv("NEURONPEDIA_API_KEY")
    assert run(export, server, "--yes") == 1
    assert "NEURONPEDIA_API_KEY is not set" in capsys.readouterr().err
    monkeypatch.setenv("NEURONPEDIA_API_KEY", KEY)
    assert neuronpedia_upload.main([str(export), "--yes", "--api-url",
                                    "http://example.com/api"]) == 1
    assert "refusing to send the API key over plain http" in capsys.readouterr().err
    plan = json.loads((export / API_DIR / "plan.json").read_text())
    batch = export / API_DIR / plan["requests"][-1]["file"]
    body = json.loads(batch.read_text())
    body["features"][0]["activations"] = []
    batch.write_text(json.dumps(body))
    assert run(export, server, "--yes") == 1
    assert "do not validate" in capsys.readouterr().err
    assert server.requests == []
