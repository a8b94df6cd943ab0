/// Errors of allocation, free, and buffer access. Every one leaves the pool as it was.
///
/// ```swift
/// do {
///     let buffer = try await allocator.allocate(bytes: 1 << 20)
///     try await allocator.free(buffer)
/// } catch .outOfMemory(let requested) {
///     print("no memory node has \(requested) bytes free")
/// } catch {
///     print("allocation failed: \(error)")
/// }
/// ```
public enum AllocationError: Error, Sendable, Hashable, CustomStringConvertible {
    /// A request for zero (or negative) bytes.
    case zeroSize
    /// A request larger than the largest block one memory node can hold.
    case sizeTooLarge(requestedBytes: UInt64, maximumBytes: UInt64)
    /// No memory node has a free block of this size.
    case outOfMemory(requestedBytes: UInt64)
    /// Contention kept every attempt from committing within the configured bound.
    case retryLimitExceeded(attempts: Int)
    /// Every intent slot of this compute node is in use by multi-section operations.
    case intentSlotsBusy
    /// The buffer does not start a block of its length on that memory node.
    case notABlockStart(RemotePointer)
    /// The block starting there is held by another compute node or application.
    case notOwner(RemotePointer)
    /// The block starting there is not allocated (it was freed already).
    case doubleFree(RemotePointer)
    /// No such memory node in this cluster.
    case unknownMemoryNode(NodeID)
    /// A compute node was started without any memory node.
    case noMemoryNodes
    /// A read or write outside the buffer.
    case outOfBounds(offset: Int, length: Int, bufferLength: Int)
    /// The compute node's slot in a memory node's node table is already taken.
    case nodeSlotTaken(slot: UInt16, memoryNode: NodeID)
    /// A memory node's superblock disagrees with its grant, or its pool cannot be addressed.
    case layout(LayoutError)
    /// The fabric failed.
    case fabric(FabricError)
    /// A metadata word is not what the protocol allows (a bug or foreign writes).
    case corruptMetadata(String)
    /// The memory node is out of reach for this compute node: it fenced the node (its lease
    /// expired; recovery takes back what the node held there, and the node comes back only
    /// as a new incarnation), or it failed (the connection broke).
    case fenced(memoryNode: NodeID)

    public var description: String {
        switch self {
        case .zeroSize: "a block must have at least one byte"
        case .sizeTooLarge(let requested, let maximum): "\(requested) bytes requested, at most \(maximum) fit one memory node"
        case .outOfMemory(let requested): "no memory node has a free block of \(requested) bytes"
        case .retryLimitExceeded(let attempts): "no commit after \(attempts) attempts"
        case .fenced(let node): "memory node \(node) is out of reach for this compute node: it fenced the node (lease expired; start it anew) or it failed"
        case .intentSlotsBusy: "all intent slots of this compute node are busy"
        case .notABlockStart(let pointer): "\(pointer) is not the start of a block of that length"
        case .notOwner(let pointer): "the block at \(pointer) belongs to someone else"
        case .doubleFree(let pointer): "the block at \(pointer) is not allocated"
        case .unknownMemoryNode(let node): "\(node) is not in this cluster"
        case .noMemoryNodes: "a compute node needs at least one memory node"
        case .outOfBounds(let offset, let length, let bufferLength):
            "access of \(length) bytes at \(offset) is outside a buffer of \(bufferLength)"
        case .nodeSlotTaken(let slot, let node): "slot \(slot) of the node table on \(node) is already taken"
        case .layout(let error): "layout: \(error)"
        case .fabric(let error): "fabric: \(error)"
        case .corruptMetadata(let what): "corrupt metadata: \(what)"
        }
    }
}
