/// The "last operation" a header carries next to its bitmap, committed by the same CAS.
///
/// `offset` and `sizeLog2` locate the block inside the header's range (chunks of a span,
/// or spans of a section); whether the operation allocated or freed follows from the
/// header's bitmap over that range (all set: allocated, all clear: freed), because no
/// other block operation can change the header while the log is pending.
public struct TemporaryLog: Hashable, Sendable {
    public var offset: UInt8
    public var sizeLog2: UInt8
    public var owner: OwnerID
    public var sequence: LogSequence

    public init(offset: UInt8, sizeLog2: UInt8, owner: OwnerID, sequence: LogSequence) {
        self.offset = offset
        self.sizeLog2 = sizeLog2
        self.owner = owner
        self.sequence = sequence
    }

    public static let empty = TemporaryLog(offset: 0, sizeLog2: 0, owner: OwnerID(0), sequence: LogSequence(rawValue: 0))
}

/// Where a header word keeps its temporary log: four bit fields, placed differently in
/// span and section headers.
struct LogFieldLayout: Sendable {
    let offset: BitField
    let sizeLog2: BitField
    let owner: BitField
    let sequence: BitField

    func decode(_ word: UInt64) -> TemporaryLog {
        TemporaryLog(
            offset: UInt8(offset.get(word)), sizeLog2: UInt8(sizeLog2.get(word)),
            owner: OwnerID(UInt16(owner.get(word))), sequence: LogSequence(rawValue: UInt8(sequence.get(word))))
    }

    func encode(_ log: TemporaryLog, into word: inout UInt64) {
        offset.set(&word, UInt64(log.offset))
        sizeLog2.set(&word, UInt64(log.sizeLog2))
        owner.set(&word, UInt64(log.owner.rawValue))
        sequence.set(&word, UInt64(log.sequence.rawValue))
    }
}
