import errno
import io
import json
import os
import shutil
import socket
import statistics
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from mnist_cnn import serve
from mnist_cnn.predict import DEFAULT_MODEL, Classifier


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def app():
    return serve.create_app(Classifier.load())


@pytest.fixture(scope="module")
def client(app):
    return TestClient(app)


@pytest.fixture(scope="module")
def seven(mnist) -> bytes:
    return png(255 - mnist.test_images[0].numpy())  # test image 0 is a 7


def test_predict_good_image(client, seven):
    r = client.post("/api/predict", files={"image": ("seven.png", seven, "image/png")})
    assert r.status_code == 200
    body = r.json()
    assert body["prediction"] == 7
    assert len(body["probabilities"]) == 10 and abs(sum(body["probabilities"]) - 1) < 1e-3


@pytest.mark.parametrize(
    "files, status, message",
    [
        ({"image": ("x.png", b"not an image", "image/png")}, 400, "not an image"),
        ({"image": ("x.png", b"", "image/png")}, 400, "empty"),
        ({"image": ("x.png", png(np.full((40, 40), 255, np.uint8)), "image/png")}, 400, "no ink"),
        ({"picture": ("x.png", b"abc", "image/png")}, 422, "the multipart form field 'image'"),
        ({}, 422, "field 'image' (body image: Field required)"),
        ({"image": ("x.png", png(np.zeros((4100, 10), np.uint8)), "image/png")}, 400,
         "limit is 4096"),
        # A LAB TIFF: Pillow decodes it but cannot convert it to grayscale.
        ({"image": ("x.tif", (lambda out: Image.new("LAB", (40, 40)).save(out, "TIFF")
                              or out.getvalue())(io.BytesIO()), "image/tiff")}, 400,
         "unsupported colour mode LAB"),
    ],
)
def test_bad_input_gets_a_4xx_json_error(client, files, status, message):
    r = client.post("/api/predict", files=files)
    assert r.status_code == status
    assert isinstance(r.json()["detail"], str) and message in r.json()["detail"]


def test_upload_size_limit(client):
    big = b"\0" * (serve.MAX_UPLOAD_BYTES + 10_000)
    r = client.post("/api/predict", files={"image": ("big.png", big, "image/png")})
    assert r.status_code == 413 and "too large" in r.json()["detail"]


def test_a_chunked_upload_is_refused_at_the_limit_not_read_to_the_end(app):
    # No Content-Length (Transfer-Encoding: chunked): the body is cut off once past the limit,
    # not spooled whole (here it would be 64 MB) before the handler sees it.
    import asyncio

    head = (b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n")
    received, replies = 0, []

    async def receive():
        nonlocal received
        chunk = head if received == 0 else b"\0" * 65536
        received += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": received < 64 << 20}

    async def send(message):
        replies.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/api/predict", "raw_path": b"/api/predict",
             "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
             "server": ("127.0.0.1", 80),
             "headers": [(b"content-type", b"multipart/form-data; boundary=x"),
                         (b"transfer-encoding", b"chunked")]}
    asyncio.run(app(scope, receive, send))
    assert replies[0]["status"] == 413 and b"too large" in replies[1]["body"]
    assert received < serve.MAX_UPLOAD_BYTES + 4096 + 65536 * 2


def test_not_multipart_is_a_4xx(client):
    r = client.post("/api/predict", content=b"raw bytes", headers={"content-type": "image/png"})
    assert 400 <= r.status_code < 500


def test_page_and_schema(client):
    page = client.get("/")
    assert page.status_code == 200 and "<canvas" in page.text
    schema = client.get("/openapi.json").json()
    op = schema["paths"]["/api/predict"]["post"]
    assert "multipart/form-data" in op["requestBody"]["content"]
    health = client.get("/api/health").json()
    assert health["status"] == "ok"
    # The page names the model that answers, as /api/health describes it.
    shipped = json.loads((DEFAULT_MODEL / "report.json").read_text())
    kind = json.loads((DEFAULT_MODEL / "config.json").read_text())["model"]
    assert health["model"] == (f"a {kind} model shipped with mnist-cnn, "
                               f"{100 * shipped['test_accuracy']:.2f}% on the MNIST test set")
    assert 'id="model"' in page.text and '"/api/health"' in page.text


