"""Stamps, version vectors and the last-writer-wins decision (omirror.entry).

The plain tests pin down single behaviours by example. The property tests drive a small
model of replicas of one path:

* a replica holds at most one entry for the path, plus (test-side only) the set of
  version stamps it knows of: the ground truth of causality, kept independently of the
  version vectors under test;
* a *local edit* on replica R makes ``held.successor(next_stamp(clock, held.stamp, R))``,
  or ``first_version(...)`` when nothing is held;
* a *delivery* applies ``decide(local, incoming)``: on TAKE the replica holds the incoming
  entry, on KEEP/ALREADY its own, either way with the vector replaced by
  ``decision.vector``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from omirror.entry import (
    CONFLICT_INFIX,
    Decision,
    Entry,
    Kind,
    Outcome,
    Stamp,
    Vector,
    conflict_name,
    decide,
    dominates,
    first_version,
    merge_vectors,
    next_stamp,
    vector_of,
)
from omirror.paths import is_own_name

PATH = b"srv/www/index.html"
ORIGINS = ("alpha", "beta", "gamma")
FRESH = ("delta", "epsilon", "zeta")
DIGESTS = (b"d0", b"d1", b"d2")

PROPS = settings(max_examples=200, deadline=None)


# --------------------------------------------------------------------------- helpers


def file_at(time_ns: int, origin: str, digest: bytes = b"d0", **attrs: object) -> Entry:
    return first_version(PATH, Kind.FILE, Stamp(time_ns, origin), digest=digest, **attrs)


def edit(held: Entry | None, clock: int, origin: str, kind: Kind = Kind.FILE,
         digest: bytes = b"") -> Entry:
    """A local edit on a replica holding ``held``, exactly as the brief models it."""
    if held is None:
        return first_version(PATH, kind, next_stamp(clock, None, origin), digest=digest)
    return held.successor(next_stamp(clock, held.stamp, origin), kind=kind, digest=digest)


def apply(local: Entry | None, incoming: Entry) -> tuple[Entry, Decision]:
    """What a replica holds after a delivery, and the decision."""
    decision = decide(local, incoming)
    if decision.outcome is Outcome.TAKE:
        return replace(incoming, vector=decision.vector), decision
    assert local is not None
    return replace(local, vector=decision.vector), decision


@dataclass
class Replica:
    name: str
    held: Entry | None = None
    #: Ground truth: stamps of every version this replica's state has seen, directly or
    #: through the history of what it received.
    known: frozenset[Stamp] = frozenset()

    def edit(self, clock: int, kind: Kind = Kind.FILE, digest: bytes = b"") -> Entry:
        entry = edit(self.held, clock, self.name, kind, digest)
        self.held = entry
        self.known = self.known | {entry.stamp}
        return entry

    def receive(self, incoming: Entry, incoming_known: frozenset[Stamp]) -> Decision:
        self.held, decision = apply(self.held, incoming)
        self.known = self.known | incoming_known
        return decision


@dataclass
class Delivery:
    local: Entry | None
    local_known: frozenset[Stamp]
    incoming: Entry
    incoming_known: frozenset[Stamp]
    decision: Decision


@dataclass
class World:
    """Replicas of one path, every version made by an edit, and what happened."""

    unique_digests: bool = False
    replicas: dict[str, Replica] = field(
        default_factory=lambda: {name: Replica(name) for name in ORIGINS})
    #: Every version as its edit made it (vector unmerged).
    versions: list[Entry] = field(default_factory=list)
    #: Ground truth per version: the stamps its writer knew of, itself included.
    known_by: dict[Stamp, frozenset[Stamp]] = field(default_factory=dict)
    deliveries: list[Delivery] = field(default_factory=list)
    #: Digests of losing files reported for a conflict copy, anywhere.
    kept: set[bytes] = field(default_factory=set)
    #: Digests of file contents that a local edit replaced (the user saw and replaced them).
    overwritten: set[bytes] = field(default_factory=set)

    def edit(self, name: str, clock: int, content: tuple[Kind, bytes]) -> Entry:
        kind, digest = content
        if kind is Kind.FILE and self.unique_digests:
            digest = b"%s-%d" % (name.encode(), len(self.versions))
        replica = self.replicas[name]
        if replica.held is not None and replica.held.kind is Kind.FILE:
            self.overwritten.add(replica.held.digest)
        entry = replica.edit(clock, kind, digest)
        self.versions.append(entry)
        self.known_by[entry.stamp] = replica.known
        return entry

    def deliver(self, src: str, dst: str) -> Decision | None:
        source, target = self.replicas[src], self.replicas[dst]
        if source.held is None or src == dst:
            return None
        local, local_known = target.held, target.known
        decision = target.receive(source.held, source.known)
        self.deliveries.append(Delivery(local, local_known, source.held, source.known, decision))
        if decision.loser is not None:
            self.kept.add(decision.loser.digest)
        return decision

    def step(self, step: tuple) -> None:
        if step[0] == "edit":
            _, name, clock, content = step
            self.edit(name, clock, content)
        else:
            _, src, dst = step
            self.deliver(src, dst)

    def sync(self) -> None:
        """Deliver every replica's entry to every other one until nothing changes."""
        for _ in range(10):
            before = {name: r.held for name, r in self.replicas.items()}
            for src in ORIGINS:
                for dst in ORIGINS:
                    self.deliver(src, dst)
            if before == {name: r.held for name, r in self.replicas.items()}:
                return
        raise AssertionError("replicas did not settle")

    def holders(self) -> list[str]:
        return [name for name in ORIGINS if self.replicas[name].held is not None]


