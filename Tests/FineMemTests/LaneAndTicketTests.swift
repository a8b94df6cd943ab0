import Testing
@testable import FineMem
import FineMemHarness

// Adversarial tests of a compute node's lanes (a connection per cache shard plus one for
// the upkeep, `MemoryNodeLink.connection(for:)`), of the runtime's tickets (answers of
// several lanes stored in the header cache by ticket, `HeaderCache.store`), and of the
// home shard's bounded reads (`MemoryNodeLink.choose`). Each run is one seeded virtual-time
// simulation; every message names its seed.

private let aID = EmbeddedCluster.computeNodeID(0)

/// `churn` of A's applications 1-4 at once, each on its lane, seeded with `seeds[0..<4]`
/// (the ledger in `held`, stopping at the fence); answers their outcomes in order.
private func churnA(
    _ a: BlockAllocator, sizes: [Int], pairs: Int, seeds: [UInt64], simulator: Simulator, inspector: PoolInspector,
    held: Locked<Set<Block>>, fencing: Locked<Bool>, fenced: Locked<Bool>
) async -> [(done: Int, error: AllocationError?, problems: [String])] {
    await withTaskGroup(of: (Int, (done: Int, error: AllocationError?, problems: [String])).self) { group in
        for index in 0..<4 {
            group.addTask {
                (index, await churn(a, application: ApplicationID(UInt16(index + 1)), sizes: sizes, pairs: pairs, seed: seeds[index],
                                    simulator: simulator, inspector: inspector, held: held, fencing: fencing, fenced: fenced))
            }
        }
        var outcomes: [(Int, (done: Int, error: AllocationError?, problems: [String]))] = []
        for await outcome in group { outcomes.append(outcome) }
        return outcomes.sorted { $0.0 < $1.0 }.map(\.1)
    }
}

/// The pool of `twoNodesWithFourLanes`: 16 sections, 4 per shard (a shard needs 4).
private let fourLanePoolBytes: UInt64 = 32 << 20

/// Two compute nodes, A and B, on a 32 MiB pool, with 4 cache shards (4 application lanes
/// and the upkeep's), without failure detection. Throws when either node has fewer.
private func twoNodesWithFourLanes(_ simulator: Simulator) async throws -> (EmbeddedCluster, PoolInspector, BlockAllocator, BlockAllocator) {
    var configuration = EmbeddedCluster.Configuration(poolBytesPerNode: fourLanePoolBytes, computeNodes: 2)
    configuration.failureDetection = false
    configuration.allocator.cacheShards = 4
    let cluster = try await EmbeddedCluster.start(configuration, simulator: simulator)
    let (a, b) = (cluster.computeNodes[0], cluster.computeNodes[1])
    let problems = laneProblems(a, shards: 4) + laneProblems(b, shards: 4)
    guard problems.isEmpty else { throw SetUpError(problems: problems) }
    return (cluster, PoolInspector(cluster: cluster), a, b)
}

/// Fences compute node 0 (A) and recovers it, raising `fencing` before and `fenced` after
/// the fence. What A held is nobody's once it is fenced: recovery frees it block by block,
/// and B may get a freed block before recovery is over, so A's blocks leave the ledger first.
/// Answers what went wrong, if anything.
private func fenceAndRecoverA(
    _ cluster: EmbeddedCluster, _ a: BlockAllocator, inspector: PoolInspector, fencing: Locked<Bool>, fenced: Locked<Bool>
) async -> String? {
    do {
        fencing.withLock { $0 = true }
        try await cluster.fence(computeNode: 0)
        fenced.withLock { $0 = true }
        for (block, owner) in inspector.liveBlocks where owner == a.owner { _ = inspector.release(block) }
        _ = try await cluster.recover(computeNode: 0)
        return nil
    } catch {
        return "fence or recovery: \(error)"
    }
}

