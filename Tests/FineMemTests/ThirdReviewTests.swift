import Testing
@testable import FineMem
import FineMemHarness

// Review of 87ef43a (lean full reads, fewer reads across nodes).

private let application = ApplicationID(1)

@Suite struct ThirdReviewTests {
    /// A full read keeps a section's old span words when it did not read them
    /// (`HeaderCache.storeAll`, `spansKnown` false), and a search opens an empty span of
    /// such a section from the cached span word without checking it (`emptySpan`). When
    /// that word is stale and not `canBeOpened` (a span this node saw open before the
    /// section went whole), the mark is refused locally, nothing is sent, no answer
    /// brings the current word, and the search picks the same span again and again until
    /// `operationAttemptsMax` attempts are spent, pauses and reads everything again.
    ///
    /// Interleaving (one memory node of 2 MiB: one section; seed 904):
    /// 1. B allocates 4 KiB (span 0 opens). A reads everything: span 0 open, 1 chunk used.
    /// 2. B frees it (span 0 closes) and takes the section whole.
    /// 3. A asks for 128 KiB: its claim loses to B's word (now cached: whole), and
    ///    A answers out of memory after two full reads that skip the section's spans.
    /// 4. B frees its 2 MiB. A reads everything: the section is empty; its spans are not
    ///    read (the cache held it whole), span 0 stays cached as open.
    /// 5. A asks for 4 KiB: expected at once (open span 0: mark, flip, commit), no full
    ///    read.
    @Test func aStaleSpanWordKeptByALeanReadStallsTheOpenOfAnEmptySpan() throws {
        let seed: UInt64 = 904
        let result = simulateBounded(seed: seed) { simulator -> [String] in
            let cluster = try await EmbeddedCluster.start(
                .init(poolBytesPerNode: 2 << 20, computeNodes: 1), simulator: simulator)
            let b = cluster.computeNodes[0]
            let grant = cluster.memoryNodes[0].loopbackGrant
            let fullReads = Locked(0)
            let a = try await startGatedNode(cluster, owner: OwnerID(9), id: NodeID(1900)) { _, connection in
                GatedConnection(connection, before: { verbs in
                    if isFullRead(verbs, grant: grant) { fullReads.withLock { $0 += 1 } }
                })
            }
            var problems: [String] = []
            // 1.
            let chunk = try await b.allocate(chunkCountLog2: 0, application: application)
            await cluster.quiesce()
            var trace = OperationTrace()
            _ = try await a.links[0].refresh(trace: &trace, runtime: simulator, pauseNanos: 500...128_000)
            // 2.
            try await b.free(chunk, application: application)
            await cluster.quiesce()
            let whole = try await b.allocate(chunkCountLog2: 9, application: application)
            await cluster.quiesce()
            // 3.
            do throws(AllocationError) {
                let block = try await a.allocate(chunkCountLog2: 5, application: application)
                problems.append("set-up: A got \(block) from a section held whole")
            } catch .outOfMemory {
            } catch {
                problems.append("set-up: A answered \(error)")
            }
            await a.quiesce()
            // 4.
            try await b.free(whole, application: application)
            await cluster.quiesce()
            _ = try await a.links[0].refresh(trace: &trace, runtime: simulator, pauseNanos: 500...128_000)
            let cached = a.links[0].cache.withShard(of: .span(section: 0, span: 0)) { cache in
                (known: cache.spansKnown(0), word: SpanHeader(rawValue: cache[.span(section: 0, span: 0)]))
            }
            // 5.
            let before = (reads: fullReads.withLock { $0 }, time: simulator.nowNanoseconds)
            let block = try await a.allocate(chunkCountLog2: 0, application: application)
            let after = (reads: fullReads.withLock { $0 }, time: simulator.nowNanoseconds)
            if after.reads != before.reads {
                problems.append(
                    "A's 4 KiB allocation (\(block)) in an empty pool made \(after.reads - before.reads) full read(s) and took "
                        + "\(after.time - before.time) ns; the cache held span 0 of section 0 as \(cached.word.map { "\($0)" } ?? "nil") "
                        + "with spansKnown \(cached.known)")
            }
            return problems
        }
        #expect(problems(of: result) == [], "seed \(seed)")
    }
}
