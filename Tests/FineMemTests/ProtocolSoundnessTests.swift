import Testing
@testable import FineMem
import FineMemHarness


private let application = ApplicationID(1)

/// Regression tests for the defects of the protocol-soundness review, each an
/// interleaving written out in virtual time. Each failed on the code before its fix.
@Suite struct ProtocolSoundnessTests {
    /// Defect 1: A frees a 128 KiB section-layer block at span 0 (its section log pending)
    /// and stalls before the flush; C allocates 4 KiB meanwhile. Before the fix, C opened
    /// span 0, claimed chunk 0 and wrote its record, and A's late flush overwrote it with
    /// "A freed": C's live block vanished from the full log. Now span 0 cannot enter chunk
    /// mode while A's log covers it (L2), and records change only by CAS (L3).
    @Test func aStalledFlushNeverOverwritesANewerRecord() throws {
        let seed: UInt64 = 31
        let result = simulate(seed: seed) { simulator -> (Block, Block, [String], FullLogRecord?, FullLogRecord?) in
            let cluster = try await EmbeddedCluster.start(.init(poolBytesPerNode: 2 << 20, computeNodes: 2), simulator: simulator)
            let (a, c) = (cluster.computeNodes[0], cluster.computeNodes[1])
            let big = try await a.allocate(chunkCountLog2: 5, application: application)
            await cluster.quiesce()
            try await a.free(big, application: application)
            simulator.faults.stall(EmbeddedCluster.computeNodeID(0), fromNanoseconds: simulator.nowNanoseconds, forNanoseconds: 1_000_000)
            let small = try await c.allocate(chunkCountLog2: 0, application: application)
            await simulator.sleep(nanoseconds: 2_000_000)
            await cluster.quiesce()
            let inspector = PoolInspector(cluster: cluster)
            let problems = inspector.admit(small, owner: c.owner) + inspector.checkAtRest()
            return (big, small, problems, inspector.record(on: small.memoryNode, chunk: small.firstChunk),
                    inspector.record(on: big.memoryNode, chunk: big.firstChunk))
        }
        let (big, small, problems, smallRecord, bigRecord) = try #require(result, "seed \(seed): no answer").get()
        #expect(problems == [], "seed \(seed)")
        #expect(smallRecord?.isAllocated == true && smallRecord?.owner == EmbeddedCluster.owner(ofComputeNode: 1), "seed \(seed): \(String(describing: smallRecord))")
        #expect(!small.chunks.overlaps(big.chunks), "seed \(seed): the span under A's pending log was opened")
        #expect(bigRecord?.isAllocated == false && bigRecord?.owner == EmbeddedCluster.owner(ofComputeNode: 0), "seed \(seed)")
    }

    /// Defect 2: an answer older than what the cache holds is applied last (a refresh
    /// posted before the span opened, answered after it closed). Before the fix the cache
    /// then said the span's entry was empty, the close skipped returning it as "already
    /// done" and marked the span closed under a chunk-mode entry: a leak no one could
    /// reclaim. Now the older answer is dropped (newer answers win), and a return that the
    /// cache says is not needed is checked against a fresh READ first.
    @Test func anOlderAnswerAppliedLastLeaksNoSpan() throws {
        let seed: UInt64 = 32
        let result = simulate(seed: seed) { simulator -> ([String], Bool) in
            let cluster = try await EmbeddedCluster.start(.init(poolBytesPerNode: 2 << 20, computeNodes: 1), simulator: simulator)
            let node = cluster.computeNodes[0]
            let link = node.links[0]
            var trace = OperationTrace()
            let (before, ticket) = try await link.postTicketed([link.read(.section(0))], trace: &trace)
            let block = try await node.allocate(chunkCountLog2: 0, application: application)
            await cluster.quiesce()
            try await node.free(block, application: application)
            // The older answer arrives now, before the close runs.
            link.store([before[0].words[0]], at: [.section(0)], ticket: ticket)
            await cluster.quiesce()
            let inspector = PoolInspector(cluster: cluster)
            let problems = inspector.checkAtRest() + inspector.everyHeaderEmpty()
            let whole = try await node.allocate(chunkCountLog2: 9, application: application)
            try await node.free(whole, application: application)
            return (problems, true)
        }
        let (problems, wholeSectionAllocated) = try #require(result, "seed \(seed): no answer").get()
        #expect(problems == [], "seed \(seed)")
        #expect(wholeSectionAllocated)
    }

