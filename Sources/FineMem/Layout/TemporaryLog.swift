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
