import Testing
#if canImport(Glibc)
import Glibc
#endif
@testable import FineMem
import FineMemHarness

// Adversarial tests of the upkeep deferral (`Upkeep.swift`, `HeaderCache.pickUpkeep`,
// `BusyHeaders.beginTurn`): crashes, stalls and fabric errors while a node's log flush is
// put back for later, while an operation holds the log to fold it, and while a turn runs.
// Each run is one seeded simulation (the seed is in every message), bounded in virtual
// time so that a hang fails the test instead of hanging it.

private let application = ApplicationID(1)
private let aID = EmbeddedCluster.computeNodeID(0)
private let idleNanos = AllocatorConfiguration().upkeepIdleNanos


/// At rest (the caller quiesced): the pool checked, then `held` freed by `node` and the
/// pool checked again (consistent and every header empty); answers the problems.
private func drain(_ cluster: EmbeddedCluster, freeing held: [Block], by node: BlockAllocator, inspector: PoolInspector) async -> [String] {
    var problems = inspector.checkAtRest()
    for block in held {
        problems += inspector.release(block)
        do throws(AllocationError) { try await node.free(block, application: application) } catch { problems.append("B's final free of \(block): \(error)") }
    }
    await cluster.quiesce()
    return problems + inspector.checkAtRest() + inspector.everyHeaderEmpty()
}

extension BlockAllocator {
    /// The upkeep item of this node for `slot` waiting in its queue, as how many times it
    /// was put back; nil when none waits (none queued, or a worker holds it).
    func queuedUpkeepDeferrals(of slot: HeaderSlot) -> Int? {
        upkeep.withLock { $0.deferrals(of: slot) }
    }

    /// This node's view of its log on `slot`: whether it has one, whether a task holds
    /// it, whether an operation of the node has its CAS in flight there, and whether some
    /// header of the shard is in other nodes' turn.
    func logState(on slot: HeaderSlot) -> (pending: Bool, taken: Bool, operationInFlight: Bool, turns: Bool) {
        links[0].cache.withShard(of: slot) { cache in
            (cache.pending.has(slot), cache.pending.has(slot) && !cache.pending.isQueued(slot),
             cache.busy.contains(where: { $0 == slot }), cache.busy.hasTurns)
        }
    }
}

/// Allocate+free pairs of 4 KiB (or `size`) blocks by `node`, `pauseNanos` after each
/// operation, keeping the ledger, until `pairs` are done, `stop` is set, or an operation
/// fails (answered, with the pairs done). A block whose free failed stays in `held`.
private func hammer(
    _ node: BlockAllocator, size: Int = 0, pairs: Int, pauseNanos: UInt64, simulator: Simulator, inspector: PoolInspector,
    held: Locked<Set<Block>>, stop: Locked<Bool> = Locked(false)
) async -> (done: Int, error: AllocationError?, problems: [String]) {
    var problems: [String] = []
    for done in 0..<pairs {
        if stop.withLock({ $0 }) { return (done, nil, problems) }
        let block: Block
        do throws(AllocationError) { block = try await node.allocate(chunkCountLog2: size, application: application) } catch { return (done, error, problems) }
        problems += inspector.admit(block, owner: node.owner)
        held.withLock { _ = $0.insert(block) }
        await simulator.sleep(nanoseconds: pauseNanos)
        do throws(AllocationError) { try await node.free(block, application: application) } catch { return (done, error, problems) }
        held.withLock { _ = $0.remove(block) }
        problems += inspector.release(block)
        await simulator.sleep(nanoseconds: pauseNanos)
    }
    return (pairs, nil, problems)
}

/// A cluster of `computeNodes` nodes on one memory node of `poolBytes`, without failure
/// detection (the tests fence and recover by hand).
/// The span header at `slot` on memory node 0, as the inspector reads it.
private func spanHeader(_ inspector: PoolInspector, _ slot: HeaderSlot) -> SpanHeader? {
    guard case .span(let section, let span) = slot else { return nil }
    return inspector.span(on: NodeID(0), section: section, span: span)
}

