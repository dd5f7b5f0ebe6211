"""fednode.approvals on real SQLite files: lifecycle, prefix lookup, ambiguity, persistence, refusal text."""

from __future__ import annotations

import hashlib

import pytest

from fedcore.errors import NodeStoreError, PlanApprovalError, PlanNotApprovedError
from fedcore.tasks import PlanSource
from fednode.approvals import AUTO_APPROVE_NOTE, PlanApprovals, plan_sha256

SOURCE = "from fedcore.plans import NumpyTrainingPlan\n\nclass LinearPlan(NumpyTrainingPlan):\n    pass\n"
# Two sources whose SHA-256 share their first 8 hex digits (c4e37568), found by a birthday search.
TWIN_A, TWIN_B = "x = 5643\n", "x = 8483\n"


@pytest.fixture
def db(tmp_path):
    return tmp_path / "home" / "node.db"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_first_submission_is_pending_and_keeps_the_source(db):
    store = PlanApprovals(db)
    record = store.submit(SOURCE, "LinearPlan", "researcher-1")
    assert record.sha256 == sha(SOURCE) == PlanSource.from_source("LinearPlan", SOURCE).sha256
    assert (record.status, record.name, record.origin, record.source) == (
        "pending", "LinearPlan", "researcher-1", SOURCE,
    )
    assert record.decided_at is None
    assert store.status(record.sha256) == "pending"
    assert not store.is_approved(SOURCE)
    assert db.is_file()


def test_resubmission_keeps_the_first_record_and_the_decision(db):
    store = PlanApprovals(db)
    first = store.submit(SOURCE, "LinearPlan", "researcher-1")
    store.approve(first.sha256, "read it")
    again = store.submit(SOURCE, "OtherName", "researcher-2")
    assert (again.name, again.origin) == ("LinearPlan", "researcher-1")
    assert (again.status, again.note) == ("approved", "read it")
    assert again.submitted_at == first.submitted_at
    assert len(store.list()) == 1


def test_approve_then_reject_lifecycle(db):
    store = PlanApprovals(db)
    record = store.submit(SOURCE, "LinearPlan", "r")
    approved = store.approve(record.sha256[:8], "reviewed by J. Doe")
    assert (approved.status, approved.note) == ("approved", "reviewed by J. Doe")
    assert approved.decided_at is not None
    assert store.is_approved(SOURCE)
    rejected = store.reject(record.sha256[:12], "revoked: opens sockets")
    assert (rejected.status, rejected.note) == ("rejected", "revoked: opens sockets")
    assert not store.is_approved(SOURCE)
    assert store.status(record.sha256) == "rejected"


def test_one_changed_character_is_a_new_unapproved_plan(db):
    store = PlanApprovals(db)
    store.approve(store.submit(SOURCE, "LinearPlan").sha256)
    edited = SOURCE.replace("pass", "pass ")
    assert store.is_approved(SOURCE)
    assert not store.is_approved(edited)
    assert store.status(sha(edited)) is None
    assert store.submit(edited, "LinearPlan").status == "pending"


def test_unicode_source_digest_is_over_utf8(db):
    source = "# modèle linéaire — ß\nx = 1\n"
    record = PlanApprovals(db).submit(source, "P")
    assert record.sha256 == plan_sha256(source) == sha(source)
    assert PlanApprovals(db).get(record.sha256).source == source


def test_prefix_lookup_accepts_8_or_more_hex_digits_any_case(db):
    store = PlanApprovals(db)
    full = store.submit(SOURCE, "LinearPlan").sha256
    for prefix in (full[:8], full[:12].upper(), f"  {full[:20]} ", full):
        assert store.get(prefix).sha256 == full


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        ("abcdef1", "too short"),
        ("xyz12345", "invalid plan id"),
        ("", "invalid plan id"),
        ("a" * 65, "invalid plan id"),
        ("0" * 8, "no training plan"),
    ],
)
def test_bad_or_unknown_prefix_is_a_clear_error(db, bad, expected):
    store = PlanApprovals(db)
    store.submit(SOURCE, "LinearPlan")
    with pytest.raises(PlanApprovalError, match=expected):
        store.get(bad)
    with pytest.raises(PlanApprovalError, match=expected):
        store.approve(bad)


