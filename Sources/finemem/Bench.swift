import ArgumentParser
import FineMem
import FineMemHarness

struct Bench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Measure 4 KiB allocation in virtual time: round trips, CAS retries, latency, metadata overhead.",
        discussion: """
            Runs the allocate/free microbenchmark (4 KiB blocks, each task frees a random held \
            block 45 % of the time) in deterministic virtual time with the default latency \
            model, once with one task and once with compute nodes x tasks (16 x 32 = 512 by \
            default), and prints hardware-independent figures (round trips and verbs on the \
            critical path, CAS retries) next to modelled latencies; then the CPU cost of the \
            fast path: 4 KiB allocate+free pairs through the public API on real threads \
            (immediate mode), with 1 and 2 tasks, wall time per pair and tasks spawned per \
            pair. Build in release.
            """
    )

    @Option(help: "Compute nodes of the loaded run.") var computeNodes = 16
    @Option(name: .customLong("tasks"), help: "Tasks per compute node of the loaded run (32; 8 with --traces).") var tasksOption: Int?
    @Option(help: "Operations per task.") var operations = 200
    @Option(help: "Pool size of the memory node.") var poolSize = ByteCount(bytes: 1 << 30)
    @Option(help: "Seed.") var seed: UInt64 = 1
    @Option(help: "Contention mark threshold (CAS failures before a span is marked contended).") var contentionHigh = AllocatorConfiguration().contentionHigh
    @Option(help: "Allocate+free pairs per task of the immediate-mode runs (0 skips them).") var pairs = 200_000
    @Option(help: "Pool of the refresh run: full of 1 GiB blocks, one freed by another node.") var refreshPoolSize = ByteCount(bytes: 256 << 30)
    @Flag(help: "Skip the refresh run.") var skipRefresh = false
    @Flag(help: "Replay the allocator-shaped traces instead (tcmalloc, jemalloc, ptmalloc, mimalloc; each with room and to exhaustion).")
    var traces = false
    @Option(help: "Memory nodes of the trace replays.") var memoryNodes = 2
    @Option(help: "Requests per task of the trace replays.") var requests = 300
    @Option(parsing: .upToNextOption, help: "The shapes of the trace replays (all by default).") var shapes: [TraceWorkload.Shape] = TraceWorkload.Shape.allCases
    @Option(help: "How long a room summary sync waits for others of its word to join it, in nanoseconds.")
    var roomSummaryDelay = AllocatorConfiguration().roomSummaryDelayNanos

    var tasks: Int { tasksOption ?? (traces ? 8 : 32) }

    func validate() throws {
        guard computeNodes >= 1, tasks >= 1, operations >= 1, memoryNodes >= 1, requests >= 1 else { throw ValidationError("counts must be positive") }
    }

    func run() async throws {
        if traces { return try runTraces() }
        var rows: [(String, String)] = []
        for (label, nodes, perNode) in [("1 task", 1, 1), ("\(computeNodes * tasks) tasks", computeNodes, tasks)] {
            var configuration = SimulatedWorkload.Configuration()
            configuration.memoryNodes = 1
            configuration.poolBytesPerNode = poolSize.bytes
            configuration.computeNodes = nodes
            configuration.tasksPerComputeNode = perNode
            configuration.operationsPerTask = nodes * perNode == 1 ? operations * 20 : operations
            configuration.chunkCountLog2Range = 0...0
            configuration.checkInvariants = false
            configuration.allocator.contentionHigh = contentionHigh
            let clock = SystemRuntime.shared
            let started = clock.nowNanoseconds
            let report = SimulatedWorkload(configuration).run(seed: seed)
            let wall = Double(clock.nowNanoseconds - started) / 1e9
            guard report.violations.isEmpty else { throw ValidationError("the run failed: \(report.violations.prefix(3))") }
            let statistics = report.statistics
            let latencies = report.allocationLatencies.sorted()
            let average = latencies.isEmpty ? 0 : Double(latencies.reduce(0, +)) / Double(latencies.count)
            let p99 = latencies.isEmpty ? 0 : latencies[min(latencies.count - 1, latencies.count * 99 / 100)]
            rows += [
                ("\(label): allocations", "\(statistics.allocations) (\(report.outOfMemory) out of memory), \(Format.fixed(wall, 1)) s wall"),
                ("\(label): round trips per allocation", "\(Format.fixed(statistics.roundTripsPerAllocation, 3)) (verbs \(Format.fixed(statistics.verbsPerAllocation, 3)))"),
                ("\(label): CAS retries avg/max", "\(Format.fixed(statistics.casRetriesAverage, 3)) / \(statistics.casRetriesMax) (\(Format.fixed(Double(statistics.casRetriesOnPendingLog) / Double(max(1, statistics.allocations)), 3)) per allocation lost to a pending log)"),
                ("\(label): modelled latency avg/p99", "\(Format.fixed(average / 1_000, 2)) / \(Format.fixed(Double(p99) / 1_000, 2)) us"),
                ("\(label): spans opened / closed, refreshes", "\(statistics.spansOpened) / \(statistics.spansClosed), \(statistics.refreshes)"),
                ("\(label): upkeep round trips per operation", "\(Format.fixed(Double(statistics.upkeepBatches) / Double(max(1, statistics.allocations + statistics.frees)), 3)) (after the answer: log flushes, span and section state)"),
            ]
        }
        if pairs > 0 {
            for tasks in [1, 2] {
                let figures = try await PairBenchmark.run(tasks: tasks, pairsPerTask: pairs)
                rows += [
                    ("immediate, \(tasks) task(s): allocate+free pair", "\(Format.fixed(figures.nanosecondsPerPair / 1_000, 3)) us per pair per task, \(Format.fixed(figures.pairsPerSecond / 1e6, 3)) M pairs/s, \(Format.fixed(figures.cpuNanosecondsPerPair / 1_000, 3)) us CPU per pair"),
                    ("immediate, \(tasks) task(s): per pair", "\(Format.fixed(figures.batchesPerPair, 3)) round trips, \(Format.fixed(figures.spawnedTasksPerPair, 5)) tasks spawned"),
                ]
            }
        }
        if !skipRefresh {
            let figures = try await RefreshBenchmark.run(poolBytes: refreshPoolSize.bytes)
            let pool = Format.bytes(refreshPoolSize.bytes)
            rows += [
                ("immediate, \(pool) pool: start-up", "\(Format.fixed(Double(figures.startUpNanoseconds) / 1e6, 2)) ms (one memory node, two compute nodes)"),
                ("immediate, \(pool) pool: refresh, summary", "\(Format.bytes(figures.summaryBytes)) read, \(Format.fixed(Double(figures.summaryNanoseconds) / 1e3, 1)) us (the 4 KiB allocation that needed it)"),
                ("immediate, \(pool) pool: refresh, full", "\(Format.fixed(Double(figures.fullBytes) / Double(1 << 20), 1)) MiB read, \(Format.fixed(Double(figures.fullNanoseconds) / 1e3, 1)) us"),
            ]
        }
        let geometry = try PoolGeometry(dataBytes: poolSize.bytes)
        rows.append(("metadata overhead", "\(Format.fixed(geometry.metadataOverheadPercent, 3)) % of \(Format.bytes(geometry.dataBytes))"))
        print(Format.table(rows))
    }
}