private func startCluster(
    _ simulator: Simulator, poolBytes: UInt64, computeNodes: Int = 2, failureDetection: Bool = false
) async throws -> (EmbeddedCluster, PoolInspector) {
    var configuration = EmbeddedCluster.Configuration(poolBytesPerNode: poolBytes, computeNodes: computeNodes)
    configuration.failureDetection = failureDetection
    let cluster = try await EmbeddedCluster.start(configuration, simulator: simulator)
    return (cluster, PoolInspector(cluster: cluster))
}

/// A 2 MiB pool (one section) where node B (index 1) holds every chunk but two, all of
/// them but 30 chunks of span H as 128 KiB blocks: the only room is two chunks of H,
/// where node A (index 0) has allocated and freed once (so its searches know H). Answers
/// B's blocks and H.
private func onlyTwoChunksLeft(_ cluster: EmbeddedCluster, _ inspector: PoolInspector) async throws -> (held: [Block], slot: HeaderSlot, problems: [String]) {
    let (a, b) = (cluster.computeNodes[0], cluster.computeNodes[1])
    var held: [Block] = []
    var problems: [String] = []
    let first = try await b.allocate(chunkCountLog2: 0, application: application)
    held.append(first)
    let slot = HeaderSlot(committing: first)
    let probe = try await a.allocate(chunkCountLog2: 0, application: application)
    try await a.free(probe, application: application)
    if HeaderSlot(committing: probe) != slot { problems.append("set-up: A allocated \(probe), outside B's span \(slot)") }
    while true {
        do throws(AllocationError) { held.append(try await b.allocate(chunkCountLog2: 5, application: application)) } catch {
            guard case .outOfMemory = error else { throw error }
            break
        }
    }
    for _ in 0..<29 { held.append(try await b.allocate(chunkCountLog2: 0, application: application)) }
    for block in held { problems += inspector.admit(block, owner: b.owner) }
    await cluster.quiesce()
    let used = inspector.span(on: NodeID(0), section: first.section, span: first.spanInSection)?.bitmap.nonzeroBitCount
    if used != 30 || held.contains(where: { $0.layer == .chunk && HeaderSlot(committing: $0) != slot }) {
        problems.append("set-up: span \(slot) has \(used.map(String.init) ?? "?") chunks in use, not 30")
    }
    return (held, slot, problems)
}

@Suite struct DeferredUpkeepFaultTests {
    /// The moments of a deferred flush at which node A crashes.
    enum Moment: String, CaseIterable, Sendable, CustomTestStringConvertible {
        /// A's upkeep item for H was put back (deferrals >= 1) and nobody holds the log.
        case deferred
        /// As `deferred`, and an operation of A has taken the log to fold it into its
        /// commit: its doorbell (record CAS, commit CAS, record READ) is on its way.
        case foldInFlight
        /// The worker gave up deferring: it flushes and a turn for other nodes runs.
        case turn
        var testDescription: String { rawValue }
    }

    /// Claim 1: A crashes while the flush of its log on span H is deferred, at each of the
    /// moments above and after 0-3 more of its verbs (the fold's record CAS alone, record
    /// and commit, ...), its unexecuted verbs dropped or run late. B holds a block in H
    /// and keeps allocating and freeing meanwhile. A is fenced and recovered; then nothing
    /// A held is allocated, no log, span state or intent is left, B's blocks are intact
    /// and never overlapped another (the ledger), and once B frees everything every header
    /// is empty and A's next incarnation gets the whole pool (2 MiB) in one block.
    @Test(arguments: Moment.allCases)
    func crashWhileTheFlushIsDeferred(moment: Moment) {
        var failures: [String] = []
        // DEFERRED_UPKEEP_SCAN=n also runs n more seeds per crash point, seeded late verbs too.
        let scan = UInt64(getenv("DEFERRED_UPKEEP_SCAN").flatMap { Int(String(cString: $0)) } ?? 0)
        for offset in UInt64(0)...3 {
            for late in FaultPlan.LateVerbs.enumerated + (scan > 0 ? [.seeded] : []) {
              for extra in 0...scan {
                let seed = 500 + offset + 10 * extra
                let found = problems(of: simulateBounded(seed: seed) { simulator in
                    try await Self.crashRun(simulator, moment: moment, offset: offset, late: late)
                })
                failures += found.map { "seed \(seed), crash at \(moment.rawValue) + \(offset) verbs, late verbs \(late): \($0)" }
              }
            }
        }
        for failure in failures.prefix(12) { Issue.record("\(failure)") }
    }