def run(history: list[tuple], unique_digests: bool = False) -> World:
    world = World(unique_digests=unique_digests)
    for step in history:
        world.step(step)
    return world


def concurrent_truth(a: frozenset[Stamp], b: frozenset[Stamp]) -> bool:
    return not (a <= b or b <= a)


def all_of(vectors: list[Vector]) -> Vector:
    merged: Vector = ()
    for vector in vectors:
        merged = merge_vectors(merged, vector)
    return merged


# --------------------------------------------------------------------------- strategies

origins = st.sampled_from(ORIGINS)
#: Small times make ties and clocks running behind common; huge ones model a fast peer.
times = st.one_of(st.integers(0, 40), st.integers(0, 2**63))
stamps = st.builds(Stamp, times, origins)
clocks = st.one_of(st.integers(0, 30), st.integers(10**18, 10**18 + 30))
contents = st.one_of(
    st.sampled_from(DIGESTS).map(lambda d: (Kind.FILE, d)),
    st.just((Kind.TOMBSTONE, b"")),
    st.just((Kind.DIR, b"")),
)
edit_steps = st.tuples(st.just("edit"), origins, clocks, contents)
deliver_steps = st.tuples(st.just("deliver"), origins, origins)
histories = st.lists(st.one_of(edit_steps, deliver_steps), max_size=25)


def two_replicas(data: st.DataObject) -> tuple[str, str]:
    a, b, _ = data.draw(st.permutations(ORIGINS))
    return a, b


# --------------------------------------------------------------------------- stamps


def test_stamps_order_by_time_first_then_by_origin() -> None:
    assert Stamp(1, "zulu") < Stamp(2, "alpha")
    assert Stamp(5, "alpha") < Stamp(5, "beta")
    assert Stamp(5, "beta") == Stamp(5, "beta")
    assert str(Stamp(5, "beta")) == "5@beta"


def test_next_stamp_uses_the_change_time_when_it_is_ahead() -> None:
    assert next_stamp(100, Stamp(50, "beta"), "alpha") == Stamp(100, "alpha")
    assert next_stamp(100, None, "alpha") == Stamp(100, "alpha")


def test_next_stamp_beats_the_previous_stamp_when_the_clock_runs_behind() -> None:
    previous = Stamp(1_000, "zulu")
    assert next_stamp(10, previous, "alpha") == Stamp(1_001, "alpha")
    # Same time as the previous one would lose to "zulu" on the origin tie-break.
    assert next_stamp(1_000, previous, "alpha") == Stamp(1_001, "alpha")
    assert next_stamp(1_000, previous, "alpha") > previous


@PROPS
@given(a=stamps, b=stamps, c=stamps)
def test_stamp_order_is_a_total_order_with_ties_broken_by_origin(
        a: Stamp, b: Stamp, c: Stamp) -> None:
    assert [a < b, a == b, a > b].count(True) == 1  # total and trichotomous
    if a <= b and b <= a:
        assert a == b  # antisymmetric
    if a <= b and b <= c:
        assert a <= c  # transitive
    if a.time_ns != b.time_ns:
        assert (a < b) == (a.time_ns < b.time_ns)
    else:
        assert (a < b) == (a.origin < b.origin)
    assert max(a, b) == max(b, a)


