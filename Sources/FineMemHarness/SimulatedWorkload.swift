import FineMem

/// A seeded allocate/free workload of many compute nodes and tasks in virtual time, with
/// the invariants checked after every operation and at the end. `swift test` runs it for
/// many seeds; `finemem soak` runs as many as asked; `finemem bench` measures with it.
package struct SimulatedWorkload: Sendable {
    package struct Configuration: Sendable, Hashable {
        package var memoryNodes = 1
        package var poolBytesPerNode: UInt64 = 64 << 20
        package var computeNodes = 16
        package var tasksPerComputeNode = 8
        package var operationsPerTask = 40
        /// Block sizes as log2 of chunks: 0 = 4 KiB ... 11 = 8 MiB. Drawn with weight
        /// halving as the size doubles, so small blocks dominate as in the paper's traces.
        package var chunkCountLog2Range: ClosedRange<Int> = 0...11
        /// Probability (percent) that a task holding blocks frees one instead of allocating.
        package var freePercent = 45
        package var checkInvariants = true
        package var allocator = AllocatorConfiguration()
        package var latency = LatencyModel()
        /// How the simulator explores schedules (`.none`: as the latency model gives); a
        /// failing seed replays only with the same setting.
        package var exploration = ScheduleExploration.none

        package init() {}
    }

    package struct Report: WorkloadReport, CustomStringConvertible {
        package var seed: UInt64
        package var allocations = 0
        package var frees = 0
        package var outOfMemory = 0
        package var virtualNanoseconds: UInt64 = 0
        package var traceHash = TraceHash()
        package var cacheShards = 0
        package var lanes = 0
        package var statistics = AllocatorStatistics()
        package var violations: [String] = []
        package var allocationLatencies: [UInt64] = []

        package init(seed: UInt64) { self.seed = seed }

        package var description: String {
            "seed \(seed): \(allocations) allocations, \(frees) frees, \(outOfMemory) out of memory, "
                + "\(virtualNanoseconds / 1_000) us virtual, trace \(traceHash), \(violations.count) violations"
        }
    }

    package let configuration: Configuration

    package init(_ configuration: Configuration) { self.configuration = configuration }

    /// Runs the workload with `seed` and answers what happened. Same seed, same report.
    package func run(seed: UInt64) -> Report {
        let configuration = configuration
        return Report.simulate(seed: seed, latency: configuration.latency, exploration: configuration.exploration) { simulator, report in
            await Self.drive(configuration, simulator: simulator, report: report)
        }
    }

    private static func drawSize(_ range: ClosedRange<Int>, _ random: inout SeededRandom) -> Int {
        // Weight 2^(upper - k) for size k.
        let total = (1 << (range.count)) - 1
        var pick = Int(random.next() % UInt64(total))
        for chunkCountLog2 in range {
            let weight = 1 << (range.upperBound - chunkCountLog2)
            if pick < weight { return chunkCountLog2 }
            pick -= weight
        }
        return range.lowerBound
    }

    private static func drive(_ configuration: Configuration, simulator: Simulator, report: Locked<Report>) async {
        guard let cluster = await startCluster(
            .init(memoryNodes: configuration.memoryNodes, poolBytesPerNode: configuration.poolBytesPerNode,
                  computeNodes: configuration.computeNodes, allocator: configuration.allocator),
            simulator: simulator, report: report)
        else { return }
        let inspector = PoolInspector(cluster: cluster)
        let check = configuration.checkInvariants
        func note(_ problems: [String]) {
            if !problems.isEmpty { report.withLock { $0.violations += problems } }
        }
        let seeds = (0..<configuration.computeNodes * configuration.tasksPerComputeNode).map { _ in simulator.forkSeed() }
        await withTaskGroup(of: Void.self) { group in
            for (index, seed) in seeds.enumerated() {
                let computeNode = index / configuration.tasksPerComputeNode
                let blocks = cluster.computeNodes[computeNode]
                let application = ApplicationID(UInt16(index % configuration.tasksPerComputeNode + 1))
                group.addTask {
                    var random = SeededRandom(seed: seed)
                    var held: [Block] = []
                    await simulator.sleep(nanoseconds: random.next() % 20_000)
                    for _ in 0..<configuration.operationsPerTask {
                        if !held.isEmpty, Int(random.next() % 100) < configuration.freePercent {
                            let block = held.remove(at: Int(random.next() % UInt64(held.count)))
                            if check { note(inspector.release(block)) }
                            do throws(AllocationError) {
                                try await blocks.free(block, application: application)
                                report.withLock { $0.frees += 1 }
                                if check { note(inspector.checkStructure()) }
                            } catch {
                                note(["free of \(block) failed: \(error)"])
                            }
                        } else {
                            let size = drawSize(configuration.chunkCountLog2Range, &random)
                            let start = simulator.nowNanoseconds
                            do throws(AllocationError) {
                                let block = try await blocks.allocate(chunkCountLog2: size, application: application)
                                let latency = simulator.nowNanoseconds - start
                                held.append(block)
                                report.withLock { report in
                                    report.allocations += 1
                                    report.allocationLatencies.append(latency)
                                }
                                if check { note(inspector.admit(block, owner: blocks.owner) + inspector.checkStructure()) }
                            } catch {
                                if case .outOfMemory = error { report.withLock { $0.outOfMemory += 1 } } else {
                                    note(["allocation of 2^\(size) chunks failed: \(error)"])
                                }
                            }
                        }
                    }
                    for block in held {
                        if check { note(inspector.release(block)) }
                        do throws(AllocationError) { try await blocks.free(block, application: application) } catch {
                            note(["final free of \(block) failed: \(error)"])
                        }
                    }
                }
            }
        }
        await cluster.quiesce()
        if check {
            note(inspector.checkAtRest())
            note(inspector.checkRoomSummary())
            note(inspector.everyHeaderEmpty())
        }
        report.withLock { $0.statistics = cluster.statistics }
    }
}