    private static func crashRun(_ simulator: Simulator, moment: Moment, offset: UInt64, late: FaultPlan.LateVerbs) async throws -> [String] {
        let (cluster, inspector) = try await startCluster(simulator, poolBytes: 2 << 20)
        let (a, b) = (cluster.computeNodes[0], cluster.computeNodes[1])
        var problems: [String] = []
        let bHeld = [try await b.allocate(chunkCountLog2: 0, application: application), try await b.allocate(chunkCountLog2: 6, application: application)]
        for block in bHeld { problems += inspector.admit(block, owner: b.owner) }
        let slot = HeaderSlot(committing: bHeld[0])
        await cluster.quiesce()
        let probe = try await a.allocate(chunkCountLog2: 0, application: application)
        try await a.free(probe, application: application)
        guard HeaderSlot(committing: probe) == slot else { return ["set-up: A allocated \(probe), outside B's span \(slot)"] }
        await cluster.quiesce()
        let aHeld = Locked<Set<Block>>([])
        let notes = Locked<[String]>([])
        let note: @Sendable ([String]) -> Void = { found in if !found.isEmpty { notes.withLock { $0 += found } } }
        let loadSeed = simulator.forkSeed()
        async let hammered = hammer(a, pairs: 400, pauseNanos: idleNanos / 4, simulator: simulator, inspector: inspector, held: aHeld)
        async let loaded: Void = CrashPointEnumeration.load(
            b, operations: 12, sizes: [0, 0, 1, 5, 6], pauseNanosMax: 40_000, seed: loadSeed, simulator: simulator, inspector: inspector, note: note)
        async let crashed: (reached: Bool, reclaimed: Int, error: String?) = {
            let reached = await waitUntil(simulator) {
                let state = a.logState(on: slot)
                switch moment {
                case .deferred: return (a.queuedUpkeepDeferrals(of: slot) ?? 0) >= 1 && state.pending && !state.taken
                case .foldInFlight: return (a.queuedUpkeepDeferrals(of: slot) ?? 0) >= 1 && state.taken && state.operationInFlight
                case .turn: return state.turns
                }
            }
            simulator.faults.crash(aID, afterVerbs: simulator.verbsExecuted(by: aID) + offset, late: late)
            // A crash after verbs is found by A's next verb; A may be idle: crash it by time.
            if !(await waitUntil(simulator, maxNanos: 300_000) { simulator.faults.isCrashed(aID) }) {
                simulator.faults.crash(aID, atNanoseconds: simulator.nowNanoseconds)
            }
            await simulator.sleep(nanoseconds: 100_000)
            do {
                try await cluster.fence(computeNode: 0)
                let reports = try await cluster.recover(computeNode: 0)
                return (reached, reports.map(\.blocksReclaimed).reduce(0, +), nil)
            } catch {
                return (reached, 0, "fence or recovery: \(error)")
            }
        }()
        let (hammer, _, crash) = await (hammered, loaded, crashed)
        problems += hammer.problems + notes.withLock { $0 }
        if !crash.reached { problems.append("set-up: the moment \(moment.rawValue) never came (\(hammer.done) pairs)") }
        if let error = crash.error { problems.append(error) }
        if hammer.error == nil { problems.append("A's pairs went on after its crash: \(hammer.done) pairs") }
        await cluster.quiesce()
        // What A held is nobody's once it is recovered.
        for (block, owner) in inspector.liveBlocks where owner == a.owner { _ = inspector.release(block) }
        problems += inspector.checkAtRest().map { "after recovery: \($0)" }
        problems += inspector.checkIntents()
        if inspector.nodeSlot(on: NodeID(0), owner: a.owner)?.state != .free { problems.append("A's slot is not free after recovery") }
        for block in bHeld {
            problems += inspector.marked(block).map { "B's block after A's recovery: \($0)" }
            problems += inspector.release(block)
            do throws(AllocationError) { try await b.free(block, application: application) } catch { problems.append("B's free of \(block): \(error)") }
        }
        await cluster.quiesce()
        problems += inspector.checkAtRest() + inspector.everyHeaderEmpty()
        // No block lost: the next incarnation of A gets the whole pool in one block.
        simulator.faults.revive(aID)
        let reborn = try await cluster.restart(computeNode: 0)
        do throws(AllocationError) {
            let whole = try await reborn.allocate(chunkCountLog2: 9, application: application)
            problems += inspector.admit(whole, owner: reborn.owner)
            problems += inspector.release(whole)
            try await reborn.free(whole, application: application)
        } catch { problems.append("the whole pool (2 MiB) after recovery: \(error)") }
        await cluster.quiesce()
        problems += inspector.everyHeaderEmpty().map { "end: \($0)" }
        return problems
    }