@PROPS
@given(previous=st.one_of(st.none(), stamps), clock=times, origin=origins)
def test_next_stamp_beats_the_previous_stamp_whatever_the_clock(
        previous: Stamp | None, clock: int, origin: str) -> None:
    stamp = next_stamp(clock, previous, origin)
    assert stamp.origin == origin
    assert stamp.time_ns >= clock  # never earlier than the change itself
    if previous is None:
        assert stamp.time_ns == clock
    else:
        assert stamp > previous
        assert stamp.time_ns == max(clock, previous.time_ns + 1)


# --------------------------------------------------------------------------- vectors and entries


def test_vector_of_keeps_the_newest_time_per_origin_in_canonical_order() -> None:
    assert vector_of([("beta", 3), ("alpha", 7), ("beta", 9), ("alpha", 2)]) == (
        ("alpha", 7), ("beta", 9))
    assert vector_of({"beta": 1, "alpha": 2}) == vector_of([("alpha", 2), ("beta", 1)])
    assert merge_vectors((("alpha", 1),), (("alpha", 4), ("beta", 2))) == (
        ("alpha", 4), ("beta", 2))


def test_dominates_means_knowing_everything_in_the_other_history() -> None:
    assert dominates((("alpha", 5), ("beta", 2)), (("alpha", 4),))
    assert dominates((("alpha", 5),), (("alpha", 5),))
    assert dominates((("alpha", 5),), ())
    assert not dominates((("alpha", 5),), (("alpha", 6),))
    assert not dominates((("alpha", 5),), (("beta", 1),))


def test_first_version_history_holds_its_own_stamp() -> None:
    entry = file_at(10, "alpha")
    assert entry.vector == (("alpha", 10),)


def test_successor_extends_the_history_and_forgets_the_rename() -> None:
    base = replace(file_at(10, "beta"), moved_from=b"srv/www/old.html", mode=0o644)
    new = base.successor(Stamp(20, "alpha"), digest=b"d9")
    assert new.stamp == Stamp(20, "alpha")
    assert new.vector == (("alpha", 20), ("beta", 10))
    assert new.moved_from is None
    assert new.digest == b"d9"
    assert new.mode == 0o644  # unchanged attributes carry over
    assert base.successor(Stamp(21, "alpha"), moved_from=b"x").moved_from == b"x"


def test_same_content_compares_what_ends_up_on_disk() -> None:
    a = file_at(10, "alpha", mode=0o644, mtime_ns=5, size=3)
    assert a.same_content(replace(a, stamp=Stamp(99, "beta"), vector=()))
    assert not a.same_content(replace(a, digest=b"other"))
    assert not a.same_content(replace(a, mode=0o600))
    assert not a.same_content(replace(a, mtime_ns=6))  # a file's mtime is content
    d = first_version(PATH, Kind.DIR, Stamp(1, "alpha"), mtime_ns=5)
    assert d.same_content(replace(d, mtime_ns=6))  # a directory's is not
    assert not d.same_content(replace(d, kind=Kind.TOMBSTONE))


def test_tombstone_is_a_tombstone() -> None:
    assert first_version(PATH, Kind.TOMBSTONE, Stamp(1, "alpha")).is_tombstone
    assert not file_at(1, "alpha").is_tombstone


# --------------------------------------------------------------------------- decide, by example


def test_a_replica_holding_nothing_takes_what_it_receives() -> None:
    incoming = file_at(10, "alpha")
    assert decide(None, incoming) == Decision(Outcome.TAKE, False, None, incoming.vector)


def test_receiving_the_version_already_held_is_already() -> None:
    entry = file_at(10, "alpha")
    decision = decide(entry, entry)
    assert decision == Decision(Outcome.ALREADY, False, None, entry.vector)


def test_edit_after_receive_is_not_a_conflict() -> None:
    v1 = file_at(10, "alpha", b"d1")
    at_beta, _ = apply(None, v1)
    v2 = edit(at_beta, 20, "beta", digest=b"d2")
    decision = decide(v1, v2)  # alpha, still holding v1, receives beta's edit
    assert decision == Decision(Outcome.TAKE, False, None, v2.vector)


