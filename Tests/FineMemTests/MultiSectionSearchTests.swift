import Testing
@testable import FineMem
import FineMemHarness

private let application = ApplicationID(1)

/// The search for a run of whole sections when the cache is stale where every node takes
/// large blocks (the top of the pool).
@Suite struct MultiSectionSearchTests {
    /// A's cache shows all 8 runs of a 32 MiB pool free; B holds 7 of them (all but the
    /// lowest). A's first claim loses; before, A then walked down the runs its cache still
    /// showed free, a lost claim and a rollback each. Now the claim that lost is followed
    /// by one READ of the section words, and A's next choice is made on them: A takes the
    /// free run with its second claim, without a full read.
    @Test func aLostRunClaimIsFollowedByAChoiceOnFreshSectionWords() throws {
        let seed: UInt64 = 905
        let result = simulateBounded(seed: seed) { simulator -> [String] in
            var configuration = EmbeddedCluster.Configuration(poolBytesPerNode: 32 << 20, computeNodes: 1)
            configuration.failureDetection = false
            let cluster = try await EmbeddedCluster.start(configuration, simulator: simulator)
            let b = cluster.computeNodes[0]
            // A's first choice among the 8 runs its cache shows free is not the lowest.
            let aOwner = (20...).lazy.map { OwnerID(UInt16($0)) }.first {
                BlockAllocator.runSpread(owner: $0, application: application, retries: 0) % UInt64(runChoicesMax) != UInt64(runChoicesMax - 1)
            }!
            let a = try await startGatedNode(cluster, owner: aOwner, id: NodeID(1900))
            var held: [Block] = []
            for _ in 0..<8 { held.append(try await b.allocate(chunkCountLog2: 10, application: application)) }
            let lowest = held.min { $0.firstChunk < $1.firstChunk }!
            try await b.free(lowest, application: application)
            await cluster.quiesce()
            var problems: [String] = []
            let block = try await a.allocate(chunkCountLog2: 10, application: application)
            let statistics = a.statistics
            if block != lowest { problems.append("A got \(block), not the free run \(lowest)") }
            if statistics.casRetries == 0 { problems.append("set-up: A's first claim did not lose") }
            if statistics.casRetries > 2 { problems.append("A lost \(statistics.casRetries) CASes: more than its first claim's two") }
            if statistics.refreshes != 0 { problems.append("A made \(statistics.refreshes) full reads") }
            return problems
        }
        #expect(problems(of: result) == [], "seed \(seed)")
    }
}
