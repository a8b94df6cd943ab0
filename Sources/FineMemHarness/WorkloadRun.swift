import FineMem

/// What the seeded workloads share: a report that the simulation fills, the cluster they
/// start, and the run itself.
protocol WorkloadReport: Sendable {
    init(seed: UInt64)
    var violations: [String] { get set }
    var virtualNanoseconds: UInt64 { get set }
    var traceHash: TraceHash { get set }
    /// The fewest cache shards and lanes that any compute node has to any memory node
    /// (`BlockAllocator.cacheShards`, `lanes`): what a run that asks for several got.
    var cacheShards: Int { get set }
    var lanes: Int { get set }
}

extension WorkloadReport {
    /// When a seeded run counts as a hang (see `simulate`).
    static var hangDeadlineNanos: UInt64 { 5_000_000_000 }

    /// Runs `drive` as the only top-level task of a simulation with `seed` and answers the
    /// report it filled, with the run's virtual time and trace hash. Same seed, same report.
    /// A run that has not ended after `hangDeadlineNanos` of virtual time stops there with a
    /// violation: a hang (a log that never settles, a wait without a bound) fails the seed
    /// instead of spinning the test. A seeded workload has no crash and no lease to wait
    /// out and takes a few virtual milliseconds; a bug that leaves a log unsettled keeps
    /// its tasks retrying for a minute or more of virtual time (many minutes of a debug
    /// test) before it ends on its own.
    static func simulate(
        seed: UInt64, latency: LatencyModel, exploration: ScheduleExploration,
        _ drive: @escaping @Sendable (Simulator, Locked<Self>) async -> Void
    ) -> Self {
        let simulator = Simulator(seed: seed, latency: latency, exploration: exploration)
        let report = Locked(Self(seed: seed))
        simulator.spawn { await drive(simulator, report) }
        let ended = simulator.run(untilNanoseconds: hangDeadlineNanos)
        return report.withLock { report in
            if !ended {
                report.violations.append(
                    "the run had not ended after \(hangDeadlineNanos / 1_000_000) ms of virtual time (a hang)")
            }
            report.virtualNanoseconds = simulator.nowNanoseconds
            report.traceHash = simulator.traceHash
            return report
        }
    }
}

/// Starts the embedded cluster of a workload in `simulator`'s virtual time, or records in
/// `report` why it did not start.
func startCluster<Report: WorkloadReport>(
    _ configuration: EmbeddedCluster.Configuration, simulator: Simulator, report: Locked<Report>
) async -> EmbeddedCluster? {
    do {
        let cluster = try await EmbeddedCluster.start(configuration, simulator: simulator)
        let links = cluster.computeNodes.flatMap { node in (0..<configuration.memoryNodes).map { (node, $0) } }
        let shards = links.map { $0.0.cacheShards(memoryNode: $0.1) }.min() ?? 0
        let lanes = links.map { $0.0.lanes(memoryNode: $0.1) }.min() ?? 0
        report.withLock { report in
            report.cacheShards = shards
            report.lanes = lanes
        }
        return cluster
    } catch {
        report.withLock { $0.violations.append("cluster did not start: \(error)") }
        return nil
    }
}

extension PoolInspector {
    /// The checks at rest, once every task has stopped, of a workload that freed nothing
    /// since its `outOfMemory` answers (room only shrank): the pool at rest, the room
    /// summary, and no free run in the full pool of any size in `sizes` (log2 of chunks)
    /// that was answered `outOfMemory`.
    func checkAtRestAfterOutOfMemory(sizes: Set<Int>) -> [String] {
        checkAtRest() + checkRoomSummary() + sizes.sorted().compactMap { size in
            freeRunExists(chunkCountLog2: size) ? "out of memory for 2^\(size) chunks, but the full pool still has such a run" : nil
        }
    }
}