    /// Claim 2: node A stalls (all of it: no post, no completion) for `stallNanos` while
    /// its log is pending on span H, the flush deferred (A keeps allocating and freeing
    /// there), and H holds the pool's only free chunks (B holds the rest). B asks for 4 KiB
    /// and frees a block of H meanwhile (two tasks). A stall shorter than B's bound
    /// (`waitCountMax` pauses, which the cluster sizes to outlast a lapsed lease and its
    /// recovery: about 5 s) ends with B's block and free done; a longer one with
    /// `retryLimitExceeded` for both, within about that bound, never
    /// `outOfMemory` (the room is there, under A's log), a hang or a changed word: B's
    /// free leaves the block B's, and both succeed once A is back. Then everything drains,
    /// the pool is consistent at rest, and every header empty once all is freed.
    @Test(arguments: [UInt64(400_000_000), 6_000_000_000])
    func aStalledNodesDeferredLogHoldsAnotherNodeBoundedly(stallNanos: UInt64) {
        let seed: UInt64 = 600
        let found = problems(of: simulateBounded(seed: seed) { simulator -> [String] in
            let (cluster, inspector) = try await startCluster(simulator, poolBytes: 2 << 20)
            let (a, b) = (cluster.computeNodes[0], cluster.computeNodes[1])
            var (bHeld, slot, problems) = try await onlyTwoChunksLeft(cluster, inspector)
            let aHeld = Locked<Set<Block>>([])
            let stop = Locked(false)
            async let hammered = hammer(a, pairs: 1_000_000, pauseNanos: idleNanos / 4, simulator: simulator, inspector: inspector, held: aHeld, stop: stop)
            let reached = await waitUntil(simulator) {
                (a.queuedUpkeepDeferrals(of: slot) ?? 0) >= 1
                    && spanHeader(inspector, slot).map { $0.logPending && $0.log.owner == a.owner } == true
            }
            if !reached { problems.append("set-up: A's flush on \(slot) was never deferred") }
            let stallStart = simulator.nowNanoseconds
            let stallEnd = stallStart + stallNanos
            simulator.faults.stall(aID, fromNanoseconds: stallStart, forNanoseconds: stallNanos)
            await simulator.sleep(nanoseconds: 20_000)
            let victim = bHeld.first { $0.layer == .chunk }!
            async let allocated: (Result<Block, AllocationError>, UInt64) = {
                do throws(AllocationError) {
                    return (.success(try await b.allocate(chunkCountLog2: 0, application: application)), simulator.nowNanoseconds)
                } catch { return (.failure(error), simulator.nowNanoseconds) }
            }()
            async let freed: (AllocationError?, UInt64) = {
                do throws(AllocationError) { try await b.free(victim, application: application) } catch { return (error, simulator.nowNanoseconds) }
                return (nil, simulator.nowNanoseconds)
            }()
            let ((allocation, allocatedAt), (freeError, freedAt)) = await (allocated, freed)
            problems += inspector.checkStructure().map { "while A is stalled: \($0)" }
            let bound = EmbeddedCluster.allocatorConfiguration(cluster.configuration)
            let boundNanos = UInt64(bound.waitCountMax) * bound.backoffNanosMax
            let long = stallNanos > boundNanos
            switch allocation {
            case .success(let block):
                problems += inspector.admit(block, owner: b.owner)
                bHeld.append(block)
                if long { problems.append("B's allocation committed under A's pending log at \(allocatedAt), stall \(stallStart)-\(stallEnd)") }
            case .failure(let error):
                if !long || error != .retryLimitExceeded(attempts: bound.waitCountMax) {
                    problems.append("B's allocation failed at +\((allocatedAt - stallStart) / 1_000) us of a \(stallNanos / 1_000_000) ms stall: \(error)")
                }
            }
            if let freeError {
                if !long || freeError != .retryLimitExceeded(attempts: bound.waitCountMax) {
                    problems.append("B's free failed at +\((freedAt - stallStart) / 1_000) us of a \(stallNanos / 1_000_000) ms stall: \(freeError)")
                }
                problems += inspector.marked(victim).map { "B's block after its failed free: \($0)" }
            } else {
                problems += inspector.release(victim)
                bHeld.removeAll { $0 == victim }
                if long { problems.append("B's free committed under A's pending log at \(freedAt), stall \(stallStart)-\(stallEnd)") }
            }
            for (what, at) in [("allocation", allocatedAt), ("free", freedAt)] where at > stallStart + boundNanos + boundNanos / 2 {
                problems.append("B's \(what) answered \((at - stallStart) / 1_000_000) ms into the stall: beyond its bound")
            }
            // After the stall: B's failed operations go through.
            if simulator.nowNanoseconds < stallEnd { await simulator.sleep(nanoseconds: stallEnd - simulator.nowNanoseconds + 1_000_000) }
            if long {
                do throws(AllocationError) {
                    let block = try await b.allocate(chunkCountLog2: 0, application: application)
                    problems += inspector.admit(block, owner: b.owner)
                    bHeld.append(block)
                } catch { problems.append("B's allocation after the stall: \(error)") }
                if freeError != nil {
                    do throws(AllocationError) {
                        try await b.free(victim, application: application)
                        problems += inspector.release(victim)
                        bHeld.removeAll { $0 == victim }
                    } catch { problems.append("B's free after the stall: \(error)") }
                }
            }
            stop.withLock { $0 = true }
            let hammer = await hammered
            problems += hammer.problems
            if let error = hammer.error { problems.append("A's pairs: \(error) after \(hammer.done)") }
            await cluster.quiesce()
            return problems + (await drain(cluster, freeing: bHeld, by: b, inspector: inspector))
        })
        #expect(found == [], "seed \(seed), stall \(stallNanos / 1_000_000) ms")
    }

