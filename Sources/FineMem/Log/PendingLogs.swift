// The write-ahead log of one compute node on one memory node.
//
// Rules (DESIGN.md section 5, "Flush"), each kept by the code below and checked from
// outside by the pool inspector:
//
// - L1 (commit point). A block operation commits its temporary log (offset, size code,
//   owner, sequence) in the same CAS that changes the bitmap, and sets the header's
//   pending bit; no other block operation commits on that header while the bit is set.
// - L2 (exclusion of the record). While a header's log is pending, nobody but its
//   committer (or recovery, after fencing the committer) writes the record the log
//   describes: other operations on that header wait, a span covered by a section's
//   pending log cannot enter chunk mode (`SectionHeader.pendingLogCovers`), and a
//   multi-section block's sections are all pending until its record is written.
// - L3 (records never go backwards). The commit reads the block's record in its own
//   doorbell, after the CAS; the flush replaces exactly that value by CAS, before it
//   clears the bit in the same doorbell. A flush that comes late (a stalled node) finds
//   another value and changes nothing; its header CAS, expecting its own pending word,
//   fails too.
// - L4 (flush). Only the committer clears the bit, after the record (one doorbell, the
//   record CAS first): by `flush`, or folded into its next commit on the same header. A
//   live node never abandons a flush.
// - L5 (multi-section). A multi-section claim or release announces itself in an intent
//   record first (same doorbell, before the CASes) and logs on every section header;
//   its record is written once, before the bits are cleared (`flushRun`), and the intent
//   is cleared last. Between any two verbs the intent names the node in the middle of it.
// - L6 (intermediate states name their owner). A span being opened is `opening` with
//   the opener in its log's owner field before its section entry is flipped (the mark is
//   the right to flip it); a span being closed is `closing` with the closer there until
//   its entry is back to empty. So no chunk-mode entry is ever over a `closed` span.

/// A temporary log that this compute node committed and has not yet flushed: the full-log
/// record to write for it, and whether some task has taken the job of flushing it.
///
/// Only the node that committed a log flushes it (recovery does it for a dead, fenced
/// node), and within the node exactly one task at a time holds the job. That task updates
/// the record and clears the pending bit in one doorbell (the record CAS executes first);
/// it may fold the clear into its own next commit on the same header. No other block
/// operation can change a header while its log is pending, no span under a section's
/// pending log can enter chunk mode, and the record update is a CAS from the value read
/// right after the commit: a record never goes backwards.
package struct PendingLog: Sendable {
    package let recordAddress: RemoteAddress
    /// The record; it carries the sequence of the header that committed the block (the
    /// first section's, for a multi-section block).
    package let record: FullLogRecord
    /// The record's value right after the commit (read in its doorbell): what the flush's
    /// CAS expects to replace.
    package let recordBefore: UInt64
    /// The header's log sequence of this log (what a flush expects to find pending).
    package let sequence: LogSequence
    /// Which entry of the table this is, unique for the table's life: a job finishing late
    /// must not touch the entry of a newer log on the same header, and the 6-bit sequence
    /// cannot tell them apart (64 commits on one header take some 40 us).
    package let serial: UInt64
    package var taken: Bool
}

/// The pending logs of one compute node on one memory node, by header.
struct PendingLogTable: Sendable {
    private var logs = Logs()
    /// Headers with an upkeep item queued that no worker has picked up yet: one item per
    /// header is enough, since the worker flushes whatever log is pending when it picks the
    /// item up, and a commit after that queues a new one (`queueUpkeep`,
    /// `HeaderCache.pickUpkeep`).
    private var upkeepQueued = IntMap<Bool>()
    /// The serial of the next entry.
    private var nextSerial: UInt64 = 0

    /// The logs by header (`HeaderSlot.key`), in a map that needs no `Hasher`.
    private struct Logs: Sendable {
        var map = IntMap<PendingLog>()
        subscript(slot: HeaderSlot) -> PendingLog? {
            get { map[slot.key] }
            set { map[slot.key] = newValue }
        }
    }

    /// Records a log this node just committed, and answers its entry. An entry left for
    /// an older log on the same header is finished (the new commit expected its pending
    /// bit clear) and is replaced.
    @discardableResult
    mutating func add(
        _ slot: HeaderSlot, recordAddress: RemoteAddress, record: FullLogRecord, recordBefore: UInt64, sequence: LogSequence, taken: Bool
    ) -> PendingLog {
        nextSerial += 1
        let log = PendingLog(recordAddress: recordAddress, record: record, recordBefore: recordBefore, sequence: sequence, serial: nextSerial, taken: taken)
        logs[slot] = log
        return log
    }

    func has(_ slot: HeaderSlot) -> Bool { logs[slot] != nil }

