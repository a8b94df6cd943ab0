/// Errors of starting an embedded cluster or asking it for an allocator.
public enum ClusterError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The configuration cannot describe a cluster.
    case invalidConfiguration(String)
    /// A memory node could not be started.
    case memoryNodeFailed(NodeID, reason: String)
    /// A compute node could not attach to its memory nodes.
    case allocation(AllocationError)
    /// No compute node has this index.
    case noSuchComputeNode(Int, computeNodes: Int)

    public var description: String {
        switch self {
        case .invalidConfiguration(let why): "invalid cluster configuration: \(why)"
        case .memoryNodeFailed(let node, let reason): "memory node \(node) did not start: \(reason)"
        case .allocation(let error): "allocation: \(error)"
        case .noSuchComputeNode(let index, let count): "compute node \(index) does not exist (the cluster has \(count))"
        }
    }
}

/// Which NIC the memory nodes of an embedded cluster use.
public enum Fabric: Sendable, Hashable, CustomStringConvertible {
    /// The simulated NIC (no RDMA hardware needed).
    case simulated
    /// A real RDMA device (a ConnectX card, Soft-RoCE's `rxe0`, ...): every verb goes over
    /// real RC queue pairs, looped back through the device.
    case verbs(device: String)

    public var description: String {
        switch self {
        case .simulated: "simulated NIC"
        case .verbs(let device): "verbs on \(device)"
        }
    }
}

/// Memory nodes and compute nodes, all in this process: on simulated NICs, the default
/// way to use FineMem without RDMA hardware (real threads and atomics in immediate mode, or
/// deterministic virtual time when a `Simulator` is given), or on a real RDMA device
/// (`Configuration.fabric`), over real queue pairs.
///
/// ```swift
/// let cluster = try await EmbeddedCluster.start(.init(memoryNodes: 2, poolBytesPerNode: 1 << 30, computeNodes: 4))
/// let allocator = try cluster.makeAllocator(computeNode: 0, application: ApplicationID(7))
/// let buffer = try await allocator.allocate(bytes: 4096)
/// ```
public final class EmbeddedCluster: Sendable {
    /// The shape of a cluster.
    public struct Configuration: Sendable, Hashable {
        /// Memory nodes, 1-1000.
        public var memoryNodes = 1
        /// Data bytes of each memory node's pool (rounded up to 2 MiB sections).
        public var poolBytesPerNode: UInt64 = 1 << 30
        /// Compute nodes, each with its own allocator (at least 1).
        public var computeNodes = 1
        /// Tunables of every compute node's allocator.
        public var allocator = AllocatorConfiguration()
        /// How often each compute node renews its lease on each memory node.
        public var leaseIntervalNanos: UInt64 = 1_000_000_000
        /// Renewals a compute node may miss before its memory nodes fence and recover it.
        public var missedRenewalsMax = 3
        /// Whether leases and the memory nodes' monitors run from the start. In virtual
        /// time they never start by themselves (a simulation runs until no work is left,
        /// and they never stop): call `startFailureDetection()`.
        public var failureDetection = true
        /// The NIC of the memory nodes.
        public var fabric = Fabric.simulated

        public init(
            memoryNodes: Int = 1, poolBytesPerNode: UInt64 = 1 << 30, computeNodes: Int = 1, allocator: AllocatorConfiguration = AllocatorConfiguration(),
            fabric: Fabric = .simulated
        ) {
            self.memoryNodes = memoryNodes
            self.poolBytesPerNode = poolBytesPerNode
            self.computeNodes = computeNodes
            self.allocator = allocator
            self.fabric = fabric
        }
    }

    public let configuration: Configuration
    package let memoryNodes: [MemoryNode]
    /// The simulated NIC of each memory node, in the order of `memoryNodes` (none on verbs).
    package let nics: [SimulatedNIC]
    /// The verbs NIC of each memory node, in the order of `memoryNodes` (none when simulated).
    package let verbsNICs: [VerbsNIC]
    private let computeNodeStore: Locked<[BlockAllocator]>
    /// The failure detector of each memory node, in the order of `memoryNodes`.
    package let monitors: [LeaseMonitor]
    package let runtime: any Runtime

    /// One block allocator per compute node (owner ids 1, 2, ...): the current
    /// incarnation of each.
    package var computeNodes: [BlockAllocator] { computeNodeStore.withLock { $0 } }

