/// A run of bits inside a 64-bit metadata word.
struct BitField: Sendable {
    let shift: UInt64
    let width: UInt64
    /// The field's bits in place, and its largest value (stored: headers decode on every
    /// operation).
    let mask: UInt64
    let maxValue: UInt64

    init(_ shift: UInt64, _ width: UInt64) {
        precondition(width > 0 && shift + width <= 64, "bit field \(shift)+\(width) does not fit a word")
        self.shift = shift
        self.width = width
        maxValue = width == 64 ? ~0 : (1 << width) - 1
        mask = maxValue << shift
    }

    @inline(__always) func get(_ word: UInt64) -> UInt64 { (word & mask) >> shift }

    @inline(__always) func set(_ word: inout UInt64, _ value: UInt64) {
        precondition(value <= maxValue, "value \(value) does not fit \(width) bits")
        word = (word & ~mask) | (value << shift)
    }
}

/// Who holds a block: the slot of a compute node in the node table (14 bits).
package struct OwnerID: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    package static let bitWidth = 14
    package static let maxRawValue: UInt16 = (1 << 14) - 1
    package var rawValue: UInt16
    package init?(rawValue: UInt16) {
        guard rawValue <= Self.maxRawValue else { return nil }
        self.rawValue = rawValue
    }
    package init(_ rawValue: UInt16) {
        precondition(rawValue <= Self.maxRawValue, "owner \(rawValue) does not fit 14 bits")
        self.rawValue = rawValue
    }
    package static func < (lhs: OwnerID, rhs: OwnerID) -> Bool { lhs.rawValue < rhs.rawValue }
    package var description: String { "owner\(rawValue)" }
}

/// An application inside a compute node: the allocator of one application can free only
/// that application's buffers. Recorded in the full log (16 bits).
///
/// ```swift
/// let allocator = try cluster.makeAllocator(computeNode: 0, application: ApplicationID(7))
/// ```
public struct ApplicationID: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public init(_ rawValue: UInt16) { self.rawValue = rawValue }
    /// Recorded by recovery when it completes a dead node's log and the application is unknown.
    package static let unknown = ApplicationID(0xFFFF)
    public var description: String { "app\(rawValue)" }
}

/// A 6-bit per-header operation counter carried in temporary logs and full-log records.
/// It tags which header operation a record reflects; safety never depends on it not
/// wrapping (see `SpanHeader` on the pending bit).
package struct LogSequence: RawRepresentable, Hashable, Sendable {
    package static let bitWidth: UInt64 = 6
    package var rawValue: UInt8
    package init(rawValue: UInt8) { self.rawValue = rawValue & 0x3F }
    package var next: LogSequence { LogSequence(rawValue: rawValue &+ 1) }
}
