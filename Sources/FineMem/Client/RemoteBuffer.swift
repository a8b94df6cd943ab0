/// A block of remote memory handed to an application: where it is and the key that
/// reaches it.
public struct RemoteBuffer: Hashable, Sendable, CustomStringConvertible {
    /// The memory node that holds the buffer.
    public let memoryNode: NodeID
    /// NIC address of the first byte.
    public let address: RemoteAddress
    /// Length in bytes (the block size: a power of two times 4 KiB).
    public let length: Int
    /// The remote key that grants read and write access to the buffer.
    public let rkey: RKey

    public var description: String { "\(length) B at \(address) on \(memoryNode) (\(rkey))" }
}
