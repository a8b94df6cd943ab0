/// The durable per-block record of the full log: one word per chunk, meaningful at the
/// first chunk of a block. Recovery walks these to find what a dead node owned.
///
/// ```
///  63 60 59           44 43  42   41   40    35 34     30 29          14 13         0
/// +-----+---------------+------+-----+--------+---------+--------------+------------+
/// | 0000|  incarnation  |layer |alloc|log seq |size log2| application  |   owner    |
/// |     |     (16)      | (2)  | (1) |  (6)   |  (5)    |    (16)      |   (14)     |
/// +-----+---------------+------+-----+--------+---------+--------------+------------+
/// ```
///
/// `chunkCountLog2` counts chunks (0 = 4 KiB ... 31). `layer` says which header committed the
/// operation (so recovery knows where to look), `sequence` is that header's log sequence,
/// `incarnation` the owner's node-table incarnation when it allocated.
package struct FullLogRecord: RawRepresentable, Hashable, Sendable {
    package enum Layer: UInt64, Sendable, CaseIterable { case chunk = 0, section = 1, multiSection = 2 }

    static let ownerField = BitField(0, 14)
    static let applicationField = BitField(14, 16)
    static let sizeField = BitField(30, 5)
    static let sequenceField = BitField(35, 6)
    static let allocatedField = BitField(41, 1)
    static let layerField = BitField(42, 2)
    static let incarnationField = BitField(44, 16)
    static let reservedField = BitField(60, 4)

    package private(set) var rawValue: UInt64

    package init?(rawValue: UInt64) {
        guard Self.reservedField.get(rawValue) == 0, Layer(rawValue: Self.layerField.get(rawValue)) != nil else { return nil }
        self.rawValue = rawValue
    }

    /// The record of a chunk that never started a block.
    package static let never = FullLogRecord(rawValue: 0)!

    package init(
        allocated: Bool, owner: OwnerID, application: ApplicationID, chunkCountLog2: Int, layer: Layer,
        sequence: LogSequence, incarnation: UInt16
    ) {
        precondition(chunkCountLog2 >= 0 && chunkCountLog2 < 32, "size 2^\(chunkCountLog2) chunks does not fit")
        var word: UInt64 = 0
        Self.ownerField.set(&word, UInt64(owner.rawValue))
        Self.applicationField.set(&word, UInt64(application.rawValue))
        Self.sizeField.set(&word, UInt64(chunkCountLog2))
        Self.sequenceField.set(&word, UInt64(sequence.rawValue))
        Self.allocatedField.set(&word, allocated ? 1 : 0)
        Self.layerField.set(&word, layer.rawValue)
        Self.incarnationField.set(&word, UInt64(incarnation))
        rawValue = word
    }

    package var owner: OwnerID { OwnerID(UInt16(Self.ownerField.get(rawValue))) }
    package var application: ApplicationID { ApplicationID(UInt16(Self.applicationField.get(rawValue))) }
    package var chunkCountLog2: Int { Int(Self.sizeField.get(rawValue)) }
    package var sequence: LogSequence { LogSequence(rawValue: UInt8(Self.sequenceField.get(rawValue))) }
    package var isAllocated: Bool { Self.allocatedField.get(rawValue) == 1 }
    package var layer: Layer { Layer(rawValue: Self.layerField.get(rawValue))! }
    package var incarnation: UInt16 { UInt16(Self.incarnationField.get(rawValue)) }

    /// The record after the block is freed by the operation with `sequence`: owner and size
    /// stay for diagnosis.
    package func freed(sequence: LogSequence) -> FullLogRecord? {
        guard isAllocated else { return nil }
        return FullLogRecord(
            allocated: false, owner: owner, application: application, chunkCountLog2: chunkCountLog2, layer: layer,
            sequence: sequence, incarnation: incarnation)
    }
}
