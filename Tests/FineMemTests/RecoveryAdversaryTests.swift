import Testing
@testable import FineMem

// Adversarial tests of the crash-recovery protocol (PoolRecovery, RecoveryPass, fencing,
// leases). Each test is one interleaving written out in virtual time with a fixed seed
// (printed in every expectation). Tests marked "BREAK" fail on the code they were written
// against: they are findings, not regressions.

/// Runs `body` as the one top-level task of a simulation with `seed` and answers what it
/// returned, or the error it threw; nil when the run ended without an answer.
private func simulateAdversary<Value: Sendable>(
    seed: UInt64, _ body: @escaping @Sendable (Simulator) async throws -> Value
) -> Result<Value, any Error>? {
    let simulator = Simulator(seed: seed)
    let outcome = Locked<Result<Value, any Error>?>(nil)
    simulator.spawn {
        do {
            let value = try await body(simulator)
            outcome.withLock { $0 = .success(value) }
        } catch {
            outcome.withLock { $0 = .failure(error) }
        }
    }
    simulator.run()
    return outcome.withLock { $0 }
}

/// A recoverer's connection that runs `hook` before each of its batches (with the batch's
/// number, from 1, and its verbs): the recoverer's CPU being slow between two doorbells,
/// while the rest of the cluster goes on. The verbs themselves go unchanged to `inner`.
private final class PausingConnection: FabricConnection, @unchecked Sendable {
    let inner: any FabricConnection
    let hook: @Sendable (Int, [Verb]) async -> Void
    private let count = Locked(0)

    init(_ inner: any FabricConnection, hook: @escaping @Sendable (Int, [Verb]) async -> Void) {
        self.inner = inner
        self.hook = hook
    }

    var remoteNode: NodeID { inner.remoteNode }

    func post(_ verbs: [Verb]) async throws(FabricError) -> [VerbResult] {
        let number = count.withLock { value -> Int in
            value += 1
            return value
        }
        await hook(number, verbs)
        return try await inner.post(verbs)
    }
}

private let application = ApplicationID(1)

@Suite struct RecoveryAdversaryTests {
    /// BREAK (claim 1, claim 5): recovery keeps its index of the dead node's multi-section
    /// blocks (`PoolImage.multiSectionBlock`) across passes and never drops an entry. After
    /// pass 1 has freed X's 4 MiB block (sections 0-1: reclaim, record set to freed, bits
    /// cleared) the two sections are still "in X's multi-section block" for every later
    /// pass, and pass 2 always re-reads them (they were `touched`).
    ///
    /// Interleaving (pool of exactly two sections):
    /// 1. X allocates 4 MiB (sections 0-1), flushes, and is fenced.
    /// 2. Recovery pass 1: reads everything, reclaims both sections (states 0, X's multi
    ///    log pending), writes X's record freed, clears both bits.
    /// 3. The recoverer pauses before the READ of pass 2 (any delay does: a descheduled
    ///    monitor thread, a slow loopback).
    /// 4. Live node Y allocates 4 MiB: sections 0-1 are free, its claim commits, its
    ///    flush writes "allocated by Y" at chunk 0 and clears both bits.
    /// 5. Recovery pass 2 re-reads sections 0-1: both whole, no log pending, and the stale
    ///    index still says X owns them: `SectionHeader.reclaiming(_, inMultiSectionBlock:
    ///    true, of: X)` frees both sections of Y's live block, settle finds the record is
    ///    not X's (writes nothing) and clears the bits anyway.
    ///
    /// Y still holds a 4 MiB block whose sections are empty: the next allocation anywhere
    /// can take them (double ownership), and Y's own free fails with corrupt metadata.
    ///
    /// Suggested fix: rebuild `multiSectionBlock` from the records of each pass's READ
    /// (drop entries for re-read sections before indexing), or decide multi-section
    /// membership only from a record read in the same pass, and never reclaim a
    /// section that is whole with no pending log of X unless the record at its block's
    /// first section, read in the same pass, still says "allocated by X".
    /// Y's block is 4 MiB (a multi-section claim of the same run) or 2 MiB (a section-layer
    /// block of 16 spans, which makes one section all whole): both are freed.
    @Test(arguments: [10, 9])
    func recoveryFreesALiveMultiSectionBlockThroughItsStaleIndex(liveSize: Int) throws {
        let seed: UInt64 = 101
        let result = simulateAdversary(seed: seed) { simulator -> (problems: [String], report: RecoveryReport, freeError: String?) in
            let cluster = try await EmbeddedCluster.start(.init(poolBytesPerNode: 4 << 20, computeNodes: 2), simulator: simulator)
            let (x, y) = (cluster.computeNodes[0], cluster.computeNodes[1])
            let inspector = PoolInspector(cluster: cluster)
            let dead = try await x.allocate(chunkCountLog2: 10, application: application)
            await cluster.quiesce()
            try await cluster.fence(computeNode: 0)
            let memoryNode = cluster.memoryNodes[0]
            let (grant, raw) = memoryNode.recoveryAccess(from: NodeID(900))
            let intentsRead = grant.intentAddress(owner: x.owner, slot: 0)
            let reads = Locked(0)
            let yBlock = Locked<Block?>(nil)
            let problems = Locked<[String]>([])
            let connection = PausingConnection(raw) { _, verbs in
                // The READ that starts each pass begins with the dead node's intents.
                guard case .read = verbs.first, verbs.first?.address == intentsRead else { return }
                let pass = reads.withLock { value -> Int in
                    value += 1
                    return value
                }
                guard pass == 2 else { return }
                // Between pass 1 and pass 2: Y allocates the 4 MiB pass 1 just freed.
                do {
                    let block = try await y.allocate(chunkCountLog2: liveSize, application: application)
                    await y.quiesce()
                    yBlock.withLock { $0 = block }
                    problems.withLock { $0 += inspector.admit(block, owner: y.owner) }
                } catch {
                    problems.withLock { $0.append("Y could not allocate 2^\(liveSize) chunks between passes: \(error)") }
                }
            }
            var report = RecoveryReport()
            var recoveryError: String?
            do { report = try await PoolRecovery(owner: x.owner, grant: grant, connection: connection, runtime: simulator).run() } catch {
                recoveryError = "recovery of X failed: \(error)"
            }
            await cluster.quiesce()
            var found = problems.withLock { $0 } + (recoveryError.map { [$0] } ?? [])
            guard let block = yBlock.withLock({ $0 }) else { return (found + ["Y never allocated"], report, nil) }
            #expect(dead.chunks.contains(block.firstChunk), "seed \(seed): Y's block \(block) is not where X's was (\(dead)): the set-up did not happen")
            found += inspector.marked(block)
            found += inspector.checkAtRest()
            var freeError: String?
            do { try await y.free(block, application: application) } catch { freeError = "\(error)" }
            return (found, report, freeError)
        }
        let (problems, report, freeError) = try #require(result, "seed \(seed): no answer").get()
        #expect(problems == [], "seed \(seed): recovery of X changed Y's live block; report \(report)")
        #expect(report.blocksReclaimed == 1, "seed \(seed): X had one block, recovery reclaimed \(report.blocksReclaimed)")
        #expect(freeError == nil, "seed \(seed): Y could not free its own block: \(freeError ?? "")")
    }
}
