"""The PACS run and watch loops: find frontal chest radiographs, analyse them, store the results in their study.

For each study (given, found by date, or all): its series are listed over QIDO-RS; CR/DX series of body part CHEST
(or unset) are candidates, our own result series (SR, covidcxr captures) and presentation objects are passed over
silently, and every instance of any other series (CT, MR, ...) is reported as ``skipped`` with its UID and reason.
Each candidate not yet in the :class:`~covidcxr.pacs.ledger.Ledger` is retrieved (WADO-RS), analysed by
:class:`~covidcxr.service.dicom_results.DicomAnalyzer` and its SR (+ heat-map capture) stored into the same
study (STOW-RS). One bad instance never stops the run:

==============  ==========================================================================  ============
status          meaning                                                                     run fails?
==============  ==========================================================================  ============
``stored``      verdict given: SR and Secondary Capture stored                              no
``no_result``   the input gate refused a verdict: an SR saying "no result" and why stored   no
``skipped``     not a frontal chest radiograph (modality, body part, lateral view)          no
``refused``     unreadable: corrupt, unsupported transfer syntax, CT labelled CR/DX, ...    yes
``failed``      network / PACS error after the retries (retried by the next run)            yes
==============  ==========================================================================  ============

SIGINT/SIGTERM (:class:`StopFlag`) end the loop between two instances: the one in progress is finished (stored
and recorded) first, so nothing is left half-written.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Self

from covidcxr.errors import ConfigError, ImageError, NotFrontalChestError, PacsError
from covidcxr.pacs.client import AuthRefusedError, PacsClient, TransientError
from covidcxr.pacs.ledger import Ledger
from covidcxr.vocab import view_from_header

log = logging.getLogger(__name__)

RADIOGRAPH_MODALITIES = ("CR", "DX")
_OWN_OR_NON_IMAGE = ("SR", "KO", "PR", "SEG", "REG", "DOC")  # results and presentation objects: not reported
OUTCOME_STATUSES = ("stored", "no_result", "skipped", "refused", "failed", "done_before", "would_process")
FAILING = ("refused", "failed")


@dataclass
class Outcome:
    """What happened to one instance in this run (UIDs and reasons only: no patient identifiers)."""

    study_uid: str
    series_uid: str
    sop_uid: str
    status: str
    reason: str = ""
    probability: float | None = None
    label: str | None = None
    result_uids: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class RunSummary:
    """The outcomes of one pass over the studies."""

    outcomes: list[Outcome] = field(default_factory=list)
    studies: int = 0
    seconds: float = 0.0
    interrupted_by: int | None = None

    @property
    def counts(self) -> dict[str, int]:
        """Instances per status (every status listed, zeros included)."""
        c = Counter(o.status for o in self.outcomes)
        return {s: int(c.get(s, 0)) for s in OUTCOME_STATUSES}

    @property
    def failed(self) -> list[Outcome]:
        """Instances that make the run fail (``refused`` or ``failed``)."""
        return [o for o in self.outcomes if o.status in FAILING]

    @property
    def exit_code(self) -> int:
        """0 when nothing failed, else 1."""
        return 1 if self.failed else 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {"studies": self.studies, "seconds": round(self.seconds, 3), "counts": self.counts,
                "outcomes": [asdict(o) for o in self.outcomes]}

    def extend(self, other: RunSummary) -> None:
        """Add another pass's outcomes."""
        self.outcomes += other.outcomes
        self.studies += other.studies
        self.seconds += other.seconds


