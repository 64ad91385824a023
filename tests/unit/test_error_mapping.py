"""The serving layer's error mapping on a plain FastAPI app: every error, expected or not, answers JSON."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient

from deployments.errors import install_error_handlers
from instantid_core.errors import GPUMemoryError, NoFaceDetected


def _client() -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom() -> dict:
        raise ZeroDivisionError("a bug")

    return TestClient(app, raise_server_exceptions=False)


def test_an_unexpected_exception_answers_a_json_500_naming_the_request():
    # Counting it is the Ingress's (IngressMetrics on Ray's metrics port, by route and status), not the handler's.
    response = _client().get("/boom")
    assert response.status_code == 500
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == "internal" and "internal error in request " in error["message"]
    assert "ZeroDivisionError" not in response.text and "a bug" not in response.text  # no internals


def test_unknown_routes_and_methods_answer_json():
    client = _client()
    assert client.get("/nowhere").json()["error"]["code"] == "not_found"
    wrong = client.post("/boom")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


def test_gpu_memory_is_a_503_with_retry_after_and_no_face_a_422():
    from deployments.errors import error_response

    busy = error_response(GPUMemoryError("1280x1280 with 4 image(s) does not fit"), retry_after_s=7)
    assert busy.status_code == 503 and busy.headers["retry-after"] == "7"
    assert error_response(NoFaceDetected("no face"), retry_after_s=7).status_code == 422
