"""Orthanc (or any PACS) over DICOM: C-STORE to deliver, C-FIND to verify, C-ECHO to check.

Failure policy, chosen so that no image is lost and the status stays honest:

* The peer cannot be reached, or refuses the association (for any reason, including an unknown
  called/calling AE title, which is a configuration error an operator can fix) *before any image of
  the batch was tried*: ``send`` raises ``DestinationError(retryable=True)`` naming the reason.
* One image does not take its batch down. When the association is lost while an image is in
  flight, a new association is opened for the rest. An image the peer aborted on is sent again on
  it (at most ``max_reconnects`` times: an abort may be a restart); an image the peer did not answer
  within the time-out is not (a peer stuck on one image stays stuck on it, and each try costs a
  time-out). Such an image gets a retryable ``SendResult`` naming it and the cause; its siblings
  go on. The shell counts these per image and gives up on an image that keeps failing.
* Only a failure of the whole destination fails the batch: when ``max_consecutive_failures``
  images in a row were lost, a C-ECHO asks whether the peer is alive. If it is, the images are the
  problem and the batch goes on; if not, or when the association cannot be reopened, the
  destination is down: ``DestinationError`` if no image of the batch got an answer yet, otherwise
  the images not answered get retryable results marked ``destination_fault`` (not counted against
  them). After ``max_lost_images`` lost images in one batch the rest wait for the next attempt, so
  a batch takes a bounded time.
* Per-image statuses are classified by :mod:`sendit.destinations.dimse_status`: success and
  warnings are delivered, 0xA7xx is retryable, 0xA9xx/0xCxxx/0x01xx refusals are permanent.
* A SOP class the peer rejects in negotiation is a permanent failure reported as 0x0122. A transfer
  syntax it rejects is retried as Explicit/Implicit VR Little Endian when pydicom can decode the
  pixel data here; otherwise that image is a permanent failure saying so.
* Verification (C-FIND) that the peer refuses is a configuration error, not an outage: Orthanc
  accepts the association and then aborts it on the C-FIND of a calling AE title it does not allow.
  Two such aborts in a row (a restart mid-query would not repeat on a fresh association) raise
  ``DestinationError(retryable=False)`` saying what to change on Orthanc's side; waiting does not fix
  it, and every delivered series would otherwise spend its retries on it.
* Every failure of ``check`` and of opening an association names host:port and both AE titles.

pynetdicom's association reactor can take a DIMSE answer meant for the thread that sent the request
(see ``_AnswerQueue``): that race was the "association lost ... no answer within ORTHANC_TIMEOUT"
stall. Associations opened here keep answers for the sender.
"""

from __future__ import annotations

