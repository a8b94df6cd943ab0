import Testing
@testable import FineMem
import FineMemHarness

// Adversarial review of recovery/fencing, the out-of-memory rule (DESIGN.md invariant 7)
// and the span close / upkeep paths. Each test is one interleaving written out in virtual
// time with a fixed seed (printed in every expectation), and FAILS on the code it was
// written against (bd2656d): each is a finding, not a regression test.

private let application = ApplicationID(1)

@Suite struct ReviewFindingsTests {
    /// Finding 1 (liveness; also a permanent wrong answer). `finishClosing` gives up after
    /// `spanStateAttemptsMax` lost CASes on the section word (`returnSpanToSection` throws
    /// `retryLimitExceeded`, the upkeep counts an error and returns) and nobody ever
    /// resumes the close: the span stays `closing` under a chunk-mode entry, in the name
    /// of a live node, for as long as that node lives. Only X may finish it (L6), X's
    /// searches treat it as "someone else's transient" (`recheck`), and recovery touches
    /// it only once X is dead.
    ///
    /// Interleaving (one 2 MiB section, default configuration):
    /// 1. X allocates 4 KiB (opens a span S) and the upkeep settles.
    /// 2. X frees it. X's upkeep flushes the free and marks S `closing` in the same CAS,
    ///    then sends the CAS that returns S's entry to empty.
    /// 3. Before each of X's CASes on the section word, Y commits a 128 KiB claim or
    ///    release in the same section (a hot section: any other node's block operation,
    ///    open, close or hint there does the same). Each of X's CASes loses;
    ///    after 256 X gives up.
    /// 4. Y frees what it holds; everything quiesces. No block is live anywhere.
    /// 5. S is still `closing` (by X), its entry chunk mode: `checkAtRest` reports it, and
    ///    Y's 2 MiB allocation answers `outOfMemory` from a pool in which nothing is
    ///    allocated, and keeps doing so for X's whole life.
    ///
    /// Suggested fix: a live node never abandons a close, as it never abandons a flush
    /// (`flush` retries rounds with backoff until done): retry `returnSpanToSection` in
    /// rounds with backoff until it commits (its bound is the node's life), or put the
    /// item back in the upkeep queue instead of dropping it; the same for the final
    /// `closed()` CAS, which has a single attempt.
    @Test func anAbandonedCloseLeaksASpanUnderALiveNode() throws {
        let seed: UInt64 = 801
        let result = simulateBounded(seed: seed) { simulator -> [String] in
            let cluster = try await EmbeddedCluster.start(.init(poolBytesPerNode: 2 << 20, computeNodes: 1), simulator: simulator)
            let y = cluster.computeNodes[0]
            let memoryNode = cluster.memoryNodes[0]
            let inspector = PoolInspector(cluster: cluster)
            let sectionWord = memoryNode.loopbackGrant.address(of: .section(0))
            let armed = Locked(false)
            let yHeld = Locked<Block?>(nil)
            let losses = Locked(0)
            let problems = Locked<[String]>([])
            // Y's block operation in the section, alternately a claim and a release of 128 KiB.
            @Sendable func yMoves() async {
                do throws(AllocationError) {
                    if let held = yHeld.withLock({ $0 }) {
                        try await y.free(held, application: application)
                        _ = inspector.release(held)
                        yHeld.withLock { $0 = nil }
                    } else {
                        let block = try await y.allocate(chunkCountLog2: 5, application: application)
                        problems.withLock { $0 += inspector.admit(block, owner: y.owner) }
                        yHeld.withLock { $0 = block }
                    }
                } catch {
                    problems.withLock { $0.append("Y: \(error)") }
                }
            }
            let (grant, connection) = try memoryNode.attach(computeNode: OwnerID(9), from: NodeID(1900))
            let x = try await BlockAllocator.start(owner: OwnerID(9), memoryNodes: [(grant, GatedConnection(connection, before: { verbs in
                // Y beats more than one round of X's CASes, then lets it be.
                guard armed.withLock({ $0 }), losses.withLock({ $0 }) < 300, casOn(sectionWord, in: verbs) else { return }
                losses.withLock { $0 += 1 }
                await yMoves()
            }))], runtime: simulator)
            let xBlock = try await x.allocate(chunkCountLog2: 0, application: application)
            var found = inspector.admit(xBlock, owner: x.owner)
            await x.quiesce()
            armed.withLock { $0 = true }
            try await x.free(xBlock, application: application)
            found += inspector.release(xBlock)
            await x.quiesce()
            armed.withLock { $0 = false }
            if let held = yHeld.withLock({ $0 }) {
                try await y.free(held, application: application)
                found += inspector.release(held)
            }
            await cluster.quiesce()
            await x.quiesce()
            let span = inspector.span(on: memoryNode.id, section: xBlock.section, span: xBlock.spanInSection)
            found += problems.withLock { $0 }
            found += inspector.checkAtRest().map { "after \(losses.withLock { $0 }) lost section CASes of X's close: \($0)" }
            do throws(AllocationError) {
                let whole = try await y.allocate(chunkCountLog2: 9, application: application)
                found += inspector.admit(whole, owner: y.owner)
            } catch {
                found.append("Y's 2 MiB allocation from a pool with no live block answered \(error) (X's span \(xBlock.section).\(xBlock.spanInSection) is \(span.map { "\($0.mode)" } ?? "?"))")
            }
            return found
        }
        #expect(problems(of: result) == [], "seed \(seed)")
    }

