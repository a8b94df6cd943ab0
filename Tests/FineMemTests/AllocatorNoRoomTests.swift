import Testing
@testable import FineMem
import FineMemHarness

private let application = ApplicationID(1)

/// "No room" answered while room existed (exhaustion soak, seed 1877 at e6be4fe): room
/// moves from a section word to a span word when a span opens, and a search that sees the
/// section entry in chunk mode but the span header not open (stale in its cache, or
/// genuinely in the middle of someone's opening) must read the span again, never conclude
/// "no room" from it. Both tests failed before the fix.
@Suite struct AllocatorNoRoomTests {
    /// A one-section pool: node B holds spans 0-14 whole (section layer), node A reads every
    /// header (span 15 empty and closed).
    private static func sectionWithOneSpanLeft(_ simulator: Simulator) async throws -> (EmbeddedCluster, [Block]) {
        var configuration = EmbeddedCluster.Configuration(poolBytesPerNode: 2 << 20, computeNodes: 2)
        configuration.failureDetection = false
        let cluster = try await EmbeddedCluster.start(configuration, simulator: simulator)
        let (a, b) = (cluster.computeNodes[0], cluster.computeNodes[1])
        var blocks: [Block] = []
        for chunkCountLog2 in [8, 7, 6, 5] { blocks.append(try await b.allocate(chunkCountLog2: chunkCountLog2, application: application)) }
        await cluster.quiesce()
        var trace = OperationTrace()
        try await a.refresh(a.links[0], trace: &trace)
        // A full read skips the span words of a section without a chunk-mode entry; a
        // search that looked into the section (a section-layer one, say) read them.
        try await a.links[0].readSpans(of: 0, trace: &trace)
        return (cluster, blocks)
    }

    /// The interleaving of seed 1877: A's last full refresh read span 15 closed; B opened
    /// it since; A then learned the section word alone (in the soak: the answer of another
    /// task's lost section-layer CAS). A's cache holds a chunk-mode entry over a closed span
    /// header, a state remote memory never has; before the fix the search found nothing
    /// there, and a search that had already refreshed answered `outOfMemory` while span 15
    /// had 16 free chunks.
    @Test func aChunkModeEntryOverAStaleClosedSpanIsReadAgainNotNoRoom() throws {
        let seed: UInt64 = 5
        let result = simulate(seed: seed) { simulator -> (HeaderChoice?, Bool, Block, Bool) in
            let (cluster, _) = try await Self.sectionWithOneSpanLeft(simulator)
            let (a, b) = (cluster.computeNodes[0], cluster.computeNodes[1])
            _ = try await b.allocate(chunkCountLog2: 4, application: application)
            await cluster.quiesce()
            let link = a.links[0]
            var trace = OperationTrace()
            try await link.readHeaders([.section(0)], trace: &trace)
            let (choice, candidate) = link.cache.withShard(0) { cache -> (HeaderChoice?, Bool) in
                let choice = chooseSpan(chunkCountLog2: 1, cache: &cache, link: link)
                return (choice, cache.isChunkCandidate(0))
            }
            if case .claim(let slot, _)? = choice { link.releaseBusy(slot) }
            let block = try await a.allocate(chunkCountLog2: 1, application: application)
            let staleState = SpanHeader(rawValue: link.cache.withShard(0) { $0[.span(section: 0, span: 15)] })?.mode == .open
            return (choice, candidate, block, staleState)
        }
        let (choice, candidate, block, spanNowOpenInCache) = try #require(result, "seed \(seed): the run did not finish").get()
        guard case .recheck(let slots)? = choice else {
            Issue.record("seed \(seed): the search answered \(String(describing: choice)) over span 15, which has 16 free chunks")
            return
        }
        #expect(slots.contains(.span(section: 0, span: 15)), "seed \(seed): \(slots)")
        #expect(candidate, "seed \(seed): section 0 is not a chunk-layer candidate")
        #expect(block.firstChunk / PoolGeometry.chunksPerSpan == 15 && block.chunkCountLog2 == 1, "seed \(seed): \(block)")
        #expect(spanNowOpenInCache, "seed \(seed)")
    }