import logging
import queue
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config, build_context, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from sendit.destinations.base import DestinationError, OutgoingImage, SendResult
from sendit.destinations.commitment import (
    REQUEST_COMMITMENT,
    STORAGE_COMMITMENT_INSTANCE,
    STORAGE_COMMITMENT_PUSH,
    CommitmentReport,
    commitment_request,
)
from sendit.destinations.dimse_status import classify, describe

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1..255
NATIVE_SYNTAXES: tuple[UID, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
SOP_CLASS_NOT_SUPPORTED = 0x0122
VERIFICATION = UID("1.2.840.10008.1.1")
STUDY_ROOT_FIND = UID("1.2.840.10008.5.1.4.1.2.2.1")
NOT_AUTHORISED = 0x0124


def _set_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN hook: pynetdicom leaves Nagle on, which costs ~45 ms per C-STORE round trip."""
    sock = event.assoc.dul.socket
    if sock is not None and sock.socket is not None:
        sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _AnswerQueue(queue.Queue[Any]):
    """The DIMSE message queue of an association we requested, without pynetdicom's answer race.

    pynetdicom 3.0's association reactor thread polls this queue with ``get(block=False)`` to serve
    requests from the peer, and ``send_c_store()`` (and every other ``send_*``) pauses it while it
    waits for its answer. The pause is check-then-act: clear an Event, then spin until a flag that
    the reactor sets *before* ``Event.wait()`` reads True. A reactor woken by the previous call's
    unpause still has that flag set, so the next call goes ahead with the reactor running; when the
    answer is queued before the sender reads it, the reactor takes it, logs "Received unexpected
    C-STORE service message" and drops it, and the sender waits out the DIMSE time-out for an answer
    the peer sent within a millisecond (on loopback, 1 send in a few hundred). Here a non-blocking
    get never takes an answer: answers are left for the blocking get of the thread that asked.
    """

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if block:
            return super().get(block, timeout)
        with self.mutex:
            if not self._qsize() or _is_answer(self.queue[0]):
                raise queue.Empty
            item = self._get()
            self.not_full.notify()
            return item


def _is_answer(item: Any) -> bool:
    """A queued (context ID, DIMSE primitive) that answers one of our requests."""
    return getattr(item[1], "MessageIDBeingRespondedTo", None) is not None


def _check_aet(value: str, what: str) -> str:
    if not value or not value.strip() or len(value) > 16 or "\\" in value:
        raise ValueError(f"{what} must be 1 to 16 characters without a backslash, got {value!r}")
    return value


@dataclass
class _Group:
    """Images that share one association: at most MAX_CONTEXTS presentation contexts."""

    contexts: list[PresentationContext] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)


class _Lost(Exception):
    """The association went away while an image was in flight (``timed_out``: the peer never answered)."""

    def __init__(self, cause: str, *, timed_out: bool = False) -> None:
        super().__init__(cause)
        self.cause = cause
        self.timed_out = timed_out


@dataclass
class _Batch:
    """What one ``send`` call has seen so far, across its associations."""

    answered: int = 0  # images the peer answered with a DIMSE status (any status)
    lost: int = 0  # images lost in flight
    streak: list[int] = field(default_factory=list)  # indices of the images lost since the last answer
    stop_reason: str | None = None  # set when the images not yet tried must wait for another attempt


class _PeerClosed(Exception):
    """The peer aborted or closed the association instead of answering, well before any time-out."""


class DicomDestination:
    """C-STORE SCU with one association per batch (split only past 128 presentation contexts)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        called_aet: str = "ORTHANC",
        calling_aet: str = "SENDIT",
        max_pdu: int = 131072,
        connect_timeout: float = 10.0,
        acse_timeout: float = 30.0,
        dimse_timeout: float = 60.0,
        network_timeout: float = 60.0,
        max_reconnects: int = 2,
        max_consecutive_failures: int = 3,
        max_lost_images: int = 10,
        name: str | None = None,
        commitment: Callable[[str, float], CommitmentReport | None] | None = None,
        commitment_seconds: float = 60.0,
    ) -> None:
        self.host = host
        self.port = int(port)
        self.called_aet = _check_aet(called_aet, "called AE title")
        self.calling_aet = _check_aet(calling_aet, "calling AE title")
        self.max_pdu = int(max_pdu)
        self.max_reconnects = max(0, int(max_reconnects))  # re-sends of one image the peer aborted on
        self.max_consecutive_failures = max(1, int(max_consecutive_failures))
        self.max_lost_images = max(1, int(max_lost_images))
        self.name = name or f"dicom:{self.called_aet}@{host}:{self.port}"
        # Who talks to whom, for every message an operator has to act on.
        self.where = f"{host}:{self.port} (calling AE {self.calling_aet}, called AE {self.called_aet})"
        # Associations reopened after one was lost mid-batch, since this object was made; ``events``
        # says why, for the last send() only (image ids and causes, nothing from the images).
        self.reconnects = 0
        self.events: list[str] = []
        # Storage commitment (optional): ``commitment(transaction_uid, seconds)`` waits for the peer's
        # report, which reaches the listener, not this object; the SOP class of each instance sent
        # through this object is kept for the request (an instance sent by an earlier object is
        # verified by C-FIND).
        self.commitment = commitment
        self.commitment_seconds = commitment_seconds
        self._sop_classes: dict[str, str] = {}
        self._ae = AE(ae_title=self.calling_aet)
        self._ae.connection_timeout = connect_timeout
        self._ae.acse_timeout = acse_timeout
        self._ae.dimse_timeout = dimse_timeout
        self._ae.network_timeout = network_timeout
        # Send files as they are on disk (no decode/re-encode): byte-exact and much cheaper. This is a
        # process-wide pynetdicom switch that only affects send_c_store() called with a path.
        _config.STORE_SEND_CHUNKED_DATASET = True

    def __repr__(self) -> str:
        return f"DicomDestination({self.name!r})"

    # -- the Destination protocol -------------------------------------------------------------

    def send(self, images: Sequence[OutgoingImage]) -> list[SendResult]:
        """One result per image, in order; one image's failure does not fail the others. Raises
        DestinationError only when the peer as a whole fails before any image got an answer."""
        self.events = []
        results: list[SendResult | None] = [None] * len(images)
        batch = _Batch()
        for group in _plan(images):
            if batch.stop_reason is None:
                self._send_group(images, group, results, batch)
        reason = batch.stop_reason or "not attempted"
        final = [r or _not_tried(images[i], reason) for i, r in enumerate(results)]
        for image, result in zip(images, final, strict=True):
            if result.delivered:  # what a storage commitment request names it by
                self._sop_classes[image.sop_instance_uid] = image.sop_class_uid
        return final

    def missing(self, series_uid: str, sop_instance_uids: set[str]) -> set[str]:
        """What the peer does not hold: by storage commitment where configured (for the instances
        this object sent), otherwise by C-FIND (Study Root, IMAGE level) by SeriesInstanceUID."""
        if not sop_instance_uids:
            return set()
        if self.commitment is None:
            return self._missing_by_find(series_uid, sop_instance_uids)
        known = {uid: self._sop_classes[uid] for uid in sop_instance_uids if uid in self._sop_classes}
        rest = set(sop_instance_uids) - set(known)
        missing = self._missing_by_commitment(known) if known else set()
        if rest:
            missing |= self._missing_by_find(series_uid, rest)
        return missing

    def _commitment_offered(self) -> str | None:
        """None when the peer accepts the Storage Commitment Push Model on an association."""
        try:
            assoc = self._open([build_context(STORAGE_COMMITMENT_PUSH)])
        except DestinationError as exc:
            return str(exc).removeprefix(f"{self.name}: ")
        try:
            if not assoc.accepted_contexts:
                return f"{self.where} does not offer Storage Commitment Push Model (STORAGE_COMMITMENT is on)"
            return None
        finally:
            _close(assoc)

    def _missing_by_commitment(self, instances: dict[str, str]) -> set[str]:
        """1. N-ACTION "Request Storage Commitment" for these instances under a fresh Transaction UID.
        2. Wait (``commitment_seconds``) for the peer's N-EVENT-REPORT, which the listener records.
        3. Missing: every instance the report does not list as committed."""
        assert self.commitment is not None
        transaction_uid = generate_uid()
        assoc = self._open([build_context(STORAGE_COMMITMENT_PUSH)])
        try:
            if not assoc.accepted_contexts:
                raise DestinationError(
                    f"{self.name}: {self.where} does not support Storage Commitment Push Model"
                    " (set STORAGE_COMMITMENT = false)",
                    retryable=False,
                )
            started = time.monotonic()
            status, _ = assoc.send_n_action(
                commitment_request(transaction_uid, instances),
                REQUEST_COMMITMENT,
                STORAGE_COMMITMENT_PUSH,
                STORAGE_COMMITMENT_INSTANCE,
            )
        finally:
            _close(assoc)
        if not status:
            raise DestinationError(f"{self.name}: {self.where}: N-ACTION got no answer ({self._lost(started).cause})")
        code = int(status.Status)
        if code != 0x0000:
            info = classify(code)
            raise DestinationError(
                f"{self.name}: {self.where}: storage commitment refused: {info.describe()}",
                retryable=not info.permanent,
            )
        report = self.commitment(transaction_uid, self.commitment_seconds)
        if report is None:
            raise DestinationError(
                f"{self.name}: {self.where}: no storage commitment report within {self.commitment_seconds:g} s"
                " (the peer sends it to Sendit's listener: LISTEN_PORT, with the peer's AE title in"
                " ALLOWED_CALLERS and Sendit's AE, host and port in the peer's modalities)"
            )
        if report.failed:
            log.info("%s: storage commitment failed for %s instance(s)", self.name, len(report.failed))
        return set(instances) - set(report.committed)

    def _missing_by_find(self, series_uid: str, sop_instance_uids: set[str]) -> set[str]:
        try:
            return set(sop_instance_uids) - self._find_series(series_uid)
        except _PeerClosed:
            log.warning("%s: the peer closed the association on a C-FIND; asking again", self.name)
        try:
            return set(sop_instance_uids) - self._find_series(series_uid)
        except _PeerClosed:  # twice, on fresh associations: a refusal, not a restart
            raise DestinationError(f"{self.name}: {self._refused('C-FIND')}", retryable=False) from None

    def check(self) -> str | None:
        """What delivery and verification need, tried before a run: the association is accepted, and
        C-ECHO and a C-FIND (for a series that does not exist) are answered. None when all are; else
        one line naming host:port and both AE titles, and what to change (here or on Orthanc's side)."""
        try:
            assoc = self._associate([build_context(VERIFICATION)])
        except Exception as exc:  # pynetdicom raises for an address it cannot even use
            return f"cannot open an association to {self.where}: {type(exc).__name__}"
        if not assoc.is_established:
            return self._not_associated(assoc, probe=True)
        try:
            problem = self._echo_on(assoc)
        finally:
            _close(assoc)
        if problem is not None:
            return problem
        if self.commitment is not None:  # verification asks by storage commitment: is it offered?
            return self._commitment_offered()
        try:  # exactly what verification asks, for a series that does not exist
            self.missing(generate_uid(), {generate_uid()})
        except DestinationError as exc:
            return str(exc).removeprefix(f"{self.name}: ")
        return None

    def close(self) -> None:
        """Nothing persistent: associations live for one batch."""

    # -- internals ---------------------------------------------------------------------------

    def _associate(self, contexts: list[PresentationContext]) -> Association:
        assoc = self._ae.associate(
            self.host,
            self.port,
            contexts=contexts,
            ae_title=self.called_aet,
            max_pdu=self.max_pdu,
            evt_handlers=[(evt.EVT_CONN_OPEN, _set_nodelay)],
        )
        if assoc.is_established:
            # Before our first request, so nothing is queued yet (a storage or query SCP sends no
            # requests of its own): from here on only the sender takes answers.
            assoc.dimse.msg_queue = _AnswerQueue()
        return assoc

    def _open(self, contexts: list[PresentationContext]) -> Association:
        """An established association, or DestinationError(retryable=True) saying why not."""
        assoc = self._associate(contexts)
        if assoc.is_established:
            return assoc
        raise DestinationError(f"{self.name}: {self._not_associated(assoc)}", retryable=True)

    def _find_series(self, series_uid: str) -> set[str]:
        """What the peer holds for a series, on an association of its own."""
        assoc = self._open([build_context(STUDY_ROOT_FIND)])
        try:
            return self._held(assoc, series_uid)
        finally:
            _close(assoc)

    def _held(self, assoc: Association, series_uid: str) -> set[str]:
        """The SOPInstanceUIDs the peer holds for a series (one C-FIND on ``assoc``)."""
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.SeriesInstanceUID = series_uid
        query.SOPInstanceUID = ""
        held: set[str] = set()
        started = time.monotonic()
        for status, identifier in assoc.send_c_find(query, STUDY_ROOT_FIND):
            if not status:
                lost = self._lost(started)
                if lost.timed_out:
                    raise DestinationError(f"{self.name}: {self.where}: C-FIND got no answer ({lost.cause})")
                raise _PeerClosed()
            code = int(status.Status)
            if code in (0xFF00, 0xFF01):
                if identifier is not None and "SOPInstanceUID" in identifier:
                    held.add(str(identifier.SOPInstanceUID))
            elif code != 0x0000:
                info = classify(code)
                if code == NOT_AUTHORISED:
                    reason = self._refused("C-FIND", info.describe())
                else:
                    reason = f"{self.where}: C-FIND failed: {info.describe()}"
                raise DestinationError(f"{self.name}: {reason}", retryable=not info.permanent)
        return held

    def _echo(self) -> str | None:
        """C-ECHO on its own association: is the peer alive? None when it answers Success."""
        try:
            assoc = self._open([build_context(VERIFICATION)])
        except DestinationError as exc:
            return str(exc).removeprefix(f"{self.name}: ")
        try:
            return self._echo_on(assoc)
        finally:
            _close(assoc)

    def _echo_on(self, assoc: Association) -> str | None:
        started = time.monotonic()
        status = assoc.send_c_echo()
        if not status:
            lost = self._lost(started)
            return f"{self.where}: C-ECHO got no answer ({lost.cause})" if lost.timed_out else self._refused("C-ECHO")
        if int(status.Status) != 0:
            return f"{self.where}: C-ECHO answered {describe(int(status.Status))}"
        return None

    def _refused(self, service: str, detail: str = "the peer closed the association instead of answering") -> str:
        """What a refused C-ECHO/C-FIND means and what to change on Orthanc's side."""
        allow = {"C-FIND": "DicomAlwaysAllowFind", "C-ECHO": "DicomAlwaysAllowEcho"}[service]
        need = "verification needs it" if service == "C-FIND" else "sendit check needs it"
        return (
            f"{self.where} refused {service} ({detail}; {need}): on Orthanc, list {self.calling_aet} in "
            f'DicomModalities, e.g. "sendit": ["{self.calling_aet}", "<this host>", 104] (in the object form, '
            f'"Allow{service[2:].title()}": true), or set "{allow}": true'
        )

    def _not_associated(self, assoc: Association, *, probe: bool = False) -> str:
        """Why no association, naming host:port, both AE titles and the setting to change. ``probe``
        opens a plain TCP connection for the OS's reason (check only: it costs a second connect)."""
        if assoc.is_rejected:
            rsp = assoc.acceptor.primitive
            if rsp is None:
                return f"{self.where}: association rejected"
            kind = "permanently" if rsp.result == 0x01 else "transiently"
            reason = str(rsp.reason_str)
            text = f"{self.where}: association rejected {kind} by {rsp.source_str}: {reason}"
            if reason.startswith("Calling AE"):
                return (
                    f"{text}; on Orthanc, list {self.calling_aet} in DicomModalities, e.g. "
                    f'"sendit": ["{self.calling_aet}", "<this host>", 104] (with DicomCheckModalityHost the '
                    "host must be this machine's address), or set SENDIT_AET to an AE title Orthanc knows"
                )
            if reason.startswith("Called AE"):
                return f"{text}; set ORTHANC_AET to Orthanc's DicomAet"
            return f"{text} (check the AE titles and Orthanc's DicomModalities)"
        if assoc.rejected_contexts and not assoc.accepted_contexts:
            return f"{self.where}: the peer accepted none of the proposed presentation contexts"
        os_reason = _connect_problem(self.host, self.port, self._ae.connection_timeout) if probe else None
        if os_reason is not None:
            return (
                f"cannot connect to {self.where}: {os_reason} "
                "(is ORTHANC_IPADDRESS:ORTHANC_PORT Orthanc's address and DicomPort?)"
            )
        if probe:
            return f"{self.where}: association aborted (TCP connects, but no A-ASSOCIATE answer in time)"
        return f"{self.where}: association aborted (peer unreachable, refused the connection, or timed out)"

    def _send_group(
        self, images: Sequence[OutgoingImage], group: _Group, results: list[SendResult | None], batch: _Batch
    ) -> None:
        pending = group.indices
        pos = 0
        resends = 0  # of the image at ``pos``, after the peer aborted on it
        after_loss = False  # the association about to be opened replaces one that was lost
        while pos < len(pending):
            assoc = self._associate(group.contexts)
            if not assoc.is_established:
                if assoc.rejected_contexts and not assoc.accepted_contexts:
                    # The peer took none of our SOP classes / syntaxes: a property of the data.
                    for i in pending[pos:]:
                        results[i] = _refused_context(images[i], assoc)
                    return
                self._destination_down(self._not_associated(assoc), results, batch)
                return
            if after_loss:
                self.reconnects += 1
                after_loss = False
            accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
            try:
                while pos < len(pending):
                    i = pending[pos]
                    result = self._store_one(assoc, accepted, images[i])
                    results[i] = result
                    if result.status is not None:  # the peer answered: it is working
                        batch.answered += 1
                        batch.streak.clear()
                    pos += 1
                    resends = 0
            except _Lost as lost:
                assoc.abort()  # never a polite release on a dead link: it would wait for acse_timeout
                after_loss = True
                image = images[pending[pos]]
                if not lost.timed_out and resends < self.max_reconnects:
                    resends += 1
                    log.warning(
                        "%s: association lost while sending image %d (%s); sending it again on a new association",
                        self.name,
                        image.image_id,
                        lost.cause,
                    )
                    self.events.append(
                        f"association lost while sending image {image.image_id} ({lost.cause}); "
                        "reconnecting to send it again"
                    )
                    continue
                message = f"image {image.image_id}: association lost while sending it ({lost.cause})"
                log.warning("%s: %s; the other images of the batch go on", self.name, message)
                results[pending[pos]] = SendResult(image.image_id, delivered=False, message=message)
                batch.lost += 1
                batch.streak.append(pending[pos])
                pos += 1
                resends = 0
                if len(batch.streak) >= self.max_consecutive_failures:
                    problem = self._echo()  # is the peer down, or are these images the problem?
                    if problem is not None:
                        streak = len(batch.streak)
                        self._destination_down(f"{problem} (after {streak} images in a row were lost)", results, batch)
                        return
                    batch.streak.clear()
                if batch.lost >= self.max_lost_images:
                    batch.stop_reason = f"not attempted: {batch.lost} images lost in one batch before it"
                    return
                if pos < len(pending):
                    self.events.append(f"{message}; reconnecting for the rest of the batch")
            finally:
                _close(assoc)

    def _destination_down(self, reason: str, results: list[SendResult | None], batch: _Batch) -> None:
        """The peer as a whole is failing: raise if nothing was answered yet, else stop the batch
        with the images lost in the current streak (and all not yet tried) marked as not theirs."""
        if batch.answered == 0:
            raise DestinationError(f"{self.name}: {reason}", retryable=True)
        log.warning("%s: %s; images not answered are left for a retry", self.name, reason)
        for i in batch.streak:
            lost = results[i]
            if lost is not None:
                results[i] = replace(lost, destination_fault=True)
        batch.streak.clear()
        batch.stop_reason = reason

    def _store_one(self, assoc: Association, accepted: set[tuple[str, str]], image: OutgoingImage) -> SendResult:
        sop = UID(image.sop_class_uid)
        syntax = UID(image.transfer_syntax_uid)
        payload: Path | Dataset
        if (sop, syntax) in accepted:
            payload = image.path
        elif any(accepted_sop == sop for accepted_sop, _ in accepted):
            try:
                payload = _decoded(image.path)
            except (OSError, InvalidDicomError) as exc:
                return _unreadable(image, exc)
            except Exception as exc:  # decoders raise many types; all mean "can't convert here"
                return SendResult(
                    image.image_id,
                    delivered=False,
                    permanent=True,
                    message=f"peer does not accept transfer syntax {syntax.name} and it cannot be "
                    f"decoded here ({type(exc).__name__})",
                )
        else:
            return _refused_context(image, assoc)

        started = time.monotonic()
        try:
            status = assoc.send_c_store(payload)
        except (OSError, InvalidDicomError) as exc:
            if not assoc.is_established:
                raise self._lost(started) from None
            return _unreadable(image, exc)
        except RuntimeError:  # "association must be established"
            raise self._lost(started) from None
        except (AttributeError, ValueError) as exc:
            # pynetdicom's text can include the file path; keep ours path-free.
            return SendResult(
                image.image_id,
                delivered=False,
                permanent=True,
                message=f"cannot send as {syntax.name}: file meta or encoding does not match ({type(exc).__name__})",
            )
        except Exception as exc:  # anything else is about this image or this association, not the batch
            if not assoc.is_established:
                raise self._lost(started) from None
            return SendResult(
                image.image_id,
                delivered=False,
                message=f"image {image.image_id}: unexpected error while sending ({type(exc).__name__})",
            )
        if not status or "Status" not in status:
            raise self._lost(started)
        info = classify(int(status.Status))
        message = "" if info.code == 0 else info.describe()
        comment = status.get("ErrorComment")
        if comment and info.code != 0:
            message += f": {str(comment)[:200]}"
        return SendResult(
            image.image_id,
            delivered=info.delivered,
            permanent=info.permanent,
            status=info.code,
            message=message,
        )

    def _lost(self, started: float) -> _Lost:
        """Why the association went away: a time-out (the peer never answered) or an abort/close."""
        waited = time.monotonic() - started
        limits = [t for t in (self._ae.dimse_timeout, self._ae.network_timeout) if t]
        if limits and waited >= 0.9 * min(limits):
            return _Lost(f"no answer within {min(limits):g} s", timed_out=True)
        return _Lost("aborted or closed by the peer")