/// Allocate+free pairs by `node` for `application` (sizes drawn from `sizes`), keeping the
/// ledger, until `pairs` are done or an operation fails (then answered with that error).
/// A block whose free failed stays in `held`.
private func churn(
    _ node: BlockAllocator, application: ApplicationID, sizes: [Int], pairs: Int, seed: UInt64, simulator: Simulator,
    inspector: PoolInspector, held: Locked<Set<Block>>, fencing: Locked<Bool> = Locked(false), fenced: Locked<Bool> = Locked(false)
) async -> (done: Int, error: AllocationError?, problems: [String]) {
    var random = SeededRandom(seed: seed)
    var problems: [String] = []
    var mine: [Block] = []
    for done in 0..<pairs {
        let size = sizes[Int(random.next() % UInt64(sizes.count))]
        // An operation begun once the node is fenced must fail; one that was on its way
        // may land before the fence does, and then its block is recovery's (not admitted:
        // the test dropped the node's blocks from the ledger when it fenced it).
        let startedFenced = fenced.withLock { $0 }
        do throws(AllocationError) {
            let block = try await node.allocate(chunkCountLog2: size, application: application)
            if startedFenced { problems.append("\(node.owner) got \(block) in an allocation begun after it was fenced") }
            if !fencing.withLock({ $0 }) { problems += inspector.admit(block, owner: node.owner) }
            held.withLock { _ = $0.insert(block) }
            mine.append(block)
        } catch {
            if case .outOfMemory = error {} else { return (done, error, problems) }
        }
        await simulator.sleep(nanoseconds: random.next() % 3_000)
        if !mine.isEmpty, random.next() % 3 != 0 {
            let block = mine.remove(at: Int(random.next() % UInt64(mine.count)))
            do throws(AllocationError) { try await node.free(block, application: application) } catch {
                mine.append(block)
                return (done, error, problems)
            }
            held.withLock { _ = $0.remove(block) }
            if !fencing.withLock({ $0 }) { problems += inspector.release(block) }
        }
    }
    for block in mine {
        do throws(AllocationError) { try await node.free(block, application: application) } catch { return (pairs, error, problems) }
        held.withLock { _ = $0.remove(block) }
        if !fencing.withLock({ $0 }) { problems += inspector.release(block) }
    }
    return (pairs, nil, problems)
}

@Suite struct LaneAndTicketTests {
    // MARK: Lanes and tickets under explored schedules

    /// Many seeds of a contended workload (4 compute nodes x 8 applications, 4-64 KiB and
    /// some 128 KiB-1 MiB blocks in 32 MiB: 16 sections, so that 4 shards of at least 4
    /// sections fit) whose caches have 2, 3 or 4 shards, as each run asserts: every
    /// application posts on its lane and the upkeep on its own, so answers of one word come
    /// back on several queue pairs out of ticket order, under random priority schedules
    /// (`ScheduleExploration.randomPriorities`) that reorder the lanes' verbs far more than
    /// the latency model does. After every operation: no two live owners overlap and the
    /// header layers agree; at the end every header is at rest.
    @Test(arguments: [2, 3, 4])
    func lanesUnderExploredSchedulesKeepEveryInvariant(shards: Int) {
        var failures: [String] = []
        for seed in UInt64(1)...6 {
            var configuration = SimulatedWorkload.Configuration()
            configuration.computeNodes = 4
            configuration.tasksPerComputeNode = 8
            configuration.operationsPerTask = 24
            configuration.poolBytesPerNode = 32 << 20
            configuration.chunkCountLog2Range = 0...8
            configuration.allocator.cacheShards = shards
            configuration.exploration = seed % 2 == 0 ? .randomPriorities(changePoints: 4) : .none
            let report = SimulatedWorkload(configuration).run(seed: 7_000 + seed)
            failures += report.violations.prefix(3).map { "\(shards) shards, seed \(7_000 + seed) (\(configuration.exploration)): \($0)" }
            if report.allocations < 200 { failures.append("\(shards) shards, seed \(7_000 + seed): only \(report.allocations) allocations") }
            if report.cacheShards != shards || report.lanes != lanesOfShards(shards) {
                failures.append("\(shards) shards, seed \(7_000 + seed): set-up: the nodes have \(report.cacheShards) shards and \(report.lanes) lanes")
            }
        }
        for failure in failures.prefix(12) { Issue.record("\(failure)") }
    }