    /// Finding 2 (wrong answer: invariant 7). `FullRead.hasRoom` counts a span in the
    /// middle of someone's close as room for a chunk-layer request, but not for a
    /// section-layer or multi-section one: a chunk-mode entry over a span that is open and
    /// empty (its free's log pending) or `closing` makes a whole section "no room". So a
    /// 2 MiB request answers `outOfMemory` from a pool with no live block at all, at every
    /// instant of its call, whenever the node that freed the last block there has not
    /// finished its close yet (3 round trips of upkeep; any stall or descheduling of that
    /// node stretches the window; with finding 1, forever).
    ///
    /// Interleaving (one 2 MiB section):
    /// 1. X allocates 4 KiB (opens span S) and the upkeep settles; X frees it: S is open,
    ///    empty, X's free log pending, entry chunk mode. The pool holds no live block.
    /// 2. X's CPU stalls for 50 ms (GC pause, descheduling) before its upkeep's flush.
    /// 3. A asks for 2 MiB: its cache shows no room, its two full reads are equal and
    ///    show the section with a chunk-mode entry: `outOfMemory`.
    ///
    /// Suggested fix: in `hasRoom` for the section and multi-section layers (and in
    /// `chooseSection`/`chooseRun`), count a chunk-mode entry whose settled span is not
    /// open, or open with an empty bitmap, as free-or-about-to-be: the search then waits
    /// and reads again (`recheck`, bounded by `waitCountMax`) instead of answering no room.
    @Test func anEmptyPoolIsNotOutOfMemoryForTwoMegabytes() throws {
        let seed: UInt64 = 802
        let result = simulateBounded(seed: seed) { simulator -> [String] in
            let cluster = try await EmbeddedCluster.start(.init(poolBytesPerNode: 2 << 20, computeNodes: 2), simulator: simulator)
            let (x, a) = (cluster.computeNodes[0], cluster.computeNodes[1])
            let inspector = PoolInspector(cluster: cluster)
            let block = try await x.allocate(chunkCountLog2: 0, application: application)
            var found = inspector.admit(block, owner: x.owner)
            await cluster.quiesce()
            try await x.free(block, application: application)
            found += inspector.release(block)
            simulator.faults.stall(EmbeddedCluster.computeNodeID(0), fromNanoseconds: simulator.nowNanoseconds, forNanoseconds: 50_000_000)
            let live = inspector.liveBlocks.count
            do throws(AllocationError) {
                let whole = try await a.allocate(chunkCountLog2: 9, application: application)
                found += inspector.admit(whole, owner: a.owner)
            } catch {
                found.append("A's 2 MiB allocation answered \(error) while the pool held \(live) live blocks at every instant of its call")
            }
            return found
        }
        #expect(problems(of: result) == [], "seed \(seed)")
    }