    /// B stalls between flipping span 15's entry to chunk mode and opening the span header
    /// (its third doorbell); A, whose search reads the headers meanwhile, finds span 15
    /// `opening` under a chunk-mode entry and nothing else. Before the fix A answered
    /// `outOfMemory` (after its full refresh showed the same), and B's opening then left 31
    /// free chunks; now A rereads the span until B's opening lands, and claims there.
    @Test func aSearchWaitsForASpanBeingOpenedInsteadOfAnsweringNoRoom() throws {
        let seed: UInt64 = 6
        let result = simulate(seed: seed) { simulator -> (Result<Block, AllocationError>, Bool, [String]) in
            let (cluster, filled) = try await Self.sectionWithOneSpanLeft(simulator)
            let (a, b) = (cluster.computeNodes[0], cluster.computeNodes[1])
            let inspector = PoolInspector(cluster: cluster)
            let opened = Locked<Block?>(nil)
            simulator.spawn {
                let block = try? await b.allocate(chunkCountLog2: 0, application: application)
                opened.withLock { $0 = block }
            }
            // Stall B as soon as its flip has executed (before its completion reaches B).
            let stalled = await simulator.stallComputeNode(1, forNanoseconds: 300_000) {
                inspector.section(on: NodeID(0), 0)?.state(ofSpan: 15).isChunkMode == true
            }
            let caught = stalled && inspector.span(on: NodeID(0), section: 0, span: 15)?.mode == .opening
            let outcome: Result<Block, AllocationError>
            do throws(AllocationError) { outcome = .success(try await a.allocate(chunkCountLog2: 1, application: application)) } catch {
                outcome = .failure(error)
            }
            await simulator.sleep(nanoseconds: 400_000)
            await cluster.quiesce()
            var problems = filled.flatMap { inspector.admit($0, owner: b.owner) }
            if let block = opened.withLock({ $0 }) { problems += inspector.admit(block, owner: b.owner) } else { problems.append("B's allocation failed") }
            if case .success(let block) = outcome { problems += inspector.admit(block, owner: a.owner) }
            problems += inspector.checkAtRest()
            return (outcome, caught, problems)
        }
        let (outcome, caught, problems) = try #require(result, "seed \(seed): the run did not finish").get()
        #expect(caught, "seed \(seed): B was not stalled between its flip and its opening, so this run did not reach the path")
        switch outcome {
        case .success(let block): #expect(block.firstChunk / PoolGeometry.chunksPerSpan == 15, "seed \(seed): \(block)")
        case .failure(let error): Issue.record("seed \(seed): \(error) while span 15 was being opened")
        }
        #expect(problems == [], "seed \(seed): \(problems)")
    }

    /// A multi-section claim in flight holds sections whole under its pending log, and may
    /// roll back: node C (its cache stale) claims the whole 4-section pool for 8 MiB, wins
    /// three sections, loses the one where B holds 4 KiB, and is stalled before its
    /// rollback. A, asking for 2 MiB meanwhile, reads every header twice and finds no
    /// empty section: while C's claim holds them, the pool has no room for 2 MiB, and
    /// `outOfMemory` is a right answer (DESIGN.md invariant 7: two equal reads during the
    /// call show that instant); so is a section C gave back, if its rollback falls between
    /// A's reads. Either way, once C has rolled back, A's next 2 MiB gets a section. (At
    /// 027ae3b the exhaustion soak checked answers against the pool after the call, which
    /// a rollback had changed; A then waited for every claim in flight of any node, and a
    /// dead node's claim held it until `retryLimitExceeded`: `ReviewFindingsTests
    /// .aDeadNodesRunClaimIsNotRetryLimitExceeded`.)
    @Test func aMultiSectionClaimInFlightHoldsItsSectionsUntilItRollsBack() throws {
        let seed: UInt64 = 7
        let result = simulate(seed: seed) { simulator -> (Result<Block, AllocationError>, Bool, [String]) in
            var configuration = EmbeddedCluster.Configuration(poolBytesPerNode: 8 << 20, computeNodes: 3)
            configuration.failureDetection = false
            let cluster = try await EmbeddedCluster.start(configuration, simulator: simulator)
            let (a, b, c) = (cluster.computeNodes[0], cluster.computeNodes[1], cluster.computeNodes[2])
            let inspector = PoolInspector(cluster: cluster)
            let held = try await b.allocate(chunkCountLog2: 0, application: application)
            await cluster.quiesce()
            let claimed = Locked<Block?>(nil)
            simulator.spawn {
                let block = try? await c.allocate(chunkCountLog2: 11, application: application)
                claimed.withLock { $0 = block }
            }
            // Stall C as soon as its claim has executed (before its answers reach C).
            _ = await simulator.stallComputeNode(2, forNanoseconds: 300_000) {
                (0..<4).contains { section in
                    guard let header = inspector.section(on: NodeID(0), section) else { return false }
                    return header.logPending && header.log.owner == c.owner && header.log.sizeCode == SectionHeader.multiSectionSizeCode
                }
            }
            // The rest of C's doorbell executes at the memory node; its rollback waits.
            await simulator.sleep(nanoseconds: 5_000)
            let caught = (0..<4).count { section in
                guard let header = inspector.section(on: NodeID(0), section) else { return false }
                return header.logPending && header.log.owner == c.owner && header.isAllWhole
            } == 3
            let outcome: Result<Block, AllocationError>
            do throws(AllocationError) { outcome = .success(try await a.allocate(chunkCountLog2: 9, application: application)) } catch {
                outcome = .failure(error)
            }
            await simulator.sleep(nanoseconds: 400_000)
            await cluster.quiesce()
            var problems = inspector.admit(held, owner: b.owner)
            if let block = claimed.withLock({ $0 }) { problems.append("C's 8 MiB claim succeeded: \(block)") }
            switch outcome {
            case .success(let block): problems += inspector.admit(block, owner: a.owner)
            case .failure(.outOfMemory): break
            case .failure(let error): problems.append("A answered \(error)")
            }
            do throws(AllocationError) {
                problems += inspector.admit(try await a.allocate(chunkCountLog2: 9, application: application), owner: a.owner)
            } catch {
                problems.append("after C's rollback, A's next 2 MiB answered \(error)")
            }
            await cluster.quiesce()
            problems += inspector.checkAtRest()
            return (outcome, caught, problems)
        }
        let (_, caught, problems) = try #require(result, "seed \(seed): the run did not finish").get()
        #expect(caught, "seed \(seed): C was not stalled with three sections claimed, so this run did not reach the path")
        #expect(problems == [], "seed \(seed): \(problems)")
    }

