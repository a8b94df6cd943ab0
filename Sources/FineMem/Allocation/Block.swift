/// One allocated block: `2^sizeLog2` chunks starting at `firstChunk` of a memory node.
public struct Block: Hashable, Sendable, CustomStringConvertible {
    public let memoryNode: NodeID
    public let firstChunk: Int
    public let sizeLog2: Int

    public init(memoryNode: NodeID, firstChunk: Int, sizeLog2: Int) {
        self.memoryNode = memoryNode
        self.firstChunk = firstChunk
        self.sizeLog2 = sizeLog2
    }

    public var chunkCount: Int { 1 << sizeLog2 }
    public var chunks: Range<Int> { firstChunk..<firstChunk + chunkCount }
    public var bytes: UInt64 { UInt64(chunkCount) * PoolGeometry.chunkBytes }

    /// Which header commits this block's operations.
    public var layer: FullLogRecord.Layer {
        switch sizeLog2 {
        case 0...4: .chunk
        case 5...9: .section
        default: .multiSection
        }
    }

    public var description: String { "\(memoryNode):chunk\(firstChunk)+2^\(sizeLog2)" }

    /// The smallest power-of-two number of chunks (as log2) that holds `bytes`.
    public static func sizeLog2(forBytes bytes: UInt64) -> Int {
        let chunks = (bytes + PoolGeometry.chunkBytes - 1) / PoolGeometry.chunkBytes
        return chunks <= 1 ? 0 : 64 - (chunks - 1).leadingZeroBitCount
    }
}

/// Errors of allocation and free. Every one leaves the pool as it was.
public enum AllocationError: Error, Sendable, Hashable, CustomStringConvertible {
    /// A request for zero (or negative) bytes.
    case zeroSize
    /// A request larger than the largest block one memory node can hold.
    case sizeTooLarge(requestedBytes: UInt64, maximumBytes: UInt64)
    /// No memory node has a free block of this size.
    case outOfMemory(requestedBytes: UInt64)
    /// Contention kept every attempt from committing within the bound.
    case retryLimitExceeded(attempts: Int)
    /// Every intent slot of this node is in use by multi-section operations.
    case intentSlotsBusy
    /// The address is not the first byte of a block of this size on that memory node.
    case notABlockStart(memoryNode: NodeID, address: RemoteAddress)
    /// The block is held by another compute node or application.
    case notOwner(Block)
    /// The block is not allocated (it was freed already).
    case doubleFree(Block)
    /// No such memory node in this cluster.
    case unknownMemoryNode(NodeID)
    /// A compute node was started without any memory node.
    case noMemoryNodes
    /// A read or write outside the buffer.
    case outOfBounds(offset: Int, length: Int, bufferLength: Int)
    /// The compute node's slot in a memory node's node table is already taken.
    case nodeSlotTaken(OwnerID, memoryNode: NodeID)
    /// A memory node's superblock disagrees with its grant.
    case layout(LayoutError)
    /// The fabric failed.
    case fabric(FabricError)
    /// A metadata word is not what the protocol allows (a bug or foreign writes).
    case corruptMetadata(String)

    public var description: String {
        switch self {
        case .zeroSize: "a block must have at least one byte"
        case .sizeTooLarge(let r, let m): "\(r) bytes requested, at most \(m) fit one memory node"
        case .outOfMemory(let r): "no memory node has a free block of \(r) bytes"
        case .retryLimitExceeded(let n): "no commit after \(n) attempts"
        case .intentSlotsBusy: "all intent slots of this compute node are busy"
        case .notABlockStart(let node, let address): "\(address) on \(node) is not the start of a block"
        case .notOwner(let block): "\(block) belongs to someone else"
        case .doubleFree(let block): "\(block) is not allocated"
        case .unknownMemoryNode(let node): "\(node) is not in this cluster"
        case .noMemoryNodes: "a compute node needs at least one memory node"
        case .outOfBounds(let offset, let length, let bufferLength):
            "access of \(length) bytes at \(offset) is outside a buffer of \(bufferLength)"
        case .nodeSlotTaken(let owner, let node): "slot \(owner) on \(node) is already taken"
        case .layout(let error): "layout: \(error)"
        case .fabric(let error): "fabric: \(error)"
        case .corruptMetadata(let what): "corrupt metadata: \(what)"
        }
    }
}

/// Chooses the order in which memory nodes are tried for an allocation.
public protocol PlacementPolicy: Sendable {
    /// The indices of `memoryNodeCount` nodes in the order to try, for the `sequence`-th
    /// allocation of a compute node.
    func order(memoryNodeCount: Int, sizeLog2: Int, sequence: UInt64) -> [Int]
}

/// Round-robin across memory nodes, falling back to the others when one is full.
public struct RoundRobinPlacement: PlacementPolicy {
    public init() {}
    public func order(memoryNodeCount: Int, sizeLog2: Int, sequence: UInt64) -> [Int] {
        let first = Int(sequence % UInt64(memoryNodeCount))
        return (0..<memoryNodeCount).map { (first + $0) % memoryNodeCount }
    }
}

/// Tunables of the allocation protocol. Every loop in it has a bound here.
public struct AllocatorConfiguration: Sendable, Hashable {
    /// A span or section whose commit took at least this many CAS failures is marked
    /// contended; searches avoid contended ones. Measured with `finemem bench` (512 tasks,
    /// 4 KiB): on a 1 GiB pool every threshold gives the same figures (0.005 CAS retries
    /// per allocation: the marks never fire); on a 16 MiB pool, over seeds 1-3, thresholds
    /// 2, 3 and "off" (1000) stay within run-to-run noise of each other (1.58-1.76 round
    /// trips per allocation). 3 is kept; the losses there are mostly to other nodes'
    /// pending logs, which contention marks do not address.
    public var contentionHigh = 3
    /// A contended span or section whose commit took at most this many failures is
    /// returned to normal.
    public var contentionLow = 0
    /// CAS attempts per operation before `retryLimitExceeded`.
    public var maxAttempts = 256
    /// Waits (with backoff) for a busy intent slot or an own in-flight flush.
    public var maxWaits = 10_000
    /// The shortest backoff between waits, in nanoseconds.
    public var backoffNanos: UInt64 = 500

    public init() {}
}
