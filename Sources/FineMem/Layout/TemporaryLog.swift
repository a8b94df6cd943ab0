/// The "last operation" a header carries next to its bitmap, committed by the same CAS.
///
/// `offset` and `sizeCode` locate the block inside the header's range (chunks of a span,
/// or spans of a section); whether the operation allocated or freed follows from the
/// header's bitmap over that range (all set: allocated, all clear: freed), because no
/// other block operation can change the header while the log is pending.
package struct TemporaryLog: Hashable, Sendable {
    package var offset: UInt8
    package var sizeCode: UInt8
    package var owner: OwnerID
    package var sequence: LogSequence

    package init(offset: UInt8, sizeCode: UInt8, owner: OwnerID, sequence: LogSequence) {
        self.offset = offset
        self.sizeCode = sizeCode
        self.owner = owner
        self.sequence = sequence
    }

    package static let empty = TemporaryLog(offset: 0, sizeCode: 0, owner: OwnerID(0), sequence: LogSequence(rawValue: 0))

    /// The same log naming `owner`: a header in an intermediate state names the node in the
    /// middle of the operation in its (not pending) log's owner field.
    package func naming(_ owner: OwnerID) -> TemporaryLog {
        TemporaryLog(offset: offset, sizeCode: sizeCode, owner: owner, sequence: sequence)
    }
}

/// Where a header word keeps its temporary log: four bit fields, placed differently in
/// span and section headers.
struct LogFieldLayout: Sendable {
    let offset: BitField
    let sizeCode: BitField
    let owner: BitField
    let sequence: BitField

    @inline(__always) func decode(_ word: UInt64) -> TemporaryLog {
        TemporaryLog(
            offset: UInt8(offset.get(word)), sizeCode: UInt8(sizeCode.get(word)),
            owner: OwnerID(UInt16(owner.get(word))), sequence: LogSequence(rawValue: UInt8(sequence.get(word))))
    }

    @inline(__always) func encode(_ log: TemporaryLog, into word: inout UInt64) {
        offset.set(&word, UInt64(log.offset))
        sizeCode.set(&word, UInt64(log.sizeCode))
        owner.set(&word, UInt64(log.owner.rawValue))
        sequence.set(&word, UInt64(log.sequence.rawValue))
    }
}

/// One 64-bit metadata word of a pool, decoded by its type: a word that does not decode
/// is not a state the protocol allows.
package protocol MetadataWord: Sendable, Hashable {
    init?(rawValue: UInt64)
    var rawValue: UInt64 { get }
}

/// A header word with a temporary log and a pending bit (`SpanHeader`, `SectionHeader`).
///
/// Block operations (claims and releases) require the pending bit clear and set it, with
/// the log, in their commit CAS; state changes (span open and close, hints, contention
/// marks) keep the log as it is; only a flush clears the bit.
package protocol LoggedHeader: MetadataWord {
    var logPending: Bool { get }
    var log: TemporaryLog { get }
    var contended: Bool { get }
    /// The header with its pending log marked flushed; nil when no log is pending.
    func flushed() -> Self?
    func with(contended: Bool) -> Self
}

extension LoggedHeader {
    /// The header as it will be once its pending log is flushed: what searches look at.
    package var settled: Self { flushed() ?? self }

    /// Whether the pending log is `owner`'s log with `sequence`.
    package func isPending(by owner: OwnerID, sequence: LogSequence) -> Bool {
        logPending && log.owner == owner && log.sequence == sequence
    }
}

extension SpanHeader: LoggedHeader {}
extension SectionHeader: LoggedHeader {}
extension NodeSlot: MetadataWord {}
extension IntentRecord: MetadataWord {}
extension FullLogRecord: MetadataWord {}
