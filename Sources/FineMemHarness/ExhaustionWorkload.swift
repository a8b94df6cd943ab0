import FineMem

/// A seeded workload that runs pools to exhaustion and back, in virtual time: in each
/// round every task allocates (mostly 2 MiB blocks, as the paper's tcmalloc traces) until
/// it is answered `outOfMemory`; once every task is, the answers are checked against the
/// pool, and everyone frees everything. Near a full pool the answer must be a block if one
/// exists anywhere and a prompt `outOfMemory` otherwise: never another error.
///
/// In `.churn` mode the pool is kept near exhaustion instead: every task allocates until
/// it is answered `outOfMemory`, and once all are, each goes on for `churnOperations`
/// steps, freeing one of its blocks (after every `outOfMemory`, and in `churnFreePercent`
/// of the other steps) or allocating, so that room appears and goes while allocations are
/// in flight; then everyone frees everything. Every `outOfMemory` answer of that mode is
/// checked by `OutOfMemoryOracle` (DESIGN.md invariant 7: the pool had no room for the
/// request at some instant during the call, as its header words show), which the rounds
/// cannot check: room never appears during their calls.
package struct ExhaustionWorkload: Sendable {
    package enum Mode: String, Sendable, Hashable, CaseIterable {
        /// Fill every pool, check, free everything; `rounds` times.
        case rounds
        /// Fill every pool, then free and allocate near exhaustion, each `outOfMemory`
        /// checked during its call; once.
        case churn
    }

    package struct Configuration: Sendable, Hashable {
        package var mode = Mode.rounds
        package var memoryNodes = 2
        package var poolBytesPerNode: UInt64 = 64 << 20
        package var computeNodes = 16
        package var tasksPerComputeNode = 8
        package var rounds = 2
        /// Percent of requests for 2 MiB; the rest are 4 KiB-1 MiB (`smallPercent`) and
        /// 4-8 MiB.
        package var twoMiBPercent = 70
        package var smallPercent = 20
        package var allocator = AllocatorConfiguration()
        package var latency = LatencyModel()
        package var exploration = ScheduleExploration.none
        /// With `.churn`: steps of each task after the fill.
        package var churnOperations = 40
        /// With `.churn`: percent of a task's steps (other than those right after an
        /// `outOfMemory`) that free one of its blocks.
        package var churnFreePercent = 40
        /// Whether `OutOfMemoryOracle` checks every `outOfMemory` during its call in
        /// `.rounds` mode too (`.churn` always does). It looks at the pool after every
        /// change of a header while calls are in flight: for small pools.
        package var outOfMemoryOracle = false

        package init() {}

        /// `.churn` on one memory node of 32 MiB (16 sections: room for 4 cache shards of
        /// 4 sections), 4 compute nodes x 8 tasks, 40 steps each, 60 % of the requests for
        /// 4 KiB-1 MiB, 30 % for 2 MiB, 10 % for 4-8 MiB: small enough for the oracle's
        /// look at the pool after every header change.
        package static func churn() -> Configuration {
            var configuration = Configuration()
            configuration.mode = .churn
            configuration.memoryNodes = 1
            configuration.poolBytesPerNode = 32 << 20
            configuration.computeNodes = 4
            configuration.tasksPerComputeNode = 8
            configuration.twoMiBPercent = 30
            configuration.smallPercent = 60
            configuration.churnOperations = 40
            return configuration
        }

        /// Whether the oracle runs.
        var checksOutOfMemoryDuringCalls: Bool { mode == .churn || outOfMemoryOracle }
    }

    package struct Report: WorkloadReport, CustomStringConvertible {
        package var seed: UInt64
        package var allocations = 0
        package var outOfMemory = 0
        /// Answers other than a block or `outOfMemory` (a retry limit, a fabric error).
        package var wrongAnswers: [String] = []
        /// Invariant violations, `outOfMemory` answers for a size that the pool still had
        /// room for once every task had stopped, and (with the oracle) `outOfMemory`
        /// answers whose call never saw the pool without room for it.
        package var violations: [String] = []
        package var frees = 0
        /// `outOfMemory` answers the oracle checked, and how often it looked at a pool.
        package var outOfMemoryChecked = 0
        package var oracleLooks = 0
        package var statistics = AllocatorStatistics()
        package var allocationLatencies: [UInt64] = []
        package var virtualNanoseconds: UInt64 = 0
        package var traceHash = TraceHash()
        package var cacheShards = 0
        package var lanes = 0

        package init(seed: UInt64) { self.seed = seed }

        package var description: String {
            "seed \(seed): \(allocations) allocations, \(frees) frees, \(outOfMemory) out of memory (\(outOfMemoryChecked) checked during the call), "
                + "\(wrongAnswers.count) wrong answers, \(violations.count) violations, \(virtualNanoseconds / 1_000) us virtual"
        }
    }

    package let configuration: Configuration

    package init(_ configuration: Configuration) { self.configuration = configuration }

    /// Runs the workload with `seed`. Same seed, same report.
    package func run(seed: UInt64) -> Report {
        let configuration = configuration
        return Report.simulate(seed: seed, latency: configuration.latency, exploration: configuration.exploration) { simulator, report in
            await Self.drive(configuration, simulator: simulator, report: report)
        }
    }

    /// What the tasks of a round share: how many have stopped allocating, and the sizes
    /// answered `outOfMemory`.
    private struct RoundState {
        var stopped = 0
        var outOfMemorySizes: Set<Int> = []
    }

    private static func drawSize(_ configuration: Configuration, _ random: inout SeededRandom) -> Int {
        let pick = Int(random.next() % 100)
        if pick < configuration.twoMiBPercent { return 9 }
        if pick < configuration.twoMiBPercent + configuration.smallPercent { return Int(random.next() % 9) }
        return 10 + Int(random.next() % 2)
    }

    /// What one allocation answered.
    private enum Answer {
        case block(Block)
        /// `outOfMemory`, counted (and checked by the oracle, if any).
        case outOfMemory
        /// Another error, recorded as a wrong answer.
        case failed

        var block: Block? { if case .block(let block) = self { block } else { nil } }
    }

    /// One task's allocation of `2^size` chunks, with the ledger and the oracle.
    private static func allocateOnce(
        _ size: Int, blocks: BlockAllocator, application: ApplicationID, simulator: Simulator, inspector: Locked<PoolInspector>,
        oracle: OutOfMemoryOracle?, report: Locked<Report>, context: String
    ) async -> Answer {
        let start = simulator.nowNanoseconds
        let call = oracle?.begin(chunkCountLog2: size)
        do throws(AllocationError) {
            let block = try await blocks.allocate(chunkCountLog2: size, application: application)
            if let call { oracle?.end(call) }
            let problems = inspector.withLock { $0.admit(block, owner: blocks.owner) }
            report.withLock { report in
                report.allocations += 1
                report.allocationLatencies.append(simulator.nowNanoseconds - start)
                report.violations += problems
            }
            return .block(block)
        } catch {
            guard case .outOfMemory = error else {
                if let call { oracle?.end(call) }
                report.withLock { $0.wrongAnswers.append("\(context): allocation of 2^\(size) chunks by \(blocks.owner) application \(application.rawValue): \(error)") }
                return .failed
            }
            let violation = call.flatMap { oracle?.outOfMemory($0) }
            report.withLock { report in
                report.outOfMemory += 1
                if call != nil { report.outOfMemoryChecked += 1 }
                if let violation { report.violations.append("\(context): \(blocks.owner) application \(application.rawValue): \(violation)") }
            }
            return .outOfMemory
        }
    }

    private static func drive(_ configuration: Configuration, simulator: Simulator, report: Locked<Report>) async {
        guard let cluster = await startCluster(
            .init(memoryNodes: configuration.memoryNodes, poolBytesPerNode: configuration.poolBytesPerNode,
                  computeNodes: configuration.computeNodes, allocator: configuration.allocator),
            simulator: simulator, report: report)
        else { return }
        let inspector = Locked(PoolInspector(cluster: cluster))
        let oracle = configuration.checksOutOfMemoryDuringCalls ? OutOfMemoryOracle(cluster: cluster, simulator: simulator) : nil
        let taskCount = configuration.computeNodes * configuration.tasksPerComputeNode
        let seeds = (0..<taskCount).map { _ in simulator.forkSeed() }
        switch configuration.mode {
        case .rounds:
            for round in 0..<configuration.rounds {
                await runRound(round, configuration, seeds: seeds, cluster: cluster, simulator: simulator, inspector: inspector, oracle: oracle, report: report)
            }
        case .churn:
            await runChurn(configuration, seeds: seeds, cluster: cluster, simulator: simulator, inspector: inspector, oracle: oracle, report: report)
        }
        let looks = oracle?.poolLooks ?? 0
        report.withLock { report in
            report.statistics = cluster.statistics
            report.oracleLooks = looks
        }
    }

    private static func runRound(
        _ round: Int, _ configuration: Configuration, seeds: [UInt64], cluster: EmbeddedCluster, simulator: Simulator, inspector: Locked<PoolInspector>,
        oracle: OutOfMemoryOracle?, report: Locked<Report>
    ) async {
        let taskCount = seeds.count
        let state = Locked(RoundState())
        await withTaskGroup(of: Void.self) { group in
            for (index, seed) in seeds.enumerated() {
                let blocks = cluster.computeNodes[index / configuration.tasksPerComputeNode]
                let application = ApplicationID(UInt16(index % configuration.tasksPerComputeNode + 1))
                group.addTask {
                    var random = SeededRandom(seed: seed &+ UInt64(round))
                    var held: [Block] = []
                    await simulator.sleep(nanoseconds: random.next() % 20_000)
                    while true {
                        let size = drawSize(configuration, &random)
                        let answer = await allocateOnce(
                            size, blocks: blocks, application: application, simulator: simulator, inspector: inspector, oracle: oracle, report: report,
                            context: "round \(round)")
                        guard let block = answer.block else {
                            if case .outOfMemory = answer { state.withLock { _ = $0.outOfMemorySizes.insert(size) } }
                            break
                        }
                        held.append(block)
                    }
                    state.withLock { $0.stopped += 1 }
                    while state.withLock({ $0.stopped < taskCount + 1 }) { await simulator.sleep(nanoseconds: 10_000) }
                    for block in held {
                        let released = inspector.withLock { $0.release(block) }
                        do throws(AllocationError) { try await blocks.free(block, application: application) } catch {
                            report.withLock { $0.wrongAnswers.append("round \(round): free of \(block): \(error)") }
                        }
                        report.withLock { $0.violations += released }
                    }
                }
            }
            // The coordinator: once every task has stopped, check every "no room" answer.
            group.addTask {
                while state.withLock({ $0.stopped < taskCount }) { await simulator.sleep(nanoseconds: 10_000) }
                await cluster.quiesce()
                let sizes = state.withLock { $0.outOfMemorySizes }
                let problems = inspector.withLock { $0.checkAtRestAfterOutOfMemory(sizes: sizes) }
                report.withLock { $0.violations += problems.map { "round \(round): \($0)" } }
                state.withLock { $0.stopped += 1 }
            }
        }
        await cluster.quiesce()
        let problems = inspector.withLock { $0.checkAtRest() + $0.checkRoomSummary() + $0.everyHeaderEmpty() }
        report.withLock { $0.violations += problems.map { "round \(round) after the frees: \($0)" } }
    }

    /// `.churn`: fill, then free and allocate near exhaustion, then free everything.
    private static func runChurn(
        _ configuration: Configuration, seeds: [UInt64], cluster: EmbeddedCluster, simulator: Simulator, inspector: Locked<PoolInspector>,
        oracle: OutOfMemoryOracle?, report: Locked<Report>
    ) async {
        let taskCount = seeds.count
        let filled = Locked(0)
        await withTaskGroup(of: Void.self) { group in
            for (index, seed) in seeds.enumerated() {
                let blocks = cluster.computeNodes[index / configuration.tasksPerComputeNode]
                let application = ApplicationID(UInt16(index % configuration.tasksPerComputeNode + 1))
                group.addTask {
                    var random = SeededRandom(seed: seed)
                    var held: [Block] = []
                    func free(_ context: String) async {
                        let block = held.remove(at: Int(random.next() % UInt64(held.count)))
                        let released = inspector.withLock { $0.release(block) }
                        do throws(AllocationError) {
                            try await blocks.free(block, application: application)
                            report.withLock { $0.frees += 1 }
                        } catch {
                            report.withLock { $0.wrongAnswers.append("\(context): free of \(block): \(error)") }
                        }
                        report.withLock { $0.violations += released }
                    }
                    await simulator.sleep(nanoseconds: random.next() % 20_000)
                    // The fill: allocate until out of memory, then wait for every task.
                    while let block = await allocateOnce(
                        drawSize(configuration, &random), blocks: blocks, application: application, simulator: simulator, inspector: inspector,
                        oracle: oracle, report: report, context: "fill").block {
                        held.append(block)
                    }
                    filled.withLock { $0 += 1 }
                    while filled.withLock({ $0 < taskCount }) { await simulator.sleep(nanoseconds: 5_000) }
                    // The churn: room appears and goes while allocations are in flight.
                    var wasOutOfMemory = true
                    for step in 0..<configuration.churnOperations {
                        await simulator.sleep(nanoseconds: random.next() % 5_000)
                        if !held.isEmpty, wasOutOfMemory || Int(random.next() % 100) < configuration.churnFreePercent {
                            await free("churn step \(step)")
                            wasOutOfMemory = false
                            continue
                        }
                        if let block = await allocateOnce(
                            drawSize(configuration, &random), blocks: blocks, application: application, simulator: simulator, inspector: inspector,
                            oracle: oracle, report: report, context: "churn step \(step)").block {
                            held.append(block)
                            wasOutOfMemory = false
                        } else {
                            wasOutOfMemory = true
                        }
                    }
                    while !held.isEmpty { await free("the end") }
                }
            }
        }
        await cluster.quiesce()
        let problems = inspector.withLock { $0.checkAtRest() + $0.checkRoomSummary() + $0.everyHeaderEmpty() }
        report.withLock { $0.violations += problems.map { "after the frees: \($0)" } }
    }
}