def test_edit_after_receive_wins_even_with_a_clock_far_behind() -> None:
    v1 = file_at(10**18, "gamma", b"d1")  # from a peer whose clock runs far ahead
    at_alpha, _ = apply(None, v1)
    v2 = edit(at_alpha, 5, "alpha", digest=b"d2")
    assert v2.stamp == Stamp(10**18 + 1, "alpha")
    assert decide(v1, v2).outcome is Outcome.TAKE
    assert not decide(v1, v2).concurrent
    assert decide(v2, v1) == Decision(Outcome.KEEP, False, None, v2.vector)


def test_a_replica_that_missed_intermediate_versions_sees_no_conflict() -> None:
    v0 = file_at(10, "beta", b"d0")  # beta holds v0
    at_alpha, _ = apply(None, v0)
    v1 = edit(at_alpha, 20, "alpha", digest=b"d1")
    v2 = edit(v1, 30, "alpha", digest=b"d2")  # the change log only keeps v2
    decision = decide(v0, v2)
    assert decision.outcome is Outcome.TAKE
    assert not decision.concurrent
    assert decision.loser is None


def test_concurrent_edits_keep_the_losing_file_as_a_conflict_copy() -> None:
    base = file_at(10, "gamma", b"d0")
    a = edit(base, 20, "alpha", digest=b"d1")
    b = edit(base, 30, "beta", digest=b"d2")
    at_alpha = decide(a, b)
    at_beta = decide(b, a)
    assert at_alpha == Decision(Outcome.TAKE, True, a, merge_vectors(a.vector, b.vector))
    assert at_beta == Decision(Outcome.KEEP, True, a, merge_vectors(a.vector, b.vector))


def test_concurrent_edits_to_the_same_content_need_no_copy() -> None:
    a = file_at(20, "alpha", b"same")
    b = file_at(30, "beta", b"same")
    decision = decide(a, b)
    assert decision.concurrent and decision.outcome is Outcome.TAKE
    assert decision.loser is None


def test_the_same_conflict_copy_made_on_two_peers_is_not_a_new_conflict() -> None:
    # Both peers derive the same name and content for the copy, and each indexes it as a
    # new local file: concurrent first versions with one digest, so no copy of the copy.
    name = conflict_name(b"index.html", Stamp(20, "alpha"))
    on_beta = first_version(name, Kind.FILE, Stamp(31, "beta"), digest=b"d1")
    on_gamma = first_version(name, Kind.FILE, Stamp(32, "gamma"), digest=b"d1")
    decision = decide(on_beta, on_gamma)
    assert decision.concurrent
    assert decision.loser is None


def test_an_edit_losing_to_a_concurrent_delete_is_kept_as_a_copy() -> None:
    base = file_at(10, "gamma", b"d0")
    edited = edit(base, 20, "alpha", digest=b"d1")
    deleted = edit(base, 30, "beta", kind=Kind.TOMBSTONE)
    decision = decide(edited, deleted)
    assert decision.outcome is Outcome.TAKE and decision.concurrent
    assert decision.loser == edited


def test_a_delete_losing_to_a_concurrent_edit_needs_no_copy() -> None:
    base = file_at(10, "gamma", b"d0")
    deleted = edit(base, 20, "alpha", kind=Kind.TOMBSTONE)
    edited = edit(base, 30, "beta", digest=b"d1")
    decision = decide(deleted, edited)
    assert decision.outcome is Outcome.TAKE and decision.concurrent
    assert decision.loser is None


def test_a_directory_losing_a_conflict_is_not_copied() -> None:
    made_dir = first_version(PATH, Kind.DIR, Stamp(20, "alpha"))
    made_file = file_at(30, "beta", b"d1")
    assert decide(made_dir, made_file).loser is None
    # ... while a file losing to a concurrent directory is.
    made_dir_later = first_version(PATH, Kind.DIR, Stamp(40, "gamma"))
    assert decide(made_file, made_dir_later).loser == made_file


def test_a_stale_version_arriving_after_a_newer_one_is_ignored_silently() -> None:
    v1 = file_at(10, "alpha", b"d1")
    v2 = edit(v1, 20, "alpha", digest=b"d2")
    assert decide(v2, v1) == Decision(Outcome.KEEP, False, None, v2.vector)


# --------------------------------------------------------------------------- conflict names


def test_conflict_name_is_named_after_the_losing_stamp() -> None:
    assert conflict_name(b"index.html", Stamp(1234, "alpha")) == (
        b"index.html.omirror-conflict-alpha-1234")
    assert conflict_name(b"x", Stamp(1, "a/b")) == b"x.omirror-conflict-a_b-1"