    /// Claim 2, with leases: A stalls for 5 s (past its 3 s lease) while its flush on H is
    /// deferred and H holds the only free chunks; the memory node's monitor fences and
    /// recovers A meanwhile. B, retrying on `retryLimitExceeded` (its only allowed error),
    /// gets its block and frees its block of H once A's log is settled by recovery, well
    /// before A comes back; A, back, fails with a typed error and changes nothing; the
    /// pool is consistent at rest and empty once B frees everything.
    @Test func aNodeStalledPastItsLeaseWithADeferredLogIsRecoveredUnderTheWaitingNode() {
        let seed: UInt64 = 650
        let stallNanos: UInt64 = 5_000_000_000
        let found = problems(of: simulateBounded(seed: seed) { simulator -> [String] in
            let (cluster, inspector) = try await startCluster(simulator, poolBytes: 2 << 20, failureDetection: true)
            let (a, b) = (cluster.computeNodes[0], cluster.computeNodes[1])
            var (bHeld, slot, problems) = try await onlyTwoChunksLeft(cluster, inspector)
            cluster.startFailureDetection()
            let aHeld = Locked<Set<Block>>([])
            let stop = Locked(false)
            async let hammered = hammer(a, pairs: 1_000_000, pauseNanos: idleNanos / 4, simulator: simulator, inspector: inspector, held: aHeld, stop: stop)
            let reached = await waitUntil(simulator) {
                (a.queuedUpkeepDeferrals(of: slot) ?? 0) >= 1 && spanHeader(inspector, slot).map { $0.logPending && $0.log.owner == a.owner } == true
            }
            if !reached { problems.append("set-up: A's flush on \(slot) was never deferred") }
            let stallStart = simulator.nowNanoseconds
            simulator.faults.stall(aID, fromNanoseconds: stallStart, forNanoseconds: stallNanos)
            await simulator.sleep(nanoseconds: 20_000)
            let victim = bHeld.first { $0.layer == .chunk }!
            // B retries what fails with retryLimitExceeded; anything else is a problem.
            func retrying<T: Sendable>(_ what: String, _ body: () async throws(AllocationError) -> T) async -> (T?, UInt64, [String]) {
                for _ in 0..<20 {
                    do throws(AllocationError) { return (try await body(), simulator.nowNanoseconds, []) } catch {
                        guard case .retryLimitExceeded = error else { return (nil, simulator.nowNanoseconds, ["B's \(what): \(error)"]) }
                    }
                }
                return (nil, simulator.nowNanoseconds, ["B's \(what) kept answering retryLimitExceeded"])
            }
            let (block, allocatedAt, allocationProblems) = await retrying("allocation") { () throws(AllocationError) -> Block in
                try await b.allocate(chunkCountLog2: 0, application: application)
            }
            let (freed, freedAt, freeProblems) = await retrying("free") { () throws(AllocationError) -> Bool in
                try await b.free(victim, application: application)
                return true
            }
            problems += allocationProblems + freeProblems
            if let block {
                problems += inspector.admit(block, owner: b.owner)
                bHeld.append(block)
            }
            if freed == true {
                problems += inspector.release(victim)
                bHeld.removeAll { $0 == victim }
            }
            for at in [allocatedAt, freedAt] where at >= stallStart + stallNanos {
                problems.append("B waited until A came back (\((at - stallStart) / 1_000_000) ms): recovery did not free H")
            }
            if simulator.nowNanoseconds < stallStart + stallNanos { await simulator.sleep(nanoseconds: stallStart + stallNanos - simulator.nowNanoseconds + 1_000_000) }
            stop.withLock { $0 = true }
            let pairs = await hammered
            problems += pairs.problems
            switch pairs.error {
            case .fenced?, .fabric?: break
            default: problems.append("A, fenced during its stall, answered \(pairs.error.map { "\($0)" } ?? "nothing") after \(pairs.done) pairs")
            }
            if !a.isFenced { problems.append("A was not fenced by a 5 s stall") }
            cluster.stopFailureDetection()
            await cluster.quiesce()
            for (block, owner) in inspector.liveBlocks where owner == a.owner { _ = inspector.release(block) }
            return problems + (await drain(cluster, freeing: bHeld, by: b, inspector: inspector))
        })
        #expect(found == [], "seed \(seed)")
    }

