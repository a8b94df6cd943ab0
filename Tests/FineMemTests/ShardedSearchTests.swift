import Testing
@testable import FineMem
import FineMemHarness

/// The sharded search ranks the shards' answers as one search of the whole cache would.
/// The unsharded `chooseSpan` ranks `.readSpans` above `.recheck` (an uncached chunk-mode
/// section may hold room; a span under someone's pending log only may, later). When
/// `MemoryNodeLink.choose` took the first answer in search order (home shard first), a
/// `.recheck` of the home shard hid another shard's `.readSpans`: the search reread the
/// blocked header once per backoff until `operationAttemptsMax` spent choices forced a
/// full refresh (33 ms instead of 7 us), while room sat in the other shard all along.
/// Found by a helper's adversarial review.
@Suite struct ShardedSearchTests {
    /// Pool of 8 sections (shards 0-3 and 4-7 with 2 shards). B fills every section, opens
    /// a span with 31 free chunks in section 4 (the rest of 4 whole), fills section 0, and
    /// frees span 15 of section 0, stalled right after that CAS (its section log pending,
    /// covering the empty span 15). A learns the section words alone (no span headers), and
    /// allocates 4 KiB from home shard 0. Answers A's first choice, the virtual time A's
    /// allocation took, and the block.
    private static func run(seed: UInt64, shards: Int) -> (choice: String, nanos: UInt64, block: Block?, problems: [String]) {
        let result = simulate(seed: seed) { simulator -> (String, UInt64, Block?, [String]) in
            var configuration = EmbeddedCluster.Configuration(poolBytesPerNode: 16 << 20, computeNodes: 2)
            configuration.failureDetection = false
            configuration.allocator.cacheShards = shards
            let cluster = try await EmbeddedCluster.start(configuration, simulator: simulator)
            let (a, b) = (cluster.computeNodes[0], cluster.computeNodes[1])
            let app = ApplicationID(2)  // home shard 0 with 2 shards
            let inspector = PoolInspector(cluster: cluster)
            let lanes = laneProblems(a, shards: shards)
            guard lanes.isEmpty else { return ("set-up", 0, nil, lanes) }
            var wholes: [Block] = []
            for _ in 0..<8 { wholes.append(try await b.allocate(chunkCountLog2: 9, application: app)) }
            await cluster.quiesce()
            let in4 = wholes.first { $0.firstChunk / PoolGeometry.chunksPerSection == 4 }!
            let in0 = wholes.first { $0.firstChunk / PoolGeometry.chunksPerSection == 0 }!
            try await b.free(in4, application: app)
            await cluster.quiesce()
            var held = [try await b.allocate(chunkCountLog2: 0, application: app)]
            for _ in 0..<15 { held.append(try await b.allocate(chunkCountLog2: 5, application: app)) }
            await cluster.quiesce()
            try await b.free(in0, application: app)
            await cluster.quiesce()
            for log2 in [8, 7, 6, 5] { held.append(try await b.allocate(chunkCountLog2: log2, application: app)) }
            let span15 = try await b.allocate(chunkCountLog2: 5, application: app)
            await cluster.quiesce()
            var problems: [String] = []
            if held[0].firstChunk / PoolGeometry.chunksPerSection != 4 { problems.append("B's chunk landed at \(held[0])") }
            if span15.firstChunk != 15 * PoolGeometry.chunksPerSpan { problems.append("B's last span landed at \(span15)") }
            simulator.spawn { try? await b.free(span15, application: app) }
            let caught = await simulator.stallComputeNode(1, forNanoseconds: 200_000_000) {
                guard let header = inspector.section(on: NodeID(0), 0) else { return false }
                return header.logPending && header.pendingLogCovers(span: 15) && header.settled.state(ofSpan: 15) == .empty
            }
            if !caught { problems.append("B was not stalled with its free of span 15 pending") }
            let link = a.links[0]
            var trace = OperationTrace()
            try await link.readHeaders((0..<8).map { HeaderSlot.section($0) }, trace: &trace)
            let choice = link.choose(SpanHeader.self, countLog2: 0, home: Int(app.rawValue) % link.cache.count, runtime: simulator)
            switch choice {
            case .claim(let slot, _)?: link.releaseBusy(slot)
            case .open(let section, _)?: link.releaseBusy(.section(section))
            default: break
            }
            let start = simulator.nowNanoseconds
            let block = try? await a.allocate(chunkCountLog2: 0, application: app)
            let took = simulator.nowNanoseconds - start
            return (String(describing: choice), took, block, problems)
        }
        switch result {
        case .success(let value)?: return value
        case .failure(let error)?: return ("error \(error)", 0, nil, ["\(error)"])
        case nil: return ("did not finish", 0, nil, ["did not finish"])
        }
    }