def test_own_names_are_recognised_but_conflict_copies_are_user_data() -> None:
    assert is_own_name(b".omirror-tmp-123")
    assert is_own_name(b".omirror")
    assert not is_own_name(b"index.html")
    assert not is_own_name(conflict_name(b"index.html", Stamp(1, "alpha")))


hostnames = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-.", min_size=1, max_size=12)
names = st.binary(min_size=1, max_size=40).filter(lambda n: b"/" not in n and b"\0" not in n)


@PROPS
@given(name=names, a=st.builds(Stamp, times, hostnames), b=st.builds(Stamp, times, hostnames),
       digest=st.sampled_from(DIGESTS))
def test_conflict_name_is_deterministic_and_differs_for_different_stamps(
        name: bytes, a: Stamp, b: Stamp, digest: bytes) -> None:
    # Only the loser's stamp and the name count: two peers holding different entries
    # with that stamp (different vectors, say) still name the copy the same way.
    loser_here = file_at(a.time_ns, a.origin, digest)
    loser_there = replace(loser_here, vector=(("zzz", 1),), mtime_ns=42)
    assert conflict_name(name, loser_here.stamp) == conflict_name(name, loser_there.stamp)
    assert conflict_name(name, a) == conflict_name(name, Stamp(a.time_ns, a.origin))
    assert conflict_name(name, a).startswith(name + CONFLICT_INFIX)
    assert (conflict_name(name, a) == conflict_name(name, b)) == (a == b)
    assert is_own_name(conflict_name(name, a)) == is_own_name(name)


# --------------------------------------------------------------------------- properties of decide


@PROPS
@given(history=histories, data=st.data())
def test_every_replica_converges_on_the_largest_stamp_whatever_the_order(
        history: list[tuple], data: st.DataObject) -> None:
    world = run(history)
    versions = world.versions
    assume(versions)
    winner = max(versions, key=lambda e: e.stamp)
    everything = all_of([v.vector for v in versions])
    # Versions no other version knows of: their writes must not vanish silently.
    maximal_files = [
        v for v in versions
        if v.kind is Kind.FILE and v.stamp != winner.stamp
        and not any(v.stamp in world.known_by[w.stamp] for w in versions if w.stamp != v.stamp)
    ]
    for i, name in enumerate(FRESH):
        deliveries = list(versions)
        if i == len(FRESH) - 1:  # the last one gets duplicates too
            deliveries += data.draw(st.lists(st.sampled_from(versions), min_size=1,
                                             max_size=len(versions) + 1))
        order = data.draw(st.permutations(deliveries))
        replica = Replica(name)
        kept: set[bytes] = set()
        for version in order:
            decision = replica.receive(version, world.known_by[version.stamp])
            if decision.loser is not None:
                kept.add(decision.loser.digest)
                assert decision.loser.stamp < winner.stamp
        assert replica.held is not None
        assert replica.held.stamp == winner.stamp
        assert replica.held.same_content(winner) and replica.held.kind is winner.kind
        assert replica.held == replace(winner, vector=everything)
        for version in maximal_files:
            assert version.digest in kept or (
                winner.kind is Kind.FILE and winner.digest == version.digest), version


@PROPS
@given(history=histories, data=st.data())
def test_convergence_holds_for_entries_relayed_with_merged_histories(
        history: list[tuple], data: st.DataObject) -> None:
    # Peers relay what they hold, whose vector has absorbed what they received.
    world = run(history)
    relayed = world.versions + [world.replicas[n].held for n in world.holders()]
    assume(relayed)
    winner = max(world.versions, key=lambda e: e.stamp)
    everything = all_of([e.vector for e in relayed])
    held = set()
    for _ in FRESH:
        entry: Entry | None = None
        for incoming in data.draw(st.permutations(relayed + relayed[:3])):
            entry, _ = apply(entry, incoming)
        assert entry is not None
        held.add(entry)
    assert held == {replace(winner, vector=everything)}


