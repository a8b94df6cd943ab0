import FineMem

/// Crash-point enumeration: for one operation kind, crash the node running it after each
/// of its verbs (every executed prefix of every batch, the background flush and span
/// upkeep that follow the operation included), with its posted but unexecuted verbs
/// either dropped or executed late; other compute nodes keep allocating and freeing
/// meanwhile. Then the node is fenced and recovered, and every invariant is checked: no
/// leak, no double ownership, no pending log, span state or intent left, every record
/// agreeing with the bitmaps; and once the node restarts and everyone frees, every header
/// is empty. `recovery` crashes the recoverer instead, at each of its verbs, and runs
/// recovery again.
///
/// With `cacheShards` above 1 every compute node has that many cache shards, each with a
/// connection of its own, and one for the upkeep (the pool grows to 4 sections a shard):
/// the victim's operation and its upkeep post on different queue pairs, so late verbs of
/// one may execute while the other's are dropped. Each run checks that the victim has
/// those lanes.
///
/// ```swift
/// let summary = CrashPointEnumeration(seed: 1).run(.freeMultiSection)
/// print(summary)  // "free 4 MiB: 38 crash points x 2 late-verb policies, 76 runs, 0 violations"
/// ```
package struct CrashPointEnumeration: Sendable {
    /// The operations whose verbs are enumerated.
    package enum Operation: String, CaseIterable, Sendable {
        case allocateChunk = "allocate-4k"
        case allocateOpeningSpan = "allocate-4k-opening-span"
        case freeChunk = "free-16k"
        case freeClosingSpan = "free-4k-closing-span"
        case allocateSection = "allocate-256k"
        case freeSection = "free-256k"
        case allocateMultiSection = "allocate-4m"
        case freeMultiSection = "free-4m"
        case recovery = "recovery"
    }

    package struct Summary: Sendable, CustomStringConvertible {
        package let operation: Operation
        package let seed: UInt64
        package var cacheShards = 1
        /// Verb positions enumerated (0 = before the first verb ... the last = after all).
        package var crashPoints = 0
        package var runs = 0
        package var violations: [String] = []
        /// Blocks recovery reclaimed over all runs.
        package var blocksReclaimed = 0
        /// The trace hashes of every run, the reference run first, folded in order: equal
        /// when two builds run the same simulations.
        package var traces = TraceHash()

        package var description: String {
            "\(operation.rawValue) (seed \(seed)\(cacheShards > 1 ? ", \(cacheShards) shards" : "")): \(crashPoints) crash points x \(FaultPlan.LateVerbs.enumerated.count) late-verb policies, "
                + "\(runs) runs, \(blocksReclaimed) blocks reclaimed, \(violations.count) violations, traces \(traces)"
        }
    }

    package let seed: UInt64
    /// Operations of each live compute node running during the crash and the recovery.
    package var loadOperations = 12
    /// Shards of every compute node's header cache (and lanes: one connection each, and
    /// one for the upkeep, when above 1).
    package var cacheShards = 1

    package init(seed: UInt64, loadOperations: Int = 12, cacheShards: Int = 1) {
        self.seed = seed
        self.loadOperations = loadOperations
        self.cacheShards = cacheShards
    }

    /// The pool: 32 MiB, or 4 sections of 2 MiB per shard when that is more. The three
    /// nodes' searches start apart (`HeaderCacheShards.start(of:)`), so the set-up's
    /// small blocks open spans in three sections: 16 sections leave the victim's two
    /// 4 MiB blocks aligned pairs of empty sections (8 did not).
    package static func poolBytes(cacheShards: Int) -> UInt64 { max(32 << 20, UInt64(cacheShards) * 4 * PoolGeometry.sectionBytes) }

    /// Enumerates every crash point of `operation` under both late-verb policies.
    package func run(_ operation: Operation, latePolicies: [FaultPlan.LateVerbs] = FaultPlan.LateVerbs.enumerated) -> Summary {
        var summary = Summary(operation: operation, seed: seed)
        summary.cacheShards = cacheShards
        let reference = runOnce(operation, crashAfter: nil, late: .none)
        summary.traces.mix(reference.traceHash.value)
        summary.violations += reference.violations.map { "no crash: \($0)" }
        summary.crashPoints = Int(reference.victimVerbs) + 1
        for point in 0...reference.victimVerbs {
            for late in latePolicies {
                let outcome = runOnce(operation, crashAfter: point, late: late)
                summary.runs += 1
                summary.traces.mix(outcome.traceHash.value)
                summary.blocksReclaimed += outcome.blocksReclaimed
                summary.violations += outcome.violations.map { "crash after verb \(point), late verbs \(late): \($0)" }
            }
        }
        return summary
    }

    /// What one run found.
    package struct Outcome: Sendable {
        /// Verbs the crashing node (or recoverer) executed in the enumerated part.
        package var victimVerbs: UInt64 = 0
        package var blocksReclaimed = 0
        package var violations: [String] = []
        /// The run's trace hash.
        package var traceHash = TraceHash()
    }

    private static let victim = 0
    private static let loadNodes = [1, 2]
    private static let recovererID = NodeID(900)

    /// One run: the operation with a crash after `crashAfter` of its verbs (nil: none).
    package func runOnce(_ operation: Operation, crashAfter: UInt64?, late: FaultPlan.LateVerbs) -> Outcome {
        let simulator = Simulator(seed: seed)
        let outcome = Locked(Outcome())
        let (loadOperations, cacheShards) = (loadOperations, cacheShards)
        simulator.spawn {
            await Self.drive(
                operation, crashAfter: crashAfter, late: late, loadOperations: loadOperations, cacheShards: cacheShards, simulator: simulator, outcome: outcome)
        }
        simulator.run()
        return outcome.withLock { outcome in
            outcome.traceHash = simulator.traceHash
            return outcome
        }
    }

    private static func drive(
        _ operation: Operation, crashAfter: UInt64?, late: FaultPlan.LateVerbs, loadOperations: Int, cacheShards: Int, simulator: Simulator,
        outcome: Locked<Outcome>
    ) async {
        let note: @Sendable ([String]) -> Void = { problems in if !problems.isEmpty { outcome.withLock { $0.violations += problems } } }
        let cluster: EmbeddedCluster
        do {
            var configuration = EmbeddedCluster.Configuration(memoryNodes: 1, poolBytesPerNode: poolBytes(cacheShards: cacheShards), computeNodes: 3)
            configuration.allocator.cacheShards = cacheShards
            cluster = try await EmbeddedCluster.start(configuration, simulator: simulator)
        } catch {
            note(["cluster did not start: \(error)"])
            return
        }
        let inspector = PoolInspector(cluster: cluster)
        let victim = cluster.computeNodes[Self.victim]
        let lanes = cacheShards > 1 ? cacheShards + 1 : 1
        if victim.cacheShards() != cacheShards || victim.lanes() != lanes {
            note(["set-up: the victim has \(victim.cacheShards()) cache shards and \(victim.lanes()) lanes, not \(cacheShards) and \(lanes)"])
            return
        }
        let victimID = EmbeddedCluster.computeNodeID(Self.victim)
        let application = ApplicationID(1)
        do throws(AllocationError) {
            // Set-up: the live nodes hold a few blocks; the victim holds some of every layer.
            // For a span open, nobody has a span open before it.
            let opensSpan = operation == .allocateOpeningSpan
            for node in Self.loadNodes {
                for size in opensSpan ? [5, 6] : [0, 2, 5] {
                    let block = try await cluster.computeNodes[node].allocate(chunkCountLog2: size, application: application)
                    note(inspector.admit(block, owner: cluster.computeNodes[node].owner))
                }
            }
            var held: [Block] = []
            for size in opensSpan ? [5, 10] : [1, 5, 10] { held.append(try await victim.allocate(chunkCountLog2: size, application: application)) }
            let target: Block? = switch operation {
            case .allocateChunk: try await victim.allocate(chunkCountLog2: 0, application: application)
            case .freeChunk: try await victim.allocate(chunkCountLog2: 2, application: application)
            // Alone in the span it opened: the free empties it and upkeep closes it.
            case .freeClosingSpan: try await Self.aloneInItsSpan(victim, inspector: inspector, held: &held)
            case .freeSection: try await victim.allocate(chunkCountLog2: 6, application: application)
            case .freeMultiSection: try await victim.allocate(chunkCountLog2: 10, application: application)
            case .allocateOpeningSpan, .allocateSection, .allocateMultiSection, .recovery: nil
            }
            await cluster.quiesce()
            note(inspector.checkStructure())
            let base = simulator.verbsExecuted(by: victimID)
            let spansOpenedBefore = victim.statistics.spansOpened
            if operation == .recovery {
                // The victim dies in the middle of freeing its 4 MiB block: its intent is
                // written and one of the two sections released, the other still held.
                simulator.faults.crash(victimID, afterVerbs: base + 2, late: .none)
            } else if let crashAfter {
                simulator.faults.crash(victimID, afterVerbs: base + crashAfter, late: late)
            }
            let freed = operation == .recovery ? held.last! : held[0]
            await withTaskGroup(of: Void.self) { group in
                group.addTask {
                    // The victim's operation (its background upkeep follows by itself).
                    do throws(AllocationError) {
                        switch operation {
                        case .allocateChunk, .allocateOpeningSpan: _ = try await victim.allocate(chunkCountLog2: 0, application: application)
                        case .allocateSection: _ = try await victim.allocate(chunkCountLog2: 6, application: application)
                        case .allocateMultiSection: _ = try await victim.allocate(chunkCountLog2: 10, application: application)
                        case .freeChunk, .freeClosingSpan, .freeSection, .freeMultiSection: try await victim.free(target!, application: application)
                        case .recovery: try await victim.free(freed, application: application)
                        }
                    } catch {
                        // A crashed node's operation fails; whatever it left is recovery's.
                    }
                }
                for node in Self.loadNodes {
                    group.addTask { await Self.load(cluster.computeNodes[node], operations: loadOperations, seed: simulator.forkSeed(), simulator: simulator, inspector: inspector, note: note) }
                }
                group.addTask {
                    await simulator.sleep(nanoseconds: 400_000)
                    do {
                        try await cluster.fence(computeNode: Self.victim)
                    } catch {
                        note(["fence failed: \(error)"])
                        return
                    }
                    await Self.recover(cluster, operation: operation, crashAfter: crashAfter, late: late, simulator: simulator, outcome: outcome, note: note)
                }
            }
            if operation != .recovery {
                outcome.withLock { $0.victimVerbs = simulator.verbsExecuted(by: victimID) - base }
            }
            if opensSpan, crashAfter == nil, victim.statistics.spansOpened == spansOpenedBefore {
                note(["set-up: the 4 KiB allocation did not open a span"])
            }
            await cluster.quiesce()
            note(inspector.checkAtRest())
            note(inspector.checkIntents())
            let slot = inspector.nodeSlot(on: NodeID(0), owner: EmbeddedCluster.owner(ofComputeNode: Self.victim))
            if slot?.state != .free { note(["the victim's slot is \(String(describing: slot)) after recovery"]) }
            // The victim comes back as a new incarnation; then everybody frees everything.
            simulator.faults.revive(victimID)
            let reborn: BlockAllocator
            do { reborn = try await cluster.restart(computeNode: Self.victim) } catch {
                note(["restart failed: \(error)"])
                return
            }
            let big = try await reborn.allocate(chunkCountLog2: 10, application: application)
            let small = try await reborn.allocate(chunkCountLog2: 0, application: application)
            try await reborn.free(big, application: application)
            try await reborn.free(small, application: application)
            for (block, owner) in inspector.liveBlocks {
                note(inspector.release(block))
                let node = cluster.computeNodes.first { $0.owner == owner }!
                try await node.free(block, application: application)
            }
            await cluster.quiesce()
            note(inspector.checkAtRest())
            note(inspector.everyHeaderEmpty())
        } catch {
            note(["\(operation.rawValue): \(error)"])
        }
    }

    /// Allocates 4 KiB blocks until one is alone in a span it opened (the others are held).
    private static func aloneInItsSpan(_ node: BlockAllocator, inspector: PoolInspector, held: inout [Block]) async throws(AllocationError) -> Block {
        for _ in 0..<4 * PoolGeometry.chunksPerSection {
            let block = try await node.allocate(chunkCountLog2: 0, application: ApplicationID(1))
            if inspector.span(on: block.memoryNode, section: block.section, span: block.spanInSection)?.bitmap == 1 << UInt32(block.firstChunk % PoolGeometry.chunksPerSpan) {
                return block
            }
            held.append(block)
        }
        throw .corruptMetadata("set-up: no 4 KiB block came alone in its span")
    }

    /// A live node's seeded allocate/free loop (sizes as log2 of chunks, a pause of up to
    /// `pauseNanosMax` before each operation), with the ledger kept; it frees what it holds
    /// at the end.
    package static func load(
        _ node: BlockAllocator, operations: Int, sizes: [Int] = [0, 0, 1, 3, 5, 6], pauseNanosMax: UInt64 = 60_000, seed: UInt64,
        simulator: Simulator, inspector: PoolInspector, note: @escaping @Sendable ([String]) -> Void
    ) async {
        var random = SeededRandom(seed: seed)
        var held: [Block] = []
        for _ in 0..<operations {
            await simulator.sleep(nanoseconds: random.next() % pauseNanosMax)
            do throws(AllocationError) {
                if !held.isEmpty, random.next() % 2 == 0 {
                    let block = held.remove(at: Int(random.next() % UInt64(held.count)))
                    note(inspector.release(block))
                    try await node.free(block, application: ApplicationID(2))
                } else {
                    let block = try await node.allocate(chunkCountLog2: sizes[Int(random.next() % UInt64(sizes.count))], application: ApplicationID(2))
                    note(inspector.admit(block, owner: node.owner))
                    held.append(block)
                }
            } catch {
                if case .outOfMemory = error { continue }
                note(["live node \(node.owner): \(error)"])
            }
        }
        for block in held {
            note(inspector.release(block))
            do throws(AllocationError) { try await node.free(block, application: ApplicationID(2)) } catch { note(["live node \(node.owner) final free: \(error)"]) }
        }
    }

    /// Recovers the fenced victim; for `.recovery`, first through a recoverer that crashes
    /// after `crashAfter` of its verbs, then again through the memory node's loopback.
    private static func recover(
        _ cluster: EmbeddedCluster, operation: Operation, crashAfter: UInt64?, late: FaultPlan.LateVerbs, simulator: Simulator,
        outcome: Locked<Outcome>, note: @escaping @Sendable ([String]) -> Void
    ) async {
        let owner = EmbeddedCluster.owner(ofComputeNode: Self.victim)
        let memoryNode = cluster.memoryNodes[0]
        if operation == .recovery {
            let access: RecoveryAccess
            do { access = try memoryNode.recoveryAccess(for: owner, from: Self.recovererID) } catch {
                note(["recovery access: \(error)"])
                return
            }
            if let crashAfter { simulator.faults.crash(Self.recovererID, afterVerbs: crashAfter, late: late) }
            do {
                let report = try await PoolRecovery(access: access, runtime: simulator).run()
                outcome.withLock { $0.blocksReclaimed += report.blocksReclaimed }
            } catch {
                if crashAfter == nil { note(["recovery failed: \(error)"]) }
            }
            outcome.withLock { $0.victimVerbs = simulator.verbsExecuted(by: Self.recovererID) }
            // The crashed recoverer is fenced too: its late verbs stop here.
            await simulator.sleep(nanoseconds: 50_000)
            do { try memoryNode.revoke(access) } catch { note(["revoking the recoverer: \(error)"]) }
        }
        do {
            let reports = try await cluster.recover(computeNode: Self.victim)
            outcome.withLock { $0.blocksReclaimed += reports.map(\.blocksReclaimed).reduce(0, +) }
            // Recovery is idempotent: a second run finds nothing to do.
            let again = try await cluster.recover(computeNode: Self.victim)
            if again.contains(where: { !$0.alreadyRecovered }) { note(["a second recovery found work: \(again)"]) }
        } catch {
            note(["recovery failed: \(error)"])
        }
    }
}

extension FaultPlan.LateVerbs {
    /// The policies crash-point enumeration tries: drop them all, or run them all late.
    package static let enumerated: [FaultPlan.LateVerbs] = [.none, .all]
}
