import Testing
@testable import FineMem
import FineMemHarness

// Tests that pin lines mutation testing showed unpinned (Tests/mutation/mutations.py names
// the mutants each one kills): how many missed renewals fence a node, the room summary
// after recovery, and when a batch's ticket is drawn.

private let application = ApplicationID(1)

/// The lease monitor fences a node at exactly `missedRenewalsMax` missed checks.
@Suite struct LeaseMonitorThresholdTests {
    /// With `missedRenewalsMax` = m (2, 3 and 5), a monitor whose checks are run by hand
    /// (node Y renews before each): node X, holding a block, misses m - 1 checks in a row
    /// and is only suspected (never fenced); it renews, and the next check sees it alive
    /// again; then it misses m checks, is not fenced at checks 1 to m - 1 and is fenced
    /// and recovered at check m: its slot free, its block reclaimed. Y is never recovered.
    @Test(arguments: [2, 3, 5])
    func aNodeIsFencedAtExactlyItsMissedRenewalsMax(missedMax: Int) {
        let seed = UInt64(70 + missedMax)
        let result = simulateBounded(seed: seed) { simulator -> [String] in
            var configuration = EmbeddedCluster.Configuration(poolBytesPerNode: 8 << 20, computeNodes: 2)
            configuration.failureDetection = false
            configuration.missedRenewalsMax = missedMax
            let cluster = try await EmbeddedCluster.start(configuration, simulator: simulator)
            let (x, y) = (cluster.computeNodes[0], cluster.computeNodes[1])
            let inspector = PoolInspector(cluster: cluster)
            let monitor = cluster.monitors[0]
            let block = try await x.allocate(chunkCountLog2: 0, application: application)
            await cluster.quiesce()
            var problems: [String] = []
            func xRecovered() -> Bool { monitor.events.contains { if case .recovered(x.owner, _) = $0 { true } else { false } } }
            func xState() -> NodeSlot.State? { inspector.nodeSlot(on: NodeID(0), owner: x.owner)?.state }
            await monitor.check()  // both slots seen
            // X misses m - 1 checks: suspected, not fenced.
            for missed in 1..<missedMax {
                _ = await y.renewLeases()
                await monitor.check()
                if xRecovered() || xState() != .suspected {
                    problems.append("after \(missed) of \(missedMax) missed checks X is \(String(describing: xState())), recovered: \(xRecovered())")
                }
            }
            // A renewal resets the count.
            _ = await x.renewLeases()
            _ = await y.renewLeases()
            await monitor.check()
            if xState() != .alive { problems.append("X renewed and is \(String(describing: xState()))") }
            // X misses m checks: fenced and recovered at the m-th.
            for missed in 1...missedMax {
                _ = await y.renewLeases()
                await monitor.check()
                if missed < missedMax, xRecovered() {
                    problems.append("X was fenced after \(missed) missed checks, \(missedMax) allowed")
                }
                if missed == missedMax, !xRecovered() {
                    problems.append("X was not fenced after \(missed) missed checks: \(String(describing: xState())), events \(monitor.events)")
                }
            }
            if xState() != .free { problems.append("X's slot after its recovery: \(String(describing: xState()))") }
            if inspector.marked(block).isEmpty { problems.append("X's block \(block) is still marked allocated") }
            if monitor.events.contains(where: { if case .recovered(y.owner, _) = $0 { true } else { false } }) { problems.append("Y, renewing, was recovered") }
            return problems
        }
        #expect(problems(of: result) == [], "seed \(seed), missedRenewalsMax \(missedMax)")
    }
}

