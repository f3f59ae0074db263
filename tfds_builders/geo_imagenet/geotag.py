"""Geotag ImageNet's Flickr photos: the first step of making GeoImageNet.

    python -m tfds_builders.geo_imagenet.geotag --urls fall11_urls.txt --api-key KEY --out geotags.csv

Reads ImageNet's fall11 URL list (`<wnid>_<n>\\t<url>` per line), asks Flickr's flickr.photos.geo.getLocation
for every photo behind a Flickr static URL (other URLs are counted and skipped) and writes two append-only files:

    OUT          image_id,wnid,lat,lon,accuracy,country   one row per geotagged photo (what the builder reads)
    OUT.missing  image_id,wnid,code                        photos Flickr says have no geotag
                                                           (code 1: photo not found, 2: no location)

Every answer is one line, flushed and fsync'd before the next, so a run killed at any point loses at most the
answers still in flight. Restarted with the same arguments, it drops a torn last line and asks only for the
photos in neither file. Photos that still fail after every retry (timeouts, HTTP 5xx, invalid JSON) are written
nowhere, so the next run asks for them again; so are invalid answers, without a retry: a location the builder
would refuse (the rule of geotags_format.check_location: latitude, longitude and accuracy 0..16 in range, the
country printable text), an error code that is not an integer, JSON nested too deeply, or an answer over 64 KiB
(of which no more is read). Each failure is logged with its reason; an invalid answer never stops the run. A lock
file (OUT.lock) keeps two runs off the same output.

Exit status: 0 every photo answered; 1 stopped (invalid API key or another answer retrying cannot fix, bad
input, output in use); 2 bad arguments (e.g. an --endpoint that is not an http(s) URL, refused before any
request); 3 finished but some photos failed (run the same command again); 130 interrupted.
No message, log line or file carries the API key: the client redacts it wherever a request URL may be quoted.
"""

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import logging
import os
import sys
import threading
import time
from typing import Callable, Iterable, Iterator, TextIO

from . import flickr
from . import geotags_format as fmt

log = logging.getLogger(__name__)

DEFAULT_CALLS_PER_HOUR = 3000  # below Flickr's 3,600/hour, leaving room for other uses of the key


@dataclasses.dataclass(frozen=True)
class Task:
    image_id: str
    wnid: str
    photo_id: str


# ---------------------------------------------------------------------------------------------------------------
# The URL list (pure).


def iter_tasks(lines: Iterable[str], skipped: collections.Counter) -> Iterator[Task]:
    """One Task per Flickr static URL; counts the other lines in `skipped` ("malformed", "not_flickr")."""
    for line in lines:
        image_id, tab, url = line.rstrip("\r\n").partition("\t")
        if not tab:
            if line.strip():
                skipped["malformed"] += 1
            continue
        try:
            wnid = fmt.wnid_of(image_id)
        except ValueError:
            skipped["malformed"] += 1
            continue
        photo_id = flickr.parse_photo_id(url)
        if photo_id is None:
            skipped["not_flickr"] += 1
            continue
        yield Task(image_id, wnid, photo_id)


def not_yet_asked(tasks: Iterable[Task], asked: set[str]) -> Iterator[Task]:
    """Tasks whose image id is not in `asked`; adds each yielded id, so an id listed twice is asked once."""
    for task in tasks:
        if task.image_id not in asked:
            asked.add(task.image_id)
            yield task


def progress_line(answered: int, total: int, elapsed_s: float, counts: collections.Counter) -> str:
    """'1200/5000 (24.0%) | 300 located, 880 no geotag, 20 failed | 0.83/s | ETA 1h16m'.

    The rate, and so the ETA, is this run's: earlier runs' answers are not in `answered` or `total`.
    """
    percent = 100.0 * answered / total if total else 100.0
    rate = answered / elapsed_s if elapsed_s > 0 else 0.0
    if answered >= total:
        eta = "done"
    elif rate > 0:
        eta = "ETA " + _duration((total - answered) / rate)
    else:
        eta = "ETA ?"
    return (f"{answered}/{total} ({percent:.1f}%) | {counts['located']} located, {counts['no_geotag']} no geotag, "
            f"{counts['failed']} failed | {rate:.2f}/s | {eta}")


