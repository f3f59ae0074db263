"""The Flickr side of the geotagger: photo ids from static image URLs and `flickr.photos.geo.getLocation`.

URL parsing and the reading of an API answer are pure functions. `FlickrClient` adds HTTP, retries with
exponential backoff and one rate limit shared by all threads. Standard library only.

The API key travels in every request URL, so nothing the client raises carries it: `redact` is the one way a URL,
or anything that may quote one, is made fit to show, and `check_endpoint` keeps urllib from refusing a malformed
endpoint with the whole URL in its error.
"""

import dataclasses
import http.client
import json
import random
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import AnyStr, BinaryIO, Callable

from . import geotags_format as fmt

REST_ENDPOINT = "https://api.flickr.com/services/rest/"
FLICKR_CALLS_PER_HOUR = 3600  # Flickr's documented limit per API key.
REDACTED = "<api key redacted>"
# getLocation's answers are about 1 KB; a longer one is not an answer (a 300 MB one was once read whole), so no
# more than this is read.
MAX_ANSWER_BYTES = 64 * 1024

# getLocation's error codes (flickr.com/services/api/flickr.photos.geo.getLocation.html).
CODE_PHOTO_NOT_FOUND = 1
CODE_NO_LOCATION = 2
CODE_INVALID_API_KEY = 100
CODE_SERVICE_UNAVAILABLE = 105

# Static image URLs, old and new: farmN.static.flickr.com/<server>/<id>_<secret>.jpg, static.flickr.com/...,
# farmN.staticflickr.com/..., live.staticflickr.com/<server>/<id>_<secret>_b.jpg,
# cN.staticflickr.com/<farm>/<server>/...
_STATIC_URL_RE = re.compile(
    r"""https?://(?:[a-z0-9-]+\.)?static\.?flickr\.com(?::\d+)?/
        (?:\d+/)?\d+/          # [farm/] server
        (?P<id>\d+)_[0-9a-f]+   # <photo id>_<secret>
        (?:_[a-z0-9]+)?         # size suffix: _b, _m, _o, ...
        \.(?:jpe?g|png|gif)
        (?:[?\#].*)?""",
    re.VERBOSE | re.IGNORECASE,
)


def parse_photo_id(url: str) -> str | None:
    """The Flickr photo id in a static image URL, or None for any other URL (those photos cannot be geotagged)."""
    match = _STATIC_URL_RE.fullmatch(url.strip())
    return match.group("id") if match else None


@dataclasses.dataclass(frozen=True)
class Location:
    latitude: float
    longitude: float
    accuracy: int
    country: str


@dataclasses.dataclass(frozen=True)
class NoGeotag:
    """Flickr's definite "no": code 1 (photo not found) or 2 (no location). Asking again would not change it."""

    code: int


class FlickrError(Exception):
    """An answer that retrying will not fix (bad key, wrong endpoint, unknown error code): the run must stop."""


class InvalidApiKeyError(FlickrError):
    pass


class TransientError(Exception):
    """An answer worth asking again for: timeout, connection error, HTTP 5xx/429, invalid JSON, code 105."""


class InvalidAnswerError(Exception):
    """A whole answer the geotagger will not record: longer than MAX_ANSWER_BYTES, JSON nested too deeply to read,
    an error code that is not an integer, or a location geotags.csv may not hold (geotags_format.check_location,
    the reader's own rule). Asking again at once would get the same answer, so the photo counts as failed for this
    run and the next run asks again."""


class Stopped(Exception):
    """The run is stopping; raised instead of waiting for a rate-limit slot or a backoff."""


def _shown(value: object) -> str:
    """A value from an answer, fit for a one-line message: a string's or number's repr, cut short, else its type.

    repr() escapes line breaks and terminal control characters; the repr of deeply nested JSON could recurse.
    """
    return f"{value!r:.120}" if isinstance(value, (str, int, float)) else type(value).__name__


