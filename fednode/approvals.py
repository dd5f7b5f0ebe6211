"""Training-plan approvals: a node runs only plan sources its operator approved, identified by SHA-256.

A plan is the exact text of its source module; its id is ``sha256(source.encode("utf-8"))`` (the same
digest as :class:`fedcore.tasks.PlanSource`), so changing one character makes a new plan that needs a new
approval. The first task carrying an unknown plan records it as ``pending`` with its source, so the
operator can read it (``fednode plans show``) before deciding; the task is refused with a message saying
exactly which command approves it. ``approve``/``reject`` may be repeated and reversed (revoking an
approval is a ``reject``). A plan can also be decided before any task brings it, from its file
(:meth:`PlanApprovals.decide_source` with the source :mod:`fednode.plan_files` reads as a server sends it).

``auto_approve`` (``fednode run --auto-approve``) is for demos only: a newly seen plan is recorded as
approved with the note ``"auto-approved (--auto-approve)"``, so the history says how it got approved.
A plan the operator rejected stays rejected even then.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedcore.errors import PlanApprovalError, PlanNotApprovedError
from fednode import node_db

__all__ = ["AUTO_APPROVE_NOTE", "MIN_PREFIX", "STATUSES", "PlanApprovals", "PlanRecord", "plan_sha256"]

STATUSES: tuple[str, ...] = ("pending", "approved", "rejected")
AUTO_APPROVE_NOTE = "auto-approved (--auto-approve)"
#: Fewest hex digits accepted as a plan id prefix.
MIN_PREFIX = 8
#: Hex digits of a plan id shown in listings and commands.
SHORT = 12

_HEX = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True)
class PlanRecord:
    """One training plan source as this node knows it."""

    sha256: str
    name: str  # the plan's class name, as the task announced it
    origin: str  # who sent it first (experiment / researcher id), for the operator's information
    status: str  # one of STATUSES
    note: str  # the operator's note on the last decision
    source: str = field(repr=False)  # the full text; long
    submitted_at: float  # unix time it was first seen
    decided_at: float | None  # unix time of the last approve/reject, None while pending

    @property
    def short_id(self) -> str:
        """The first 12 hex digits of the SHA-256, enough to name the plan in commands."""
        return self.sha256[:SHORT]


def plan_sha256(source: str) -> str:
    """The plan id: SHA-256 (hex) of the source's UTF-8 bytes."""
    if not isinstance(source, str):
        raise PlanApprovalError(f"a plan source must be str, got {type(source).__name__}")
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