    /// Claim 3a: A's connection breaks (a fabric error: the QP enters the error state)
    /// while the flush of its log on H is deferred. A's operation fails with a typed
    /// fabric error, its next ones too; its upkeep drains (the flush fails and leaves the
    /// log to recovery) without tripping an assertion; H keeps A's log pending, in A's
    /// name, until A is fenced and recovered; then B's frees go through and the pool is
    /// consistent and empty.
    @Test func aFabricErrorWhileTheFlushIsDeferred() {
        let seed: UInt64 = 700
        let found = problems(of: simulateBounded(seed: seed) { simulator -> [String] in
            let (cluster, inspector) = try await startCluster(simulator, poolBytes: 2 << 20)
            let (a, b) = (cluster.computeNodes[0], cluster.computeNodes[1])
            var problems: [String] = []
            let bHeld = try await b.allocate(chunkCountLog2: 0, application: application)
            problems += inspector.admit(bHeld, owner: b.owner)
            let slot = HeaderSlot(committing: bHeld)
            await cluster.quiesce()
            let aHeld = Locked<Set<Block>>([])
            async let hammered = hammer(a, pairs: 400, pauseNanos: idleNanos / 4, simulator: simulator, inspector: inspector, held: aHeld)
            let reached = await waitUntil(simulator) { (a.queuedUpkeepDeferrals(of: slot) ?? 0) >= 1 && a.logState(on: slot).pending }
            if !reached { problems.append("set-up: A's flush on \(slot) was never deferred") }
            guard let connection = a.links[0].connection as? SimulatedConnection else { return ["set-up: not a simulated connection"] }
            connection.breakConnection()
            let hammer = await hammered
            problems += hammer.problems
            if case .fabric? = hammer.error {} else { problems.append("A's operation after the break answered \(hammer.error.map { "\($0)" } ?? "nothing") after \(hammer.done) pairs") }
            do throws(AllocationError) {
                let block = try await a.allocate(chunkCountLog2: 0, application: application)
                problems.append("A allocated \(block) over a broken connection")
            } catch {
                switch error {
                case .fabric, .fenced: break
                default: problems.append("A's allocation over a broken connection: \(error)")
                }
            }
            let quiesceStart = simulator.nowNanoseconds
            await a.quiesce()
            if simulator.nowNanoseconds - quiesceStart > 10_000_000 { problems.append("A's upkeep took \((simulator.nowNanoseconds - quiesceStart) / 1_000) us to drain") }
            // The failed flush keeps A's log in its table (the link is broken: the log is A's
            // until recovery settles it), never dropped.
            let header = spanHeader(inspector, slot)
            if header?.logPending == true, header?.log.owner == a.owner, !a.logState(on: slot).pending {
                problems.append("A's pending-log table dropped its log on \(slot), still pending in the pool")
            }
            let aLogLeft = header?.logPending == true && header?.log.owner == a.owner
            try await cluster.fence(computeNode: 0)
            _ = try await cluster.recover(computeNode: 0)
            for (block, owner) in inspector.liveBlocks where owner == a.owner { _ = inspector.release(block) }
            problems += inspector.checkAtRest().map { "after recovery (A's log was \(aLogLeft ? "" : "not ")left on \(slot)): \($0)" }
            problems += inspector.release(bHeld)
            do throws(AllocationError) { try await b.free(bHeld, application: application) } catch { problems.append("B's free after A's recovery: \(error)") }
            await cluster.quiesce()
            return problems + inspector.checkAtRest() + inspector.everyHeaderEmpty()
        })
        #expect(found == [], "seed \(seed)")
    }