def interpret_get_location(body: bytes) -> Location | NoGeotag:
    """Reads a `format=json&nojsoncallback=1` answer of flickr.photos.geo.getLocation."""
    try:
        answer = json.loads(body)
    except RecursionError:
        raise InvalidAnswerError("JSON nested too deeply to read") from None
    except ValueError as e:  # not JSON, not UTF-8, or an integer beyond Python's digit limit
        raise TransientError(f"invalid JSON ({e}): {body[:80]!r}") from None
    if not isinstance(answer, dict):
        raise TransientError(f"unexpected JSON: {body[:80]!r}")
    if answer.get("stat") == "fail":
        code, message = answer.get("code"), _shown(answer.get("message", ""))
        if type(code) is not int:  # Flickr's codes are JSON integers; true == 1 and 1.0 == 1 in Python
            raise InvalidAnswerError(f"stat=fail with a code that is not an integer: {_shown(code)}")
        if code in (CODE_PHOTO_NOT_FOUND, CODE_NO_LOCATION):
            return NoGeotag(code)
        if code == CODE_INVALID_API_KEY:
            raise InvalidApiKeyError(f"Flickr rejected the API key (code 100: {message})")
        if code == CODE_SERVICE_UNAVAILABLE:
            raise TransientError(f"Flickr service unavailable (code 105: {message})")
        raise FlickrError(f"Flickr error code {_shown(code)}: {message}")
    if answer.get("stat") != "ok":
        raise TransientError(f"answer with neither stat=ok nor stat=fail: {body[:80]!r}")
    try:
        location = answer["photo"]["location"]
        lat, lon = float(location["latitude"]), float(location["longitude"])
        accuracy = int(location.get("accuracy", 0))
        country = location.get("country", {}).get("_content", "")
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError):
        # An "ok" answer without a readable location is a broken reply, not a fact about the photo.
        raise TransientError(f"answer without a readable location: {body[:120]!r}") from None
    try:
        fmt.check_location(lat, lon, accuracy, country)
    except ValueError as e:
        raise InvalidAnswerError(str(e)) from None
    return Location(lat, lon, accuracy, country)


def read_answer(stream: BinaryIO) -> bytes:
    """The body of an answer, reading at most one byte past MAX_ANSWER_BYTES: InvalidAnswerError if longer."""
    body = stream.read(MAX_ANSWER_BYTES + 1)
    if len(body) > MAX_ANSWER_BYTES:
        raise InvalidAnswerError(f"answer over {MAX_ANSWER_BYTES} bytes (getLocation's are about 1 KB)")
    return body


def check_endpoint(endpoint: str) -> None:
    """Raises ValueError saying what is wrong unless `endpoint` is an http(s) URL the request URL can extend.

    Checked before the first request: urllib would otherwise refuse every request with an error quoting the whole
    URL, API key included, or send the key somewhere other than meant.
    """
    if not all(" " < char < "\x7f" for char in endpoint):
        raise ValueError("contains whitespace or control characters, or is not ASCII (give a host in punycode)")
    parts = urllib.parse.urlsplit(endpoint)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"the scheme must be http or https, as in {REST_ENDPOINT}")
    if not parts.hostname:
        raise ValueError(f"no host, as in {REST_ENDPOINT}")
    if "@" in parts.netloc:
        raise ValueError("carries a user name or password; give only the host")
    try:
        parts.port
    except ValueError:
        raise ValueError("the port must be a number in 0..65535") from None
    if "?" in endpoint or "#" in endpoint:
        raise ValueError("has a query or fragment; give the endpoint without them (the request adds its query)")


def redact(text: AnyStr, api_key: str) -> AnyStr:
    """`text` with the API key, raw or percent-encoded as a request URL carries it, replaced by REDACTED.

    The one way a request URL, or anything that may quote one (urllib's errors, a proxy's error page, a status
    reason), is made fit to show. Bytes too: an answer is redacted before an excerpt of it is cut, since a key cut
    in half no longer matches.
    """
    for form in {api_key, urllib.parse.quote_plus(api_key), urllib.parse.quote(api_key, safe="")} - {""}:
        if isinstance(text, bytes):
            text = text.replace(form.encode("utf-8"), REDACTED.encode("utf-8"))
        else:
            text = text.replace(form, REDACTED)
    return text