@pytest.fixture(scope="module")
def server(app):
    """The real server on a free loopback port, in a thread, on a socket from `serve.listen` as
    `mnist-cnn serve` runs it."""
    socks = serve.listen("127.0.0.1", 0)
    port = socks[0].getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": socks}, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


def _multipart(data: bytes) -> tuple[bytes, str]:
    boundary = "mnistcnnboundary"
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"d.png\"\r\n"
        "Content-Type: image/png\r\n\r\n"
    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def test_load_500_requests_8_at_a_time(server, seven):
    body, ctype = _multipart(seven)

    def one(_):
        req = urllib.request.Request(f"{server}/api/predict", data=body,
                                     headers={"Content-Type": ctype})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=30) as resp:
            ok = resp.status == 200 and json.loads(resp.read())["prediction"] == 7
        return ok, time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(500)))
    wall = time.perf_counter() - t0
    assert all(ok for ok, _ in results), "some requests failed"
    ms = sorted(1000 * t for _, t in results)
    p50, p99 = statistics.median(ms), ms[int(0.99 * len(ms)) - 1]
    print(f"\nload test: 500 requests, 8 concurrent, 0 errors, p50 {p50:.1f} ms, "
          f"p99 {p99:.1f} ms, {500 / wall:.0f} requests/s")


CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def test_draw_a_digit_in_a_real_browser(server, tmp_path):
    if not (CHROMIUM and DRIVER):
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium and chromium-driver (see .ci/run)")
        pytest.skip("needs Debian's chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=900,780",
                "--disable-dev-shm-usage"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(DRIVER))
    try:
        driver.get(server + "/")
        pad = driver.find_element(By.ID, "pad")
        # A "7": a top bar from left to right, then a stroke down to the lower left.
        # Offsets are from the canvas centre (280 × 280 px).
        actions = ActionChains(driver, duration=20)
        actions.move_to_element_with_offset(pad, -70, -90).click_and_hold()
        for x in range(-50, 71, 20):
            actions.move_to_element_with_offset(pad, x, -90)
        for k in range(1, 10):
            actions.move_to_element_with_offset(pad, 70 - 9 * k, -90 + 20 * k)
        actions.release().perform()
        label = driver.find_element(By.ID, "digit")
        WebDriverWait(driver, 20).until(lambda d: label.text.strip() not in ("", "–"))
        time.sleep(0.5)  # let the last request of the stroke land
        assert label.text.strip() == "7"
        # The footer names the model, from /api/health.
        assert driver.find_element(By.ID, "model").text.startswith("Model: a ") and (
            "model shipped with mnist-cnn" in driver.find_element(By.ID, "model").text)
        shot = Path(os.environ.get("MNIST_CNN_SCREENSHOT", tmp_path / "serve.png"))
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        driver.quit()


