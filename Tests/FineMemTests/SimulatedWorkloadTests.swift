import Testing
@testable import FineMem
import FineMemHarness

/// 16 compute nodes x 8 tasks, mixed sizes 4 KiB-8 MiB, invariants 1 and 3 after every
/// operation and the at-rest checks at the end. A failure names its seed; rerun one with
/// `swift run finemem soak --start-seed SEED --seeds 1`.
@Suite struct SimulatedWorkloadTests {
    static let seeds: [UInt64] = Array(1...20)

    @Test(arguments: seeds) func sixteenNodesEightTasksMixedSizes(seed: UInt64) {
        var configuration = SimulatedWorkload.Configuration()
        configuration.memoryNodes = seed % 3 == 0 ? 3 : 1
        let report = SimulatedWorkload(configuration).run(seed: seed)
        #expect(report.violations.isEmpty, "seed \(seed): \(report.violations.prefix(5))")
        #expect(report.allocations > 1_000, "seed \(seed): only \(report.allocations) allocations")
        #expect(report.statistics.allocations == UInt64(report.allocations))
    }

    @Test func sameSeedSameRun() {
        var configuration = SimulatedWorkload.Configuration()
        configuration.computeNodes = 4
        configuration.operationsPerTask = 30
        let first = SimulatedWorkload(configuration).run(seed: 99)
        let again = SimulatedWorkload(configuration).run(seed: 99)
        let other = SimulatedWorkload(configuration).run(seed: 100)
        #expect(first.traceHash == again.traceHash && first.virtualNanoseconds == again.virtualNanoseconds, "seed 99 did not reproduce")
        #expect(first.allocationLatencies == again.allocationLatencies)
        #expect(first.traceHash != other.traceHash)
    }

    /// Compute nodes whose header caches have 3 shards (of 11, 11 and 10 sections: runs of
    /// 2 and 4 sections cross shard boundaries), mixed sizes 4 KiB-8 MiB: every invariant
    /// holds as with one shard, and the allocations are served.
    @Test(arguments: [1, 2, 3, 4] as [UInt64]) func shardedCachesStayConsistent(seed: UInt64) {
        var configuration = SimulatedWorkload.Configuration()
        configuration.allocator.cacheShards = 3
        let report = SimulatedWorkload(configuration).run(seed: seed)
        #expect(report.cacheShards == 3 && report.lanes == 4, "seed \(seed): set-up: \(report.cacheShards) shards, \(report.lanes) lanes")
        #expect(report.violations.isEmpty, "seed \(seed): \(report.violations.prefix(5))")
        #expect(report.allocations > 1_000, "seed \(seed): only \(report.allocations) allocations")
    }

    @Test func contendedSmallPoolStaysConsistent() {
        var configuration = SimulatedWorkload.Configuration()
        configuration.poolBytesPerNode = 8 << 20
        configuration.chunkCountLog2Range = 0...4
        configuration.operationsPerTask = 60
        let report = SimulatedWorkload(configuration).run(seed: 4242)
        #expect(report.violations.isEmpty, "seed 4242: \(report.violations.prefix(5))")
        #expect(report.statistics.casRetries > 0, "4 KiB-64 KiB blocks from 128 tasks in 8 MiB must contend")
    }
}

/// Pools run to exhaustion and back: every answer is a block or a prompt `outOfMemory`
/// that a look at the full pool confirms, never a retry limit.
@Suite struct ExhaustionWorkloadTests {
    @Test(arguments: [1, 2, 3] as [UInt64]) func exhaustionAndBack(seed: UInt64) {
        var configuration = ExhaustionWorkload.Configuration()
        configuration.poolBytesPerNode = 32 << 20
        let report = ExhaustionWorkload(configuration).run(seed: seed)
        #expect(report.wrongAnswers == [], "seed \(seed): \(report.wrongAnswers.prefix(3))")
        #expect(report.violations == [], "seed \(seed): \(report.violations.prefix(5))")
        #expect(report.outOfMemory >= 16 * 8 * 2, "seed \(seed): every task must be answered out of memory each round")
        #expect(report.allocations > 0)
    }

    /// The same with 4 shards per cache: a search that finds no room in its own shard looks
    /// in the others before it answers out of memory (every answer checked against the
    /// pool, as above).
    @Test(arguments: [1, 2] as [UInt64]) func exhaustionAndBackWithShardedCaches(seed: UInt64) {
        var configuration = ExhaustionWorkload.Configuration()
        configuration.poolBytesPerNode = 32 << 20
        configuration.allocator.cacheShards = 4
        let report = ExhaustionWorkload(configuration).run(seed: seed)
        #expect(report.cacheShards == 4 && report.lanes == 5, "seed \(seed): set-up: \(report.cacheShards) shards, \(report.lanes) lanes")
        #expect(report.wrongAnswers == [], "seed \(seed): \(report.wrongAnswers.prefix(3))")
        #expect(report.violations == [], "seed \(seed): \(report.violations.prefix(5))")
        #expect(report.outOfMemory >= 16 * 8 * 2, "seed \(seed): every task must be answered out of memory each round")
    }
}