    /// A full read skips the span words of the sections held whole: it reads those the
    /// cache does not show held whole in one doorbell, and in a second those whose entries
    /// the fresh section words show in chunk mode where the cache showed the section held
    /// whole. A's cache shows both sections of the pool held whole; B has since freed
    /// section 1 and opened a span there for 4 KiB. A's read must have that span's words
    /// (its room), and the read of a pool held whole reads no span word at all.
    @Test func aFullReadSkipsTheSpansOfSectionsHeldWhole() throws {
        let seed: UInt64 = 7
        let result = simulate(seed: seed) { simulator -> [String] in
            var configuration = EmbeddedCluster.Configuration(poolBytesPerNode: 4 << 20, computeNodes: 2)
            configuration.failureDetection = false
            let cluster = try await EmbeddedCluster.start(configuration, simulator: simulator)
            let (a, b) = (cluster.computeNodes[0], cluster.computeNodes[1])
            let link = a.links[0]
            var problems: [String] = []
            let held = [try await b.allocate(chunkCountLog2: 9, application: application), try await b.allocate(chunkCountLog2: 9, application: application)]
            await cluster.quiesce()
            var trace = OperationTrace()
            // A's first read learns that both sections are held whole (its cache showed them
            // empty, so it reads their span words); the next one skips them.
            _ = try await a.refresh(link, trace: &trace)
            trace = OperationTrace()
            let whole = try await a.refresh(link, trace: &trace)
            let wordBytes = UInt64(8 * (2 + RoomSummary.wordCount(sections: 2) + RoomSummary.topWordCount(sections: 2)))
            if trace.batches != 1 || trace.refreshBytes != wordBytes || whole.spansRead != [false, false] {
                problems.append("a pool held whole: \(trace.batches) doorbells, \(trace.refreshBytes) bytes (not \(wordBytes)), spans read \(whole.spansRead)")
            }
            if whole.hasRoom(chunkCountLog2: 0) { problems.append("a pool held whole shows room for 4 KiB") }
            let section1 = held.first { $0.firstChunk / PoolGeometry.chunksPerSection == 1 }!
            try await b.free(section1, application: application)
            let small = try await b.allocate(chunkCountLog2: 0, application: application)
            await cluster.quiesce()
            if small.firstChunk / PoolGeometry.chunksPerSection != 1 { problems.append("set-up: B's 4 KiB block \(small) is not in section 1") }
            trace = OperationTrace()
            let read = try await a.refresh(link, trace: &trace)
            if trace.batches != 2 || read.spansRead != [false, true] {
                problems.append("a section turned chunk mode: \(trace.batches) doorbells, spans read \(read.spansRead)")
            }
            if !read.hasRoom(chunkCountLog2: 0) || !read.hasRoom(chunkCountLog2: 4) { problems.append("the read shows no room in section 1's open span") }
            // The next read knows section 1 is in chunk mode: one doorbell again.
            trace = OperationTrace()
            let again = try await a.refresh(link, trace: &trace)
            if trace.batches != 1 || again.spansRead != [false, true] { problems.append("a read after it: \(trace.batches) doorbells, spans read \(again.spansRead)") }
            if again.noRoomThroughout(since: read, chunkCountLog2: 0) { problems.append("two reads of a span with room show no room throughout") }
            let block = try await a.allocate(chunkCountLog2: 0, application: application)
            if block.firstChunk / PoolGeometry.chunksPerSection != 1 { problems.append("A's 4 KiB block \(block) is not in section 1") }
            return problems
        }
        let problems = try #require(result, "seed \(seed): the run did not finish").get()
        #expect(problems == [], "seed \(seed)")
    }
}