/// Recovery syncs the room summary bits of the sections it changed.
@Suite struct RecoveredRoomSummaryTests {
    /// Node X fills a 16 MiB pool (8 sections) with 2 MiB blocks, so that every section is
    /// full and the room summary says so; node Y reads every header (its cache shows no
    /// room). X is fenced and recovered through the memory node: right after, the summary
    /// agrees with the headers (every section has room), and Y's 4 KiB allocation finds the
    /// room through the summary, without a full refresh.
    @Test func theSummaryShowsTheRoomRecoveryFreed() {
        let seed: UInt64 = 81
        let result = simulateBounded(seed: seed) { simulator -> [String] in
            var configuration = EmbeddedCluster.Configuration(poolBytesPerNode: 16 << 20, computeNodes: 2)
            configuration.failureDetection = false
            let cluster = try await EmbeddedCluster.start(configuration, simulator: simulator)
            let (x, y) = (cluster.computeNodes[0], cluster.computeNodes[1])
            let inspector = PoolInspector(cluster: cluster)
            var problems: [String] = []
            for _ in 0..<8 { _ = try await x.allocate(chunkCountLog2: 9, application: application) }
            await cluster.quiesce()
            var trace = OperationTrace()
            try await y.refresh(y.links[0], trace: &trace)
            let link = y.links[0]
            let fullBits = try await link.post([.readWords(link.grant.roomSummaryAddress(word: 0), count: 1, rkey: link.metadataKey)], trace: &trace)[0].words[0]
            if fullBits & 0xFF != 0xFF { problems.append("set-up: the summary does not say the full pool is full: \(String(fullBits, radix: 2))") }
            try await cluster.fence(computeNode: 0)
            let reports = try await cluster.recover(computeNode: 0)
            if reports.map(\.blocksReclaimed) != [8] { problems.append("recovery reclaimed \(reports.map(\.blocksReclaimed)) blocks, not 8") }
            problems += inspector.checkRoomSummary().map { "after recovery: \($0)" }
            let before = y.statistics
            let block = try await y.allocate(chunkCountLog2: 0, application: application)
            let after = y.statistics
            if after.refreshes != before.refreshes || after.summaryRefreshes != before.summaryRefreshes + 1 {
                problems.append("Y found the room recovery freed with \(after.refreshes - before.refreshes) full refreshes and "
                    + "\(after.summaryRefreshes - before.summaryRefreshes) looks through the summary (0 and 1 expected)")
            }
            try await y.free(block, application: application)
            await cluster.quiesce()
            return problems + inspector.checkAtRest() + inspector.everyHeaderEmpty()
        }
        #expect(problems(of: result) == [], "seed \(seed)")
    }
}

/// A batch's ticket is drawn before it is posted: the cache keeps the answer of the later
/// batch, not of the later completion.
@Suite struct TicketOrderTests {
    /// Node A with 2 cache shards (16 MiB: 8 sections; lanes 0, 1 and the upkeep's, as
    /// asserted) and B, in a run without latency jitter. Section 0's header word W0.
    ///
    /// A slow READ posted first: A posts on lane 0 a READ of section 0 followed by 128
    /// span header READs (some 7.7 us at the NIC); 500 ns later, on lane 1, a CAS of
    /// section 0 from W0 to W1 (contended), which executes after the READ of section 0
    /// and completes long before the READ's batch. The cache must end with W1, the
    /// pool's word: the READ's W0 came from the earlier batch (drawing its ticket at its
    /// completion makes it win).
    ///
    /// A slow CAS posted first: A posts on lane 1 a CAS of section 0 from W1 to W0; B
    /// changes it to W1 again 100 ns later (its CAS executes after A's); 200 ns after A's,
    /// A posts on lane 0 a READ of section 0, which executes after B's CAS and completes
    /// after A's CAS. The cache must end with W1, what the later batch read (drawing the
    /// CAS's ticket at its completion makes its older answer win).
    @Test func theLaterBatchWinsNotTheLaterCompletion() {
        let seed: UInt64 = 91
        var latency = LatencyModel()
        latency.jitterFraction = 0
        let simulator = Simulator(seed: seed, latency: latency)
        let outcome = Locked<[String]?>(nil)
        simulator.spawn {
            do {
                let found = try await Self.run(simulator)
                outcome.withLock { $0 = found }
            } catch {
                outcome.withLock { $0 = ["run threw: \(error)"] }
            }
        }
        simulator.run(untilNanoseconds: 10_000_000_000)
        #expect(outcome.withLock { $0 } == [], "seed \(seed)")
    }

