import FineMem

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
        /// CPU time of the whole process during the pairs (every thread: the tasks, the
        /// upkeep, the runtime's own).
        package var cpuNanoseconds: UInt64
        /// Tasks the compute node spawned during the measured pairs (upkeep workers).
        package var spawnedTasks: UInt64
        /// Batches (doorbells) posted during the measured pairs, upkeep included.
        package var batches: UInt64

        /// Wall time per pair per task (a task's view: how long one pair takes it).
        package var nanosecondsPerPair: Double { Double(wallNanoseconds) * Double(tasks) / Double(max(1, pairs)) }
        /// Pairs per second, all tasks together.
        package var pairsPerSecond: Double { Double(pairs) / (Double(max(1, wallNanoseconds)) / 1e9) }
        /// CPU time per pair, all threads together: steadier than wall time on a shared
        /// machine (it leaves out the time other processes had the CPUs).
        package var cpuNanosecondsPerPair: Double { Double(cpuNanoseconds) / Double(max(1, pairs)) }
        package var spawnedTasksPerPair: Double { Double(spawnedTasks) / Double(max(1, pairs)) }
        package var batchesPerPair: Double { Double(batches) / Double(max(1, pairs)) }
    }

    /// An embedded cluster of one memory node and one compute node, in immediate mode and
    /// without failure detection (no lease traffic in the figures).
    package static func cluster(
        poolBytes: UInt64 = 1 << 30, allocator: AllocatorConfiguration = AllocatorConfiguration()
    ) async throws(ClusterError) -> EmbeddedCluster {
        var configuration = EmbeddedCluster.Configuration(memoryNodes: 1, poolBytesPerNode: poolBytes, computeNodes: 1)
        configuration.failureDetection = false
        configuration.allocator = allocator
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
        let cpuStarted = processCPUNanoseconds()
        try await pairs(allocators, count: pairsPerTask)
        let wall = clock.nowNanoseconds - started
        let cpu = processCPUNanoseconds() - cpuStarted
        await node.quiesce()
        return Figures(
            tasks: tasks, pairs: tasks * pairsPerTask, wallNanoseconds: wall, cpuNanoseconds: cpu, spawnedTasks: node.spawnedTasks - spawnedBefore,
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

/// A refresh on a large pool, through the public API: two compute nodes in immediate mode
/// on one memory node of `poolBytes`. Node 0 takes a 1 GiB block; node 1 takes 1 GiB
/// blocks until the pool is full (its last search ends on a full refresh, so its cache
/// knows every header); node 0 frees its block. Node 1 then allocates 4 KiB: its cache
/// shows no room, so it looks through the room summary. For comparison, node 1 then reads
/// every header once (the full refresh).
package enum RefreshBenchmark {
    package struct Figures: Sendable {
        /// Start-up of the cluster (memory node formatted, both compute nodes attached).
        package var startUpNanoseconds: UInt64
        /// The 4 KiB allocation through the summary: wall time, bytes its refresh read.
        package var summaryNanoseconds: UInt64
        package var summaryBytes: UInt64
        /// The full refresh: wall time, bytes read.
        package var fullNanoseconds: UInt64
        package var fullBytes: UInt64
    }

    package static func run(poolBytes: UInt64) async throws -> Figures {
        let clock = SystemRuntime.shared
        var configuration = EmbeddedCluster.Configuration(memoryNodes: 1, poolBytesPerNode: poolBytes, computeNodes: 2)
        configuration.failureDetection = false
        let started = clock.nowNanoseconds
        let cluster = try await EmbeddedCluster.start(configuration)
        let startUp = clock.nowNanoseconds - started
        defer { cluster.stopFailureDetection() }
        let (freer, filler) = (try cluster.makeAllocator(computeNode: 0), try cluster.makeAllocator(computeNode: 1))
        let freed = try await freer.allocate(bytes: 1 << 30)
        while true {
            do { _ = try await filler.allocate(bytes: 1 << 30) } catch .outOfMemory { break }
        }
        try await freer.free(freed)
        await cluster.quiesce()
        let node = cluster.computeNodes[1]
        let before = node.statistics.refreshBytes
        let summaryStarted = clock.nowNanoseconds
        let buffer = try await filler.allocate(bytes: 4096)
        let summary = clock.nowNanoseconds - summaryStarted
        let summaryBytes = node.statistics.refreshBytes - before
        try await filler.free(buffer)
        await cluster.quiesce()
        var trace = OperationTrace()
        let fullStarted = clock.nowNanoseconds
        try await node.refresh(node.links[0], trace: &trace)
        let full = clock.nowNanoseconds - fullStarted
        return Figures(
            startUpNanoseconds: startUp, summaryNanoseconds: summary, summaryBytes: summaryBytes, fullNanoseconds: full,
            fullBytes: trace.refreshBytes)
    }
}
