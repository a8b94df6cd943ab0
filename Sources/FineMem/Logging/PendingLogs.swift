/// A header word with a temporary log and a pending bit.
protocol LoggedHeader: Sendable {
    init?(rawValue: UInt64)
    var rawValue: UInt64 { get }
    var logPending: Bool { get }
    var log: TemporaryLog { get }
    var contended: Bool { get }
    func flushed() -> Self?
    func with(contended: Bool) -> Self
}

extension SpanHeader: LoggedHeader {}
extension SectionHeader: LoggedHeader {}

/// A temporary log that this compute node committed and has not yet flushed: the full-log
/// record to write for it, and whether some task has taken the job of flushing it.
///
/// Only the node that committed a log flushes it (recovery does it for a dead, fenced
/// node), and within the node exactly one task at a time holds the job. That task writes
/// the record and clears the pending bit in one doorbell (the WRITE executes first); it
/// may fold the clear into its own next commit on the same header. No other block
/// operation can change a header while its log is pending, so the record write can never
/// land after a newer one.
struct PendingLog: Sendable {
    let recordAddress: RemoteAddress
    let record: UInt64
    /// The header's log sequence of this log: a job finishing late must not touch the
    /// entry of a newer log on the same header.
    let sequence: LogSequence
    var taken: Bool
}

/// What an operation learned about a header before it sends its CAS.
struct PreparedHeader: Sendable {
    /// The value the CAS expects.
    let expected: UInt64
    /// The value to apply the transition to: the header as it will be once its pending log
    /// is flushed (by this batch, or by the flush already in flight).
    let base: UInt64
    /// The WRITE of the record of this node's own queued log, taken over by this operation.
    let flush: Verb?
    /// The sequence of that log.
    let flushedSequence: LogSequence?
    let headerAddress: RemoteAddress
}

/// The pending logs of one compute node on one memory node, by header address.
struct PendingLogTable: Sendable {
    private var logs: [RemoteAddress: PendingLog] = [:]

    var isEmpty: Bool { logs.isEmpty }
    var count: Int { logs.count }

    /// Records a log this node just committed. An entry left for an older log on the same
    /// header is finished (the new commit expected its pending bit clear) and is replaced.
    mutating func add(header: RemoteAddress, recordAddress: RemoteAddress, record: UInt64, sequence: LogSequence, taken: Bool) {
        logs[header] = PendingLog(recordAddress: recordAddress, record: record, sequence: sequence, taken: taken)
    }

    func has(_ header: RemoteAddress) -> Bool { logs[header] != nil }

    /// Whether `header` has a log of this node that no task has taken yet (an operation on
    /// it can fold the flush into its own commit).
    func isQueued(_ header: RemoteAddress) -> Bool { logs[header].map { !$0.taken } ?? false }

    /// Takes the job of flushing `header`'s log if nobody holds it.
    mutating func take(_ header: RemoteAddress) -> PendingLog? {
        guard var log = logs[header], !log.taken else { return nil }
        log.taken = true
        logs[header] = log
        return log
    }

    /// Gives the job back (the CAS that was to clear the bit failed).
    mutating func release(_ header: RemoteAddress, sequence: LogSequence) {
        if logs[header]?.sequence == sequence { logs[header]?.taken = false }
    }

    /// The log is flushed and its pending bit cleared (or recovery owns it).
    mutating func remove(_ header: RemoteAddress, sequence: LogSequence) {
        if logs[header]?.sequence == sequence { logs[header] = nil }
    }
}

/// Decides the expected value, transition base and flush of a CAS on a logged header.
///
/// - Not pending: expect and transform the cached word.
/// - Pending with a queued log of this node: take it; the batch writes its record before
///   the CAS, which expects the pending word and commits on top of the flushed one.
/// - Pending otherwise (another node's log, or this node's flush already in flight):
///   predict that the flush will have landed; a wrong guess costs one failed CAS, whose
///   answer refreshes the cache.
func prepareHeader<Header: LoggedHeader>(
    _ type: Header.Type, cached: UInt64, at address: RemoteAddress, pending: Locked<PendingLogTable>, recordKey: RKey
) -> PreparedHeader {
    guard let header = Header(rawValue: cached), header.logPending, let flushed = header.flushed() else {
        return PreparedHeader(expected: cached, base: cached, flush: nil, flushedSequence: nil, headerAddress: address)
    }
    if let own = pending.withLock({ $0.take(address) }) {
        return PreparedHeader(
            expected: cached, base: flushed.rawValue,
            flush: .writeWord(own.recordAddress, own.record, rkey: recordKey), flushedSequence: own.sequence, headerAddress: address)
    }
    return PreparedHeader(expected: flushed.rawValue, base: flushed.rawValue, flush: nil, flushedSequence: nil, headerAddress: address)
}

/// After the CAS of a prepared header: a taken log is done if the CAS committed, else the
/// job goes back to the table (the caller must see that it is flushed).
func settle(_ prepared: PreparedHeader, exchanged: Bool, pending: Locked<PendingLogTable>) -> Bool {
    guard let sequence = prepared.flushedSequence else { return false }
    pending.withLock { table in
        if exchanged {
            table.remove(prepared.headerAddress, sequence: sequence)
        } else {
            table.release(prepared.headerAddress, sequence: sequence)
        }
    }
    return !exchanged
}
