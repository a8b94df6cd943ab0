/// A seeded workload that runs pools to exhaustion and back, in virtual time: in each
/// round every task allocates (mostly 2 MiB blocks, as the paper's tcmalloc traces) until
/// it is answered `outOfMemory`; once every task is, the answers are checked against the
/// pool, and everyone frees everything. Near a full pool the answer must be a block if one
/// exists anywhere and a prompt `outOfMemory` otherwise: never another error.
package struct ExhaustionWorkload: Sendable {
    package struct Configuration: Sendable, Hashable {
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

        package init() {}
    }

    package struct Report: WorkloadReport, CustomStringConvertible {
        package var seed: UInt64
        package var allocations = 0
        package var outOfMemory = 0
        /// Answers other than a block or `outOfMemory` (a retry limit, a fabric error).
        package var wrongAnswers: [String] = []
        /// Invariant violations, and `outOfMemory` answers for a size that the pool still
        /// had room for once every task had stopped.
        package var violations: [String] = []
        package var statistics = AllocatorStatistics()
        package var allocationLatencies: [UInt64] = []
        package var virtualNanoseconds: UInt64 = 0
        package var traceHash = TraceHash()
        package var cacheShards = 0
        package var lanes = 0

        package init(seed: UInt64) { self.seed = seed }

        package var description: String {
            "seed \(seed): \(allocations) allocations, \(outOfMemory) out of memory, \(wrongAnswers.count) wrong answers, "
                + "\(violations.count) violations, \(virtualNanoseconds / 1_000) us virtual"
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

    private static func drive(_ configuration: Configuration, simulator: Simulator, report: Locked<Report>) async {
        guard let cluster = await startCluster(
            .init(memoryNodes: configuration.memoryNodes, poolBytesPerNode: configuration.poolBytesPerNode,
                  computeNodes: configuration.computeNodes, allocator: configuration.allocator),
            simulator: simulator, report: report)
        else { return }
        let inspector = Locked(PoolInspector(cluster: cluster))
        let taskCount = configuration.computeNodes * configuration.tasksPerComputeNode
        let seeds = (0..<taskCount).map { _ in simulator.forkSeed() }
        for round in 0..<configuration.rounds {
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
                            let start = simulator.nowNanoseconds
                            do throws(AllocationError) {
                                let block = try await blocks.allocate(chunkCountLog2: size, application: application)
                                held.append(block)
                                let problems = inspector.withLock { $0.admit(block, owner: blocks.owner) }
                                report.withLock { report in
                                    report.allocations += 1
                                    report.allocationLatencies.append(simulator.nowNanoseconds - start)
                                    report.violations += problems
                                }
                            } catch {
                                if case .outOfMemory = error {
                                    report.withLock { $0.outOfMemory += 1 }
                                    state.withLock { _ = $0.outOfMemorySizes.insert(size) }
                                    break
                                }
                                report.withLock { $0.wrongAnswers.append("round \(round): allocation of 2^\(size) chunks: \(error)") }
                                break
                            }
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
                    let problems = inspector.withLock { inspector in
                        inspector.checkAtRest() + inspector.checkRoomSummary() + sizes.sorted().compactMap { size in
                            inspector.freeRunExists(chunkCountLog2: size)
                                ? "round \(round): out of memory for 2^\(size) chunks, but the full pool still has such a run" : nil
                        }
                    }
                    report.withLock { $0.violations += problems }
                    state.withLock { $0.stopped += 1 }
                }
            }
            await cluster.quiesce()
            let problems = inspector.withLock { $0.checkAtRest() + $0.checkRoomSummary() + $0.everyHeaderEmpty() }
            report.withLock { $0.violations += problems.map { "round \(round) after the frees: \($0)" } }
        }
        report.withLock { $0.statistics = cluster.statistics }
    }
}