    private init(
        configuration: Configuration, memoryNodes: [MemoryNode], nics: [SimulatedNIC], verbsNICs: [VerbsNIC], computeNodes: [BlockAllocator],
        runtime: any Runtime
    ) {
        self.configuration = configuration
        self.memoryNodes = memoryNodes
        self.nics = nics
        self.verbsNICs = verbsNICs
        self.computeNodeStore = Locked(computeNodes)
        self.runtime = runtime
        monitors = memoryNodes.map {
            LeaseMonitor(memoryNode: $0, intervalNanos: configuration.leaseIntervalNanos, missedRenewalsMax: configuration.missedRenewalsMax, runtime: runtime)
        }
    }

    /// The fabric node id of compute node `index` (0-based); memory nodes are 0, 1, ...
    package static func computeNodeID(_ index: Int) -> NodeID { NodeID(UInt16(1001 + index)) }

    /// The node-table slot (owner id) of compute node `index` (0-based).
    package static func owner(ofComputeNode index: Int) -> OwnerID { OwnerID(UInt16(index + 1)) }

    /// Formats the memory nodes and starts the compute nodes. With a simulator, call this
    /// from a task the simulator runs (`simulator.spawn`); a simulator needs the simulated
    /// fabric. On verbs, each memory node opens the device, checks its limits against the
    /// pool (see `VerbsNIC`) and maps its pool.
    public static func start(_ configuration: Configuration = Configuration(), simulator: Simulator? = nil) async throws(ClusterError) -> EmbeddedCluster {
        guard configuration.memoryNodes >= 1, configuration.memoryNodes <= 1_000 else {
            throw .invalidConfiguration("memory nodes must be 1...1000, not \(configuration.memoryNodes)")
        }
        guard configuration.leaseIntervalNanos > 0, configuration.missedRenewalsMax >= 1 else {
            throw .invalidConfiguration("a lease needs a positive interval and at least one renewal to miss")
        }
        guard configuration.computeNodes >= 1, configuration.computeNodes < Int(OwnerID.maxRawValue) else {
            throw .invalidConfiguration("compute nodes must be 1...\(OwnerID.maxRawValue - 1), not \(configuration.computeNodes)")
        }
        let geometry: PoolGeometry
        do {
            geometry = try PoolGeometry(dataBytes: configuration.poolBytesPerNode, computeNodeSlots: max(64, configuration.computeNodes + 1))
        } catch {
            throw .invalidConfiguration("\(error)")
        }
        var memoryNodes: [MemoryNode] = []
        var nics: [SimulatedNIC] = []
        var verbsNICs: [VerbsNIC] = []
        if simulator != nil, configuration.fabric != .simulated {
            throw .invalidConfiguration("a simulator runs only on the simulated fabric, not \(configuration.fabric)")
        }
        for index in 0..<configuration.memoryNodes {
            let id = NodeID(UInt16(index))
            do {
                let nic: any NICControl
                switch configuration.fabric {
                case .simulated:
                    let simulated = try SimulatedNIC(node: id, poolBytes: geometry.totalBytes, simulator: simulator)
                    nics.append(simulated)
                    nic = simulated
                case .verbs(let device):
                    // A main and a backup window per chunk (the capability table); a
                    // metadata and a data region per compute node, one for the node itself.
                    let verbs = try VerbsNIC(
                        device: device, node: id, poolBytes: geometry.totalBytes, windows: 2 * geometry.chunkCount,
                        regions: 2 * configuration.computeNodes + 2)
                    verbsNICs.append(verbs)
                    nic = verbs
                }
                memoryNodes.append(try await MemoryNode.format(nic: nic, geometry: geometry))
            } catch {
                throw .memoryNodeFailed(id, reason: "\(error)")
            }
        }
        let runtime: any Runtime = simulator ?? SystemRuntime.shared
        var computeNodes: [BlockAllocator] = []
        for index in 0..<configuration.computeNodes {
            computeNodes.append(try await startComputeNode(index, memoryNodes: memoryNodes, configuration: configuration, runtime: runtime))
        }
        let cluster = EmbeddedCluster(
            configuration: configuration, memoryNodes: memoryNodes, nics: nics, verbsNICs: verbsNICs, computeNodes: computeNodes, runtime: runtime)
        if configuration.failureDetection, simulator == nil { cluster.startFailureDetection() }
        return cluster
    }

    /// Attaches compute node `index` to every memory node (a new protection domain, keys
    /// and connection on each) and starts its allocator (which takes its slots).
    private static func startComputeNode(
        _ index: Int, memoryNodes: [MemoryNode], configuration: Configuration, runtime: any Runtime
    ) async throws(ClusterError) -> BlockAllocator {
        let owner = owner(ofComputeNode: index)
        var links: [(MemoryNodeGrant, any FabricConnection)] = []
        for memoryNode in memoryNodes {
            do { links.append(try memoryNode.attach(computeNode: owner, from: computeNodeID(index))) } catch {
                throw .memoryNodeFailed(memoryNode.id, reason: "\(error)")
            }
        }
        do {
            return try await BlockAllocator.start(owner: owner, memoryNodes: links, runtime: runtime, configuration: allocatorConfiguration(configuration))
        } catch {
            // The attachments were never used: give them back.
            for (memoryNode, (grant, _)) in zip(memoryNodes, links) { try? memoryNode.detach(computeNode: owner, grant: grant) }
            throw .allocation(error)
        }
    }