    /// Notes an upkeep item for `slot`'s log; answers the log's serial when none is queued
    /// yet (the caller queues one for it), nil when one is (or there is no log).
    mutating func queueUpkeep(_ slot: HeaderSlot) -> UInt64? {
        guard upkeepQueued[slot.key] == nil, let log = logs[slot] else { return nil }
        upkeepQueued[slot.key] = true
        return log.serial
    }

    /// The log of this node on `slot` that a header in use shows: one that replaced the
    /// log with `serial` (the one an upkeep item was queued for), or one an operation holds
    /// to fold into its commit. Nil when the header has gone without an operation since.
    func logInUse(_ slot: HeaderSlot, queuedFor serial: UInt64) -> PendingLog? {
        guard let log = logs[slot], log.taken || log.serial != serial else { return nil }
        return log
    }

    /// A worker picked up the upkeep item of `slot` (before it looks at the log).
    mutating func upkeepPicked(_ slot: HeaderSlot) { upkeepQueued[slot.key] = nil }

    /// Whether `slot` has a log of this node that no task has taken yet (an operation on
    /// it can fold the flush into its own commit).
    func isQueued(_ slot: HeaderSlot) -> Bool { logs[slot].map { !$0.taken } ?? false }

    /// Takes the job of flushing `slot`'s log if nobody holds it.
    mutating func take(_ slot: HeaderSlot) -> PendingLog? {
        guard var log = logs[slot], !log.taken else { return nil }
        log.taken = true
        logs[slot] = log
        return log
    }

    /// Gives the job back (the CAS that was to clear the bit did not happen).
    mutating func release(_ slot: HeaderSlot, serial: UInt64) {
        if logs[slot]?.serial == serial {
            precondition(logs[slot]!.taken, "a log of \(slot) was given back that nobody had taken")
            logs[slot]?.taken = false
        }
    }

    /// The log is flushed and its pending bit cleared (or recovery owns it).
    mutating func remove(_ slot: HeaderSlot, serial: UInt64) {
        if logs[slot]?.serial == serial { logs[slot] = nil }
    }

    /// Calls `body` with the header of every entry.
    func forEachSlot(_ body: (HeaderSlot) -> Void) {
        for (key, _) in logs.map { body(HeaderSlot(key: key)) }
    }

    /// Every entry's record names `owner` and records an allocation or a free of a block
    /// whose first chunk is where the record goes.
    func checkInvariants(owner: OwnerID) {
        for (slot, log) in logs.map {
            precondition(log.record.owner == owner, "pending log of \(slot) records owner \(log.record.owner), not \(owner)")
            precondition(log.record != .never, "pending log of \(slot) has an empty record")
        }
    }
}

/// What an update learned about a word before it sends its CAS.
struct PreparedWord: Sendable {
    /// The value the CAS expects.
    let expected: UInt64
    /// The value the transition applies to: for a block operation, the header as it will
    /// be once its pending log is flushed (by this batch, or by the flush in flight).
    let base: UInt64
    /// This node's own queued log on the header, taken over by this operation: its record
    /// CAS rides in the doorbell before the commit CAS.
    let foldedLog: (slot: HeaderSlot, log: PendingLog)?

    static func plain(_ word: UInt64) -> PreparedWord { PreparedWord(expected: word, base: word, foldedLog: nil) }
}

/// The settle rules: how a block operation's commit treats the header's pending log, and
/// what becomes of a log it folded in (`LogHandling.commit`).
extension PendingLogTable {
    /// Decides the expected word and the transition's base of a block operation's header
    /// `word`, whose flushed self is `flushed` (nil: no log pending). This node's own
    /// queued log is taken to fold in (its record CAS rides before the commit CAS, which
    /// expects the pending word); anyone else's is predicted flushed (the CAS expects the
    /// flushed word). The caller holds the cache's lock.
    mutating func prepare(_ slot: HeaderSlot, _ word: UInt64, flushed: UInt64?) -> PreparedWord {
        guard let flushed else { return .plain(word) }
        if let own = take(slot) {
            return PreparedWord(expected: word, base: flushed, foldedLog: (slot, own))
        }
        return PreparedWord(expected: flushed, base: flushed, foldedLog: nil)
    }

    /// After the CAS of a prepared word: a folded log is flushed if the CAS committed;
    /// otherwise it goes back to the table (released) and someone must flush it. The
    /// caller holds the cache's lock, and hands a log given back to the link's owner once
    /// it has let go of it.
    mutating func settle(_ prepared: PreparedWord, committed: Bool) {
        guard let (slot, log) = prepared.foldedLog else { return }
        if committed { remove(slot, serial: log.serial) } else { release(slot, serial: log.serial) }
    }
}