def _duration(seconds: float) -> str:
    days, rest = divmod(int(round(seconds)), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


# ---------------------------------------------------------------------------------------------------------------
# The output files.


def missing_path(out_path: str) -> str:
    return out_path + fmt.MISSING_SUFFIX


@contextlib.contextmanager
def exclusive_lock(out_path: str) -> Iterator[None]:
    """Holds OUT.lock for the run: two writers appending to one file would interleave their rows."""
    with open(out_path + ".lock", "a") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another geotag run is writing {out_path} (it holds {lock_file.name})") from None
        yield


def drop_torn_tail(path: str) -> int:
    """Truncates `path` after its last newline (a line cut short by a kill); returns the bytes dropped."""
    if not os.path.exists(path):
        return 0
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        end = size
        while end > 0:
            start = max(0, end - 65536)
            f.seek(start)
            cut = f.read(end - start).rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                break
            end = start
        else:
            keep = 0
        if keep < size:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    return size - keep


def read_answered(out_path: str) -> set[str]:
    """Image ids already in OUT or OUT.missing (after their torn tails are dropped)."""
    answered = set()
    for path, reader in ((out_path, fmt.read_geotags), (missing_path(out_path), fmt.read_missing)):
        dropped = drop_torn_tail(path)
        if dropped:
            log.warning("%s: dropped a torn last line (%d bytes) left by an interrupted run", path, dropped)
        if os.path.exists(path) and os.path.getsize(path):
            with open(path, encoding="utf-8", newline="") as f:
                answered.update(record.image_id for record in reader(f, path))
    return answered


class AnswerWriter:
    """Appends one durable line per answer to OUT or OUT.missing."""

    def __init__(self, out_path: str):
        self._geotags = self._open(out_path, fmt.GEOTAG_COLUMNS)
        self._missing = self._open(missing_path(out_path), fmt.MISSING_COLUMNS)

    def _open(self, path: str, columns: tuple[str, ...]) -> TextIO:
        f = open(path, "a", encoding="utf-8", newline="")
        if f.tell() == 0:
            self._append(f, fmt.csv_line(columns))
        return f

    @staticmethod
    def _append(f: TextIO, line: str) -> None:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())

    def write(self, task: Task, answer: flickr.Location | flickr.NoGeotag) -> None:
        if isinstance(answer, flickr.NoGeotag):
            self._append(self._missing, fmt.missing_line(fmt.Missing(task.image_id, task.wnid, answer.code)))
        else:
            tag = fmt.GeoTag(task.image_id, task.wnid, answer.latitude, answer.longitude, answer.accuracy,
                             answer.country)
            self._append(self._geotags, fmt.geotag_line(tag))

    def close(self) -> None:
        self._geotags.close()
        self._missing.close()


# ---------------------------------------------------------------------------------------------------------------
# The run.