    /// Claim 3b: a turn on the only header with room does not fail the node's own
    /// operations: A's searches pass H by during each turn it gives, and H holds the
    /// pool's only free chunks; A's allocations wait out the turn (a short pause) and
    /// every pair succeeds, never `outOfMemory` or `retryLimitExceeded`. Turns did happen.
    @Test func aTurnOnTheOnlyRoomDoesNotFailTheNodesOwnAllocations() {
        let seed: UInt64 = 800
        let found = problems(of: simulateBounded(seed: seed) { simulator -> [String] in
            let (cluster, inspector) = try await startCluster(simulator, poolBytes: 2 << 20)
            let a = cluster.computeNodes[0]
            var (bHeld, slot, problems) = try await onlyTwoChunksLeft(cluster, inspector)
            let aHeld = Locked<Set<Block>>([])
            let pairs = 120
            let finished = Locked(false)
            async let hammered = {
                let outcome = await hammer(a, pairs: pairs, pauseNanos: idleNanos / 4, simulator: simulator, inspector: inspector, held: aHeld)
                finished.withLock { $0 = true }
                return outcome
            }()
            async let turns: Int = {
                var turns = 0
                var inTurn = false
                while !finished.withLock({ $0 }) {
                    let now = a.logState(on: slot).turns
                    if now, !inTurn { turns += 1 }
                    inTurn = now
                    await simulator.sleep(nanoseconds: 50)
                }
                return turns
            }()
            let (pairsRun, turnCount) = await (hammered, turns)
            problems += pairsRun.problems
            if pairsRun.done != pairs { problems.append("A did \(pairsRun.done) of \(pairs) pairs: \(pairsRun.error.map { "\($0)" } ?? "")") }
            if turnCount < 2 { problems.append("set-up: \(turnCount) turns") }
            await cluster.quiesce()
            problems += inspector.checkAtRest()
            for block in bHeld {
                problems += inspector.release(block)
                try await cluster.computeNodes[1].free(block, application: application)
            }
            bHeld = []
            await cluster.quiesce()
            return problems + inspector.checkAtRest() + inspector.everyHeaderEmpty()
        })
        #expect(found == [], "seed \(seed)")
    }