def test_a_port_in_use_is_one_clear_line(capsys, monkeypatch):
    from mnist_cnn.cli import main

    def serve_forever(*args):
        raise AssertionError("served on a port that was taken")

    monkeypatch.setattr(serve, "run", serve_forever)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError):
            serve.listen("127.0.0.1", port)
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "in use" in err
    assert "Traceback" not in err

    # --host '' listens on every address: said in words, not as http://:8000/.
    def in_use(host, port):
        raise OSError(errno.EADDRINUSE, "Address already in use")

    monkeypatch.setattr(serve, "listen", in_use)
    assert main(["serve", "--host", "", "--port", "8000"]) == 2
    err = capsys.readouterr().err
    assert "cannot listen on port 8000 of every address: Address already in use" in err
    monkeypatch.setattr(serve, "listen", lambda host, port: [])
    monkeypatch.setattr(serve, "run", lambda classifier, socks: None)
    assert main(["serve", "--host", "", "--port", "8000"]) == 0
    err = capsys.readouterr().err
    assert "Serving on port 8000 of every address: http://localhost:8000/ here" in err
    # A URL or host:port in --host: said at once, not taken for an IPv6 address; an IPv6
    # address is one, without the brackets a URL puts around it.
    for host in ("http://localhost", "localhost:8000"):
        assert main(["serve", "--host", host]) == 2
        assert f"--host {host}: give a host name or address alone" in capsys.readouterr().err
    assert main(["serve", "--host", "[::1]"]) == 2
    assert "give the IPv6 address without brackets" in capsys.readouterr().err
    assert main(["serve", "--host", "::1", "--port", "8000"]) == 0
    assert "Serving on http://[::1]:8000/" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--port", "65536"])
    assert "must be 65535 or less" in capsys.readouterr().err


def test_the_serve_command_answers_on_every_address_and_stops_on_ctrl_c():
    """`mnist-cnn serve` itself, as a user starts it: on every address localhost names here
    (127.0.0.1, and ::1 where the machine names both), then Ctrl-C: exit status 0, no traceback."""
    import signal
    import subprocess
    import sys

    for _ in range(3):  # a port free now may be taken before the server binds it: another one
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        proc = subprocess.Popen(
            [sys.executable, "-m", "mnist_cnn", "serve", "--host", "localhost",
             "--port", str(port)],
            stderr=subprocess.PIPE, text=True,
        )
        try:
            answered = _wait_for_health(proc, port)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            try:
                _, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
        if answered or "in use" not in err:
            break
    assert answered, err
    assert proc.returncode == 0, err
    assert f"Serving on http://localhost:{port}/" in err and "Traceback" not in err


def _wait_for_health(proc, port: int) -> bool:
    """Whether the server answers /api/health on every address localhost names (False if it
    exited first)."""
    hosts = [f"[{a[0]}]" if family == socket.AF_INET6 else a[0]
             for family, *_, a in socket.getaddrinfo("localhost", port, type=socket.SOCK_STREAM)
             if _can_bind(family, a[0])]  # serve passes over ::1 where IPv6 is off
    deadline = time.time() + 60
    for host in hosts:
        while True:
            if proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"http://{host}:{port}/api/health", timeout=5) as r:
                    assert json.loads(r.read())["status"] == "ok"
                break
            except OSError:
                assert time.time() < deadline, f"no answer on {host}:{port}"
                time.sleep(0.2)
    return True


def _can_bind(family: int, address: str) -> bool:
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((address, 0))
        return True
    except OSError:
        return False


def test_listen_passes_over_an_address_this_machine_cannot_have(monkeypatch):
    if _can_bind(socket.AF_INET, "192.0.2.1"):
        pytest.skip("this machine binds addresses it does not have (ip_nonlocal_bind)")
    # 192.0.2.1 (a documentation address) is not this machine's: binding it fails as ::1 does
    # where IPv6 is off. With another address that binds, serve listens there alone.
    real = socket.getaddrinfo

    def resolve(*names):
        return lambda host, port, **kw: [
            info for name in names for info in real(name, port, type=socket.SOCK_STREAM)]

    monkeypatch.setattr(socket, "getaddrinfo", resolve("192.0.2.1", "127.0.0.1"))
    socks = serve.listen("twohosts", 0)
    try:
        assert [s.getsockname()[0] for s in socks] == ["127.0.0.1"]
    finally:
        for s in socks:
            s.close()
    monkeypatch.setattr(socket, "getaddrinfo", resolve("192.0.2.1"))
    with pytest.raises(OSError):
        serve.listen("nothere", 0)
