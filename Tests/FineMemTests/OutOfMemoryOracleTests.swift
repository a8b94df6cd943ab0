import Testing
@testable import FineMem
import FineMemHarness

/// DESIGN.md invariant 7 ("out of memory is answered only when the pool had no room for
/// the request at some instant during the call"), checked by `OutOfMemoryOracle` from the
/// pool's header words after every change, independent of the allocator's cache.
@Suite struct OutOfMemoryOracleTests {
    /// The churn workload (`ExhaustionWorkload.Configuration.churn()`: one 32 MiB pool, 4
    /// compute nodes x 8 tasks that fill it, then free and allocate near exhaustion for 40
    /// steps each, so that room appears and goes while allocations are in flight), with 1
    /// and with 4 cache shards (as each run asserts), seeds 1-8, half of them under
    /// explored schedules: no `outOfMemory` answer of a call that never saw the pool
    /// without room for it, every answer a block or `outOfMemory`, every invariant at the
    /// end; and the oracle checked answers (frees and out-of-memory answers happened
    /// during the churn). Rerun a seed with
    /// `swift run -c release finemem soak --workload churn --start-seed SEED --seeds 1 --pool-size 32MiB --cache-shards N`
    /// (`--explore` for the even seeds).
    @Test(arguments: [1, 4])
    func outOfMemoryOnlyWhenThePoolHadNoRoomDuringTheCall(shards: Int) {
        var failures: [String] = []
        for seed in UInt64(1)...8 {
            var configuration = ExhaustionWorkload.Configuration.churn()
            configuration.allocator.cacheShards = shards
            configuration.exploration = seed % 2 == 0 ? .randomPriorities(changePoints: 3) : .none
            let report = ExhaustionWorkload(configuration).run(seed: seed)
            let context = "\(shards) shards, seed \(seed) (\(configuration.exploration))"
            if report.cacheShards != shards || report.lanes != lanesOfShards(shards) {
                failures.append("\(context): set-up: \(report.cacheShards) shards and \(report.lanes) lanes")
            }
            if report.outOfMemoryChecked == 0 || report.frees == 0 || report.oracleLooks == 0 {
                failures.append("\(context): set-up: the churn did not reach the oracle: \(report)")
            }
            failures += report.wrongAnswers.prefix(3).map { "\(context): wrong answer \($0)" }
            failures += report.violations.prefix(3).map { "\(context): \($0)" }
        }
        for failure in failures.prefix(12) { Issue.record("\(failure)") }
    }

    /// The oracle's predicate against pools whose room is known, one size at a time: B
    /// holds every chunk of a 16 MiB pool in 4 KiB blocks but one chunk, then also one
    /// 64 KiB run free, then a whole span, then two whole sections; a call that sees that pool
    /// throughout is a violation for the sizes that fit and not for the others; a call
    /// during which the room is taken, or that begins without it, is not one.
    @Test func theOracleSeesRoomAndItsAbsence() {
        let seed: UInt64 = 17
        let result = simulate(seed: seed) { simulator -> [String] in
            var configuration = EmbeddedCluster.Configuration(poolBytesPerNode: 16 << 20, computeNodes: 2)
            configuration.failureDetection = false
            let cluster = try await EmbeddedCluster.start(configuration, simulator: simulator)
            let oracle = OutOfMemoryOracle(cluster: cluster, simulator: simulator)
            let (a, b) = (cluster.computeNodes[0], cluster.computeNodes[1])
            let app = ApplicationID(1)
            var problems: [String] = []
            /// Answers whether a call for `2^size` chunks that began now and answered out of
            /// memory now is a violation (the pool as it is).
            func violates(_ size: Int) -> Bool { oracle.outOfMemory(oracle.begin(chunkCountLog2: size)) != nil }
            func expectRoom(_ sizes: ClosedRange<Int>, _ room: Bool, _ state: String) {
                for size in sizes where violates(size) != room {
                    problems.append("\(state): 2^\(size) chunks: the oracle says \(room ? "no room" : "room")")
                }
            }
            expectRoom(0...12, true, "empty pool")
            expectRoom(13...14, false, "empty pool (8 sections)")
            var held: [Block] = []
            while let block = try? await b.allocate(chunkCountLog2: 0, application: app) { held.append(block) }
            await cluster.quiesce()
            expectRoom(0...12, false, "full pool")
            // One 4 KiB chunk free, in an open span.
            let one = held.removeLast()
            try await b.free(one, application: app)
            await cluster.quiesce()
            expectRoom(0...0, true, "one chunk free")
            expectRoom(1...12, false, "one chunk free")
            // A 16-chunk aligned run in one span, and no other.
            let run = held.filter { $0.firstChunk / 16 == held[0].firstChunk / 16 }
            for block in run { try await b.free(block, application: app) }
            held.removeAll { run.contains($0) }
            await cluster.quiesce()
            expectRoom(0...4, true, "a free 64 KiB run")
            expectRoom(5...12, false, "a free 64 KiB run")
            // The room taken during a call: not a violation. The only 64 KiB run goes to A
            // during the first call; the second begins without one and sees it come back.
            let call = oracle.begin(chunkCountLog2: 4)
            let taken = try await a.allocate(chunkCountLog2: 4, application: app)
            if let violation = oracle.outOfMemory(call) { problems.append("a call that saw the only 64 KiB run taken: \(violation)") }
            let noRoomAtStart = oracle.begin(chunkCountLog2: 4)
            try await a.free(taken, application: app)
            await cluster.quiesce()
            if let violation = oracle.outOfMemory(noRoomAtStart) { problems.append("a call that began without a 64 KiB run: \(violation)") }
            expectRoom(0...4, true, "the 64 KiB run freed again")
            // A whole span of 32 chunks free (the span closes: its section entry is empty).
            let span = held.filter { $0.firstChunk / 32 == held[0].firstChunk / 32 }
            for block in span { try await b.free(block, application: app) }
            held.removeAll { span.contains($0) }
            await cluster.quiesce()
            expectRoom(0...5, true, "a free span")
            expectRoom(6...12, false, "a free span")
            // Two whole sections, aligned: room for 4 MiB.
            let firstSection = held[0].section / 2 * 2
            let sections = held.filter { $0.section / 2 * 2 == firstSection }
            for block in sections { try await b.free(block, application: app) }
            held.removeAll { sections.contains($0) }
            await cluster.quiesce()
            expectRoom(0...10, true, "two free sections")
            expectRoom(11...12, false, "two free sections")
            for block in held { try await b.free(block, application: app) }
            await cluster.quiesce()
            expectRoom(0...12, true, "empty again")
            if oracle.poolLooks == 0 { problems.append("the oracle never looked at the pool") }
            return problems
        }
        #expect(problems(of: result) == [], "seed \(seed)")
    }
}