    /// Claim 3c: a 4 MiB claim folds A's deferred section log. A's 256 KiB pairs on
    /// section 0 keep its flush deferred; then A asks for the whole pool (4 MiB: both
    /// sections), whose claim doorbell carries the intent, the record CAS of the section's
    /// log it takes over, and the claim CASes; A crashes after each of its next verbs
    /// (claim, the flush of the run, the intent's clear, the deferred item's look), the
    /// rest dropped or run late. After fencing and recovery: nothing leaked, no log,
    /// intent or half claim left, and B gets the whole pool.
    @Test func crashInAClaimThatFoldsADeferredSectionLog() {
        var failures: [String] = []
        var folded = 0
        for offset in UInt64(0)...9 {
            for late in FaultPlan.LateVerbs.enumerated {
                let seed = 900 + offset
                let result = simulateBounded(seed: seed) { simulator -> [String] in
                    let (cluster, inspector) = try await startCluster(simulator, poolBytes: 4 << 20)
                    let (a, b) = (cluster.computeNodes[0], cluster.computeNodes[1])
                    var problems: [String] = []
                    let aHeld = Locked<Set<Block>>([])
                    let hammer = await hammer(a, size: 6, pairs: 6, pauseNanos: idleNanos / 4, simulator: simulator, inspector: inspector, held: aHeld)
                    problems += hammer.problems
                    if let error = hammer.error { return problems + ["set-up: A's 256 KiB pairs: \(error)"] }
                    // Section 0 (or 1) carries A's log of its last free, its flush put back.
                    let slot = [HeaderSlot.section(0), .section(1)].first { a.logState(on: $0).pending && (a.queuedUpkeepDeferrals(of: $0) ?? 0) >= 1 }
                    guard let slot, !a.logState(on: slot).taken else { return problems + ["set-up: no deferred section log free to fold after the pairs"] }
                    let pendingBefore = inspector.section(on: NodeID(0), slot.section).map { $0.logPending && $0.log.owner == a.owner } == true
                    if !pendingBefore { problems.append("set-up: \(slot) does not show A's pending log before the claim") }
                    simulator.faults.crash(aID, afterVerbs: simulator.verbsExecuted(by: aID) + offset, late: late)
                    var claimed: Block?
                    do throws(AllocationError) { claimed = try await a.allocate(chunkCountLog2: 10, application: application) } catch {}
                    if let claimed {
                        problems += inspector.admit(claimed, owner: a.owner)
                        _ = aHeld.withLock { $0.insert(claimed) }
                    }
                    if !(await waitUntil(simulator, maxNanos: 1_000_000) { simulator.faults.isCrashed(aID) }) {
                        simulator.faults.crash(aID, atNanoseconds: simulator.nowNanoseconds)
                    }
                    await simulator.sleep(nanoseconds: 50_000)
                    try await cluster.fence(computeNode: 0)
                    _ = try await cluster.recover(computeNode: 0)
                    await cluster.quiesce()
                    for (block, owner) in inspector.liveBlocks where owner == a.owner { _ = inspector.release(block) }
                    problems += inspector.checkAtRest() + inspector.checkIntents() + inspector.everyHeaderEmpty()
                    do throws(AllocationError) {
                        let whole = try await b.allocate(chunkCountLog2: 10, application: application)
                        problems += inspector.admit(whole, owner: b.owner) + inspector.release(whole)
                        try await b.free(whole, application: application)
                    } catch { problems.append("B's 4 MiB after A's recovery: \(error)") }
                    await cluster.quiesce()
                    return problems + inspector.checkAtRest().map { "end: \($0)" } + inspector.everyHeaderEmpty().map { "end: \($0)" }
                        + (claimed == nil ? [] : ["(claimed)"])
                }
                var found = problems(of: result)
                if found.contains("(claimed)") { folded += 1 }
                found.removeAll { $0 == "(claimed)" }
                failures += found.map { "seed \(seed), crash after +\(offset) verbs, late verbs \(late): \($0)" }
            }
        }
        for failure in failures.prefix(12) { Issue.record("\(failure)") }
        // Late crash points let the claim answer: the enumeration reached past the claim.
        #expect(folded > 0, "no run got past the claim")
    }
}
