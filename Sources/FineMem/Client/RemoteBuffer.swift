/// A block of remote memory handed to an application: where it is, how long, and the key
/// that reaches it.
///
/// ```swift
/// let buffer = try await allocator.allocate(bytes: 10_000)   // 16 KiB
/// print(buffer.length, buffer.pointer)
/// ```
public struct RemoteBuffer: Hashable, Sendable, CustomStringConvertible {
    /// The memory node that holds the buffer.
    public let memoryNode: NodeID
    /// NIC address of the first byte.
    public let address: RemoteAddress
    /// Length in bytes (the block size: a power of two times 4 KiB).
    public let length: Int
    /// The remote key that grants read and write access to the buffer.
    public let rkey: RKey

    package init(memoryNode: NodeID, address: RemoteAddress, length: Int, rkey: RKey) {
        self.memoryNode = memoryNode
        self.address = address
        self.length = length
        self.rkey = rkey
    }

    /// The buffer's first byte as a compact pointer, to store in remote data structures.
    public var pointer: RemotePointer {
        guard let pointer = RemotePointer(memoryNode: memoryNode, address: address) else {
            preconditionFailure("\(address) does not fit a remote pointer; allocators refuse such pools at start")
        }
        return pointer
    }

    public var description: String { "\(length) B at \(address) on \(memoryNode) (\(rkey))" }
}