    @Test func aRecheckInTheHomeShardDoesNotHideUncachedRoomInAnotherShard() {
        let seed: UInt64 = 41
        let one = Self.run(seed: seed, shards: 1)
        let two = Self.run(seed: seed, shards: 2)
        print("seed \(seed): 1 shard: first choice \(one.choice), allocation took \(one.nanos) ns, \(String(describing: one.block))")
        print("seed \(seed): 2 shards: first choice \(two.choice), allocation took \(two.nanos) ns, \(String(describing: two.block))")
        #expect(one.problems == [] && two.problems == [], "seed \(seed): setup: \(one.problems) \(two.problems)")
        #expect(one.choice.hasPrefix("Optional(FineMem.HeaderChoice.readSpans"), "seed \(seed): 1 shard chose \(one.choice)")
        #expect(two.choice.hasPrefix("Optional(FineMem.HeaderChoice.readSpans"),
                "seed \(seed): 2 shards chose \(two.choice) while section 4 (shard 1) has 31 free chunks behind unread span headers")
        #expect(two.block != nil && two.nanos <= max(4 * one.nanos, 100_000),
                "seed \(seed): with 2 shards the 4 KiB allocation took \(two.nanos) ns (1 shard: \(one.nanos) ns)")
    }

    /// A task's searches stay in its home shard. A span this node opened leaves the other
    /// span headers of its section uncached, so the next search there answers `.readSpans`;
    /// when a claim in another shard outranked that answer, the task never read them and
    /// allocated in the other shard from then on, next to the task whose home it is (the
    /// pair benchmark's two tasks then shared a shard's lock and spans: half speed in about
    /// half of its runs). Two tasks of one node with 2 shards (sections 0-3 and 4-7): each
    /// opens a span at home, then allocates and frees there.
    @Test func aTaskKeepsToItsHomeShardAfterOpeningASpanThere() {
        let seed: UInt64 = 5
        let result = simulate(seed: seed) { simulator -> [String] in
            var configuration = EmbeddedCluster.Configuration(poolBytesPerNode: 16 << 20, computeNodes: 1)
            configuration.failureDetection = false
            configuration.allocator.cacheShards = 2
            let cluster = try await EmbeddedCluster.start(configuration, simulator: simulator)
            let node = cluster.computeNodes[0]
            var problems: [String] = laneProblems(node, shards: 2)
            for (app, home) in [(ApplicationID(1), 4..<8), (ApplicationID(2), 0..<4), (ApplicationID(1), 4..<8)] {
                var held: [Block] = []
                for _ in 0..<3 { held.append(try await node.allocate(chunkCountLog2: 0, application: app)) }
                for block in held {
                    let section = block.firstChunk / PoolGeometry.chunksPerSection
                    if !home.contains(section) { problems.append("application \(app.rawValue) (home sections \(home)) got \(block) in section \(section)") }
                }
                for block in held { try await node.free(block, application: app) }
            }
            await cluster.quiesce()
            return problems + PoolInspector(cluster: cluster).checkAtRest()
        }
        switch result {
        case .success(let problems)?: #expect(problems == [], "seed \(seed)")
        case .failure(let error)?: Issue.record("seed \(seed): \(error)")
        case nil: Issue.record("seed \(seed): the simulation did not finish")
        }
    }

    /// The reads at home are bounded per allocation: a home shard whose sections are all
    /// full of another node's spans, none of them cached, costs an allocation at most
    /// `homeReadsMax` reads before room in another shard wins (one round trip per section
    /// otherwise). B fills sections 0-3 (shard 0 of 2) with 64 KiB blocks; A, holding a
    /// span in shard 1 (its section cached), learns the section words alone and allocates
    /// 4 KiB from home shard 0: two reads, then the claim in shard 1.
    @Test func readsAtHomeAreBoundedWhenOnlyAnotherShardHasRoom() {
        let seed: UInt64 = 9
        let result = simulate(seed: seed) { simulator -> (batches: UInt64, block: Block?, problems: [String]) in
            var configuration = EmbeddedCluster.Configuration(poolBytesPerNode: 16 << 20, computeNodes: 2)
            configuration.failureDetection = false
            configuration.allocator.cacheShards = 2
            let cluster = try await EmbeddedCluster.start(configuration, simulator: simulator)
            let (a, b) = (cluster.computeNodes[0], cluster.computeNodes[1])
            var problems: [String] = laneProblems(a, shards: 2)
            for _ in 0..<128 {
                let block = try await b.allocate(chunkCountLog2: 4, application: ApplicationID(2))
                if block.firstChunk / PoolGeometry.chunksPerSection >= 4 { problems.append("B's \(block) is not in sections 0-3") }
            }
            // The second allocation reads the span headers of the first one's section.
            for _ in 0..<2 {
                let own = try await a.allocate(chunkCountLog2: 0, application: ApplicationID(1))
                if own.firstChunk / PoolGeometry.chunksPerSection < 4 { problems.append("A's block \(own) is not in shard 1") }
            }
            await cluster.quiesce()
            let link = a.links[0]
            var trace = OperationTrace()
            try await link.readHeaders((0..<8).map { HeaderSlot.section($0) }, trace: &trace)
            trace = OperationTrace()
            var noRoomRead: FullRead?
            let block = try await a.allocate(in: SpanHeader.self, chunkCountLog2: 0, application: ApplicationID(2), on: link, noRoomRead: &noRoomRead, trace: &trace)
            return (trace.batches, block, problems)
        }
        switch result {
        case .success(let (batches, block, problems))?:
            #expect(problems == [], "seed \(seed): setup")
            #expect(block.map { $0.firstChunk / PoolGeometry.chunksPerSection >= 4 } == true, "seed \(seed): A's block \(String(describing: block))")
            #expect(BlockAllocator.homeReadsMax < 4, "the home shard must hold more uncached sections than the bound")
            #expect(batches == UInt64(1 + BlockAllocator.homeReadsMax), "seed \(seed): A's allocation took \(batches) round trips")
        case .failure(let error)?: Issue.record("seed \(seed): \(error)")
        case nil: Issue.record("seed \(seed): the simulation did not finish")
        }
    }

    /// With shards, a link opens a connection per shard and one for the upkeep (the
    /// simulated NIC opens more, `FabricConnection.sibling`): each application posts on its
    /// lane's, the other task's queue pair untouched, and fencing the compute node breaks
    /// every lane.
    @Test func eachApplicationPostsOnItsLaneAndFencingBreaksEveryLane() async throws {
        var configuration = EmbeddedCluster.Configuration(poolBytesPerNode: 16 << 20, computeNodes: 1)
        configuration.failureDetection = false
        configuration.allocator.cacheShards = 2
        let cluster = try await EmbeddedCluster.start(configuration)
        let node = cluster.computeNodes[0]
        #expect(laneProblems(node, shards: 2) == [])
        let link = node.links[0]
        let lanes = [0, 1, OperationTrace.upkeepLane].map { link.connection(lane: $0) as? SimulatedConnection }
        #expect(lanes.allSatisfy { $0 != nil } && lanes[0] !== lanes[1] && lanes[1] !== lanes[2] && lanes[0] !== lanes[2], "two shards, three connections")
        func batches() -> [UInt64] { lanes.map { $0?.counters.batches ?? 0 } }
        for (application, lane) in [(ApplicationID(1), 1), (ApplicationID(2), 0), (ApplicationID(3), 1)] {
            let before = batches()
            let block = try await node.allocate(chunkCountLog2: 0, application: application)
            try await node.free(block, application: application)
            let after = batches()
            for other in 0..<2 where other != lane {
                #expect(after[other] == before[other], "application \(application.rawValue) posted on lane \(other): \(before) -> \(after)")
            }
            #expect(after[lane] > before[lane], "application \(application.rawValue) did not post on lane \(lane): \(before) -> \(after)")
        }
        await cluster.quiesce()
        try await cluster.fence(computeNode: 0)
        #expect(lanes.allSatisfy { $0?.isBroken == true }, "fencing left a lane working")
        for application in [ApplicationID(1), ApplicationID(2)] {
            do {
                _ = try await node.allocate(chunkCountLog2: 0, application: application)
                Issue.record("application \(application.rawValue) allocated on a fenced node")
            } catch {
                switch error {
                case .fabric, .fenced: break
                default: Issue.record("application \(application.rawValue): \(error)")
                }
            }
        }
    }
}