    private static func run(_ simulator: Simulator) async throws -> [String] {
        var configuration = EmbeddedCluster.Configuration(poolBytesPerNode: 16 << 20, computeNodes: 2)
        configuration.failureDetection = false
        configuration.allocator.cacheShards = 2
        let cluster = try await EmbeddedCluster.start(configuration, simulator: simulator)
        let (a, b) = (cluster.computeNodes[0], cluster.computeNodes[1])
        var problems = laneProblems(a, shards: 2)
        let link = a.links[0]
        if (link.connection(lane: 0) as? SimulatedConnection) === (link.connection(lane: 1) as? SimulatedConnection) { problems.append("set-up: lanes 0 and 1 share a connection") }
        guard problems.isEmpty else { return problems }
        let section = HeaderSlot.section(0)
        let inspector = PoolInspector(cluster: cluster)
        func remote() -> UInt64 { inspector.section(on: NodeID(0), 0)?.rawValue ?? 0 }
        func cached() -> UInt64 { link.cache.withShard(of: section) { $0[section] } }
        let w0 = remote()
        let w1 = SectionHeader(rawValue: w0)!.with(contended: true).rawValue

        // A slow READ posted first, a CAS on another lane after it.
        let spans = (0..<8).flatMap { s in (0..<PoolGeometry.spansPerSection).map { HeaderSlot.span(section: s, span: $0) } }
        async let slowRead: Void = {
            var trace = OperationTrace(lane: 0)
            try await link.readHeaders([section] + spans, trace: &trace)
        }()
        async let laterCAS: UpdateOutcome<SectionHeader> = {
            await simulator.sleep(nanoseconds: 500)
            var trace = OperationTrace(lane: 1)
            return try await link.update(.header(section, known: w0), UpdatePolicy(attemptsMax: 1), trace: &trace) { $0.with(contended: true) }
        }()
        try await slowRead
        if case .updated = try await laterCAS {} else { problems.append("set-up: A's CAS to W1 did not commit") }
        if remote() != w1 { problems.append("set-up: the pool holds \(remote()), not W1") }
        if cached() != remote() { problems.append("a slow READ posted first left W0 in the cache over the later CAS's W1 (the pool's)") }

        // A slow CAS posted first, a READ on another lane after it, B's change between.
        async let slowCAS: UpdateOutcome<SectionHeader> = {
            var trace = OperationTrace(lane: 1)
            return try await link.update(.header(section, known: w1), UpdatePolicy(attemptsMax: 1), trace: &trace) { $0.with(contended: false) }
        }()
        async let change: UpdateOutcome<SectionHeader> = {
            await simulator.sleep(nanoseconds: 100)
            var trace = OperationTrace(lane: 1)
            return try await b.links[0].update(.header(section, known: w0), UpdatePolicy(attemptsMax: 1), trace: &trace) { $0.with(contended: true) }
        }()
        async let laterRead: Void = {
            await simulator.sleep(nanoseconds: 200)
            var trace = OperationTrace(lane: 0)
            try await link.readHeaders([section], trace: &trace)
        }()
        if case .updated = try await slowCAS {} else { problems.append("set-up: A's CAS to W0 did not commit") }
        if case .updated = try await change {} else { problems.append("set-up: B's CAS to W1 did not commit") }
        try await laterRead
        if remote() != w1 { problems.append("set-up: the pool holds \(remote()), not W1") }
        if cached() != remote() { problems.append("a slow CAS posted first left its W0 in the cache over the later READ's W1 (the pool's)") }
        await cluster.quiesce()
        return problems
    }
}
