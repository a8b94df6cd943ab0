import Benchmark
import FineMem
import Synchronization

/// FineMem's CPU-cost benchmarks, through the public API only: `swift package benchmark`
/// in this folder (release build). Compare against a baseline of the previous release
/// (`swift package benchmark baseline update`, then `baseline compare`): on a shared
/// machine the ratio is what counts, not the absolute time.
let benchmarks: @Sendable () -> Void = {
    let pairMetrics: [BenchmarkMetric] = [.wallClock, .cpuTotal, .mallocCountTotal, .throughput]

    // The fast path: allocate 4 KiB and free it on an embedded simulated memory node in
    // immediate mode (real threads, real atomics); an iteration is 1,000 pairs.
    for tasks in [1, 2] {
        Benchmark(
            "allocate+free 4 KiB, \(tasks) task(s), immediate mode",
            configuration: .init(metrics: pairMetrics, scalingFactor: .kilo, maxDuration: .seconds(5), maxIterations: 50)
        ) { benchmark in
            let cluster = try await immediateCluster(poolBytes: 1 << 30)
            let allocators = try (0..<tasks).map { try cluster.makeAllocator(application: ApplicationID(UInt16($0 + 1))) }
            try await pairs(allocators, count: 1_000)
            benchmark.startMeasurement()
            try await pairs(allocators, count: benchmark.scaledIterations.count / tasks)
            benchmark.stopMeasurement()
            await cluster.quiesce()
            cluster.stopFailureDetection()
        }
    }

    // The simulator: 4 compute nodes x 16 tasks allocating and freeing 4 KiB blocks in
    // virtual time; an iteration is one whole run of 6,400 pairs.
    Benchmark(
        "simulator, 64 tasks x 100 allocate+free in virtual time",
        configuration: .init(metrics: [.wallClock, .cpuTotal, .mallocCountTotal], maxDuration: .seconds(10), maxIterations: 10)
    ) { benchmark in
        let simulator = Simulator(seed: 1)
        let failures = Failures()
        simulator.spawn {
            do {
                var configuration = EmbeddedCluster.Configuration(memoryNodes: 1, poolBytesPerNode: 1 << 30, computeNodes: 4)
                configuration.failureDetection = false
                let cluster = try await EmbeddedCluster.start(configuration, simulator: simulator)
                await withTaskGroup(of: Void.self) { group in
                    for node in 0..<4 {
                        for task in 0..<16 {
                            guard let allocator = try? cluster.makeAllocator(computeNode: node, application: ApplicationID(UInt16(task + 1))) else {
                                failures.record()
                                continue
                            }
                            group.addTask {
                                do { try await pairs([allocator], count: 100) } catch { failures.record() }
                            }
                        }
                    }
                }
                await cluster.quiesce()
            } catch {
                failures.record()
            }
        }
        simulator.run()
        precondition(failures.count == 0, "the simulated run failed (seed \(simulator.seed))")
    }

    // A refresh on a 256 GiB pool: node 1 fills the pool with 1 GiB blocks (its cache then
    // knows every header: its last search read them all), node 0 frees the one it held,
    // and node 1 allocates 4 KiB: its cache shows no room, so it looks through the memory
    // node's room summary. Measured: that allocation, and the bytes its refresh read.
    let refreshBytes = BenchmarkMetric.custom("refresh bytes read", polarity: .prefersSmaller, useScalingFactor: false)
    Benchmark(
        "refresh through the room summary, 256 GiB pool",
        configuration: .init(metrics: [.wallClock, refreshBytes], maxDuration: .seconds(10), maxIterations: 10)
    ) { benchmark in
        var configuration = EmbeddedCluster.Configuration(memoryNodes: 1, poolBytesPerNode: 256 << 30, computeNodes: 2)
        configuration.failureDetection = false
        let cluster = try await EmbeddedCluster.start(configuration)
        let (freer, filler) = (try cluster.makeAllocator(computeNode: 0), try cluster.makeAllocator(computeNode: 1))
        let freed = try await freer.allocate(bytes: 1 << 30)
        while true {
            do { _ = try await filler.allocate(bytes: 1 << 30) } catch AllocationError.outOfMemory { break }
        }
        try await freer.free(freed)
        await cluster.quiesce()
        let before = cluster.statistics.refreshBytes
        benchmark.startMeasurement()
        let buffer = try await filler.allocate(bytes: 4096)
        benchmark.stopMeasurement()
        benchmark.measurement(refreshBytes, Int(cluster.statistics.refreshBytes - before))
        try await filler.free(buffer)
        await cluster.quiesce()
    }

    // Start-up of a 256 GiB memory node and one compute node (lazy in pool size).
    Benchmark(
        "start-up, one 256 GiB memory node and one compute node",
        configuration: .init(metrics: [.wallClock, .peakMemoryResident], maxDuration: .seconds(10), maxIterations: 10)
    ) { _ in
        let cluster = try await immediateCluster(poolBytes: 256 << 30)
        blackHole(cluster)
    }
}

/// An embedded cluster of one memory node and one compute node, without failure
/// detection (no lease traffic in the figures).
private func immediateCluster(poolBytes: UInt64) async throws -> EmbeddedCluster {
    var configuration = EmbeddedCluster.Configuration(memoryNodes: 1, poolBytesPerNode: poolBytes, computeNodes: 1)
    configuration.failureDetection = false
    return try await EmbeddedCluster.start(configuration)
}

/// `count` allocate+free pairs on each allocator, each on a task of its own.
private func pairs(_ allocators: [RemoteAllocator], count: Int) async throws {
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

/// Failures of a simulated run, counted from its tasks.
private final class Failures: Sendable {
    private let failed = Mutex(0)
    func record() { failed.withLock { $0 += 1 } }
    var count: Int { failed.withLock { $0 } }
}
