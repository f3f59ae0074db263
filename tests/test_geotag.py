"""The geotagger: URL parsing, Flickr answers, rate limit, and whole runs against a fake Flickr on 127.0.0.1."""

import collections
import csv
import dataclasses
import http.server
import io
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import numpy as np
import pytest

from tfds_builders.geo_imagenet import flickr, geotag
from tfds_builders.geo_imagenet import geotags_format as fmt

GOOD_KEY = "good-key"
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------------------------
# Pure parts.


@pytest.mark.parametrize("url, photo_id", [
    ("http://farm1.static.flickr.com/39/86593839_67bec5ca63.jpg", "86593839"),
    ("http://farm4.static.flickr.com/3175/2737866473_7958dc8760.jpg?v=0", "2737866473"),
    ("https://farm3.staticflickr.com/2814/9372911321_a1b2c3d4e5_z.jpg", "9372911321"),
    ("https://live.staticflickr.com/65535/51234567890_0a1b2c3d4e_b.jpg", "51234567890"),
    ("http://static.flickr.com/101/270891263_cb7f4fbc8a.jpg", "270891263"),
    ("https://c1.staticflickr.com/9/8525/8603938862_5fc0a1a9da_o.png", "8603938862"),
    ("  http://farm2.static.flickr.com/1/2_ab.JPG\n", "2"),
    ("http://www.flickr.com/photos/someone/86593839/", None),  # a photo page, not a static image
    ("http://farm1.static.flickr.com/39/86593839.jpg", None),  # no secret
    ("http://farm1.static.flickr.com/39/86593839_67bec5ca63.html", None),
    ("http://static.flickr.com.evil.example/39/86593839_67bec5ca63.jpg", None),
    ("http://www.example.com/39/86593839_67bec5ca63.jpg", None),
    ("not a url", None),
])
def test_parse_photo_id(url, photo_id):
    assert flickr.parse_photo_id(url) == photo_id


def test_iter_tasks_keeps_flickr_lines_and_counts_the_rest():
    lines = [
        "n01440764_1\thttp://farm1.static.flickr.com/1/111_aa.jpg\n",
        "n01440764_2\thttp://www.example.com/a.jpg\r\n",
        "no tab on this line\n",
        "\n",
        "dog_3\thttp://farm1.static.flickr.com/1/333_aa.jpg\n",  # not an ImageNet id
        "n02102040_7\thttps://live.staticflickr.com/65535/777_bb_b.jpg",
    ]
    skipped = collections.Counter()
    tasks = list(geotag.iter_tasks(lines, skipped))
    assert tasks == [geotag.Task("n01440764_1", "n01440764", "111"),
                     geotag.Task("n02102040_7", "n02102040", "777")]
    assert skipped == {"not_flickr": 1, "malformed": 2}


def test_not_yet_asked_skips_answered_and_repeated_ids():
    tasks = [geotag.Task(f"n00000001_{i}", "n00000001", str(i)) for i in (1, 2, 3, 2)]
    assert [t.photo_id for t in geotag.not_yet_asked(tasks, {"n00000001_1"})] == ["2", "3"]


def _ok_body(lat, lon, accuracy=16, country="France"):
    location = {"latitude": str(lat), "longitude": str(lon), "accuracy": str(accuracy)}
    if country is not None:
        location["country"] = {"_content": country}
    return json.dumps({"photo": {"id": "1", "location": location}, "stat": "ok"}).encode()


def _fail_body(code, message="msg"):
    return json.dumps({"stat": "fail", "code": code, "message": message}).encode()


def test_interpret_get_location():
    assert flickr.interpret_get_location(_ok_body("48.858", "2.294", 16)) == flickr.Location(
        48.858, 2.294, 16, "France")
    assert flickr.interpret_get_location(_ok_body(-33.9, 151.2, 11, None)).country == ""
    assert flickr.interpret_get_location(_fail_body(1)) == flickr.NoGeotag(1)
    assert flickr.interpret_get_location(_fail_body(2)) == flickr.NoGeotag(2)
    with pytest.raises(flickr.InvalidApiKeyError, match="code 100"):
        flickr.interpret_get_location(_fail_body(100, "Invalid API Key"))
    with pytest.raises(flickr.FlickrError, match="code 112"):
        flickr.interpret_get_location(_fail_body(112, "Method not found"))
    accuracy_inf = b'{"stat": "ok", "photo": {"location": {"latitude": 1, "longitude": 2, "accuracy": 1e999}}}'
    too_many_digits = b"1" * 5000  # beyond Python's int digit limit: a ValueError, not a JSONDecodeError
    for transient in (_fail_body(105), b"<html>oops", b"[1, 2]", b'{"stat": "ok", "photo": {}}', too_many_digits,
                      accuracy_inf):
        with pytest.raises(flickr.TransientError):
            flickr.interpret_get_location(transient)