class StopFlag:
    """SIGINT/SIGTERM request a stop between two instances instead of killing the work in progress.

    Use as a context manager (handlers installed in the main thread only, the previous ones restored on exit);
    :meth:`wait` sleeps until the interval ends or a stop is asked.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop was asked."""
        return self._event.is_set()

    def request(self, signum: int = int(signal.SIGINT)) -> None:
        """Ask for a stop (what the signal handler does)."""
        if self.signum is None:
            self.signum = int(signum)
        self._event.set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True when a stop was asked."""
        return self._event.wait(seconds)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        log.warning("%s received: finishing the current instance, then stopping", signal.Signals(signum).name)
        self.request(signum)

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def parse_since(text: str) -> str:
    """``YYYYMMDD`` of a ``--since`` date (``YYYYMMDD`` or ``YYYY-MM-DD``).

    Raises:
        ConfigError: Not a valid date.
    """
    digits = text.strip().replace("-", "")
    if not re.fullmatch(r"\d{8}", digits):
        raise ConfigError(f"--since {text!r}: expected a date YYYY-MM-DD or YYYYMMDD")
    try:
        dt.datetime.strptime(digits, "%Y%m%d")
    except ValueError as exc:
        raise ConfigError(f"--since {text!r}: not a calendar date") from exc
    return digits


class PacsRunner:
    """One PACS, one model, one ledger: the loop behind ``covidcxr pacs run`` and ``covidcxr pacs watch``.

    Args:
        client: The DICOMweb client.
        analyzer: A loaded :class:`~covidcxr.service.dicom_results.DicomAnalyzer`.
        ledger: The ledger of processed instances.
        dry_run: List what would be processed; retrieve, analyse, store and record nothing.
        reprocess: Process instances the ledger holds as done (their new results get new UIDs).
        stop: Stop flag checked between instances.
    """

    def __init__(self, client: PacsClient, analyzer: Any, ledger: Ledger, *, dry_run: bool = False,
                 reprocess: bool = False, stop: StopFlag | None = None) -> None:
        self.client = client
        self.analyzer = analyzer
        self.ledger = ledger
        self.dry_run = dry_run
        self.reprocess = reprocess
        self.stop = stop or StopFlag()
        self.model_hash = analyzer.model_hash

    # ------------------------------------------------------------------ finding
    def studies(self, *, study_uids: Sequence[str] | None = None, since: str | None = None) -> list[str]:
        """The studies of a pass: those given, else those from ``since`` on (all when None)."""
        if study_uids:
            return list(dict.fromkeys(study_uids))
        return self.client.find_studies(since=since)

    def candidates(self, study_uid: str) -> Iterator[tuple[str, dict[str, Any], str | None]]:
        """``(series_uid, instance, skip_reason)`` of a study's instances worth reporting (None = candidate)."""
        for series in self.client.find_series(study_uid):
            modality = series["modality"].upper()
            if modality in _OWN_OR_NON_IMAGE or series["description"].startswith("covidcxr"):
                continue
            reason = None
            if modality not in RADIOGRAPH_MODALITIES:
                reason = f"modality {modality or '(unset)'} is not a projection radiograph (CR/DX)"
            elif series["body_part"].strip().upper() not in ("", "CHEST"):
                reason = "body part is not CHEST"
            for instance in self.client.find_instances(study_uid, series["series_uid"]):
                why = reason
                if why is None and view_from_header(instance.get("view")) == "lateral":
                    why = "lateral view: only frontal (PA/AP) chest radiographs are analysed"
                yield series["series_uid"], instance, why

    # ------------------------------------------------------------------ one pass
    def run(self, *, study_uids: Sequence[str] | None = None, since: str | None = None) -> RunSummary:
        """One pass over the studies; every instance is accounted for in the summary.

        Raises:
            PacsError: The PACS refused the credentials or cannot be searched at all.
        """
        t0 = time.perf_counter()
        summary = RunSummary()
        studies = self.studies(study_uids=study_uids, since=since)
        for study_uid in studies:
            if self.stop.requested:
                break
            summary.studies += 1
            try:
                found = list(self.candidates(study_uid))
            except AuthRefusedError:
                raise
            except PacsError as exc:  # transient after the retries, or an HTTP error for this study only
                log.error("study %s: cannot list its instances: %s", study_uid, exc)
                summary.outcomes.append(Outcome(study_uid, "", "", "failed", str(exc)))
                continue
            for series_uid, instance, skip_reason in found:
                if self.stop.requested:
                    break
                outcome = self.process(study_uid, series_uid, instance["sop_uid"], skip_reason)
                if outcome is not None:
                    summary.outcomes.append(outcome)
        summary.seconds = time.perf_counter() - t0
        summary.interrupted_by = self.stop.signum
        return summary

    def process(self, study_uid: str, series_uid: str, sop_uid: str, skip_reason: str | None = None) -> Outcome:
        """Handle one instance: skip, retrieve, analyse, store and record (see the module docstring).

        Raises:
            PacsError: Refused credentials (nothing further can work); other failures become the outcome.
        """
        t0 = time.perf_counter()
        entry = self.ledger.get(sop_uid, self.model_hash)
        if entry is not None and entry.final and not self.reprocess:
            return Outcome(study_uid, series_uid, sop_uid, "done_before", entry.status,
                           result_uids=entry.result_uids)
        if skip_reason is not None:
            log.info("instance %s skipped: %s", sop_uid, skip_reason)
            if not self.dry_run:
                self.ledger.finish(sop_uid, self.model_hash, study_uid, "skipped", reason=skip_reason)
            return Outcome(study_uid, series_uid, sop_uid, "skipped", skip_reason)
        if self.dry_run:
            return Outcome(study_uid, series_uid, sop_uid, "would_process")
        generation = 0 if entry is None else entry.generation + (1 if entry.final else 0)
        outcome = Outcome(study_uid, series_uid, sop_uid, "failed")
        self.ledger.begin(sop_uid, self.model_hash, study_uid, generation)
        try:
            data = self.client.retrieve(study_uid, series_uid, sop_uid)
            result = self.analyzer.analyze_bytes(data, sop_uid, generation=generation)
            if result.study_instance_uid != study_uid or result.sop_instance_uid != sop_uid:
                raise ImageError(sop_uid, "the retrieved header's study/instance UIDs differ from the PACS index")
            self.client.store(result.datasets, study_uid)
        except NotFrontalChestError as exc:
            outcome.status, outcome.reason = "skipped", exc.reason
        except ImageError as exc:
            outcome.status, outcome.reason = "refused", exc.reason
        except AuthRefusedError:
            raise
        except PacsError as exc:  # transient after the retries, or a store the PACS rejected
            outcome.status, outcome.reason = "failed", str(exc)
        except Exception as exc:  # one broken instance must not end the run; the reason names the error type
            log.debug("instance %s failed", sop_uid, exc_info=True)
            outcome.status, outcome.reason = "failed", f"{type(exc).__name__}: {exc}"
        else:
            outcome.status = "stored" if result.status == "ok" else "no_result"
            outcome.reason = "; ".join(result.no_result_reasons)
            outcome.probability, outcome.label = result.probability, result.label
            outcome.result_uids = result.result_uids
        self.ledger.finish(sop_uid, self.model_hash, study_uid, outcome.status, reason=outcome.reason,
                           result_uids=outcome.result_uids, generation=generation)
        outcome.seconds = time.perf_counter() - t0
        level = logging.WARNING if outcome.status in FAILING else logging.INFO
        log.log(level, "instance %s: %s%s (%.2f s)", sop_uid, outcome.status,
                f": {outcome.reason}" if outcome.reason else "", outcome.seconds)
        return outcome

    # ------------------------------------------------------------------ watch
    def watch(self, *, interval: float, since: str | None = None, max_passes: int | None = None,
              on_pass: Any = None) -> RunSummary:
        """Poll for new instances every ``interval`` seconds until stopped (or ``max_passes`` passes).

        Args:
            interval: Seconds between the end of one pass and the start of the next.
            since: StudyDate from which studies are looked at (default: the day the watch started, UTC).
            max_passes: Stop after this many passes (tests); None runs until a signal.
            on_pass: Called with each pass's :class:`RunSummary` (the CLI logs it).

        Returns:
            All outcomes of all passes (instances already done before are left out).
        """
        if interval <= 0:
            raise ConfigError(f"--interval {interval}: must be > 0 seconds")
        since = since or dt.datetime.now(dt.UTC).strftime("%Y%m%d")
        total = RunSummary()
        passes = 0
        while not self.stop.requested:
            try:
                one = self.run(since=since)
            except TransientError as exc:  # the PACS is down: try again next interval
                log.error("watch: %s", exc)
                one = RunSummary()
            one.outcomes = [o for o in one.outcomes if o.status != "done_before"]
            total.extend(one)
            if on_pass is not None:
                on_pass(one)
            passes += 1
            if max_passes is not None and passes >= max_passes:
                break
            if self.stop.wait(interval):
                break
        total.interrupted_by = self.stop.signum
        return total