    /// A commit that folds this node's queued log on its header and loses its CAS (here
    /// another party changed the header's contention mark meanwhile) hands the log back:
    /// it is folded into the next attempt, or flushed. Dropping it would leave the pending
    /// bit set with nobody to clear it, and the next claim on the header would wait for
    /// good.
    @Test func aFoldWhoseCommitLosesHandsItsLogBack() throws {
        let seed: UInt64 = 35
        let result = simulate(seed: seed) { simulator -> ([String], AllocatorStatistics) in
            var allocator = AllocatorConfiguration()
            allocator.upkeepDelayNanos = 1_000_000
            let cluster = try await EmbeddedCluster.start(.init(poolBytesPerNode: 2 << 20, computeNodes: 1, allocator: allocator), simulator: simulator)
            let node = cluster.computeNodes[0]
            let first = try await node.allocate(chunkCountLog2: 5, application: application)
            // The log of that claim is queued; before anything runs, the header changes.
            let nic = cluster.nics[0]
            let address = node.links[0].grant.address(of: .section(0))
            let word = nic.peekWord(address)
            let toggled = try #require(SectionHeader(rawValue: word)).with(contended: true)
            #expect(nic.perform(.compareAndSwap(address, expected: word, desired: toggled.rawValue, rkey: node.links[0].metadataKey)).compareAndSwap.exchanged)
            let second = try await node.allocate(chunkCountLog2: 5, application: application)
            await cluster.quiesce()
            let inspector = PoolInspector(cluster: cluster)
            var problems = inspector.admit(first, owner: node.owner) + inspector.admit(second, owner: node.owner) + inspector.checkAtRest()
            for block in [first, second] {
                try await node.free(block, application: application)
                problems += inspector.release(block)
            }
            await cluster.quiesce()
            return (problems + inspector.checkAtRest() + inspector.everyHeaderEmpty(), cluster.statistics)
        }
        let (problems, statistics) = try #require(result, "seed \(seed): no answer").get()
        #expect(problems == [], "seed \(seed)")
        #expect(statistics.casRetries >= 1, "seed \(seed): the folding commit did not lose, so this run did not reach the path")
    }

    /// The same with the older answer carrying the newer ticket (with real threads two
    /// posts racing may draw their tickets in the other order): only the fresh READ before
    /// concluding "already returned" keeps the span from leaking.
    @Test func aStaleAnswerWithANewerTicketLeaksNoSpan() throws {
        let seed: UInt64 = 36
        let result = simulate(seed: seed) { simulator -> [String] in
            let cluster = try await EmbeddedCluster.start(.init(poolBytesPerNode: 2 << 20, computeNodes: 1), simulator: simulator)
            let node = cluster.computeNodes[0]
            let link = node.links[0]
            var trace = OperationTrace()
            let before = try await link.post([link.read(.section(0))], trace: &trace)
            let block = try await node.allocate(chunkCountLog2: 0, application: application)
            await cluster.quiesce()
            try await node.free(block, application: application)
            let (_, newerTicket) = try await link.postTicketed([link.read(.span(section: 0, span: 1))], trace: &trace)
            link.store([before[0].words[0]], at: [.section(0)], ticket: newerTicket + 1_000)
            await cluster.quiesce()
            let inspector = PoolInspector(cluster: cluster)
            return inspector.checkAtRest() + inspector.everyHeaderEmpty()
        }
        let problems = try #require(result, "seed \(seed): no answer").get()
        #expect(problems == [], "seed \(seed)")
    }

