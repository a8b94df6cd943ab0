/// Errors of starting an embedded cluster.
public enum ClusterError: Error, Sendable, Hashable, CustomStringConvertible {
    case invalidConfiguration(String)
    case memoryNode(MemoryNodeError)
    case allocation(AllocationError)

    public var description: String {
        switch self {
        case .invalidConfiguration(let why): "invalid cluster configuration: \(why)"
        case .memoryNode(let error): "memory node: \(error)"
        case .allocation(let error): "allocation: \(error)"
        }
    }
}

/// Memory nodes on simulated NICs and compute nodes, all in this process: the default way
/// to use FineMem without RDMA hardware. Real threads and atomics (immediate mode), or
/// virtual time when a `Simulator` is given.
///
/// ```swift
/// let cluster = try await EmbeddedCluster.start(.init(memoryNodes: 2, poolBytesPerNode: 1 << 30, computeNodes: 4))
/// let allocator = cluster.makeAllocator(computeNode: 0, application: ApplicationID(7))
/// let buffer = try await allocator.allocate(bytes: 4096)
/// ```
public final class EmbeddedCluster: Sendable {
    public struct Configuration: Sendable, Hashable {
        public var memoryNodes = 1
        public var poolBytesPerNode: UInt64 = 1 << 30
        public var computeNodes = 1
        public var allocator = AllocatorConfiguration()

        public init(memoryNodes: Int = 1, poolBytesPerNode: UInt64 = 1 << 30, computeNodes: Int = 1, allocator: AllocatorConfiguration = AllocatorConfiguration()) {
            self.memoryNodes = memoryNodes
            self.poolBytesPerNode = poolBytesPerNode
            self.computeNodes = computeNodes
            self.allocator = allocator
        }
    }

    public let configuration: Configuration
    public let memoryNodes: [MemoryNode]
    /// One block allocator per compute node (owner ids 1, 2, ...).
    public let computeNodes: [BlockAllocator<SimulatedConnection>]

    private init(configuration: Configuration, memoryNodes: [MemoryNode], computeNodes: [BlockAllocator<SimulatedConnection>]) {
        self.configuration = configuration
        self.memoryNodes = memoryNodes
        self.computeNodes = computeNodes
    }

    /// Formats the memory nodes and starts the compute nodes. With a simulator, call this
    /// from a task the simulator runs.
    public static func start(_ configuration: Configuration = Configuration(), simulator: Simulator? = nil) async throws(ClusterError) -> EmbeddedCluster {
        guard configuration.memoryNodes >= 1, configuration.memoryNodes <= 1_000 else {
            throw .invalidConfiguration("memory nodes must be 1...1000, not \(configuration.memoryNodes)")
        }
        guard configuration.computeNodes >= 1 else { throw .invalidConfiguration("at least one compute node") }
        let geometry: PoolGeometry
        do {
            geometry = try PoolGeometry(dataBytes: configuration.poolBytesPerNode, computeNodeSlots: max(64, configuration.computeNodes + 1))
        } catch {
            throw .invalidConfiguration("\(error)")
        }
        var memoryNodes: [MemoryNode] = []
        for index in 0..<configuration.memoryNodes {
            do { memoryNodes.append(try await MemoryNode.format(id: NodeID(UInt16(index)), geometry: geometry)) } catch {
                throw .memoryNode(error)
            }
        }
        var computeNodes: [BlockAllocator<SimulatedConnection>] = []
        let runtime: any Runtime = simulator ?? SystemRuntime.shared
        for index in 0..<configuration.computeNodes {
            let owner = OwnerID(UInt16(index + 1))
            var links: [(MemoryNodeGrant, SimulatedConnection)] = []
            for memoryNode in memoryNodes {
                do { links.append(try memoryNode.attach(computeNode: owner, simulator: simulator)) } catch { throw .memoryNode(error) }
            }
            do {
                computeNodes.append(try await BlockAllocator.start(owner: owner, memoryNodes: links, runtime: runtime, configuration: configuration.allocator))
            } catch {
                throw .allocation(error)
            }
        }
        return EmbeddedCluster(configuration: configuration, memoryNodes: memoryNodes, computeNodes: computeNodes)
    }

    /// An allocator for `application` on compute node `computeNode` (0-based).
    public func makeAllocator(computeNode: Int = 0, application: ApplicationID = ApplicationID(1)) -> RemoteAllocator<SimulatedConnection> {
        RemoteAllocator(application: application, blocks: computeNodes[computeNode])
    }

    /// Waits for every compute node's background upkeep to finish.
    public func quiesce() async {
        for node in computeNodes { await node.quiesce() }
    }

    /// The sum of all compute nodes' counters.
    public var statistics: AllocatorStatistics {
        computeNodes.map(\.statistics).reduce(AllocatorStatistics(), +)
    }
}
