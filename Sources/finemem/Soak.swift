#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import ArgumentParser
import Dispatch
import FineMem
import FineMemHarness
import Synchronization

struct Soak: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the simulated workload for many seeds, checking the invariants after every operation.",
        discussion: """
            Each seed runs compute nodes x tasks in deterministic virtual time with mixed \
            block sizes (4 KiB-8 MiB by default). A failing seed is printed with its \
            violations and the command that reproduces it exactly (the same seed and \
            the same flags, `--explore` included). `--explore` adds PCT-style schedule \
            exploration: random node priorities that reorder and delay nodes against \
            each other, with `--change-points` priority drops per run. Build in release \
            for speed: swift run -c release finemem soak --seeds 500

            `--workload exhaustion` runs pools to exhaustion and back instead (mostly \
            2 MiB blocks, two memory nodes by default): every answer must be a block or \
            an `outOfMemory` that the full pool confirms; it prints CAS retries, \
            refreshes and latency.

            `--workload churn` keeps one pool near exhaustion (1 memory node, 4 compute \
            nodes by default; 60 % of requests 4 KiB-1 MiB, 30 % 2 MiB): every task fills \
            until out of memory, then frees and allocates for --operations steps while the \
            others do, so that room appears during allocations; every out-of-memory \
            answer must come from a call during which the pool, as its header words show \
            after each change, had no room for the request at some instant (DESIGN.md \
            invariant 7). Keep the pool small (16-32 MiB): the check looks at every header \
            after every change.

            `--workload trace` replays allocator-shaped streams (`--shape`: tcmalloc, all \
            2 MiB; jemalloc and ptmalloc, mostly 4 KiB; mimalloc, median 64 KiB), in bursts, \
            --operations requests per task, every block held to the end, in a pool of \
            --pool-percent of the replay's expected demand (below 100 it runs out); every \
            block is checked as it comes, the headers after every operation, and every \
            out-of-memory answer against the full pool once all tasks have stopped.
            """
    )

    enum Workload: String, ExpressibleByArgument, CaseIterable {
        case mixed, exhaustion, churn, trace
    }

    @Option(help: "How many seeds to run.") var seeds = 20
    @Option(help: "The first seed.") var startSeed: UInt64 = 1
    @Option(help: "Memory nodes (0: alternate 1 and 3 by seed).") var memoryNodes = 0
    @Option(help: "Pool size of each memory node.") var poolSize = ByteCount(bytes: 64 << 20)
    @Option(help: "Compute nodes (16; 4 with --workload churn).") var computeNodes: Int?
    @Option(help: "Tasks per compute node.") var tasks = 8
    @Option(help: "Operations per task (with --workload churn: steps after the fill).") var operations = 40
    @Option(help: "Largest block.") var maxBlock = ByteCount(bytes: 8 << 20)
    @Flag(help: "Explore schedules with random node priorities (PCT-style).") var explore = false
    @Option(help: "Priority change points per run with --explore.") var changePoints = 3
    @Option(help: "mixed (allocate and free at random), exhaustion (fill every pool, then free) or churn (free and allocate near exhaustion, each out-of-memory answer checked during its call).")
    var workload = Workload.mixed
    @Option(help: "Rounds of fill and free per seed, with --workload exhaustion.") var rounds = 2
    @Option(help: "The allocator whose stream --workload trace imitates: tcmalloc, jemalloc, ptmalloc or mimalloc.")
    var shape = TraceWorkload.Shape.jemalloc
    @Option(help: "With --workload trace: the pool as a percentage of the replay's expected demand.") var poolPercent = 50
    @Option(help: "Shards of each compute node's header cache (of at least 4 sections each; 1 by default in virtual time).") var cacheShards = 1
    @Flag(help: "Print each seed's trace hash and virtual time (to tell whether two builds run the same simulation).")
    var traces = false
    @Option(help: "Seeds simulated at once, each on a thread of its own (default: one per processor). Every seed runs as alone; the output comes in seed order.")
    var jobs: Int?

    func validate() throws {
        guard seeds >= 1, poolPercent >= 1, (computeNodes ?? 1) >= 1, tasks >= 1, operations >= 1, memoryNodes >= 0, changePoints >= 0, (jobs ?? 1) >= 1, cacheShards >= 1 else {
            throw ValidationError("counts must be positive")
        }
        // A shard holds at least 4 sections: a smaller pool silently gets fewer shards.
        guard poolSize.bytes >= UInt64(cacheShards) * 4 * (2 << 20) else {
            throw ValidationError("--cache-shards \(cacheShards) needs a pool of at least \(Format.bytes(UInt64(cacheShards) * 8 << 20)) (4 sections of 2 MiB per shard)")
        }
        guard maxBlock.bytes >= 4096, maxBlock.bytes.nonzeroBitCount == 1 else { throw ValidationError("--max-block must be a power of two from 4KiB") }
    }

    func run() throws {
        if workload == .trace { return try runTrace() }
        if workload != .mixed {
            try runExhaustion()
            return
        }
        var configuration = SimulatedWorkload.Configuration()
        configuration.poolBytesPerNode = poolSize.bytes
        configuration.computeNodes = computeNodes ?? 16
        configuration.tasksPerComputeNode = tasks
        configuration.operationsPerTask = operations
        configuration.chunkCountLog2Range = 0...Block.chunkCountLog2(forBytes: maxBlock.bytes)
        configuration.allocator.cacheShards = cacheShards
        configuration.exploration = explore ? .randomPriorities(changePoints: changePoints) : .none
        print("schedule exploration: \(configuration.exploration)\(cacheShards > 1 ? ", \(cacheShards) cache shards and \(cacheShards + 1) queue pairs per compute node" : "")")
        let clock = SystemRuntime.shared
        let start = clock.nowNanoseconds
        let workers = min(jobs ?? Self.processorCount, seeds)
        // Each worker takes the next seed and runs it on its own simulator; the ledger
        // prints the reports in seed order as they complete.
        let ledger = Mutex(Ledger(nextSeed: startSeed, nextToPrint: startSeed))
        let base = configuration
        DispatchQueue.concurrentPerform(iterations: workers) { _ in
            while true {
                let next = ledger.withLock { ledger -> UInt64? in
                    guard ledger.nextSeed < startSeed + UInt64(seeds) else { return nil }
                    defer { ledger.nextSeed += 1 }
                    return ledger.nextSeed
                }
                guard let seed = next else { return }
                var configuration = base
                configuration.memoryNodes = memoryNodes > 0 ? memoryNodes : (seed % 3 == 0 ? 3 : 1)
                let report = SimulatedWorkload(configuration).run(seed: seed)
                ledger.withLock { ledger in
                    ledger.completed[seed] = report
                    while let report = ledger.completed.removeValue(forKey: ledger.nextToPrint) {
                        ledger.nextToPrint += 1
                        ledger.record(report, soak: self, seeds: seeds, startSeed: startSeed, wallNanoseconds: clock.nowNanoseconds - start)
                    }
                }
            }
        }
        let failed = ledger.withLock { $0.failed }
        if !failed.isEmpty {
            print("failing seeds: \(failed.map(String.init).joined(separator: " "))")
            throw ExitCode.failure
        }
    }

    /// The seeds of a mixed soak handed out and the reports printed so far.
    private struct Ledger: ~Copyable {
        var nextSeed: UInt64
        var nextToPrint: UInt64
        var completed: [UInt64: SimulatedWorkload.Report] = [:]
        var failed: [UInt64] = []
        var allocations = 0

        /// Prints the report of the next seed in order, and the progress every 10 seeds.
        mutating func record(_ report: SimulatedWorkload.Report, soak: Soak, seeds: Int, startSeed: UInt64, wallNanoseconds: UInt64) {
            let seed = report.seed
            allocations += report.allocations
            if soak.traces { print("seed \(seed): trace \(report.traceHash), \(report.virtualNanoseconds) ns virtual") }
            if report.cacheShards != soak.cacheShards {
                // The mark: a soak that asks for shards must run on them.
                failed.append(seed)
                print("FAILED \(report): set-up: \(report.cacheShards) cache shards and \(report.lanes) lanes, not \(soak.cacheShards)")
            } else if !report.violations.isEmpty {
                failed.append(seed)
                print("FAILED \(report)")
                for violation in report.violations.prefix(10) { print("  \(violation)") }
                print("  replay: \(soak.replayCommand(seed: seed))")
            }
            let done = Int(seed - startSeed) + 1
            if done % 10 == 0 || done == seeds {
                let minutes = Double(wallNanoseconds) / 60e9
                print("\(done)/\(seeds) seeds, \(failed.count) failed, \(allocations) allocations, \(Format.fixed(Double(done) / minutes, 1)) seeds per minute")
            }
        }
    }

    /// Processors online: the default number of seeds run at once.
    private static var processorCount: Int { max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))) }

    /// The exhaustion or churn workload for every seed, with its figures.
    private func runExhaustion() throws {
        let churn = workload == .churn
        var configuration = churn ? ExhaustionWorkload.Configuration.churn() : ExhaustionWorkload.Configuration()
        configuration.memoryNodes = memoryNodes > 0 ? memoryNodes : (churn ? 1 : 2)
        configuration.poolBytesPerNode = poolSize.bytes
        configuration.computeNodes = computeNodes ?? (churn ? 4 : 16)
        configuration.tasksPerComputeNode = tasks
        configuration.rounds = rounds
        configuration.churnOperations = operations
        configuration.allocator.cacheShards = cacheShards
        configuration.exploration = explore ? .randomPriorities(changePoints: changePoints) : .none
        let shape = churn ? "\(operations) churn steps per task" : "\(rounds) rounds"
        print("\(workload.rawValue) workload: \(configuration.memoryNodes) x \(Format.bytes(poolSize.bytes)), \(configuration.computeNodes) x \(tasks) tasks, "
              + "\(cacheShards) cache shards, \(shape), schedule exploration: \(configuration.exploration)")
        let clock = SystemRuntime.shared
        let start = clock.nowNanoseconds
        var failed: [UInt64] = []
        var statistics = AllocatorStatistics()
        var latencies: [UInt64] = []
        var outOfMemory = 0
        var outOfMemoryChecked = 0
        var wrongAnswers = 0
        for seed in startSeed..<startSeed + UInt64(seeds) {
            let report = ExhaustionWorkload(configuration).run(seed: seed)
            if traces { print("seed \(seed): trace \(report.traceHash), \(report.virtualNanoseconds) ns virtual") }
            wrongAnswers += report.wrongAnswers.count
            statistics = statistics + report.statistics
            latencies += report.allocationLatencies
            outOfMemory += report.outOfMemory
            outOfMemoryChecked += report.outOfMemoryChecked
            let setUp = report.cacheShards == cacheShards ? [] : ["set-up: \(report.cacheShards) cache shards and \(report.lanes) lanes, not \(cacheShards)"]
            if !report.wrongAnswers.isEmpty || !report.violations.isEmpty || !setUp.isEmpty {
                failed.append(seed)
                print("FAILED \(report)")
                for problem in setUp { print("  \(problem)") }
                for problem in (report.wrongAnswers + report.violations).prefix(10) { print("  \(problem)") }
                print("  replay: \(replayCommand(seed: seed))")
            }
        }
        latencies.sort()
        let average = latencies.isEmpty ? 0 : Double(latencies.reduce(0, +)) / Double(latencies.count)
        let p99 = latencies.isEmpty ? 0 : latencies[min(latencies.count - 1, latencies.count * 99 / 100)]
        print(Format.table([
            ("seeds", "\(seeds), \(failed.count) failed, \(Format.fixed(Double(clock.nowNanoseconds - start) / 1e9, 1)) s wall"),
            ("allocations", "\(statistics.allocations) (\(outOfMemory) answered out of memory\(churn ? ", \(outOfMemoryChecked) checked during the call" : ""))"),
            ("retry-limit and other wrong answers", "\(wrongAnswers)"),
            ("CAS retries avg/max", "\(Format.fixed(statistics.casRetriesAverage, 3)) / \(statistics.casRetriesMax)"),
            ("full refreshes / shared", "\(statistics.refreshes) / \(statistics.refreshesShared)"),
            ("round trips per allocation", Format.fixed(statistics.roundTripsPerAllocation, 3)),
            ("modelled latency avg/p99", "\(Format.fixed(average / 1_000, 2)) / \(Format.fixed(Double(p99) / 1_000, 2)) us"),
        ]))
        if !failed.isEmpty {
            print("failing seeds: \(failed.map(String.init).joined(separator: " "))")
            throw ExitCode.failure
        }
    }

    /// The command that reruns exactly `seed`: every flag that shapes the run.
    private func replayCommand(seed: UInt64) -> String {
        var flags = [
            "--start-seed \(seed)", "--seeds 1", "--memory-nodes \(memoryNodes)", "--pool-size \(poolSize.bytes)",
            "--compute-nodes \(computeNodes ?? (workload == .churn ? 4 : 16))", "--tasks \(tasks)", "--operations \(operations)", "--max-block \(maxBlock.bytes)",
        ]
        if cacheShards != 1 { flags.append("--cache-shards \(cacheShards)") }
        if explore { flags += ["--explore", "--change-points \(changePoints)"] }
        if workload == .exhaustion { flags += ["--workload exhaustion", "--rounds \(rounds)"] }
        if workload == .churn { flags.append("--workload churn") }
        if workload == .trace { flags += ["--workload trace", "--shape \(shape.rawValue)", "--pool-percent \(poolPercent)"] }
        return "swift run -c release finemem soak " + flags.joined(separator: " ")
    }

    /// The trace replay for every seed, one line each.
    private func runTrace() throws {
        var configuration = TraceWorkload.Configuration()
        configuration.shape = shape
        configuration.memoryNodes = memoryNodes > 0 ? memoryNodes : 2
        configuration.computeNodes = computeNodes ?? 4
        configuration.tasksPerComputeNode = tasks
        configuration.requestsPerTask = operations
        configuration.poolPercentOfDemand = poolPercent
        configuration.allocator.cacheShards = cacheShards
        configuration.exploration = explore ? .randomPriorities(changePoints: changePoints) : .none
        configuration.checkStructureEachOperation = true
        print("trace workload (\(shape.rawValue)): \(configuration.memoryNodes) x \(Format.bytes(configuration.poolBytesPerNode)), "
              + "\(configuration.computeNodes) x \(tasks) tasks, \(operations) requests each, schedule exploration: \(configuration.exploration)")
        var failed: [UInt64] = []
        for seed in startSeed..<startSeed + UInt64(seeds) {
            let report = TraceWorkload(configuration).run(seed: seed)
            if traces { print("seed \(seed): trace \(report.traceHash), \(report.virtualNanoseconds) ns virtual") }
            let setUp = report.cacheShards == cacheShards ? [] : ["set-up: \(report.cacheShards) cache shards, not \(cacheShards)"]
            let problems = setUp + report.wrongAnswers + report.violations
            print(problems.isEmpty ? "\(report)" : "FAILED \(report)")
            guard !problems.isEmpty else { continue }
            failed.append(seed)
            for problem in problems.prefix(10) { print("  \(problem)") }
            print("  replay: \(replayCommand(seed: seed))")
        }
        if !failed.isEmpty {
            print("failing seeds: \(failed.map(String.init).joined(separator: " "))")
            throw ExitCode.failure
        }
    }
}