    /// RDMA ordering: a WRITE may execute before an earlier atomic of its queue pair unless
    /// fenced. A multi-section claim that lost a race rolls its claimed sections back and
    /// clears its intent in one doorbell; unfenced, the intent clear could land first, and
    /// a crash right then would leave a claimed section that no intent names (L5). Node 1
    /// takes section 0 whole; node 0, whose cache still shows both sections empty, claims
    /// both, wins section 1 only and rolls it back; node 0 crashes after each possible verb.
    @Test func aRolledBackClaimClearsItsIntentOnlyAfterTheRollback() throws {
        var problems: [String] = []
        var lostRaces = 0
        for seed in 1...16 as ClosedRange<UInt64> {
            for crashAfter in [nil] + (1...6).map(Optional.some) as [UInt64?] {
                let result = simulate(seed: seed) { simulator -> ([String], Bool) in
                    let cluster = try await EmbeddedCluster.start(.init(poolBytesPerNode: 4 << 20, computeNodes: 2), simulator: simulator)
                    let (racer, taker) = (cluster.computeNodes[0], cluster.computeNodes[1])
                    let taken = try await taker.allocate(chunkCountLog2: 9, application: application)
                    let crashing = EmbeddedCluster.computeNodeID(0)
                    if let crashAfter { simulator.faults.crash(crashing, afterVerbs: simulator.verbsExecuted(by: crashing) + crashAfter) }
                    var lost = false
                    do throws(AllocationError) { _ = try await racer.allocate(chunkCountLog2: 10, application: application) } catch {
                        if case .outOfMemory = error { lost = taken.section == 0 }
                    }
                    await simulator.sleep(nanoseconds: 100_000)
                    let found = PoolInspector(cluster: cluster).checkIntents()
                    return (found.map { "seed \(seed), crash after \(crashAfter.map { "\($0)" } ?? "none") verbs: \($0)" }, lost)
                }
                guard case .success(let (found, lost))? = result else {
                    problems.append("seed \(seed), crash after \(String(describing: crashAfter)): no answer")
                    continue
                }
                problems += found
                if lost { lostRaces += 1 }
            }
        }
        #expect(problems == [], "\(problems.prefix(3))")
        #expect(lostRaces > 0, "no run lost the claim race, so none reached a rollback")
    }

    /// The cache keeps the newest answer of each word, except against a full refresh:
    /// the answer that the pool is full rests on that read, so its words are stored
    /// whatever ticket the cached ones came with (an answer with a later ticket may have
    /// executed before it, on another queue pair), and the later ticket is kept.
    @Test func newerAnswersWinButAFullRefreshIsStoredWhole() throws {
        var cache = HeaderCache(sections: [0, 0], cursor: 0)
        cache.store(5, at: .section(1), ticket: 10)
        cache.store(3, at: .section(1), ticket: 9)
        #expect(cache[.section(1)] == 5)
        cache.store(7, at: .section(1), ticket: 11)
        #expect(cache[.section(1)] == 7)
        cache.storeSpans(of: 1, Array(repeating: 1, count: 16), ticket: 4)
        cache.store(2, at: .span(section: 1, span: 3), ticket: 12)
        cache.storeAll(FullRead(sections: [1, 1], spans: Array(repeating: 9, count: 32)), ticket: 11)
        #expect(cache[.section(1)] == 1 && cache[.span(section: 1, span: 3)] == 9 && cache[.span(section: 1, span: 4)] == 9)
        cache.store(4, at: .span(section: 1, span: 3), ticket: 11)
        #expect(cache[.span(section: 1, span: 3)] == 9, "an answer older than the kept ticket 12 replaced the refresh's word")
        cache.store(6, at: .span(section: 1, span: 3), ticket: 12)
        #expect(cache[.span(section: 1, span: 3)] == 6)
    }