def summary_rows(summary: RunSummary, statuses: Iterable[str] = ("skipped", "refused", "failed")) -> list[list[str]]:
    """``[UID, status, reason]`` rows of the instances the summary table lists one by one."""
    wanted = set(statuses)
    return [[o.sop_uid or o.study_uid, o.status, o.reason] for o in summary.outcomes if o.status in wanted]


@contextlib.contextmanager
def open_runner(url: str, *, model_dir: str | Path, ledger_path: str | Path, auth: Any = None,
                ca_bundle: str | Path | None = None, timeout: float = 30.0, retry: Any = None,
                device: str = "auto", index_dir: str | Path | None = None, k: int = 8, dry_run: bool = False,
                reprocess: bool = False) -> Iterator[PacsRunner]:
    """A ready :class:`PacsRunner` (client checked, model loaded, ledger open, SIGINT/SIGTERM caught).

    Raises:
        ConfigError: Bad URL, credentials source or ledger.
        PacsError: The PACS is unreachable or refuses the credentials.
        ModelError / CaseIndexError: Model or index cannot be loaded.
    """
    from covidcxr.service.dicom_results import DicomAnalyzer

    client = PacsClient(url, auth, ca_bundle=ca_bundle, timeout=timeout, retry=retry)
    client.check()
    log.info("PACS %s reachable (%s)", client.url, client.auth.source)
    # Loaded in a dry run too: the ledger is keyed by the model's weights hash, and a broken model shows now.
    analyzer = DicomAnalyzer.load(model_dir, device=device, index_dir=index_dir, k=k)
    with Ledger(ledger_path) as ledger, StopFlag() as stop:
        yield PacsRunner(client, analyzer, ledger, dry_run=dry_run, reprocess=reprocess, stop=stop)