@PROPS
@given(history=histories, data=st.data())
def test_delivering_the_same_entry_twice_changes_nothing_the_second_time(
        history: list[tuple], data: st.DataObject) -> None:
    world = run(history)
    candidates = [(v, world.known_by[v.stamp]) for v in world.versions]
    candidates += [(world.replicas[n].held, world.replicas[n].known) for n in world.holders()]
    assume(candidates)
    incoming, incoming_known = data.draw(st.sampled_from(candidates))
    replica = world.replicas[data.draw(origins)]
    first = replica.receive(incoming, incoming_known)
    held = replica.held
    second = replica.receive(incoming, incoming_known)
    assert replica.held == held
    assert second.vector == held.vector
    assert not second.concurrent
    assert second.loser is None
    if first.outcome is Outcome.KEEP:
        # A version that lost stays lost, but is now known: no second conflict copy.
        assert second.outcome is Outcome.KEEP
    else:
        assert second.outcome is Outcome.ALREADY


@PROPS
@given(history=histories)
def test_concurrency_is_reported_exactly_when_neither_version_knew_the_other(
        history: list[tuple]) -> None:
    world = run(history)
    world.sync()
    for d in world.deliveries:
        if d.local is None:
            assert d.decision.outcome is Outcome.TAKE and not d.decision.concurrent
            continue
        if d.local.stamp == d.incoming.stamp:
            assert d.decision.outcome is Outcome.ALREADY
            assert d.local.same_content(d.incoming)  # one stamp, one version
            continue
        assert d.decision.concurrent == concurrent_truth(d.local_known, d.incoming_known)
        newer = d.incoming.stamp > d.local.stamp
        assert d.decision.outcome is (Outcome.TAKE if newer else Outcome.KEEP)
        if d.decision.loser is not None:
            assert d.decision.concurrent
            assert d.decision.loser == (d.local if newer else d.incoming)


@PROPS
@given(history=histories, data=st.data())
def test_an_edit_made_after_receiving_a_version_wins_and_is_never_concurrent(
        history: list[tuple], data: st.DataObject) -> None:
    world = run(history)
    assume(world.holders())
    src = data.draw(st.sampled_from(world.holders()))
    dst = data.draw(st.sampled_from([n for n in ORIGINS if n != src]))
    received = world.replicas[src].held
    assert received is not None
    world.deliver(src, dst)
    # A clock anywhere, often behind the received version's stamp.
    clock = data.draw(st.one_of(st.integers(0, received.stamp.time_ns), clocks))
    new = world.edit(dst, clock, data.draw(contents))
    assert new.stamp > received.stamp
    assert decide(received, new) == Decision(
        Outcome.TAKE, False, None, merge_vectors(received.vector, new.vector))
    assert decide(new, received) == Decision(
        Outcome.KEEP, False, None, merge_vectors(received.vector, new.vector))
    # The sender, still holding what it sent, fast-forwards to the edit.
    back = world.deliver(dst, src)
    assert back is not None
    assert back.outcome is Outcome.TAKE and not back.concurrent and back.loser is None


@PROPS
@given(history=histories, data=st.data())
def test_a_replica_that_missed_intermediate_versions_never_sees_a_conflict(
        history: list[tuple], data: st.DataObject) -> None:
    world = run(history)
    a, b = two_replicas(data)
    if world.replicas[b].held is None:
        world.edit(b, data.draw(clocks), data.draw(contents))
    world.deliver(b, a)  # a derives from b's v0 ...
    for _ in range(data.draw(st.integers(2, 5))):  # ... and writes several times
        world.edit(a, data.draw(clocks), data.draw(contents))
    decision = world.deliver(a, b)  # b, still at v0, only ever sees the last one
    assert decision is not None
    assert decision.outcome is Outcome.TAKE
    assert not decision.concurrent
    assert decision.loser is None


@PROPS
@given(history=histories, data=st.data())
def test_edits_from_one_base_on_two_replicas_are_concurrent_and_resolve_symmetrically(
        history: list[tuple], data: st.DataObject) -> None:
    world = run(history)
    bases = [(None, frozenset())] + [(v, world.known_by[v.stamp]) for v in world.versions]
    base, base_known = data.draw(st.sampled_from(bases))
    a, b = two_replicas(data)
    ra, rb = Replica(a), Replica(b)
    if base is not None:
        ra.receive(base, base_known)
        rb.receive(base, base_known)
    for replica in (ra, rb):
        for _ in range(data.draw(st.integers(1, 3))):
            kind, digest = data.draw(contents)
            replica.edit(data.draw(clocks), kind, digest)
    ea, eb = ra.held, rb.held
    assert ea is not None and eb is not None

    at_a = decide(ea, eb)  # a receives b's version
    at_b = decide(eb, ea)  # b receives a's version
    assert at_a.concurrent and at_b.concurrent
    winner, smaller = (ea, eb) if ea.stamp > eb.stamp else (eb, ea)
    assert (eb if at_a.outcome is Outcome.TAKE else ea) == winner
    assert (ea if at_b.outcome is Outcome.TAKE else eb) == winner
    assert at_a.loser == at_b.loser
    copy_needed = smaller.kind is Kind.FILE and not (
        winner.kind is Kind.FILE and winner.digest == smaller.digest)
    assert at_a.loser == (smaller if copy_needed else None)
    assert at_a.vector == at_b.vector == merge_vectors(ea.vector, eb.vector)