    /// Finding 3 (liveness). With cache shards, a link posts its upkeep on a queue pair of
    /// its own. When that queue pair alone breaks (a broken link, both ends alive), the
    /// flush of a pending log fails, `MemoryNodeLink.flush` answers nil and its `defer`
    /// drops the entry from the pending-log table: nobody will ever flush that log. The
    /// header stays pending in the name of a live node whose other lanes work; every
    /// other node's operation on it waits, and so does the node's own: its next commit
    /// there predicts the word flushed (no entry to fold in) and loses to its own log
    /// until `retryLimitExceeded`. Nothing marks the link unusable, so allocations go on
    /// over the healthy lanes and every new log the node commits there is orphaned the
    /// same way. (With leases running, the renewal, which also posts on the upkeep lane,
    /// fails and the node loses the whole memory node to a lapsed lease: a broken link
    /// treated as a dead node, contrary to DESIGN.md section 5.)
    ///
    /// Interleaving (one compute node X, two cache shards, eight sections):
    /// 1. X allocates 4 KiB: its commit leaves its log pending on span S, upkeep queued.
    /// 2. X's upkeep queue pair breaks; the worker's flush fails and drops the entry.
    /// 3. X frees the block (over its application lane, which works): the CAS loses to X's
    ///    own pending log, again and again: `retryLimitExceeded`.
    ///
    /// Suggested fix: a flush that fails with a fabric error must keep (release) its
    /// entry, not remove it; and a broken lane must either be reopened (the design's
    /// reconnect, resolving in-flight verbs from the headers' logs) or make the whole link
    /// unusable at once, so that the lease stops and recovery takes the logs.
    ///
    /// Fixed the second way (reconnecting is the later issue "processes and machines"):
    /// X's free answers `fenced` at once, its log is still in its table, and once the
    /// memory node fences and recovers X the pool is at rest and empty.
    @Test func aBrokenUpkeepLaneOrphansALiveNodesLog() throws {
        let seed: UInt64 = 803
        let result = simulateBounded(seed: seed, deadlineNanos: 60_000_000_000) { simulator -> [String] in
            var configuration = EmbeddedCluster.Configuration(poolBytesPerNode: 16 << 20, computeNodes: 1)
            configuration.allocator.cacheShards = 2
            let cluster = try await EmbeddedCluster.start(configuration, simulator: simulator)
            let x = cluster.computeNodes[0]
            let inspector = PoolInspector(cluster: cluster)
            let link = x.links[0]
            guard let upkeepLane = link.connection(lane: OperationTrace.upkeepLane) as? SimulatedConnection,
                  upkeepLane !== (link.connection(lane: Int(application.rawValue)) as? SimulatedConnection) else {
                return ["set-up: no upkeep lane of its own"]
            }
            let block = try await x.allocate(chunkCountLog2: 0, application: application)
            var found = inspector.admit(block, owner: x.owner)
            upkeepLane.breakConnection()
            await x.quiesce()
            let slot = HeaderSlot(committing: block)
            if !link.cache.withShard(of: slot, { $0.pending.has(slot) }) { found.append("the failed flush dropped X's log from its table") }
            let start = simulator.nowNanoseconds
            do throws(AllocationError) {
                try await x.free(block, application: application)
                found.append("X freed over a link with a broken lane")
            } catch {
                guard case .fenced = error else { return found + ["X's free answered \(error), not fenced"] }
            }
            if simulator.nowNanoseconds - start > 1_000_000 { found.append("X's free took \(simulator.nowNanoseconds - start) ns to answer") }
            try await cluster.fence(computeNode: 0)
            _ = try await cluster.recover(computeNode: 0)
            found += inspector.release(block)
            await x.quiesce()
            found += inspector.checkAtRest()
            found += inspector.everyHeaderEmpty()
            return found
        }
        #expect(problems(of: result) == [], "seed \(seed)")
    }

    /// Finding 4 (wrong answer: invariant 7 with several memory nodes). `allocate` asks
    /// the memory nodes one after the other and answers `outOfMemory` when each said no
    /// room at some instant of its own search. Room may have moved from the node not yet
    /// asked to the one already asked in between: at every instant of the call some memory
    /// node had room, yet the answer is out of memory.
    ///
    /// Interleaving (two memory nodes of one 2 MiB section each):
    /// 1. B holds 4 KiB on memory node 0; memory node 1 is empty.
    /// 2. A asks for 2 MiB; placement starts at memory node 0: two equal full reads, no
    ///    room (memory node 1 has room all along).
    /// 3. After A's second read of memory node 0 executed (its answer still on the way):
    ///    B frees its 4 KiB (node 0 has room once the close is done), then B allocates
    ///    2 MiB, which its placement puts on memory node 1.
    /// 4. A searches memory node 1: no room (two equal reads): `outOfMemory`, while node 0
    ///    has held a free 2 MiB since before node 1 filled.
    ///
    /// Suggested fix: before answering out of memory, go round the memory nodes again
    /// until one round finds every node's two reads equal to those of the previous round
    /// (or read them all in one round and compare with the previous), so that some
    /// instant of the call had no room on any node; bounded like the per-node search.
    @Test func roomThatMovesBetweenMemoryNodesIsNotOutOfMemory() throws {
        let seed: UInt64 = 804
        let result = simulateBounded(seed: seed) { simulator -> [String] in
            let cluster = try await EmbeddedCluster.start(.init(memoryNodes: 2, poolBytesPerNode: 2 << 20, computeNodes: 1), simulator: simulator)
            let b = cluster.computeNodes[0]
            let inspector = PoolInspector(cluster: cluster)
            let small = try await b.allocate(chunkCountLog2: 0, application: application)
            var found = inspector.admit(small, owner: b.owner)
            if small.memoryNode != cluster.memoryNodes[0].id { return ["set-up: B's 4 KiB went to \(small.memoryNode)"] }
            await cluster.quiesce()
            let grant0 = cluster.memoryNodes[0].loopbackGrant
            let fullReads = Locked(0)
            let bMoved = Locked<[String]?>(nil)
            let owner = OwnerID(9)
            let (g0, c0) = try cluster.memoryNodes[0].attach(computeNode: owner, from: NodeID(1900))
            let (g1, c1) = try cluster.memoryNodes[1].attach(computeNode: owner, from: NodeID(1900))
            let gated = GatedConnection(c0, after: { verbs in
                guard isFullRead(verbs, grant: grant0) else { return }
                let count = fullReads.withLock { value -> Int in
                    value += 1
                    return value
                }
                guard count == 2 else { return }
                var moved: [String] = []
                do throws(AllocationError) {
                    try await b.free(small, application: application)
                    moved += inspector.release(small)
                    await b.quiesce()
                    let whole = try await b.allocate(chunkCountLog2: 9, application: application)
                    moved += inspector.admit(whole, owner: b.owner)
                    if whole.memoryNode != cluster.memoryNodes[1].id { moved.append("set-up: B's 2 MiB went to \(whole.memoryNode)") }
                } catch {
                    moved.append("B: \(error)")
                }
                bMoved.withLock { $0 = moved }
            })
            let a = try await BlockAllocator.start(owner: owner, memoryNodes: [(g0, gated), (g1, c1)], runtime: simulator)
            do throws(AllocationError) {
                let block = try await a.allocate(chunkCountLog2: 9, application: application)
                found += inspector.admit(block, owner: a.owner)
            } catch {
                found.append("A answered \(error) although memory node 1, then memory node 0, had a free 2 MiB at every instant of its call")
            }
            guard let moved = bMoved.withLock({ $0 }) else { return found + ["set-up: A never made a second full read of memory node 0"] }
            return moved + found
        }
        #expect(problems(of: result) == [], "seed \(seed)")
    }

