"""
Upload an export to Neuronpedia through its self-serve REST API (spec §1.3, §B.3).

The exporter leaves the request bodies in `neuronpedia_api_payloads/`, in the order of
`plan.json`: POST model/new, POST source-set/new (which creates `{layer}-{set}` for every layer),
then POST feature/upload-batch with at most 128 features each. `upload` sends them; without
`yes=True` it only prints what it would send.

Notable choices
- The key comes from the environment variable NEURONPEDIA_API_KEY only and travels only in the
  `x-api-key` header. It is never printed, logged, written, or put into an exception message;
  redirects are refused (urllib would forward the header to the new host), and so is plain
  http to anything but localhost.
- Neuronpedia never updates a feature on re-upload but does duplicate its activations and
  explanations, so a ledger records every request the server accepted (JSONL, appended and
  fsynced per request, keyed by API URL). A rerun skips what the ledger has and resends,
  whole, any request the ledger lacks (nothing is recorded until the server answers 2xx). The
  default ledger
  lives outside the export (NANOCHAT_ATLAS_CACHE or ~/.cache/nanochat-atlas/), so re-exporting
  cannot lose it.
- 429, 5xx and network errors are retried with exponential backoff (Retry-After honoured);
  401/403 stop at once; other 4xx stop with the server's message.
- The payloads are checked with the offline validator before anything is sent.
- Standard library only (urllib).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from atlas.neuronpedia import API_DIR, API_FORMAT
from atlas.neuronpedia_validate import validate_api_payloads

DEFAULT_API_URL = "https://www.neuronpedia.org/api"
KEY_ENV = "NEURONPEDIA_API_KEY"
MAX_BATCH = 128
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


class UploadError(RuntimeError):
    """The upload cannot go on; the message says what was sent and what to do."""


class AuthError(UploadError):
    """Neuronpedia refused the API key (401/403)."""


@dataclass
class UploadConfig:
    api_url: str = DEFAULT_API_URL
    yes: bool = False                  # False: dry run, nothing is sent
    ledger: Path | None = None         # default: default_ledger()
    batch_size: int = MAX_BATCH        # features per upload-batch request, ≤128
    skip_create: bool = False          # the model and source sets exist already
    max_retries: int = 6
    retry_delay_s: float = 2.0         # first backoff; doubles per retry
    max_delay_s: float = 120.0
    timeout_s: float = 300.0


@dataclass
class Request:
    endpoint: str                      # e.g. "feature/upload-batch"
    file: str                          # payload file it comes from
    body: dict
    ledger_entry: dict                 # what to record once the server accepts it
    note: str                          # one human line for the plan


def default_ledger() -> Path:
    base = os.environ.get("NANOCHAT_ATLAS_CACHE") or Path.home() / ".cache" / "nanochat-atlas"
    return Path(base) / "neuronpedia_ledger.jsonl"


def upload(export_dir: str | os.PathLike, cfg: UploadConfig | None = None, log=print) -> dict:
    """Send (or with cfg.yes False, print) the export's API requests; return a summary."""
    cfg = cfg or UploadConfig()
    export_dir = Path(export_dir)
    api_url = _check_api_url(cfg.api_url)
    if not 1 <= cfg.batch_size <= MAX_BATCH:
        raise UploadError(f"--batch-size must be in 1..{MAX_BATCH}, got {cfg.batch_size}")
    ledger_path = Path(cfg.ledger) if cfg.ledger else default_ledger()
    done = load_ledger(ledger_path, api_url)
    requests, already = plan_requests(export_dir, done, cfg)
    n_features = sum(len(r.body["features"]) for r in requests if "features" in r.body)

    key = os.environ.get(KEY_ENV, "")
    if not cfg.yes:
        log("DRY RUN: nothing is sent. Rerun with --yes to upload.")
        log(f"API {api_url}; {KEY_ENV} is {'set' if key else 'NOT set (needed for --yes)'}; "
            f"ledger {ledger_path}")
    for r in requests:
        log(f"  POST {r.endpoint:<22} {r.note}")
    log(f"{len(requests)} requests, {n_features} features to send; "
        f"{already} features already sent according to the ledger")
    summary = {"dry_run": not cfg.yes, "requests": len(requests), "features": n_features,
               "already_sent": already, "sent_requests": 0, "sent_features": 0,
               "ledger": str(ledger_path)}
    if not cfg.yes or not requests:
        return summary
    if not key:
        raise UploadError(f"{KEY_ENV} is not set; get a key at neuronpedia.org → Account")

    for r in requests:
        _post(api_url, r, key, cfg)
        append_ledger(ledger_path, {"api": api_url, **r.ledger_entry,
                                    "at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        summary["sent_requests"] += 1
        summary["sent_features"] += len(r.body.get("features", []))
        log(f"  sent {r.endpoint} {r.note}")
    return summary


def plan_requests(export_dir: Path, done: set, cfg: UploadConfig) -> tuple[list[Request], int]:
    """The requests still to send, in plan order; and how many features the ledger skips."""
    api = export_dir / API_DIR
    if not (api / "plan.json").is_file():
        raise UploadError(f"{api / 'plan.json'} not found: is {export_dir} an export made by "
                          "python -m scripts.neuronpedia_export?")
    problems = [p for p in validate_api_payloads(export_dir) if p.severity == "error"]
    if problems:
        shown = "\n  ".join(str(p) for p in problems[:10])
        raise UploadError(f"the API payloads do not validate ({len(problems)} problems); "
                          f"nothing was sent:\n  {shown}")
    plan = json.loads((api / "plan.json").read_text(encoding="utf-8"))
    if plan.get("format") != API_FORMAT:
        raise UploadError(f"{api / 'plan.json'}: format {plan.get('format')!r}, "
                          f"expected {API_FORMAT!r}")
    requests: list[Request] = []
    already = 0
    for req in plan["requests"]:
        body = json.loads((api / req["file"]).read_text(encoding="utf-8"))
        endpoint = req["endpoint"]
        if endpoint == "model/new":
            entry = {"kind": "model", "modelId": body["id"]}
            if not cfg.skip_create and _entry_key(entry) not in done:
                requests.append(Request(endpoint, req["file"], body, entry,
                                        f"model {body['id']} ({body['layers']} layers)"))
        elif endpoint == "source-set/new":
            entry = {"kind": "source-set", "modelId": body["modelId"], "name": body["name"]}
            if not cfg.skip_create and _entry_key(entry) not in done:
                requests.append(Request(endpoint, req["file"], body, entry,
                                        f"source set {body['modelId']}/{body['name']}"))
        else:
            model_id, source = body["modelId"], body["source"]
            todo = [f for f in body["features"]
                    if ("feature", model_id, source, f["index"]) not in done]
            already += len(body["features"]) - len(todo)
            for i in range(0, len(todo), cfg.batch_size):
                chunk = todo[i:i + cfg.batch_size]
                indices = [f["index"] for f in chunk]
                entry = {"kind": "features", "modelId": model_id, "source": source,
                         "indices": indices}
                requests.append(Request(
                    endpoint, req["file"], {"modelId": model_id, "source": source,
                                            "features": chunk}, entry,
                    f"{model_id}/{source}: {len(chunk)} features ({indices[0]}..{indices[-1]}) "
                    f"from {req['file']}"))
    return requests, already


def load_ledger(path: Path, api_url: str) -> set:
    """What the server at `api_url` accepted: ('model', id), ('source-set', model, name),
    ('feature', model, source, index)."""
    done: set = set()
    if not path.exists():
        return done
    lines = path.read_text(encoding="utf-8").split("\n")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError as e:
            if n == len(lines):
                continue  # a torn last line (no newline) from a crash: that request is resent
            raise UploadError(f"{path}:{n}: ledger line is not JSON ({e}); fix or move the "
                              "ledger before uploading") from e
        if entry.get("api") != api_url:
            continue
        if entry.get("kind") == "features":
            done.update(("feature", entry["modelId"], entry["source"], i)
                        for i in entry["indices"])
        else:
            done.add(_entry_key(entry))
    return done


def append_ledger(path: Path, entry: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _entry_key(entry: dict) -> tuple:
    if entry["kind"] == "model":
        return ("model", entry["modelId"])
    return ("source-set", entry["modelId"], entry["name"])


def _check_api_url(url: str) -> str:
    url = url.rstrip("/")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UploadError(f"--api-url {url!r} is not an http(s) URL")
    if parts.scheme == "http" and parts.hostname not in LOCAL_HOSTS:
        raise UploadError(f"refusing to send the API key over plain http to {parts.hostname}; "
                          "use https")
    return url


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # urllib would re-send our headers, the key included, to the new URL


_OPENER = urllib.request.build_opener(_NoRedirect)


def _post(api_url: str, r: Request, key: str, cfg: UploadConfig) -> None:
    url = f"{api_url}/{r.endpoint}"
    data = json.dumps(r.body, ensure_ascii=False, allow_nan=False).encode("utf-8")
    what = f"POST {r.endpoint} ({r.note})"
    delay = cfg.retry_delay_s
    for attempt in range(cfg.max_retries + 1):
        req = urllib.request.Request(url, data=data, method="POST", headers={
            "Content-Type": "application/json", "x-api-key": key,
            "User-Agent": "nanochat-atlas"})
        try:
            with _OPENER.open(req, timeout=cfg.timeout_s) as resp:
                resp.read()
                return
        except urllib.error.HTTPError as e:
            body = e.read()[:500].decode("utf-8", "replace")
            if e.code in (401, 403):
                raise AuthError(f"Neuronpedia refused the API key (HTTP {e.code}) at {what}. "
                                f"Check {KEY_ENV} and that this account owns the model and "
                                "source set; the ledger has everything sent so far.") from None
            if 300 <= e.code < 400:
                raise UploadError(f"{url} redirects (HTTP {e.code}) to "
                                  f"{e.headers.get('Location')!r}; pass that API root as "
                                  "--api-url") from None
            if e.code != 429 and e.code < 500:
                raise UploadError(f"HTTP {e.code} at {what}: {body}") from None
            failure = f"HTTP {e.code}"
            delay = _retry_after(e.headers.get("Retry-After"), delay)
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            failure = f"network error: {getattr(e, 'reason', e)}"
        if attempt == cfg.max_retries:
            raise UploadError(f"gave up on {what} after {attempt + 1} attempts ({failure}); "
                              "rerun later, the ledger skips what was sent")
        time.sleep(min(delay, cfg.max_delay_s))
        delay *= 2


def _retry_after(header: str | None, fallback: float) -> float:
    try:
        return max(float(header), fallback) if header else fallback
    except ValueError:
        return fallback