@PROPS
@given(history=histories)
def test_held_histories_contain_their_own_stamp_and_nothing_newer(history: list[tuple]) -> None:
    world = World()
    for step in [*history, None]:
        if step is None:
            world.sync()
        else:
            world.step(step)
        for replica in world.replicas.values():
            entry = replica.held
            if entry is None:
                continue
            assert entry.vector == vector_of(entry.vector)  # canonical
            assert (entry.stamp.origin, entry.stamp.time_ns) in entry.vector
            assert max(t for _, t in entry.vector) <= entry.stamp.time_ns


@PROPS
@pytest.mark.parametrize("unique_digests", [True, False])
@given(history=histories)
def test_no_write_is_lost_silently(history: list[tuple], unique_digests: bool) -> None:
    # Every file version that was ever written is, once all peers have synced, either
    # the winner, or was replaced by a later local edit that saw it, or was reported
    # somewhere as a loser to keep as a conflict copy (copies are mirrored data).
    world = run(history, unique_digests=unique_digests)
    world.sync()
    finals = {r.held for r in world.replicas.values()}
    if not world.versions:
        assert finals == {None}
        return
    winner = max(world.versions, key=lambda e: e.stamp)
    assert {e.stamp for e in finals} == {winner.stamp}
    assert len(finals) == 1
    for version in world.versions:
        if version.kind is not Kind.FILE:
            continue
        assert (version.digest in world.kept or version.digest in world.overwritten
                or (winner.kind is Kind.FILE and winner.digest == version.digest)), version


def test_an_entry_without_a_vector_still_counts_its_own_stamp() -> None:
    from omirror.entry import Entry, Kind, Stamp, decide

    base = Entry(b"p", Kind.FILE, Stamp(1, "alpha"), digest=b"0")
    ours = Entry(b"p", Kind.FILE, Stamp(5, "beta"), digest=b"b")
    theirs = Entry(b"p", Kind.FILE, Stamp(7, "gamma"), digest=b"g")
    assert decide(base, theirs).concurrent  # neither knew the other
    decision = decide(ours, theirs)
    assert decision.concurrent and decision.loser == ours
    assert dict(decision.vector) == {"beta": 5, "gamma": 7}


def test_conflict_names_fit_in_a_file_name() -> None:
    from omirror.entry import Stamp, conflict_name
    from omirror.paths import NAME_MAX

    name = conflict_name(b"x" * 250, Stamp(1_700_000_000_000_000_000, "host.example.org"))
    assert len(name) <= NAME_MAX and name.endswith(b"-host.example.org-1700000000000000000")
    assert conflict_name(b"a", Stamp(1, "\ud800")).endswith(b"-1")


@pytest.mark.parametrize("origin", ["a" * 255, "x\0y", "../../etc", "h/\n\x1b[31m"])
def test_a_conflict_name_from_any_origin_is_one_safe_name_that_fits(origin: str) -> None:
    """An origin comes from a peer: a 255-character one made names longer than NAME_MAX
    (the copy could never be written, and the entry failed for ever), a NUL or a '/'
    made names no file system takes. Whatever it holds, the name is one component of
    safe characters, the same on every peer."""
    from omirror.entry import Stamp, conflict_name
    from omirror.paths import NAME_MAX

    name = conflict_name(b"f" * 255, Stamp((1 << 62) - 1, origin))
    assert len(name) <= NAME_MAX
    assert b"/" not in name and b"\0" not in name and name.isascii()
    assert all(0x20 < c < 0x7f for c in name)
    assert name == conflict_name(b"f" * 255, Stamp((1 << 62) - 1, origin))
    assert conflict_name(b"f", Stamp(1, origin)) != conflict_name(b"f", Stamp(1, origin + "z"))
