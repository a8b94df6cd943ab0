/// The CPU cost of the allocation fast path: tasks of one compute node on real threads
/// (immediate mode: simulated NIC, real atomics, no virtual time) allocate a 4 KiB buffer
/// through the public API and free it, again and again. What it measures is everything
/// but the network: the protocol, the cache, the logs, the simulated NIC's verbs.
///
/// ```swift
/// let figures = try await PairBenchmark.run(tasks: 2, pairsPerTask: 100_000)
/// print(figures.nanosecondsPerPair, figures.pairsPerSecond)
/// ```
package enum PairBenchmark {
    /// What one run measured.
    package struct Figures: Sendable {
        package var tasks: Int
        package var pairs: Int
        package var wallNanoseconds: UInt64
        /// Tasks the compute node spawned during the measured pairs (upkeep workers).
        package var spawnedTasks: UInt64
        /// Batches (doorbells) posted during the measured pairs, upkeep included.
        package var batches: UInt64

        /// Wall time per pair per task (a task's view: how long one pair takes it).
        package var nanosecondsPerPair: Double { Double(wallNanoseconds) * Double(tasks) / Double(max(1, pairs)) }
        /// Pairs per second, all tasks together.
        package var pairsPerSecond: Double { Double(pairs) / (Double(max(1, wallNanoseconds)) / 1e9) }
        package var spawnedTasksPerPair: Double { Double(spawnedTasks) / Double(max(1, pairs)) }
        package var batchesPerPair: Double { Double(batches) / Double(max(1, pairs)) }
    }

    /// An embedded cluster of one memory node and one compute node, in immediate mode and
    /// without failure detection (no lease traffic in the figures).
    package static func cluster(poolBytes: UInt64 = 1 << 30) async throws(ClusterError) -> EmbeddedCluster {
        var configuration = EmbeddedCluster.Configuration(memoryNodes: 1, poolBytesPerNode: poolBytes, computeNodes: 1)
        configuration.failureDetection = false
        return try await EmbeddedCluster.start(configuration)
    }

    /// Runs `pairsPerTask` allocate+free pairs on each of `tasks` tasks (after
    /// `warmUpPairs` unmeasured ones each) and answers the figures.
    package static func run(
        tasks: Int, pairsPerTask: Int, warmUpPairs: Int = 1_000, on cluster: EmbeddedCluster? = nil
    ) async throws -> Figures {
        precondition(tasks >= 1 && pairsPerTask >= 1, "a run needs a task and a pair")
        let cluster = if let cluster { cluster } else { try await Self.cluster() }
        let node = cluster.computeNodes[0]
        let allocators = try (0..<tasks).map { try cluster.makeAllocator(application: ApplicationID(UInt16($0 + 1))) }
        try await pairs(allocators, count: warmUpPairs)
        await node.quiesce()
        let (spawnedBefore, batchesBefore) = (node.spawnedTasks, node.statistics.batchesTotal)
        let clock = SystemRuntime.shared
        let started = clock.nowNanoseconds
        try await pairs(allocators, count: pairsPerTask)
        let wall = clock.nowNanoseconds - started
        await node.quiesce()
        return Figures(
            tasks: tasks, pairs: tasks * pairsPerTask, wallNanoseconds: wall, spawnedTasks: node.spawnedTasks - spawnedBefore,
            batches: node.statistics.batchesTotal - batchesBefore)
    }

    /// `count` pairs on each allocator, each on a task of its own.
    private static func pairs(_ allocators: [RemoteAllocator], count: Int) async throws {
        try await withThrowingTaskGroup(of: Void.self) { group in
            for allocator in allocators {
                group.addTask {
                    for _ in 0..<count {
                        let buffer = try await allocator.allocate(bytes: 4096)
                        try await allocator.free(buffer)
                    }
                }
            }
            try await group.waitForAll()
        }
    }
}
