import FineMem

/// A seeded replay of allocation streams shaped like those of the allocators the paper
/// ran on FineMem (jemalloc, mimalloc, tcmalloc and ptmalloc under larson, lean, lua,
/// mstress, rptest, sh8bench and xmalloc-test, their mmap calls turned into remote
/// allocations): each task replays `requestsPerTask` requests drawn from its shape, in
/// bursts, and holds every block until the end of the replay; then every task frees
/// everything. The pool is sized from the shape's expected demand (`poolPercentOfDemand`),
/// so that one configuration runs with room and another to exhaustion.
///
/// Every answer must be a block or `outOfMemory`. Blocks are admitted to the inspector's
/// ledger as they come (no overlap, headers agree); with small pools the header structure
/// is checked after every operation too. No block is freed before the replay ends, so the
/// room of the pool only shrinks while it runs: a size answered `outOfMemory` must find no
/// free run in the full pool once every task has stopped (as `ExhaustionWorkload` checks
/// its rounds).
package struct TraceWorkload: Sendable {
    /// The allocator whose stream a trace imitates.
    package enum Shape: String, Sendable, Hashable, CaseIterable {
        /// All 2 MiB (tcmalloc's page heap grows by whole huge pages).
        case tcmalloc
        /// Mostly 4 KiB, a few larger extents (jemalloc's page runs and extents).
        case jemalloc
        /// Mostly 4 KiB, then 128 KiB-1 MiB past the mmap threshold (ptmalloc's top chunk
        /// growth and its direct mmaps).
        case ptmalloc
        /// Median 64 KiB (mimalloc's pages), some 512 KiB large pages and 4 MiB segments.
        case mimalloc

        /// Sizes as (log2 of the chunk count, weight in percent).
        package var sizes: [(chunkCountLog2: Int, percent: Int)] {
            switch self {
            case .tcmalloc: [(9, 100)]
            case .jemalloc: [(0, 82), (1, 6), (2, 4), (3, 2), (4, 3), (9, 3)]
            case .ptmalloc: [(0, 75), (1, 10), (2, 5), (5, 7), (8, 3)]
            case .mimalloc: [(0, 10), (2, 15), (4, 40), (5, 10), (7, 20), (10, 5)]
            }
        }

        /// The mean number of requests in a burst (back to back) and the mean pause
        /// between bursts, in virtual nanoseconds.
        package var burst: (requestsMean: Int, pauseNanosMean: UInt64) {
            switch self {
            case .tcmalloc: (4, 30_000)
            case .jemalloc: (16, 10_000)
            case .ptmalloc: (8, 20_000)
            case .mimalloc: (6, 15_000)
            }
        }

        /// The expected bytes of one request.
        package var meanRequestBytes: Double {
            sizes.reduce(0) { $0 + Double($1.percent) / 100 * Double(PoolGeometry.chunkBytes << UInt64($1.chunkCountLog2)) }
        }

        /// The size of one request.
        package func drawSize(_ random: inout SeededRandom) -> Int {
            var pick = Int(random.next() % 100)
            for (size, percent) in sizes {
                if pick < percent { return size }
                pick -= percent
            }
            return sizes[sizes.count - 1].chunkCountLog2
        }
    }

    package struct Configuration: Sendable, Hashable {
        package var shape = Shape.jemalloc
        package var memoryNodes = 2
        package var computeNodes = 16
        package var tasksPerComputeNode = 8
        package var requestsPerTask = 300
        /// The pool, all memory nodes together, as a percentage of the replay's expected
        /// demand (every task's requests at the shape's mean size): 200 leaves room, 50
        /// runs it out of memory halfway.
        package var poolPercentOfDemand = 200
        package var allocator = AllocatorConfiguration()
        package var latency = LatencyModel()
        package var exploration = ScheduleExploration.none
        /// Whether the structure of the headers is checked after every operation (it
        /// reads every header of the pool: for pools of a few hundred MiB).
        package var checkStructureEachOperation = false

        package init() {}

        /// Each memory node's pool: the demand share of one node, in whole sections, at
        /// least 4 sections.
        package var poolBytesPerNode: UInt64 {
            let demand = Double(computeNodes * tasksPerComputeNode * requestsPerTask) * shape.meanRequestBytes
            let perNode = demand * Double(poolPercentOfDemand) / 100 / Double(memoryNodes)
            let sections = max(4, UInt64((perNode / Double(PoolGeometry.sectionBytes)).rounded(.up)))
            return sections * PoolGeometry.sectionBytes
        }
    }

    package struct Report: WorkloadReport, CustomStringConvertible {
        package var seed: UInt64
        package var allocations = 0
        package var outOfMemory = 0
        /// Answers other than a block or `outOfMemory`.
        package var wrongAnswers: [String] = []
        package var violations: [String] = []
        package var frees = 0
        package var statistics = AllocatorStatistics()
        /// Virtual time from call to answer, blocks and `outOfMemory` answers alike.
        package var answerLatencies: [UInt64] = []
        package var virtualNanoseconds: UInt64 = 0
        package var traceHash = TraceHash()
        package var cacheShards = 0
        package var lanes = 0

        package init(seed: UInt64) { self.seed = seed }

        package var description: String {
            "seed \(seed): \(allocations) allocations, \(outOfMemory) out of memory, \(frees) frees, "
                + "\(wrongAnswers.count) wrong answers, \(violations.count) violations, \(virtualNanoseconds / 1_000) us virtual"
        }
    }

    package let configuration: Configuration

    package init(_ configuration: Configuration) { self.configuration = configuration }

    /// Runs the replay with `seed`. Same seed, same report.
    package func run(seed: UInt64) -> Report {
        let configuration = configuration
        return Report.simulate(seed: seed, latency: configuration.latency, exploration: configuration.exploration) { simulator, report in
            await Self.drive(configuration, simulator: simulator, report: report)
        }
    }

    /// What the tasks share: how many have finished their replay, and the sizes answered
    /// `outOfMemory`.
    private struct Progress {
        var replayed = 0
        var outOfMemorySizes: Set<Int> = []
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
        let progress = Locked(Progress())
        await withTaskGroup(of: Void.self) { group in
            for (index, seed) in seeds.enumerated() {
                let blocks = cluster.computeNodes[index / configuration.tasksPerComputeNode]
                let application = ApplicationID(UInt16(index % configuration.tasksPerComputeNode + 1))
                group.addTask {
                    var random = SeededRandom(seed: seed)
                    let held = await replay(configuration, random: &random, blocks: blocks, application: application,
                                            simulator: simulator, inspector: inspector, progress: progress, report: report)
                    progress.withLock { $0.replayed += 1 }
                    // Every task stops, and the answers are checked, before anyone frees.
                    while progress.withLock({ $0.replayed <= taskCount }) { await simulator.sleep(nanoseconds: 10_000) }
                    for block in held {
                        let released = inspector.withLock { $0.release(block) }
                        do throws(AllocationError) {
                            try await blocks.free(block, application: application)
                            report.withLock { $0.frees += 1 }
                        } catch {
                            report.withLock { $0.wrongAnswers.append("free of \(block): \(error)") }
                        }
                        report.withLock { $0.violations += released }
                    }
                }
            }
            group.addTask {
                while progress.withLock({ $0.replayed < taskCount }) { await simulator.sleep(nanoseconds: 10_000) }
                await cluster.quiesce()
                let sizes = progress.withLock { $0.outOfMemorySizes }
                let problems = inspector.withLock { $0.checkAtRestAfterOutOfMemory(sizes: sizes) }
                report.withLock { $0.violations += problems.map { "after the replay: \($0)" } }
                progress.withLock { $0.replayed += 1 }
            }
        }
        await cluster.quiesce()
        let problems = inspector.withLock { $0.checkAtRest() + $0.checkRoomSummary() + $0.everyHeaderEmpty() }
        report.withLock { report in
            report.violations += problems.map { "after the frees: \($0)" }
            report.statistics = cluster.statistics
        }
    }

    /// One task's replay: its requests in bursts; answers the blocks it holds.
    private static func replay(
        _ configuration: Configuration, random: inout SeededRandom, blocks: BlockAllocator, application: ApplicationID,
        simulator: Simulator, inspector: Locked<PoolInspector>, progress: Locked<Progress>, report: Locked<Report>
    ) async -> [Block] {
        let burst = configuration.shape.burst
        var held: [Block] = []
        var burstLeft = 0
        await simulator.sleep(nanoseconds: random.next() % 20_000)
        for request in 0..<configuration.requestsPerTask {
            if burstLeft == 0 {
                // Burst lengths and pauses uniform around their means: 1...2m-1, 0...2p.
                burstLeft = 1 + Int(random.next() % UInt64(2 * burst.requestsMean - 1))
                await simulator.sleep(nanoseconds: random.next() % (2 * burst.pauseNanosMean + 1))
            }
            burstLeft -= 1
            let size = configuration.shape.drawSize(&random)
            let start = simulator.nowNanoseconds
            do throws(AllocationError) {
                let block = try await blocks.allocate(chunkCountLog2: size, application: application)
                let latency = simulator.nowNanoseconds - start
                held.append(block)
                let problems = inspector.withLock { inspector in
                    inspector.admit(block, owner: blocks.owner) + (configuration.checkStructureEachOperation ? inspector.checkStructure() : [])
                }
                report.withLock { report in
                    report.allocations += 1
                    report.answerLatencies.append(latency)
                    report.violations += problems.map { "request \(request): \($0)" }
                }
            } catch {
                let latency = simulator.nowNanoseconds - start
                guard case .outOfMemory = error else {
                    report.withLock { $0.wrongAnswers.append("request \(request): 2^\(size) chunks by \(blocks.owner) application \(application.rawValue): \(error)") }
                    continue
                }
                progress.withLock { _ = $0.outOfMemorySizes.insert(size) }
                report.withLock { report in
                    report.outOfMemory += 1
                    report.answerLatencies.append(latency)
                }
            }
        }
        return held
    }
}