    /// Pools run to exhaustion and back with 2 and 4 shards per cache (32 MiB: 16
    /// sections, as each run asserts), under explored schedules too: every answer is a block or an `outOfMemory` that a look at the pool
    /// confirms (the home shard's bounded reads never answer out of memory while another
    /// shard has room, nor `retryLimitExceeded`).
    @Test(arguments: [2, 4])
    func exhaustionWithLanesAnswersRightly(shards: Int) {
        var failures: [String] = []
        for seed in UInt64(11)...13 {
            var configuration = ExhaustionWorkload.Configuration()
            configuration.poolBytesPerNode = 32 << 20
            configuration.memoryNodes = 1
            configuration.computeNodes = 4
            configuration.allocator.cacheShards = shards
            configuration.exploration = seed % 2 == 0 ? .randomPriorities(changePoints: 4) : .none
            let report = ExhaustionWorkload(configuration).run(seed: seed)
            failures += report.wrongAnswers.prefix(3).map { "\(shards) shards, seed \(seed): wrong answer \($0)" }
            failures += report.violations.prefix(3).map { "\(shards) shards, seed \(seed): \($0)" }
            if report.allocations == 0 { failures.append("\(shards) shards, seed \(seed): no allocation") }
            if report.cacheShards != shards || report.lanes != lanesOfShards(shards) {
                failures.append("\(shards) shards, seed \(seed): set-up: the nodes have \(report.cacheShards) shards and \(report.lanes) lanes")
            }
        }
        for failure in failures.prefix(12) { Issue.record("\(failure)") }
    }

    // MARK: Crashes with late verbs on several lanes

    /// Node A (4 shards: 4 application lanes and the upkeep's) runs 4 applications that
    /// allocate and free 4 KiB-256 KiB blocks in a 32 MiB pool while node B does the same;
    /// A crashes after 0-40 more of its verbs, its unexecuted verbs on every lane dropped,
    /// all run late, or a seeded prefix of each lane's run late (a later batch of one lane
    /// may execute while an earlier one of another lane is dropped: impossible with one
    /// queue pair). A is fenced (by protection domain: every lane) and recovered. Then
    /// nothing of A's is allocated, no log, span state or intent is left, B's blocks are
    /// intact, and once B is done every header is empty and A's next incarnation gets the
    /// whole pool (32 MiB) in one block. The set-up asserts that both nodes have 4 shards
    /// and 5 lanes.
    @Test(arguments: [FaultPlan.LateVerbs.none, .all, .seeded])
    func crashWithLateVerbsOnSeveralLanesIsRecovered(late: FaultPlan.LateVerbs) {
        var failures: [String] = []
        for (index, offset) in [UInt64(0), 1, 2, 3, 5, 8, 13, 21, 40].enumerated() {
            let seed = 9_100 + UInt64(index)
            let found = problems(of: simulateBounded(seed: seed) { simulator in
                try await Self.crashRun(simulator, offset: offset, late: late)
            })
            failures += found.map { "seed \(seed), crash after \(offset) more verbs, late verbs \(late): \($0)" }
        }
        for failure in failures.prefix(12) { Issue.record("\(failure)") }
    }