def ask_all(
    tasks: Iterable[Task],
    ask: Callable[[str], flickr.Location | flickr.NoGeotag],
    writer: AnswerWriter,
    *,
    workers: int,
    stop: threading.Event,
    on_progress: Callable[[collections.Counter], None],
) -> collections.Counter:
    """Asks `ask(photo_id)` for every task on `workers` threads and writes each answer as it arrives.

    At most 2 * workers tasks are in flight, so memory stays flat however long the URL list. On a FlickrError the
    run stops taking new tasks, still writes the answers that arrive, then re-raises it. Returns counts of
    "located", "no_geotag" and "failed" (gave up after every retry, or an invalid answer: written nowhere, asked
    again next run).
    """
    counts = collections.Counter()
    fatal = None
    tasks = iter(tasks)
    pending: dict[concurrent.futures.Future, Task] = {}
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="geotag") as pool:
        try:
            while True:
                while not stop.is_set() and len(pending) < 2 * workers:
                    task = next(tasks, None)
                    if task is None:
                        break
                    pending[pool.submit(ask, task.photo_id)] = task
                if not pending:
                    break
                done, _ = concurrent.futures.wait(pending, timeout=1.0,
                                                  return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    task = pending.pop(future)
                    try:
                        answer = future.result()
                    except flickr.Stopped:
                        continue
                    except (flickr.TransientError, flickr.InvalidAnswerError) as e:
                        counts["failed"] += 1
                        log.warning("%s: %s (not recorded; the next run asks again)", task.image_id, e)
                        continue
                    except flickr.FlickrError as e:
                        fatal = fatal or e
                        stop.set()
                        continue
                    writer.write(task, answer)
                    counts["no_geotag" if isinstance(answer, flickr.NoGeotag) else "located"] += 1
                on_progress(counts)
        except BaseException:
            stop.set()  # lets the workers leave their waits so the pool can shut down
            raise
    if fatal is not None:
        raise fatal
    return counts


class ProgressLog:
    """Logs progress_line at most every `every_s` seconds, and always once at the end."""

    def __init__(self, total: int, every_s: float, clock: Callable[[], float] = time.monotonic):
        self._total, self._every_s, self._clock = total, every_s, clock
        self._start = self._last = clock()

    def __call__(self, counts: collections.Counter, final: bool = False) -> None:
        now = self._clock()
        if final or now - self._last >= self._every_s:
            self._last = now
            answered = counts["located"] + counts["no_geotag"] + counts["failed"]
            log.info("%s", progress_line(answered, self._total, now - self._start, counts))


def _read_lines(path: str) -> Iterator[str]:
    # The fall11 list has a few URLs with invalid UTF-8; they are never Flickr URLs, so replacing is harmless.
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        yield from f


def run(args: argparse.Namespace) -> int:
    with exclusive_lock(args.out):
        answered = read_answered(args.out)
        skipped = collections.Counter()
        total = sum(1 for _ in not_yet_asked(iter_tasks(_read_lines(args.urls), skipped), set(answered)))
        log.info("%s: %d Flickr photos to ask, %d already answered in %s; "
                 "skipped %d non-Flickr and %d malformed lines", args.urls, total, len(answered), args.out,
                 skipped["not_flickr"], skipped["malformed"])
        stop = threading.Event()
        client = flickr.FlickrClient(
            args.api_key, rate_limiter=flickr.RateLimiter(args.calls_per_hour), stop=stop, endpoint=args.endpoint,
            timeout=args.timeout, max_attempts=args.max_attempts, backoff_base=args.backoff)
        progress = ProgressLog(total, args.progress_every)
        writer = AnswerWriter(args.out)
        try:
            tasks = not_yet_asked(iter_tasks(_read_lines(args.urls), collections.Counter()), answered)
            counts = ask_all(tasks, client.get_location, writer, workers=args.workers, stop=stop,
                             on_progress=progress)
        finally:
            writer.close()
    progress(counts, final=True)
    if counts["failed"]:
        log.error("%d photos failed (after %d attempts each, or at once for an invalid answer); run the same "
                  "command again to retry them", counts["failed"], args.max_attempts)
        return 3
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tfds_builders.geo_imagenet.geotag", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--urls", required=True, help="ImageNet fall11_urls.txt (<wnid>_<n>\\t<url> per line)")
    parser.add_argument("--out", required=True, help="geotags CSV to write (appended to; OUT.missing beside it)")
    parser.add_argument("--api-key", default=os.environ.get("FLICKR_API_KEY"),
                        help="Flickr API key (default: $FLICKR_API_KEY, which keeps it out of the process list)")
    parser.add_argument("--endpoint", default=flickr.REST_ENDPOINT,
                        help="Flickr REST endpoint: an http(s) URL without query (tests use a fake)")
    parser.add_argument("--calls-per-hour", type=float, default=DEFAULT_CALLS_PER_HOUR,
                        help=f"rate limit, retries included (Flickr allows {flickr.FLICKR_CALLS_PER_HOUR}/key)")
    parser.add_argument("--workers", type=int, default=4, help="concurrent requests")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    parser.add_argument("--max-attempts", type=int, default=6,
                        help="attempts per photo before giving up on it for this run")
    parser.add_argument("--backoff", type=float, default=2.0,
                        help="first retry delay in seconds; doubles per retry, at most 300 s")
    parser.add_argument("--progress-every", type=float, default=60.0, help="seconds between progress lines")
    args = parser.parse_args(argv)
    if not args.api_key:
        parser.error("give --api-key or set FLICKR_API_KEY")
    try:
        flickr.check_endpoint(args.endpoint)
    except ValueError as e:
        parser.error(flickr.redact(f"--endpoint {args.endpoint!r}: {e}", args.api_key))
    if not os.path.isfile(args.urls):
        parser.error(f"--urls {args.urls}: no such file")
    if args.workers < 1 or args.max_attempts < 1 or args.calls_per_hour <= 0:
        parser.error("--workers, --max-attempts and --calls-per-hour must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        return run(args)
    except flickr.FlickrError as e:
        log.error("stopped: %s. Every answer received was written; fix the cause and rerun the same command.", e)
    except (OSError, RuntimeError, ValueError) as e:
        log.error("stopped: %s", e)
    except KeyboardInterrupt:
        log.error("interrupted; every answer received was written; rerun the same command to resume")
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