class PlanApprovals:
    """The approval store in the node database at ``db_path`` (see :mod:`fednode.node_db`)."""

    def __init__(self, db_path: str | os.PathLike[str], auto_approve: bool = False) -> None:
        self.db_path = Path(db_path)
        self.auto_approve = bool(auto_approve)
        with node_db.connect(self.db_path):
            pass  # create and migrate now, so a bad database fails at startup

    def submit(self, source: str, name: str, origin: str = "") -> PlanRecord:
        """Record ``source`` if new (pending, or approved under ``auto_approve``) and return its record.

        A plan seen before keeps its record (first name and origin, current decision), except that
        ``auto_approve`` approves it if it is still pending.
        """
        sha = plan_sha256(source)
        now = time.time()
        if self.auto_approve:
            status, note, decided = "approved", AUTO_APPROVE_NOTE, now
        else:
            status, note, decided = "pending", "", None
        with node_db.connect(self.db_path) as conn, node_db.transaction(conn):
            conn.execute(
                "INSERT OR IGNORE INTO plans (sha256, name, origin, source, status, note, submitted_at,"
                " decided_at) VALUES (?,?,?,?,?,?,?,?)",
                (sha, str(name), str(origin), source, status, note, now, decided),
            )
            if self.auto_approve:
                conn.execute(
                    "UPDATE plans SET status = 'approved', note = ?, decided_at = ? "
                    "WHERE sha256 = ? AND status = 'pending'",
                    (AUTO_APPROVE_NOTE, now, sha),
                )
        return self.get(sha)

    def approve(self, sha_or_prefix: str, note: str = "") -> PlanRecord:
        """Mark the plan approved (with the operator's ``note``) and return its record."""
        return self._decide(sha_or_prefix, "approved", note)

    def reject(self, sha_or_prefix: str, note: str = "") -> PlanRecord:
        """Mark the plan rejected (also revokes an approval) and return its record."""
        return self._decide(sha_or_prefix, "rejected", note)

    def decide_source(self, source: str, status: str, note: str = "", name: str = "",
                      origin: str = "") -> PlanRecord:
        """Record ``source`` if new and mark it ``status`` ('approved' or 'rejected'), in one transaction.

        For a plan approved ahead of any task (``fednode plans approve --file``): the first task bringing
        this exact source then finds the decision. A plan already known keeps its name and origin.
        """
        if status not in ("approved", "rejected"):
            raise PlanApprovalError(f"a decision is 'approved' or 'rejected', got {status!r}")
        sha = plan_sha256(source)
        now = time.time()
        with node_db.connect(self.db_path) as conn, node_db.transaction(conn):
            conn.execute(
                "INSERT OR IGNORE INTO plans (sha256, name, origin, source, status, note, submitted_at,"
                " decided_at) VALUES (?,?,?,?,?,?,?,?)",
                (sha, str(name), str(origin), source, status, str(note), now, now),
            )
            conn.execute("UPDATE plans SET status = ?, note = ?, decided_at = ? WHERE sha256 = ?",
                         (status, str(note), now, sha))
        return self.get(sha)

    def status(self, sha: str) -> str | None:
        """``'approved'``, ``'rejected'`` or ``'pending'`` for the full SHA-256 ``sha``; None if unseen."""
        with node_db.connect(self.db_path) as conn:
            row = conn.execute("SELECT status FROM plans WHERE sha256 = ?", (str(sha).lower(),)).fetchone()
        return None if row is None else row[0]

    def is_approved(self, source: str) -> bool:
        """Whether this exact source text is approved."""
        return self.status(plan_sha256(source)) == "approved"

    def list(self, status: str | None = None) -> list[PlanRecord]:
        """Every known plan, or those with ``status``, oldest first."""
        with node_db.connect(self.db_path) as conn:
            if status is None:
                rows = conn.execute(f"SELECT {_COLUMNS} FROM plans ORDER BY submitted_at, sha256").fetchall()
            else:
                rows = conn.execute(
                    f"SELECT {_COLUMNS} FROM plans WHERE status = ? ORDER BY submitted_at, sha256",
                    (_check_status(status),),
                ).fetchall()
        return [PlanRecord(*row) for row in rows]

    def get(self, sha_or_prefix: str) -> PlanRecord:
        """The plan whose SHA-256 is, or starts with, ``sha_or_prefix`` (≥ 8 hex digits, any case).

        Raises:
            PlanApprovalError: not hex, too short, unknown, or ambiguous (the message lists the matches).
        """
        prefix = _check_prefix(sha_or_prefix)
        with node_db.connect(self.db_path) as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM plans WHERE substr(sha256, 1, ?) = ? ORDER BY sha256 LIMIT 11",
                (len(prefix), prefix),
            ).fetchall()
        if not rows:
            raise PlanApprovalError(
                f"no training plan {prefix!r} on this node; `fednode plans list` shows the known ones "
                f"(a plan appears there once a task has brought it, or once approved from its file with "
                f"`fednode plans approve --file PLAN.py`)"
            )
        if len(rows) > 1:
            matches = "; ".join(f"{row[0][:SHORT + 4]} {row[1]} ({row[3]})" for row in rows[:10])
            more = " and more" if len(rows) > 10 else ""
            raise PlanApprovalError(
                f"plan id prefix {prefix!r} is ambiguous, it matches: {matches}{more}; give more hex digits"
            )
        return PlanRecord(*rows[0])

    def require_approved(self, source: str, name: str, origin: str = "") -> PlanRecord:
        """Submit ``source`` and return its record if approved, else raise with :meth:`refusal_message`.

        Raises:
            PlanNotApprovedError: the plan is pending or rejected on this node.
        """
        record = self.submit(source, name, origin)
        if record.status != "approved":
            raise PlanNotApprovedError(self.refusal_message(record))
        return record

    def refusal_message(self, record: PlanRecord) -> str:
        """What the researcher reads when a task is refused: why, and how the node operator approves it."""
        if record.status == "rejected":
            why = "was rejected by the node operator" + (f" (note: {record.note})" if record.note else "")
        else:
            why = "is waiting for the node operator's review"
        return (
            f"training plan {record.name!r} (sha256 {record.short_id}) is not approved on this node: "
            f"it {why}. "
            f"The node operator can read it with `fednode plans show {record.short_id}` and approve it with "
            f"`fednode plans approve {record.short_id}`; then send the task again."
        )

    def _decide(self, sha_or_prefix: str, status: str, note: str) -> PlanRecord:
        record = self.get(sha_or_prefix)
        with node_db.connect(self.db_path) as conn:
            conn.execute(
                "UPDATE plans SET status = ?, note = ?, decided_at = ? WHERE sha256 = ?",
                (status, str(note), time.time(), record.sha256),
            )
        return self.get(record.sha256)


_COLUMNS = "sha256, name, origin, status, note, source, submitted_at, decided_at"


def _check_status(status: str) -> str:
    if status not in STATUSES:
        raise PlanApprovalError(f"unknown plan status {status!r}, expected one of {list(STATUSES)}")
    return status


def _check_prefix(sha_or_prefix: str) -> str:
    if not isinstance(sha_or_prefix, str):
        raise PlanApprovalError(f"a plan id must be a hex str, got {type(sha_or_prefix).__name__}")
    prefix = sha_or_prefix.strip().lower()
    if not _HEX.fullmatch(prefix) or len(prefix) > 64:
        raise PlanApprovalError(
            f"invalid plan id {sha_or_prefix!r}: expected the plan's SHA-256 or a prefix of it "
            f"({MIN_PREFIX}-64 hex digits)"
        )
    if len(prefix) < MIN_PREFIX:
        raise PlanApprovalError(
            f"plan id prefix {sha_or_prefix!r} is too short: give at least {MIN_PREFIX} hex digits"
        )
    return prefix