def test_ambiguous_prefix_lists_every_match(db):
    assert sha(TWIN_A)[:8] == sha(TWIN_B)[:8] and sha(TWIN_A)[:9] != sha(TWIN_B)[:9]
    store = PlanApprovals(db)
    store.submit(TWIN_A, "TwinA")
    store.submit(TWIN_B, "TwinB")
    with pytest.raises(PlanApprovalError, match="ambiguous") as info:
        store.approve(sha(TWIN_A)[:8])
    message = str(info.value)
    assert sha(TWIN_A)[:12] in message and sha(TWIN_B)[:12] in message
    assert "TwinA" in message and "TwinB" in message
    assert store.status(sha(TWIN_A)) == store.status(sha(TWIN_B)) == "pending"  # nothing was decided
    assert store.approve(sha(TWIN_B)[:9]).name == "TwinB"


def test_list_filters_by_status_oldest_first(db):
    store = PlanApprovals(db)
    a = store.submit("a = 1\n", "A")
    b = store.submit("b = 1\n", "B")
    c = store.submit("c = 1\n", "C")
    store.approve(a.sha256)
    store.reject(c.sha256, "no")
    assert [r.name for r in store.list()] == ["A", "B", "C"]
    assert [r.name for r in store.list("approved")] == ["A"]
    assert [r.name for r in store.list("pending")] == ["B"]
    assert [r.name for r in store.list("rejected")] == ["C"]
    assert b.sha256 not in {r.sha256 for r in store.list("approved")}
    with pytest.raises(PlanApprovalError, match=r"unknown plan status 'accepted'.*'pending', 'approved'"):
        store.list("accepted")


def test_decisions_persist_across_reopen(db):
    store = PlanApprovals(db)
    record = store.submit(SOURCE, "LinearPlan", "r")
    store.approve(record.sha256[:8], "ok")
    del store
    reopened = PlanApprovals(db)
    again = reopened.get(record.sha256)
    assert (again.status, again.note, again.source) == ("approved", "ok", SOURCE)
    assert reopened.is_approved(SOURCE)


def test_two_handles_on_one_database_see_each_other(db):
    node, operator = PlanApprovals(db), PlanApprovals(db)
    record = node.submit(SOURCE, "LinearPlan")
    operator.approve(record.sha256[:10])
    assert node.is_approved(SOURCE)


def test_refusal_message_says_how_to_approve(db):
    store = PlanApprovals(db)
    record = store.submit(SOURCE, "LinearPlan")
    message = store.refusal_message(record)
    assert "'LinearPlan'" in message and "not approved" in message
    assert f"`fednode plans approve {record.sha256[:12]}`" in message
    assert f"`fednode plans show {record.sha256[:12]}`" in message
    rejected = store.reject(record.sha256, "uses the network")
    assert "rejected" in store.refusal_message(rejected)
    assert "uses the network" in store.refusal_message(rejected)


def test_require_approved_refuses_until_the_operator_approves(db):
    store = PlanApprovals(db)
    with pytest.raises(PlanNotApprovedError, match="fednode plans approve") as info:
        store.require_approved(SOURCE, "LinearPlan", "r")
    assert sha(SOURCE)[:12] in str(info.value)
    assert store.status(sha(SOURCE)) == "pending"  # recorded for review
    store.approve(sha(SOURCE)[:8])
    assert store.require_approved(SOURCE, "LinearPlan", "r").status == "approved"


def test_approval_is_required_by_default_and_auto_approve_is_recorded(db):
    assert PlanApprovals(db).submit("a = 1\n", "A").status == "pending"
    demo = PlanApprovals(db, auto_approve=True)
    fresh = demo.submit("b = 1\n", "B")
    assert (fresh.status, fresh.note) == ("approved", AUTO_APPROVE_NOTE)
    assert fresh.decided_at is not None
    assert demo.submit("a = 1\n", "A").status == "approved"  # pending before: approved now, with the note
    assert demo.get(sha("a = 1\n")).note == AUTO_APPROVE_NOTE


def test_auto_approve_does_not_override_a_rejection(db):
    store = PlanApprovals(db)
    store.reject(store.submit(SOURCE, "LinearPlan").sha256, "no")
    demo = PlanApprovals(db, auto_approve=True)
    assert demo.submit(SOURCE, "LinearPlan").status == "rejected"
    with pytest.raises(PlanNotApprovedError):
        demo.require_approved(SOURCE, "LinearPlan")


def test_non_str_source_is_refused(db):
    with pytest.raises(PlanApprovalError, match="must be str, got bytes"):
        PlanApprovals(db).submit(SOURCE.encode(), "LinearPlan")


def test_a_file_that_is_not_sqlite_is_a_store_error(tmp_path):
    bogus = tmp_path / "node.db"
    bogus.write_bytes(b"this is not a database" * 100)
    with pytest.raises(NodeStoreError, match="node.db"):
        PlanApprovals(bogus)