def _not_tried(image: OutgoingImage, reason: str) -> SendResult:
    """A retryable result for an image this batch did not get to: not the image's failure."""
    return SendResult(image.image_id, delivered=False, message=reason, destination_fault=True)


def _plan(images: Sequence[OutgoingImage]) -> Iterator[_Group]:
    """Contexts from what the batch holds: one per (SOP class, syntax) plus a native fallback per class."""
    by_sop: dict[UID, dict[UID, list[int]]] = {}
    for i, image in enumerate(images):
        by_sop.setdefault(UID(image.sop_class_uid), {}).setdefault(UID(image.transfer_syntax_uid), []).append(i)
    group = _Group()
    for sop, syntaxes in by_sop.items():
        contexts = [build_context(sop, [ts]) for ts in syntaxes]
        contexts.append(build_context(sop, list(NATIVE_SYNTAXES)))
        if group.contexts and len(group.contexts) + len(contexts) > MAX_CONTEXTS:
            group.indices.sort()
            yield group
            group = _Group()
        group.contexts.extend(contexts)
        group.indices.extend(i for indices in syntaxes.values() for i in indices)
    if group.indices:
        group.indices.sort()
        yield group


def _decoded(path: Path) -> Dataset:
    """The data set with its pixel data decompressed, for a peer that only takes native syntaxes."""
    ds = dcmread(path)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress(generate_instance_uid=False)
    return ds