    /// Finding 5 (minor: a wrong kind of answer, slow). `noRoomInCache` never answers no
    /// room while the cache shows any section held whole under a pending multi-section
    /// claim (`holdsRunClaimInFlight`), of any owner: it pauses and reads again. A node
    /// that died (or stalls) between its multi-section claim and the flush of it leaves
    /// such sections until its lease lapses and it is recovered (seconds). Meanwhile every
    /// allocation on that memory node that finds no room waits out all `waitCountMax`
    /// pauses (about 1.3 s of backoff) and answers `retryLimitExceeded`, although two
    /// equal full reads show no room and the dead node's claim will never roll back.
    ///
    /// Interleaving (two 2 MiB sections):
    /// 1. X claims both sections for 4 MiB (one doorbell: intent, two CASes, record READ)
    ///    and crashes before its flush: both sections whole, X's multi-section log pending.
    /// 2. A asks for 4 KiB: no room anywhere, yet A answers `retryLimitExceeded` after
    ///    10,000 pauses instead of `outOfMemory`.
    ///
    /// Suggested fix: wait only on a claim that may still roll back: one of this node's
    /// own in flight, or another node's whose sections' words changed between the two
    /// full reads; a run claim whose words stayed equal over two reads is as held as any
    /// block, and the answer is no room.
    @Test func aDeadNodesRunClaimIsNotRetryLimitExceeded() throws {
        let seed: UInt64 = 805
        let result = simulateBounded(seed: seed, deadlineNanos: 60_000_000_000) { simulator -> [String] in
            let cluster = try await EmbeddedCluster.start(.init(poolBytesPerNode: 4 << 20, computeNodes: 2), simulator: simulator)
            let (x, a) = (cluster.computeNodes[0], cluster.computeNodes[1])
            let inspector = PoolInspector(cluster: cluster)
            let xNode = EmbeddedCluster.computeNodeID(0)
            simulator.faults.crash(xNode, afterVerbs: simulator.verbsExecuted(by: xNode) + 4, late: .none)
            simulator.spawn { _ = try? await x.allocate(chunkCountLog2: 10, application: application) }
            guard await waitUntil(simulator, { simulator.faults.isCrashed(xNode) }) else { return ["set-up: X did not crash"] }
            let sections = (0..<2).map { inspector.section(on: cluster.memoryNodes[0].id, $0) }
            guard sections.allSatisfy({ $0?.isAllWhole == true && $0?.logPending == true && $0?.log.owner == x.owner }) else {
                return ["set-up: X did not die between its claim and its flush: \(sections)"]
            }
            let start = simulator.nowNanoseconds
            do throws(AllocationError) {
                let block = try await a.allocate(chunkCountLog2: 0, application: application)
                return ["A got \(block) from a pool held whole by X's claim"]
            } catch {
                if case .outOfMemory = error { return [] }
                return ["A answered \(error) after \((simulator.nowNanoseconds - start) / 1_000_000) ms, not outOfMemory, from a pool that two equal reads show full"]
            }
        }
        #expect(problems(of: result) == [], "seed \(seed)")
    }
}