    /// Defect 3: a flush that loses its header CAS to span-state changes kept retrying only
    /// `flushAttemptsMax` times and then dropped the job: the pending bit stayed set on a
    /// live, idle node and blocked the section for good. Here the bound is one attempt and
    /// another node opens a span of the same section while the flush is delayed; the flush
    /// must still land.
    @Test func aLiveNodeNeverAbandonsAFlush() throws {
        let seed: UInt64 = 33
        let result = simulate(seed: seed) { simulator -> ([String], AllocatorStatistics) in
            var allocator = AllocatorConfiguration()
            allocator.flushAttemptsMax = 1
            let cluster = try await EmbeddedCluster.start(.init(poolBytesPerNode: 2 << 20, computeNodes: 2, allocator: allocator), simulator: simulator)
            let (a, b) = (cluster.computeNodes[0], cluster.computeNodes[1])
            let big = try await a.allocate(chunkCountLog2: 5, application: application)
            simulator.faults.stall(EmbeddedCluster.computeNodeID(0), fromNanoseconds: simulator.nowNanoseconds, forNanoseconds: 50_000)
            let small = try await b.allocate(chunkCountLog2: 0, application: application)
            await simulator.sleep(nanoseconds: 100_000)
            await cluster.quiesce()
            let inspector = PoolInspector(cluster: cluster)
            var problems = inspector.admit(big, owner: a.owner) + inspector.admit(small, owner: b.owner) + inspector.checkAtRest()
            try await a.free(big, application: application)
            try await b.free(small, application: application)
            await cluster.quiesce()
            problems += inspector.release(big) + inspector.release(small) + inspector.checkAtRest() + inspector.everyHeaderEmpty()
            return (problems, cluster.statistics)
        }
        let (problems, statistics) = try #require(result, "seed \(seed): no answer").get()
        #expect(problems == [], "seed \(seed)")
        #expect(statistics.flushRounds > 0, "seed \(seed): the flush never lost its CAS, so this run did not reach the defect")
    }

    /// Defect 4: a node that crashed after flipping a span's section entry and before
    /// opening the span header left a chunk-mode entry over a closed span that named
    /// nobody. Now the span is first marked `opening` with its owner, and only the holder
    /// of the mark flips the entry, so a crash at any point of an opening leaves a state
    /// that names the node (here: right after the mark).
    @Test func aCrashInTheMiddleOfASpanOpenLeavesItsOwnerInRemoteMemory() throws {
        let seed: UInt64 = 34
        let result = simulate(seed: seed) { simulator -> (SpanHeader?, SectionHeader?, OwnerID, FabricError?) in
            let cluster = try await EmbeddedCluster.start(.init(poolBytesPerNode: 2 << 20, computeNodes: 1), simulator: simulator)
            let node = cluster.computeNodes[0]
            let crashing = EmbeddedCluster.computeNodeID(0)
            // The opening's first doorbell is the mark, the second the flip: crash between.
            simulator.faults.crash(crashing, afterVerbs: simulator.verbsExecuted(by: crashing) + 1)
            var failure: FabricError?
            do throws(AllocationError) { _ = try await node.allocate(chunkCountLog2: 0, application: application) } catch {
                if case .fabric(let error) = error { failure = error }
            }
            let inspector = PoolInspector(cluster: cluster)
            return (inspector.span(on: NodeID(0), section: 0, span: 0), inspector.section(on: NodeID(0), 0), node.owner, failure)
        }
        let (span, section, owner, failure) = try #require(result, "seed \(seed): no answer").get()
        #expect(failure == .localCrash(executedVerbs: 0), "seed \(seed): \(String(describing: failure))")
        #expect(span?.mode == .opening && span?.log.owner == owner, "seed \(seed): the half-opened span names nobody: \(String(describing: span))")
        #expect(section?.state(ofSpan: 0) != .whole, "seed \(seed)")
    }
}