# Answers that parse but that geotags.csv may not hold, or that are built to hurt the parser.
INVALID_ANSWERS = {
    "accuracy99": (_ok_body(48.8, 2.3, 99), "Flickr accuracy must be 0..16, got 99"),
    "lat91": (_ok_body(91, 0), "coordinates out of range"),
    "nan": (_ok_body("NaN", 0), "coordinates out of range"),
    "country_int": (_ok_body(48.8, 2.3, 16, 5), "country must be text, got int"),
    "country_list": (_ok_body(48.8, 2.3, 16, ["France"]), "country must be text, got list"),
    "country_null": (_ok_body(48.8, 2.3, 16, None).replace(b'"accuracy"', b'"country": {"_content": null}, '
                                                             b'"accuracy"'), "country must be text, got NoneType"),
    "country_control": (_ok_body(48.8, 2.3, 16, "Fr\x1b[2Jance"), "country must be printable"),
    "country_newline": (_ok_body(48.8, 2.3, 16, "Korea,\nRepublic of"), "country must be printable"),
    "country_surrogate": (_ok_body(48.8, 2.3, 16, "\ud800"), "country must be printable"),
    "country_long": (_ok_body(48.8, 2.3, 16, "x" * 1000), "at most 200 characters"),
    "nested": (b'{"stat": "ok", "photo": ' + b"[" * 20000 + b"]" * 20000 + b"}", "nested too deeply"),
    "huge": (b" " * (2 << 20) + _ok_body(48.8, 2.3, 16), "over 65536 bytes"),
    "code_true": (_fail_body(True), "code that is not an integer: True"),
    "code_float": (_fail_body(2.0), "code that is not an integer: 2.0"),
}


@pytest.mark.parametrize("name", sorted(set(INVALID_ANSWERS) - {"huge"}))
def test_interpret_get_location_refuses_what_geotags_csv_may_not_hold(name):
    body, reason = INVALID_ANSWERS[name]
    with pytest.raises(flickr.InvalidAnswerError, match=re.escape(reason)):
        flickr.interpret_get_location(body)


def test_read_answer_reads_at_most_one_byte_past_the_cap():
    stream = io.BytesIO(b" " * (10 * flickr.MAX_ANSWER_BYTES))
    with pytest.raises(flickr.InvalidAnswerError, match=f"over {flickr.MAX_ANSWER_BYTES} bytes"):
        flickr.read_answer(stream)
    assert stream.tell() == flickr.MAX_ANSWER_BYTES + 1
    body = b"x" * flickr.MAX_ANSWER_BYTES
    assert flickr.read_answer(io.BytesIO(body)) == body


def test_location_request_url_carries_the_documented_query():
    url = flickr.location_request_url("http://127.0.0.1:9/rest/", "K&Y", "123")
    parsed = urllib.parse.urlsplit(url)
    assert parsed.path == "/rest/"
    assert urllib.parse.parse_qs(parsed.query) == {
        "method": ["flickr.photos.geo.getLocation"], "api_key": ["K&Y"], "photo_id": ["123"],
        "format": ["json"], "nojsoncallback": ["1"]}