def location_request_url(endpoint: str, api_key: str, photo_id: str) -> str:
    query = urllib.parse.urlencode({
        "method": "flickr.photos.geo.getLocation",
        "api_key": api_key,
        "photo_id": photo_id,
        "format": "json",
        "nojsoncallback": 1,
    })
    return f"{endpoint}?{query}"


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Seconds to wait before retry number `attempt` (1, 2, ...): base * 2**(attempt-1), at most `cap`."""
    return min(cap, base * 2.0 ** (attempt - 1))


class RateLimiter:
    """Spaces calls evenly, `3600 / calls_per_hour` seconds apart, across every thread that shares it.

    Even spacing (no bursts) keeps any one-hour window at or under the limit, which is how Flickr counts.
    `reserve()` only books a slot and says how long to wait, so callers can wait on a stop event instead of
    sleeping.
    """

    def __init__(self, calls_per_hour: float, clock: Callable[[], float] = time.monotonic):
        if not calls_per_hour > 0:
            raise ValueError(f"calls_per_hour must be positive, got {calls_per_hour}")
        self._interval = 3600.0 / calls_per_hour
        self._clock = clock
        self._next_slot = float("-inf")
        self._lock = threading.Lock()

    def reserve(self) -> float:
        """Books the next free slot; returns the seconds until it (0 when the caller may go now)."""
        with self._lock:
            now = self._clock()
            slot = max(now, self._next_slot)
            self._next_slot = slot + self._interval
            return slot - now


class FlickrClient:
    """flickr.photos.geo.getLocation with retries; safe to call from many threads."""

    def __init__(
        self,
        api_key: str,
        *,
        rate_limiter: RateLimiter,
        stop: threading.Event,
        endpoint: str = REST_ENDPOINT,
        timeout: float = 30.0,
        max_attempts: int = 6,
        backoff_base: float = 2.0,
        backoff_cap: float = 300.0,
    ):
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        try:
            check_endpoint(endpoint)
        except ValueError as e:
            raise ValueError(redact(f"endpoint {endpoint!r}: {e}", api_key)) from None
        self._api_key = api_key
        self._rate_limiter = rate_limiter
        self._stop = stop
        self._endpoint = endpoint
        self._timeout = timeout
        self._max_attempts = max_attempts
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap

    def get_location(self, photo_id: str) -> Location | NoGeotag:
        """Flickr's answer for one photo. Raises TransientError once every attempt failed, InvalidAnswerError (not
        retried), FlickrError, Stopped.

        Every error leaves through here with the API key redacted from its message, and without its cause chained.
        """
        try:
            return self._get_location(photo_id)
        except (TransientError, InvalidAnswerError, FlickrError) as e:
            raise type(e)(redact(str(e), self._api_key)) from None

    def _get_location(self, photo_id: str) -> Location | NoGeotag:
        url = location_request_url(self._endpoint, self._api_key, photo_id)
        for attempt in range(1, self._max_attempts + 1):
            if attempt > 1:
                # Jitter spreads the retries of threads that failed together (e.g. one 5xx burst).
                delay = backoff_delay(attempt - 1, self._backoff_base, self._backoff_cap)
                self._pause(delay * random.uniform(0.5, 1.0))
            self._pause(self._rate_limiter.reserve())
            try:
                return interpret_get_location(redact(self._fetch(url), self._api_key))
            except TransientError as e:
                last_error = e
            except InvalidAnswerError as e:
                raise InvalidAnswerError(f"photo {photo_id}: invalid answer: {e}") from None
        raise TransientError(f"photo {photo_id}: gave up after {self._max_attempts} attempts; last: {last_error}")

    def _pause(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise Stopped()

    def _fetch(self, url: str) -> bytes:
        """The body of the answer. Its errors may quote `url`, key included: get_location redacts them."""
        try:
            with urllib.request.urlopen(url, timeout=self._timeout) as response:
                return read_answer(response)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code >= 500 or e.code == 429:
                raise TransientError(f"HTTP {e.code} {e.reason}") from None
            raise FlickrError(f"HTTP {e.code} {e.reason} from {self._endpoint}") from None
        # Timeouts, refused/reset connections, truncated bodies; ValueError: e.g. UnicodeError for a redirect to a
        # host name the IDNA codec refuses.
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise TransientError(f"{type(e).__name__}: {e}") from None