    /// The allocator's configuration, its waits long enough to outlast a lease: a node
    /// that stops renewing (dead, or cut off by a broken link) leaves pending logs that
    /// others wait on until its memory nodes fence and recover it, after
    /// `missedRenewalsMax` intervals and one more check; a search that gave up before that
    /// would answer `retryLimitExceeded` for room a recovery already under way releases.
    static func allocatorConfiguration(_ configuration: Configuration) -> AllocatorConfiguration {
        var allocator = configuration.allocator
        let leaseNanos = UInt64(configuration.missedRenewalsMax + 2) * configuration.leaseIntervalNanos
        let waits = leaseNanos / max(allocator.backoffNanosMax, 1) + 1
        allocator.waitCountMax = max(allocator.waitCountMax, Int(min(waits, UInt64(Int.max))))
        return allocator
    }

    /// An allocator for `application` on compute node `computeNode` (0-based).
    public func makeAllocator(computeNode: Int = 0, application: ApplicationID = ApplicationID(1)) throws(ClusterError) -> RemoteAllocator {
        guard computeNodes.indices.contains(computeNode) else { throw .noSuchComputeNode(computeNode, computeNodes: computeNodes.count) }
        return RemoteAllocator(application: application, blocks: computeNodes[computeNode])
    }

    /// Waits for every compute node's background upkeep (log flushes, span and section
    /// state) to finish.
    public func quiesce() async {
        for node in computeNodes { await node.quiesce() }
    }

    /// The sum of all compute nodes' counters.
    public var statistics: AllocatorStatistics {
        computeNodes.map(\.statistics).reduce(AllocatorStatistics(), +)
    }

    /// Fences compute node `index` on every memory node: its connections enter the error
    /// state (verbs it posted and that are still in flight included), its regions are
    /// deregistered, its slots are declared dead. Nothing it posted or posts reaches a
    /// pool after this returns.
    package func fence(computeNode index: Int) async throws(MemoryNodeError) {
        for memoryNode in memoryNodes { try await memoryNode.fence(computeNode: Self.owner(ofComputeNode: index)) }
    }

    /// Recovers fenced compute node `index` on every memory node, through each memory
    /// node's loopback (`PoolRecovery`).
    package func recover(computeNode index: Int) async throws(MemoryNodeError) -> [RecoveryReport] {
        var reports: [RecoveryReport] = []
        for memoryNode in memoryNodes { reports.append(try await memoryNode.recover(computeNode: Self.owner(ofComputeNode: index), runtime: runtime)) }
        return reports
    }

    /// Starts compute node `index` anew, after it was fenced and recovered: a new
    /// incarnation with new keys and connections. The old allocator keeps failing.
    package func restart(computeNode index: Int) async throws(ClusterError) -> BlockAllocator {
        guard computeNodes.indices.contains(index) else { throw .noSuchComputeNode(index, computeNodes: computeNodes.count) }
        computeNodes[index].stopLeaseRenewal()
        let node = try await Self.startComputeNode(index, memoryNodes: memoryNodes, configuration: configuration, runtime: runtime)
        if failureDetectionRunning.withLock({ $0 }) { node.startLeaseRenewal(intervalNanos: configuration.leaseIntervalNanos) }
        computeNodeStore.withLock { $0[index] = node }
        return node
    }

    private let failureDetectionRunning = Locked(false)

    /// Starts the compute nodes' lease renewals and the memory nodes' monitors (both on
    /// the cluster's runtime: virtual time under a simulator). A real-time cluster starts
    /// them itself unless its configuration says not to.
    public func startFailureDetection() {
        failureDetectionRunning.withLock { $0 = true }
        for node in computeNodes { node.startLeaseRenewal(intervalNanos: configuration.leaseIntervalNanos) }
        for monitor in monitors { monitor.start() }
    }

    /// Stops lease renewals and monitors (each loop ends at its next wake-up).
    public func stopFailureDetection() {
        failureDetectionRunning.withLock { $0 = false }
        for node in computeNodes { node.stopLeaseRenewal() }
        for monitor in monitors { monitor.stop() }
    }
}
