/// A node of the cluster: a memory node or a compute node.
public struct NodeID: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public var rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public init(_ rawValue: UInt16) { self.rawValue = rawValue }
    public static func < (lhs: NodeID, rhs: NodeID) -> Bool { lhs.rawValue < rhs.rawValue }
    public var description: String { "node\(rawValue)" }
}

/// An address in a memory node's registered address space, as the NIC sees it (the
/// `remote_addr` of a work request).
public struct RemoteAddress: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public init(_ rawValue: UInt64) { self.rawValue = rawValue }
    public static func < (lhs: RemoteAddress, rhs: RemoteAddress) -> Bool { lhs.rawValue < rhs.rawValue }
    public static func + (lhs: RemoteAddress, rhs: UInt64) -> RemoteAddress { RemoteAddress(lhs.rawValue + rhs) }
    public static func - (lhs: RemoteAddress, rhs: RemoteAddress) -> UInt64 { lhs.rawValue - rhs.rawValue }
    public var description: String { "0x" + String(rawValue, radix: 16) }
}

/// A byte of remote memory in one 64-bit word, as remote data structures store pointers:
/// the memory node in the upper 16 bits and the NIC address in the lower 48.
///
/// ```
///  63              48 47                                                   0
/// +------------------+------------------------------------------------------+
/// | memory node (16) |                 NIC address (48)                     |
/// +------------------+------------------------------------------------------+
/// ```
///
/// A compute node refuses at start a memory node whose pool does not fit 48 bits of
/// address, so every buffer has a pointer. Turn a pointer back into a buffer with
/// `RemoteAllocator.buffer(at:)`.
///
/// ```swift
/// let buffer = try await allocator.allocate(bytes: 4096)
/// let stored: UInt64 = buffer.pointer.rawValue        // write it into another buffer
/// let again = try allocator.buffer(at: RemotePointer(rawValue: stored))
/// ```
public struct RemotePointer: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    /// Bits of NIC address a pointer holds.
    public static let addressBitCount = 48
    static let addressMask: UInt64 = (1 << 48) - 1

    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// The pointer to `address` on `memoryNode`; nil when the address needs more than 48 bits.
    public init?(memoryNode: NodeID, address: RemoteAddress) {
        guard address.rawValue <= Self.addressMask else { return nil }
        rawValue = UInt64(memoryNode.rawValue) << 48 | address.rawValue
    }

    public var memoryNode: NodeID { NodeID(UInt16(rawValue >> 48)) }
    public var address: RemoteAddress { RemoteAddress(rawValue & Self.addressMask) }
    public var description: String { "\(memoryNode):\(address)" }
}

/// A remote key (`rkey`): 24 bits of index and, in the low byte, the 8-bit tag that
/// `ibv_inc_rkey` advances each time a memory window is bound again.
public struct RKey: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    package init(index: UInt32, tag: UInt8) {
        precondition(index < 1 << 24, "rkey index \(index) does not fit 24 bits")
        rawValue = index << 8 | UInt32(tag)
    }
    /// The index part (the upper 24 bits).
    package var index: UInt32 { rawValue >> 8 }
    /// The tag part (the low 8 bits).
    package var tag: UInt8 { UInt8(truncatingIfNeeded: rawValue) }
    /// The key with the next tag, as `ibv_inc_rkey` computes it.
    package var incremented: RKey { RKey(index: index, tag: tag &+ 1) }
    public var description: String { "rkey(0x" + String(rawValue, radix: 16) + ")" }
}

/// Remote access rights of a memory region or window (`IBV_ACCESS_REMOTE_*`).
public struct RemoteAccess: OptionSet, Hashable, Sendable {
    public var rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    /// `IBV_ACCESS_REMOTE_READ`
    public static let read = RemoteAccess(rawValue: 1 << 0)
    /// `IBV_ACCESS_REMOTE_WRITE`
    public static let write = RemoteAccess(rawValue: 1 << 1)
    /// `IBV_ACCESS_REMOTE_ATOMIC`
    public static let atomic = RemoteAccess(rawValue: 1 << 2)
    public static let all: RemoteAccess = [.read, .write, .atomic]
}