    private static func crashRun(_ simulator: Simulator, offset: UInt64, late: FaultPlan.LateVerbs) async throws -> [String] {
        let (cluster, inspector, a, b) = try await twoNodesWithFourLanes(simulator)
        var problems: [String] = []
        let sizes = [0, 0, 0, 1, 2, 4, 5, 6]
        let aHeld = Locked<Set<Block>>([])
        let bHeld = Locked<Set<Block>>([])
        let seeds = (0..<6).map { _ in simulator.forkSeed() }
        let startAt = simulator.verbsExecuted(by: aID)
        let fencingFlag = Locked(false)
        let fencedFlag = Locked(false)
        async let aOutcomesLater = churnA(a, sizes: sizes, pairs: 200, seeds: seeds, simulator: simulator, inspector: inspector, held: aHeld, fencing: fencingFlag, fenced: fencedFlag)
        async let b1 = churn(b, application: ApplicationID(1), sizes: sizes, pairs: 60, seed: seeds[4], simulator: simulator, inspector: inspector, held: bHeld)
        async let b2 = churn(b, application: ApplicationID(2), sizes: sizes, pairs: 60, seed: seeds[5], simulator: simulator, inspector: inspector, held: bHeld)
        async let crashed: String? = {
            // Let A get going on all its lanes (some hundreds of verbs), then crash it.
            _ = await waitUntil(simulator) { simulator.verbsExecuted(by: aID) >= startAt + 400 }
            simulator.faults.crash(aID, afterVerbs: simulator.verbsExecuted(by: aID) + offset, late: late)
            if !(await waitUntil(simulator, maxNanos: 300_000) { simulator.faults.isCrashed(aID) }) {
                simulator.faults.crash(aID, atNanoseconds: simulator.nowNanoseconds)
            }
            await simulator.sleep(nanoseconds: 100_000)
            return await fenceAndRecoverA(cluster, a, inspector: inspector, fencing: fencingFlag, fenced: fencedFlag)
        }()
        let aOutcomes = await aOutcomesLater
        let bOutcomes = await [b1, b2]
        let crash = await crashed
        for outcome in aOutcomes { problems += outcome.problems }
        for (index, outcome) in bOutcomes.enumerated() {
            problems += outcome.problems
            if let error = outcome.error { problems.append("B's application \(index + 1) failed: \(error)") }
        }
        if aOutcomes.allSatisfy({ $0.error == nil }) { problems.append("A went on after its crash: \(aOutcomes.map(\.done))") }
        if let crash { problems.append(crash) }
        await cluster.quiesce()
        for (block, owner) in inspector.liveBlocks where owner == a.owner { _ = inspector.release(block) }
        problems += inspector.checkStructure().map { "after recovery: \($0)" }
        problems += inspector.checkAtRest().map { "after recovery: \($0)" }
        problems += inspector.checkIntents()
        if inspector.nodeSlot(on: NodeID(0), owner: a.owner)?.state != .free { problems.append("A's slot is not free after recovery") }
        if !bHeld.withLock({ $0.isEmpty }) { problems.append("B still holds \(bHeld.withLock { $0.count }) blocks") }
        problems += inspector.everyHeaderEmpty().map { "end: \($0)" }
        simulator.faults.revive(aID)
        let reborn = try await cluster.restart(computeNode: 0)
        do throws(AllocationError) {
            let whole = try await reborn.allocate(chunkCountLog2: 13, application: ApplicationID(1))
            problems += inspector.admit(whole, owner: reborn.owner)
            problems += inspector.release(whole)
            try await reborn.free(whole, application: ApplicationID(1))
        } catch { problems.append("the whole pool (32 MiB) after recovery: \(error)") }
        await cluster.quiesce()
        problems += inspector.everyHeaderEmpty().map { "reborn end: \($0)" }
        return problems
    }

    // MARK: Fencing a live node on every lane