def _refused_context(image: OutgoingImage, assoc: Association) -> SendResult:
    sop = UID(image.sop_class_uid)
    results = {cx.result for cx in assoc.rejected_contexts if cx.abstract_syntax == sop}
    if results and results <= {0x04}:
        why = "the peer accepts none of the proposed transfer syntaxes"
        code: int | None = None
    else:
        why = "the peer rejected the presentation context"
        code = SOP_CLASS_NOT_SUPPORTED
    prefix = describe(code) if code is not None else "Presentation context rejected"
    return SendResult(
        image.image_id,
        delivered=False,
        permanent=True,
        status=code,
        message=f"{prefix}: {why} for {sop.name}",
    )


def _unreadable(image: OutgoingImage, exc: Exception) -> SendResult:
    # str(OSError) names the path, which may carry PHI from the source folder; keep only the kind.
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
    return SendResult(
        image.image_id, delivered=False, permanent=True, message=f"cannot read the file to send: {detail}"
    )


def _connect_problem(host: str, port: int, timeout: float | None) -> str | None:
    """The operating system's reason a TCP connection to host:port fails, or None when it opens."""
    try:
        with socket.create_connection((host, port), timeout=timeout or 10.0):
            return None
    except TimeoutError:
        return f"no TCP answer within {timeout or 10.0:g} s"
    except OSError as exc:  # gaierror (unknown host name) is an OSError too
        return exc.strerror or type(exc).__name__


def _close(assoc: Association) -> None:
    if assoc.is_established:
        assoc.release()
        if assoc.is_established:
            assoc.abort()