def test_backoff_delay_doubles_up_to_the_cap():
    assert [flickr.backoff_delay(a, 0.5, 3.0) for a in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_rate_limiter_spaces_slots_evenly():
    now = [100.0]
    limiter = flickr.RateLimiter(1800, clock=lambda: now[0])  # one call every 2 s
    assert [limiter.reserve() for _ in range(3)] == [0.0, 2.0, 4.0]  # slots at 100, 102, 104
    now[0] = 103.0
    assert limiter.reserve() == 3.0  # next free slot is 106
    now[0] = 200.0
    assert limiter.reserve() == 0.0  # idle time is not banked as a burst
    assert limiter.reserve() == 2.0
    with pytest.raises(ValueError):
        flickr.RateLimiter(0)


def test_progress_line_eta():
    counts = collections.Counter(located=20, no_geotag=25, failed=5)
    # 50 of 200 answered in 100 s: 0.5/s, 150 left -> 300 s.
    assert geotag.progress_line(50, 200, 100.0, counts) == (
        "50/200 (25.0%) | 20 located, 25 no geotag, 5 failed | 0.50/s | ETA 5m00s")
    assert geotag.progress_line(0, 10, 0.0, collections.Counter()).endswith("ETA ?")
    assert geotag.progress_line(10, 10, 5.0, counts).endswith("| done")
    assert geotag.progress_line(1, 100001, 1.0, counts).endswith("ETA 1d03h46m")  # 100000 s = 1 d 3 h 46 m 40 s
    assert geotag.progress_line(1, 7261, 1.0, counts).endswith("ETA 2h01m")  # 7260 s


def test_drop_torn_tail(tmp_path):
    path = tmp_path / "f.csv"
    path.write_bytes(b"a,b\n1,2\n3,")
    assert geotag.drop_torn_tail(str(path)) == 2
    assert path.read_bytes() == b"a,b\n1,2\n"
    assert geotag.drop_torn_tail(str(path)) == 0
    path.write_bytes(b"a,")  # torn header
    assert geotag.drop_torn_tail(str(path)) == 2 and path.read_bytes() == b""
    assert geotag.drop_torn_tail(str(tmp_path / "absent.csv")) == 0


def test_geotags_format_round_trips_one_line_per_row():
    tags = [fmt.GeoTag("n02102040_7", "n02102040", 37.566535, 126.977969, 16, 'Korea, "Republic" of'),
            fmt.GeoTag("n01440764_1", "n01440764", 0.1 + 0.2, 1e-7, 0, ""),
            fmt.GeoTag("n01440764_2", "n01440764", np.float64(-12.5), np.float64(1 / 3), 4, "Côte d'Ivoire")]
    text = fmt.csv_line(fmt.GEOTAG_COLUMNS) + "".join(fmt.geotag_line(t) for t in tags)
    assert text.count("\n") == 4
    back = list(fmt.read_geotags(text.splitlines(keepends=True), "g.csv"))
    assert back == tags  # floats exactly, including 0.30000000000000004 and numpy's


@pytest.mark.parametrize("tag, error", [
    (fmt.GeoTag("n01440764_1", "n01440764", 1.0, 2.0, 99, "France"), "Flickr accuracy must be 0..16"),
    (fmt.GeoTag("n01440764_1", "n01440764", 1.0, 2.0, True, "France"), "Flickr accuracy must be 0..16"),
    (fmt.GeoTag("n01440764_1", "n01440764", float("nan"), 2.0, 9, "France"), "coordinates out of range"),
    (fmt.GeoTag("n01440764_1", "n01440764", "1.0", 2.0, 9, "France"), "lat/lon must be floats, got str"),
    (fmt.GeoTag("n01440764_1", "n01440764", 1.0, 2.0, 9, 5), "country must be text, got int"),
    (fmt.GeoTag("n01440764_1", "n01440764", 1.0, 2.0, 9, "Korea,\nRepublic of"), "country must be printable"),
    (fmt.GeoTag("n01440764_1", "n01440764", 1.0, 2.0, 9, "\ud800"), "country must be printable"),
    (fmt.GeoTag("n01440764_1", "n02102040", 1.0, 2.0, 9, "France"), "does not match"),
])
def test_geotag_line_refuses_a_row_the_reader_would_refuse(tag, error):
    with pytest.raises(ValueError, match=error):
        fmt.geotag_line(tag)


@pytest.mark.parametrize("code", [True, 1.0, "1", 100])
def test_missing_line_refuses_a_code_the_reader_would_refuse(code):
    with pytest.raises(ValueError, match="code must be one of"):
        fmt.missing_line(fmt.Missing("n01440764_3", "n01440764", code))


@pytest.mark.parametrize("body, error", [
    ("n01440764_1,n01440764,1,2,16,France\nn01440764_1,n01440764,1,2,16,France\n", r"g.csv:3: .* appears twice"),
    ("n01440764_1,n02102040,1,2,16,France\n", r"g.csv:2: wnid 'n02102040' does not match"),
    ("dog_1,n01440764,1,2,16,France\n", r"g.csv:2: 'dog_1' is not an ImageNet image id"),
    ("n01440764_1,n01440764,1,181,16,France\n", r"g.csv:2: coordinates out of range"),
    ("n01440764_1,n01440764,north,2,16,France\n", r"g.csv:2: lat/lon/accuracy must be numbers"),
    ("n01440764_1,n01440764,1,2,17,France\n", r"g.csv:2: Flickr accuracy must be 0..16"),
    ("n01440764_1,n01440764,1,2,16\n", r"g.csv:2: expected the 6 fields"),
    ("n01440764_1,n01440764,1,2,16,Fr\x07ance\n", r"g.csv:2: country must be printable"),
    ('n01440764_1,n01440764,1,2,16,"Korea,\nRepublic of"\n', r"g.csv:3: country must be printable"),  # ends on 3
])
def test_geotags_format_names_file_and_line_of_bad_rows(body, error):
    lines = (fmt.csv_line(fmt.GEOTAG_COLUMNS) + body).splitlines(keepends=True)
    with pytest.raises(ValueError, match=error):
        list(fmt.read_geotags(lines, "g.csv"))


def test_missing_and_words_formats():
    lines = ["image_id,wnid,code\n", "n01440764_3,n01440764,2\n"]
    assert list(fmt.read_missing(lines, "m")) == [fmt.Missing("n01440764_3", "n01440764", 2)]
    with pytest.raises(ValueError, match="m:2: code must be one of"):
        list(fmt.read_missing(["image_id,wnid,code\n", "n01440764_3,n01440764,100\n"], "m"))
    with pytest.raises(ValueError, match="header must be image_id,wnid,code"):
        list(fmt.read_missing(["id,code\n"], "m"))
    assert fmt.parse_words(["n01440764\ttench, Tinca tinca\n", "\n", "n02102040\tspringer\r\n"], "w") == {
        "n01440764": "tench, Tinca tinca", "n02102040": "springer"}
    with pytest.raises(ValueError, match="w:1: expected"):
        fmt.parse_words(["tench\n"], "w")


def _as_an_editor_saves_it(text):
    """`text` as a Windows editor may save it: a UTF-8 byte-order mark first, CRLF, blank lines here and there."""
    lines = text.splitlines()
    return "\ufeff\r\n" + "\r\n".join(lines[:2] + ["", "   "] + lines[2:]) + "\r\n\r\n\n"


def test_readers_skip_a_byte_order_mark_and_blank_lines():
    geotags = ("image_id,wnid,lat,lon,accuracy,country\nn01440764_1,n01440764,1.5,2.5,16,France\n"
               "n01440764_2,n01440764,-3.0,4.0,9,\n")
    missing = "image_id,wnid,code\nn01440764_3,n01440764,2\nn01440764_4,n01440764,1\n"
    words = "n01440764\ttench, Tinca tinca\nn02102040\tspringer\n"
    for text in (geotags, missing, words):
        edited = _as_an_editor_saves_it(text)
        assert edited.startswith("\ufeff") and edited.endswith("\n\n") and "\n   \r\n" in edited
        # Read as the builder and the geotagger open files: text mode, universal newlines or newline="".
        for lines in (io.StringIO(edited, newline=None), io.StringIO(edited, newline="")):
            if text is words:
                assert fmt.parse_words(lines, "w") == fmt.parse_words(text.splitlines(keepends=True), "w")
            else:
                read = fmt.read_geotags if text is geotags else fmt.read_missing
                assert list(read(lines, "f")) == list(read(text.splitlines(keepends=True), "f"))
    # Line numbers in errors still count every line, blank ones included.
    with pytest.raises(ValueError, match="f:6: coordinates out of range"):
        list(fmt.read_geotags(io.StringIO(_as_an_editor_saves_it(geotags.replace("-3.0", "-93.0"))), "f"))


# ---------------------------------------------------------------------------------------------------------------
# A fake Flickr.


class FakeFlickr:
    """flickr.photos.geo.getLocation on 127.0.0.1, answering from a script.

    `truth[photo_id]` is the final answer: ("located", lat, lon, accuracy, country) or ("none", code).
    `faults[photo_id]` lists what the first requests for that photo get instead: "500", "badjson", "105",
    "slow" (the answer only after SLOW_S, past the client's timeout) or a key of INVALID_ANSWERS. `requests`
    records every photo id asked.
    """

    SLOW_S = 2.0

    def __init__(self, truth, faults=None, api_key=GOOD_KEY):
        self.truth, self.api_key = truth, api_key
        self.faults = {photo: list(queue) for photo, queue in (faults or {}).items()}
        self.requests = []
        self._lock = threading.Lock()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                status, body = fake.answer(query["api_key"][0], query["photo_id"][0])
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out on a "slow" answer

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}/services/rest/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, api_key, photo_id):
        with self._lock:
            self.requests.append(photo_id)
            queue = self.faults.get(photo_id, [])
            fault = queue.pop(0) if queue else None
        if api_key != self.api_key:
            return 200, _fail_body(100, "Invalid API Key (Key has invalid format)")
        if fault == "500":
            return 500, b"Internal Server Error"
        if fault == "badjson":
            return 200, b'{"stat": "ok", "photo": {'
        if fault == "105":
            return 200, _fail_body(105, "Service currently unavailable")
        if fault == "slow":
            time.sleep(self.SLOW_S)
        if fault in INVALID_ANSWERS:
            return 200, INVALID_ANSWERS[fault][0]
        kind, *rest = self.truth[photo_id]
        if kind == "none":
            return 200, _fail_body(rest[0], "Photo has no location information.")
        lat, lon, accuracy, country = rest
        return 200, _ok_body(lat, lon, accuracy, country)

    def asked(self):
        with self._lock:
            return list(self.requests)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def make_world(n, seed_offset=0):
    """URL lines for n Flickr photos (varied URL styles) plus non-Flickr and malformed lines, and Flickr's truth.

    Every third photo has no geotag (alternating codes 1 and 2); the rest carry distinct coordinates.
    Returns (lines, truth, image_of_photo).
    """
    styles = ("http://farm{f}.static.flickr.com/{s}/{p}_{sec}.jpg",
              "https://live.staticflickr.com/{s}/{p}_{sec}_b.jpg",
              "http://farm{f}.staticflickr.com/{s}/{p}_{sec}.jpg", "http://static.flickr.com/{s}/{p}_{sec}.jpg")
    wnids = ("n01440764", "n02102040", "n03028079")
    lines, truth, image_of_photo = [], {}, {}
    for i in range(n):
        photo = str(1000 + seed_offset + i)
        image_id = f"{wnids[i % 3]}_{i + 1}"
        lines.append(f"{image_id}\t{styles[i % 4].format(f=i % 9 + 1, s=100 + i, p=photo, sec='abc123')}\n")
        if i % 3 == 2:
            truth[photo] = ("none", 1 + (i // 3) % 2)
        else:
            truth[photo] = ("located", round(-60 + 1.37 * i, 6), round(-170 + 3.1 * i, 6), 1 + i % 16,
                            "Korea, Republic of" if i % 5 == 0 else "France")
        image_of_photo[photo] = image_id
        if i % 7 == 0:
            lines.append(f"{wnids[i % 3]}_{9000 + i}\thttp://www.example.com/img{i}.jpg\n")
    lines.append("garbage line without a tab\n")
    return lines, truth, image_of_photo


def expected_files(truth, image_of_photo):
    """The rows a complete run must produce, computed from the truth table (not by the tool's writer)."""
    geotags, missing = {}, {}
    for photo, answer in truth.items():
        image_id = image_of_photo[photo]
        wnid = image_id.split("_")[0]
        if answer[0] == "none":
            missing[image_id] = [image_id, wnid, str(answer[1])]
        else:
            _, lat, lon, accuracy, country = answer
            geotags[image_id] = [image_id, wnid, lat, lon, accuracy, country]
    return geotags, missing


def read_csv(path):
    """Header and rows of an output file, asserting it ends in a newline (no torn line)."""
    data = path.read_bytes()
    assert data.endswith(b"\n"), f"{path} has a torn last line"
    with open(path, newline="", encoding="utf-8") as f:
        header, *rows = list(csv.reader(f))
    return header, rows


def assert_complete(out, truth, image_of_photo):
    geotags, missing = expected_files(truth, image_of_photo)
    header, rows = read_csv(out)
    assert header == ["image_id", "wnid", "lat", "lon", "accuracy", "country"]
    ids = [r[0] for r in rows]
    assert sorted(ids) == sorted(geotags), "every geotagged image exactly once"
    for image_id, wnid, lat, lon, accuracy, country in rows:
        want = geotags[image_id]
        assert [image_id, wnid, accuracy, country] == [want[0], want[1], str(want[4]), want[5]]
        assert (float(lat), float(lon)) == (want[2], want[3])
    header, rows = read_csv(out.parent / (out.name + ".missing"))
    assert header == ["image_id", "wnid", "code"]
    assert sorted(rows) == sorted(missing.values()), "every photo without a geotag exactly once"


@pytest.fixture
def world(tmp_path):
    lines, truth, image_of_photo = make_world(24)
    urls = tmp_path / "fall11_urls.txt"
    urls.write_text("".join(lines))
    servers = []

    def serve(**kwargs):
        servers.append(FakeFlickr(truth, **kwargs))
        return servers[-1]

    yield urls, tmp_path / "geotags.csv", truth, image_of_photo, serve
    for server in servers:
        server.close()


def tool_args(urls, out, endpoint, key=GOOD_KEY, calls_per_hour=3_600_000):
    return ["--urls", str(urls), "--out", str(out), "--api-key", key, "--endpoint", endpoint, "--workers", "4",
            "--timeout", "0.5", "--backoff", "0.01", "--max-attempts", "4",
            "--calls-per-hour", str(calls_per_hour)]


# ---------------------------------------------------------------------------------------------------------------
# Whole runs.


def test_run_with_injected_faults_then_rerun_asks_nothing(world):
    urls, out, truth, image_of_photo, serve = world
    photos = sorted(truth)
    faults = {photos[0]: ["500", "500"], photos[1]: ["badjson"], photos[2]: ["slow"], photos[3]: ["105"],
              photos[5]: ["500", "slow"]}  # photos[5] has no geotag: the "no" still arrives after the faults
    server = serve(faults=faults)
    assert geotag.main(tool_args(urls, out, server.endpoint)) == 0
    assert_complete(out, truth, image_of_photo)
    asked = collections.Counter(server.asked())
    for photo, fault_list in faults.items():
        assert asked[photo] == len(fault_list) + 1, photo
    assert set(asked) == set(truth)  # non-Flickr and malformed lines were never asked

    before = (out.read_bytes(), (out.parent / "geotags.csv.missing").read_bytes())
    second = serve()
    assert geotag.main(tool_args(urls, out, second.endpoint)) == 0
    assert second.asked() == []
    assert (out.read_bytes(), (out.parent / "geotags.csv.missing").read_bytes()) == before


def test_invalid_key_stops_with_a_message_and_corrupts_nothing(world, caplog):
    urls, out, truth, image_of_photo, serve = world
    server = serve()
    half = urls.parent / "half.txt"
    half.write_text("".join(urls.read_text().splitlines(keepends=True)[:10]))
    assert geotag.main(tool_args(half, out, server.endpoint)) == 0
    before = (out.read_bytes(), (out.parent / "geotags.csv.missing").read_bytes())
    asked_before = len(server.asked())
    left = len(truth) - len(geotag.read_answered(str(out)))

    assert geotag.main(tool_args(urls, out, server.endpoint, key="bad-key")) == 1
    assert "Flickr rejected the API key" in caplog.text
    assert (out.read_bytes(), (out.parent / "geotags.csv.missing").read_bytes()) == before
    # At most the 2 * workers requests already in flight go out after the first rejection.
    assert len(server.asked()) - asked_before <= 8 < left

    assert geotag.main(tool_args(urls, out, server.endpoint)) == 0
    assert_complete(out, truth, image_of_photo)


def test_photo_failing_every_retry_is_not_recorded_and_is_asked_next_run(world, caplog):
    urls, out, truth, image_of_photo, serve = world
    broken = sorted(truth)[4]
    server = serve(faults={broken: ["500"] * 4})  # --max-attempts 4
    assert geotag.main(tool_args(urls, out, server.endpoint)) == 3
    assert "run the same command again" in caplog.text
    assert image_of_photo[broken] not in out.read_text() + (out.parent / "geotags.csv.missing").read_text()

    healed = serve()
    assert geotag.main(tool_args(urls, out, healed.endpoint)) == 0
    assert healed.asked() == [broken]
    assert_complete(out, truth, image_of_photo)


def test_invalid_answers_are_failures_asked_once_and_the_files_read_back(world, caplog):
    urls, out, truth, image_of_photo, serve = world
    faults = {photo: [name] for photo, name in zip(sorted(truth), sorted(INVALID_ANSWERS))}
    assert len(faults) == len(INVALID_ANSWERS)
    server = serve(faults=faults)
    assert geotag.main(tool_args(urls, out, server.endpoint)) == 3  # "some photos failed": rerun
    asked = collections.Counter(server.asked())
    assert all(asked[photo] == 1 for photo in faults), "an invalid answer is not asked again in the same run"
    warnings = [r.getMessage() for r in caplog.records if "invalid answer" in r.getMessage()]
    for photo, [name] in faults.items():
        [line] = [w for w in warnings if w.startswith(f"{image_of_photo[photo]}: photo {photo}: invalid answer")]
        assert INVALID_ANSWERS[name][1] in line and "the next run asks again" in line
    assert f"{len(faults)} photos failed" in caplog.text
    answered = geotag.read_answered(str(out))  # what was written reads back
    assert answered == {image_of_photo[photo] for photo in truth if photo not in faults}

    healed = serve()
    assert geotag.main(tool_args(urls, out, healed.endpoint)) == 0
    assert sorted(healed.asked()) == sorted(faults)
    assert_complete(out, truth, image_of_photo)


def test_output_saved_by_an_editor_is_resumed(world):
    """A BOM and blank lines (an editor's save) neither stop the geotagger nor hide the rows it appends after."""
    urls, out, truth, image_of_photo, serve = world
    lines = urls.read_text().splitlines(keepends=True)
    first = urls.parent / "first.txt"
    first.write_text("".join(lines[:8]))
    server = serve()
    assert geotag.main(tool_args(first, out, server.endpoint)) == 0
    for path in (out, out.parent / "geotags.csv.missing"):
        path.write_text(_as_an_editor_saves_it(path.read_text()), encoding="utf-8", newline="")
    asked_before = len(server.asked())
    assert geotag.main(tool_args(urls, out, server.endpoint)) == 0
    answered_first = {p for p, image in image_of_photo.items() if f"{image}\t" in "".join(lines[:8])}
    assert not answered_first & set(server.asked()[asked_before:])
    assert geotag.read_answered(str(out)) == set(image_of_photo.values())


def test_torn_last_line_is_dropped_and_its_photo_asked_again(world, caplog):
    urls, out, truth, image_of_photo, serve = world
    lines = urls.read_text().splitlines(keepends=True)
    first = urls.parent / "first.txt"
    first.write_text("".join(lines[:6]))
    server = serve()
    assert geotag.main(tool_args(first, out, server.endpoint)) == 0
    with open(out, "ab") as f:
        f.write(b"n01440764_99,n01440764,12.5")  # what a kill in the middle of a write leaves
    assert geotag.main(tool_args(urls, out, server.endpoint)) == 0
    assert "dropped a torn last line" in caplog.text
    assert_complete(out, truth, image_of_photo)


def test_second_run_on_the_same_output_is_refused(world, caplog):
    urls, out, _, _, serve = world
    server = serve()
    with geotag.exclusive_lock(str(out)):
        assert geotag.main(tool_args(urls, out, server.endpoint)) == 1
    assert "another geotag run" in caplog.text
    assert server.asked() == []


def test_bad_existing_output_is_refused(world, caplog):
    urls, out, _, _, serve = world
    out.write_text("label,path\n3,a.jpg\n")
    assert geotag.main(tool_args(urls, out, serve().endpoint)) == 1
    assert "header must be image_id,wnid,lat,lon,accuracy,country" in caplog.text


def _rows_written(out):
    """Image ids in the complete lines of both output files (a torn tail, if any, is not a row)."""
    ids = set()
    for path in (out, out.parent / (out.name + ".missing")):
        if path.exists():
            complete = path.read_bytes().rpartition(b"\n")[0].decode().splitlines()[1:]
            ids.update(line.split(",")[0] for line in complete)
    return ids


def test_sigkill_mid_run_then_resume_loses_and_repeats_nothing(tmp_path):
    lines, truth, image_of_photo = make_world(40, seed_offset=500)
    urls = tmp_path / "fall11_urls.txt"
    urls.write_text("".join(lines))
    out = tmp_path / "geotags.csv"
    server = FakeFlickr(truth)
    # 10 calls/s so the run lasts ~4 s and can be killed in the middle.
    args = [sys.executable, "-m", "tfds_builders.geo_imagenet.geotag",
            *tool_args(urls, out, server.endpoint, calls_per_hour=36000)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        process = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while len(_rows_written(out)) < 10 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert process.poll() is None, "the run ended before it could be killed: " + process.stderr.read().decode()
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stderr.close()
        written_before = _rows_written(out)
        assert 10 <= len(written_before) < len(truth)
        asked_before = len(server.asked())

        resumed = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert resumed.returncode == 0, resumed.stderr
        asked_after = server.asked()[asked_before:]
        photo_of_image = {image: photo for photo, image in image_of_photo.items()}
        asked_again = {photo_of_image[i] for i in written_before} & set(asked_after)
        assert not asked_again, "an answered photo was asked again"
        assert_complete(out, truth, image_of_photo)
    finally:
        server.close()


# ---------------------------------------------------------------------------------------------------------------
# The API key never leaves the request.

# Distinctive, with characters a URL percent-encodes, so both forms and a cut-off prefix can be searched for.
SECRET_KEY = "SECRETKEY+q7/0d41d8cd98f00b2"
SECRET_FORMS = (SECRET_KEY, urllib.parse.quote_plus(SECRET_KEY), SECRET_KEY[:9], SECRET_KEY[-9:])


class EchoServer:
    """A broken endpoint that quotes the request it got (as proxies' error pages do): `mode` is the first path
    segment of the endpoint: "500", "404" (the URL in the status reason and the body), "page" (HTTP 200, the URL
    as the body), "redirect" (to a gopher:// URL carrying the query, which urllib refuses to follow) or "badhost"
    (a redirect to a host name too long for IDNA: urllib raises a bare UnicodeError)."""

    def __init__(self):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                mode = self.path.split("/")[1]
                if mode in ("redirect", "badhost"):
                    self.send_response(301)
                    host = "gopher://127.0.0.1" if mode == "redirect" else "http://" + "x" * 70 + ".example"
                    self.send_header("Location", host + self.path)
                    body = b""
                else:
                    self.send_response(200 if mode == "page" else int(mode), f"no such page: {self.path}")
                    body = f"{self.path}\n<html>not the API</html>".encode()
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def echo_server():
    server = EchoServer()
    yield server
    server.close()


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_cli_with_secret_key(tmp_path, endpoint):
    urls = tmp_path / "urls.txt"
    urls.write_text("n01440764_1\thttp://farm1.static.flickr.com/1/111_aa.jpg\n"
                    "n01440764_2\thttp://farm1.static.flickr.com/1/222_bb.jpg\n")
    out = tmp_path / "out" / "geotags.csv"
    out.parent.mkdir()
    args = [sys.executable, "-m", "tfds_builders.geo_imagenet.geotag", "--urls", str(urls), "--out", str(out),
            "--endpoint", endpoint, "--timeout", "5", "--backoff", "0.01", "--max-attempts", "2",
            "--calls-per-hour", "3600000"]
    env = dict(os.environ, FLICKR_API_KEY=SECRET_KEY)
    result = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    texts = {"stdout": result.stdout, "stderr": result.stderr}
    texts.update({str(p): p.read_text(errors="replace") for p in out.parent.iterdir()})
    for where, text in texts.items():
        for form in SECRET_FORMS:
            assert form not in text, f"the API key ({form!r}) is in {where}:\n{text}"
    return result


@pytest.mark.parametrize("endpoint, reason", [
    ("api.flickr.com/services/rest/", "http or https"),
    ("http://127.0.0.1:9/services/ rest/", "whitespace or control characters"),
    ("http://127.0.0.1:9/services/\trest/", "whitespace or control characters"),
    ("https:///services/rest/", "no host"),
])
def test_bad_endpoint_is_refused_before_any_request_without_the_key(tmp_path, endpoint, reason):
    result = _run_cli_with_secret_key(tmp_path, endpoint)
    assert result.returncode == 2
    [error] = [line for line in result.stderr.splitlines() if "error:" in line]
    assert f"--endpoint {endpoint!r}" in error and reason in error
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("mode, returncode, message", [
    ("500", 3, "HTTP 500 no such page: /500/services/rest/?method=flickr.photos.geo.getLocation&api_key=<api key"),
    ("404", 1, "HTTP 404 no such page: /404/services/rest/?method=flickr.photos.geo.getLocation&api_key=<api key"),
    ("page", 3, "invalid JSON (Expecting value: line 1 column 1 (char 0)): b'/page/services/rest/?method="),
    ("redirect", 1, "Redirection to url 'gopher://127.0.0.1/redirect/services/rest/?method="),
    ("badhost", 3, "UnicodeError: encoding with 'idna' codec failed"),
])
def test_key_is_in_no_message_when_the_endpoint_answers_with_errors(tmp_path, echo_server, mode, returncode,
                                                                     message):
    result = _run_cli_with_secret_key(tmp_path, f"{echo_server.base}/{mode}/services/rest/")
    assert result.returncode == returncode, result.stderr
    assert message in result.stderr  # the error is still shown, only the key is not
    assert "Traceback" not in result.stderr


def test_key_is_in_no_message_when_the_endpoint_is_unreachable(tmp_path):
    result = _run_cli_with_secret_key(tmp_path, f"http://127.0.0.1:{_closed_port()}/services/rest/")
    assert result.returncode == 3 and "Connection refused" in result.stderr


@pytest.mark.parametrize("endpoint", [
    "https://api.flickr.com/services/rest/", "http://127.0.0.1:8080/rest", "HTTPS://API.FLICKR.COM/"])
def test_check_endpoint_accepts_http_urls(endpoint):
    flickr.check_endpoint(endpoint)


@pytest.mark.parametrize("endpoint, reason", [
    ("api.flickr.com/services/rest/", "http or https"), ("ftp://api.flickr.com/", "http or https"),
    ("file:///etc/passwd", "http or https"), ("https://", "no host"), ("http://:80/", "no host"),
    ("https://api.flickr.com/ rest/", "whitespace"), ("https://api.flickr.com/rest/\n", "whitespace"),
    ("https://api.flickr.com/\x00", "control"), ("https://api.flickr.com:99999/", "port"),
    ("https://api.flickr.com:http/", "port"), ("https://api.flickr.com/rest/?api_key=x", "query"),
    ("https://api.flickr.com/rest/#x", "query"), ("https://user:pw@api.flickr.com/", "user"),
    ("https://api.flickr.com/réseau", "ASCII"), ("", "http or https"),
])
def test_check_endpoint_names_what_is_wrong(endpoint, reason):
    with pytest.raises(ValueError, match=reason):
        flickr.check_endpoint(endpoint)


def test_client_refuses_a_bad_endpoint_without_the_key():
    with pytest.raises(ValueError, match="endpoint 'api.flickr.com/': the scheme must be http or https") as e:
        flickr.FlickrClient(SECRET_KEY, rate_limiter=flickr.RateLimiter(1), stop=threading.Event(),
                            endpoint="api.flickr.com/")
    with pytest.raises(ValueError, match="has a query") as e:
        flickr.FlickrClient(SECRET_KEY, rate_limiter=flickr.RateLimiter(1), stop=threading.Event(),
                            endpoint=f"https://api.flickr.com/?api_key={SECRET_KEY}")
    assert not any(form in str(e.value) for form in SECRET_FORMS)


def test_redact_replaces_every_form_of_the_key():
    key = "k+y/=&1"
    url = flickr.location_request_url("http://h/rest/", key, "5")
    assert key not in flickr.redact(url, key) and urllib.parse.quote_plus(key) not in flickr.redact(url, key)
    assert flickr.redact(f"raw {key} and {urllib.parse.quote(key, safe='')}", key) == (
        f"raw {flickr.REDACTED} and {flickr.REDACTED}")
    assert flickr.redact(b"body " + key.encode(), key) == b"body " + flickr.REDACTED.encode()
    assert flickr.redact("nothing to hide", key) == "nothing to hide"