    /// Node A, alive and busy on 4 lanes and its upkeep's, is fenced and recovered in the
    /// middle of its work (no crash: its tasks keep posting, on every lane). Every
    /// operation of A after the fence fails; nothing A posts after the fence lands: after
    /// recovery nothing is A's, every header of B's-free pool is at rest, and B's blocks
    /// are intact. The set-up asserts that A has 4 shards and 5 lanes.
    @Test func fencingALiveNodeStopsEveryLane() {
        var failures: [String] = []
        for seed in UInt64(9_300)...9_305 {
            let found = problems(of: simulateBounded(seed: seed) { simulator in
                let (cluster, inspector, a, b) = try await twoNodesWithFourLanes(simulator)
                let sizes = [0, 0, 1, 3, 5]
                let aHeld = Locked<Set<Block>>([])
                let bHeld = Locked<Set<Block>>([])
                let seeds = (0..<5).map { _ in simulator.forkSeed() }
                let startAt = simulator.verbsExecuted(by: aID)
                let fencingFlag = Locked(false)
                let fencedFlag = Locked(false)
                var problems: [String] = []
                async let aOutcomesLater = churnA(a, sizes: sizes, pairs: 400, seeds: seeds, simulator: simulator, inspector: inspector, held: aHeld, fencing: fencingFlag, fenced: fencedFlag)
                async let b1 = churn(b, application: ApplicationID(1), sizes: sizes, pairs: 80, seed: seeds[4], simulator: simulator, inspector: inspector, held: bHeld)
                async let fenced: String? = {
                    _ = await waitUntil(simulator) { simulator.verbsExecuted(by: aID) >= startAt + 300 + seed % 7 * 37 }
                    return await fenceAndRecoverA(cluster, a, inspector: inspector, fencing: fencingFlag, fenced: fencedFlag)
                }()
                let aOutcomes = await aOutcomesLater
                let bOutcome = await b1
                if let error = await fenced { problems.append(error) }
                for outcome in aOutcomes { problems += outcome.problems }
                problems += bOutcome.problems
                if let error = bOutcome.error { problems.append("B failed: \(error)") }
                if aOutcomes.contains(where: { $0.error == nil }) { problems.append("an application of A went on after the fence: \(aOutcomes.map(\.done))") }
                await cluster.quiesce()
                // A's upkeep may still be posting: give its verbs time to land (they must not).
                await simulator.sleep(nanoseconds: 2_000_000)
                for (block, owner) in inspector.liveBlocks where owner == a.owner { _ = inspector.release(block) }
                problems += inspector.checkStructure() + inspector.checkAtRest() + inspector.checkIntents()
                problems += inspector.everyHeaderEmpty()
                return problems
            })
            failures += found.map { "seed \(seed): \($0)" }
        }
        for failure in failures.prefix(12) { Issue.record("\(failure)") }
    }

    // MARK: Out of memory only when there is none

    /// An out-of-memory answer must rest on a read made after the allocation began. Node B
    /// fills the pool (4 MiB with 1 shard; 16 MiB, 8 sections, with 2, so that A's
    /// application and its upkeep post on different lanes, as the run asserts) with 64 KiB
    /// blocks, then frees some of them one at
    /// a time, while A's one application takes 4 KiB blocks until it is answered out of
    /// memory, again and again until B is done. Only A allocates, so a chunk that B freed
    /// before one of A's allocations began and that is still free at the end was free all
    /// along: that allocation must not answer out of memory. (A's answers stored in the
    /// header cache by ticket: a lower-ticket READ on one lane that executed after a
    /// higher-ticket CAS on another lane must not be dropped in favour of the older word.)
    @Test(arguments: [1, 2])
    func outOfMemoryOnlyWhenAFreedChunkWasTaken(shards: Int) {
        var failures: [String] = []
        for seed in UInt64(9_500)..<9_560 {
            let exploration: ScheduleExploration = seed % 2 == 0 ? .randomPriorities(changePoints: 6) : .none
            let simulator = Simulator(seed: seed, latency: LatencyModel(), exploration: exploration)
            let outcome = Locked<[String]?>(nil)
            simulator.spawn {
                do {
                    let found = try await Self.outOfMemoryRun(simulator, shards: shards)
                    outcome.withLock { $0 = found }
                } catch {
                    outcome.withLock { $0 = ["run threw: \(error)"] }
                }
            }
            _ = simulator.run(untilNanoseconds: 30_000_000_000)
            let found = outcome.withLock { $0 } ?? ["no answer within 30 s of virtual time (a hang)"]
            failures += found.map { "\(shards) shards, seed \(seed) (\(exploration)): \($0)" }
        }
        for failure in failures.prefix(12) { Issue.record("\(failure)") }
    }

    private static func outOfMemoryRun(_ simulator: Simulator, shards: Int) async throws -> [String] {
        var configuration = EmbeddedCluster.Configuration(poolBytesPerNode: shards == 1 ? 4 << 20 : UInt64(shards) * (8 << 20), computeNodes: 2)
        configuration.failureDetection = false
        configuration.allocator.cacheShards = shards
        let cluster = try await EmbeddedCluster.start(configuration, simulator: simulator)
        let inspector = PoolInspector(cluster: cluster)
        let (a, b) = (cluster.computeNodes[0], cluster.computeNodes[1])
        var problems: [String] = laneProblems(a, shards: shards)
        guard problems.isEmpty else { return problems }
        var bBlocks: [Block] = []
        while true {
            do throws(AllocationError) { bBlocks.append(try await b.allocate(chunkCountLog2: 4, application: ApplicationID(1))) } catch {
                guard case .outOfMemory = error else { throw error }
                break
            }
        }
        for block in bBlocks { problems += inspector.admit(block, owner: b.owner) }
        await cluster.quiesce()
        var random = SeededRandom(seed: simulator.forkSeed())
        var toFree: [Block] = []
        for _ in 0..<12 where !bBlocks.isEmpty { toFree.append(bBlocks.remove(at: Int(random.next() % UInt64(bBlocks.count)))) }
        let freeSeed = random.next()
        let bDone = Locked(false)
        // B frees, recording when each free returned.
        async let freed: [(block: Block, at: UInt64)] = {
            var random = SeededRandom(seed: freeSeed)
            var freed: [(block: Block, at: UInt64)] = []
            for block in toFree {
                await simulator.sleep(nanoseconds: random.next() % 30_000)
                _ = inspector.release(block)
                do throws(AllocationError) { try await b.free(block, application: ApplicationID(1)) } catch { continue }
                freed.append((block, simulator.nowNanoseconds))
            }
            bDone.withLock { $0 = true }
            return freed
        }()
        // A allocates 4 KiB until out of memory, again and again until B is done.
        var aHeld: [Block] = []
        var outOfMemoryStarts: [UInt64] = []
        var lastAfterDone = false
        while !lastAfterDone {
            let done = bDone.withLock { $0 }
            let start = simulator.nowNanoseconds
            do throws(AllocationError) {
                let block = try await a.allocate(chunkCountLog2: 0, application: ApplicationID(1))
                problems += inspector.admit(block, owner: a.owner)
                aHeld.append(block)
            } catch {
                guard case .outOfMemory = error else {
                    problems.append("A's allocation: \(error)")
                    break
                }
                outOfMemoryStarts.append(start)
                lastAfterDone = done
                await simulator.sleep(nanoseconds: 2_000)
            }
        }
        let freedBlocks = await freed
        await cluster.quiesce()
        if outOfMemoryStarts.isEmpty || aHeld.isEmpty { problems.append("set-up: A got \(aHeld.count) blocks and \(outOfMemoryStarts.count) out-of-memory answers") }
        let taken = Set(aHeld.flatMap { Array($0.chunks) })
        for start in outOfMemoryStarts {
            for (block, at) in freedBlocks where at < start {
                let stillFree = block.chunks.filter { !taken.contains($0) }
                if let chunk = stillFree.first {
                    problems.append("A answered out of memory in an allocation begun at \(start) ns, but chunk \(chunk) was free from \(at) ns (B's free of \(block)) to the end")
                    break
                }
            }
        }
        for block in aHeld {
            problems += inspector.release(block)
            do throws(AllocationError) { try await a.free(block, application: ApplicationID(1)) } catch { problems.append("A's free of \(block): \(error)") }
        }
        for block in bBlocks {
            problems += inspector.release(block)
            do throws(AllocationError) { try await b.free(block, application: ApplicationID(1)) } catch { problems.append("B's free of \(block): \(error)") }
        }
        await cluster.quiesce()
        problems += inspector.checkAtRest() + inspector.everyHeaderEmpty()
        return problems
    }
}
